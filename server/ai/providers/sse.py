"""Server-sent events read incrementally from a response's bytes, as both providers stream their answers."""

from __future__ import annotations

_BOM = b"\xef\xbb\xbf"


class MalformedStream(ValueError):
    """The body was not the event stream the provider's API documents."""


class SSEParser:
    """The `data` of each complete event, from bytes in whatever pieces the network delivers them.

    Follows the event-stream format (https://html.spec.whatwg.org/multipage/server-sent-events.html): lines end
    in LF, CRLF or CR; an event ends at a blank line; its `data:` lines are joined with LF; comments (`:`)
    and other fields (`event:`, `id:`, `retry:`) are skipped. Events are split from the bytes, and only a
    complete event is decoded by the caller, so a frame or a multi-byte character cut across reads is
    whole by the time it is read.
    """

    __slots__ = ("_pending", "_started")

    def __init__(self) -> None:
        self._pending = b""
        self._started = False

    def feed(self, data: bytes) -> list[bytes]:
        """The events this piece completes (their data, empty events left out); the rest waits for more."""
        buffer = self._pending + data if self._pending else data
        if not self._started:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._pending = buffer
                return []
            self._started = True
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        held = b""
        if b"\r" in buffer:
            if buffer.endswith(b"\r"):  # maybe the first half of a CRLF: wait for the next byte
                buffer, held = buffer[:-1], b"\r"
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        frames = buffer.split(b"\n\n")
        self._pending = frames.pop() + held
        return [event for frame in frames if (event := _data(frame)) is not None]

    def finish(self) -> list[bytes]:
        """At the end of the body: an event the server did not close with a blank line still counts."""
        rest, self._pending = self._pending, b""
        if not rest:
            return []
        if b"\r" in rest:
            rest = rest.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return [event for frame in rest.split(b"\n\n") if (event := _data(frame)) is not None]


def _data(frame: bytes) -> bytes | None:
    """One event's data: its `data:` lines joined with LF, or None when it has none (a comment, a keep-alive)."""
    if frame.startswith(b"data: ") and b"\n" not in frame:  # the usual event: one data line
        return frame[6:]
    lines: list[bytes] = []
    for line in frame.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":
            lines.append(b"")
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)

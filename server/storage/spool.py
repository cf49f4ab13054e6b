"""Buffered writes on disk: what was acknowledged during a Redis outage survives a restart of the process."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from loguru import logger

SUFFIX = ".spool"


class Spool:
    """An append-only file per process under DATA_DIR: one line per buffered write, then a line per write done.

    The file is created on the first write (most processes never need it) and locked while the process lives;
    at start, a file nobody holds a lock on belonged to a process that died, and its writes not yet done are
    taken over. Writes are fsynced before the client is acknowledged; "done" marks are not (replaying a write
    already in Redis stores nothing twice: message ids are idempotent).
    """

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.path = directory / f"{name}{SUFFIX}"
        self._fd: int | None = None

    def take_orphans(self, adopt: Callable[[dict[str, Any]], None]) -> int:
        """Hand each write that processes which died left undone to `adopt` (oldest file first), then remove them.

        `adopt` buffers it here, which writes it to this process's own spool first: a crash now loses nothing.
        """
        if not self.directory.is_dir():
            return 0
        adopted = 0
        files = sorted(self.directory.glob(f"*{SUFFIX}"), key=lambda p: p.stat().st_mtime)
        for path in files:
            if path == self.path:
                continue
            fd = os.open(path, os.O_RDWR)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's spool
                undone = _undone(path.read_bytes())
                if undone:
                    logger.warning("replaying {} buffered writes left by a process that stopped ({})", len(undone), path.name)
                for entry in undone:
                    adopt(entry)
                adopted += len(undone)
                path.unlink(missing_ok=True)
            finally:
                os.close(fd)
        return adopted

    def write(self, entry: dict[str, Any]) -> None:
        """Append one buffered write and make it durable (called before the write is acknowledged)."""
        fd = self._open()
        os.write(fd, orjson.dumps(entry) + b"\n")
        os.fsync(fd)

    def done(self, seq: int) -> None:
        """Mark one write as stored in Redis."""
        if self._fd is not None:
            os.write(self._fd, b'{"done":%d}\n' % seq)

    def clear(self) -> None:
        """Everything reached Redis: start the file over."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self) -> None:
        """Release the file; an empty one is removed."""
        if self._fd is None:
            return
        empty = os.fstat(self._fd).st_size == 0
        if empty:
            self.path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = None

    def _open(self) -> int:
        if self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._fd = fd
        return self._fd


def _undone(raw: bytes) -> list[dict[str, Any]]:
    """The entries of a spool file without a later "done" mark (a torn last line is ignored)."""
    entries: dict[int, dict[str, Any]] = {}
    for line in raw.splitlines():
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if "done" in item:
            entries.pop(int(item["done"]), None)
        elif "seq" in item:
            entries[int(item["seq"])] = item
    return [entries[seq] for seq in sorted(entries)]

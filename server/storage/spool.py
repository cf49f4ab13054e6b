"""Buffered writes on disk: what was acknowledged during a Redis outage survives a restart of the process."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Callable, Iterable
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
        for path in _oldest_first(self.directory.glob(f"*{SUFFIX}")):
            if path == self.path:
                continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue  # another process starting beside this one (WORKERS) took it over first
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # a live process's spool
                if not _still_at(fd, path):
                    continue  # taken over and removed by another process between our open and our lock
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
        while self._fd is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            # The name is this process's own; only a process checking it for an orphan holds it, for a moment.
            fcntl.flock(fd, fcntl.LOCK_EX)
            if _still_at(fd, self.path):
                self._fd = fd
            else:  # another process starting took the new, unlocked file for an orphan and removed it: again
                os.close(fd)
        return self._fd


def _oldest_first(paths: Iterable[Path]) -> list[Path]:
    """Spool files by age; one removed meanwhile (another process took it over) is left out."""
    aged: list[tuple[float, Path]] = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            aged.append((path.stat().st_mtime, path))
    return [path for _, path in sorted(aged)]


def _still_at(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the one named `path` (not removed, nor replaced, since it was opened)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


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

"""One writer at a time for every run, study folder and model cache entry.

``exclusive(path)`` takes an operating-system lock (the ``filelock`` package: ``flock`` on
Linux, released by the kernel when the holder dies, SIGKILL included) on a hidden file beside
``path``, and records who holds it (process, host, command, start time) in a second file so
that a second writer is told at once whom it is waiting for instead of silently replacing
their work. The lock files stay behind after release: deleting them would let two writers hold
"the" lock on two different files.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout


_locks: dict[Path, FileLock] = {}  # one instance per lock file in this process: re-entrant


class WriterBusyError(RuntimeError):
    """Another process is writing the same path right now."""


def lock_path(path: str | Path) -> Path:
    path = Path(path).expanduser().absolute()
    return path.with_name(f".{path.name}.lock")


@contextmanager
def exclusive(path: str | Path, what: str = "run", wait: float = 0.0) -> Iterator[None]:
    """Hold the write lock of ``path`` for the body, or raise :class:`WriterBusyError` at once
    (after ``wait`` seconds: a model cache being filled by another process is worth waiting for).

    Re-entrant within one process (a study holding its folder may save runs inside it).
    """
    lock_file = lock_path(path)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    owner_file = lock_file.with_name(lock_file.name + ".owner")
    lock = _locks.setdefault(lock_file, FileLock(lock_file, timeout=0))
    try:
        lock.acquire(timeout=wait)
    except Timeout:
        raise WriterBusyError(
            f"the {what} {path} is being written by another process ({_holder(owner_file)}); wait for it to "
            "finish, or write to another path."
        ) from None
    outermost = lock.lock_counter == 1
    try:
        if outermost:
            owner = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}
            owner_file.write_text(json.dumps(owner))
        yield
    finally:
        if outermost:
            owner_file.unlink(missing_ok=True)
        lock.release()


def _holder(owner_file: Path) -> str:
    try:
        owner = json.loads(owner_file.read_text())
        return f"pid {owner['pid']} on {owner['host']} since {owner['since']}: {owner['command']}"
    except (OSError, ValueError, KeyError):
        return "holder unknown"

"""Ctrl-C at safe points only, and the leftovers of runs that were killed outright.

`deferred_interrupt()` replaces the SIGINT handler while a tool writes: a Ctrl-C is recorded
(one line says so) and raised as KeyboardInterrupt by `check()` at the next safe point (between
two complete orbax writes), never in the middle of one; orbax's background writers are then
idle, so the temporary folder can be removed without them recreating files in it.

A SIGKILL cannot be caught: a conversion's temporary folder carries an owner file (host, pid)
and the next run on the same destination removes folders whose owner is gone.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Iterator

OWNER_FILE = ".lens-jax-owner.json"


class Deferred:
    """The state of one `deferred_interrupt` block."""

    def __init__(self, message: str):
        self.message = message
        self.requested = False

    def _handler(self, signum, frame) -> None:
        if not self.requested:
            print(self.message, file=sys.stderr, flush=True)
        self.requested = True

    def check(self) -> None:
        """Raise KeyboardInterrupt if Ctrl-C was pressed since the block began."""
        if self.requested:
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupt(message: str = "interrupt: finishing the current write, then cleaning up ...") -> Iterator[Deferred]:
    """Within the block SIGINT only sets a flag that `Deferred.check()` turns into KeyboardInterrupt
    (a Ctrl-C after the last check, once the work is complete, is ignored). Outside the main thread (where handlers cannot be installed) it does nothing."""
    state = Deferred(message)
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    previous = signal.signal(signal.SIGINT, state._handler)
    try:
        yield state
    finally:
        signal.signal(signal.SIGINT, previous)


def mark_owner(folder: Path) -> None:
    """Record this process as the owner of a temporary folder."""
    (folder / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))


def unmark_owner(folder: Path) -> None:
    (folder / OWNER_FILE).unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_gone(folder: Path) -> bool:
    """Whether the process that made `folder` has ended (unknown or other-host owners count as alive
    unless the folder has no owner file at all, as left by a run killed before writing one)."""
    try:
        owner = json.loads((folder / OWNER_FILE).read_text())
    except FileNotFoundError:
        return True
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return False
    return not _alive(int(owner.get("pid", -1)))


def clean_leftovers(dst: Path, patterns: tuple[str, ...], log) -> list[Path]:
    """Remove `dst.parent/.{dst.name}{pattern}` folders whose owner is gone; name the others."""
    removed = []
    if not dst.parent.is_dir():
        return removed
    for pattern in patterns:
        for leftover in sorted(dst.parent.glob(f".{dst.name}{pattern}")):
            if not leftover.is_dir():
                continue
            if owner_gone(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
                log(f"removed {leftover} (left by an interrupted conversion)")
                removed.append(leftover)
            else:
                log(f"note: {leftover} belongs to a conversion that may still run; if none does, "
                    f"remove it with `rm -rf {leftover}`")
    return removed

"""Write a folder's files all or nothing: into a staging folder beside it, moved in when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["staged_folder"]


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike, last: Callable[[str], bool] = lambda name: False) -> Iterator[Path]:
    """Yield a hidden staging folder beside `folder` (same filesystem: files move in by rename).

    When the block ends without an error, every file written there is moved into `folder` (created if
    needed), those `last(name)` picks after the others (an index or a report that names the rest). An
    error or Ctrl-C inside the block leaves `folder` as it was. The staging folder is always removed.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.partial-", dir=folder.parent))
    try:
        yield stage
        folder.mkdir(exist_ok=True)
        for f in sorted(stage.iterdir(), key=lambda f: last(f.name)):
            os.replace(f, folder / f.name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)

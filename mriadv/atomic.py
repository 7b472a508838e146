"""Files replaced in one step: a reader, a resumed run or a kill never meets half a file."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Write ``path`` through a temporary sibling: the block writes the yielded path, which then
    replaces ``path`` with ``os.replace`` (atomic on one file system). The folder is created when
    missing; if the block raises, ``path`` is untouched and the temporary file removed.

    The temporary name ends in ``.tmp<pid>``, so processes that write the same file at once do not
    write into each other's temporary file (the last replace wins)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only left behind when the block raised


__all__ = ["atomic_write"]

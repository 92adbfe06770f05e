"""Writing cache files so that no reader ever sees a half-written one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path` to write a file or a folder to; renamed onto `path` when the block
    succeeds, removed if it fails (the rename is atomic on one file system: readers see all or nothing)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp)
        else:
            tmp.unlink(missing_ok=True)


def build_once(path: Path, build: Callable[[Path], None]) -> None:
    """Create the cache file or folder `path` by `build(tmp)` unless it exists.

    Processes that start together (DDP ranks, sweep jobs) take `<path>.lock`: one builds, the others
    wait and then find the file. `build` writes to a temporary path that is renamed onto `path`.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        if path.exists():  # another process built it while this one waited
            return
        with atomic_path(path) as tmp:
            build(tmp)


def names_a_path(source: str) -> bool:
    """Whether `source`, a model's location, names a local path (it must then exist) rather than a hub repository
    ("owner/name"): it exists, starts like a path, or has more than one slash."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1

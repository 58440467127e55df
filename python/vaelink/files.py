"""Files written whole or not at all: a reader (or a run interrupted by Ctrl-C, a crash) never
sees half a file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

__all__ = ["atomic_write_bytes", "fsync_dir", "temporary_sibling"]


def temporary_sibling(path: Path) -> Path:
    """A hidden name beside `path`, on the same file system, so that a rename replaces it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray) -> None:
    """Writes `path` whole or not at all: a dot-file beside it, flushed, then renamed over it."""
    path = Path(path)
    tmp = temporary_sibling(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)

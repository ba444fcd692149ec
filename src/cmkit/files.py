"""Files written atomically: a temporary sibling, renamed over the target only once complete."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cmkit.errors import CmkitError


def atomic_path(path: Path) -> Path:
    """A temporary sibling of ``path`` (same folder and suffix) to write before renaming over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    return Path(tmp)


@contextlib.contextmanager
def atomic_write(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is flushed to disk (fsync), renamed over
    ``path`` and the rename made durable (fsync of the folder); on any failure removed. An OSError (a full disk,
    a folder that cannot be written) becomes a CmkitError naming ``path``."""
    try:
        tmp = atomic_path(path)
    except OSError as e:
        raise CmkitError(f"{path}: cannot be written ({e.strerror or e})") from None
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as e:
        raise CmkitError(f"{path}: cannot be written ({e.strerror or e}); nothing was written") from None
    finally:
        tmp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a written file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Files written atomically: a temporary sibling, renamed over the target only once complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def new_folder(out_dir: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder of ``out_dir`` to fill; on success it is renamed to ``out_dir``, so the
    folder is either complete or absent; on any failure removed. ``out_dir`` must be new or an empty folder in an
    existing one (CmkitError otherwise, before anything is written)."""
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise CmkitError(f"{out_dir}: already exists and is not an empty folder; expected a new folder name")
    if not out_dir.parent.is_dir():
        raise CmkitError(f"{out_dir}: folder {out_dir.parent} does not exist")
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        yield tmp
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_json_object(path: Path, expected: str) -> dict[str, Any]:
    """The JSON object in ``path``; CmkitError naming the file and ``expected`` (what it should be) otherwise."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CmkitError(f"{path}: unreadable JSON ({e}); expected {expected}") from None
    if not isinstance(data, dict):
        raise CmkitError(f"{path}: expected a JSON object ({expected})")
    return data


def _fsync(path: Path) -> None:
    """Flush a written file's (or a folder's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

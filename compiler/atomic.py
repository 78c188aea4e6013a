"""Write files so that a failure leaves nothing behind and never clobbers a good file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from compiler.errors import ArtifactError


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary path in the destination folder; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise ArtifactError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a folder")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

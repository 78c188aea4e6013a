"""Write files so that a failure leaves nothing behind and never clobbers a good file."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from compiler.errors import ArtifactError


@contextlib.contextmanager
def atomic_path(path, suffix: str = ".tmp"):
    """Yield a temporary path in the destination folder; rename it onto `path` only if the block succeeds.

    Any OSError, here or in the block (a full disk, a read-only folder), becomes an ArtifactError naming
    `path` and the cause; the temporary file is removed whatever happens.
    """
    path = Path(path)
    folder = path.parent
    if not folder.is_dir():
        raise ArtifactError(f"cannot write {path}: folder {folder} does not exist")
    if path.is_dir():
        raise ArtifactError(f"cannot write {path}: it is a folder")
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=folder)
        os.close(fd)
        tmp = Path(tmp_name)
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        _fsync(tmp)  # the data is on disk before the name points at it: a crash leaves the old file or the new
        os.replace(tmp, path)
    except OSError as err:
        raise ArtifactError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):  # (a read-only folder may refuse even this; nothing to keep then)
                tmp.unlink(missing_ok=True)


def _fsync(file: Path) -> None:
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_folder(path, replace: bool = False):
    """Yield a temporary folder beside `path`; when the block succeeds it becomes `path`. An existing `path` is
    an error unless it is empty or `replace` is true; it is then swapped out and removed only after the new
    folder is complete. Whatever fails, the temporary folder is removed and `path` is left as it was."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise ArtifactError(f"cannot write {path}: folder {parent} does not exist")
    if path.exists() and not path.is_dir():
        raise ArtifactError(f"cannot write folder {path}: a file of that name exists")
    if path.is_dir() and any(path.iterdir()) and not replace:
        raise ArtifactError(f"{path} exists and is not empty: pass --force to replace it")
    tmp = old = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent))
        yield tmp
        os.chmod(tmp, 0o777 & ~current_umask())
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
        raise ArtifactError(f"cannot write {path}: {err.strerror or err}") from err
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)

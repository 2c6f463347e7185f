"""Atomic file writes: a file is written under a temporary name in its own folder, flushed to disk and
renamed over its final name, so a reader sees the old file or the whole new one, never a part; a
writer that fails (an exception, a full disk) leaves no temporary behind.

    atomic_write_text(run / "config.yaml", text)
    atomic_write(run / "backbone.safetensors", lambda path: save_file(state, str(path)))

Why here: `models/` and `pipelines/` (and the tools) all write files, `pipelines/` never imports
`models/`, and `models/` never imports DALI or Kornia. This module imports only the standard library
and `pipelines/__init__.py` imports nothing, so importing it from `models/` loads no DALI or Kornia.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

_TEMPORARY = re.compile(r"\.(?P<target>.+)\.[0-9a-f]{8}\.tmp")


def temporary_path(path: str | Path) -> Path:
    """A new empty file beside `path`, `.<name>.<8 hex digits>.tmp` (hidden; `target_name` maps it back),
    created with the permissions a plain `open` would give the final file."""
    path = Path(path)
    while True:
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return candidate
        except FileExistsError:
            continue


def target_name(name: str) -> str | None:
    """The file name a `temporary_path` name stands in for (None for any other name)."""
    match = _TEMPORARY.fullmatch(name)
    return match["target"] if match else None


def commit(temporary: str | Path, path: str | Path) -> Path:
    """Flush `temporary` to disk and rename it to `path` (then the rename itself, via the folder)."""
    temporary, path = Path(temporary), Path(path)
    descriptor = os.open(temporary, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    os.replace(temporary, path)
    _fsync_folder(path.parent)
    return path


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """`write(temporary)` writes the file (e.g. `torch.save`, safetensors' `save_file`); then `commit`.
    The file gets the permissions of a plain `open` whatever `write` did. If `write` or the commit fails,
    the temporary is removed and `path` is as it was."""
    temporary = temporary_path(path)
    try:
        mode = stat.S_IMODE(temporary.stat().st_mode)
        write(temporary)
        os.chmod(temporary, mode)  # a writer may replace the file with a private one (safetensors' save_file)
        return commit(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    return atomic_write(path, lambda temporary: temporary.write_text(text, encoding=encoding))


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # a folder cannot be opened for syncing elsewhere
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    except OSError as error:  # a file system that cannot sync a directory: the rename is done regardless
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(descriptor)

"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import CadsamError


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it into place: a crash
    leaves the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        mode = plain_file_mode(path.parent)
        write(tmp)
        os.chmod(tmp, mode)  # some writers (safetensors) make their file 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plain_file_mode(folder: str | os.PathLike) -> int:
    """The permissions ``open(..., "w")`` gives a new file in ``folder`` (0666 less the umask),
    asked of the file system by making one: reading the umask means changing it, which is
    unsafe with threads running."""
    probe = Path(folder) / f".cadsam-mode-{secrets.token_hex(8)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return stat.S_IMODE(os.fstat(fd).st_mode)
    finally:
        os.close(fd)
        probe.unlink()


def check_output_folder(path: str | os.PathLike, flag: str) -> None:
    """Refuse a folder to write into that is a file (or lies under one) before any work: found
    only at the first write, it would end a long run in a traceback."""
    path = Path(path)
    for folder in (path, *path.parents):
        if folder.is_dir():
            return
        if folder.exists():
            what = f"{flag} {path}" if folder == path else f"{flag} {path}: {folder}"
            raise CadsamError(
                f"{what} is a file, not a folder: {flag} names a folder to write into"
            )

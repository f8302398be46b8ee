"""Writing files so that a reader never sees half of one."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
from collections.abc import Callable
from pathlib import Path

from .errors import CadsamError

FULL_DISK_BYTES = 1 << 20  # free space below which a failed write is a full disk


def read_text(path: str | os.PathLike, what: str) -> str:
    """A small text file a user names (a class file, a prompts file), or one line saying why
    it cannot be read."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise CadsamError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise CadsamError(f"cannot read {what} {path}: {why}") from None


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
    except Exception as exc:
        said = _write_error(exc, path)
        if said is None:
            raise
        raise said from exc
    finally:
        tmp.unlink(missing_ok=True)


def _write_error(exc: Exception, path: Path) -> OSError | None:
    """``exc`` as an OSError naming ``path``, where it is one said of the temporary files
    beside it (or of no file), or a full disk that a writer said in its own words; else None."""
    if isinstance(exc, OSError):
        named = Path(exc.filename) if exc.filename is not None else None
        if named is None or (named.parent == path.parent and named.name.startswith(".")):
            return OSError(exc.errno, exc.strerror, str(path))
        return None
    full = "No space left on device" in str(exc)  # safetensors' SafetensorError says it so
    if not full and isinstance(exc, RuntimeError):  # torch.save's says "unexpected pos ..."
        full = shutil.disk_usage(path.parent).free < FULL_DISK_BYTES
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) if full else None


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


def read_run_state(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A run's ``state.pt``, or one line saying the run cannot be resumed from it: a truncated
    or overwritten file is otherwise a traceback from deep inside torch."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except OSError:
        raise  # not found, permissions: said as such
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError ...
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise CadsamError(
            f"{path} is damaged ({why}): the run cannot be resumed from it; "
            "train it again into another --out"
        ) from None

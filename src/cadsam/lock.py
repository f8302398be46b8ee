"""One writer per run folder: ``train``, ``cache``, ``reproduce`` and ``demo`` hold a lock on
their ``--out`` while they write there, so that two runs started on one folder cannot mix their
files. The lock is an ``flock`` on ``OUT/.lock``, which names the holder's process: the
operating system lets go of it when the process dies, however it dies, so a lock file left
behind by a killed run is taken over (and said to be), never waited on."""

from __future__ import annotations

import errno
import functools
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .errors import CadsamError
from .files import check_output_folder

try:
    import fcntl
except ImportError:  # Windows: no flock; runs there are not guarded
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".lock"
Function = TypeVar("Function", bound=Callable[..., Any])


class FolderLock:
    """``with FolderLock(out, "cadsam train"):`` holds ``out`` (made if missing) for this
    process. A second holder is refused in one line naming the first one's process; folders
    made only to hold the lock are removed again if nothing else was written into them."""

    def __init__(self, folder: str | os.PathLike, command: str, flag: str = "--out") -> None:
        self.folder, self.command, self.flag = Path(folder), command, flag
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None
        self._made: list[Path] = []

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> FolderLock:
        check_output_folder(self.folder, self.flag)
        self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._fd = self._lock()
        except OSError as exc:
            self._remove_made()
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            raise CadsamError(
                f"{self.flag} {self.folder}: cannot write there ({exc.strerror}); "
                f"choose another {self.flag}"
            ) from None
        except BaseException:
            self._remove_made()
            raise
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still held: a waiting opener retries
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_made()

    def _lock(self) -> int:
        """The locked file's descriptor, with this process written into it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise CadsamError(self._in_use(holder)) from None
            except OSError as exc:
                if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP):
                    os.close(fd)
                    raise
            if _same_file(fd, self.path):
                break
            os.close(fd)  # the file was removed by the holder as it let go: lock the new one
        previous = _holder(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {self.command}\n".encode(), 0)
        if previous and previous[0] != os.getpid():
            pid, command = previous
            state = "which no longer holds it" if _alive(pid) else "which is gone"
            print(
                f"cadsam: note: {self.flag} {self.folder}: took over the lock from process "
                f"{pid} ({command}), {state}",
                file=sys.stderr,
            )
        return fd

    def _in_use(self, holder: tuple[int, str] | None) -> str:
        who = f"process {holder[0]} ({holder[1]})" if holder else "another process"
        return (
            f"{self.flag} {self.folder} is in use by {who}; wait for it or choose another "
            f"{self.flag}"
        )

    def _remove_made(self) -> None:
        """Remove the folders acquire made, deepest first, where they are still empty."""
        for folder in self._made:
            try:
                folder.rmdir()
            except OSError:
                break
        self._made = []


def _holder(fd: int) -> tuple[int, str] | None:
    """(process id, command) a lock file names, or None if it names none."""
    pid, _, command = os.pread(fd, 256, 0).decode(errors="replace").strip().partition(" ")
    return (int(pid), command or "cadsam") if pid.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def holds_out_lock(command: str, folder: str = "out") -> Callable[[Function], Function]:
    """Decorate a writer so that it runs holding the lock on its output folder: ``folder``
    names the argument (``"out"``) or an attribute of one (``"cfg.out"``). Under torchrun only
    rank 0 takes it: the other ranks are the same run."""
    argument, _, attribute = folder.partition(".")

    def decorate(function: Function) -> Function:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            if int(os.environ.get("RANK", "0")) != 0:
                return function(*args, **kwargs)
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            where = bound.arguments[argument]
            where = getattr(where, attribute) if attribute else where
            with FolderLock(where, command):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate

"""One open file: a descriptor opened once (never through a symlink where asked, never
blocking on a FIFO, every failure a typed error naming the file), the stat taken then, and
positioned reads of exactly the bytes asked for. Never a mapping of the user's checkpoint: a
file truncated under one kills the reader with SIGBUS.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from collections.abc import Iterator

from . import _faults
from .errors import (
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    FileAccessError,
    TruncatedFileError,
)

# preadv takes at most this many buffers per call.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


_IS_A_DIRECTORY = "{}: is a directory, not a .safetensors file"


def open_for_reading(path: str, *, follow_symlinks: bool = True) -> int:
    """A read-only descriptor of the regular file at ``path``; every failure is a typed error.

    Opened non-blocking, so a FIFO planted at the name never hangs the caller
    (it is refused as not a regular file). ``follow_symlinks=False`` refuses a
    symlink at the name: for files sa3loader names itself (siblings), never the user's.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{path}: no such checkpoint file", filename=path, errno=errno.ENOENT
        ) from exc
    except IsADirectoryError as exc:
        raise CheckpointIsADirectoryError(
            _IS_A_DIRECTORY.format(path), filename=path, errno=errno.EISDIR
        ) from exc
    except PermissionError as exc:
        raise CheckpointPermissionError(
            f"{path}: permission denied ({exc.strerror})", filename=path, errno=exc.errno
        ) from exc
    except OSError as exc:
        raise FileAccessError(
            f"{path}: cannot open ({exc.strerror})", filename=path, errno=exc.errno
        ) from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointIsADirectoryError(_IS_A_DIRECTORY.format(path), filename=path, errno=errno.EISDIR)
        if not stat.S_ISREG(mode):
            raise FileAccessError(
                f"{path}: not a regular file (a FIFO, socket or device)", filename=path, errno=errno.EINVAL
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileHandle:
    """One open descriptor of a file, and what ``fstat`` said when it was opened.

    Every read of a load goes through the descriptor whose header was parsed,
    so a checkpoint replaced by path meanwhile (``os.replace``, ``cp`` to a new
    inode) is never mixed into the load; ``changed()`` tells whether the file
    itself was rewritten in place since.
    """

    def __init__(self, path: str, *, follow_symlinks: bool = True, fd: int | None = None) -> None:
        """``fd``: a descriptor already open (of a regular file), which the handle then owns."""
        self.path = path
        # Taken before the open: a write after it is seen as a change (see ``racy``).
        self.opened_ns = time.time_ns()
        self._fd: int | None = open_for_reading(path, follow_symlinks=follow_symlinks) if fd is None else fd
        self.stat = os.fstat(self._fd)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: the file was closed")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def changed(self) -> bool:
        """Whether the file may have been written since it was opened: its size or mtime moved, or
        its ctime did with its link count unchanged (a rewrite that sets the mtime back). Renaming
        a new file over this one's name (a republish) moves the ctime too, but takes a link away,
        and the content is intact."""
        now = os.fstat(self.fileno())
        if (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            return True
        return now.st_ctime_ns != self.stat.st_ctime_ns and now.st_nlink == self.stat.st_nlink


def read_exact(fd: int, offset: int, length: int, path: str) -> bytearray:
    """Exactly ``length`` bytes at ``offset``, or ``TruncatedFileError``."""
    data = bytearray(length)
    preadv_exact(fd, [memoryview(data)], offset, path)
    return data


def preadv_exact(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill every view from ``offset`` on, across short reads and the iovec limit.

    A file that ends first raises ``TruncatedFileError`` (a ``HeaderError`` and an ``EOFError``).
    """
    views = [v for v in views if len(v)]
    while views:
        batch = views[: _faults.tuned("iov_max", _IOV_MAX)]
        try:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, batch, offset)
            else:  # Python builds for macOS before 11 have pread but not preadv
                got = _pread_into(fd, batch[0], offset)
        except OSError as exc:
            raise FileAccessError(
                f"{path}: read failed at byte {offset} ({exc.strerror})", filename=path, errno=exc.errno
            ) from exc
        if got == 0:
            raise TruncatedFileError(f"{path}: file ends early (truncated at byte {offset})", filename=path)
        offset += got
        while got:
            if got >= len(views[0]):
                got -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][got:]
                got = 0


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def pieces_of(offset: int, nbytes: int, piece_bytes: int) -> Iterator[tuple[int, int]]:
    """(file offset, bytes) of the pieces of ``nbytes`` at ``offset``, at most ``piece_bytes`` each."""
    end = offset + nbytes
    while offset < end:
        yield offset, min(piece_bytes, end - offset)
        offset += piece_bytes

"""The new file a conversion writes: its bytes taken on disk first, then written through a
mapping where that is safe (``output_mapping``), else with ``pwrite`` from a buffer."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import stat
import sys
from collections.abc import Iterator

from . import _faults

_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def take_space(fd: int, size: int) -> bool | None:
    """Whether ``size`` bytes of disk are taken for the file now (Linux ``fallocate``: its size
    too, so ``ls``, ``du`` and ``cache scan`` of a killed writer's file show them): True, or
    False where they could not be (ENOSPC): either way another load's room check sees them gone.
    None where the filesystem cannot (glibc's ``posix_fallocate`` writes a byte per block)."""
    fallocate = _faults.fact("fallocate", None, getattr(_libc, "fallocate", None))
    if fallocate is None or size <= 0:
        return None
    if fallocate(fd, 0, ctypes.c_int64(0), ctypes.c_int64(size)) == 0:
        return True
    return False if ctypes.get_errno() == errno.ENOSPC else None


# Filesystems (``statfs``' f_type) where a write into bytes ``fallocate`` took allocates no block
# of data (ext2/3/4 share one number; ext2 and ext3 refuse fallocate), so a write fault through a
# mapping cannot fail for want of space (it would kill the process with SIGBUS, not raise).
# Elsewhere (btrfs copies on write; NFS, FUSE, overlayfs) the file is written with pwrite.
RESERVED_WRITES_IN_PLACE = frozenset({0xEF53, 0x58465342, 0x01021994})  # ext4, xfs, tmpfs


def _writes_in_place(fd: int) -> bool:
    """Of the open file itself, not its path's mount (``_host.mount_of``): a folder swapped for a
    link since it was opened cannot make another filesystem's answer stand for it."""
    fstatfs = getattr(_libc, "fstatfs", None)
    if fstatfs is None:
        return False
    buffer = ctypes.create_string_buffer(256)  # struct statfs: 120 bytes on 64-bit Linux
    if fstatfs(fd, buffer) != 0:
        return False
    f_type = ctypes.c_long.from_buffer(buffer).value  # its first field, a long on 64-bit Linux
    return f_type in RESERVED_WRITES_IN_PLACE


def mappable(fd: int, taken: bool | None) -> bool:
    """Whether a cast straight into the new file's mapping is safe: a fault there cannot fail
    for want of space (its bytes taken, on a filesystem that writes them in place), and no one
    but its owner (and root) may open it for writing, so no one else can shrink it under the
    mapping (SIGBUS) while it is written; sa3loader never shrinks a file."""
    if not taken or stat.S_IMODE(os.fstat(fd).st_mode) & 0o022:
        return False
    return _faults.fact("writes_in_place", None, _writes_in_place(fd))


@contextlib.contextmanager
def output_mapping(fd: int, size: int, taken: bool | None) -> Iterator[memoryview | None]:
    """The new file mapped for writing where ``mappable``; else None (written with ``pwrite``).
    A cast straight into the file's pages skips the two copies a buffer costs (zeros read in,
    the stripe written out): 2.9 GB converted ~8% faster (benchmarks/README.md)."""
    mapping = None
    if mappable(fd, taken):
        with contextlib.suppress(OSError, ValueError):
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    if mapping is None:
        yield None
        return
    view = memoryview(mapping)
    try:
        yield view
    finally:
        # Every worker has ended (``run_crew``); a slice of the view that an error's traceback
        # keeps keeps the mapping (BufferError) until it is freed: unmapped then.
        with contextlib.suppress(BufferError):
            view.release()
            mapping.close()


def populate(fd: int, into: memoryview, offset: int) -> None:
    """Read the stripe's range of the new file (zeros, bytes taken: ``take_space``) into the buffer
    its pieces then overwrite: a read makes the file's pages with no lock held, workers in
    parallel; a write makes them under the file's lock, one at a time (a 2.9 GB sibling: written
    4-8 s so, 1.4 s after reads: benchmarks/README.md). Beyond the file's end it reads nothing."""
    with contextlib.suppress(OSError, AttributeError):  # speed only (no preadv: macOS < 11's Python)
        os.preadv(fd, [into], offset)


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written

"""How a conversion reads its source: stripes handed to workers in file order, read ahead
(``StripeQueue``); float32 cast straight from a mapping, where a read lease makes it safe
(``leased_source``).

Casting from a mapping skips the copy a ``pread`` makes (a third of a conversion's CPU:
benchmarks/README.md). A mapping has one hazard: a file shrunk while it is mapped kills the
reader (SIGBUS) at its next touch past the new end. The invariant that rules it out: while an
open file of it holds a read lease (``F_SETLEASE``; one opened for the lease alone:
``_LeasedFiles``), no one opens the file for writing or truncates it: the kernel holds such an
``open`` or ``truncate`` until the lease is given back, or for ``lease-break-time`` seconds
after it asked. So a worker reads a stripe from the mapping only if the lease was whole as the
stripe began (``F_GETLEASE``: no break asked), and reads with ``pread`` once a break began: a
stripe takes milliseconds, a break at least ``MIN_BREAK_SECONDS``. Left: a process stopped
(SIGSTOP, a debugger) that long in the middle of a stripe while a writer waits.

The lease is asked for only where the kernel can give it and its break cannot hurt: Linux; a
filesystem where it guards the inode mapped (``_host.LEASE_GUARDS_MAPPING``: not an overlay,
whose layers a write can reach under the lease, nor a network one: other hosts' writers); the
process's own file (root may lease any, but another user's writers would wait on it); the
break's signal, SIGURG here (SIGIO's default ends the process), caught by no handler, Python's
or C's (the kernel's mask says). The kernel refuses it while anyone has the file open for
writing: then every byte is read, as without a lease. A writer that opens the file meanwhile
waits until the conversion has read its stripes (milliseconds), or, with ``O_NONBLOCK``,
fails with EAGAIN (``truncate(1)`` does).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import mmap
import os
import signal
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from . import _faults

if TYPE_CHECKING:
    from ._format import TensorEntry

# Source tensor, source offset, bytes, sibling offset (the entry's type named for checkers only).
Piece = tuple["TensorEntry", int, int, int]

logger = logging.getLogger(__name__)

READ_AHEAD_STRIPES = 4  # stripes the kernel is asked to read ahead of the workers (a cold disk)
MIN_BREAK_SECONDS = 10  # the kernel's default is 45
_LEASE_BREAK_TIME = "/proc/sys/fs/lease-break-time"
_F_SETLEASE = getattr(fcntl, "F_SETLEASE", None)  # Linux only


class StripeQueue:
    """The pieces of a conversion, handed to workers a stripe at a time, in file order.

    The first error any worker meets stops the others at their next piece and
    is raised by ``raise_first``.
    """

    def __init__(self, stripes: list[list[Piece]], fd: int, bar: Any) -> None:
        self._stripes = stripes
        self._next = 0
        self._fd, self._bar = fd, bar
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def take(self) -> list[Piece]:
        """The next stripe (empty when done or stopped); asks the kernel to read ahead of it."""
        with self._lock:
            if self.errors or self._next >= len(self._stripes):
                return []
            stripe = self._stripes[self._next]
            self._next += 1
            ahead = self._next + READ_AHEAD_STRIPES - 1
        _faults.point("stripe")
        if ahead < len(self._stripes) and hasattr(os, "posix_fadvise"):
            # The sibling's order, not the source's (f32 sorts elsewhere as f16): a stripe
            # that spans two dtypes may go backwards in the source.
            offset = min(piece[1] for piece in self._stripes[ahead])
            end = max(piece[1] + piece[2] for piece in self._stripes[ahead])
            os.posix_fadvise(self._fd, offset, end - offset, os.POSIX_FADV_WILLNEED)
        return stripe

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)

    def done(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


class LeasedSource:
    """The source's bytes (a uint8 tensor over a private mapping) and the lease that keeps them."""

    def __init__(self, fd: int, data: torch.Tensor | None) -> None:
        self._fd, self._data = fd, data
        self._lock = threading.Lock()
        self._reading = 0  # stripes being read from the mapping now
        self._breaking = False  # a writer asked for the file: no stripe starts on the mapping
        self._held = True

    @contextlib.contextmanager
    def stripe(self) -> Iterator[torch.Tensor | None]:
        """The mapping to read one stripe from, or None: read it with ``pread``. Once a writer
        asked for the file, no stripe starts on the mapping and the lease is given back as the
        last one ends: the writer waits for a stripe (milliseconds), not the conversion."""
        with self._lock:
            if not self._breaking and fcntl.fcntl(self._fd, fcntl.F_GETLEASE) != fcntl.F_RDLCK:
                self._breaking = True
            mapped = None if self._breaking else self._data
            self._reading += mapped is not None
            self._give_back_if_unread()
        try:
            yield mapped
        finally:
            if mapped is not None:
                with self._lock:
                    self._reading -= 1
                    self._give_back_if_unread()

    def give_back(self) -> None:
        """No stripe starts on the mapping again; the lease goes as soon as none is being read."""
        with self._lock:
            self._breaking = True
            self._give_back_if_unread()

    def _give_back_if_unread(self) -> None:
        if self._breaking and not self._reading and self._held:
            self._held = False
            try:
                fcntl.fcntl(self._fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
            except OSError as exc:
                if exc.errno != errno.EAGAIN:  # EAGAIN: a break timed out, the kernel took it back
                    raise


class _LeasedFiles:
    """The open files this process holds a read lease through, and what a fork does with them.

    A lease belongs to an open file, which lives as long as any descriptor of it, in any
    process: a child's copy would keep the lease after this process ended, and a writer would
    wait the whole lease-break-time. So the lease is taken on an open file of its own, opened
    anew (``/proc/self/fd``: the same inode) under the guard a fork waits for: no child has it
    but through a fork made while it is registered, and such a child points its copy at
    /dev/null (the number stays valid for whatever holds it). Nothing else opens it: the
    mapping is of the load's descriptor (a lease guards the inode, whichever open file maps it).
    """

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.held: dict[int, tuple[int, int]] = {}  # lease's descriptor -> (device, inode)

    def lease(self, fd: int) -> int:
        """A new descriptor of ``fd``'s file, holding a read lease (``OSError`` as the kernel's)."""
        with self.guard:
            own = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                st, read = os.fstat(own), os.fstat(fd)
                if (st.st_dev, st.st_ino) != (read.st_dev, read.st_ino):
                    raise OSError(errno.ESTALE, "not the file read")
                fcntl.fcntl(own, fcntl.F_SETSIG, signal.SIGURG)
                fcntl.fcntl(own, fcntl.F_SETLEASE, fcntl.F_RDLCK)
            except BaseException:
                os.close(own)
                raise
            self.held[own] = (st.st_dev, st.st_ino)
        return own

    def close(self, own: int) -> None:
        """Give back ``own``'s lease, if it still holds it, and close it."""
        with self.guard:
            self.held.pop(own, None)
            os.close(own)  # the lease goes with its open file's last descriptor

    def _before_fork(self) -> None:
        self.guard.acquire()

    def _after_fork_in_parent(self) -> None:
        self.guard.release()

    def _in_child(self) -> None:
        self.guard, held, self.held = threading.Lock(), self.held, {}
        for fd, identity in held.items():
            with contextlib.suppress(OSError):
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) == identity:
                    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
                    os.dup2(null, fd, inheritable=False)
                    os.close(null)


_leased_files = _LeasedFiles()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_leased_files._before_fork,
        after_in_parent=_leased_files._after_fork_in_parent,
        after_in_child=_leased_files._in_child,
    )


def _ours(fd: int) -> bool:
    return os.fstat(fd).st_uid == os.geteuid()


def _mapping(fd: int, end: int, path: str) -> torch.Tensor | None:
    try:
        return torch.frombuffer(mmap.mmap(fd, end, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    except OSError as exc:  # a filesystem that cannot map, no address space left: read it
        logger.debug("%s: cannot be mapped (%s): reading it", path, exc.strerror)
        return None


def _break_seconds() -> int:
    try:
        with open(_LEASE_BREAK_TIME, encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _sigurg_caught() -> bool:
    """Whether SIGURG has a handler: Python's, or one set in C that ``signal.getsignal`` cannot see
    (a native library's); the kernel's mask of caught signals tells both. Unknown: caught."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            caught = next(int(line.split()[1], 16) for line in f if line.startswith("SigCgt:"))
    except (OSError, ValueError, StopIteration, IndexError):
        return True
    return bool(caught >> (signal.SIGURG - 1) & 1)


def _may_lease(may_map: bool) -> bool:
    """Whether a lease may be asked for: a mapping allowed, its break slow enough, signalling nothing."""
    if not may_map or _F_SETLEASE is None or not hasattr(signal, "SIGURG") or _sigurg_caught():
        return False
    return _faults.fact("lease_break_seconds", None, _break_seconds()) >= MIN_BREAK_SECONDS


@contextlib.contextmanager
def leased_source(fd: int, path: str, end: int, *, may_map: bool) -> Iterator[LeasedSource | None]:
    """The first ``end`` bytes of ``fd``'s file mapped under a read lease, or None: no lease,
    read them. ``may_map``: a local filesystem, and mappings not refused (``io="read"``).

    The mapping is private (``torch.frombuffer`` wants a writable buffer) and never written. It
    is not unmapped here: a worker's error may keep a view of it alive in its traceback; it goes
    with the last view, never touched after the lease is given back.
    """
    # Another user's file (root may lease it): their writers would wait on this process.
    if end <= 0 or not _faults.fact("source_lease", path, _may_lease(may_map)) or not _ours(fd):
        yield None
        return
    try:
        own = _leased_files.lease(fd)
    except OSError as exc:
        logger.debug("%s: no read lease (%s): reading it", path, exc.strerror)
        yield None
        return
    leased = LeasedSource(own, None)
    try:
        # Shrunk before the lease, a mapping past its end would fault: read. Under the lease it stays.
        if os.fstat(fd).st_size >= end:
            leased = LeasedSource(own, _mapping(fd, end, path))
        yield leased
    finally:
        try:
            leased.give_back()
        finally:
            _leased_files.close(own)

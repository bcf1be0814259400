"""The conversion lock: one converter of a sibling at a time, across processes and hosts.

``fcntl.flock`` on ``<sibling>.lock``: the kernel releases it when the holder dies,
so a crash never leaves a stale lock, and it is keyed by the sibling's path, so
callers with different cache dirs that target one sibling still convert once.
Cache commands delete lock files only while holding them; whoever takes a lock
then checks that its descriptor is still the file at the path, and starts over if
not. On a network filesystem, where flock may not reach other hosts, a lease file
is held as well (``host_lease``).

**No child keeps a lock.** flock belongs to the open file description, which a
forked child shares: a worker forked while its parent converts would hold the lock
after the parent died, and every other process would wait the whole timeout. Each
``ConversionLock`` owns its descriptor, and every descriptor that may be locked is
registered from the moment it is opened (a fork cannot come between the open and
the registration: the fork waits for the registry's lock). A forked child closes
its copies, checked by device and inode, never by a number that may have been
reused, and never unlocks them (that would unlock the parent's).

**Why not filelock** (4.3.2, 2026-12-05): it acquires a FIFO planted at the lock's name,
and an existing lock file keeps its mode (0644 from an older writer) where sa3loader
makes it 0600 (tests in ``test_trust.py``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import threading
import time
import uuid
from collections.abc import Iterator

from . import _config, _faults
from ._config import LOCK_TIMEOUT_ENV, warn_once
from ._crew import started
from ._host import boot_id, network_filesystem
from ._places import LOCK_SUFFIX, process_gone
from .errors import LockTimeoutError, UnusableLockError

logger = logging.getLogger(__name__)

LOCK_FILE_MODE = 0o600
LOCK_POLL_S = 0.05
LOCK_LOG_EVERY_S = 5.0
# Filesystems (some NFS, FUSE) that do not support flock answer with these.
UNSUPPORTED_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Registry:
    """Every lock descriptor this process has open, the tokens of the leases it holds, and what
    to do with them at a fork.

    The one piece of process state the lock needs: its owner is this class, its
    fork behaviour is ``_close_in_child``.
    """

    def __init__(self) -> None:
        self.guard = threading.Lock()
        self.open: dict[int, tuple[int, int] | None] = {}  # descriptor -> (device, inode)
        # A lease of this process's pid holding another token was left by an interrupted
        # conversion here (no other process has this pid on this host).
        self.live_tokens: set[bytes] = set()

    def opened(self, path: str, flags: int) -> int:
        with self.guard:
            fd = os.open(path, flags, LOCK_FILE_MODE)
            self.open[fd] = _identity(fd)
        return fd

    def close(self, fd: int) -> None:
        with self.guard:
            self.open.pop(fd, None)
            os.close(fd)

    def _before_fork(self) -> None:
        self.guard.acquire()

    def _after_fork_in_parent(self) -> None:
        self.guard.release()

    def _close_in_child(self) -> None:
        self.guard = threading.Lock()
        for fd, identity in self.open.items():
            if identity is not None and _identity(fd) == identity:
                os.close(fd)  # never LOCK_UN: the lock is the parent's open file description's
        self.open.clear()
        self.live_tokens.clear()  # the parent's (its pid, not the child's)


_registry = _Registry()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_registry._before_fork,
        after_in_parent=_registry._after_fork_in_parent,
        after_in_child=_registry._close_in_child,
    )


def _open_lock_file(lock_path: str) -> int:
    """Open (creating) a lock file that only you can open: ``flock`` needs no more than read
    access, so a lock file others can read is a lock others can hold against you.

    Never through a symlink, never blocking on a FIFO; a lock file of another
    user's is ``UnusableLockError``: the caller writes somewhere else.
    """
    try:
        fd, created = _open_or_create(lock_path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnusableLockError(
                f"{lock_path}: a symlink is in the lock file's place", filename=lock_path
            ) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnusableLockError(
                f"{lock_path}: not a regular file in the lock file's place", filename=lock_path
            )
        if st.st_uid != os.getuid():
            if created and _same_file(fd, lock_path):  # a mount that gives files its own owner
                os.unlink(lock_path)  # (uid=, as desktops mount USB disks): ours, and useless
            raise UnusableLockError(
                f"{lock_path}: the lock file is owned by uid {st.st_uid}", filename=lock_path
            )
        if st.st_mode & 0o077:  # made by an older sa3loader, open to all
            os.fchmod(fd, LOCK_FILE_MODE)
    except BaseException:
        _registry.close(fd)
        raise
    return fd


def _open_or_create(lock_path: str) -> tuple[int, bool]:
    """The lock file's descriptor, and whether this call created the file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    while True:
        try:
            return _registry.opened(lock_path, flags), False
        except FileNotFoundError:
            pass
        try:
            return _registry.opened(lock_path, flags | os.O_CREAT | os.O_EXCL), True
        except FileExistsError:
            continue  # another process created it meanwhile: open theirs


def _same_file(fd: int, path: str) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)


class ConversionLock:
    """The exclusive lock for converting ``sibling_path``; owns its descriptor.

    ``with ConversionLock(path, timeout) as locked:``: ``locked`` is False where the
    filesystem supports no locking, where converting is still safe (temp file +
    rename), only possibly duplicated, so that degrades to a warning.
    ``LockTimeoutError`` after ``timeout`` seconds ($SA3LOADER_LOCK_TIMEOUT when None).
    """

    def __init__(self, sibling_path: str, timeout: float | None = None) -> None:
        self.sibling_path = sibling_path
        self.path = sibling_path + LOCK_SUFFIX
        self.timeout = _config.lock_timeout() if timeout is None else timeout
        self._fd: int | None = None
        self._held = contextlib.ExitStack()

    def __enter__(self) -> bool:
        try:
            return self._acquire()
        except BaseException:
            self._held.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self._held.close()

    def _acquire(self) -> bool:
        deadline = time.monotonic() + self.timeout
        # flock may not reach other hosts on a network filesystem: a lease file does.
        across_hosts = network_filesystem(self.sibling_path) is not None
        next_log = time.monotonic() + LOCK_LOG_EVERY_S
        while (locked := self._try(deadline, across_hosts)) is None:
            now = time.monotonic()
            if now >= deadline:
                raise LockTimeoutError(
                    f"waited {self.timeout:.0f}s for {self.path}; another process is still converting. "
                    f"Raise ${LOCK_TIMEOUT_ENV} or remove the stuck process.",
                    filename=self.path,
                )
            if now >= next_log:
                logger.info("waiting for %s (another process is converting)", self.path)
                next_log = now + LOCK_LOG_EVERY_S
            time.sleep(LOCK_POLL_S)
        return locked

    def _try(self, deadline: float, across_hosts: bool) -> bool | None:
        """One attempt: True (held), False (no locking here), None (busy, or the file was replaced)."""
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _registry.close(fd)
            return None
        except OSError as exc:
            _registry.close(fd)
            if exc.errno not in UNSUPPORTED_LOCK_ERRNOS:
                raise
            if across_hosts:
                self._held.enter_context(host_lease(self.sibling_path, deadline))
                return True
            warn_once(
                "flock:" + os.path.dirname(self.path),
                "file locking is not supported for %s (%s); converting without a lock",
                self.path,
                exc.strerror,
            )
            return False
        if not _same_file(fd, self.path):  # a cache command deleted it: lock the file at the path
            _registry.close(fd)
            return None
        self._fd = fd
        self._held.callback(self._release)
        if across_hosts:
            self._held.enter_context(host_lease(self.sibling_path, deadline))
        _faults.point("locked")
        return True

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with _registry.guard:
            if _registry.open.get(fd) is None or _identity(fd) != _registry.open[fd]:
                return  # closed in a forked child: the lock is the parent's, not ours to unlock
        fcntl.flock(fd, fcntl.LOCK_UN)
        _registry.close(fd)


def conversion_lock(sibling_path: str, timeout: float | None = None) -> ConversionLock:
    """``with conversion_lock(path) as locked:`` (see ``ConversionLock``)."""
    return ConversionLock(sibling_path, timeout)


LEASE_SUFFIX = ".lease"
LEASE_REFRESH_S = 10.0
# A lease not refreshed for this long belongs to a dead holder (or a host that
# lost the volume); generous, so that clock skew between hosts does not matter.
LEASE_STALE_S = 60.0
EMPTY_LEASE_S = 5.0
LEASE_TOKEN_MAX = 4096  # a token is about 150 bytes: a lease file is never read further


def _this_host() -> str:
    """Who may judge a lease's pid: this host's name and boot, and this pid namespace
    (containers on one host share the boot, not the pids)."""
    try:
        pids = os.readlink("/proc/self/ns/pid")
    except OSError:
        pids = "?"
    return f"{socket.gethostname()}|{boot_id() or '?'}|{pids}"


def _lease_token() -> str:
    return f"{_this_host()}:{os.getpid()}:{uuid.uuid4().hex}"


def _held_token(lease: str) -> bytes | None:
    """The token in the lease file; None where it cannot be read."""
    try:
        return _token_in(lease)
    except OSError:
        return None


def _left_by(token: bytes | None) -> bool:
    """The lease holding ``token`` was taken on this host, in this pid namespace, by a process
    that no longer exists, or by this one and no conversion here holds it (one Ctrl-C stopped):
    it is taken over at once, not after ``LEASE_STALE_S`` of silence."""
    try:
        host, pid, _ = (token or b"").decode("utf-8", "replace").rsplit(":", 2)
        holder = int(pid)
    except ValueError:
        return False
    if host != _this_host() or holder <= 0:
        return False
    if holder == os.getpid():  # this process's: the registry knows what it holds
        return token not in _registry.live_tokens
    if "?" in host.split("|")[1:]:  # no boot or pid namespace to tell this host's pids by
        return False
    return process_gone(holder)


def _token_in(lease: str) -> bytes:
    """What the lease file holds (at most ``LEASE_TOKEN_MAX`` bytes); nothing where it is not a
    regular file: a link is not followed, a FIFO swapped in since it was looked at not waited on."""
    with open(os.open(lease, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as f:
        return f.read(LEASE_TOKEN_MAX) if stat.S_ISREG(os.fstat(f.fileno()).st_mode) else b""


def _take_over(lease: str) -> None:
    """Remove a stale lease: renamed aside first, so only one of several takers removes it."""
    aside = f"{lease}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(lease, aside)
    except FileNotFoundError:
        return
    with contextlib.suppress(OSError):
        os.unlink(aside)


class _Silence:
    """How long a lease has gone unrefreshed as this process saw it, by its own clock: a lease
    stamped in the future (another host's clock ahead, a planted file) is stale once it stops
    changing, not only once this host's clock passes its mtime."""

    def __init__(self) -> None:
        self.seen: tuple[int, int, int] | None = None
        self.since = 0.0

    def for_how_long(self, st: os.stat_result) -> float:
        now, stamp = time.monotonic(), (st.st_dev, st.st_ino, st.st_mtime_ns)
        if stamp != self.seen:  # refreshed, or another lease: silent from now
            self.seen, self.since = stamp, now
        return now - self.since


@contextlib.contextmanager
def host_lease(sibling_path: str, deadline: float) -> Iterator[None]:
    """One converter across hosts on a network filesystem, where flock may not reach them.

    The holder creates ``<sibling>.lease`` with O_EXCL and refreshes its mtime every
    ``LEASE_REFRESH_S``; a lease left unrefreshed for ``LEASE_STALE_S``, or whose holder
    was a process on this host that is gone, is taken over. Two converters at once
    would still publish a correct file (temp file + rename): the lease saves the
    duplicated work.
    """
    lease = sibling_path + LEASE_SUFFIX
    token = _lease_token().encode()
    stale_s = _faults.tuned("lease_stale_s", LEASE_STALE_S)
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LEASE_REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(lease)

    refresher = threading.Thread(target=refresh, name="sa3loader-lease", daemon=True)
    _registry.live_tokens.add(token)
    try:  # from before the lease is made: a Ctrl-C anywhere after leaves none behind
        _take_lease(lease, token, deadline, stale_s)
        unrefreshed = f"{lease} is not refreshed: another host may take it over after {stale_s:.0f}s"
        started(refresher, without=unrefreshed)
        yield
    finally:
        stop.set()
        _registry.live_tokens.discard(token)  # first: a lease a second Ctrl-C leaves is a leftover
        # Given back before the join: a Ctrl-C during the join leaves no lease behind.
        with contextlib.suppress(OSError):
            if _token_in(lease) == token:  # still ours, not taken over meanwhile
                os.unlink(lease)
        with contextlib.suppress(RuntimeError):  # never started (a Ctrl-C inside start: it sees the stop)
            refresher.join()


def _take_lease(lease: str, token: bytes, deadline: float, stale_s: float) -> None:
    """Create ``lease`` holding ``token``, waiting for its holder (or taking a stale one over)
    until ``deadline``."""
    silence = _Silence()
    while True:
        try:
            fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            try:
                st = os.lstat(lease)
            except FileNotFoundError:  # given back meanwhile
                continue
            if not stat.S_ISREG(st.st_mode):  # never waited on (a FIFO), followed or removed: not ours
                raise UnusableLockError(
                    f"{lease} is not a regular file (a link, a FIFO): sa3loader cannot take its lease. "
                    "Remove it if no one uses it.",
                    filename=lease,
                ) from None
            silent = silence.for_how_long(st)
            age = max(time.time() - st.st_mtime, silent)
            # A holder writes its token the moment it creates the lease: one empty and unchanged
            # for EMPTY_LEASE_S is a creation Ctrl-C cut short (before its token was written).
            empty_left = st.st_size == 0 and silent > _faults.tuned("empty_lease_s", EMPTY_LEASE_S)
            if age > stale_s or empty_left or _left_by(_held_token(lease)):
                logger.info("taking over %s (its holder is gone, or silent for %.0fs)", lease, age)
                _take_over(lease)
                continue
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"waited for {lease}; a process on another host is converting. "
                    f"Raise ${LOCK_TIMEOUT_ENV}, or delete the file if no one is.",
                    filename=lease,
                ) from None
            time.sleep(LOCK_POLL_S)
            continue
        try:
            os.write(fd, token)
        except BaseException:  # a lease holding no token is no one's to take over for a minute
            os.unlink(lease)
            raise
        finally:
            os.close(fd)
        return

"""Where files go and who may write them: sibling paths, cache dir, locks.

A cache dir is trusted only when no one else can plant files in it (see
``cache_dir_trust``): siblings and index rows found there decide which weights
a load returns. Dirs sa3loader creates are private (0700).

The conversion lock is ``fcntl.flock`` on ``<sibling>.lock``: the kernel
releases it when the holder dies, so a crash never leaves a stale lock, and
it is keyed by the sibling's path, so callers with different cache dirs that
target one sibling still convert once. Cache commands delete lock files only
while holding them; whoever takes a lock then checks that its descriptor is
still the file at the path, and starts over if not.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import grp
import logging
import os
import pwd
import socket
import stat
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

from . import _config
from ._config import LOCK_TIMEOUT_ENV, warn_once
from .errors import LockTimeoutError, UnusableLockError

logger = logging.getLogger(__name__)

# A file being written: <final name><INCOMPLETE_INFIX><pid>-<random>, renamed into place when done.
INCOMPLETE_INFIX = ".incomplete-"
PRIVATE_DIR_MODE = 0o700
CACHE_APP_NAME = "sa3loader"
LOCK_SUFFIX = ".lock"
LOCK_POLL_S = 0.05
LOCK_LOG_EVERY_S = 5.0
# Filesystems (some NFS, FUSE) that do not support flock answer with these.
UNSUPPORTED_LOCK_ERRNOS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``cache_dir``, else $SA3LOADER_CACHE_DIR, else $XDG_CACHE_HOME/sa3loader, else ~/.cache/sa3loader.

    Falls back to a per-user temp dir (with a warning) when there is no usable home;
    when someone else controls that fixed name, to a fresh private one instead.
    """
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    from_env = _config.env_path(_config.CACHE_DIR_ENV)
    if from_env is not None:
        return from_env
    xdg = _config.env_path(_config.XDG_CACHE_HOME_ENV)
    if xdg is not None:
        return os.path.join(xdg, CACHE_APP_NAME)
    home = os.path.expanduser("~")
    candidate = os.path.join(home, ".cache", CACHE_APP_NAME)
    if home != "~" and _can_create(candidate):
        return candidate
    fallback = os.path.join(tempfile.gettempdir(), f"{CACHE_APP_NAME}-{os.getuid()}")
    unusable = cache_dir_trust(fallback) if _can_create(fallback) else "it cannot be created or written"
    if unusable is None:
        warn_once("no-home", "no usable home directory for the sa3loader cache; using %s", fallback)
        return fallback
    fresh = tempfile.mkdtemp(prefix=f"{CACHE_APP_NAME}-{os.getuid()}-")
    warn_once(
        "no-home",
        "no usable home directory for the sa3loader cache, and %s is not usable (%s); using %s",
        fallback,
        unusable,
        fresh,
    )
    return fresh


def _can_create(path: str) -> bool:
    try:
        make_private_dirs(path)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


CACHEDIR_TAG = "CACHEDIR.TAG"
CACHEDIR_TAG_TEXT = (
    "Signature: 8a477f597d28d172789f06886806bc55\n"
    "# This file is a cache directory tag created by sa3loader.\n"
    "# For information about cache directory tags see https://bford.info/cachedir/\n"
)


def create_cache_dir(path: str) -> None:
    """Make a cache dir's ``path`` (private, as every dir sa3loader creates) and tag the cache dir."""
    make_private_dirs(path)
    tag_cache_dir(os.path.dirname(path))


SHARED_DIR_BITS = 0o555  # r-x for all: anyone may list and traverse, no one else may write
SHARED_FILE_BITS = 0o444


def open_cache_dir_to_all(cache_dir: str) -> list[str]:
    """Let every user read a cache dir you built (an image built as root, served as another user).

    Dirs get r-x for all and the index's files r-- for all; write bits are not
    touched, so the dir stays trusted (no one else can plant files in it).
    Siblings keep their own mode, the source's read bits: never wider than the
    checkpoint. Returns the paths changed.
    """
    changed = []
    for directory, _, files in os.walk(cache_dir):
        targets = [(directory, SHARED_DIR_BITS)]
        targets += [
            (os.path.join(directory, name), SHARED_FILE_BITS)
            for name in files
            if not name.endswith((".safetensors", LOCK_SUFFIX)) and INCOMPLETE_INFIX not in name
        ]
        for path, bits in targets:
            st = os.lstat(path)
            if st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and st.st_mode & bits != bits:
                os.chmod(path, stat.S_IMODE(st.st_mode) | bits)
                changed.append(path)
    return changed


def tag_cache_dir(cache_dir: str) -> None:
    """Write a CACHEDIR.TAG, so backup tools skip gigabytes of siblings; best effort."""
    path = os.path.join(cache_dir, CACHEDIR_TAG)
    if os.path.exists(path):
        return
    try:
        with open(path, "x", encoding="ascii") as f:
            f.write(CACHEDIR_TAG_TEXT)
    except OSError:
        pass  # a read-only or racing cache dir: the tag is a courtesy


def make_private_dirs(path: str) -> None:
    """``os.makedirs`` with mode 0700 for every dir it creates, as ``tempfile.mkdtemp`` does."""
    if os.path.isdir(path):
        return
    parent = os.path.dirname(path)
    if parent and parent != path:
        make_private_dirs(parent)
    try:
        os.mkdir(path, PRIVATE_DIR_MODE)
    except FileExistsError:
        if not os.path.isdir(path):
            raise


def _private_group(gid: int) -> bool:
    """The user's own group: named after the user, with no other member."""
    try:
        user = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except KeyError:
        return False
    return gid == os.getgid() and group.gr_name == user and set(group.gr_mem) <= {user}


def _lstat(path: str) -> tuple[os.stat_result | None, str | None]:
    """``path``'s own stat (a symlink is not followed), or None and why there is nothing to
    judge: absent (None: nothing is there), unreadable, or a symlink."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        return None, f"cannot inspect it ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return None, "it is a symlink"
    return st, None


def cache_dir_trust(path: str, *, shared: bool | None = None) -> str | None:
    """None when ``path`` is a dir only you (or root) can plant files in, else why not.

    Trusted: not a symlink (``lstat``), owned by you or root, not world-writable,
    group-writable only for your own private group. ``$SA3LOADER_SHARED_CACHE=1``
    trusts a shared team cache on purpose. A missing dir is trusted: it will be
    created private.
    """
    if _config.shared_cache() if shared is None else shared:
        return None
    st, problem = _lstat(path)
    if st is None:
        return problem
    if not stat.S_ISDIR(st.st_mode):
        return None  # nothing can be planted in it; creating the dirs inside fails and says so
    if st.st_uid not in (os.getuid(), 0):
        return f"it is owned by uid {st.st_uid}"
    if st.st_mode & stat.S_IWOTH:
        return "it is world-writable"
    if st.st_mode & stat.S_IWGRP and not _private_group(st.st_gid):
        return "it is group-writable"
    return None


MOUNTINFO = "/proc/self/mountinfo"
# Filesystems reached over a network (or through FUSE, often a network client):
# mappings there are many times slower and die with SIGBUS on a server hiccup.
NETWORK_FILESYSTEMS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "lustre",
        "ceph",
        "9p",
        "afs",
        "glusterfs",
        "gpfs",
        "beegfs",
        "ocfs2",
        "gfs2",
        "davfs",
        "fuseblk",
        "virtiofs",
    }
)


def _unescape_mount(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def network_filesystem(path: str) -> str | None:
    """The type of the network or FUSE filesystem holding ``path``, or None (local, or unknown).

    Reads ``/proc/self/mountinfo`` (Linux); the longest mount point containing the real path wins.
    """
    try:
        with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields = before.split()
        if not sep or len(fields) < 5 or not after.split():
            continue
        mount = _unescape_mount(fields[4])
        inside = real == mount or real.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, best_type = mount, after.split()[0]
    if best_type is not None and (best_type in NETWORK_FILESYSTEMS or best_type.startswith("fuse")):
        return best_type
    return None


def writable_by_others(directory: str, owner: int | None = None) -> bool:
    """Whether someone other than ``owner`` (default: you) and root can create files in ``directory``.

    An unreadable or missing dir counts as writable by others: nothing in it is vouched for.
    """
    owner = os.getuid() if owner is None else owner
    try:
        st = os.stat(directory)
    except OSError:
        return True
    if st.st_uid not in (owner, 0) or st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and not (owner == os.getuid() and _private_group(st.st_gid))


def owned_file_problem(path: str) -> str | None:
    """None when ``path`` is absent or a regular file of yours (not a symlink), else what it is.

    For names sa3loader writes itself (siblings, locks): another user's file, a
    symlink or a FIFO at one of them is never written through or waited on.
    """
    st, problem = _lstat(path)
    if st is None:
        return problem
    if not stat.S_ISREG(st.st_mode):
        return "it is not a regular file"
    if st.st_uid != os.getuid():
        return f"it is owned by uid {st.st_uid}"
    return None


def _same_file(fd: int, path: str) -> bool:
    try:
        st, now = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (st.st_ino, st.st_dev) == (now.st_ino, now.st_dev)


LEASE_SUFFIX = ".lease"
LEASE_REFRESH_S = 10.0
# A lease not refreshed for this long belongs to a dead holder (or a host that
# lost the volume); generous, so that clock skew between hosts does not matter.
LEASE_STALE_S = 60.0


def _take_over(lease: str) -> None:
    """Remove a stale lease: renamed aside first, so only one of several takers removes it."""
    aside = f"{lease}.stale-{uuid.uuid4().hex[:8]}"
    try:
        os.rename(lease, aside)
    except FileNotFoundError:
        return
    with contextlib.suppress(OSError):
        os.unlink(aside)


@contextlib.contextmanager
def host_lease(sibling_path: str, deadline: float) -> Iterator[None]:
    """One converter across hosts on a network filesystem, where flock may not reach them.

    The holder creates ``<sibling>.lease`` with O_EXCL and refreshes its mtime every
    ``LEASE_REFRESH_S``; a lease left unrefreshed for ``LEASE_STALE_S`` is taken over.
    Two converters at once would still publish a correct file (temp file + rename):
    the lease saves the duplicated work.
    """
    lease = sibling_path + LEASE_SUFFIX
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}".encode()
    while True:
        try:
            fd = os.open(lease, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            try:
                age = time.time() - os.stat(lease).st_mtime
            except FileNotFoundError:
                continue
            if age > LEASE_STALE_S:
                logger.info("taking over %s, not refreshed for %.0fs", lease, age)
                _take_over(lease)
                continue
            if time.monotonic() >= deadline:
                raise LockTimeoutError(
                    f"waited for {lease}; a process on another host is converting. "
                    f"Raise ${LOCK_TIMEOUT_ENV}, or delete the file if no one is."
                ) from None
            time.sleep(LOCK_POLL_S)
            continue
        try:
            os.write(fd, token)
        finally:
            os.close(fd)
        break
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(LEASE_REFRESH_S):
            with contextlib.suppress(OSError):
                os.utime(lease)

    refresher = threading.Thread(target=refresh, name="sa3loader-lease", daemon=True)
    refresher.start()
    try:
        yield
    finally:
        stop.set()
        refresher.join()
        with contextlib.suppress(OSError), open(lease, "rb") as f:
            if f.read() == token:  # still ours, not taken over meanwhile
                os.unlink(lease)


LOCK_FILE_MODE = 0o600


def _open_lock_file(lock_path: str) -> int:
    """Open (creating) a lock file that only you can open: ``flock`` needs no more than read
    access, so a lock file others can read is a lock others can hold against you.

    Never through a symlink, never blocking on a FIFO; a lock file of another
    user's is ``UnusableLockError``: the caller writes somewhere else.
    """
    flags = os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(lock_path, flags, LOCK_FILE_MODE)
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
            raise UnusableLockError(
                f"{lock_path}: the lock file is owned by uid {st.st_uid}", filename=lock_path
            )
        if st.st_mode & 0o077:  # made by an older sa3loader, open to all
            os.fchmod(fd, LOCK_FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


# The descriptor of each conversion lock this process holds, by lock path: a publication
# that outlives the load closes its copy in a forked child (``_publication``).
held_lock_descriptors: dict[str, int] = {}


@contextlib.contextmanager
def conversion_lock(sibling_path: str, timeout: float | None = None) -> Iterator[bool]:
    """Hold the exclusive lock for ``sibling_path``; yields False when locking is unsupported.

    Without a lock, conversion is still safe (temp file + rename), only possibly
    duplicated, so an unsupported filesystem degrades to a warning, not a failure.
    ``cache prune`` and ``clear`` delete lock files while holding them, so a lock
    taken on a file that is no longer at the path is dropped and taken again.
    """
    timeout = _config.lock_timeout() if timeout is None else timeout
    lock_path = sibling_path + LOCK_SUFFIX
    deadline = time.monotonic() + timeout
    # flock may not reach other hosts on a network filesystem: a lease file does.
    across_hosts = host_lease if network_filesystem(sibling_path) is not None else None
    next_log = time.monotonic() + LOCK_LOG_EVERY_S
    while True:
        fd = _open_lock_file(lock_path)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
            except BlockingIOError:
                locked = False
            except OSError as exc:
                if exc.errno not in UNSUPPORTED_LOCK_ERRNOS:
                    raise
                if across_hosts is not None:
                    with across_hosts(sibling_path, deadline):
                        yield True
                    return
                warn_once(
                    "flock:" + os.path.dirname(lock_path),
                    "file locking is not supported for %s (%s); converting without a lock",
                    lock_path,
                    exc.strerror,
                )
                yield False
                return
            if locked and _same_file(fd, lock_path):
                held_lock_descriptors[lock_path] = fd
                try:
                    with across_hosts(sibling_path, deadline) if across_hosts else contextlib.nullcontext():
                        yield True
                finally:
                    held_lock_descriptors.pop(lock_path, None)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return
        finally:
            os.close(fd)
        now = time.monotonic()
        if now >= deadline:
            raise LockTimeoutError(
                f"waited {timeout:.0f}s for {lock_path}; another process is still converting. "
                f"Raise ${LOCK_TIMEOUT_ENV} or remove the stuck process."
            )
        if now >= next_log:
            logger.info("waiting for %s (another process is converting)", lock_path)
            next_log = now + LOCK_LOG_EVERY_S
        if not locked:
            time.sleep(LOCK_POLL_S)


def remove_stray_incomplete(sibling_path: str) -> list[str]:
    """Delete leftovers of crashed writers. Call only while holding the lock."""
    removed = []
    for path in glob.glob(glob.escape(sibling_path) + INCOMPLETE_INFIX + "*"):
        if owned_file_problem(path) is not None:
            continue  # another user's: not ours to judge
        try:
            os.unlink(path)
            removed.append(path)
        except OSError:
            pass
    if removed:
        logger.info("removed %d incomplete file(s) left by a crashed conversion", len(removed))
    return removed

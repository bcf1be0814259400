"""The cache dir and who may write files: where the cache is, whether a dir or file is trusted.

A cache dir is trusted only when no one else can plant files in it (see
``cache_dir_trust``): siblings and index rows found there decide which weights
a load returns. Dirs sa3loader creates are private (0700).
"""

from __future__ import annotations

import glob
import grp
import logging
import os
import pwd
import stat
import tempfile

from . import _config
from ._config import warn_once

logger = logging.getLogger(__name__)

# A file being written: <final name><INCOMPLETE_INFIX><pid>-<random>, renamed into place when done.
INCOMPLETE_INFIX = ".incomplete-"
LOCK_SUFFIX = ".lock"
BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This boot of this machine (Linux), or None where it cannot be told: what a page cache
    holds is this boot's, and was lost by a restart."""
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            return f.read().strip().replace("-", "") or None
    except OSError:
        return None


PRIVATE_DIR_MODE = 0o700
CACHE_APP_NAME = "sa3loader"


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


def stray_incomplete(sibling_path: str) -> list[str]:
    """Temp files of earlier writers of ``sibling_path`` that are yours (another user's are not
    ours to judge). Call only while holding the lock: then no one is writing them."""
    return [
        path
        for path in sorted(glob.glob(glob.escape(sibling_path) + INCOMPLETE_INFIX + "*"))
        if owned_file_problem(path) is None
    ]

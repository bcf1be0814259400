"""Every "may I use or write this" rule, in one place.

Siblings, lock files and index rows found on disk decide which weights a load returns, so
what someone else could have put there is never trusted: a cache dir others can write to, a
sibling owned by another user in a dir others can write to, another user's file, a symlink
or a FIFO at a name sa3loader writes. Within one user, everything is trusted.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat

from . import _faults


def dir_writable(path: str) -> bool:
    """Whether you may create files in the dir at ``path`` (write into it and enter it)."""
    return _faults.fact("dir_writable", path, os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK))


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
    except ValueError:  # a NUL in a path a row names: no file can have that name
        return None, "it is not a possible file name"
    if stat.S_ISLNK(st.st_mode):
        return None, SYMLINK
    return st, None


SYMLINK = "it is a symlink"  # told by identity (``refused_cache_dir_hint``)


def refused_cache_dir_hint(problem: str, shared_env: str) -> str:
    """What to do about a cache dir ``cache_dir_trust`` refused: a symlink's target is named
    instead (one planted in a shared dir could lead anywhere); a dir shared on purpose is said so."""
    if problem is SYMLINK:
        return "name the directory it points to instead"
    return f"set ${shared_env}=1 for a shared team cache"


def cache_dir_trust(path: str, *, shared: bool) -> str | None:
    """None when ``path`` is a dir only you (or root) can plant files in, else why not.

    Trusted: not a symlink (``lstat``), owned by you or root, not world-writable,
    group-writable only for your own private group. ``$SA3LOADER_SHARED_CACHE=1``
    trusts a shared team cache on purpose. A missing dir is trusted: it will be
    created private.
    """
    if shared:
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


def owner_problem(path: str, st: os.stat_result, source_owner: int, *, shared: bool) -> str | None:
    """None when the owner of the sibling at ``path`` may choose this load's weights, else why not:
    you or root; anyone, in a team cache shared on purpose (``shared``); the source's owner in a
    directory no one else can write to (they control the source anyway)."""
    if st.st_uid in (os.getuid(), 0) or shared:
        return None
    if st.st_uid == source_owner and not writable_by_others(os.path.dirname(path), source_owner):
        return None
    return f"it is owned by uid {st.st_uid}, in a directory others can write to"


def beside_dir_problem(hidden: str) -> str | None:
    """None when a sibling may be written in the hidden folder beside a checkpoint
    (``<folder>/.cache/sa3loader``), else why not: no symlink at either name (it would send
    the sibling elsewhere), the hidden folder (if there) yours and writable by no one else,
    the first of them that exists writable by you and yours, and the checkpoint's folder yours
    (what you make in another user's folder, root above all, they could not remove)."""
    problem = _folder_problem(os.path.dirname(hidden), private=False) or _folder_problem(hidden, private=True)
    if problem is not None:
        return problem
    dot_cache = os.path.dirname(hidden)
    existing = next((d for d in (hidden, dot_cache) if os.path.isdir(d)), os.path.dirname(dot_cache))
    if not dir_writable(existing):
        return f"{existing} is not writable"
    folder = os.path.dirname(dot_cache)  # (a hidden folder root made there before: no more of root's)
    for mine in (existing, folder):
        if os.stat(mine).st_uid != os.geteuid():
            return f"{mine} is another user's"
    return None


def cache_place_problem(path: str, cache_dir: str) -> str | None:
    """None when a sibling may be written at ``path`` in the cache dir (``<cache>/siblings/<key>/``),
    else why not: the cache dir there (one removed meanwhile is not made again here), and each of
    ``siblings`` and its key folder, where there, a folder of yours no one else may write (a link,
    or another user's folder, in a cache shared on purpose, would send the sibling elsewhere)."""
    if not os.path.isdir(cache_dir):
        return f"{cache_dir} is not a folder" if os.path.lexists(cache_dir) else f"{cache_dir} is not there"
    key_folder = os.path.dirname(path)
    return _folder_problem(os.path.dirname(key_folder), private=True) or _folder_problem(
        key_folder, private=True
    )


def _folder_problem(directory: str, *, private: bool) -> str | None:
    """Why a sibling may not go under ``directory``: a symlink there (it would send the sibling
    elsewhere), or one that cannot be inspected; with ``private``, a folder there that is another
    user's or open to others' writes (they could take away or swap what goes in). Absent: none."""
    st, problem = _lstat(directory)
    if problem is not None:
        return f"{directory}: {problem}"
    if private and st is not None and (st.st_uid != os.geteuid() or st.st_mode & 0o022):
        return f"{directory} is another user's, or others may write to it"
    return None


def readers_bits(path: str, st: os.stat_result, place: str) -> int:
    """``st``'s permission bits (the file at ``path``) less the read access its folders keep
    from a copy at ``place``: for each folder above the real file but not above ``place``
    (one above both keeps as much from the copy), the others' bits unless it lets others and
    its own group through (a member of its group is judged by the group's bits), the group's
    unless it lets the file's group through (its own group's x bit; for another group, both).
    An ACL on the file or such a folder keeps both out (its bits do not say who reads). A copy
    with these bits is readable by no one who cannot read ``path``."""
    mode = stat.S_IMODE(st.st_mode)
    real = os.path.realpath(path)
    try:  # a link in ``path`` swapped since ``st`` was taken: these folders are another file's
        now = os.stat(real)
    except OSError:
        return mode & ~0o077
    if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
        return mode & ~0o077  # cannot tell: the owner's alone
    shared = _folders_guarding(place)
    others = group = not _has_acl(real)
    for folder in _folders_above(real):
        if folder in shared:
            continue
        try:
            above = os.stat(folder)
        except OSError:  # cannot tell: the owner's alone
            return mode & ~0o077
        bits, gid, acl = above.st_mode, above.st_gid, _has_acl(folder)
        others = others and bool(bits & 0o001 and bits & 0o010) and not acl
        group = group and bool(bits & 0o010 and (gid == st.st_gid or bits & 0o001)) and not acl
    return mode & ~(0 if others else 0o007) & ~(0 if group else 0o070)


def _folders_guarding(place: str) -> set[str]:
    """The folders above ``place`` that every path to it passes: up to the first mount point (a
    filesystem, or a folder bound there, is reached by its own paths too: a private folder above
    a mount of a public one keeps no one from a copy in it)."""
    guarding = set()
    for folder in _folders_above(os.path.realpath(place)):
        guarding.add(folder)
        if _mount_point(folder):
            break
    return guarding


def _mount_point(folder: str) -> bool:
    """Whether ``folder`` is where something is mounted: another device than its parent's, or
    (a bind mount on the same filesystem) another inode than its parent's entry names; where
    that cannot be read, taken for one (its folders then keep no one out)."""
    parent, name = os.path.split(folder)
    if not name:
        return True  # the root
    try:
        st, up = os.stat(folder), os.stat(parent)
        if st.st_dev != up.st_dev:
            return True
        with os.scandir(parent) as entries:  # readdir names the covered folder's inode, not the mount's
            return next((e.inode() != st.st_ino for e in entries if e.name == name), True)
    except OSError:
        return True


def without_group(bits: int) -> int:
    """``bits`` for a copy that cannot have its source's group: none for the group, and no more
    for others than the group had (the group's members are others to the copy)."""
    return bits & ~0o070 & ~(0o007 & ~(bits >> 3))


def _folders_above(path: str) -> list[str]:
    folders, folder = [], os.path.dirname(path)
    while folder not in folders:
        folders.append(folder)
        folder = os.path.dirname(folder)
    return folders


ACL_XATTR = "system.posix_acl_access"


def _has_acl(path: str) -> bool:
    """Whether ``path`` carries a POSIX ACL (where the system can say)."""
    return acl_of(path) is not None


def acl_of(path: str | int) -> bytes | None:
    """The POSIX ACL of ``path`` (a descriptor too), as the xattr holds it; None: none, or no
    way to tell (no xattrs on the filesystem; macOS has no getxattr in os)."""
    try:
        return (
            os.getxattr(path, ACL_XATTR, follow_symlinks=False)
            if isinstance(path, str)
            else os.getxattr(path, ACL_XATTR)
        )
    except (OSError, AttributeError):
        return None


# What a file sa3loader writes is created with: no one else can open it until ``share_new_file``
# has set who may (an ACL inherited, a group not the source's, are only taken away after).
NEW_FILE_MODE = 0o600


def share_new_file(fd: int, source: os.stat_result, mode: int) -> None:
    """A file just created ``NEW_FILE_MODE`` gets its readers: an ACL from its folder's default
    ACL dropped (it may let read whom the source does not), the source's group (or, where it
    cannot have it, no group access: a copy readable by one group is never readable by
    another), then ``mode`` less the umask, as a file created with it would have. (The ACL
    gives no one anything meanwhile: its mask is the group bits of ``NEW_FILE_MODE``, none.)"""
    if acl_of(fd) is not None:
        os.removexattr(fd, ACL_XATTR)
    mode &= ~process_umask()
    if os.fstat(fd).st_gid != source.st_gid:
        try:
            os.fchown(fd, -1, source.st_gid)
        except PermissionError:
            mode = without_group(mode)
    os.fchmod(fd, mode)


def process_umask() -> int:
    """This process's umask, read (Linux: /proc) where it can be, else set and put back: for that
    moment a narrower one, never a wider one, for files other threads create."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask

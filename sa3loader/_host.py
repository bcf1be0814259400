"""Facts of this host: what its mount table says about the filesystem that holds a path, and
which boot this is (what a page cache holds is this boot's).

Three decisions rest on it:

- a file on a network (or FUSE) filesystem is read, not mapped (mappings there are
  slow and die with SIGBUS on a server hiccup), and its conversion lock adds a lease
  file, as flock may not reach other hosts;
- a file's stat vouches for its content (no fingerprint read) only on a filesystem
  that keeps a real change time and whose device number names one filesystem for
  good (``stat_vouches``);
- and only when no page of it was waiting to be written as its stat was taken
  (``unwritten_pages``): a write through a shared mapping into a page that is already
  dirty moves no timestamp.

Linux reads ``/proc/self/mountinfo`` (a test may point it elsewhere); where no mount table
can be read, nothing is known, and the stat never vouches alone.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from dataclasses import dataclass

from . import _faults

MOUNT_TABLE = "/proc/self/mountinfo"

# Filesystems reached over a network (or through FUSE, often a network client).
NETWORK_FILESYSTEMS = frozenset(
    (
        "nfs nfs4 cifs smb3 smbfs lustre ceph 9p afs glusterfs gpfs beegfs ocfs2 gfs2 davfs fuseblk virtiofs"
    ).split()
)
# Where a file's stat cannot tell a rewrite in place, or a different file, from the one recorded:
# - no real change time (ctime is the mtime): FAT, exFAT, NTFS through FUSE (ntfs-3g is fuseblk),
#   and any FUSE filesystem, whose daemon says what it likes;
# - read-only images (squashfs, erofs, iso9660, ...): a new image mounted at the same path, on a
#   reused loop device, gives another file the same device, inode, size and times (reproducible
#   builds fix every mtime), so the fingerprint decides.
# - memory filesystems (tmpfs, ramfs, hugetlbfs): a write through a shared mapping stamps the
#   times at its page's first fault only, as the page is never written back (and cachestat
#   counts none of it dirty).
STAT_DOES_NOT_VOUCH = frozenset(
    "vfat msdos fat exfat ntfs fuseblk squashfs erofs iso9660 udf cramfs romfs tmpfs ramfs hugetlbfs".split()
)
# Block devices that are files or remote (loop, nbd): another image can come up on the same one.
# Told by the mount's source, or by the loop driver's device number (btrfs shows an anonymous one).
IMAGE_DEVICES = ("/dev/loop", "/dev/nbd")
LOOP_MAJOR = 7


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str
    device: str = "0:0"  # major:minor of the filesystem's device (btrfs: an anonymous one)
    read_only: bool = False  # the filesystem itself (an image), not one read-only bind mount of it
    source: str = ""  # what was mounted: /dev/loop3, server:/export, overlay
    lower: tuple[str, ...] = ()  # an overlay's lower dirs, whose files it shows as they are


def _unescape(field: str) -> str:
    return field.replace("\\040", " ").replace("\\011", "\t").replace("\\012", "\n").replace("\\134", "\\")


def _mounts() -> list[Mount] | None:
    try:
        with open(_faults.tuned("mount_table", MOUNT_TABLE), encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    mounts = []
    for line in lines:
        before, sep, after = line.partition(" - ")
        fields = before.split()
        tail = after.split()
        if sep and len(fields) >= 5 and tail:
            options = tail[2].split(",") if len(tail) >= 3 else []
            source = _unescape(tail[1]) if len(tail) >= 2 else ""
            point = _unescape(fields[4])
            mounts.append(Mount(point, tail[0], fields[2], "ro" in options, source, _lower_dirs(options)))
    return mounts


def _lower_dirs(options: list[str]) -> tuple[str, ...]:
    """An overlay's lower dirs, as its options list them: ``lowerdir=a:b`` (a colon in a path
    escaped), or one per ``lowerdir+=`` / ``datadir+=`` (the new mount API)."""
    dirs: list[str] = []
    for option in options:
        name, _, value = option.partition("=")
        if name == "lowerdir":
            dirs += [d.replace("\\:", ":") for d in re.split(r"(?<!\\):", value) if d]
        elif name in ("lowerdir+", "datadir+") and value:
            dirs.append(value)
    return tuple(_unescape(d) for d in dirs)


def mount_of(path: str, mounts: list[Mount] | None = None) -> Mount | None:
    """The mount holding ``path``'s real path (the last of the longest mount points: the one
    on top) in ``mounts`` (the mount table, read now if not given), or None where no mount
    table can be read."""
    mounts = _mounts() if mounts is None else mounts
    if mounts is None:
        return None
    real = os.path.realpath(path)
    best: Mount | None = None
    for mount in mounts:
        inside = real == mount.point or real.startswith(mount.point.rstrip("/") + "/")
        if inside and (best is None or len(mount.point) >= len(best.point)):
            best = mount
    return best


def network_filesystem(path: str) -> str | None:
    """The type of the network or FUSE filesystem holding ``path``, or None (local, or unknown)."""
    mount = mount_of(path)
    if mount is not None and (mount.fstype in NETWORK_FILESYSTEMS or mount.fstype.startswith("fuse")):
        return mount.fstype
    return None


# Where a read lease guards what a mapping maps: the file's own inode, one host, no layer
# under it (an overlay's lease is on its inode, the mapping on a layer's, and a write to the
# layer breaks nothing). Anything else, or no mount table: read.
LEASE_GUARDS_MAPPING = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "tmpfs"})


def lease_guards_mapping(path: str) -> bool:
    mount = mount_of(path)
    return mount is not None and mount.fstype in LEASE_GUARDS_MAPPING


def stat_vouches(path: str) -> str | None:
    """None when the stat of the file at ``path`` may stand for its content (same device,
    inode, size, mtime and ctime: the same bytes); else why it may not."""
    mounts = _mounts()
    mount = mount_of(path, mounts) if mounts is not None else None
    if mount is None:
        return "the filesystem's type is unknown (no mount table)"
    problem = _image_problem(mount)
    if problem is not None:
        return problem
    for lower in mount.lower:  # an overlay shows its lower files' inodes and times as they are
        if not os.path.isabs(lower):  # as typed at mount time: where it lies cannot be told
            return f"{mount.point} is an overlay on {lower}, a relative path"
        below = mount_of(lower, mounts)
        # One level down, never further (no loop through overlays). A lower dir outside this
        # mount namespace (a container's) resolves to a mount seen here: the overlay itself.
        problem = _image_problem(below) if below is not None and below.point != mount.point else None
        if problem is not None:
            return f"{mount.point} is an overlay on {lower}: {problem}"
    return None


def _image_problem(mount: Mount) -> str | None:
    """Why a file's stat on ``mount`` does not stand for its content, from the mount alone."""
    if mount.fstype in STAT_DOES_NOT_VOUCH or mount.fstype.startswith("fuse"):
        return f"on {mount.fstype}, a file's stat does not tell its content"
    # As the images above: another image, read-only or on a loop device, can come up on the
    # same device number with the same inodes and times.
    if mount.read_only:
        return f"{mount.point} is a read-only {mount.fstype} filesystem (an image)"
    if mount.device.split(":")[0] == str(LOOP_MAJOR) or mount.source.startswith(IMAGE_DEVICES):
        return f"{mount.point} is on {mount.source or 'a loop device'} (an image)"
    return None


BOOT_ID = "/proc/sys/kernel/random/boot_id"


def boot_id() -> str | None:
    """This boot of this machine (Linux), or None where it cannot be told: what a page cache
    holds is this boot's, and was lost by a restart."""
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            return f.read().strip().replace("-", "") or None
    except OSError:
        return None


# cachestat(2), Linux 6.5: one number on every architecture but alpha.
CACHESTAT_SYSCALL = 451


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64) for name in ("cache", "dirty", "writeback", "evicted", "recently_evicted")
    ]


def unwritten_pages(fd: int) -> int | None:
    """Pages of the file open at ``fd`` that the page cache holds dirty or being written back, or
    None where that cannot be told (not Linux, a kernel before 6.5).

    A page written through a shared mapping stamps the file's mtime and ctime when it is first
    made dirty; later writes into it stamp nothing until it has been written back. So a stat
    stands for the content from then on only if no page was dirty as it was taken."""
    real: int | None = None
    if sys.platform == "linux" and platform.machine() != "alpha":
        stat = _Cachestat()
        libc = ctypes.CDLL(None, use_errno=True)
        whole = _CachestatRange(0, 0)  # to the end of the file
        if libc.syscall(CACHESTAT_SYSCALL, fd, ctypes.byref(whole), ctypes.byref(stat), 0) == 0:
            real = stat.dirty + stat.writeback
    return _faults.fact("unwritten_pages", None, real)

"""Facts of this host: what its mount table says about the filesystem that holds a path, and
which boot this is (what a page cache holds is this boot's).

Two decisions rest on it:

- a file on a network (or FUSE) filesystem is read, not mapped (mappings there are
  slow and die with SIGBUS on a server hiccup), and its conversion lock adds a lease
  file, as flock may not reach other hosts;
- a file's stat vouches for its content (no fingerprint read) only on a filesystem
  that keeps a real change time and whose device number names one filesystem for
  good (``stat_vouches``).

Linux reads ``/proc/self/mountinfo`` (a test may point it elsewhere); where no mount table
can be read, nothing is known, and the stat never vouches alone.
"""

from __future__ import annotations

import os
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
STAT_DOES_NOT_VOUCH = frozenset(
    "vfat msdos fat exfat ntfs fuseblk squashfs erofs iso9660 udf cramfs romfs".split()
)


@dataclass(frozen=True)
class Mount:
    point: str
    fstype: str


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
        if sep and len(fields) >= 5 and after.split():
            mounts.append(Mount(_unescape(fields[4]), after.split()[0]))
    return mounts


def mount_of(path: str) -> Mount | None:
    """The mount holding ``path``'s real path (the last of the longest mount points: the one
    on top), or None where no mount table can be read."""
    mounts = _mounts()
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


def stat_vouches(path: str) -> str | None:
    """None when the stat of the file at ``path`` may stand for its content (same device,
    inode, size, mtime and ctime: the same bytes); else why it may not."""
    mount = mount_of(path)
    if mount is None:
        return "the filesystem's type is unknown (no mount table)"
    if mount.fstype in STAT_DOES_NOT_VOUCH or mount.fstype.startswith("fuse"):
        return f"on {mount.fstype}, a file's stat does not tell its content"
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

"""A file's stat vouches for its content only on a filesystem where it can.

Where the filesystem keeps no real change time (FAT, exFAT, NTFS and anything
through FUSE) a rewrite in place with the mtime restored leaves the stat as it
was; where it is a read-only image (squashfs, erofs, iso9660), a new image
mounted at the same path on a reused loop device gives another file the same
device, inode, size and times. There the fingerprint is read on every load. The
mount table says which: faked here for every type, and a real squashfs image on
a loop device where the suite runs as root with mksquashfs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_like_state, save, settled
from support.compare import assert_same_model
from support.faults import mounted
from support.loads import load_toy, make_ckpt
from support.toymodel import build, reference

import sa3loader
from sa3loader._host import stat_vouches

# A read-only ext4 image, and a writable one on a loop device: another image can come up on the
# same device with the same inodes and times.
# A memory filesystem: a write through a mapping stamps the times at a page's first fault only.
NO_VOUCH = [
    *["vfat", "exfat", "fuseblk", "fuse.sshfs", "squashfs", "erofs", "iso9660", "tmpfs"],
    *["ext4 ro", "ext4@7:3", "btrfs@/dev/loop3"],
]


@pytest.mark.parametrize("fstype", [*NO_VOUCH, "ext4", "xfs", "btrfs", "overlay", "nfs4"])
def test_the_fingerprint_is_read_on_every_load_where_the_stat_cannot_vouch(tmp_path, fstype):
    ckpt = make_ckpt(tmp_path / "models" / "model.safetensors")
    an_hour_ago = ckpt.stat().st_mtime_ns - 3600 * 10**9  # out of the racy window of a same-tick write
    os.utime(ckpt, ns=(an_hour_ago, an_hour_ago))
    settled(ckpt)
    with mounted(tmp_path / "mountinfo", {tmp_path / "models": fstype}):
        load_toy(ckpt, tmp_path / "cache")
        assert sa3loader.last_load_info().converted
        model = load_toy(ckpt, tmp_path / "cache")
        assert (stat_vouches(str(ckpt)) is None) == (fstype not in NO_VOUCH)
    info = sa3loader.last_load_info()
    assert info.cache_hit
    assert info.events == (["revalidated"] if fstype in NO_VOUCH else [])
    assert_same_model(model, reference(ckpt))


def test_where_the_stat_cannot_vouch_a_hit_does_not_rewrite_its_row(tmp_path):
    """The fingerprint is read on every load there, but a row that says the same is kept:
    a hit writes the index at most once an hour (its last use), not on every load."""
    from sa3loader._index import Index

    ckpt = make_ckpt(tmp_path / "models" / "model.safetensors")
    an_hour_ago = ckpt.stat().st_mtime_ns - 3600 * 10**9
    os.utime(ckpt, ns=(an_hour_ago, an_hour_ago))
    settled(ckpt)
    with mounted(tmp_path / "mountinfo", {tmp_path / "models": "vfat"}):
        load_toy(ckpt, tmp_path / "cache")
        load_toy(ckpt, tmp_path / "cache")
        with Index(str(tmp_path / "cache")) as index:
            row = index.get(os.path.realpath(ckpt))
        load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().events == ["revalidated"]
    with Index(str(tmp_path / "cache")) as index:
        assert index.get(os.path.realpath(ckpt)) == row


def test_without_a_mount_table_the_stat_never_vouches_alone(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    an_hour_ago = ckpt.stat().st_mtime_ns - 3600 * 10**9
    os.utime(ckpt, ns=(an_hour_ago, an_hour_ago))
    with mounted(tmp_path / "mountinfo", {}):
        (tmp_path / "mountinfo").unlink()
        load_toy(ckpt, tmp_path / "cache")
        load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().events == ["revalidated"]


def squashfs_image(src: Path, image: Path) -> None:
    """A reproducible image (every time fixed, as SOURCE_DATE_EPOCH builds make them)."""
    subprocess.run(
        [
            "mksquashfs",
            str(src),
            str(image),
            "-noappend",
            "-quiet",
            "-all-time",
            "1700000000",
            "-mkfs-time",
            "1700000000",
            "-all-root",
        ],
        check=True,
        capture_output=True,
    )


def can_loop_mount() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a loop device"
    if shutil.which("mksquashfs") is None or shutil.which("losetup") is None:
        return "needs mksquashfs (squashfs-tools) and losetup"
    return None


@pytest.mark.skipif(can_loop_mount() is not None, reason=can_loop_mount() or "")
def test_a_new_image_on_the_same_loop_device_gives_its_own_weights(tmp_path):
    """Image A (weights v1) is loaded, unmounted; image B (v2, same layout and times) is mounted
    at the same path on the same loop device: same device, inode, size, mtime and ctime."""
    versions = []
    for seed in (3, 4):
        src = tmp_path / f"v{seed}"
        src.mkdir()
        torch.manual_seed(0)
        save(random_like_state(build(), seed=seed), src / "model.safetensors")
        squashfs_image(src, tmp_path / f"v{seed}.img")
        versions.append(src / "model.safetensors")
    mount = tmp_path / "mnt"
    mount.mkdir()
    try:
        device = subprocess.run(
            ["losetup", "--find", "--show", "--read-only", str(tmp_path / "v3.img")],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device here ({exc.stderr.strip()})")
    ckpt = mount / "model.safetensors"
    stats = []
    try:
        for i, version in enumerate(versions):
            if i:
                subprocess.run(["losetup", device, str(tmp_path / "v4.img")], check=True, capture_output=True)
            mounted_ok = subprocess.run(
                ["mount", "-t", "squashfs", "-o", "ro", device, str(mount)], capture_output=True, text=True
            )
            if mounted_ok.returncode:
                pytest.skip(f"cannot mount squashfs here ({mounted_ok.stderr.strip()})")
            try:
                st = ckpt.stat()
                stats.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
                model = load_toy(ckpt, tmp_path / "cache")
                assert_same_model(model, reference(version))
            finally:
                subprocess.run(["umount", str(mount)], check=True)
                subprocess.run(["losetup", "--detach", device], check=True)
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)
        subprocess.run(["losetup", "--detach", device], capture_output=True)
    assert stats[0] == stats[1]  # the stat alone could not tell them apart


@pytest.mark.parametrize("lower", ["squashfs", "ext4"])
def test_an_overlay_vouches_as_its_lower_dirs_do(tmp_path, lower):
    """An overlay shows its lower files' inodes and times as they are: over an image (Apptainer's
    layout) another image gives another file the same stat; over a disk (Docker's) it vouches."""
    ckpt = make_ckpt(tmp_path / "models" / "model.safetensors")
    image = tmp_path / "image"
    overlay = f"overlay rw,lowerdir={image}:{tmp_path / 'other'},upperdir={tmp_path / 'up'}"
    with mounted(tmp_path / "mountinfo", {image: lower, tmp_path / "models": overlay}):
        problem = stat_vouches(str(ckpt))
    assert (problem is None) == (lower == "ext4"), problem


@pytest.mark.parametrize(
    ("lower", "vouches"),
    [
        ("lowerdir={models}/base", True),  # its own dir (a container's lower dirs are not in its view)
        ("lowerdir=image", False),  # relative, as typed at mount time: where it lies is unknown
        ("lowerdir+={image},datadir+={tmp}/data", False),  # the new mount API
        ("lowerdir={tmp}/im\\:age", False),  # an escaped colon in a path
    ],
    ids=["itself", "relative", "lowerdir+", "escaped-colon"],
)
def test_an_overlay_is_judged_one_level_down_without_looping(tmp_path, lower, vouches):
    ckpt = make_ckpt(tmp_path / "models" / "model.safetensors")
    options = lower.format(models=tmp_path / "models", image=tmp_path / "image", tmp=tmp_path)
    mounts = {
        tmp_path / "image": "squashfs",
        tmp_path / "im:age": "squashfs",
        tmp_path / "models": f"overlay rw,{options}",
    }
    with mounted(tmp_path / "mountinfo", mounts):
        problem = stat_vouches(str(ckpt))
    assert (problem is None) == vouches, problem

"""Identity that survives history and coarse clocks.

An index row or a sibling whose fingerprint another sa3loader version wrote is
never trusted without recomputing; a row checked within a timestamp tick of the
source's mtime is checked again (git's racy-clean rule); two versions sharing
a checkpoint dir each convert once and never overwrite each other's sibling.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model, writable
from support.loads import load_toy, make_ckpt
from support.toymodel import build, reference

import sa3loader
from sa3loader import _faults
from sa3loader._format import read_header
from sa3loader._index import Index


def write_version(path, seed: int, mtime_ns: int | None = None):
    """Write a version of the checkpoint in place (same inode, same size and layout)."""
    torch.manual_seed(0)
    state = random_like_state(build(), seed=seed)
    size = os.path.getsize(path) if os.path.exists(path) else None
    with open(path, "r+b" if size else "wb") as f:
        f.write(save(state, path.with_suffix(".staged")).read_bytes())
    os.unlink(path.with_suffix(".staged"))
    assert size is None or os.path.getsize(path) == size
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def test_a_row_an_older_version_revalidated_is_checked_again(tmp_path, conversions):
    """An older sa3loader (weaker fingerprint) that revalidated a changed source left a row
    vouching for the old sibling: the current one recomputes before trusting it."""
    ckpt = write_version(tmp_path / "model.safetensors", seed=3)
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    mtime = os.stat(ckpt).st_mtime_ns
    write_version(ckpt, seed=4, mtime_ns=mtime)  # same size, header and mtime: only content moved
    index = Index(str(cache))
    ((key, row),) = index.items()
    st = os.stat(ckpt)
    row["source"].update(inode=st.st_ino, device=st.st_dev, ctime_ns=st.st_ctime_ns)
    row["fingerprint"] = "v1:" + "0" * 64  # what the older version's revalidation wrote
    row["checked_ns"] = time.time_ns() + 10**12
    index.put(key, row)
    index.close()
    model = load_toy(ckpt, cache)
    assert len(conversions) == 2 and sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def coarse(st: os.stat_result) -> os.stat_result:
    """``st`` as a filesystem with one-second timestamps reports it, ctime moving with mtime."""
    second = st.st_mtime_ns // 10**9
    ns = second * 10**9
    head = [
        st.st_mode,
        st.st_ino,
        st.st_dev,
        st.st_nlink,
        st.st_uid,
        st.st_gid,
        st.st_size,
        second,
        second,
        second,
    ]
    times = [float(second)] * 3 + [ns] * 3
    return os.stat_result(head + times + [st.st_blksize, st.st_blocks, st.st_rdev])


@pytest.fixture
def one_second_timestamps(tmp_path, monkeypatch):
    """Every stat of a file under ``tmp_path`` as on ext3, HFS+, FAT or many FUSE mounts."""
    real_stat, real_fstat = os.stat, os.fstat
    inside = str(tmp_path) + os.sep

    def stat(path, *args, **kwargs):
        st = real_stat(path, *args, **kwargs)
        return (
            coarse(st) if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(inside) else st
        )

    def fstat(fd):
        st = real_fstat(fd)
        try:
            under = os.readlink(f"/proc/self/fd/{fd}").startswith(inside)
        except OSError:
            under = False
        return coarse(st) if under else st

    monkeypatch.setattr(os, "stat", stat)
    monkeypatch.setattr(os, "fstat", fstat)


@pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to name a descriptor's file"
)
def test_a_rewrite_in_the_same_second_as_the_conversion_is_seen(tmp_path, conversions, one_second_timestamps):
    """On one-second timestamps a same-second rewrite keeps size, mtime, ctime and inode;
    the row was checked within that tick, so it is racy and the fingerprint is read again."""
    now = time.time_ns()
    ckpt = write_version(tmp_path / "model.safetensors", seed=3, mtime_ns=now)
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    write_version(ckpt, seed=4, mtime_ns=now)
    model = load_toy(ckpt, cache)
    assert len(conversions) == 2
    assert_same_model(model, reference(ckpt))


def test_a_racy_row_is_checked_again_once_then_trusted(tmp_path, monkeypatch):
    """The re-check is paid while a row is racy, not forever: it is rewritten as checked now."""
    fingerprints: list[str | None] = []
    hook = lambda name, subject=None: fingerprints.append(subject) if name == "fingerprint" else None  # noqa: E731
    monkeypatch.setattr(_faults, "hook", hook)
    ckpt = write_version(tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10 * 10**9)
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    fingerprints.clear()
    load_toy(ckpt, cache)
    assert fingerprints == []  # checked long after the mtime: not racy, the row vouches
    index = Index(str(cache))
    ((key, row),) = index.items()
    row["checked_ns"] = row["source"]["mtime_ns"] + 1  # as if checked in the mtime's own tick
    index.put(key, row)
    index.close()
    load_toy(ckpt, cache)
    assert fingerprints == [str(ckpt)] and "revalidated" in sa3loader.last_load_info().events
    load_toy(ckpt, cache)
    assert fingerprints == [str(ckpt)] and sa3loader.last_load_info().cache_hit


def with_fingerprint(sibling, fingerprint: str) -> None:
    """Rewrite a sibling as another sa3loader version would have written it."""
    header = read_header(sibling)
    metadata = {**header.metadata, "sa3loader.source_fingerprint": fingerprint}
    tensors = load_file(str(sibling))
    writable(sibling)
    save_file(tensors, str(sibling), metadata=metadata)


@pytest.mark.parametrize("other", ["v1", "v9"], ids=["older", "newer"])
def test_two_versions_sharing_a_checkpoint_dir_convert_once_each(tmp_path, conversions, other):
    """Another version's sibling beside the source is neither trusted (its fingerprint cannot
    be compared) nor overwritten (no ping-pong): this version keeps its own in its cache dir."""
    ckpt = write_version(tmp_path / "model.safetensors", seed=3)
    load_toy(ckpt, tmp_path / "their-cache")
    beside = tmp_path / "model.fp16.safetensors"
    with_fingerprint(beside, f"{other}:" + "ab" * 32)
    theirs = beside.read_bytes()
    for _ in range(2):
        model = load_toy(ckpt, tmp_path / "my-cache")
    assert len(conversions) == 2 and sa3loader.last_load_info().cache_hit
    assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / "my-cache"))
    assert beside.read_bytes() == theirs
    assert_same_model(model, reference(ckpt))


def test_hard_identity_change_rejects_even_when_samples_match(tmp_path, monkeypatch):
    """A size/mtime change the sampled fingerprint misses still means reconvert (here the content
    is the same, so the fingerprint matches for real)."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache")
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted

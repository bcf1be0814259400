"""A source's identity: a sibling is used only for the very content it was made from.

A rewrite in place (same size, mtime kept or not) is reconverted, a copy is revalidated by its
fingerprint, not reconverted; a damaged sibling is reconverted, and ``verify`` catches a flipped
data byte; an index row or a sibling another sa3loader version wrote is never trusted without
recomputing; a row checked within a timestamp tick of the source's mtime is checked again (git's
racy-clean rule); two versions sharing a checkpoint dir each convert once."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import mmap
import os
import random
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from support.checkpoints import random_like_state, save, settled
from support.compare import assert_same_model, writable
from support.faults import at, injected, mounted, recorded
from support.loads import load_toy, make_ckpt
from support.toymodel import build, reference

import sa3loader
from sa3loader import _faults, _identity
from sa3loader._format import open_header, read_header
from sa3loader._index import Index
from sa3loader._records import sibling_file


def write_version(path, seed: int, mtime_ns: int | None = None, *, settle: bool = False):
    """Write a version of the checkpoint in place (same inode, same size and layout); ``settle``:
    then wait out its ctime's tick, so that a row checked next may vouch for it."""
    torch.manual_seed(0)
    state = random_like_state(build(), seed=seed)
    size = os.path.getsize(path) if os.path.exists(path) else None
    with open(path, "r+b" if size else "wb") as f:
        f.write(save(state, path.with_suffix(".staged")).read_bytes())
    os.unlink(path.with_suffix(".staged"))
    assert size is None or os.path.getsize(path) == size
    if mtime_ns is not None:
        os.utime(path, ns=(mtime_ns, mtime_ns))
    if settle:
        settled(path)
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
    source = dataclasses.replace(row.source, inode=st.st_ino, device=st.st_dev, ctime_ns=st.st_ctime_ns)
    # what the older version's revalidation wrote
    row = dataclasses.replace(
        row, source=source, fingerprint="v1:" + "0" * 64, checked_ns=time.time_ns() + 10**12
    )
    index.put(key, row)
    index.close()
    model = load_toy(ckpt, cache)
    assert len(conversions) == 2 and sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def coarse(st: os.stat_result) -> os.stat_result:
    """``st`` as a filesystem with one-second timestamps reports it."""
    second, changed = st.st_mtime_ns // 10**9, st.st_ctime_ns // 10**9
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
        changed,
    ]
    times = [float(second), float(second), float(changed), second * 10**9, second * 10**9, changed * 10**9]
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


def test_a_rewrite_that_sets_the_mtime_back_in_the_conversions_second_is_seen(
    tmp_path, conversions, one_second_timestamps
):
    """On one-second timestamps a rewrite in the conversion's second that sets the mtime back (an
    older version unpacked by ``tar -x``, ``cp -p``) keeps size, mtime, ctime and inode: the row
    was checked within the ctime's tick, so it is racy and the fingerprint is read again."""
    an_hour_ago = time.time_ns() - 3600 * 10**9
    cache = tmp_path / "cache"
    load_toy(write_version(tmp_path / "warm.safetensors", seed=5), cache)  # the first load's own costs
    conversions.clear()
    time.sleep(1.01 - time.time() % 1)  # all of it inside one second
    started = time.time()
    ckpt = write_version(tmp_path / "model.safetensors", seed=3, mtime_ns=an_hour_ago)
    load_toy(ckpt, cache)
    write_version(ckpt, seed=4, mtime_ns=an_hour_ago)
    assert int(time.time()) == int(started), "the second rolled over: the case was not reached"
    model = load_toy(ckpt, cache)
    assert len(conversions) == 2
    assert_same_model(model, reference(ckpt))


def test_a_write_through_a_mapping_into_a_dirty_page_is_seen(tmp_path, conversions):
    """A page written through a shared mapping stamps the file's times when it is first made dirty,
    and no later write into it does until it has been written back. A row checked while a page
    waited to be written is racy: the next load reads the fingerprint and sees the new values."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    an_hour_ago = time.time_ns() - 3600 * 10**9
    os.utime(ckpt, ns=(an_hour_ago, an_hour_ago))
    settled(ckpt)
    entry = read_header(ckpt).by_name["blocks.0.ff.weight"]
    start = read_header(ckpt).data_start + entry.begin
    for attempt in range(3):  # writeback between the two writes stamps the times: try again
        with open(ckpt, "r+b") as f, mmap.mmap(f.fileno(), 0) as mapped:
            mapped[start : start + 4] = struct.pack("<f", 1.5 + attempt)  # dirty, and stamped
            os.utime(ckpt, ns=(an_hour_ago, an_hour_ago))  # a time no racy rule looks at
            time.sleep(2 * _identity.CTIME_TICK_NS / 1e9)
            load_toy(ckpt, tmp_path / "cache")
            before = os.stat(ckpt)
            mapped[start : start + 4] = struct.pack("<f", -2.5 - attempt)  # into the dirty page
            after = os.stat(ckpt)
        if (before.st_mtime_ns, before.st_ctime_ns) == (after.st_mtime_ns, after.st_ctime_ns):
            break
    else:
        pytest.fail("every second write stamped the file's times: the case was not reached")
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def test_pages_waiting_to_be_written_are_asked_about_before_the_content_is_read(tmp_path, monkeypatch):
    """Whether a page of the source waits to be written is asked before the first read of the
    content a row records (the fingerprint, before a conversion), and a page waiting then leaves
    the row racy. A hit the stat vouches for reads no content and does not ask (the question
    walks the file's page cache)."""
    from support.faults import faked

    events: list[str] = []
    monkeypatch.setattr(_faults, "hook", lambda name, subject=None: events.append(name))
    waiting = {"pages": 0}

    def asked(subject, real):
        events.append("asked")
        return waiting["pages"]

    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    index = Index(str(tmp_path / "cache"))

    def load() -> tuple[list[str], int | None]:
        events.clear()
        with mounted(tmp_path / "mountinfo", {tmp_path: "ext4"}), faked(unwritten_pages=asked):
            load_toy(ckpt, tmp_path / "cache")
        ((_, row),) = index.items()
        return [e for e in events if e in ("asked", "fingerprint", "convert")], row.checked_ns

    seen, checked = load()
    assert seen[:3] == ["asked", "fingerprint", "convert"] and seen.count("asked") == 1 and checked
    assert load() == ([], checked)  # a hit the stat vouches for: nothing read, nothing asked
    ((key, row),) = index.items()
    index.put(key, dataclasses.replace(row, checked_ns=None))  # racy: the next load reads
    waiting["pages"] = 3
    assert load() == (["asked", "fingerprint"], None)  # read while pages waited: still racy
    waiting["pages"] = 0
    seen, checked = load()
    assert seen == ["asked", "fingerprint"] and checked is not None
    assert load() == ([], checked)


def test_a_sibling_altered_since_it_was_indexed_is_converted_again(tmp_path, conversions):
    """Two tensors' places swapped in the sibling's header: its claim and the source's fingerprint
    still match, but the row knew another header, so the sibling is not adopted."""
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    a, b = header["blocks.0.ff.weight"], header["blocks.1.ff.weight"]
    assert (a["shape"], a["dtype"]) == (b["shape"], b["dtype"])
    a["data_offsets"], b["data_offsets"] = b["data_offsets"], a["data_offsets"]
    swapped = json.dumps(header, separators=(",", ":")).encode().ljust(length)
    assert len(swapped) == length
    raw[8 : 8 + length] = swapped
    writable(sibling).write_bytes(bytes(raw))
    model = load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 2 and "altered since it was indexed" in str(sa3loader.last_load_info().events)
    assert_same_model(model, reference(ckpt))


def edited_value(sibling: Path, name: str) -> bytes:
    """The sibling's bytes with the first fp16 value of tensor ``name`` changed (header kept)."""
    header, raw = read_header(str(sibling)), bytearray(sibling.read_bytes())
    at = header.data_start + header.by_name[name].begin
    raw[at : at + 2] = bytes(b ^ 0x40 for b in raw[at : at + 2])
    return bytes(raw)


@pytest.mark.parametrize("how", ["in-place", "in-place, mtime put back", "replaced"])
def test_a_sibling_whose_values_were_altered_since_it_was_indexed_is_not_served(tmp_path, conversions, how):
    """Same header, same size, another value: the row recorded the file it indexed (device,
    inode, mtime, ctime), so another file at its name, or this one edited, is checked again."""
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    edited = edited_value(sibling, "blocks.0.ff.weight")
    if how.startswith("in-place"):
        indexed = sibling.stat()
        writable(sibling).write_bytes(edited)
        if how.endswith("put back"):
            os.utime(sibling, ns=(indexed.st_atime_ns, indexed.st_mtime_ns))
    else:
        other = tmp_path / "other.safetensors"
        other.write_bytes(edited)
        os.replace(other, sibling)
    model = load_toy(ckpt, tmp_path / "cache")
    events = str(sa3loader.last_load_info().events)
    assert len(conversions) == 2 and "changed since it was indexed" in events, events
    assert_same_model(model, reference(ckpt))


def test_a_file_put_at_the_siblings_name_as_it_is_published_is_not_recorded_as_it(tmp_path, conversions):
    """The row records the sibling as the rename left it (its ctime moved), by name: another
    file there by then is not the one written, and the next load checks it."""
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"

    def put_another() -> None:
        other = tmp_path / "other.safetensors"
        other.write_bytes(edited_value(sibling, "blocks.0.ff.weight"))
        os.replace(other, sibling)

    with injected(at("index", put_another)):
        load_toy(ckpt, tmp_path / "cache")
    model = load_toy(ckpt, tmp_path / "cache")
    events = str(sa3loader.last_load_info().events)
    assert len(conversions) == 2 and "changed since it was indexed" in events, events
    assert_same_model(model, reference(ckpt))


def test_a_row_that_did_not_record_its_sibling_file_checks_the_sibling_once(tmp_path, conversions):
    """A row an older version wrote: the sibling is read at the spots, then the row says which file."""
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    load_toy(ckpt, tmp_path / "cache")
    index = Index(str(tmp_path / "cache"))
    ((key, row),) = index.items()
    index.put(key, dataclasses.replace(row, sibling_file=None))
    load_toy(ckpt, tmp_path / "cache")
    assert "revalidated" in sa3loader.last_load_info().events and len(conversions) == 1
    ((_, revalidated),) = index.items()
    assert revalidated.sibling_file == row.sibling_file is not None
    load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().events == []


def test_a_racy_row_is_checked_again_once_then_trusted(tmp_path, monkeypatch):
    """The re-check is paid while a row is racy, not forever: it is rewritten as checked now."""
    fingerprints: list[str | None] = []
    hook = lambda name, subject=None: fingerprints.append(subject) if name == "fingerprint" else None  # noqa: E731
    monkeypatch.setattr(_faults, "hook", hook)
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10 * 10**9, settle=True
    )
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    fingerprints.clear()
    load_toy(ckpt, cache)
    assert fingerprints == []  # checked long after the mtime: not racy, the row vouches
    index = Index(str(cache))
    ((key, row),) = index.items()
    row = dataclasses.replace(row, checked_ns=row.source.mtime_ns + 1)  # as if checked in the mtime's tick
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
    beside = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
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


def rewrite_same_size(path, seed, keep_mtime):
    st = os.stat(path)
    torch.manual_seed(0)
    save(random_like_state(build(), seed=seed), path)
    assert os.path.getsize(path) == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_source_rewritten_in_place_is_reconverted(ckpt, tmp_path, conversions, keep_mtime):
    load_toy(ckpt, tmp_path / "cache")
    rewrite_same_size(ckpt, seed=99, keep_mtime=keep_mtime)
    model = load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 2
    assert_same_model(model, reference(ckpt))


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip-header", "other-checkpoint"])
def test_damaged_sibling_is_reconverted(ckpt, tmp_path, conversions, damage):
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    if damage == "delete":
        sibling.unlink()
    elif damage == "truncate":
        os.truncate(writable(sibling), os.path.getsize(sibling) // 2)
    elif damage == "flip-header":
        raw = bytearray(sibling.read_bytes())
        raw[20] ^= 0x01
        writable(sibling).write_bytes(bytes(raw))
    else:  # another valid sa3loader sibling, of a different source
        other = tmp_path / "other" / "model.safetensors"
        other.parent.mkdir()
        torch.manual_seed(0)
        save(random_like_state(build(), seed=5), other)
        load_toy(other, tmp_path / "cache")
        shutil.copyfile(other.parent / ".cache" / "sa3loader" / "model.fp16.safetensors", writable(sibling))
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def test_copied_source_is_revalidated_not_reconverted(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache")
    st = os.stat(ckpt)
    copy = tmp_path / "copy.tmp"
    shutil.copyfile(ckpt, copy)
    os.replace(copy, ckpt)  # new inode and ctime, same bytes
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ckpt).st_ino != st.st_ino
    load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert len(conversions) == 1 and info.cache_hit and "revalidated" in info.events
    row = Index(str(tmp_path / "cache")).get(os.path.realpath(ckpt))
    assert row is not None and row.source.inode == os.stat(ckpt).st_ino


@pytest.mark.parametrize("asked", ["argument", "environment"])
def test_verify_catches_a_flipped_data_byte(ckpt, tmp_path, conversions, monkeypatch, asked):
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    raw[-5] ^= 0xFF
    writable(sibling).write_bytes(bytes(raw))
    if asked == "environment":
        monkeypatch.setenv("SA3LOADER_VERIFY", "1")
    model = load_toy(ckpt, tmp_path / "cache", **({"verify": True} if asked == "argument" else {}))
    assert len(conversions) == 2 and sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def test_fingerprint_sees_a_change_in_any_tensor(tmp_path):
    """Small tensors are hashed whole; large ones at spots including their first and last byte."""
    from sa3loader._format import read_header
    from sa3loader._identity import WHOLE_TENSOR_BYTES, fingerprint

    big = WHOLE_TENSOR_BYTES // 4 + 1000  # float32 elements: just over the whole-hash limit
    tensors = {
        "a.bias": torch.randn(7),
        "b.weight": torch.randn(big),
        "c.norm": torch.randn(300),
        "d.empty": torch.empty(0),
        "e.weight": torch.randn(WHOLE_TENSOR_BYTES // 4),
    }
    path = save(tensors, tmp_path / "model.safetensors")
    header = read_header(path)
    original = fingerprint(header)
    spots = []
    for entry in header.entries:
        start = header.data_start + entry.begin
        if entry.nbytes <= WHOLE_TENSOR_BYTES:
            spots += [(entry.name, start + k) for k in range(0, entry.nbytes, 997)]
        else:
            spots += [(entry.name, start), (entry.name, start + entry.nbytes - 1)]
    assert {name for name, _ in spots} == {"a.bias", "b.weight", "c.norm", "e.weight"}
    with open(path, "r+b") as f:
        for name, offset in spots:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x40]))  # one bit flipped
            f.flush()
            assert fingerprint(read_header(path)) != original, (
                f"a change in {name} at byte {offset} was missed"
            )
            f.seek(offset)
            f.write(bytes([byte]))
            f.flush()
    assert fingerprint(read_header(path)) == original


def test_copied_source_differing_in_one_small_tensor_is_reconverted(tmp_path, conversions):
    """Same size, header and mtime (cp -p of a rebuilt file): a change in one small tensor,
    outside where the old 64-window fingerprint looked, must not serve the old weights."""
    from sa3loader._format import read_header

    config = {"dim": 256, "depth": 8}
    torch.manual_seed(0)
    state = random_like_state(build(config), seed=3)
    ckpt = save(state, tmp_path / "model.safetensors")
    header = read_header(ckpt)
    span, window = header.file_size - 65536, 65536
    windows = [(span * i // 63, span * i // 63 + window) for i in range(64)]
    hidden = next(
        e
        for e in header.entries
        if e.nbytes >= 4
        and not any(a < header.data_start + e.end and header.data_start + e.begin < b for a, b in windows)
    )
    factory = lambda cfg: build(config)  # noqa: E731
    load_half = lambda: sa3loader.load_diffusion_cond(  # noqa: E731
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=factory
    )
    load_half()
    st = os.stat(ckpt)
    state[hidden.name] = state[hidden.name] + 1
    rebuilt = save(state, tmp_path / "rebuilt.safetensors")
    assert read_header(rebuilt).sha256 == header.sha256 and rebuilt.stat().st_size == st.st_size
    os.utime(rebuilt, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(rebuilt, ckpt)  # a new inode, as cp -p or an image layer gives
    torch.manual_seed(0)
    model = load_half()
    info = sa3loader.last_load_info()
    assert len(conversions) == 2 and info.converted, (hidden.name, info.reason, info.events)
    assert_same_model(model, reference(ckpt, config=config))


def test_a_reconversion_says_each_thing_once(tmp_path):
    """The sibling is checked before the lock and again under it: its events are listed once."""
    ckpt = write_version(tmp_path / "model.safetensors", seed=3)
    load_toy(ckpt, tmp_path / "cache")
    write_version(ckpt, seed=4, mtime_ns=os.stat(ckpt).st_mtime_ns + 10**9)
    load_toy(ckpt, tmp_path / "cache")
    events = sa3loader.last_load_info().events
    assert sa3loader.last_load_info().converted
    assert len(events) == len(set(events)), events


def test_a_sibling_cut_short_is_converted_again_in_its_place_and_found_by_the_cache_commands(tmp_path):
    """A disk that filled, a copy cut off: the header (with sa3loader's marker) is whole, the data
    is not. The next load converts again at the same place (not a second sibling in the cache
    dir beside a damaged one), and scan and rm see a cut-off sibling as sa3loader's."""
    from support.cli import run

    ckpt = make_ckpt(tmp_path / "model.safetensors")
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    header_end = 8 + int.from_bytes(sibling.read_bytes()[:8], "little")
    os.chmod(sibling, 0o600)
    with open(sibling, "r+b") as f:
        f.truncate(header_end + 100)
    model = load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling == str(sibling), info.reason
    assert_same_model(model, reference(ckpt))
    assert not (cache / "siblings").exists() or not any((cache / "siblings").rglob("*.safetensors"))
    os.chmod(sibling, 0o600)
    with open(sibling, "r+b") as f:
        f.truncate(header_end + 100)
    assert f"{sibling}" in run("cache", "scan", str(tmp_path), cache=cache).stdout
    assert f"removed sibling {sibling}" in run("cache", "rm", str(ckpt), cache=cache).stdout
    assert not sibling.exists()


def test_marked_by_sa3loader_reads_only_a_regular_files_own_header(tmp_path):
    """What a cache command may remove at a sibling place: never a FIFO (no hang), never
    through a symlink, never a file too short to have a header."""
    import threading

    from sa3loader._identity import marked_by_sa3loader
    from sa3loader._records import MARKER_KEY

    marked = save({"w": torch.ones(2)}, tmp_path / "m.fp16.safetensors", metadata={MARKER_KEY: "1"})
    assert marked_by_sa3loader(str(marked))
    (tmp_path / "link.fp16.safetensors").symlink_to(marked)
    assert not marked_by_sa3loader(str(tmp_path / "link.fp16.safetensors"))
    for short in (b"", b"\x05\x00\x00"):
        (tmp_path / "short").write_bytes(short)
        assert not marked_by_sa3loader(str(tmp_path / "short"))
    os.mkfifo(tmp_path / "fifo")
    answers: list[bool] = []
    reader = threading.Thread(
        target=lambda: answers.append(marked_by_sa3loader(str(tmp_path / "fifo"))), daemon=True
    )
    reader.start()
    reader.join(10)
    assert answers == [False]


def test_an_identity_is_the_open_files_not_whatever_has_the_name_now(tmp_path):
    from sa3loader._format import open_header
    from sa3loader._identity import identity_of

    path = save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    closed = read_header(path)  # no descriptor: the identity is the path's
    assert identity_of(closed).inode == os.stat(path).st_ino
    with open_header(path) as header:
        first = os.stat(path)
        save({"w": torch.zeros(3)}, tmp_path / "new.safetensors")
        os.replace(tmp_path / "new.safetensors", path)
        identity = identity_of(header)
    assert (identity.inode, identity.size) == (first.st_ino, first.st_size)
    assert identity.inode != os.stat(path).st_ino


def test_a_siblings_metadata_names_a_source_whose_name_is_not_utf8():
    from sa3loader._format import Header
    from sa3loader._identity import sibling_metadata
    from sa3loader._records import META_PREFIX, SourceIdentity

    name = os.fsdecode(b"/d/\xffm.safetensors")  # legal on Linux; only the name is read here
    header = Header(path=name, file_size=8, header_size=0, entries=(), metadata={}, sha256="h", by_name={})
    identity = SourceIdentity(size=8, mtime_ns=1, header_sha256="h", inode=1, device=1, ctime_ns=1)
    assert sibling_metadata(header, identity, "fp")[META_PREFIX + "source_name"] == "\\xffm.safetensors"


def test_the_fingerprint_hashes_exactly_its_ranges_however_the_reads_are_merged(tmp_path):
    import hashlib

    from sa3loader._identity import FINGERPRINT_VERSION, fingerprint, fingerprint_ranges

    tensors = {f"t{i}": torch.randn(n) for i, n in enumerate([3, 600_000, 5, 900_000, 400_000, 7, 2_000_000])}
    path = save(tensors, tmp_path / "m.safetensors")
    header = read_header(path)
    data = path.read_bytes()
    expected = hashlib.sha256(f"{FINGERPRINT_VERSION}:{header.file_size}:{header.sha256}".encode())
    for offset, length in fingerprint_ranges(header):
        expected.update(data[offset : offset + length])
    assert fingerprint(header) == f"{FINGERPRINT_VERSION}:{expected.hexdigest()}"


def test_the_commands_judge_a_recorded_source_by_a_loads_rule(tmp_path, monkeypatch):
    """``recorded_by`` (the cache commands' judge): the hard fields, then the stat where it
    vouches (no read), else the fingerprint of this version."""
    fingerprints: list[str | None] = []
    monkeypatch.setattr(
        _faults, "hook", lambda name, subject=None: fingerprints.append(name == "fingerprint")
    )
    hour_ago = time.time_ns() - 3600 * 10**9
    ckpt = write_version(tmp_path / "model.safetensors", seed=3, mtime_ns=hour_ago, settle=True)
    with open_header(ckpt) as header:
        recorded, printed, checked = (
            _identity.identity_of(header),
            _identity.fingerprint(header),
            time.time_ns(),
        )

    def judged(checked_ns: int | None = checked, fingerprint: str = printed, fstype: str = "ext4") -> tuple:
        fingerprints.clear()
        with mounted(tmp_path / "mountinfo", {tmp_path: fstype}), open_header(ckpt) as header:
            return _identity.recorded_by(header, recorded, fingerprint, checked_ns), any(fingerprints)

    stat, read = _identity.READ_STAT, _identity.READ_FINGERPRINT
    assert judged() == (stat, False)  # the stat vouches: nothing read
    assert judged(checked_ns=None) == (read, True)  # racy: read, and the same
    assert judged(fstype="vfat") == (read, True)  # a stat that cannot vouch: read
    os.utime(ckpt, ns=(hour_ago, hour_ago))  # the ctime moves, the content does not
    assert judged() == (read, True)
    assert judged(fingerprint="v1:" + "0" * 64)[0] is None  # another version's: cannot tell
    write_version(ckpt, seed=4, mtime_ns=hour_ago)  # other weights, the mtime set back
    assert judged()[0] is None
    write_version(ckpt, seed=3, mtime_ns=hour_ago + 1)  # the same weights, another mtime
    assert judged() == (None, False)


@contextlib.contextmanager
def one_indexed_row(tmp_path):
    """A settled checkpoint on a filesystem whose stat vouches, loaded once: it and its row."""
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    with mounted(tmp_path / "mountinfo", {tmp_path: "ext4"}):
        load_toy(ckpt, tmp_path / "cache")
        ((_, row),) = Index(str(tmp_path / "cache")).items()
        yield ckpt, row


def test_a_rows_status_is_a_loads_rule(tmp_path):
    """``cache ls``'s status of a row, by a load's rule: the fingerprint is read only where the
    stat cannot vouch; a symlink at the sibling's name is never followed."""
    from sa3loader._records import DAMAGED, MISSING_SIBLING, MISSING_SOURCE, OK, STALE

    with one_indexed_row(tmp_path) as (ckpt, row):
        status = _identity.row_status
        assert status(row) == OK
        assert status(dataclasses.replace(row, checked_ns=None)) == OK  # racy: the fingerprint matches
        assert status(dataclasses.replace(row, fingerprint="other")) == OK  # the stat vouches
        assert status(dataclasses.replace(row, checked_ns=None, fingerprint="other")) == STALE
        other_header = dataclasses.replace(row, sibling_header_sha256="other")
        assert status(other_header) == DAMAGED  # still claims this source
        assert status(dataclasses.replace(other_header, fingerprint="other")) == STALE  # another content's
        assert status(dataclasses.replace(row, sibling_path=str(tmp_path / "gone"))) == MISSING_SIBLING
        copy = tmp_path / "altered.safetensors"
        shutil.copyfile(row.sibling_path, copy)
        with open(copy, "r+b") as f, open_header(row.sibling_path) as sib:
            f.seek(sib.data_start + sib.by_name["blocks.0.ff.weight"].begin)
            f.write(b"\x00\x7c")  # +inf where the fingerprint reads: a load converts again
        assert status(dataclasses.replace(row, sibling_path=str(copy))) == DAMAGED  # another file: read
        indexed = sibling_file(os.stat(copy))
        altered = dataclasses.replace(row, sibling_path=str(copy), sibling_file=indexed)
        assert status(altered) == OK  # the file the row indexed, the stat vouches: a load reads no data
        assert status(dataclasses.replace(altered, fingerprint="other")) == DAMAGED  # unvouched: read
        assert status(dataclasses.replace(altered, checked_ns=None)) == DAMAGED
        racy_altered = dataclasses.replace(altered, checked_ns=None)
        assert status(racy_altered, spots=False) == OK  # verify's: it reads every byte instead
        copy = tmp_path / "copy.safetensors"
        shutil.copyfile(row.sibling_path, copy)
        (tmp_path / "link.safetensors").symlink_to(copy)
        assert status(dataclasses.replace(row, sibling_path=str(tmp_path / "link.safetensors"))) == DAMAGED
        assert status(dataclasses.replace(row, real_path=str(tmp_path))) == MISSING_SOURCE  # a directory
        write_version(ckpt, seed=4)
        assert status(row) == STALE
        os.unlink(ckpt)
        assert status(row) == MISSING_SOURCE


def test_a_row_naming_a_sibling_a_load_passes_by_is_stale(tmp_path):
    """A row whose sibling, its header as the row recorded, a load would not use: another
    version's, another checkpoint's, or made from the same bytes in another file: stale, with
    the stat vouching or not (never an error: a row may name any path)."""
    from sa3loader._records import STALE

    with one_indexed_row(tmp_path) as (ckpt, row):
        status = _identity.row_status
        raw = bytearray(Path(row.sibling_path).read_bytes())
        claim = b'"sa3loader.source_fingerprint":"' + _identity.FINGERPRINT_VERSION.encode()
        assert raw.count(claim) == 1
        raw[raw.index(claim) + len(claim) - 2 : raw.index(claim) + len(claim)] = b"v1"  # another version's
        older = tmp_path / "older.safetensors"
        older.write_bytes(bytes(raw))
        older_row = dataclasses.replace(
            row, sibling_path=str(older), sibling_header_sha256=read_header(older).sha256
        )
        for checked in (row.checked_ns, None):  # a load never uses another version's sibling
            assert status(dataclasses.replace(older_row, checked_ns=checked)) == STALE
        other = write_version(tmp_path / "other.safetensors", seed=5, mtime_ns=time.time_ns() - 10**11)
        load_toy(other, tmp_path / "cache")
        (other_row,) = [r for _, r in Index(str(tmp_path / "cache")).items() if r.real_path != row.real_path]
        named = dataclasses.replace(
            row, sibling_path=other_row.sibling_path, sibling_header_sha256=other_row.sibling_header_sha256
        )
        for checked in (row.checked_ns, None):  # another checkpoint's sibling, its header as recorded
            assert status(dataclasses.replace(named, checked_ns=checked)) == STALE
        twin = tmp_path / "twin" / "model.safetensors"  # the same bytes, another mtime: another file
        twin.parent.mkdir()
        shutil.copyfile(ckpt, twin)
        os.utime(twin, ns=(row.source.mtime_ns - 10**9, row.source.mtime_ns - 10**9))
        load_toy(twin, tmp_path / "cache")
        (twin_row,) = [r for _, r in Index(str(tmp_path / "cache")).items() if r.real_path == str(twin)]
        assert twin_row.fingerprint == row.fingerprint
        of_twin = dataclasses.replace(
            row, sibling_path=twin_row.sibling_path, sibling_header_sha256=twin_row.sibling_header_sha256
        )
        for checked in (row.checked_ns, None):  # a load refuses a claim of other hard fields
            assert status(dataclasses.replace(of_twin, checked_ns=checked)) == STALE


@pytest.mark.parametrize("row", ["none", "racy"])
def test_a_sibling_whose_claim_matches_but_whose_data_does_not_is_converted_again(tmp_path, conversions, row):
    """What a write through a shared mapping into a dirty page during the conversion leaves, once
    the file is put back: the claim was fingerprinted before the conversion read the other value,
    so it matches the source while the data does not. Where the stat cannot vouch (no row, or a
    racy one) the sibling itself is read where the fingerprint reads: it is never adopted."""
    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    header = read_header(sibling)
    entry = header.by_name["blocks.0.ff.weight"]
    assert entry.dtype == "F16" and entry.nbytes <= _identity.WHOLE_TENSOR_BYTES
    raw = bytearray(sibling.read_bytes())
    at = header.data_start + entry.begin
    raw[at : at + 2] = (
        (torch.tensor([2.0], dtype=torch.float16) + torch.frombuffer(raw[at : at + 2], dtype=torch.float16))
        .view(torch.uint8)
        .numpy()
        .tobytes()
    )
    writable(sibling).write_bytes(bytes(raw))
    if row == "none":
        shutil.rmtree(tmp_path / "cache")
    else:
        index = Index(str(tmp_path / "cache"))
        ((key, indexed),) = index.items()
        index.put(key, dataclasses.replace(indexed, checked_ns=None))
    model = load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 2, sa3loader.last_load_info().events
    assert_same_model(model, reference(ckpt))


@pytest.mark.parametrize("verify", [False, True])
def test_a_sibling_cut_short_while_it_is_checked_is_converted_again(tmp_path, conversions, verify):
    """A sibling found with no row that vouches is read to check it (its spots, or every byte
    with ``verify``); truncated meanwhile, it is not the sibling of this source: converted
    again, as a leftover is (never an error that fails the load)."""
    ckpt = write_version(tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11)
    load_toy(ckpt, tmp_path / "probe")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"

    def cut(name, subject=None):  # the source's spots are read after the sibling was opened
        if name == "spots" and subject == str(ckpt) and sibling.stat().st_size > 1000:
            os.truncate(sibling, 1000)

    with injected(cut):
        model = load_toy(ckpt, tmp_path / "cache", verify=verify)
    info = sa3loader.last_load_info()
    assert len(conversions) == 2 and f"content check failed for {sibling}" in info.events, info.events
    assert_same_model(model, reference(ckpt))


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    spans=st.lists(st.tuples(st.integers(0, 399_999), st.integers(1, 5000)), min_size=1, max_size=40),
)
def test_file_bytes_gives_the_files_bytes_at_every_range(tmp_path_factory, seed, spans):
    """Ranges read together (merged when near, a run of reads per thread, in any order given)
    give the file's own bytes at each of them."""
    data = random.Random(seed).randbytes(400_000)  # ranges far apart are read apart
    path = tmp_path_factory.mktemp("fb") / "f.safetensors"
    entry = {"dtype": "U8", "shape": [len(data)], "data_offsets": [0, len(data)]}
    header_bytes = json.dumps({"t": entry}).encode()
    path.write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    whole, start = path.read_bytes(), 8 + len(header_bytes)
    ranges = [(start + o, min(n, len(data) - o)) for o, n in spans]
    with open_header(path) as header:
        got = _identity.FileBytes(header, ranges)
    for offset, length in ranges:
        assert bytes(got.at(offset, length)) == whole[offset : offset + length]


def test_a_spot_check_compares_with_the_bytes_the_fingerprint_read(tmp_path):
    """Where the stat cannot vouch, a hit reads the source's spots once, for the fingerprint and
    the sibling's spot check both."""
    ckpt = write_version(tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11)
    points: list[tuple[str, str | None]] = []
    with mounted(tmp_path / "mountinfo", {tmp_path: "vfat"}):
        load_toy(ckpt, tmp_path / "cache")
        with injected(recorded(points)):
            model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.cache_hit and not info.converted
    sibling = str(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors")
    assert [subject for name, subject in points if name == "spots"] == [str(ckpt), sibling]
    assert_same_model(model, reference(ckpt))


def test_a_sibling_holds_fp16_of_its_source_at_every_spot_of_a_large_tensor(tmp_path):
    """The spots of a tensor above 1 MiB start anywhere (widened to whole elements, halved in
    the sibling); an element changed at the last one is seen."""
    from support.siblings import resolve_sibling

    tensors = {"big": torch.randn(300_001), "small": torch.randn(7), "i": torch.arange(5)}
    src = save(tensors, tmp_path / "m.safetensors")
    sibling = resolve_sibling(read_header(src), str(tmp_path / "c")).sibling.path
    with open_header(src) as source, open_header(sibling) as sib:
        assert source.by_name["big"].nbytes > _identity.WHOLE_TENSOR_BYTES
        assert _identity.holds_fp16_of(sib, source)
        at = sib.data_start + sib.by_name["big"].end - 2
    with open(writable(sibling), "r+b") as f:
        f.seek(at)
        f.write(b"\x00\x7c")  # +inf in its last element
    with open_header(src) as source, open_header(sibling) as sib:
        assert not _identity.holds_fp16_of(sib, source)


def test_cache_ls_says_a_sibling_whose_values_were_altered_is_damaged(tmp_path, capsys):
    from sa3loader import cli

    ckpt = write_version(
        tmp_path / "model.safetensors", seed=3, mtime_ns=time.time_ns() - 10**11, settle=True
    )
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    writable(sibling).write_bytes(edited_value(sibling, "blocks.0.ff.weight"))
    assert cli.main(["cache", "ls", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["status"] == "damaged sibling"

"""Every read path gives the file's bytes: the read plan, CPU scatter reads, the mapping, the
staging ring to a device (and its fallbacks), ``io="read"``; NaN and the device's own cast; a
network filesystem is read, not mapped."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
import tqdm.auto
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from support.checkpoints import random_like_state, save
from support.child import digest
from support.compare import assert_same_model, bits
from support.faults import (
    faked,
    injected,
    interrupt_main_thread,
    mounted,
    sent_all,
    thread_starts_refused,
)
from support.late_copies import LateCopies
from support.loads import load_toy, make_ckpt, reference_digest
from support.memory import mapped_files
from support.toymodel import build, reference

import sa3loader
from sa3loader import TruncatedFileError, _faults, _io
from sa3loader._dtypes import TORCH_DTYPES
from sa3loader._format import read_header
from sa3loader._io import MAX_GAP_BYTES, plan_chunks, read_into, stream_into
from sa3loader._serial import loaded_openmp


def covered_bytes(chunks, ranges):
    """For each range, the file offsets its pieces cover, in destination order."""
    seen: dict[int, list[int]] = {i: [] for i in range(len(ranges))}
    for chunk in chunks:
        for p in chunk.pieces:
            assert 0 <= p.chunk_offset and p.chunk_offset + p.length <= chunk.length
            assert p.length > 0
            for b in range(p.length):
                seen[p.index].append((p.dest_offset + b, chunk.file_offset + p.chunk_offset + b))
    return seen


@settings(max_examples=300, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 300)), max_size=12),
    chunk_bytes=st.integers(1, 700),
)
def test_plan_covers_every_wanted_byte_once(ranges, chunk_bytes):
    chunks = plan_chunks(ranges, chunk_bytes)
    for chunk in chunks:
        assert 0 < chunk.length <= chunk_bytes
    seen = covered_bytes(chunks, ranges)
    for i, (offset, nbytes) in enumerate(ranges):
        assert sorted(seen[i]) == [(b, offset + b) for b in range(nbytes)]


def test_plan_skips_large_gaps_and_reads_through_small_ones():
    small_gap = [(0, 100), (100 + MAX_GAP_BYTES, 100)]
    assert len(plan_chunks(small_gap, 10 * MAX_GAP_BYTES)) == 1
    large_gap = [(0, 100), (101 + MAX_GAP_BYTES, 100)]
    chunks = plan_chunks(large_gap, 10 * MAX_GAP_BYTES)
    assert [(c.file_offset, c.length) for c in chunks] == [(0, 100), (101 + MAX_GAP_BYTES, 100)]


def test_plan_rejects_a_non_positive_chunk():
    with pytest.raises(ValueError):
        plan_chunks([(0, 1)], 0)


def mixed_file(tmp_path: Path) -> Path:
    """bf16 next to fp16, f32, f64, ints, bool and a zero-element tensor."""
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a.bf16": torch.randn(37, 5, generator=gen).to(torch.bfloat16),
        "b.fp16": torch.randn(129, generator=gen).to(torch.float16),
        "c.f32": torch.randn(8, 33, generator=gen),
        "d.f64": torch.randn(7, generator=gen, dtype=torch.float64),
        "e.i64": torch.arange(11),
        "f.bool": torch.tensor([True, False, True]),
        "g.i8": torch.arange(5, dtype=torch.int8),
        "h.empty": torch.empty(0, 4),
    }
    tensors["c.f32"].view(-1)[:3] = torch.tensor([float("nan"), -0.0, float("inf")])
    path = tmp_path / "mixed.safetensors"
    save_file(tensors, str(path))
    return path


def odd_file(tmp_path: Path) -> Path:
    """Tensors at odd file offsets, as a writer other than safetensors may leave them."""
    data = bytes(range(3)) + torch.arange(6, dtype=torch.float16).numpy().tobytes()
    data += torch.tensor([1.5, -2.25, 3.0]).numpy().tobytes()
    header = {
        "i8": {"dtype": "I8", "shape": [3], "data_offsets": [0, 3]},
        "f16": {"dtype": "F16", "shape": [2, 3], "data_offsets": [3, 15]},
        "f32": {"dtype": "F32", "shape": [3], "data_offsets": [15, 27]},
    }
    raw = json.dumps(header).encode()
    raw += b" " * ((len(raw) % 2) == 0)  # an odd header length: every offset shifts by one
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def load_with(reader, path: Path, **kwargs) -> dict[str, torch.Tensor]:
    header = read_header(path)
    names = [e.name for e in header.entries][::-1]  # not file order on purpose
    dests = [torch.empty(header.by_name[n].shape, dtype=TORCH_DTYPES[header.by_name[n].dtype]) for n in names]
    reader(str(path), dests, [header.data_start + header.by_name[n].begin for n in names], **kwargs)
    return dict(zip(names, dests, strict=True))


def assert_same_tensors(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name, value in ref.items():
        assert ours[name].dtype == value.dtype and ours[name].shape == value.shape, name
        assert torch.equal(bits(ours[name]), bits(value)), name


@pytest.mark.parametrize("reader", [read_into, stream_into], ids=["read_into", "stream_into"])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 64, 1000, 1 << 20])
@pytest.mark.parametrize("make", [mixed_file, odd_file], ids=["mixed", "odd-offsets"])
def test_reads_match_load_file(tmp_path, reader, chunk_bytes, make):
    path = make(tmp_path)
    assert_same_tensors(load_with(reader, path, chunk_bytes=chunk_bytes), load_file(str(path)))


@pytest.mark.parametrize("reader", [read_into, stream_into], ids=["read_into", "stream_into"])
@pytest.mark.parametrize("threads", [0, 1])
def test_a_read_in_many_chunks_where_threads_run_out_reads_on_those_it_has(
    tmp_path, monkeypatch, reader, threads
):
    """Under a pids limit no reader thread starts, or fewer than asked: not a bare RuntimeError,
    the same bytes (none: on the calling thread)."""
    path = mixed_file(tmp_path)
    monkeypatch.setattr(threading.Thread, "start", thread_starts_refused(None, after=threads))
    assert_same_tensors(load_with(reader, path, chunk_bytes=7), load_file(str(path)))


@pytest.mark.parametrize("io", ["mmap", "read"])
def test_a_load_where_no_thread_can_be_had_converts_and_hits_as_ever(tmp_path, monkeypatch, recwarn, io):
    """A service user at its pids limit (RLIMIT_NPROC, a container's pids.max): the prefetch, the
    readers, the converters and the publication cannot start a thread. The first load and the hit
    run on the calling thread and give upstream's model, not a bare RuntimeError, nor a warning
    (a hidden progress bar starts no thread)."""
    ckpt = make_ckpt(tmp_path / "m" / "model.safetensors", dim=64)
    monkeypatch.setattr(threading.Thread, "start", thread_starts_refused(None, after=0))
    # As in a new process: no monitor yet (one that failed to start turns them off for good).
    monkeypatch.setattr(tqdm.auto.tqdm, "monitor", None)
    monkeypatch.setattr(tqdm.auto.tqdm, "monitor_interval", 10)
    monkeypatch.setitem(_faults.tunings, "prefetch_piece_bytes", 4096)  # many pieces to fault in
    monkeypatch.setitem(_faults.tunings, "prefetch_hot_piece_bytes", 4096)
    for converts in (True, False):
        model = load_toy(ckpt, tmp_path / "cache", dim=64, io=io)
        info = sa3loader.last_load_info()
        assert (info.converted, info.cache_hit, info.build) == (converts, not converts, "fast")
        assert digest(model) == reference_digest(ckpt, dim=64)
    assert not [w for w in recwarn if "thread" in str(w.message)]


@pytest.mark.skipif(not loaded_openmp(), reason="no OpenMP runtime loaded (a torch without one)")
def test_the_prefetch_faults_pages_in_with_one_threads_ops(tmp_path):
    """A thread of ours that runs a parallel torch op makes an OpenMP team of its own: threads
    more, and under a pids limit that plain torch survives libgomp ends the process (an attack,
    as a service user). The prefetch's touches run with OpenMP set to one thread, in whichever
    thread runs them."""
    ckpt = make_ckpt(tmp_path / "m" / "model.safetensors", dim=64)
    load_toy(ckpt, tmp_path / "cache", dim=64)  # makes the sibling
    counts: list[list[int]] = []

    def omp_threads() -> None:
        counts.append([lib.omp_get_max_threads() for lib in loaded_openmp()])

    with injected(lambda name, subject=None: omp_threads() if name == "touch" else None):
        load_toy(ckpt, tmp_path / "cache", dim=64)
    assert sa3loader.last_load_info().cache_hit
    assert counts and all(c == [1] * len(c) for c in counts)


@pytest.mark.skipif(not hasattr(signal, "SIGINT") or os.name != "posix", reason="SIGINT to itself: POSIX")
@pytest.mark.parametrize("reader", [read_into, stream_into], ids=["read_into", "stream_into"])
def test_ctrl_c_during_a_read_returns_only_once_no_thread_reads(tmp_path, monkeypatch, ctrl_c_raises, reader):
    """Two Ctrl-Cs: the first in the wait for a read, the second in the wait for the reader
    threads. The read returns (raising) only once none reads: the staging ring (every device
    load's) or the tensors are freed after, and a late read once wrote into memory the program
    had reused (an attack; ``Thread.join`` cut short on CPython < 3.13)."""
    path = mixed_file(tmp_path)
    returned = threading.Event()
    late: list[int] = []
    real_preadv = os.preadv

    def slow_preadv(fd, buffers, offset, *flags):  # a slow disk: each read waits, then reads
        time.sleep(0.05)
        late.extend([offset] if returned.is_set() else [])  # into memory given back by now
        return real_preadv(fd, buffers, offset, *flags)

    monkeypatch.setattr(os, "preadv", slow_preadv)
    sender = interrupt_main_thread(after=0.12, times=2, gap=0.03)
    try:
        with pytest.raises(KeyboardInterrupt):
            load_with(reader, path, chunk_bytes=64, **({"slots": 2} if reader is stream_into else {}))
        returned.set()
    finally:
        sent_all(sender)
    time.sleep(0.3)
    assert late == []


@pytest.mark.parametrize("reader", [read_into, stream_into], ids=["read_into", "stream_into"])
def test_skipped_tensors_between_wanted_ones(tmp_path, reader):
    """Unwanted bytes inside a chunk are read and dropped, never written anywhere."""
    path = mixed_file(tmp_path)
    header = read_header(path)
    wanted = [e for e in header.entries if e.nbytes][::2]
    dests = [torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype]) for e in wanted]
    reader(str(path), dests, [header.data_start + e.begin for e in wanted], chunk_bytes=1 << 20)
    ref = load_file(str(path))
    assert_same_tensors(
        {e.name: d for e, d in zip(wanted, dests, strict=True)}, {e.name: ref[e.name] for e in wanted}
    )


def test_short_reads_are_completed(tmp_path, monkeypatch):
    path = mixed_file(tmp_path)
    real = os.preadv

    def stingy(fd, buffers, offset):  # at most 5 bytes and only from the first buffer
        return real(fd, [memoryview(buffers[0])[:5]], offset)

    monkeypatch.setattr(os, "preadv", stingy)
    assert_same_tensors(load_with(read_into, path, chunk_bytes=300), load_file(str(path)))


def test_without_preadv_uses_positioned_reads(tmp_path, monkeypatch):
    """Older macOS Python builds have no preadv: the pread fallback gives the same bytes, on threads."""
    path = mixed_file(tmp_path)
    monkeypatch.delattr(os, "preadv")
    assert_same_tensors(load_with(read_into, path, chunk_bytes=50, threads=4), load_file(str(path)))


@pytest.mark.parametrize("slots", [1, 2, 3])
def test_ring_waits_for_late_copies_before_refilling_and_returning(tmp_path, slots):
    """The ring's protocol with asynchronous copies, which a CPU run never has otherwise."""
    path = mixed_file(tmp_path)
    ours = load_with(stream_into, path, chunk_bytes=64, slots=slots, copies=LateCopies())
    assert_same_tensors(ours, load_file(str(path)))


def test_more_pieces_than_the_iovec_limit(tmp_path, monkeypatch):
    monkeypatch.setitem(_faults.tunings, "iov_max", 3)
    tensors = {f"t{i:03d}": torch.full((i % 5,), float(i)) for i in range(50)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path))
    assert_same_tensors(load_with(read_into, path, chunk_bytes=1 << 20), load_file(str(path)))


def test_truncated_file_raises(tmp_path):
    path = mixed_file(tmp_path)
    header = read_header(path)
    entry = max(header.entries, key=lambda e: e.end)
    dest = torch.empty(entry.shape, dtype=TORCH_DTYPES[entry.dtype])
    with open(path, "r+b") as f:
        f.truncate(header.data_start + entry.end - 1)
    for reader in (read_into, stream_into):
        with pytest.raises(TruncatedFileError, match="mixed.safetensors") as err:
            reader(str(path), [dest], [header.data_start + entry.begin])
        assert isinstance(err.value, EOFError) and isinstance(err.value, ValueError)


def test_staging_is_bounded_and_falls_back_to_pageable(tmp_path):
    tensors = {f"w{i}": torch.randn(1000) for i in range(20)}  # 80 kB
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    dests = [torch.empty(1000) for _ in header.entries]
    stats = stream_into(
        str(path), dests, [header.data_start + e.begin for e in header.entries], chunk_bytes=4096, slots=3
    )
    assert stats.chunks == 20 and stats.bytes == 80_000
    assert stats.staging_bytes <= 3 * 4096
    for entry, dest in zip(header.entries, dests, strict=True):
        assert torch.equal(dest, tensors[entry.name])
    if not torch.cuda.is_available():
        ring, pinned = _io._staging(2, 16, pin=True)
        assert not pinned and not any(t.is_pinned() for t in ring)


def test_large_destinations_read_right_with_huge_page_advice(tmp_path):
    """Tensors of 32 MB and more get transparent huge pages before the read fills them."""
    big = torch.randn(9 * 1024 * 1024 + 7)  # 36 MB, not a multiple of 2 MB
    path = tmp_path / "big.safetensors"
    save_file({"big": big, "small": torch.arange(5)}, str(path))
    header = read_header(path)
    dests = [torch.empty_like(big), torch.empty(5, dtype=torch.int64)]
    read_into(str(path), dests, [header.data_start + header.by_name[n].begin for n in ("big", "small")])
    assert torch.equal(dests[0].view(torch.int32), big.view(torch.int32))
    assert torch.equal(dests[1], torch.arange(5))


@pytest.mark.parametrize("cores", [1, 2, 3, 5, 6, 7, 8, 9, 10, 14, 16, 64])
def test_the_ring_pins_what_it_reports(cores):
    """torch's pinned cache rounds each block up to a power of two and keeps it: slots are
    powers of two, so the ring's figure is what is pinned, and the whole stays within 256 MB."""
    slots, slot_bytes = _io.ring_shape(cores)
    assert 2 <= slots <= _io.MAX_RING_SLOTS
    assert _io.pinned_block_bytes(slot_bytes) == slot_bytes
    assert slots * slot_bytes <= _io.RING_BYTES < slots * slot_bytes * 2


def test_pinned_blocks_are_the_next_power_of_two():
    assert [_io.pinned_block_bytes(n) for n in (1, 2, 3, 4096, 4097, 100 << 20)] == [
        1,
        2,
        4,
        4096,
        8192,
        128 << 20,
    ]


class SelectingCopies(_io.DeviceCopies):
    """Records, per thread, the order of select() and wait() calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.lock = threading.Lock()

    def select(self) -> None:
        with self.lock:
            self.calls.append((threading.get_ident(), "select"))

    def wait(self, slot: int) -> None:
        with self.lock:
            self.calls.append((threading.get_ident(), "wait"))


def test_reader_threads_select_the_device_before_any_wait(tmp_path):
    """A thread's current CUDA device is its own: each reader makes the target current first."""
    path = mixed_file(tmp_path)
    header = read_header(path)
    dests = [torch.empty(e.torch_shape, dtype=TORCH_DTYPES[e.dtype]) for e in header.entries]
    copies = SelectingCopies()
    stream_into(
        str(path), dests, [header.data_start + e.begin for e in header.entries], chunk_bytes=64, copies=copies
    )
    by_thread: dict[int, list[str]] = {}
    for thread, call in copies.calls:
        by_thread.setdefault(thread, []).append(call)
    assert by_thread and all(
        calls[0] == "select" and calls.count("select") == 1 for calls in by_thread.values()
    )


def test_sa3loader_pin_0_stages_in_pageable_memory(monkeypatch):
    from sa3loader import _config

    assert _config.settings().pin
    monkeypatch.setenv("SA3LOADER_PIN", "0")
    assert not _config.settings().pin


class StickyError(RuntimeError):
    """As a sticky CUDA error surfaces: at the stream's synchronize, after every copy was sent."""


class FailingFinish(_io.DeviceCopies):
    def finish(self) -> None:
        raise StickyError("CUDA error: an illegal memory access was encountered")


def open_descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_failing_finish_still_closes_the_file_and_gives_the_ring_back(tmp_path, monkeypatch):
    """The ring is faked pinned, so that giving it back is seen; the error passes through."""
    path = mixed_file(tmp_path)
    header = read_header(path)
    dests = [torch.empty(e.torch_shape, dtype=TORCH_DTYPES[e.dtype]) for e in header.entries]
    released = []
    before = open_descriptors()
    with (
        faked(pinned=lambda subject, real: True),
        injected(lambda name, subject=None: released.append(True) if name == "release_pinned" else None),
        pytest.raises(StickyError, match="illegal memory access"),
    ):
        stream_into(
            str(path),
            dests,
            [header.data_start + e.begin for e in header.entries],
            chunk_bytes=64,
            copies=FailingFinish(),
        )
    assert open_descriptors() == before and released == [True]


def test_a_failing_finish_in_a_load_closes_every_descriptor(tmp_path, monkeypatch):
    """Through a whole load on the streaming path (forced on the CPU): the source's and the
    sibling's descriptors are closed when the device's error ends the load."""
    from support.loads import load_toy, make_ckpt

    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache")  # the sibling exists: the failing load is a hit
    before = open_descriptors()
    with (
        faked(streams_to=lambda device, real: True, device_copies=lambda device, real: FailingFinish()),
        pytest.raises(StickyError),
    ):
        load_toy(ckpt, tmp_path / "cache")
    assert open_descriptors() == before


@pytest.mark.parametrize(
    ("fstype", "io", "expected"),
    [
        ("nfs4", None, "read"),
        ("fuse.sshfs", None, "read"),
        ("cifs", "mmap", "mmap"),
        ("ext4", None, "mmap"),
    ],
)
def test_network_filesystems_are_read_not_mapped(ckpt, tmp_path, monkeypatch, fstype, io, expected):
    """mmap on NFS/SMB/FUSE is slow and dies with SIGBUS on a server hiccup: read there, unless asked."""
    from sa3loader._host import network_filesystem

    with mounted(tmp_path / "mountinfo", {tmp_path: fstype}):
        assert network_filesystem(str(ckpt)) == (None if fstype == "ext4" else fstype)
        for _ in range(2):  # conversion, then the hit
            model = load_toy(ckpt, tmp_path / "cache", io=io)
    assert sa3loader.last_load_info().cache_hit and sa3loader.last_load_info().io == expected
    assert (str(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors") in mapped_files()) == (
        expected == "mmap"
    )
    assert_same_model(model, reference(ckpt))


def test_io_read_never_maps_a_file(tmp_path, monkeypatch):
    """Where mappings are unreliable (SIGBUS on truncation, Windows commit limits)."""
    import mmap

    def no_mmap(*args, **kwargs):
        raise AssertionError("io='read' mapped a file")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    for expect_hit in (False, True):
        torch.manual_seed(0)
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=build, io="read"
        )
        info = sa3loader.last_load_info()
        assert (info.cache_hit, info.build, info.io) == (expect_hit, "fast", "read")
        assert_same_model(model, reference(ckpt))


def test_nan_tensors_are_cast_again_from_the_source(tmp_path):
    """CUDA casts NaN to the canonical NaN, the CPU keeps its payload: tensors with a NaN
    are recast on the device from fp32, the others keep the sibling's bytes."""
    from sa3loader._format import read_header
    from sa3loader._values import Values, _recast_nans_on_device

    payload_nan = torch.tensor([1.0, 2.0], dtype=torch.float32)
    payload_nan.view(torch.int32)[1] = 0x7FC12345  # a NaN with payload bits
    src = save({"nan": payload_nan, "plain": torch.tensor([3.0, 4.0])}, tmp_path / "src.safetensors")
    values = Values(read_header(src), None, half=True, io="read")
    stale = [torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16)]
    stale[0].view(torch.int16)[1] = 0x7FFF  # a NaN, but not the bits a cast of this source gives
    _recast_nans_on_device(values, ["nan", "plain"], stale, torch.device("cpu"))
    assert torch.equal(bits(stale[0]), bits(payload_nan.to(torch.float16)))
    assert torch.equal(stale[1], torch.zeros(2, dtype=torch.float16))  # no NaN: untouched


@pytest.mark.parametrize(
    ("device", "from_sibling"), [("cpu", True), ("cuda", True), ("mps", False), ("xpu", False)]
)
def test_the_siblings_fp16_is_final_only_where_the_device_casts_as_the_cpu_does(
    tmp_path, device, from_sibling
):
    """On other devices upstream's own cast runs there (fp32 moved, then cast): nothing assumes
    their rounding of subnormals matches the CPU's."""
    from support.siblings import resolve_sibling

    from sa3loader._format import read_header
    from sa3loader._values import Values

    src = save({"w": torch.tensor([1.0, 3e-6]), "i": torch.arange(2)}, tmp_path / "model.safetensors")
    source = read_header(src)
    sibling = resolve_sibling(source, str(tmp_path / "c")).sibling
    values = Values(source, sibling, half=True)
    target = torch.device(device)
    assert (values._as_is("w", torch.float32, target) is sibling) == from_sibling
    assert values._as_is("i", torch.int64, target) is sibling  # other dtypes: the same bytes everywhere


def test_touching_a_range_of_a_mapping_maps_every_page_of_it(tmp_path):
    """The early prefetch's touch: every page of the range is mapped once it returns, an
    unaligned start and end included. (The kernel's MADV_POPULATE_READ was tried instead: 2.5x
    slower than these reads on a sibling as the converter leaves it in the page cache.)"""
    import mmap

    from support.memory import rss_file

    from sa3loader._io import touch_pages

    path = tmp_path / "f"
    path.write_bytes(os.urandom(16 << 20))  # in the page cache: mapping it reads nothing
    start, length = 5000, (12 << 20) + 123
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        view = torch.frombuffer(mapped, dtype=torch.uint8)
        before = rss_file()
        touch_pages(view, start, length)
        assert rss_file() - before >= length - mmap.PAGESIZE
        del view


@pytest.mark.parametrize(("cores", "hot"), [(1, 1), (2, 1), (3, 2), (64, 4)])
def test_the_prefetch_leaves_the_build_a_core_only_where_every_page_is_in_the_page_cache(
    tmp_path, monkeypatch, cores, hot
):
    """Faulting in pages already in the page cache is CPU work: the prefetch takes the cores
    the build leaves (at least one, at most PREFETCH_THREADS). A chunk still on disk, or a page
    cache that cannot be asked, keeps PREFETCH_THREADS (each waits on the disk)."""
    from support.memory import pages_in_page_cache

    from sa3loader._io import PREFETCH_THREADS, in_page_cache, prefetch_threads

    assert PREFETCH_THREADS == 4
    read_end, write_end = os.pipe()  # a descriptor whose page cache cannot be asked
    try:
        assert not in_page_cache(read_end, 0)
    finally:
        os.close(read_end)
        os.close(write_end)
    path = tmp_path / "f"
    path.write_bytes(os.urandom(8 << 20))
    chunks = plan_chunks([(0, 8 << 20)], 1 << 20)
    samples = [c.file_offset + c.length // 2 for c in chunks]

    def dropped(kept: list[int]) -> int:
        """A descriptor of the file, out of the page cache but the pages of ``kept``."""
        fd = os.open(path, os.O_RDONLY)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # a read brings in its page alone
        for _ in range(20):  # a page the kernel holds for a moment stays: drop it again
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            for at in kept:
                os.pread(fd, 1, at)
            if pages_in_page_cache(path, samples) == [at in kept for at in samples]:
                return fd
        os.close(fd)
        pytest.skip("this filesystem keeps the pages DONTNEED drops (tmpfs)")

    fd = os.open(path, os.O_RDONLY)
    try:
        assert prefetch_threads(fd, chunks, cores) == hot
        with monkeypatch.context() as without_nowait:
            without_nowait.delattr(os, "RWF_NOWAIT")
            assert prefetch_threads(fd, chunks, cores) == PREFETCH_THREADS
    finally:
        os.close(fd)
    for kept in (samples[:4] + samples[5:], []):  # one chunk on disk; all of them
        fd = dropped(kept)
        try:
            assert prefetch_threads(fd, chunks, cores) == PREFETCH_THREADS
        finally:
            os.close(fd)


@pytest.mark.parametrize(
    ("cores", "askable", "pieces"), [(2, True, 4), (1, True, 4), (64, True, 16), (2, False, 16)]
)
def test_a_prefetch_of_pages_in_the_page_cache_beside_the_build_touches_few_long_pieces(
    tmp_path, monkeypatch, cores, askable, pieces
):
    """Each piece takes the GIL back from the build's thread (up to 5 ms each: the DiT hit's
    prefetch ran 130-200 ms in 64 MB pieces). Pages all in the page cache, on the cores the build
    leaves: pieces of ``prefetch_hot_piece_bytes``; else of ``prefetch_piece_bytes``."""
    from sa3loader._io import MappedFile

    path = save({"w": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "model.safetensors")
    header = read_header(path)
    entry = header.entries[0]
    assert entry.nbytes == 4 << 20
    monkeypatch.setitem(_faults.tunings, "prefetch_piece_bytes", 256 << 10)
    monkeypatch.setitem(_faults.tunings, "prefetch_hot_piece_bytes", 1 << 20)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    if not askable:
        monkeypatch.delattr(os, "RWF_NOWAIT")
    touched = []
    monkeypatch.setattr(
        _faults, "hook", lambda name, subject=None: touched.append(subject) if name == "touch" else None
    )
    MappedFile(header).prefetch([header.data_start + entry.begin], [entry.nbytes])
    assert len(touched) == pieces, touched


def test_a_prefetch_whose_file_name_is_gone_still_faults_its_pages_in(tmp_path):
    """The page cache is asked through the file's name where no descriptor is open: with the
    name gone, the prefetch runs as for pages on disk, and still maps every page."""
    from support.memory import rss_file

    from sa3loader._io import MappedFile

    path = save({"w": torch.arange(1 << 20, dtype=torch.float32)}, tmp_path / "model.safetensors")
    header = read_header(path)
    assert header.handle is None
    mapped = MappedFile(header)
    os.unlink(path)
    entry = header.entries[0]
    before = rss_file()
    mapped.prefetch([header.data_start + entry.begin], [entry.nbytes])
    assert rss_file() - before >= entry.nbytes - 2 * 4096


WITHOUT_NUMPY = """
import json, sys
sys.modules["numpy"] = None  # `import numpy` now fails, as where it is not installed
import torch
from support.loads import load_toy
from sa3loader._dtypes import TORCH_DTYPES
from sa3loader._format import read_header
from sa3loader._io import read_into, stream_into

ckpt, cache = sys.argv[1:3]
seen = {}
for io in ("read", "mmap"):  # the first converts and reads its sibling; the second maps it
    model = load_toy(ckpt, cache, io=io)
    seen[io] = {k: v.view(torch.uint8).reshape(-1).tolist() for k, v in model.state_dict().items()}
header = read_header(ckpt)
for reader in (read_into, stream_into):  # the CPU scatter reads; the staging ring
    dests = [torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype]) for e in header.entries]
    reader(ckpt, dests, [header.data_start + e.begin for e in header.entries], chunk_bytes=256)
    named = zip(header.entries, dests)
    seen[reader.__name__] = {e.name: d.view(torch.uint8).reshape(-1).tolist() for e, d in named}
print(json.dumps(seen))
"""


def test_loads_and_reads_need_no_numpy(tmp_path):
    """numpy is not a dependency: a conversion, a read load, a mapped load and both readers run
    where importing it fails, and give the same bytes as where it is installed."""
    import subprocess
    import sys

    from support.loads import make_ckpt
    from support.processes import child_env

    ckpt = make_ckpt(tmp_path / "m.safetensors")
    run = subprocess.run(
        [sys.executable, "-c", WITHOUT_NUMPY, str(ckpt), str(tmp_path / "c")],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    seen = json.loads(run.stdout)
    expected = {k: v.view(torch.uint8).reshape(-1).tolist() for k, v in reference(ckpt).state_dict().items()}
    assert seen["read"] == expected and seen["mmap"] == expected
    source = {k: v.view(torch.uint8).reshape(-1).tolist() for k, v in load_file(str(ckpt)).items()}
    assert seen["read_into"] == source and seen["stream_into"] == source


def test_reads_go_only_into_contiguous_cpu_tensors(tmp_path):
    """A strided tensor's bytes are not one run from its data pointer: a read there would land
    in the wrong elements (or past the storage), so it is refused."""
    matrix = torch.zeros(4, 4)
    with pytest.raises(ValueError, match="contiguous CPU"):
        _io.writable_bytes(matrix.t())
    path = mixed_file(tmp_path)
    with pytest.raises(ValueError, match="contiguous"):  # the ring's copies would land in a copy
        stream_into(str(path), [torch.zeros(4, 4).t()], [read_header(path).data_start])
    view = _io.writable_bytes(matrix[1])
    view[:4] = struct.pack("<f", 2.5)
    assert matrix[1, 0] == 2.5 and matrix.count_nonzero() == 1
    assert len(_io.writable_bytes(torch.empty(0))) == 0

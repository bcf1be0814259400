"""The converter's two speed paths give the same answers as the plain ones: the fp16 range
count read from the bits (``_range_report.count_range``), and each worker's torch ops kept on
its own thread (``_serial``) without touching the thread count of any other thread."""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from support.faults import faked, injected, tuned

from sa3loader import _convert, _host, _identity, _new_file
from sa3loader._format import DTYPE_BITS, layout, read_header
from sa3loader._range_report import count_cast_range, count_range
from sa3loader._records import ConversionResult, SourceIdentity
from sa3loader._serial import loaded_openmp, serial_ops

SPECIAL = [
    0.0,
    -0.0,
    float("nan"),
    float("inf"),
    -float("inf"),
    65504.0,
    65520.0,
    -1e6,
    1e-8,
    -3e-8,
    6e-8,
    1e-45,
]


def expected_counts(src: torch.Tensor) -> dict[str, int]:
    dst = src.half()
    return {
        "inf": int((dst.isinf() & src.isfinite()).sum()),
        "zero": int(((dst == 0) & (src != 0)).sum()),
    }


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.floats(width=32), st.sampled_from(SPECIAL)), min_size=1, max_size=64))
def test_range_count_from_bits_equals_the_counts_of_the_cast(values):
    src = torch.tensor(values, dtype=torch.float32)
    counts = {"inf": 3, "zero": 5}  # what earlier pieces counted: added to
    count_range(src, src.half(), counts, torch.empty(len(values), dtype=torch.int16))
    expected = expected_counts(src)
    assert counts == {"inf": 3 + expected["inf"], "zero": 5 + expected["zero"]}


@pytest.mark.parametrize(
    ("values", "inf", "zero"),
    [
        ([-0.0, 1.0], 0, 0),  # a zero of the source's own, negative: no flush
        ([1e-8, 1.0], 0, 1),  # flushed (positive)
        ([-1e-8, -0.0], 0, 1),  # flushed to -0, beside the source's own -0
        ([float("nan"), 2.0], 0, 0),  # NaN's bits are above inf's: counted, and none is inf
        ([float("inf"), 7e4], 1, 0),  # the source's inf is not an overflow; 70000 is
        ([65504.0, 1.0], 0, 0),  # fp16's largest: kept
    ],
)
def test_range_count_edges(values, inf, zero):
    src = torch.tensor(values, dtype=torch.float32)
    counts = {"inf": 0, "zero": 0}
    count_range(src, src.half(), counts, torch.empty(len(values), dtype=torch.int16))
    assert counts == {"inf": inf, "zero": zero}


needs_openmp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or "OpenMP" not in torch.__config__.parallel_info(),
    reason="torch runs its ops on OpenMP here only on Linux builds with OpenMP",
)


def convert_saved(tensors: dict[str, torch.Tensor], folder: Path) -> tuple[ConversionResult, Path]:
    """``tensors`` saved by safetensors, then converted by sa3loader: the result and the sibling."""
    src, out = folder / "model.safetensors", folder / "out.safetensors"
    save_file(tensors, str(src))
    header = read_header(src)
    identity = SourceIdentity(size=1, mtime_ns=2, header_sha256="h", inode=0, device=0, ctime_ns=0)
    return _convert.convert(header, str(out), _identity.sibling_metadata(header, identity, "fp")), out


def not_in_place(subject, real):  # the new file written with pwrite, wherever it is
    return False


def in_thread(work):
    seen = []
    thread = threading.Thread(target=lambda: seen.append(work()))
    thread.start()
    thread.join()
    return seen[0]


@needs_openmp
def test_openmp_runtime_torch_loaded_is_found():
    assert loaded_openmp(), "torch's OpenMP runtime is mapped into this process"


@needs_openmp
def test_serial_ops_holds_for_the_calling_thread_only_and_is_put_back():
    if torch.get_num_threads() < 2:
        pytest.skip("one thread already: nothing to see")
    # As a user who set it: torch then sets each thread's count at its first op (from this).
    torch.set_num_threads(torch.get_num_threads())
    before = torch.get_num_threads()
    runtimes = loaded_openmp()

    def worker():
        with serial_ops(runtimes):
            inside = torch.get_num_threads()
            other = in_thread(torch.get_num_threads)  # a thread started meanwhile
        return inside, other, torch.get_num_threads()

    assert in_thread(worker) == (1, before, before)
    assert torch.get_num_threads() == before


@pytest.mark.filterwarnings("error")  # torch warns where a buffer is the wrong size
def test_a_conversion_leaves_every_threads_count_as_it_was(tmp_path):
    torch.set_num_threads(torch.get_num_threads())  # as a user who set it would have
    before = torch.get_num_threads(), in_thread(torch.get_num_threads)
    convert_saved({"w": torch.randn(300_000), "b": torch.randn(5)}, tmp_path)
    assert (torch.get_num_threads(), in_thread(torch.get_num_threads)) == before


class RuntimeSpy:
    """An OpenMP runtime's two calls, recorded with the thread that made them."""

    def __init__(self) -> None:
        self.calls: list[tuple[threading.Thread, str, int | None]] = []

    def omp_get_max_threads(self) -> int:
        self.calls.append((threading.current_thread(), "get", None))
        return 5

    def omp_set_num_threads(self, count: int) -> None:
        self.calls.append((threading.current_thread(), "set", count))


def test_each_worker_runs_its_ops_on_its_own_thread_and_puts_the_count_back(tmp_path):
    spy = RuntimeSpy()
    with faked(openmp=lambda subject, real: [spy]):
        convert_saved({"w": torch.randn(300_000)}, tmp_path)
    workers = {thread for thread, _, _ in spy.calls}
    assert len(workers) == _convert.WORKERS and all(t.name == "sa3loader-convert" for t in workers)
    for worker in workers:
        assert [(call, n) for t, call, n in spy.calls if t is worker] == [
            ("get", None),
            ("set", 1),
            ("set", 5),
        ]


def test_each_aligned_window_of_the_sibling_is_written_with_one_call(tmp_path, monkeypatch):
    """Where the new file is not mapped: pages a write leaves in the page cache are in folios as
    large and as aligned as the write, so a later mapping of the sibling faults in a folio at
    once (benchmarks/README.md)."""
    tensors = {"w": torch.randn(40 * 1024), "i": torch.arange(3001, dtype=torch.int64)}
    writes: list[tuple[int, int]] = []
    real_pwrite = os.pwrite
    monkeypatch.setattr(
        os, "pwrite", lambda fd, data, at: writes.append((at, len(data))) or real_pwrite(fd, data, at)
    )
    window = 8192
    # pieces of 4 KiB read: 2 KiB of fp16 written
    with tuned(piece_elements=1024, stripe_bytes=window), faked(writes_in_place=not_in_place):
        result, out = convert_saved(tensors, tmp_path)
    data_start = 8 + struct.unpack("<Q", out.read_bytes()[:8])[0]
    # Every window the data touches, once, cut at the data's start and end: 3001 x 8 bytes, then 40 KiB x 2.
    edges = [data_start, *range((data_start // window + 1) * window, result.size, window), result.size]
    assert sorted(writes)[1:] == [(a, b - a) for a, b in zip(edges, edges[1:], strict=False)]
    assert result.size == data_start + 3001 * 8 + 40 * 1024 * 2


def test_each_window_is_read_from_the_new_file_before_it_is_written(tmp_path, monkeypatch):
    """A read makes the new file's pages with no lock held, workers in parallel; the write then
    fills pages that exist (benchmarks/README.md: a write makes them one worker at a time)."""
    tensors = {"w": torch.randn(40 * 1024), "i": torch.arange(3001, dtype=torch.int64)}
    calls: list[tuple[str, int, int, int]] = []
    real_pwrite, real_preadv = os.pwrite, os.preadv
    monkeypatch.setattr(
        os, "pwrite", lambda fd, data, at: calls.append(("w", fd, at, len(data))) or real_pwrite(fd, data, at)
    )
    monkeypatch.setattr(
        os,
        "preadv",
        lambda fd, views, at, *flags: (
            calls.append(("r", fd, at, sum(len(v) for v in views))) or real_preadv(fd, views, at, *flags)
        ),
    )
    with tuned(piece_elements=1024, stripe_bytes=8192), faked(writes_in_place=not_in_place):
        convert_saved(tensors, tmp_path)
    writes = [c for c in calls if c[0] == "w"][1:]  # the header's first
    assert len(writes) > 3
    for write in writes:
        read = ("r", *write[1:])
        assert read in calls[: calls.index(write)], write


def test_a_python_without_preadv_converts_the_same_bytes(tmp_path, monkeypatch):
    """Python for macOS < 11 has ``pread`` only: the read before each write is for speed alone."""
    tensors = {"w": torch.randn(40 * 1024), "i": torch.arange(3001, dtype=torch.int64)}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with tuned(piece_elements=1024, stripe_bytes=8192), faked(writes_in_place=not_in_place):
        _, expected = convert_saved(tensors, tmp_path / "a")
        monkeypatch.delattr(os, "preadv")
        _, out = convert_saved(tensors, tmp_path / "b")
    assert out.read_bytes() == expected.read_bytes()


def cast_chain_counts(src: torch.Tensor, chain: tuple[torch.dtype, ...]) -> dict[str, int]:
    """What upstream's casts make of ``src``: through ``chain``, then to fp16."""
    dst = src
    for step in (*chain, torch.float16):
        dst = dst.to(step)
    wide = src.to(torch.float64)
    return {
        "inf": int((dst.isinf() & wide.isfinite()).sum()),
        "zero": int(((dst == 0) & (wide != 0)).sum()),
    }


@pytest.mark.parametrize(
    ("dtype", "chain", "values"),
    [
        ("BF16", (), [1e5, -7e4, 1e-9, -0.0, 0.0, float("inf"), float("nan"), 3.0, 65504.0]),
        ("F64", (torch.float32,), [1e5, 1e39, -1e-9, 1e-46, -0.0, float("-inf"), float("nan"), 2.5]),
    ],
)
def test_cast_range_counts_what_the_loads_casts_make(dtype, chain, values):
    source_dtype = {"BF16": torch.bfloat16, "F64": torch.float64}[dtype]
    src = torch.tensor(values, dtype=source_dtype)
    counts = {"inf": 3, "zero": 5}  # what earlier pieces counted: added to
    count_cast_range(dtype, memoryview(bytearray(src.view(torch.uint8).tolist())), counts)
    expected = cast_chain_counts(src, chain)
    assert counts == {"inf": 3 + expected["inf"], "zero": 5 + expected["zero"]}
    assert expected["inf"] >= 2 and expected["zero"] >= 1


@pytest.mark.skipif(not hasattr(torch, "float8_e8m0fnu"), reason="this torch has no float8_e8m0fnu")
def test_cast_range_counts_float8_e8m0_through_float32():
    src = torch.tensor([2.0**100, 2.0**-100, 1.0, 2.0**15, 2.0**16], dtype=torch.float32).to(
        torch.float8_e8m0fnu
    )
    counts = {"inf": 0, "zero": 0}
    count_cast_range("F8_E8M0", memoryview(bytearray(src.view(torch.uint8).tolist())), counts)
    assert counts == cast_chain_counts(src.to(torch.float32), ()) == {"inf": 2, "zero": 1}


def test_cast_range_of_an_empty_piece_counts_nothing():
    counts = {"inf": 0, "zero": 0}
    count_cast_range("BF16", memoryview(b""), counts)
    assert counts == {"inf": 0, "zero": 0}


WHOLE_BYTE_DTYPES = sorted(d for d, bits in DTYPE_BITS.items() if bits % 8 == 0)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(WHOLE_BYTE_DTYPES), st.lists(st.integers(0, 7), max_size=3)),
        max_size=12,
    ),
    st.text(max_size=9),
)
def test_the_layout_puts_every_tensor_at_a_multiple_of_its_element_size(tensors, note):
    """What the converter's windows rely on: a window's end (a multiple of 8 in the file) cuts
    no element, and an fp16 piece's float16 view starts at an even offset."""
    named = [(f"t{i}", dtype, tuple(shape)) for i, (dtype, shape) in enumerate(tensors)]
    prefix, entries = layout(named, {"note": note} if note else {})
    assert len(prefix) % 8 == 0  # the data section starts 8-aligned
    for entry in entries:
        assert entry.begin % (DTYPE_BITS[entry.dtype] // 8) == 0, entry


# The cast straight into the new file's mapping (``_new_file.output_mapping``).

IN_PLACE_FILESYSTEMS = {"ext4", "xfs", "tmpfs"}


def writes_in_place_here(folder: Path) -> bool:
    mount = _host.mount_of(str(folder))
    return mount is not None and mount.fstype in IN_PLACE_FILESYSTEMS


def mapped_for_writing(points: list[bool]):
    """A hook: at each stripe a worker takes, whether a temp file is mapped shared and writable."""

    def hook(name, subject=None):
        if name == "stripe":
            maps = Path("/proc/self/maps").read_text().splitlines()
            points.append(any(" rw-s " in line and ".incomplete-" in line for line in maps))

    return hook


MIXED = {
    "f32": torch.tensor(SPECIAL * 700, dtype=torch.float32),
    "odd": torch.randn(4099),
    "f16": torch.randn(3001).half(),
    "bf16": torch.tensor([1e5, 1e-9, 3.0] * 999, dtype=torch.bfloat16),
    "f64": torch.tensor([1e39, -1e-46, 2.5] * 501, dtype=torch.float64),
    "i64": torch.arange(3001, dtype=torch.int64),
    "u8": torch.arange(255, dtype=torch.uint8),
    "empty": torch.zeros(0, 7),
}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the new file is mapped on Linux only")
def test_a_cast_into_the_mapped_file_writes_the_bytes_and_counts_of_the_buffered_one(tmp_path):
    if not writes_in_place_here(tmp_path):
        pytest.skip(f"{tmp_path} is on none of {sorted(IN_PLACE_FILESYSTEMS)}: never mapped there")
    (tmp_path / "mapped").mkdir()
    (tmp_path / "buffered").mkdir()
    mapped: list[bool] = []
    with tuned(piece_elements=1024, stripe_bytes=8192):
        with injected(mapped_for_writing(mapped)):
            result, out = convert_saved(MIXED, tmp_path / "mapped")
        with faked(writes_in_place=not_in_place):
            expected_result, expected = convert_saved(MIXED, tmp_path / "buffered")
    assert len(mapped) > 3 and all(mapped), "every stripe cast into the mapped file"
    assert out.read_bytes() == expected.read_bytes()
    counts = (result.overflow_to_inf, result.flushed_to_zero)
    assert counts == (expected_result.overflow_to_inf, expected_result.flushed_to_zero)
    assert min(counts) > 0
    assert read_header(out).entries == read_header(expected).entries


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the new file is mapped on Linux only")
@pytest.mark.parametrize(
    ("mode", "taken", "mapped"),
    [
        (0o600, True, True),
        (0o440, True, True),  # read-only for everyone: the descriptor still writes
        (0o644, True, True),
        (0o620, True, False),  # its group could open it and cut it short under the mapping
        (0o602, True, False),
        (0o600, None, False),  # no fallocate: a write fault may find no block
        (0o600, False, False),  # ENOSPC
    ],
)
def test_the_new_file_is_mapped_only_where_no_write_fault_can_fail(tmp_path, mode, taken, mapped):
    if not writes_in_place_here(tmp_path):
        pytest.skip(f"{tmp_path} is on none of {sorted(IN_PLACE_FILESYSTEMS)}: never mapped there")
    fd = os.open(tmp_path / "new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, 4096)  # the size fallocate gives it
        os.fchmod(fd, mode)
        assert _new_file.mappable(fd, taken) is mapped
        with _new_file.output_mapping(fd, 4096, taken) as view:
            assert (view is not None) is mapped
    finally:
        os.close(fd)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="statfs' type numbers are Linux's")
def test_the_filesystem_type_is_read_from_the_open_file(tmp_path):
    fd = os.open(tmp_path / "new", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert _new_file.mappable(fd, True) is writes_in_place_here(tmp_path)
    finally:
        os.close(fd)
    with open("/proc/self/status", "rb") as proc:  # procfs: no block behind any byte
        assert not _new_file.mappable(proc.fileno(), True)


def test_space_not_taken_is_told_from_a_full_disk():
    def failing(code):
        def fallocate(*args):
            ctypes.set_errno(code)
            return -1

        return lambda subject, real: fallocate

    with faked(fallocate=failing(errno.ENOSPC)):
        assert _new_file.take_space(0, 10) is False
    with faked(fallocate=failing(errno.EOPNOTSUPP)):
        assert _new_file.take_space(0, 10) is None
    with faked(fallocate=lambda subject, real: None):
        assert _new_file.take_space(0, 10) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the new file is mapped on Linux only")
def test_a_sibling_its_group_may_write_is_written_without_a_mapping(tmp_path):
    """``convert`` (not a load: loads write read-only siblings) gives the sibling the source's
    bits, write bits too: another user could cut it short under a mapping."""
    if not writes_in_place_here(tmp_path):
        pytest.skip(f"{tmp_path} is on none of {sorted(IN_PLACE_FILESYSTEMS)}: never mapped there")
    save_file(MIXED, str(tmp_path / "model.safetensors"))
    os.chmod(tmp_path / "model.safetensors", 0o664)
    mapped: list[bool] = []
    old_umask = os.umask(0o002)
    try:
        with tuned(piece_elements=1024, stripe_bytes=8192), injected(mapped_for_writing(mapped)):
            _convert.convert(read_header(tmp_path / "model.safetensors"), str(tmp_path / "out"), {})
    finally:
        os.umask(old_umask)
    assert os.stat(tmp_path / "out").st_mode & 0o020
    assert mapped and not any(mapped)

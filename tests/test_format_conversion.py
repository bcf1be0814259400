"""The original converter's contract: only F32 -> F16, everything else byte-identical."""

from __future__ import annotations

import json
import os
import queue
import signal
import struct
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.compare import writable
from support.faults import injected, thread_starts_refused
from support.siblings import resolve_sibling

import sa3loader
from sa3loader import TruncatedFileError, _compare, _convert, _faults, _identity
from sa3loader._format import read_header
from sa3loader._records import SourceIdentity

IDENTITY = SourceIdentity(size=1, mtime_ns=2, header_sha256="h", inode=0, device=0, ctime_ns=0)


def source_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(1000, generator=gen)
    big[:6] = torch.tensor([-0.0, float("nan"), float("inf"), 1e6, 1e-9, -70000.0])
    return {
        "big": big,
        "matrix": torch.randn(17, 33, generator=gen),
        "zero": torch.zeros(0, 3),
        "bf16": torch.randn(9, generator=gen).to(torch.bfloat16),
        "f16": torch.randn(4, generator=gen).to(torch.float16),
        "f64": torch.randn(5, generator=gen, dtype=torch.float64),
        "ints": torch.arange(-3, 4, dtype=torch.int32),
        "mask": torch.tensor([True, False]),
    }


def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@pytest.fixture(params=[None, 7, 1], ids=["one-chunk", "many-chunks", "one-element-pieces"])
def chunk(request, monkeypatch):
    if request.param:
        for name, value in {
            "chunk_elements": request.param,
            "piece_elements": request.param,
            "stripe_bytes": 40,
        }.items():
            monkeypatch.setitem(_faults.tunings, name, value)
    return request.param


def test_sibling_equals_save_file_of_converted_tensors(tmp_path, chunk):
    tensors = source_tensors()
    src = tmp_path / "model.safetensors"
    # A fine-tune of a sibling may carry its keys: the ones sa3loader sets describe this source.
    theirs = {"format": "pt", "note": "user", "sa3loader.note": "user's", "sa3loader.source_size": "12345"}
    save_file(tensors, str(src), metadata=theirs)
    header = read_header(src)
    metadata = _identity.sibling_metadata(header, IDENTITY, "fp")
    replaced = {k for k in theirs if metadata[k] != theirs[k]} | (metadata.keys() - theirs.keys())
    assert replaced and all(k.startswith("sa3loader.") for k in replaced) and "sa3loader.note" not in replaced
    assert metadata["sa3loader.source_size"] == str(IDENTITY.size)
    result = _convert.convert(header, str(tmp_path / "out.safetensors"), metadata)

    expected = tmp_path / "expected.safetensors"
    converted = {k: v.half() if v.dtype == torch.float32 else v for k, v in tensors.items()}
    save_file(converted, str(expected), metadata=metadata)
    ours_header, ours_data = split((tmp_path / "out.safetensors").read_bytes())
    ref_header, ref_data = split(expected.read_bytes())
    assert ours_header == ref_header
    assert ours_data == ref_data
    assert result.size == os.path.getsize(tmp_path / "out.safetensors")
    assert ours_header["__metadata__"]["note"] == "user"
    assert ours_header["__metadata__"][_identity.MARKER_KEY] == _identity.FORMAT_VERSION
    f32 = [v for v in tensors.values() if v.dtype == torch.float32]
    assert result.overflow_to_inf == sum(int((v.half().isinf() & v.isfinite()).sum()) for v in f32) == 2
    assert result.flushed_to_zero == sum(int(((v.half() == 0) & (v != 0)).sum()) for v in f32) >= 1


@pytest.mark.parametrize("inside", ["F32", "BF16"])
def test_source_shrinking_during_conversion_fails_typed_and_leaves_nothing(tmp_path, chunk, inside):
    src = tmp_path / "model.safetensors"
    save_file(source_tensors(), str(src))
    header = read_header(src)
    entry = next(e for e in header.entries if e.dtype == inside)
    os.truncate(src, header.data_start + entry.end - 1)  # after the header was read
    with pytest.raises(TruncatedFileError, match="model.safetensors") as err:
        _convert.convert(
            header, str(tmp_path / "out.safetensors"), _identity.sibling_metadata(header, IDENTITY, "fp")
        )
    assert isinstance(err.value, ValueError) and isinstance(err.value, EOFError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_only_float32_changes_and_fp16_is_exact_cast(tmp_path):
    tensors = source_tensors()
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    header = read_header(src)
    out = tmp_path / "out.safetensors"
    _convert.convert(header, str(out), _identity.sibling_metadata(header, IDENTITY, "fp"))
    loaded = load_file(str(out))
    for key, value in tensors.items():
        got = loaded[key]
        if value.dtype == torch.float32:
            assert got.dtype == torch.float16
            cast = value.to(torch.float16)
            assert torch.equal(got.view(torch.int16), cast.view(torch.int16))  # so MAX_ABS_DIFF = 0.0
        else:
            assert got.dtype == value.dtype
            assert got.view(torch.uint8).tolist() == value.contiguous().view(torch.uint8).tolist()


def test_sibling_permissions_follow_source_minus_write_bits(open_tmp):
    """Readable by whoever may read the source (not mkstemp's 0600); writable by no one but root."""
    src = open_tmp / "model.safetensors"
    save_file(source_tensors(), str(src))
    os.chmod(src, 0o664)
    outcome = resolve_sibling(read_header(src), str(open_tmp / "cache"))
    assert outcome.converted is not None
    mode = os.stat(outcome.sibling.path).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o444 & ~umask


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"bf16": torch.ones(3, dtype=torch.bfloat16), "i": torch.arange(2)},
        {"h": torch.ones(3, dtype=torch.float16)},
    ],
    ids=["no-tensors", "bf16-and-int", "already-fp16"],
)
def test_no_float32_means_no_sibling(tmp_path, tensors):
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    before = sorted(os.listdir(tmp_path))
    outcome = resolve_sibling(read_header(src), str(tmp_path / "cache"))
    assert outcome.sibling is None and outcome.converted is None
    assert sorted(p for p in os.listdir(tmp_path) if p != "cache") == before


def test_converting_a_sibling_again_changes_nothing(tmp_path):
    src = tmp_path / "model.safetensors"
    save_file(source_tensors(), str(src))
    first = resolve_sibling(read_header(src), str(tmp_path / "cache"))
    raw = Path(first.sibling.path).read_bytes()
    again = resolve_sibling(read_header(first.sibling.path), str(tmp_path / "cache"))
    assert again.converted is None and again.sibling is None
    assert Path(first.sibling.path).read_bytes() == raw
    second = resolve_sibling(read_header(src), str(tmp_path / "cache"))
    assert second.converted is None and second.sibling.path == first.sibling.path


@pytest.mark.parametrize("reads_ahead", [True, False], ids=["read-ahead", "no-thread"])
@pytest.mark.parametrize("flipped", [k for k, v in source_tensors().items() if v.numel()])
def test_verify_accepts_a_true_sibling_and_catches_a_data_flip(
    tmp_path, chunk, flipped, reads_ahead, monkeypatch
):
    """Also where its read-ahead thread cannot start (a pids limit): it reads on the caller's thread."""
    if not reads_ahead:
        monkeypatch.setattr(threading.Thread, "start", thread_starts_refused("sa3loader-read-ahead", after=0))
    src = tmp_path / "model.safetensors"
    save_file(source_tensors(), str(src))
    outcome = resolve_sibling(read_header(src), str(tmp_path / "cache"))
    _compare.verify(read_header(src), outcome.sibling)
    entry = outcome.sibling.by_name[flipped]
    with open(writable(outcome.sibling.path), "r+b") as f:  # the tensor's last byte, past any first chunk
        f.seek(outcome.sibling.data_start + entry.end - 1)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    from sa3loader import VerificationError

    with pytest.raises(VerificationError, match=repr(flipped)):
        _compare.verify(read_header(src), read_header(outcome.sibling.path))


@pytest.mark.parametrize("second", [False, True], ids=["one-ctrl-c", "another-as-it-stops"])
def test_ctrl_c_inside_the_start_of_verifys_reader_leaves_no_reader_behind(tmp_path, monkeypatch, second):
    """Ctrl-C lands in ``Thread.start`` once the reader runs (start waits for it to say so): the
    reader, with its four buffers, ends all the same (an attack found it waiting for good), also
    where a second Ctrl-C lands as the reader is told to stop."""
    src = tmp_path / "model.safetensors"
    save_file(source_tensors(), str(src))
    outcome = resolve_sibling(read_header(src), str(tmp_path / "cache"))
    real_start, real_get_nowait = threading.Thread.start, queue.Queue.get_nowait
    stopping: list[bool] = []

    def start(thread: threading.Thread) -> None:
        real_start(thread)
        if thread.name == "sa3loader-read-ahead":
            stopping.append(True)
            raise KeyboardInterrupt

    def get_nowait(q: queue.Queue):
        if second and stopping and len(stopping) == 1:
            stopping.append(True)
            raise KeyboardInterrupt
        return real_get_nowait(q)

    monkeypatch.setattr(threading.Thread, "start", start)
    monkeypatch.setattr(queue.Queue, "get_nowait", get_nowait)
    with pytest.raises(KeyboardInterrupt):
        _compare.verify(read_header(src), outcome.sibling)
    deadline = time.monotonic() + 10
    while any(t.name == "sa3loader-read-ahead" for t in threading.enumerate()):
        assert time.monotonic() < deadline, "verify's reader still runs"
        time.sleep(0.01)


def test_an_interrupt_while_converting_stops_every_worker_before_the_file_is_closed(
    tmp_path, monkeypatch, ctrl_c_raises
):
    """Ctrl-C lands in the main thread's wait for the workers: none may write on after the
    temp file's descriptor is closed (the number could be reused by then)."""
    src = tmp_path / "model.safetensors"
    save_file({f"w{i}": torch.randn(64, 64) for i in range(64)}, str(src))
    header = read_header(src)
    monkeypatch.setitem(_faults.tunings, "piece_elements", 1024)
    monkeypatch.setitem(_faults.tunings, "stripe_bytes", 2048)
    monkeypatch.setitem(_faults.facts, "writes_in_place", lambda subject, real: False)  # pwrite
    real_read = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: (time.sleep(0.005), real_read(*a))[1])
    interrupted = []

    def interrupt(name, subject=None):
        if name == "stripe" and not interrupted:
            interrupted.append(threading.current_thread().name)
            os.kill(os.getpid(), signal.SIGINT)

    with injected(interrupt), pytest.raises(KeyboardInterrupt):
        _convert.convert(
            header, str(tmp_path / "out.safetensors"), _identity.sibling_metadata(header, IDENTITY, "fp")
        )
    assert interrupted == ["sa3loader-convert"]
    assert not [t for t in threading.enumerate() if t.name == "sa3loader-convert" and t.is_alive()]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("threads", [0, 1])
def test_a_conversion_with_fewer_threads_than_workers_writes_the_same_file(tmp_path, monkeypatch, threads):
    """Under a pids limit (``can't start new thread``), the workers that could be started (or
    the calling thread) convert it all: not a bare RuntimeError out of the load."""
    src = tmp_path / "model.safetensors"
    save_file({f"w{i}": torch.randn(64, 64) for i in range(8)}, str(src))
    monkeypatch.setitem(_faults.tunings, "stripe_bytes", 4096)
    _convert.convert(read_header(src), str(tmp_path / "all.safetensors"), {})
    monkeypatch.setattr(threading.Thread, "start", thread_starts_refused("sa3loader-convert", threads))
    _convert.convert(read_header(src), str(tmp_path / "few.safetensors"), {})
    assert (tmp_path / "few.safetensors").read_bytes() == (tmp_path / "all.safetensors").read_bytes()


def test_a_stripe_that_goes_back_in_the_source_is_read_ahead_too(tmp_path):
    """The sibling's order is not the source's (f32 sorts after bf16 once it is f16): a stripe
    read ahead across that boundary spans backwards in the source, which must not fail the
    conversion (it did, with EINVAL from posix_fadvise, for such a checkpoint over 32 MiB)."""
    tensors = {
        "a.f32": torch.randn(4 << 20),  # 16 MiB, first in the source, last in the sibling
        "b.bf16": torch.randn(17 << 20).to(torch.bfloat16),  # 34 MiB: the boundary is in a stripe read ahead
    }
    src = tmp_path / "model.safetensors"
    save_file(tensors, str(src))
    sibling = tmp_path / "model.fp16.safetensors"
    _convert.convert(read_header(src), str(sibling), {})
    assert _compare.compare(read_header(src), read_header(sibling)).equal


def test_a_load_interrupted_while_converting_leaves_only_the_empty_lock(tmp_path):
    """README: Ctrl-C during a first load leaves the checkpoint as it was, no sibling and no temp
    file; only the empty lock file, which the next load takes and converts."""
    from support.checkpoints import random_like_state, save
    from support.faults import at, injected
    from support.loads import load_toy
    from support.toymodel import build

    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    before = ckpt.read_bytes()

    def interrupted():
        raise KeyboardInterrupt

    with injected(at("data", interrupted)), pytest.raises(KeyboardInterrupt):
        load_toy(ckpt, tmp_path / "cache")
    cache = tmp_path / "cache"  # the index's own files are not the load's leftovers
    left = sorted(
        str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() and cache not in p.parents
    )
    assert left == [".cache/sa3loader/model.fp16.safetensors.lock", "model.safetensors"], left
    assert (
        tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.lock"
    ).stat().st_size == 0 and ckpt.read_bytes() == before
    load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted

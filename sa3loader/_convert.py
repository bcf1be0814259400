"""Write the fp16 sibling of a checkpoint: streamed, bounded memory, crash-safe.

``safetensors.torch.save_file`` needs every tensor in memory at once, so the
writer lays out the header itself (``_format.layout``, byte-compatible with
``save_file``) and streams each tensor from the source with plain reads,
converting float32 chunks to float16 on the way. The file is written as
``<dest>.incomplete-<unique>``, fsynced, then published with ``os.replace``;
a reader can never find it half-written.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import threading
import time
import uuid
from typing import Any

import torch

from . import _config, _faults
from ._dtypes import converted_dtype
from ._format import (
    HEADER_LENGTH_BYTES,
    MAX_HEADER_BYTES,
    Header,
    TensorEntry,
    check_unchanged,
    layout,
    pieces_of,
    preadv_exact,
    reading,
)
from ._places import incomplete_prefix
from ._progress import byte_bar, progress_enabled
from ._written import ConversionResult, WrittenSibling, _as_conversion_error, _unlink_quietly, mark_written
from .errors import ConversionError

logger = logging.getLogger(__name__)

# Comparing (``verify``): 16 MiB of float32 per buffer, whatever the model size.
# Converting: 512 KiB of float32 per piece, read, cast, counted and written by one
# worker while it is in that core's cache (128 KiB to 1 MiB measured alike; 16 MiB,
# or smaller pieces, whose per-call costs add up, were slower: benchmarks/README.md).
PIECE_ELEMENTS = 128 * 1024
WIDEST_ELEMENT_BYTES = 8  # f64, i64, c64
STRIPE_PIECES = 16  # pieces a worker takes at once (8 MiB): reads stay sequential


def _piece_elements() -> int:
    return _faults.tuned("piece_elements", PIECE_ELEMENTS)


READ_AHEAD_STRIPES = 4  # stripes the kernel is asked to read ahead of the workers (a cold disk)
WORKERS = max(1, min(4, os.cpu_count() or 1))
DEFAULT_FILE_MODE = 0o644


def output_size(header: Header, metadata: dict[str, str]) -> int:
    """Bytes of the converted file; ``ConversionError`` when its header would pass safetensors' limit."""
    return output_prefix(header, metadata)[1]


def output_prefix(header: Header, metadata: dict[str, str]) -> tuple[bytes, int]:
    """The converted file's first bytes (length field and header) and its size."""
    prefix, entries = _output_layout(header, metadata)
    return prefix, len(prefix) + (entries[-1].end if entries else 0)


def _output_layout(header: Header, metadata: dict[str, str]) -> tuple[bytes, list[TensorEntry]]:
    """The converted file's header bytes and entries; ``ConversionError`` when safetensors could
    not read it back."""
    prefix, entries = layout([(e.name, converted_dtype(e.dtype), e.shape) for e in header.entries], metadata)
    limit = _faults.tuned("max_header_bytes", MAX_HEADER_BYTES)
    if len(prefix) - HEADER_LENGTH_BYTES > limit:
        raise ConversionError(
            f"{header.path}: its fp16 sibling's header would be {len(prefix) - HEADER_LENGTH_BYTES} bytes, "
            f"above the {limit}-byte limit safetensors reads",
            filename=header.path,
        )
    return prefix, entries


def convert(
    header: Header,
    dest: str,
    metadata: dict[str, str],
    *,
    read_only: bool = False,
    progress: bool | None = None,
) -> ConversionResult:
    """Write the fp16 sibling of ``header``'s file to ``dest`` and publish it atomically."""
    written = write_sibling(header, dest, metadata, read_only=read_only, progress=progress)
    written.publish()
    return written.result


def write_sibling(
    header: Header,
    dest: str,
    metadata: dict[str, str],
    *,
    read_only: bool = False,
    progress: bool | None = None,
) -> WrittenSibling:
    """Write the fp16 sibling of ``header``'s file to a temp file beside ``dest``; not published.

    The output gets the source's mode; ``read_only`` (siblings that loads map)
    clears every write bit, so no one but root edits a mapped file in place.
    """
    _faults.point("convert", dest)
    started = time.perf_counter()
    prefix, out_entries = _output_layout(header, metadata)  # refuses a header too big, before writing
    total = len(prefix) + (out_entries[-1].end if out_entries else 0)
    tmp = f"{incomplete_prefix(dest)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    source_stat = header.handle.stat if header.handle is not None else os.stat(header.path)
    mode = source_stat.st_mode & 0o666 or DEFAULT_FILE_MODE
    if read_only:
        mode &= ~0o222
    counts = {"inf": 0, "zero": 0}
    try:
        # O_EXCL never follows a symlink planted at the name; O_NOFOLLOW says so twice.
        out_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        raise ConversionError(f"cannot create {tmp}: {exc.strerror}", filename=tmp, errno=exc.errno) from exc
    try:
        _keep_group(out_fd, source_stat, mode)
        shown = progress_enabled(_config.progress() if progress is None else progress)
        desc = f"fp16 {os.path.basename(header.path)}"
        with reading(header) as src_fd, byte_bar(desc, total, shown) as bar:
            _faults.point("header")
            _pwrite_all(out_fd, memoryview(prefix), 0)
            bar.update(len(prefix))
            _faults.point("data")
            _stream_tensors(header, out_entries, len(prefix), src_fd, out_fd, counts, bar)
        check_unchanged(header)  # a rewrite in place meanwhile: the sibling would mix two versions
        tmp = mark_written(tmp, dest, counts)
    except BaseException as exc:
        os.close(out_fd)
        _unlink_quietly(tmp)
        raise _as_conversion_error(exc, dest) from exc
    seconds = time.perf_counter() - started
    # Flushing tiny values to zero is normal for fp16; callers warn about overflow.
    logger.info(
        "%s: fp16 range: %d finite values overflowed to inf, %d nonzero values flushed to zero "
        "(the same values model.to(torch.float16) produces)",
        header.path,
        counts["inf"],
        counts["zero"],
    )
    header_sha = hashlib.sha256(prefix[8:]).hexdigest()
    result = ConversionResult(dest, total, header_sha, counts["inf"], counts["zero"], seconds)
    return WrittenSibling(tmp, dest, out_fd, result)


# A temp file whose every byte is written, from a source unchanged meanwhile, is renamed
# <dest>.incomplete-written-<boot>-<overflow>-<flushed>-<pid>-<random>: should its process end
# before publishing it (an exec, a kill), a later load of this boot may publish it as it is
# (``unpublished_sibling``). The page cache keeps what a dead process wrote; a restart may not.


class _Job:
    """The pieces of a conversion, handed to workers a stripe at a time, in file order.

    The first error any worker meets stops the others at their next piece and
    is raised by ``raise_first``.
    """

    def __init__(self, plan: list[tuple[TensorEntry, int, int, int]], fd: int, bar: Any) -> None:
        stripe = _faults.tuned("stripe_pieces", STRIPE_PIECES)
        self._stripes = [plan[i : i + stripe] for i in range(0, len(plan), stripe)]
        self._next = 0
        self._fd, self._bar = fd, bar
        self._lock = threading.Lock()
        self.errors: list[BaseException] = []

    def take(self) -> list[tuple[TensorEntry, int, int, int]]:
        """The next stripe (empty when done or stopped); asks the kernel to read ahead of it."""
        with self._lock:
            if self.errors or self._next >= len(self._stripes):
                return []
            stripe = self._stripes[self._next]
            self._next += 1
            ahead = self._next + READ_AHEAD_STRIPES - 1
        if ahead < len(self._stripes) and hasattr(os, "posix_fadvise"):
            # The sibling's order, not the source's (f32 sorts elsewhere as f16): a stripe
            # that spans two dtypes may go backwards in the source.
            offset = min(piece[1] for piece in self._stripes[ahead])
            end = max(piece[1] + piece[2] for piece in self._stripes[ahead])
            os.posix_fadvise(self._fd, offset, end - offset, os.POSIX_FADV_WILLNEED)
        return stripe

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.errors.append(exc)

    def done(self, nbytes: int) -> None:
        with self._lock:
            self._bar.update(nbytes)

    def raise_first(self) -> None:
        if self.errors:
            raise self.errors[0]


def _convert_pieces(job: _Job, header: Header, src_fd: int, out_fd: int, counts: dict[str, int]) -> None:
    """One worker: read, cast and count, and write each piece of the stripes it takes."""
    raw_bytes, half_bytes = bytearray(_piece_elements() * 4), bytearray(_piece_elements() * 2)
    raw = torch.frombuffer(raw_bytes, dtype=torch.float32)
    half = torch.frombuffer(half_bytes, dtype=torch.float16)
    scratch = torch.empty_like(half)  # |half|, without a new allocation per piece
    full = (raw, half, scratch, memoryview(raw_bytes), memoryview(half_bytes))
    try:
        while stripe := job.take():
            written = 0
            for entry, offset, length, out_offset in stripe:
                if job.errors:  # another worker failed, or the caller was interrupted
                    return
                n = length // 4
                # Most pieces are whole: slicing a tensor costs as much as casting one.
                src, dst, work, raw_view, half_view = (
                    full
                    if length == len(raw_bytes)
                    else (raw[:n], half[:n], scratch[:n], full[3][:length], full[4][: n * 2])
                )
                preadv_exact(src_fd, [raw_view], offset, header.path)
                piece = raw_view
                if entry.dtype == "F32":
                    dst.copy_(src)
                    _count_range(src, dst, counts, work)
                    piece = half_view
                elif entry.dtype in WIDER_THAN_FP16:  # kept as is here, cast to fp16 by the load
                    _count_cast_range(entry.dtype, raw_view, counts)
                _pwrite_all(out_fd, piece, out_offset)
                written += len(piece)
            job.done(written)
    except BaseException as exc:  # handed to the caller, which raises it
        job.failed(exc)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _stream_tensors(
    header: Header,
    out_entries: list[TensorEntry],
    out_data_start: int,
    src_fd: int,
    out_fd: int,
    counts: dict[str, int],
    bar: Any,
) -> None:
    """Read, cast and count, and write every tensor: ``WORKERS`` threads, each piece start to end on one.

    A piece small enough to stay in a core's cache between its read, its cast
    and its write measured about twice as fast as 16 MiB buffers handed between
    three threads (benchmarks/README.md); the work is in torch and system calls,
    which release the GIL.
    """
    plan = []
    # Whole elements of every dtype in each piece (8 bytes, f64's, divides them all): a
    # piece is counted (``_count_cast_range``) as well as copied.
    piece_bytes = max(
        WIDEST_ELEMENT_BYTES, _piece_elements() * 4 // WIDEST_ELEMENT_BYTES * WIDEST_ELEMENT_BYTES
    )
    for out in out_entries:  # the sibling's order
        entry = header.by_name[out.name]
        shrink = 2 if entry.dtype == "F32" else 1
        for relative, length in pieces_of(0, entry.nbytes, piece_bytes):
            offset = header.data_start + entry.begin + relative
            plan.append((entry, offset, length, out_data_start + out.begin + relative // shrink))
    job = _Job(plan, src_fd, bar)
    per_worker = [{"inf": 0, "zero": 0} for _ in range(WORKERS)]
    workers = [
        threading.Thread(
            target=_convert_pieces, args=(job, header, src_fd, out_fd, mine), name="sa3loader-convert"
        )
        for mine in per_worker
    ]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join()
    except BaseException as exc:  # KeyboardInterrupt: the workers must not write once fd is closed
        job.failed(exc)
        for worker in workers:
            worker.join()
        raise
    job.raise_first()
    for mine in per_worker:
        for key, value in mine.items():
            counts[key] += value


def _count_range(src: torch.Tensor, dst: torch.Tensor, counts: dict[str, int], scratch: torch.Tensor) -> None:
    """Add this chunk's fp16 overflows and flushes to ``counts``.

    Exact and cheap: inf in fp16 comes from inf in fp32 or an overflow, zero from
    zero or a flush, so the counts are differences; one aminmax pass over the
    fp16 chunk skips them when there is no inf, NaN or zero at all.
    """
    # Python floats: a test on a 0-d tensor costs ten times the aminmax of a piece.
    low, high = (t.item() for t in torch.aminmax(torch.abs(dst, out=scratch)))
    if not math.isfinite(high):
        counts["inf"] += int(torch.count_nonzero(dst.isinf()) - torch.count_nonzero(src.isinf()))
    if not low > 0:  # also when NaN made aminmax NaN
        counts["zero"] += int(torch.count_nonzero(dst == 0) - torch.count_nonzero(src == 0))


# Float dtypes a sibling keeps as they are, whose values may still leave fp16's range when
# the load casts them (``model.to(float16)``), and the chain upstream casts them through:
# f64 is copied into the model's fp32 first.
WIDER_THAN_FP16: dict[str, tuple[torch.dtype, ...]] = {
    "BF16": (torch.bfloat16,),
    "F64": (torch.float64, torch.float32),
    "F8_E8M0": (torch.float8_e8m0fnu,) if hasattr(torch, "float8_e8m0fnu") else (),
}


def _count_cast_range(dtype: str, raw: memoryview, counts: dict[str, int]) -> None:
    """The range report of a piece the load casts (bf16, f64): what its cast to fp16 makes inf or 0."""
    chain = WIDER_THAN_FP16[dtype]
    if not chain or not len(raw):
        return
    src = torch.frombuffer(raw, dtype=chain[0])
    dst = src
    for step in (*chain[1:], torch.float16):
        dst = dst.to(step)
    if src.dtype.itemsize == 1:  # float8 has no isinf: count in float32, which holds every value
        src = src.to(torch.float32)
    counts["inf"] += int(torch.count_nonzero(dst.isinf()) - torch.count_nonzero(src.isinf()))
    counts["zero"] += int(torch.count_nonzero(dst == 0) - torch.count_nonzero(src == 0))


def _keep_group(fd: int, source: os.stat_result, mode: int) -> None:
    """Give the new file the source's group; where that is not allowed, no group access at all.

    A file is created with the process's group (or the directory's): left so, a
    copy of a checkpoint readable by one group would be readable by another.
    """
    if os.fstat(fd).st_gid == source.st_gid:
        return
    try:
        os.fchown(fd, -1, source.st_gid)
    except PermissionError:
        os.fchmod(fd, mode & ~0o070)

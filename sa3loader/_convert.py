"""Write the fp16 sibling of a checkpoint: streamed, bounded memory, crash-safe.

``safetensors.torch.save_file`` needs every tensor in memory at once, so the writer lays out
the header itself (``_format.layout``, byte-compatible with ``save_file``) and streams each
tensor from the source, converting float32 chunks to float16 on the way (cast from a mapping
under a read lease: ``_source_reads``; else read). The file is written as
``<dest>.incomplete-<unique>``, held as a ``WrittenSibling`` until it is published (fsync,
then ``os.replace``: a reader never finds it half-written) or discarded. What a process that
ended before publishing left is found again by ``unpublished_sibling``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import _config, _faults
from ._config import IoMode
from ._crew import run_crew
from ._dtypes import converted_dtype
from ._format import (
    HEADER_LENGTH_BYTES,
    MAX_HEADER_BYTES,
    FileHandle,
    Header,
    TensorEntry,
    check_unchanged,
    header_of,
    layout,
    preadv_exact,
    reading,
)
from ._host import boot_id, lease_guards_mapping
from ._new_file import output_mapping, populate, pwrite_all, take_space
from ._places import INCOMPLETE_INFIX, incomplete_prefix
from ._progress import byte_bar, progress_enabled
from ._range_report import WIDER_THAN_FP16, count_cast_range, count_range
from ._records import ConversionResult
from ._serial import loaded_openmp, serial_ops
from ._source_reads import LeasedSource, Piece, StripeQueue, leased_source
from ._trust import NEW_FILE_MODE, readers_bits, share_new_file
from .errors import ConversionError, HeaderError, Sa3LoaderError

logger = logging.getLogger(__name__)

# Comparing (``verify``): 16 MiB of float32 per buffer, whatever the model size.
# Converting: 512 KiB of float32 per piece, read, cast and counted into its stripe by one
# worker while it is in that core's cache (128 KiB to 1 MiB measured alike; 16 MiB,
# or smaller pieces, whose per-call costs add up, were slower: benchmarks/README.md).
PIECE_ELEMENTS = 128 * 1024
WIDEST_ELEMENT_BYTES = 8  # f64, i64, c64
# A worker takes a stripe at a time: the pieces of one aligned 4 MiB of the sibling (reads
# stay sequential), cast into one buffer and written with one call. The page cache keeps
# written pages in folios as large and as aligned as the writes, and a mapping faults a
# folio in at once: a 2.9 GB sibling written 256 KiB at a time took 66-87 ms to fault in,
# 4 MiB at a time 18-26, 4 MiB aligned 9-12 (benchmarks/README.md).
STRIPE_BYTES = 4 << 20


def _piece_bytes() -> int:
    """Bytes of the source a piece holds: whole elements of every dtype (8, f64's, divides
    them all), as a piece is counted (``count_cast_range``) as well as copied."""
    elements = _faults.tuned("piece_elements", PIECE_ELEMENTS)
    return max(WIDEST_ELEMENT_BYTES, elements * 4 // WIDEST_ELEMENT_BYTES * WIDEST_ELEMENT_BYTES)


WORKERS = max(1, min(4, os.cpu_count() or 1))


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
    before_rename: Callable[[], None] | None = None,
    io: IoMode | None = None,
) -> ConversionResult:
    """Write the fp16 sibling of ``header``'s file to ``dest`` and publish it atomically
    (``before_rename``: as ``WrittenSibling.publish``)."""
    written = write_sibling(header, dest, metadata, read_only=read_only, progress=progress, io=io)
    written.publish(before_rename)
    return written.result


def write_sibling(
    header: Header,
    dest: str,
    metadata: dict[str, str],
    *,
    read_only: bool = False,
    progress: bool | None = None,
    io: IoMode | None = None,
    room: Callable[[], str | None] | None = None,
) -> WrittenSibling:
    """Write the fp16 sibling of ``header``'s file to a temp file beside ``dest``; not published.

    The output gets the source's mode; ``read_only`` (siblings that loads map)
    clears every write bit, so no one but root edits a mapped file in place. ``io``: the
    load's setting (None: $SA3LOADER_IO); "read" maps no file, the source included. ``room``:
    asked once the file's bytes are taken on disk, why there is no room for it after all
    (loads converting at once each checked the free space before the others took theirs).
    """
    _faults.point("convert", dest)
    started = time.perf_counter()
    prefix, out_entries = _output_layout(header, metadata)  # refuses a header too big, before writing
    total = len(prefix) + (out_entries[-1].end if out_entries else 0)
    tmp = f"{incomplete_prefix(dest)}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    source_stat = header.handle.stat if header.handle is not None else os.stat(header.path)
    mode = readers_bits(header.path, source_stat, dest) & 0o666 | 0o400  # ours to read back, at least
    if read_only:
        mode &= ~0o222
    counts = {"inf": 0, "zero": 0}
    try:
        # O_EXCL never follows a symlink planted at the name; O_NOFOLLOW says so twice.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        out_fd = os.open(tmp, flags, NEW_FILE_MODE)
    except OSError as exc:
        raise ConversionError(f"cannot create {tmp}: {exc.strerror}", filename=tmp, errno=exc.errno) from exc
    try:
        share_new_file(out_fd, source_stat, mode)  # an inherited ACL, another group: gone first
        taken = take_space(out_fd, total)
        if room is not None and taken is not None and (problem := room()) is not None:
            raise ConversionError(problem, filename=dest)
        shown = progress_enabled(_config.progress() if progress is None else progress)
        desc = f"fp16 {os.path.basename(header.path)}"
        end = header.data_start + max((e.end for e in header.entries), default=0)
        plain_reads = (io or _config.io_mode(None)) == "read"  # no file mapped, this one neither
        may_map = not plain_reads and lease_guards_mapping(header.path)
        map_output = taken and not plain_reads
        with reading(header) as src_fd, leased_source(src_fd, header.path, end, may_map=may_map) as mapped:
            with byte_bar(desc, total, shown) as bar, output_mapping(out_fd, total, map_output) as out_map:
                _faults.point("header")
                pwrite_all(out_fd, memoryview(prefix), 0)
                bar.update(len(prefix))
                _faults.point("data")
                output = (out_fd, out_map)
                _stream_tensors(header, out_entries, len(prefix), (src_fd, mapped), output, counts, bar)
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


Source = tuple[int, LeasedSource | None]  # the source's descriptor; its mapping, where leased
Output = tuple[int, memoryview | None]  # the new file's descriptor; its writable mapping, where taken


def _convert_pieces(
    job: StripeQueue,
    header: Header,
    source: Source,
    output: Output,
    counts: dict[str, int],
    openmp: list[Any],
) -> None:
    """One worker: read, cast and count each piece of the stripes it takes, and write each stripe."""
    try:
        with serial_ops(openmp):
            _convert_stripes(job, header, source, output, counts)
    except BaseException as exc:  # handed to the caller, which raises it
        job.failed(exc)


def _convert_stripes(
    job: StripeQueue, header: Header, source: Source, output: Output, counts: dict[str, int]
) -> None:
    """Each stripe: its pieces read (and cast and counted) into the new file's mapping, or into
    one buffer written with one call; float32 cast straight from the source's mapping while its
    lease is whole (``_source_reads``)."""
    src_fd, leased = source
    out_fd, out_map = output
    raw_bytes = bytearray(_piece_bytes())
    raw, raw_view = torch.frombuffer(raw_bytes, dtype=torch.float32), memoryview(raw_bytes)
    scratch = torch.empty(len(raw_bytes) // 4, dtype=torch.int16)  # fp16 bits, for the count
    window = _stripe_bytes()
    out_view = out_map if out_map is not None else memoryview(bytearray(window))
    out_u8 = torch.frombuffer(out_view, dtype=torch.uint8)
    while stripe := job.take():
        start = stripe[0][3]
        base = 0 if out_map is not None else start // window * window  # where out_view begins in the file
        last, _, last_length, last_offset = stripe[-1]
        end = last_offset + (last_length // 2 if last.dtype == "F32" else last_length)
        if out_map is None:
            populate(out_fd, out_view[start - base : end - base], start)
        with leased.stripe() if leased is not None else contextlib.nullcontext() as mapped:
            for entry, offset, length, out_offset in stripe:
                if job.errors:  # another worker failed, or the caller was interrupted
                    return
                at = out_offset - base
                if entry.dtype != "F32":  # kept as it is: read straight into the stripe
                    preadv_exact(src_fd, [out_view[at : at + length]], offset, header.path)
                    if entry.dtype in WIDER_THAN_FP16:  # cast to fp16 by the load
                        count_cast_range(entry.dtype, out_view[at : at + length], counts)
                    continue
                n = length // 4  # most pieces are whole: slicing a tensor costs as much as casting one
                src, bits, into = (
                    (raw, scratch, raw_view) if n == len(raw) else (raw[:n], scratch[:n], raw_view[:length])
                )
                if mapped is not None and offset % 4 == 0:  # a float32 view needs aligned elements
                    src = mapped[offset : offset + length].view(torch.float32)
                else:
                    preadv_exact(src_fd, [into], offset, header.path)
                dst = out_u8[at : at + 2 * n].view(torch.float16)  # at is even: see _stripes
                dst.copy_(src)
                count_range(src, dst, counts, bits)
        if out_map is None:
            pwrite_all(out_fd, out_view[start - base : end - base], start)
        job.done(end - start)


def _stripe_bytes() -> int:
    return _faults.tuned("stripe_bytes", STRIPE_BYTES)


def _stripes(header: Header, out_entries: list[TensorEntry], out_data_start: int) -> list[list[Piece]]:
    """Every piece of the conversion, in the sibling's order, grouped by the aligned window of the
    sibling it fills. A piece ends at a window's end: where the sibling puts each tensor at a
    multiple of its element size (``layout``: the largest elements first, from an 8-aligned data
    section), a window's end (a multiple of 8) cuts no element, and an fp16 piece starts at an
    even offset of its window (its float16 view needs that)."""
    piece_bytes = _piece_bytes()
    window = _stripe_bytes()
    stripes: dict[int, list[Piece]] = {}
    for out in out_entries:  # the sibling's order
        entry = header.by_name[out.name]
        shrink = 2 if entry.dtype == "F32" else 1
        at, end = out_data_start + out.begin, out_data_start + out.end
        while at < end:
            cut = min(at + piece_bytes // shrink, (at // window + 1) * window, end)
            offset = header.data_start + entry.begin + (at - out_data_start - out.begin) * shrink
            stripes.setdefault(at // window, []).append((entry, offset, (cut - at) * shrink, at))
            at = cut
    return list(stripes.values())


def _stream_tensors(
    header: Header,
    out_entries: list[TensorEntry],
    out_data_start: int,
    source: Source,
    output: Output,
    counts: dict[str, int],
    bar: Any,
) -> None:
    """Read, cast and count, and write every tensor: ``WORKERS`` threads, each piece start to end on one.

    A piece small enough to stay in a core's cache between its read, its cast
    and its write measured about twice as fast as 16 MiB buffers handed between
    three threads (benchmarks/README.md); the work is in torch and system calls,
    which release the GIL.
    """
    job, openmp = (
        StripeQueue(_stripes(header, out_entries, out_data_start), source[0], bar),
        _faults.fact("openmp", None, loaded_openmp()),
    )
    per_worker = [{"inf": 0, "zero": 0} for _ in range(WORKERS)]
    workers = [
        functools.partial(_convert_pieces, job, header, source, output, mine, openmp) for mine in per_worker
    ]
    # Returns once no worker runs, Ctrl-C or not: the caller then closes the files and mappings.
    run_crew(workers, "sa3loader-convert", stop=job.failed)
    job.raise_first()
    for mine in per_worker:
        for key, value in mine.items():
            counts[key] += value


@dataclass
class WrittenSibling:
    """A sibling whose bytes are all in its temp file, not yet durable or at its name.

    ``publish`` fsyncs it and renames it to ``dest``; ``discard`` removes it.
    Until one of them, the temp file is the writer's, under the conversion lock.
    """

    tmp: str
    dest: str
    fd: int  # the temp file, open for reading and writing
    result: ConversionResult

    def open_header(self) -> Header:
        """The file just written, through a descriptor of its own, under ``dest``'s name.

        Not opened by name: it is the inode written, whatever is at the temp name now.
        A file that does not read back as the header written (it cannot happen, unless
        something wrote into it) is a ``ConversionError``: the load reads the source.
        """
        _faults.point("written")
        handle = FileHandle(self.dest, fd=os.dup(self.fd))
        try:
            header = header_of(handle)
            if header.sha256 != self.result.header_sha256 or header.file_size != self.result.size:
                raise HeaderError(f"{self.tmp}: not the header that was written", filename=self.tmp)
            return header
        except HeaderError as exc:
            handle.close()
            raise ConversionError(
                f"the fp16 sibling just written cannot be read back ({exc})", filename=self.dest
            ) from exc
        except BaseException:
            handle.close()
            raise

    def publish(self, before_rename: Callable[[], None] | None = None) -> os.stat_result:
        """fsync, then ``os.replace`` to ``dest``: a reader never finds it half-written.

        ``before_rename`` may raise to leave ``dest`` alone (the temp file is removed).
        Returns the stat of the file written, taken before the rename.
        """
        try:
            _faults.point("fsync")
            os.fsync(self.fd)
            written = os.fstat(self.fd)
            self._close()
            _faults.point("rename")
            if before_rename is not None:
                before_rename()
            os.replace(self.tmp, self.dest)
            _fsync_dir(os.path.dirname(self.dest) or ".")
        except BaseException as exc:
            self.discard()
            raise _as_conversion_error(exc, self.dest) from exc
        return written

    def discard(self) -> None:
        self._close()
        _unlink_quietly(self.tmp)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _as_conversion_error(exc: BaseException, dest: str) -> BaseException:
    """An ``OSError`` while writing, as a ``ConversionError``; any other error as it is."""
    if isinstance(exc, OSError) and not isinstance(exc, Sa3LoaderError):
        return ConversionError(
            f"cannot write fp16 sibling {dest}: {exc.strerror or exc}", filename=dest, errno=exc.errno
        )
    return exc


WRITTEN_TAG = "written-"


def mark_written(tmp: str, dest: str, counts: dict[str, int]) -> str:
    boot = boot_id()
    if boot is None:
        return tmp  # nothing can prove it complete after this process: it is converted again
    prefix = incomplete_prefix(dest)
    unique = tmp[len(prefix) :]  # <pid>-<random>
    written = f"{prefix}{WRITTEN_TAG}{boot}-{counts['inf']}-{counts['zero']}-{unique}"
    os.rename(tmp, written)
    return written


def unpublished_sibling(path: str, dest: str, prefix: bytes, total: int) -> WrittenSibling | None:
    """The temp file at ``path`` as a ``WrittenSibling`` to publish, when it provably holds every
    byte of the sibling whose header bytes are ``prefix`` and size ``total`` (the current source's:
    ``_convert.output_prefix``), written by a process that ended before it published it; else None.

    The proof: its name (``.incomplete-written-<boot>-<overflow>-<flushed>-<pid>-<random>``)
    says it was complete (renamed after its last byte, from a source unchanged meanwhile) in
    this boot, so the page cache holds what was written (a restart may not), and its header and
    size are those of the sibling of the source as it is now. Publishing fsyncs it first.
    """
    tag = os.path.basename(path).split(INCOMPLETE_INFIX, 1)[-1]
    fields = tag[len(WRITTEN_TAG) :].split("-") if tag.startswith(WRITTEN_TAG) else []
    if len(fields) != 5 or fields[0] != boot_id() or not all(f.isdigit() for f in fields[1:3]):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        first = os.pread(fd, len(prefix), 0) if stat.S_ISREG(st.st_mode) and st.st_size == total else b""
    except OSError:
        first = b""
    if first != prefix:
        os.close(fd)
        return None
    result = ConversionResult(
        dest, total, hashlib.sha256(prefix[8:]).hexdigest(), int(fields[1]), int(fields[2]), 0.0
    )
    return WrittenSibling(path, dest, fd, result)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse it; the rename is still atomic
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _unlink_quietly(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)

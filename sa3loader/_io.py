"""Bytes into tensors: read plans, parallel reads, the pinned staging ring, mappings.

- ``plan_chunks``: the contiguous reads that cover a file's wanted bytes (arithmetic);
- ``read_into``: parallel ``preadv`` straight into CPU tensors, no staging copy;
- ``stream_into``: reads into a small ring of pinned host buffers, copied to another device
  on a side stream, reads overlapping copies; the ring is the only host memory used;
- ``MappedFile``: tensors that are views of a private, copy-on-write mapping.

Plain reads (never mmap) serve wherever a mapping is unreliable: a file truncated
under a mapping kills the reader with SIGBUS. Every reader takes the descriptor
of a load (``fd=``) so that a load reads one file, whatever happens to its name."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from . import _faults
from ._config import warn_once
from ._crew import Helpers, map_on_crew
from ._dtypes import torch_dtype
from ._format import Header, TensorEntry, open_for_reading, preadv_exact, reading
from ._serial import loaded_openmp, serial_ops
from .errors import FileAccessError, TruncatedFileError

# Read plans: pure arithmetic, no I/O.
CHUNK_BYTES = 64 * 1024 * 1024
# Unused bytes between two wanted ranges are read through up to this size,
# beyond it the chunk ends (so a skipped tensor is never read).
MAX_GAP_BYTES = 1024 * 1024


@dataclass(frozen=True)
class Piece:
    """Bytes ``[dest_offset, dest_offset + length)`` of destination ``index``."""

    index: int
    dest_offset: int
    chunk_offset: int
    length: int


@dataclass(frozen=True)
class Chunk:
    """One contiguous read of the file and where its wanted bytes go."""

    file_offset: int
    length: int
    pieces: tuple[Piece, ...]


def plan_chunks(ranges: Sequence[tuple[int, int]], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    """Cut ``(file_offset, nbytes)`` ranges into reads of at most ``chunk_bytes``.

    Pure: no I/O. Ranges may be in any order and may cross chunk boundaries;
    empty ranges get no piece. Gaps up to ``MAX_GAP_BYTES`` are read through.
    """
    if chunk_bytes <= 0:
        raise ValueError(f"chunk_bytes must be positive, not {chunk_bytes}")
    order = sorted((off, n, i) for i, (off, n) in enumerate(ranges) if n > 0)
    chunks: list[Chunk] = []
    start = end = 0
    pieces: list[Piece] = []

    def close() -> None:
        if pieces:
            chunks.append(Chunk(start, end - start, tuple(pieces)))

    for offset, nbytes, index in order:
        done = 0
        while done < nbytes:
            at = offset + done
            if not pieces or at - end > MAX_GAP_BYTES or at < end or at >= start + chunk_bytes:
                close()
                start, end, pieces = at, at, []
            length = min(nbytes - done, start + chunk_bytes - at)
            pieces.append(Piece(index, done, at - start, length))
            end = max(end, at + length)
            done += length
    close()
    return chunks


# Mappings: tensors that are views of a private, copy-on-write mapping of a sibling.
PAGE_BYTES = mmap.PAGESIZE
PREFETCH_PIECE_BYTES = 64 * 1024 * 1024
PREFETCH_THREADS = 4
# Pages in the page cache, faulted in beside the build: each piece waits up to 5 ms (the switch
# interval) for the GIL; 64 MB pieces held the DiT hit's prefetch 130-200 ms (benchmarks/README.md).
HOT_PIECE_BYTES = 512 * 1024 * 1024


class MappedFile:
    """A safetensors file mapped copy-on-write; ``tensor()`` returns zero-copy views."""

    def __init__(self, header: Header) -> None:
        """Map ``header``'s file, through the descriptor it was parsed from when it is open."""
        self.header = header
        with reading(header) as fd:
            try:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE
            except OSError as exc:  # ENOMEM under an address-space limit, say
                raise FileAccessError(
                    f"{header.path}: cannot map it ({exc.strerror}); SA3LOADER_IO=read reads it instead",
                    filename=header.path,
                    errno=exc.errno,
                ) from exc
        if len(self._map) != header.file_size:
            self._map.close()
            raise TruncatedFileError(
                f"{header.path}: changed size while it was being opened", filename=header.path
            )

    def maps(self, entry: TensorEntry) -> bool:
        """Whether ``tensor(entry)`` is a view of the mapping (not a copy: empty, or misaligned)."""
        itemsize = torch_dtype(entry.dtype, self.header.path).itemsize
        return entry.numel > 0 and (self.header.data_start + entry.begin) % itemsize == 0

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        dtype, offset = torch_dtype(entry.dtype, self.header.path), self.header.data_start + entry.begin
        if entry.numel == 0:
            return torch.empty(entry.torch_shape, dtype=dtype)
        if not self.maps(entry):  # another writer misaligned it: a copy, not a view
            data = bytearray(self._map[offset : offset + entry.nbytes])
            return torch.frombuffer(data, dtype=dtype).view(entry.torch_shape)
        tensor = torch.frombuffer(self._map, dtype=dtype, count=entry.numel, offset=offset)
        return tensor.view(entry.torch_shape)

    def prefetch(
        self, offsets: Sequence[int], sizes: Sequence[int], stop: threading.Event | None = None
    ) -> None:
        """Fault in the pages of these ranges now: 64 MB pieces on 4 threads; all in the page cache
        and fewer cores beside the build, 512 MB pieces on those cores (``prefetch_threads``).

        Touched lazily, weights fault in model order, which jumps around the file and defeats
        readahead. One touch per page, in file order within each piece, several pieces in flight,
        keeps the disk's queue full (benchmarks/README.md). ``stop`` abandons the pieces not yet started.
        """
        view = torch.frombuffer(self._map, dtype=torch.uint8)
        ranges = list(zip(offsets, sizes, strict=True))
        chunks = plan_chunks(ranges, _faults.tuned("prefetch_piece_bytes", PREFETCH_PIECE_BYTES))
        try:
            with reading(self.header) as fd:
                threads = prefetch_threads(fd, chunks, usable_cores())
        except OSError:  # its name gone, say: the speed alone depends on this answer
            threads = PREFETCH_THREADS
        if threads < PREFETCH_THREADS:  # all in the page cache: CPU work beside the build
            chunks = plan_chunks(ranges, _faults.tuned("prefetch_hot_piece_bytes", HOT_PIECE_BYTES))

        openmp = loaded_openmp()

        def piece(chunk: Chunk) -> None:  # one thread's ops: libgomp ends the process where a team
            if stop is None or not stop.is_set():  # of ours cannot have threads (a pids limit)
                with serial_ops(openmp):
                    _faults.point("touch", str(chunk.file_offset))
                    touch_pages(view, chunk.file_offset, chunk.length)

        map_on_crew(piece, chunks, threads, "sa3loader-prefetch")  # raises what a piece raised


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's cpuset)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def prefetch_threads(fd: int, chunks: Sequence[Chunk], cores: int) -> int:
    """Threads to fault ``chunks`` in with.

    Pages on disk: ``PREFETCH_THREADS``, each waiting on a read, keep the disk's queue full.
    Pages all in the page cache (a byte of each chunk, read only if it is there: ``RWF_NOWAIT``):
    faulting is CPU work alone, and threads beyond the cores the build leaves (the early
    prefetch runs beside the factory) slow the build more than they speed the faulting
    (benchmarks/README.md). Only the speed depends on this.
    """
    spare = max(1, min(PREFETCH_THREADS, cores - 1))
    if spare == PREFETCH_THREADS or not all(in_page_cache(fd, c.file_offset + c.length // 2) for c in chunks):
        return PREFETCH_THREADS
    return spare


def in_page_cache(fd: int, offset: int) -> bool:
    """Whether the byte at ``offset`` is in the page cache: False where that cannot be told."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None:
        return False
    try:
        return os.preadv(fd, [bytearray(1)], offset, nowait) == 1
    except OSError:  # EAGAIN: on disk; EOPNOTSUPP: a filesystem that cannot say
        return False


def touch_pages(view: torch.Tensor, start: int, length: int) -> None:
    """Read one byte of every page of ``view[start:start + length]``, faulting the pages in."""
    view[start : start + length : PAGE_BYTES].sum()


# Reads: chunks in parallel, straight into CPU tensors or through the staging ring to a device.
logger = logging.getLogger(__name__)

READ_THREADS = 4
# The staging ring is at most 256 MB of pinned memory whatever the model size. Each
# slot has its own reader thread, so bigger hosts get more, smaller chunks in flight.
RING_BYTES = 256 * 1024 * 1024
MAX_RING_SLOTS = 8


def ring_shape(cpu_count: int) -> tuple[int, int]:
    """(slots, bytes per slot) for a host with ``cpu_count`` cores.

    torch's pinned-memory cache rounds every block up to a power of two and keeps
    it, so a slot is a power of two: what the ring reports is what it pins, and the
    whole stays within RING_BYTES (2 x 128 MB on 2-5 cores, 3-4 x 64 MB up to 9,
    5-8 x 32 MB beyond).
    """
    slots = min(MAX_RING_SLOTS, max(2, cpu_count // 2))
    return slots, 1 << ((RING_BYTES // slots).bit_length() - 1)


RING_SLOTS, RING_SLOT_BYTES = ring_shape(os.cpu_count() or 2)


def pinned_block_bytes(nbytes: int) -> int:
    """What torch's pinned-memory cache takes for a request of ``nbytes``: the next power of two."""
    return 1 << max(0, nbytes - 1).bit_length()


def release_pinned_cache() -> None:
    """Give the pinned blocks torch keeps cached back to the system (upstream pins nothing).

    ``torch.accelerator.empty_host_cache`` where this torch has it; a no-op elsewhere.
    """
    _faults.point("release_pinned")
    accelerator = getattr(torch, "accelerator", None)
    empty = getattr(accelerator, "empty_host_cache", None)
    available = getattr(accelerator, "is_available", lambda: True)
    if empty is not None and available():  # without one, nothing was pinned
        empty()


def _byte_view(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def writable_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes as a writable memoryview, for reads straight into it.
    Through ctypes, not ``Tensor.numpy()``: numpy is not a dependency. The view does not keep
    the tensor alive: the caller holds it while the view is used."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("reads go straight into contiguous CPU tensors only")
    nbytes = tensor.numel() * tensor.element_size()
    if not nbytes:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _byte_ranges(dests: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[tuple[int, int]]:
    return [(off, t.numel() * t.element_size()) for off, t in zip(offsets, dests, strict=True)]


def _chunk_views(chunk: Chunk, dests: list[memoryview], scratch: memoryview | None) -> list[memoryview]:
    """The chunk's bytes as destination slices, gaps going to ``scratch``."""
    views: list[memoryview] = []
    at = 0
    for piece in sorted(chunk.pieces, key=lambda p: p.chunk_offset):
        if piece.chunk_offset > at:
            assert scratch is not None, "a chunk with gaps needs a scratch buffer"
            views.append(scratch[: piece.chunk_offset - at])
        views.append(dests[piece.index][piece.dest_offset : piece.dest_offset + piece.length])
        at = piece.chunk_offset + piece.length
    return views


HUGE_PAGE_BYTES = 2 * 1024 * 1024
# Below this, asking for huge pages cost more (the kernel compacts memory to find
# them) than the fewer faults saved; measured on the medium and small-music layouts.
HUGE_PAGE_MIN_TENSOR_BYTES = 32 * 1024 * 1024
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)  # Linux only
_libc = ctypes.CDLL(None) if _MADV_HUGEPAGE is not None else None


def advise_huge_pages(tensor: torch.Tensor) -> None:
    """Ask for transparent huge pages for a large CPU tensor about to be filled.

    Fresh anonymous memory is faulted in and zeroed a page at a time; with 2 MB
    pages, reading into tensors of 32 MB and more went faster (benchmarks/README.md).
    A no-op where the kernel or platform has no such advice.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if _libc is None or tensor.device.type != "cpu" or nbytes < HUGE_PAGE_MIN_TENSOR_BYTES:
        return
    start = -(-tensor.data_ptr() // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = (tensor.data_ptr() + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if end > start:
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_HUGEPAGE)


def read_into(
    path: str,
    dests: Sequence[torch.Tensor],
    offsets: Sequence[int],
    *,
    chunk_bytes: int = CHUNK_BYTES,
    threads: int = READ_THREADS,
    fd: int | None = None,
) -> None:
    """Read ``dests[i].nbytes`` bytes at file offset ``offsets[i]`` into each CPU tensor.

    Through ``fd`` when given (a load's own descriptor of the file), else ``path`` opened now.
    """
    for dest in dests:
        advise_huge_pages(dest)
    ranges = _byte_ranges(dests, offsets)
    views = [writable_bytes(t) for t in dests]
    chunks = plan_chunks(ranges, chunk_bytes)
    local = threading.local()

    def read(chunk: Chunk) -> None:
        # Gap bytes are read and dropped; most chunks have none, so no scratch.
        if chunk.length > sum(p.length for p in chunk.pieces) and not hasattr(local, "scratch"):
            local.scratch = memoryview(bytearray(MAX_GAP_BYTES))
        targets = _chunk_views(chunk, views, getattr(local, "scratch", None))
        preadv_exact(descriptor, targets, chunk.file_offset, path)

    with _descriptor(path, fd) as descriptor:
        if len(chunks) <= 1:  # one tensor, say: not worth starting threads
            for chunk in chunks:
                read(chunk)
        else:
            map_on_crew(read, chunks, threads, "sa3loader-read")


@contextlib.contextmanager
def _descriptor(path: str, fd: int | None) -> Iterator[int]:
    """``fd`` as it is (its owner closes it), or ``path`` opened for the block."""
    if fd is not None:
        yield fd
        return
    own = open_for_reading(path)
    try:
        yield own
    finally:
        os.close(own)


@dataclass
class StreamStats:
    """What one ``stream_into`` did: for the benchmark and ``LoadInfo``."""

    bytes: int = 0
    chunks: int = 0
    pinned: bool = False
    staging_bytes: int = 0


def _staging(slots: int, nbytes: int, pin: bool) -> tuple[list[torch.Tensor], bool]:
    """The ring's buffers: pinned blocks of the size torch's cache really takes, else pageable."""
    if pin:
        try:
            size = pinned_block_bytes(nbytes)
            return [torch.empty(size, dtype=torch.uint8, pin_memory=True) for _ in range(slots)], True
        except RuntimeError as exc:  # no CUDA driver, or a locked-memory limit
            warn_once("pinned", "pinned host memory unavailable (%s); staging in pageable memory", exc)
    return [torch.empty(nbytes, dtype=torch.uint8) for _ in range(slots)], False


class DeviceCopies:
    """Copies out of ring slots into device tensors; this base copies synchronously.

    The ring's contract: ``select`` runs first in each reader thread (it makes the
    target device current there), ``send`` issues a slot's copies, ``wait``
    returns once that slot may be refilled, ``finish`` once every copy has landed.
    """

    def select(self) -> None:
        """Called once in each reader thread before any of its waits."""

    def send(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for dest, src in pairs:
            dest.copy_(src)

    def wait(self, slot: int) -> None:
        """Called from reader threads before refilling ``slot``."""

    def finish(self) -> None:
        pass


class CudaCopies(DeviceCopies):
    """Non-blocking copies on a side stream; one event per slot guards its refill."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device)
        # The destinations were allocated on the current stream, whose queued work
        # may still use that memory: the side stream's writes wait for it.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.done: dict[int, torch.cuda.Event] = {}

    def send(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.cuda.stream(self.stream):
            for dest, src in pairs:
                dest.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        self.done[slot] = event

    def select(self) -> None:
        # A thread's current device is its own (0 by default): an event wait there on a
        # load to cuda:1 would set up a second context on GPU 0.
        torch.cuda.set_device(self.device)

    def wait(self, slot: int) -> None:
        event = self.done.get(slot)
        if event is not None:
            event.synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


def stream_into(
    path: str,
    dests: Sequence[torch.Tensor],
    offsets: Sequence[int],
    *,
    chunk_bytes: int | None = None,
    slots: int | None = None,
    pin: bool = True,
    copies: DeviceCopies | None = None,
    fd: int | None = None,
) -> StreamStats:
    """Like ``read_into`` for tensors on any device, through a bounded ring of host buffers
    (``chunk_bytes`` x ``slots``; by default the ring this machine's cores call for)."""
    chunk_bytes = _faults.tuned("ring_slot_bytes", RING_SLOT_BYTES) if chunk_bytes is None else chunk_bytes
    slots = _faults.tuned("ring_slots", RING_SLOTS) if slots is None else slots
    if not all(t.is_contiguous() for t in dests):  # reshape would copy: the bytes would land there
        raise ValueError("reads go straight into contiguous tensors only")
    ranges = _byte_ranges(dests, offsets)
    chunks = plan_chunks(ranges, chunk_bytes)
    stats = StreamStats(bytes=sum(n for _, n in ranges), chunks=len(chunks))
    if not chunks:
        return stats
    device = next(t.device for t in dests if t.numel())
    cuda = device.type == "cuda"
    if copies is None:
        copies = _faults.fact("device_copies", device.type, CudaCopies(device) if cuda else DeviceCopies())
    slots = max(1, min(slots, len(chunks)))
    ring, pinned = _staging(slots, max(c.length for c in chunks), pin and cuda)
    stats.pinned = _faults.fact("pinned", None, pinned)
    stats.staging_bytes = sum(t.numel() for t in ring)
    ring_views = [writable_bytes(t) for t in ring]
    targets = [_byte_view(t) if t.numel() else t for t in dests]

    local = threading.local()

    def read(i: int) -> None:
        if not getattr(local, "selected", False):
            copies.select()
            local.selected = True
        slot = i % slots
        copies.wait(slot)  # its previous chunk's copies must have left the buffer
        chunk = chunks[i]
        preadv_exact(descriptor, [ring_views[slot][: chunk.length]], chunk.file_offset, path)

    try:
        with _descriptor(path, fd) as descriptor, Helpers(slots, "sa3loader-stream") as pool:
            pending = {i: pool.submit(read, i) for i in range(slots)}
            for i, chunk in enumerate(chunks):
                pending.pop(i).result()
                slot = i % slots
                buffer = ring[slot]
                pairs = [
                    (
                        targets[p.index][p.dest_offset : p.dest_offset + p.length],
                        buffer[p.chunk_offset : p.chunk_offset + p.length],
                    )
                    for p in chunk.pieces
                ]
                copies.send(slot, pairs)
                if i + slots < len(chunks):
                    pending[i + slots] = pool.submit(read, i + slots)
    finally:
        try:
            copies.finish()  # a sticky device error raises here: the ring is given back all the same
        finally:
            ring_views.clear()  # the last references to the ring's memory
            ring.clear()
            if stats.pinned:
                release_pinned_cache()
    return stats

"""Comparing a sibling with fp16 of its source, every byte: ``verify``, ``cache verify`` and
``convert --verify``. The source is read ahead on a thread, cast piece by piece, and each
piece compared with the sibling's bytes; the largest difference is measured where they differ."""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from . import _config, _faults
from ._crew import started
from ._dtypes import converted_dtype, torch_dtype
from ._format import Header, TensorEntry, pieces_of, preadv_exact, read_exact, reading
from ._progress import byte_bar, progress_enabled
from .errors import VerificationError

CHUNK_ELEMENTS = 4 * 1024 * 1024


PIPELINE_SLOTS = 4  # buffers in flight: being read, cast, compared


def _chunk_elements() -> int:
    return _faults.tuned("chunk_elements", CHUNK_ELEMENTS)


def _piece_plan(header: Header, entries: Iterable[TensorEntry]) -> list[tuple[TensorEntry, int, int]]:
    """(entry, file offset, bytes) of every piece, at most one chunk each, in the given order."""
    return [
        (entry, offset, length)
        for entry in entries
        for offset, length in pieces_of(header.data_start + entry.begin, entry.nbytes, _chunk_elements() * 4)
    ]


class _Pieces:
    """The sibling's bytes for ``entries``, one bounded piece at a time, read ahead on a thread.

    F32 pieces come cast to fp16; any other dtype as read. Each piece lives in one of
    ``PIPELINE_SLOTS`` buffers until ``release(slot)``: reading the next pieces
    overlaps whatever the caller does with this one (counting, writing).
    """

    def __init__(self, header: Header, entries: Iterable[TensorEntry], fd: int) -> None:
        self._header, self._fd = header, fd
        self._keys = _piece_plan(header, entries)
        self._slots = [
            (bytearray(_chunk_elements() * 4), bytearray(_chunk_elements() * 2))
            for _ in range(PIPELINE_SLOTS)
        ]
        self._free: queue.Queue[int | None] = queue.Queue()
        for slot in range(PIPELINE_SLOTS):
            self._free.put(slot)
        self._ready: queue.Queue[tuple[int, TensorEntry, int] | BaseException | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read_ahead, name="sa3loader-read-ahead", daemon=True)

    def __enter__(self) -> _Pieces:
        try:
            started(self._reader, without=f"{self._header.path} is read without reading ahead")
        except BaseException:  # Ctrl-C inside start: the reader may run all the same; it stops now
            self._stop_reader()
            raise
        return self

    def _stop_reader(self) -> None:
        """The reader ends at its next wait for a buffer: none is left but the stop."""
        try:
            with contextlib.suppress(queue.Empty):
                while True:
                    self._free.get_nowait()
        finally:  # a second Ctrl-C in the drain: the stop still goes in (after the buffers left)
            self._free.put(None)

    def __exit__(self, *exc: object) -> None:
        if self._reader.ident is not None:
            self._stop_reader()
            self._reader.join()

    def _reads(self) -> Iterator[tuple[int, TensorEntry, int]]:
        """Each piece read into a free buffer: (its buffer, its tensor, its length)."""
        for entry, offset, length in self._keys:
            slot = self._free.get()
            if slot is None:  # the caller stopped early
                return
            preadv_exact(self._fd, [memoryview(self._slots[slot][0])[:length]], offset, self._header.path)
            yield slot, entry, length

    def _read_ahead(self) -> None:
        try:
            for item in self._reads():
                self._ready.put(item)
            self._ready.put(None)
        except BaseException as exc:  # handed to the caller, which raises it
            self._ready.put(exc)

    def _read(self) -> Iterator[tuple[int, TensorEntry, int]]:
        if self._reader.ident is None:  # not started: no reader to wait for
            yield from self._reads()
            return
        while (item := self._ready.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item

    def __iter__(self) -> Iterator[tuple[int, TensorEntry, memoryview]]:
        for slot, entry, length in self._read():
            raw, half = self._slots[slot]
            if entry.dtype != "F32":
                yield slot, entry, memoryview(raw)[:length]
                continue
            n = length // 4
            src = torch.frombuffer(raw, dtype=torch.float32, count=n)
            dst = torch.frombuffer(half, dtype=torch.float16, count=n)
            dst.copy_(src)
            yield slot, entry, memoryview(half)[: n * 2]

    def release(self, slot: int) -> None:
        self._free.put(slot)


def _sibling_pieces(
    header: Header, entries: Iterable[TensorEntry], fd: int
) -> Iterator[tuple[TensorEntry, memoryview]]:
    """``_Pieces`` for a caller that is done with each piece when it asks for the next."""
    with _Pieces(header, entries, fd) as pieces:
        for slot, entry, piece in pieces:
            yield entry, piece
            pieces.release(slot)


@dataclass
class Comparison:
    """What comparing a sibling with fp16 of its source measured."""

    float_tensors: int  # float tensors compared, zero-element ones included
    max_abs_diff: float  # over them: 0.0 when every value is equal (a NaN equals a NaN of the same bits)
    mismatched: list[str]  # every tensor with a differing byte, float or not

    @property
    def equal(self) -> bool:
        return not self.mismatched


def _max_abs_diff(dtype: str, actual: bytes | bytearray, expected: memoryview, path: str) -> float:
    """Largest |actual - expected| of one piece that differs; inf where a NaN meets a number."""
    try:
        kind = torch_dtype(converted_dtype(dtype), path)
        a = torch.frombuffer(bytearray(actual), dtype=kind).to(torch.float64)
        e = torch.frombuffer(bytearray(expected), dtype=kind).to(torch.float64)
    except (RuntimeError, TypeError, ValueError):  # a float8 or packed type without a cast
        return math.inf
    diff = (a - e).abs()
    diff[a.isnan() & e.isnan()] = 0.0
    diff[a.isnan() ^ e.isnan()] = math.inf
    diff[(a == e)] = 0.0  # inf == inf
    return float(diff.max()) if diff.numel() else 0.0


def compare(source: Header, sibling: Header, *, progress: bool = False) -> Comparison:
    """Read both files: every sibling byte against fp16(source), and the largest difference."""
    at = {e.name: sibling.data_start + sibling.by_name[e.name].begin for e in source.entries}
    float_names = {
        e.name for e in source.entries if torch_dtype(converted_dtype(e.dtype), source.path).is_floating_point
    }
    mismatched: dict[str, None] = {}
    worst = 0.0
    total = sum(sibling.by_name[e.name].nbytes for e in source.entries)
    shown = progress_enabled(progress and _config.progress())
    with (
        reading(source) as src_fd,
        reading(sibling) as sib_fd,
        byte_bar(f"check {os.path.basename(sibling.path)}", total, shown) as bar,
    ):
        for entry, expected in _sibling_pieces(source, source.entries, src_fd):
            actual = read_exact(sib_fd, at[entry.name], len(expected), sibling.path)
            at[entry.name] += len(expected)
            bar.update(len(expected))
            if actual == expected:
                continue
            mismatched[entry.name] = None
            if entry.name in float_names:
                worst = max(worst, _max_abs_diff(entry.dtype, actual, expected, sibling.path))
    return Comparison(len(float_names), worst, list(mismatched))


def verify(source: Header, sibling: Header) -> Comparison:
    """Full content check: ``VerificationError`` unless every sibling byte equals fp16(source)."""
    comparison = compare(source, sibling)
    if not comparison.equal:
        raise VerificationError(
            f"{sibling.path}: tensor {comparison.mismatched[0]!r} differs from fp16 of {source.path}",
            filename=sibling.path,
        )
    return comparison

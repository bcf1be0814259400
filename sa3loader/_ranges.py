"""Plan reads of wanted byte ranges of a file: pure arithmetic, no I/O.

Shared by the chunked reader (``_stream``) and the mapped file's prefetch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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

"""Who a source checkpoint is: hard fields, soft fields and a content fingerprint.

Hard fields (size, mtime_ns, header sha256) change when the weights may have
changed: any mismatch means reconvert. Soft fields (inode, device, ctime_ns)
change when the same bytes are copied to a new image layer or mount: a
mismatch there alone is settled by re-reading a sampled fingerprint, not by
reconverting gigabytes.

The fingerprint sees every tensor: tensors up to ``WHOLE_TENSOR_BYTES`` are
hashed whole, larger ones at ``SPOTS`` evenly spaced spots that include their
first and last bytes. A change confined to one tensor is caught unless it hides
in the unsampled interior of a large tensor; only ``verify`` reads every byte.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ._format import Header, read_exact, reading

HARD_FIELDS = ("size", "mtime_ns", "header_sha256")
SOFT_FIELDS = ("inode", "device", "ctime_ns")
FINGERPRINT_VERSION = "v2"
WHOLE_TENSOR_BYTES = 1 << 20
SPOT_BYTES = 4096
SPOTS = 5  # first, last and three between
# Cold, the spots are random reads: several in flight keep the disk's queue full.
READ_THREADS = 8
# Ranges closer than this are read as one.
MERGE_GAP_BYTES = 64 * 1024


def source_identity(header: Header) -> dict[str, Any]:
    """Identity of the file behind ``header``: the stat taken when it was opened, else now."""
    st = header.handle.stat if header.handle is not None else os.stat(header.path)
    return {
        "size": st.st_size,
        "mtime_ns": st.st_mtime_ns,
        "header_sha256": header.sha256,
        "inode": st.st_ino,
        "device": st.st_dev,
        "ctime_ns": st.st_ctime_ns,
    }


def hard_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(f) == b.get(f) for f in HARD_FIELDS)


def soft_match(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return all(a.get(f) == b.get(f) for f in SOFT_FIELDS)


def fingerprint_ranges(header: Header) -> list[tuple[int, int]]:
    """File (offset, length) ranges the fingerprint hashes, in file order."""
    ranges = []
    for entry in sorted(header.entries, key=lambda e: e.begin):
        start = header.data_start + entry.begin
        if entry.nbytes <= WHOLE_TENSOR_BYTES:
            if entry.nbytes:
                ranges.append((start, entry.nbytes))
            continue
        span = entry.nbytes - SPOT_BYTES
        ranges += [(start + span * i // (SPOTS - 1), SPOT_BYTES) for i in range(SPOTS)]
    return ranges


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in ranges:
        if merged and offset - sum(merged[-1]) <= MERGE_GAP_BYTES:
            merged[-1] = (merged[-1][0], max(sum(merged[-1]), offset + length) - merged[-1][0])
        else:
            merged.append((offset, length))
    return merged


def fingerprint(header: Header) -> str:
    """sha256 over every small tensor and spots of every large one (see the module doc)."""
    ranges = fingerprint_ranges(header)
    reads = _merged(ranges)
    with reading(header) as fd, ThreadPoolExecutor(READ_THREADS) as pool:
        blocks = list(pool.map(lambda r: read_exact(fd, r[0], r[1], header.path), reads))
    digest = hashlib.sha256(f"{FINGERPRINT_VERSION}:{header.file_size}:{header.sha256}".encode())
    block = 0
    for offset, length in ranges:
        while offset >= reads[block][0] + reads[block][1]:
            block += 1
        start = offset - reads[block][0]
        digest.update(memoryview(blocks[block])[start : start + length])
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"

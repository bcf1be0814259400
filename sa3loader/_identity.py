"""Who a source checkpoint is: hard fields, soft fields and a content fingerprint.

Hard fields (size, mtime_ns, header sha256) change when the weights may have
changed: any mismatch means reconvert. Soft fields (inode, device, ctime_ns)
change when the same bytes are copied to a new image layer or mount: a
mismatch there alone is settled by re-reading a sampled fingerprint, not by
reconverting gigabytes.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ._format import Header

HARD_FIELDS = ("size", "mtime_ns", "header_sha256")
SOFT_FIELDS = ("inode", "device", "ctime_ns")
FINGERPRINT_SAMPLES = 64
FINGERPRINT_SAMPLE_BYTES = 64 * 1024


def source_identity(header: Header) -> dict[str, Any]:
    """Identity of the file behind ``header`` (stat taken now)."""
    st = os.stat(header.path)
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


def fingerprint(path: str, size: int) -> str:
    """sha256 over evenly spaced samples of the file: cheap, catches rewrites."""
    digest = hashlib.sha256(str(size).encode())
    span = max(size - FINGERPRINT_SAMPLE_BYTES, 0)
    with open(path, "rb", buffering=0) as f:
        for i in range(FINGERPRINT_SAMPLES):
            offset = span * i // max(FINGERPRINT_SAMPLES - 1, 1)
            digest.update(os.pread(f.fileno(), FINGERPRINT_SAMPLE_BYTES, offset))
    return digest.hexdigest()

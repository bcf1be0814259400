"""Who a source checkpoint is, and what a sibling claims about the source it was made from.

Hard fields (size, mtime_ns, header sha256) change when the weights may have changed: any
mismatch means reconvert. Soft fields (inode, device, ctime_ns) change when the same bytes
are copied to a new image layer or mount: a mismatch there alone is settled by reading a
sampled fingerprint again, not by reconverting gigabytes.

The fingerprint sees every tensor: tensors up to ``WHOLE_TENSOR_BYTES`` are hashed whole,
larger ones at ``SPOTS`` evenly spaced spots that include their first and last bytes. A
change confined to one tensor is caught unless it hides in the unsampled interior of a large
tensor; only ``verify`` reads every byte.

A sibling carries ``sa3loader.*`` metadata (``SiblingClaim``): the source's hard fields and
fingerprint, so that a sibling found without an index row is checked against its source all
the same. A hub blob's name only places its sibling (``_places.cache_path``): it never stands
for the content.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import stat
import struct
from collections.abc import Callable

import torch

from . import _faults
from ._crew import map_on_crew
from ._dtypes import converted_dtype
from ._format import (
    DTYPE_BITS,
    HEADER_LENGTH_BYTES,
    MAX_HEADER_BYTES,
    Header,
    TensorEntry,
    open_header,
    read_exact,
    read_header,
    reading,
)
from ._host import stat_vouches
from ._places import blob_name
from ._records import (
    DAMAGED,
    FORMAT_VERSION,
    MARKER_KEY,
    META_PREFIX,
    MISSING_SIBLING,
    MISSING_SOURCE,
    OK,
    STALE,
    UNREADABLE_SOURCE,
    UNTRUSTED,
    IndexRow,
    SiblingClaim,
    SourceIdentity,
    sibling_file,
)
from ._trust import owner_problem
from .errors import Sa3LoaderError

FINGERPRINT_VERSION = "v2"
WHOLE_TENSOR_BYTES = 1 << 20
SPOT_BYTES = 4096
SPOTS = 5  # first, last and three between
# Cold, the spots are random reads: several in flight keep the disk's queue full.
READ_THREADS = 8
# Ranges closer than this are read as one.
MERGE_GAP_BYTES = 64 * 1024
# git's racy-clean rule: a check within this long of the source's mtime may predate a write
# in the same timestamp tick (FAT counts in 2 s), so it is made again.
RACY_WINDOW_NS = 2_000_000_000
# A change is stamped from the kernel's coarse clock: a tick of 1/HZ, at most 10 ms. A ctime of
# whole seconds (ext3, ext4 with small inodes) gets the window above.
CTIME_TICK_NS = 20_000_000
SECOND_NS = 1_000_000_000


def identity_of(header: Header) -> SourceIdentity:
    """The identity of the file behind ``header``: the stat taken when it was opened, else now."""
    st = header.handle.stat if header.handle is not None else os.stat(header.path)
    blob = hub_blob(header.path, st)
    return SourceIdentity(
        st.st_size, st.st_mtime_ns, header.sha256, st.st_ino, st.st_dev, st.st_ctime_ns, blob
    )


def claim_of(sibling: Header) -> SiblingClaim | None:
    """What ``sibling``'s metadata says about its source."""
    return SiblingClaim.of(sibling.metadata)


def hub_blob(path: str, st: os.stat_result) -> str | None:
    """The sha256 a hub cache names this file's content by, when ``path`` resolves to a blob
    and that blob is the very file ``st`` describes (not one a repointed link leads to now)."""
    real = os.path.realpath(path)
    name = blob_name(real)
    if name is None:
        return None
    try:
        now = os.stat(real)
    except OSError:
        return None
    return name if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None


def hard_match(a: SourceIdentity | SiblingClaim, b: SourceIdentity | SiblingClaim) -> bool:
    """Same size, mtime and header: nothing says the weights changed."""
    return (a.size, a.mtime_ns, a.header_sha256) == (b.size, b.mtime_ns, b.header_sha256)


def soft_match(a: SourceIdentity, b: SourceIdentity) -> bool:
    """The same file: same inode, device and ctime."""
    return (a.inode, a.device, a.ctime_ns) == (b.inode, b.device, b.ctime_ns)


def racy(source: SourceIdentity, checked_ns: int | None) -> bool:
    """A check that may predate a write of the source in the same timestamp tick: the mtime's
    (git's racy-clean rule) or the ctime's (a rewrite that sets the mtime back keeps every
    field when the ctime does not move either)."""
    if type(checked_ns) is not int:
        return True
    whole_seconds = source.ctime_ns % SECOND_NS == 0  # a filesystem that keeps only seconds
    ctime_tick = RACY_WINDOW_NS if whole_seconds else CTIME_TICK_NS
    return source.mtime_ns + RACY_WINDOW_NS > checked_ns or source.ctime_ns + ctime_tick > checked_ns


def current_fingerprint(value: object) -> bool:
    """Whether a stored fingerprint was made by this version's algorithm (another's cannot be compared)."""
    return isinstance(value, str) and value.startswith(FINGERPRINT_VERSION + ":")


def fingerprint_spots(header: Header) -> list[tuple[TensorEntry, int, int]]:
    """(tensor, offset in its bytes, length) of every spot the fingerprint hashes, in file order:
    small tensors whole, large ones at ``SPOTS`` evenly spaced places."""
    spots = []
    for entry in sorted(header.entries, key=lambda e: e.begin):
        if entry.nbytes <= WHOLE_TENSOR_BYTES:
            if entry.nbytes:
                spots.append((entry, 0, entry.nbytes))
            continue
        span = entry.nbytes - SPOT_BYTES
        spots += [(entry, span * i // (SPOTS - 1), SPOT_BYTES) for i in range(SPOTS)]
    return spots


def fingerprint_ranges(header: Header) -> list[tuple[int, int]]:
    """File (offset, length) ranges the fingerprint hashes, in file order."""
    return [(header.data_start + e.begin + offset, n) for e, offset, n in fingerprint_spots(header)]


def _merged(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for offset, length in sorted(ranges):
        if merged and offset - sum(merged[-1]) <= MERGE_GAP_BYTES:
            merged[-1] = (merged[-1][0], max(sum(merged[-1]), offset + length) - merged[-1][0])
        else:
            merged.append((offset, length))
    return merged


class FileBytes:
    """Bytes of one file at many small ranges, read together: nearby ranges as one read,
    several reads in flight (cold, they are random reads)."""

    def __init__(self, header: Header, ranges: list[tuple[int, int]]) -> None:
        _faults.point("spots", header.path)
        self.reads = _merged(ranges)
        # One task per thread, each a run of reads: a task per read costs more than a hot read.
        runs = [self.reads[i::READ_THREADS] for i in range(min(READ_THREADS, len(self.reads)))]
        done: list[list[bytearray]] = [[] for _ in runs]
        with reading(header) as fd:

            def read_run(i: int) -> None:
                done[i] = [read_exact(fd, o, n, header.path) for o, n in runs[i]]

            # At exit (a publication the process waits for) or at a pids limit: the calling thread.
            map_on_crew(read_run, range(len(runs)), READ_THREADS, "sa3loader-spots")
        self.blocks = [done[i % len(runs)][i // len(runs)] for i in range(len(self.reads))]
        self._starts = [offset for offset, _ in self.reads]

    def at(self, offset: int, length: int) -> memoryview:
        """The file's bytes at ``offset`` (within one of the ranges read)."""
        block = bisect.bisect_right(self._starts, offset) - 1
        start = offset - self._starts[block]
        return memoryview(self.blocks[block])[start : start + length]


def _whole_elements(entry: TensorEntry, offset: int, length: int) -> tuple[int, int]:
    """A spot of ``entry``'s bytes widened to whole elements: (start, end) in its bytes."""
    item = max(1, DTYPE_BITS[entry.dtype] // 8)
    return offset // item * item, min(entry.nbytes, -(-(offset + length) // item) * item)


def read_spots(header: Header) -> FileBytes:
    """The file's bytes at every spot the fingerprint reads, widened to whole elements, so that
    the fingerprint and the sibling's spot check (``holds_fp16_of``) read the source once."""
    ranges = []
    for entry, offset, length in fingerprint_spots(header):
        start, end = _whole_elements(entry, offset, length)
        ranges.append((header.data_start + entry.begin + start, end - start))
    return FileBytes(header, ranges)


def fingerprint(header: Header, spots: FileBytes | None = None) -> str:
    """sha256 over every small tensor and spots of every large one (see the module doc);
    from ``spots`` (``read_spots`` of this header) when given."""
    _faults.point("fingerprint", header.path)
    spots = read_spots(header) if spots is None else spots
    digest = hashlib.sha256(f"{FINGERPRINT_VERSION}:{header.file_size}:{header.sha256}".encode())
    for offset, length in fingerprint_ranges(header):
        digest.update(spots.at(offset, length))
    return f"{FINGERPRINT_VERSION}:{digest.hexdigest()}"


def sibling_metadata(header: Header, identity: SourceIdentity, fingerprint: str) -> dict[str, str]:
    """The source's metadata plus ours, so that a sibling describes its source."""
    # For people reading the header; a name that is not UTF-8 (legal on Linux) as its bytes.
    name = os.fsencode(os.path.basename(header.path)).decode("utf-8", "backslashreplace")
    ours = {
        MARKER_KEY: FORMAT_VERSION,
        META_PREFIX + "source_name": name,
        META_PREFIX + "source_size": str(identity.size),
        META_PREFIX + "source_mtime_ns": str(identity.mtime_ns),
        META_PREFIX + "source_header_sha256": identity.header_sha256,
        META_PREFIX + "source_fingerprint": fingerprint,
    }
    return {**header.metadata, **ours}


def has_float32(header: Header) -> bool:
    """Whether the source has a sibling at all: only float32 tensors become float16."""
    return any(e.dtype == "F32" for e in header.entries)


def is_sa3loader_file(header: Header) -> bool:
    return MARKER_KEY in header.metadata


def is_sa3loader_path(path: str) -> bool:
    """True only for a readable safetensors file (not a symlink) that carries sa3loader's marker."""
    try:
        return is_sa3loader_file(read_header(path, follow_symlinks=False))
    except (Sa3LoaderError, OSError):
        return False


def marked_by_sa3loader(path: str) -> bool:
    """Whether the regular file at ``path`` (never through a symlink) says in its header's own
    metadata that sa3loader wrote it, even where its data was cut short (a truncated sibling,
    which ``is_sa3loader_path`` refuses): what sa3loader may replace or remove at a sibling
    place. JSON only, the header's length bounded as safetensors bounds it."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError):
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        first = os.pread(fd, HEADER_LENGTH_BYTES, 0)
        (length,) = struct.unpack("<Q", first) if len(first) == HEADER_LENGTH_BYTES else (0,)
        if not 0 < length <= MAX_HEADER_BYTES:
            return False
        metadata = json.loads(os.pread(fd, length, HEADER_LENGTH_BYTES)).get("__metadata__")
        return isinstance(metadata, dict) and MARKER_KEY in metadata
    except (OSError, ValueError, AttributeError):
        return False
    finally:
        os.close(fd)


def describes(sibling: Header, source: Header) -> bool:
    """The sibling holds exactly the converted tensors of ``source`` (header level)."""
    if len(sibling.entries) != len(source.entries):
        return False
    for entry in source.entries:
        other = sibling.by_name.get(entry.name)
        if other is None or other.shape != entry.shape or other.dtype != converted_dtype(entry.dtype):
            return False
    return True


def sibling_matches_source(sibling: Header, source: Header) -> bool:
    """Whether ``sibling`` is sa3loader's sibling of the file ``source`` is now: header, hard
    fields and fingerprint (a rewrite that sets the mtime back keeps the hard fields)."""
    claimed, identity = claim_of(sibling), identity_of(source)
    return (
        claimed is not None
        and is_sa3loader_file(sibling)
        and describes(sibling, source)
        and hard_match(claimed, identity)
        and current_fingerprint(claimed.fingerprint)
        and fingerprint(source) == claimed.fingerprint
    )


READ_STAT, READ_FINGERPRINT = "stat", "fingerprint"  # what showed a source is the one recorded


def recorded_by(
    source: Header, recorded: SourceIdentity, recorded_fingerprint: str, checked_ns: int | None
) -> str | None:
    """What shows ``source`` is the file an index row recorded, by a load's rule: the hard
    fields match, and the stat vouches (``READ_STAT``: the same file, not racy, on a filesystem
    whose stat can) or the fingerprint reads the same (``READ_FINGERPRINT``); None if neither."""
    current = identity_of(source)
    if not hard_match(current, recorded):
        return None
    if stat_stands_for(recorded, current, checked_ns, lambda: stat_vouches(source.path) is None):
        return READ_STAT
    if current_fingerprint(recorded_fingerprint) and fingerprint(source) == recorded_fingerprint:
        return READ_FINGERPRINT
    return None


def holds_fp16_of(sibling: Header, source: Header, spots: FileBytes | None = None) -> bool:
    """Whether ``sibling`` holds fp16(source) at every spot the fingerprint reads, widened to
    whole elements (the source's bytes there from ``spots`` when given: ``read_spots``). A claim
    is fingerprinted before the conversion reads the source, and a write through a shared
    mapping into a dirty page stamps nothing: a claim that matches the source says nothing of
    what was converted, so where the stat cannot vouch the sibling is read too."""
    spots = read_spots(source) if spots is None else spots
    wanted = []  # (source offset, length, sibling offset, whether cast)
    for entry, offset, length in fingerprint_spots(source):
        start, end = _whole_elements(entry, offset, length)
        cast = converted_dtype(entry.dtype) != entry.dtype  # F32 -> F16, as the converter casts
        at = sibling.data_start + sibling.by_name[entry.name].begin + (start // 2 if cast else start)
        wanted.append((source.data_start + entry.begin + start, end - start, at, cast))
    found = FileBytes(sibling, [(at, n // 2 if cast else n) for _, n, at, cast in wanted])
    for src_at, length, at, cast in wanted:
        raw = spots.at(src_at, length)
        expected = raw
        if cast:
            half = bytearray(length // 2)
            torch.frombuffer(half, dtype=torch.float16).copy_(torch.frombuffer(raw, dtype=torch.float32))
            expected = memoryview(half)
        if bytes(found.at(at, len(expected))) != bytes(expected):  # memoryviews compare by element
            return False
    return True


def stat_stands_for(
    recorded: SourceIdentity, current: SourceIdentity, checked_ns: int | None, vouches: Callable[[], bool]
) -> bool:
    """Whether the file's stat stands for the content recorded, so that no fingerprint is read:
    the very file checked then (inode, device, ctime), not racy, and ``vouches()`` (its
    filesystem's stat can: ``_host.stat_vouches``; asked last, as it reads the mount table).

    The invariant: a file's content changes only with its stat (size, mtime, ctime, device
    and inode together), unless (a) the change came within a timestamp tick of the check, or
    a page waited to be written then (``racy``: such a check records no time), or (b) the
    filesystem keeps no real ctime, or may give another file the same device and inode after
    a remount. In either case the fingerprint decides."""
    return soft_match(recorded, current) and not racy(recorded, checked_ns) and vouches()


def claims_recorded(claim: SiblingClaim | None, recorded: SourceIdentity, recorded_fingerprint: str) -> bool:
    """Whether a sibling's claim names the source an index row recorded: hard fields and fingerprint."""
    return claim is not None and hard_match(claim, recorded) and claim.fingerprint == recorded_fingerprint


def row_status(row: IndexRow, *, spots: bool = True, shared: bool = False) -> str:
    """Whether the row still describes its source and sibling, by a load's rule (the sibling's
    owner, as in a cache shared on purpose with ``shared``; headers; where the stat does not
    vouch, the fingerprint and, with ``spots``, the sibling where it reads; ``cache verify``
    reads every byte instead)."""
    try:
        if not stat.S_ISREG(os.stat(row.real_path).st_mode):  # a directory, FIFO or device in its place
            return MISSING_SOURCE
    except PermissionError:  # a folder above it closed for a while: neither gone nor changed
        return UNREADABLE_SOURCE
    except (OSError, ValueError):  # gone (or a name no file can have)
        return MISSING_SOURCE
    if not os.path.exists(row.sibling_path):
        return MISSING_SIBLING
    try:
        with open_header(row.real_path) as source:
            shown_by = recorded_by(source, row.source, row.fingerprint, row.checked_ns)
            return _sibling_status(row, source, shown_by, spots, shared)
    except PermissionError:  # (chmod 000 for a while): whether it changed cannot be told
        return UNREADABLE_SOURCE
    except (Sa3LoaderError, OSError):
        return STALE


def _sibling_status(row: IndexRow, source: Header, shown_by: str | None, spots: bool, shared: bool) -> str:
    try:
        with open_header(row.sibling_path, follow_symlinks=False) as sib:
            if shown_by is None:
                return STALE
            assert sib.handle is not None and source.handle is not None
            if owner_problem(sib.path, sib.handle.stat, source.handle.stat.st_uid, shared=shared):
                return UNTRUSTED
            claim = claim_of(sib)
            if sib.sha256 != row.sibling_header_sha256:
                # Another header: the sibling of another file now (a repointed link's, converted
                # over it), or this source's, altered since it was indexed.
                return DAMAGED if claims_recorded(claim, row.source, row.fingerprint) else STALE
            if claim is None or not _could_be_used(sib, claim, row.source, source):
                return STALE  # a load passes it by: another version's, or another file's
            unchanged = row.sibling_file == sibling_file(sib.handle.stat)  # else a load reads it
            if shown_by == READ_STAT and claim.fingerprint == row.fingerprint and unchanged:
                return OK  # a load reads nothing either
            # Read already where it showed the source unchanged (it equals the row's then).
            printed = row.fingerprint if shown_by == READ_FINGERPRINT else fingerprint(source)
            if printed != claim.fingerprint:
                return STALE
            # Where the row cannot vouch a load reads the sibling at the spots and converts again.
            return OK if not spots or holds_fp16_of(sib, source) else DAMAGED
    except (Sa3LoaderError, OSError):
        return DAMAGED


def _could_be_used(sibling: Header, claim: SiblingClaim, recorded: SourceIdentity, source: Header) -> bool:
    """What a load asks of a sibling before its content: of this version, made from a file with
    the recorded hard fields, holding exactly the source's tensors converted."""
    of_this_version = current_fingerprint(claim.fingerprint)
    return of_this_version and hard_match(claim, recorded) and describes(sibling, source)

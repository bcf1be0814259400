"""Find, validate or create the fp16 sibling of a source checkpoint.

Check, lock, check again: look for a valid sibling (index row, beside the
source, in the cache dir), take the lock for the chosen location, look again,
and only then convert. Every failure to write degrades to loading the fp32
source with one warning; nothing here may stop a load.

Trust only what you own. A sibling is opened without following symlinks and
without blocking, must be a regular file, and is used only when it belongs to
you or root (or to the source's owner, in a directory no one else can write);
a sibling written under another fingerprint version (another sa3loader) is
neither trusted nor overwritten: this version keeps its own in the cache dir.
The accepted sibling stays open: the load reads exactly the file it checked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from . import _config, _convert, _faults
from ._config import warn_once
from ._convert import Comparison, ConversionResult
from ._format import Header, open_header, read_exact, read_header, reading
from ._fsutil import (
    cache_dir_trust,
    make_private_dirs,
    owned_file_problem,
    stray_incomplete,
    writable_by_others,
)
from ._index import Index
from ._lock import LOCK_SUFFIX, ConversionLock
from ._mounts import stat_vouches
from ._publication import Publication, finish
from .errors import (
    CheckpointChangedError,
    ConversionError,
    HeaderError,
    LockTimeoutError,
    Sa3LoaderError,
    UnusableLockError,
    VerificationError,
)

logger = logging.getLogger(__name__)

# Name and place.
SIBLING_SUFFIX = ".fp16.safetensors"
UNSUFFIXED_SIBLING_SUFFIX = "-fp16.safetensors"
SAFETENSORS_SUFFIX = ".safetensors"
SIBLINGS_SUBDIR = "siblings"


# huggingface_hub names a repo's cache folder by its type: models--org--name, datasets--…, spaces--….
HF_REPO_FOLDER_PREFIXES = ("models--", "datasets--", "spaces--")
HF_REPO_SUBFOLDERS = ("snapshots", "blobs")


def in_hf_hub_cache(path: str) -> bool:
    """True for paths inside a Hugging Face hub cache (``<type>s--*/snapshots|blobs``, every repo type)."""
    for candidate in {os.path.abspath(path), os.path.realpath(path)}:
        parts = candidate.split(os.sep)
        for i, part in enumerate(parts[:-1]):
            if part.startswith(HF_REPO_FOLDER_PREFIXES) and parts[i + 1] in HF_REPO_SUBFOLDERS:
                return True
    return False


# An LFS file's blob is named by the sha256 of its content (huggingface_hub checks it on download).
HF_BLOB_NAME = re.compile(r"[0-9a-f]{64}")


def hub_blob(path: str, st: os.stat_result) -> str | None:
    """The sha256 a hub cache names this file's content by, when ``path`` resolves to
    ``<type>s--*/blobs/<sha256>`` and that blob is the very file ``st`` describes (not one
    a repointed snapshot link leads to now)."""
    real = os.path.realpath(path)
    parts = real.split(os.sep)
    if len(parts) < 3 or parts[-2] != "blobs" or not parts[-3].startswith(HF_REPO_FOLDER_PREFIXES):
        return None
    if not HF_BLOB_NAME.fullmatch(parts[-1]):
        return None  # a git blob (sha1 of a small text file), not an LFS content hash
    try:
        now = os.stat(real)
    except OSError:
        return None
    return parts[-1] if (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino) else None


def dir_writable(path: str) -> bool:
    return _faults.fact("dir_writable", path, os.path.isdir(path) and os.access(path, os.W_OK | os.X_OK))


def free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return _faults.fact("free_bytes", path, st.f_bavail * st.f_frsize)


def sibling_name(source_path: str) -> str:
    """``<stem>.fp16.safetensors`` for ``<stem>.safetensors``; ``<name>-fp16.safetensors`` otherwise.

    A source named without the suffix (``model``) must not share its sibling with
    ``model.safetensors`` beside it: the two would reconvert on every other load.
    """
    name = os.path.basename(source_path)
    if name.endswith(SAFETENSORS_SUFFIX):
        return name[: -len(SAFETENSORS_SUFFIX)] + SIBLING_SUFFIX
    return name + UNSUFFIXED_SIBLING_SUFFIX


def beside_path(source_path: str) -> str:
    return os.path.join(os.path.dirname(os.path.abspath(source_path)), sibling_name(source_path))


def cache_path(cache_dir: str, source_path: str, real_source: str, blob: str | None = None) -> str:
    """Sibling location in the cache dir, keyed by the hub blob's content hash when the
    source is one (every copy of that blob shares it), else by the real file."""
    key = f"blob:{blob}" if blob is not None else real_source
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return os.path.join(cache_dir, SIBLINGS_SUBDIR, digest, sibling_name(source_path))


# Identity of a source: hard fields, soft fields and a content fingerprint.
#
# Who a source checkpoint is: hard fields, soft fields and a content fingerprint.
#
# Hard fields (size, mtime_ns, header sha256) change when the weights may have
# changed: any mismatch means reconvert. Soft fields (inode, device, ctime_ns)
# change when the same bytes are copied to a new image layer or mount: a
# mismatch there alone is settled by re-reading a sampled fingerprint, not by
# reconverting gigabytes.
#
# The fingerprint sees every tensor: tensors up to ``WHOLE_TENSOR_BYTES`` are
# hashed whole, larger ones at ``SPOTS`` evenly spaced spots that include their
# first and last bytes. A change confined to one tensor is caught unless it hides
# in the unsampled interior of a large tensor; only ``verify`` reads every byte.
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
        "blob": hub_blob(header.path, st),
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
    _faults.point("fingerprint", header.path)
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


# The sibling's own metadata: what it says about its source.
FORMAT_VERSION = "1"
META_PREFIX = "sa3loader."
MARKER_KEY = META_PREFIX + "format_version"


def sibling_metadata(header: Header, identity: dict[str, Any], fingerprint: str) -> dict[str, str]:
    """The source's metadata plus ours, so that a sibling describes its source."""
    ours = {
        MARKER_KEY: FORMAT_VERSION,
        META_PREFIX + "source_name": os.path.basename(header.path),
        META_PREFIX + "source_size": str(identity["size"]),
        META_PREFIX + "source_mtime_ns": str(identity["mtime_ns"]),
        META_PREFIX + "source_header_sha256": identity["header_sha256"],
        META_PREFIX + "source_fingerprint": fingerprint,
    }
    if identity.get("blob") is not None:  # and which file it was, to tell a rewrite in place
        ours[META_PREFIX + "source_blob_sha256"] = identity["blob"]
        ours[META_PREFIX + "source_device"] = str(identity["device"])
        ours[META_PREFIX + "source_inode"] = str(identity["inode"])
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


# Room left on the filesystem after writing a sibling.
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024
# git's racy-clean rule: a row checked within this long of the source's mtime may
# predate a write in the same timestamp tick (FAT counts in 2 s), so it is checked again.
RACY_WINDOW_NS = 2_000_000_000
CONTENT_CHECK_FAILED = "content check failed for"


@dataclass
class SiblingOutcome:
    """What happened while resolving a sibling (reported by ``last_load_info``).

    A context manager: ``sibling``, when open (``keep_open``), is closed at the end.
    """

    sibling: Header | None = None
    converted: ConversionResult | None = None
    # The fp16 range report stored when the sibling found was made (a hit converts nothing now).
    stored_range: dict[str, int] | None = None
    reason: str = ""
    events: list[str] = field(default_factory=list)
    # The content check of ``sibling`` (``verify``), when one was made while resolving it.
    checked: Comparison | None = None
    # A sibling converted now and not yet published: started by ``close``, once the load is done with it.
    publication: Publication | None = None

    @property
    def replaced_damaged(self) -> bool:
        """A sibling failed the content check and was converted again."""
        return any(e.startswith(CONTENT_CHECK_FAILED) for e in self.events)

    def __enter__(self) -> SiblingOutcome:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sibling is not None and self.sibling.handle is not None:
            self.sibling.handle.close()
        if self.publication is not None:
            self.publication.start()
            self.publication = None


def _sibling_identity(sibling: Header) -> dict[str, Any]:
    meta = sibling.metadata
    try:
        return {
            "size": int(meta[META_PREFIX + "source_size"]),
            "mtime_ns": int(meta[META_PREFIX + "source_mtime_ns"]),
            "header_sha256": meta[META_PREFIX + "source_header_sha256"],
            "fingerprint": meta[META_PREFIX + "source_fingerprint"],
            "blob": meta.get(META_PREFIX + "source_blob_sha256"),
            "device": int(meta.get(META_PREFIX + "source_device", -1)),
            "inode": int(meta.get(META_PREFIX + "source_inode", -1)),
        }
    except (KeyError, ValueError):
        return {}


def current_fingerprint(value: object) -> bool:
    """Whether a stored fingerprint was made by this version's algorithm (another's cannot be compared)."""
    return isinstance(value, str) and value.startswith(FINGERPRINT_VERSION + ":")


def racy(row: dict[str, Any]) -> bool:
    """A row whose check may predate a same-tick write of the source (git's racy-clean rule)."""
    checked = row.get("checked_ns")
    return type(checked) is not int or row["source"]["mtime_ns"] + RACY_WINDOW_NS > checked


def describes(sibling: Header, source: Header) -> bool:
    """The sibling holds exactly the converted tensors of ``source`` (header level)."""
    if len(sibling.entries) != len(source.entries):
        return False
    for entry in source.entries:
        other = sibling.by_name.get(entry.name)
        if other is None or other.shape != entry.shape:
            return False
        if other.dtype != _convert.converted_dtype(entry.dtype):
            return False
    return True


def changed_in_place(then: dict[str, Any], now: dict[str, Any]) -> bool:
    """The same file (device and inode), written since: its name no longer vouches for it."""
    same_file = all(then.get(f) == now.get(f) for f in ("device", "inode"))
    return same_file and then.get("mtime_ns") != now.get("mtime_ns")


def same_blob(claimed: dict[str, Any], identity: dict[str, Any]) -> bool:
    """Both name the same hub blob (same content), with the same size and header, and the
    file is not the one the sibling was made from, rewritten in place since."""
    return (
        identity.get("blob") is not None
        and claimed.get("blob") == identity["blob"]
        and all(claimed.get(f) == identity[f] for f in ("size", "header_sha256"))
        and not changed_in_place(claimed, identity)
    )


def sibling_matches_source(sibling: Header, source: Header) -> bool:
    """Whether ``sibling`` is sa3loader's sibling of the file ``source`` is now (header and identity)."""
    claimed, identity = _sibling_identity(sibling), source_identity(source)
    return (
        is_sa3loader_file(sibling)
        and describes(sibling, source)
        and (hard_match(claimed, identity) or same_blob(claimed, identity))
    )


class SiblingResolver:
    """Resolves the sibling of one source for one cache dir."""

    def __init__(
        self, source: Header, cache_dir: str, settings: _config.Settings, *, publish_later: bool = False
    ) -> None:
        self.source = source
        self.publish_later = publish_later
        self.cache_dir = cache_dir
        self.settings = settings
        self.verify = settings.verify
        self.real = os.path.realpath(source.path)
        self.identity = source_identity(source)
        self.blob: str | None = self.identity["blob"]
        # When the identity was taken: a write after it changes the stat (or is racy).
        self.checked_ns = source.handle.opened_ns if source.handle is not None else time.time_ns()
        distrust = cache_dir_trust(cache_dir, shared=settings.shared_cache)
        if distrust is not None:
            warn_once(
                f"untrusted:{cache_dir}",
                "ignoring the sa3loader cache dir %s: %s (set $%s=1 for a shared team cache)",
                cache_dir,
                distrust,
                _config.SHARED_CACHE_ENV,
            )
        self.cache_trusted = distrust is None
        self.index = Index(cache_dir, usable=self.cache_trusted)
        self.outcome = SiblingOutcome()
        self._fingerprint: str | None = None
        self._failed_verify: set[str] = set()  # checked once: the re-check under the lock skips them
        self._other_version: set[str] = set()  # another sa3loader's siblings: never overwritten
        self._unreadable: dict[str, str] = {}  # siblings this user may not open, and why
        self._content_differs: set[str] = set()  # siblings whose source fingerprint is another
        self._stat_problem: tuple[str] | None = None  # why the stat cannot vouch ("": it can)

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.source)
        return self._fingerprint

    def _beside_allowed(self) -> bool:
        return not in_hf_hub_cache(self.source.path)

    def candidates(self, row: dict[str, Any] | None) -> list[str]:
        paths = []
        if row is not None:
            paths.append(row["sibling"]["path"])
        if self._beside_allowed():
            paths.append(beside_path(self.source.path))
        if self.cache_trusted:
            paths.append(cache_path(self.cache_dir, self.source.path, self.real, self.blob))
            if self.blob is not None:  # where a version that keyed hub files by path put it
                paths.append(cache_path(self.cache_dir, self.source.path, self.real))
        return list(dict.fromkeys(paths))

    def _in_cache_dir(self, path: str) -> bool:
        """Whether ``path`` is a sibling place of the cache dir (``<cache>/siblings/<key>/<name>``)."""
        return os.path.dirname(os.path.dirname(os.path.dirname(path))) == self.cache_dir

    def _owner_problem(self, path: str, st: os.stat_result) -> str | None:
        """None when the sibling's owner may choose this load's weights, else why not."""
        if st.st_uid in (os.getuid(), 0):
            return None
        if self.settings.shared_cache and self.cache_trusted and self._in_cache_dir(path):
            return None  # a team cache, trusted on purpose
        source_owner = self._source_owner()
        if st.st_uid == source_owner and not writable_by_others(os.path.dirname(path), source_owner):
            return None  # the source's owner controls that directory, and the source, anyway
        return f"it is owned by uid {st.st_uid}, in a directory others can write to"

    def _source_owner(self) -> int:
        handle = self.source.handle
        return handle.stat.st_uid if handle is not None else os.stat(self.source.path).st_uid

    def _open(self, path: str) -> Header | None:
        """The sibling at ``path``, open, if it is a regular sa3loader file we may trust."""
        try:
            sibling = open_header(path, follow_symlinks=False)
        except PermissionError as exc:  # there, maybe, but not ours to read: say so if nothing else works
            self._unreadable[path] = os.strerror(exc.errno) if exc.errno else "permission denied"
            return None
        except (HeaderError, OSError):
            return None
        assert sibling.handle is not None
        problem = self._owner_problem(path, sibling.handle.stat)
        if problem is not None:
            sibling.handle.close()
            self.outcome.events.append(f"untrusted sibling {path}")
            warn_once(f"untrusted-sibling:{path}", "ignoring %s: %s; using your own cache dir", path, problem)
            return None
        return sibling

    def accept(self, path: str, row: dict[str, Any] | None) -> Header | None:
        """The sibling at ``path``, open, if it is valid for the current source, else None."""
        if path in self._failed_verify:
            return None
        sibling = self._open(path)
        if sibling is None:
            return None
        try:
            if self._valid(sibling, row):
                return sibling
        except BaseException:
            sibling.__exit__(None, None, None)
            raise
        sibling.__exit__(None, None, None)
        return None

    def _valid(self, sibling: Header, row: dict[str, Any] | None) -> bool:
        path = sibling.path
        if not is_sa3loader_file(sibling) or not describes(sibling, self.source):
            return False
        claimed = _sibling_identity(sibling)
        # Another mtime is another file, unless the hub names both by their content: a
        # re-downloaded blob. The name only lets the fingerprint decide (below); it never
        # stands for the content itself (a copied cache's blob may be rewritten in place).
        by_blob = not hard_match(claimed, self.identity) and same_blob(claimed, self.identity)
        if not hard_match(claimed, self.identity) and not by_blob:
            self.outcome.events.append(f"stale sibling {path}")
            return False
        if not current_fingerprint(claimed["fingerprint"]):
            self.outcome.events.append(f"{path} was written by another sa3loader version")
            self._other_version.add(path)
            return False
        vouched = self._vouched_for_by(row, sibling, claimed["fingerprint"])
        if not vouched and claimed["fingerprint"] != self.fingerprint():
            self.outcome.events.append(f"source content changed since {path} was written")
            self._content_differs.add(path)
            return False
        if self.verify and not self._content_matches(sibling):
            return False
        if not vouched:
            self.outcome.events.append(
                f"recognised by its hub blob {self.blob}"
                if by_blob
                else "adopted"
                if row is None
                else "revalidated"
            )
            self.index.put(self.real, self._row(sibling, row))
        return True

    def _vouched_for_by(self, row: dict[str, Any] | None, sibling: Header, claimed: str) -> bool:
        """No need to read the fingerprint again: the index row names this very sibling, made
        from the fingerprint it claims, and the source is the very file that was checked then.

        The invariant: a file's content changes only with its stat (size, mtime, ctime,
        device and inode together), unless (a) the change came within a timestamp tick of
        the check (``racy``), or (b) the filesystem keeps no real ctime, or may give another
        file the same device and inode after a remount (``_mounts.stat_vouches``). In
        either case the fingerprint decides."""
        if row is None or row["sibling"]["path"] != sibling.path:
            return False
        if row["sibling"]["header_sha256"] != sibling.sha256 or row["sibling"]["size"] != sibling.file_size:
            self.outcome.events.append(f"sibling {sibling.path} changed since it was indexed")
            return False
        if row["fingerprint"] != claimed or racy(row) or not soft_match(row["source"], self.identity):
            return False
        return self._stat_vouches()

    def _stat_vouches(self) -> bool:
        if self._stat_problem is None:
            self._stat_problem = (stat_vouches(self.real) or "",)
            if self._stat_problem[0]:
                logger.debug(
                    "%s: the fingerprint is read on every load: %s", self.source.path, self._stat_problem[0]
                )
        return not self._stat_problem[0]

    def _content_matches(self, sibling: Header) -> bool:
        """The full content check (``verify``); a failure is logged once per resolve."""
        try:
            self.outcome.checked = _convert.verify(self.source, sibling)
        except VerificationError as exc:
            logger.warning("%s", exc)
            self.outcome.events.append(f"{CONTENT_CHECK_FAILED} {sibling.path}")
            self._failed_verify.add(sibling.path)
            return False
        return True

    def _row(
        self, sibling: Header, old: dict[str, Any] | None, result: ConversionResult | None = None
    ) -> dict[str, Any]:
        created = time.time() if result is not None or old is None else old.get("created", time.time())
        range_report = (
            {"overflow_to_inf": result.overflow_to_inf, "flushed_to_zero": result.flushed_to_zero}
            if result is not None
            else (old or {}).get("range")
        )
        return {
            "source": {**self.identity, "path": os.path.abspath(self.source.path), "real_path": self.real},
            "fingerprint": self.fingerprint(),
            "checked_ns": self.checked_ns,
            "sibling": {"path": sibling.path, "size": sibling.file_size, "header_sha256": sibling.sha256},
            "converter_version": FORMAT_VERSION,
            "created": created,
            "range": range_report,
        }

    def find(self) -> Header | None:
        row = self.index.get(self.real)
        if row is not None and not hard_match(row["source"], self.identity):
            self.outcome.events.append("source changed since it was indexed")
            row = None
        for path in self.candidates(row):
            sibling = self.accept(path, row)
            if sibling is not None:
                # What the row now says, also after accept() rewrote it: it keeps the old report.
                self.outcome.stored_range = row["range"] if row is not None else None
                return sibling
        return None

    def _overwritable(self, path: str) -> str | None:
        """None when a new sibling may be written at ``path``, else why not.

        Never through another user's file, a symlink or a FIFO, at the sibling's
        name or its lock's; never over another sa3loader version's sibling; and
        beside the source, never over a file that is not an sa3loader sibling.
        """
        problem = owned_file_problem(path) or owned_file_problem(path + LOCK_SUFFIX)
        if problem is not None:
            return problem
        if path in self._other_version:
            return "another sa3loader version's sibling is there"
        if not self._in_cache_dir(path) and os.path.lexists(path) and not is_sa3loader_path(path):
            return "a file that is not an sa3loader sibling is there"
        return None

    def _refuse_to_overwrite(self, path: str) -> None:
        """``ConversionError`` when ``path`` may no longer be written (a file saved there since)."""
        problem = self._overwritable(path)
        if problem is not None:
            raise ConversionError(f"{path}: {problem}; leaving it alone", filename=path)

    def targets(self) -> tuple[list[str], list[str]]:
        """Where a new sibling may go, best first, and why the other places may not."""
        options, problems = [], []
        if self._beside_allowed():
            beside = beside_path(self.source.path)
            directory = os.path.dirname(beside)
            why_not = None if dir_writable(directory) else f"{directory} is not writable"
            why_not = why_not or self._overwritable(beside)
            if why_not is None:
                options.append(beside)
            elif dir_writable(directory):
                problems.append(f"not beside the source ({beside}: {why_not})")
        if self.cache_trusted:
            shared = cache_path(self.cache_dir, self.source.path, self.real, self.blob)
            # A file whose content is not what its blob's name says (a copied cache, edited):
            # its own place, or it and the true blob would convert in turn.
            own = shared in self._content_differs and self.blob is not None
            options.append(cache_path(self.cache_dir, self.source.path, self.real) if own else shared)
        else:
            problems.append(f"the cache dir {self.cache_dir} is not trusted")
        return options, problems

    def _room_problem(self, path: str, needed: int) -> str | None:
        directory = os.path.dirname(path)
        try:
            make_private_dirs(directory)
        except OSError as exc:
            return f"cannot create {directory} ({exc.strerror})"
        if not dir_writable(directory):
            return f"{directory} is not writable"
        if free_bytes(directory) < needed + FREE_SPACE_MARGIN_BYTES:
            return f"not enough free space in {directory} for a {needed / 1e9:.2f} GB sibling"
        return None

    def resolve(self) -> SiblingOutcome:
        out = self.outcome
        # A sibling this process converted and has not yet published, first: its lock is ours
        # until then (a load nested in the factory, another copy of the same hub blob).
        for path in self.candidates(None):
            finish(path)
        if not has_float32(self.source):
            out.reason = (
                "already fp16 (an sa3loader output): loaded as is"
                if is_sa3loader_file(self.source)
                else "no float32 tensors: loaded as is"
            )
            return out
        out.sibling = self.find()
        if out.sibling is not None:
            out.reason = "cache hit"
            return out
        metadata = sibling_metadata(self.source, self.identity, self.fingerprint())
        try:
            size = _convert.output_size(self.source, metadata)
        except ConversionError as exc:
            out.reason = f"{exc}: loading the fp32 source"
            warn_once("fallback:" + self.real, "%s", out.reason)
            return out
        options, problems = self.targets()
        for target in options:
            problem = self._room_problem(target, size)
            if problem is None:
                try:
                    return self._convert_at(target, metadata)
                except UnusableLockError as exc:
                    problem = str(exc)
            problems.append(problem)
        if self._unreadable:  # the likeliest fix first: a sibling is there, unreadable to this user
            path, why = next(iter(self._unreadable.items()))
            problems.insert(
                0, f"{path} may be there but cannot be read by this user ({why}): make it readable"
            )
        out.reason = f"no place for the fp16 sibling ({'; '.join(problems)}): loading the fp32 source"
        warn_once("fallback:" + self.real, "%s: %s", self.source.path, out.reason)
        return out

    def _convert_at(self, target: str, metadata: dict[str, str]) -> SiblingOutcome:
        """Convert to ``target`` under its lock, unless another process did meanwhile, or
        wrote it and ended before publishing it (``_unpublished``).

        With ``publish_later`` the outcome's sibling is the temp file just written,
        and a thread that holds the lock publishes it (``_publication``).
        """
        out = self.outcome
        try:
            with contextlib.ExitStack() as held:
                held.enter_context(ConversionLock(target, timeout=self.settings.lock_timeout))
                # Check again: another process may have converted while we waited.
                out.sibling = self.accept(target, None)
                if out.sibling is not None:
                    out.reason = "converted by another process"
                    return out
                written = self._unpublished(target, metadata)
                if written is None:
                    problem = self._overwritable(target)
                    if problem is not None:
                        raise ConversionError(f"{target}: {problem}; leaving it alone", filename=target)
                    logger.info("converting %s to fp16 at %s", self.source.path, target)
                    written = _convert.write_sibling(
                        self.source, target, metadata, read_only=True, progress=self.settings.progress
                    )
                    out.converted = written.result
                held.callback(written.discard)  # until published: a no-op after the rename
                self._hand_off(written, held, target)
        except (LockTimeoutError, UnusableLockError, CheckpointChangedError):
            raise
        except (ConversionError, OSError) as exc:
            out.close()
            out.sibling = None
            out.converted = None
            out.reason = f"could not write the fp16 sibling ({exc}): loading the fp32 source"
            warn_once("convert:" + self.real, "%s: %s", self.source.path, out.reason)
            return out
        result = written.result
        if out.converted is None:
            out.reason = "cache hit (published what a previous process wrote)"
            out.stored_range = {
                "overflow_to_inf": result.overflow_to_inf,
                "flushed_to_zero": result.flushed_to_zero,
            }
            return out
        out.reason = "converted"
        logger.info(
            "converted %s (%.2f GB) to %s (%.2f GB) in %.1fs",
            self.source.path,
            self.source.file_size / 1e9,
            target,
            result.size / 1e9,
            result.seconds,
        )
        return out

    def _hand_off(self, written: _convert.WrittenSibling, held: contextlib.ExitStack, target: str) -> None:
        """Open what was written for the load, then publish it: now, or (``publish_later``) on a
        thread that takes over ``held`` (the lock, the temp file) once the load is done."""
        out = self.outcome
        out.sibling = written.open_header()
        row = self._row(out.sibling, None, written.result)
        if not self.publish_later:
            _publish(written, self.cache_dir, self.cache_trusted, self.real, row, self.index)
            return
        out.events.append("publishing the sibling in the background")
        publish = functools.partial(
            _publish,
            written,
            self.cache_dir,
            self.cache_trusted,
            self.real,
            row,
            recheck=functools.partial(self._refuse_to_overwrite, target),
        )
        out.publication = Publication(target, publish, held.pop_all(), [written.fd])

    def _unpublished(self, target: str, metadata: dict[str, str]) -> _convert.WrittenSibling | None:
        """Under the lock: what earlier writers of ``target`` left. A temp file a process wrote
        whole and did not publish (it ended first: an ``exec``, a kill) is published as it is
        when it provably holds this source's sibling; every other leftover is removed, and
        when one was, the conversion that follows says why at WARNING."""
        found = None
        for path in stray_incomplete(target):
            if found is None:
                found = _convert.unpublished_sibling(path, target, self.source, metadata)
                if found is not None:
                    self.outcome.events.append(f"published {path}, which a previous process wrote")
                    logger.info("publishing %s, which a previous process wrote and did not publish", path)
                    continue
            with contextlib.suppress(OSError):
                os.unlink(path)
            if found is None:
                warn_once(
                    "unpublished:" + target,
                    "%s: a previous process ended before publishing the fp16 sibling it was writing (%s); "
                    "converting again. A process that exec()s after a first load should call "
                    "sa3loader.wait_for_publishing() first",
                    self.source.path,
                    os.path.basename(path),
                )
        return found


def _publish(
    written: _convert.WrittenSibling,
    cache_dir: str,
    usable: bool,
    key: str,
    row: dict[str, Any],
    index: Index | None = None,
    recheck: Callable[[], None] | None = None,
) -> None:
    """fsync and rename the written sibling, then record it in the index (a new connection
    when none is given: this may run on the publishing thread). ``recheck``, just before the
    rename, raises when the name may no longer be written (the load has long returned)."""
    written.publish(before_rename=recheck)
    _faults.point("index")
    with contextlib.ExitStack() as stack:
        if index is None:
            index = stack.enter_context(Index(cache_dir, usable=usable))
        index.put(key, row)


def resolve_sibling(
    source: Header,
    cache_dir: str,
    *,
    verify: bool = False,
    keep_open: bool = False,
    settings: _config.Settings | None = None,
    publish_later: bool = False,
) -> SiblingOutcome:
    """The sibling to read (found, adopted or converted now).

    With ``keep_open``, ``outcome.sibling`` stays open (use the outcome as a
    context manager): a load reads exactly the file that was checked, whatever
    happens to its name meanwhile (``cache clear``, a republish). With
    ``publish_later`` (and ``keep_open``), a sibling converted now is returned
    before it is published, which a background thread finishes (``_publication``).
    """
    resolver = SiblingResolver(
        source,
        cache_dir,
        settings or _config.settings(verify=verify),
        publish_later=publish_later and keep_open,
    )
    with resolver.index:
        outcome = resolver.resolve()
    if not keep_open and outcome.sibling is not None:
        outcome.close()
        outcome.sibling = dataclasses.replace(outcome.sibling, handle=None)
    return outcome

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

import dataclasses
import logging
import os
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from . import _config, _convert
from ._config import warn_once
from ._convert import META_PREFIX, Comparison, ConversionResult, is_sa3loader_file
from ._format import Header, open_header
from ._fsutil import (
    LOCK_SUFFIX,
    beside_path,
    cache_dir_trust,
    cache_path,
    conversion_lock,
    dir_writable,
    free_bytes,
    in_hf_hub_cache,
    make_private_dirs,
    owned_file_problem,
    remove_stray_incomplete,
    writable_by_others,
)
from ._identity import FINGERPRINT_VERSION, fingerprint, hard_match, soft_match, source_identity
from ._index import Index
from .errors import (
    CheckpointChangedError,
    ConversionError,
    HeaderError,
    LockTimeoutError,
    UnusableLockError,
    VerificationError,
)

logger = logging.getLogger(__name__)

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


def _sibling_identity(sibling: Header) -> dict[str, Any]:
    meta = sibling.metadata
    try:
        return {
            "size": int(meta[META_PREFIX + "source_size"]),
            "mtime_ns": int(meta[META_PREFIX + "source_mtime_ns"]),
            "header_sha256": meta[META_PREFIX + "source_header_sha256"],
            "fingerprint": meta[META_PREFIX + "source_fingerprint"],
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


def sibling_matches_source(sibling: Header, source: Header) -> bool:
    """Whether ``sibling`` is sa3loader's sibling of the file ``source`` is now (header and identity)."""
    claimed = _sibling_identity(sibling)
    return (
        is_sa3loader_file(sibling)
        and describes(sibling, source)
        and hard_match(claimed, source_identity(source))
    )


class SiblingResolver:
    """Resolves the sibling of one source for one cache dir."""

    def __init__(self, source: Header, cache_dir: str, *, verify: bool = False) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.verify = verify
        self.real = os.path.realpath(source.path)
        self.identity = source_identity(source)
        # When the identity was taken: a write after it changes the stat (or is racy).
        self.checked_ns = source.handle.opened_ns if source.handle is not None else time.time_ns()
        distrust = cache_dir_trust(cache_dir)
        if distrust is not None:
            warn_once(
                f"untrusted:{cache_dir}",
                "ignoring the sa3loader cache dir %s: %s (set $%s=1 for a shared team cache)",
                cache_dir, distrust, _config.SHARED_CACHE_ENV,
            )  # fmt: skip
        self.cache_trusted = distrust is None
        self.index = Index(cache_dir, usable=self.cache_trusted)
        self.outcome = SiblingOutcome()
        self._fingerprint: str | None = None
        self._failed_verify: set[str] = set()  # checked once: the re-check under the lock skips them
        self._other_version: set[str] = set()  # another sa3loader's siblings: never overwritten

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
            paths.append(cache_path(self.cache_dir, self.source.path, self.real))
        return list(dict.fromkeys(paths))

    def _in_cache_dir(self, path: str) -> bool:
        """Whether ``path`` is a sibling place of the cache dir (``<cache>/siblings/<key>/<name>``)."""
        return os.path.dirname(os.path.dirname(os.path.dirname(path))) == self.cache_dir

    def _owner_problem(self, path: str, st: os.stat_result) -> str | None:
        """None when the sibling's owner may choose this load's weights, else why not."""
        if st.st_uid in (os.getuid(), 0):
            return None
        if _config.shared_cache() and self.cache_trusted and self._in_cache_dir(path):
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
        if not hard_match(claimed, self.identity):
            self.outcome.events.append(f"stale sibling {path}")
            return False
        if not current_fingerprint(claimed["fingerprint"]):
            self.outcome.events.append(f"{path} was written by another sa3loader version")
            self._other_version.add(path)
            return False
        vouched = self._vouched_for_by(row, sibling, claimed["fingerprint"])
        if not vouched and claimed["fingerprint"] != self.fingerprint():
            self.outcome.events.append(f"source content changed since {path} was written")
            return False
        if self.verify and not self._content_matches(sibling):
            return False
        if not vouched:
            self.outcome.events.append("adopted" if row is None else "revalidated")
            self.index.put(self.real, self._row(sibling, row))
        return True

    def _vouched_for_by(self, row: dict[str, Any] | None, sibling: Header, claimed: str) -> bool:
        """The index row names this very sibling, made from the fingerprint it claims, and
        the source's soft identity is unchanged since a check that no same-tick write can
        have slipped past: no need to read the fingerprint again."""
        if row is None or row["sibling"]["path"] != sibling.path:
            return False
        if row["sibling"]["header_sha256"] != sibling.sha256 or row["sibling"]["size"] != sibling.file_size:
            self.outcome.events.append(f"sibling {sibling.path} changed since it was indexed")
            return False
        if row["fingerprint"] != claimed or racy(row):
            return False
        return soft_match(row["source"], self.identity)

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
            "converter_version": _convert.FORMAT_VERSION,
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
        if not self._in_cache_dir(path) and os.path.lexists(path) and not _convert.is_sa3loader_path(path):
            return "a file that is not an sa3loader sibling is there"
        return None

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
            options.append(cache_path(self.cache_dir, self.source.path, self.real))
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
        if not _convert.has_float32(self.source):
            out.reason = "no float32 tensors: loaded as is"
            return out
        out.sibling = self.find()
        if out.sibling is not None:
            out.reason = "cache hit"
            return out
        metadata = _convert.sibling_metadata(self.source, self.identity, self.fingerprint())
        try:
            size = _convert.sibling_size(self.source, metadata)
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
        out.reason = f"no place for the fp16 sibling ({'; '.join(problems)}): loading the fp32 source"
        warn_once("fallback:" + self.real, "%s: %s", self.source.path, out.reason)
        return out

    def _convert_at(self, target: str, metadata: dict[str, str]) -> SiblingOutcome:
        """Convert to ``target`` under its lock, unless another process did meanwhile."""
        out = self.outcome
        try:
            with conversion_lock(target):
                # Check again: another process may have converted while we waited.
                out.sibling = self.accept(target, None)
                if out.sibling is not None:
                    out.reason = "converted by another process"
                    return out
                remove_stray_incomplete(target)
                problem = self._overwritable(target)
                if problem is not None:
                    raise ConversionError(f"{target}: {problem}; leaving it alone", filename=target)
                logger.info("converting %s to fp16 at %s", self.source.path, target)
                result = _convert.convert(self.source, target, metadata, read_only=True)
                out.converted = result
                out.sibling = self._published(target, result)
                _convert.phase("index")
                self.index.put(self.real, self._row(out.sibling, None, result))
        except (LockTimeoutError, UnusableLockError, CheckpointChangedError):
            raise
        except (ConversionError, OSError) as exc:
            out.close()
            out.sibling = None
            out.reason = f"could not write the fp16 sibling ({exc}): loading the fp32 source"
            warn_once("convert:" + self.real, "%s: %s", self.source.path, out.reason)
            return out
        out.reason = "converted"
        logger.info(
            "converted %s (%.2f GB) to %s (%.2f GB) in %.1fs",
            self.source.path, self.source.file_size / 1e9, target, result.size / 1e9, result.seconds,
        )  # fmt: skip
        return out

    def _published(self, target: str, result: ConversionResult) -> Header:
        """The sibling just published, open; still under the lock, so it is the file just written."""
        sibling = open_header(target, follow_symlinks=False)
        assert sibling.handle is not None
        if sibling.sha256 != result.header_sha256 or not stat.S_ISREG(sibling.handle.stat.st_mode):
            sibling.handle.close()
            raise ConversionError(f"{target} changed right after it was written", filename=target)
        return sibling


def resolve_sibling(
    source: Header, cache_dir: str, *, verify: bool = False, keep_open: bool = False
) -> SiblingOutcome:
    """The sibling to read (found, adopted or converted now).

    With ``keep_open``, ``outcome.sibling`` stays open (use the outcome as a
    context manager): a load reads exactly the file that was checked, whatever
    happens to its name meanwhile (``cache clear``, a republish).
    """
    resolver = SiblingResolver(source, cache_dir, verify=verify)
    try:
        outcome = resolver.resolve()
    finally:
        resolver.index.close()
    if not keep_open and outcome.sibling is not None:
        outcome.close()
        outcome.sibling = dataclasses.replace(outcome.sibling, handle=None)
    return outcome

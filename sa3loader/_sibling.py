"""Find, validate or create the fp16 sibling of a source checkpoint.

Check, lock, check again: look for a valid sibling (index row, beside the
source, in the cache dir), take the lock for the chosen location, look again,
and only then convert. Every failure to write degrades to loading the fp32
source with one warning; nothing here may stop a load.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from . import _convert
from ._convert import META_PREFIX, ConversionResult, is_sa3loader_file
from ._format import Header, fd_path, read_header
from ._fsutil import (
    SHARED_CACHE_ENV,
    beside_path,
    cache_dir_trust,
    cache_path,
    conversion_lock,
    dir_writable,
    free_bytes,
    in_hf_hub_cache,
    legacy_beside_path,
    make_private_dirs,
    remove_stray_incomplete,
    warn_once,
)
from ._identity import fingerprint, hard_match, soft_match, source_identity
from ._index import Index
from .errors import ConversionError, HeaderError, LockTimeoutError, VerificationError

logger = logging.getLogger(__name__)

# Room left on the filesystem after writing a sibling.
FREE_SPACE_MARGIN_BYTES = 64 * 1024 * 1024


@dataclass
class SiblingOutcome:
    """What happened while resolving a sibling (reported by ``last_load_info``)."""

    sibling: Header | None = None
    # An open descriptor of ``sibling`` (``pin=True``): the caller reads through it and closes it.
    sibling_fd: int | None = None
    converted: ConversionResult | None = None
    # The fp16 range report stored when the sibling found was made (a hit converts nothing now).
    stored_range: dict[str, int] | None = None
    reason: str = ""
    events: list[str] = field(default_factory=list)


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


class SiblingResolver:
    """Resolves the sibling of one source for one cache dir."""

    def __init__(self, source: Header, cache_dir: str, *, verify: bool = False) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.verify = verify
        self.real = os.path.realpath(source.path)
        self.identity = source_identity(source)
        distrust = cache_dir_trust(cache_dir)
        if distrust is not None:
            warn_once(f"untrusted:{cache_dir}", "ignoring the sa3loader cache dir %s: %s (set $%s=1 for a "
                      "shared team cache)", cache_dir, distrust, SHARED_CACHE_ENV)  # fmt: skip
        self.cache_trusted = distrust is None
        self.index = Index(cache_dir, usable=self.cache_trusted)
        self.outcome = SiblingOutcome()
        self._fingerprint: str | None = None
        self._failed_verify: set[str] = set()  # checked once: the re-check under the lock skips them

    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.source)
        return self._fingerprint

    def candidates(self, row: dict[str, Any] | None) -> list[str]:
        paths = []
        if row is not None:
            paths.append(row["sibling"]["path"])
        if not in_hf_hub_cache(self.source.path):
            paths.append(beside_path(self.source.path))
            legacy = legacy_beside_path(self.source.path)
            if legacy is not None:  # adopted only if its metadata says it is this source's
                paths.append(legacy)
        if self.cache_trusted:
            paths.append(cache_path(self.cache_dir, self.source.path, self.real))
        return list(dict.fromkeys(paths))

    def accept(self, path: str, row: dict[str, Any] | None) -> Header | None:
        """The sibling at ``path`` if it is valid for the current source, else None."""
        if path in self._failed_verify:
            return None
        try:
            sibling = read_header(path)
        except (HeaderError, OSError):
            return None
        if not is_sa3loader_file(sibling) or not describes(sibling, self.source):
            return None
        claimed = _sibling_identity(sibling)
        if not hard_match(claimed, self.identity):
            self.outcome.events.append(f"stale sibling {path}")
            return None
        trusted = self._vouched_for_by(row, sibling)
        if not trusted and claimed["fingerprint"] != self.fingerprint():
            self.outcome.events.append(f"source content changed since {path} was written")
            return None
        if self.verify and not self._content_matches(sibling):
            return None
        if not trusted:
            self.outcome.events.append("adopted" if row is None else "revalidated")
            self.index.put(self.real, self._row(sibling, row))
        return sibling

    def _vouched_for_by(self, row: dict[str, Any] | None, sibling: Header) -> bool:
        """The index row names this very sibling, and the source's soft identity is unchanged:
        no need to read the fingerprint again."""
        if row is None or row["sibling"]["path"] != sibling.path:
            return False
        if row["sibling"]["header_sha256"] != sibling.sha256 or row["sibling"]["size"] != sibling.file_size:
            self.outcome.events.append(f"sibling {sibling.path} changed since it was indexed")
            return False
        return soft_match(row["source"], self.identity)

    def _content_matches(self, sibling: Header) -> bool:
        """The full content check (``verify``); a failure is logged once per resolve."""
        try:
            _convert.verify(self.source, sibling)
        except VerificationError as exc:
            logger.warning("%s", exc)
            self.outcome.events.append(f"content check failed for {sibling.path}")
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

    def target(self, needed: int) -> tuple[str | None, list[str]]:
        """Where to write a new sibling, or None and why nowhere has room."""
        options = []
        beside = beside_path(self.source.path)
        if not in_hf_hub_cache(self.source.path) and dir_writable(os.path.dirname(beside)):
            if not os.path.exists(beside) or _convert.is_sa3loader_path(beside):
                options.append(beside)
        if self.cache_trusted:
            options.append(cache_path(self.cache_dir, self.source.path, self.real))
        problems = [] if self.cache_trusted else [f"the cache dir {self.cache_dir} is not trusted"]
        for path in options:
            directory = os.path.dirname(path)
            try:
                make_private_dirs(directory)
            except OSError as exc:
                problems.append(f"cannot create {directory} ({exc.strerror})")
                continue
            if not dir_writable(directory):
                problems.append(f"{directory} is not writable")
            elif free_bytes(directory) < needed + FREE_SPACE_MARGIN_BYTES:
                problems.append(f"not enough free space in {directory} for a {needed / 1e9:.2f} GB sibling")
            else:
                return path, problems
        return None, problems

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
        target, problems = self.target(size)
        if target is None:
            out.reason = f"no place for the fp16 sibling ({'; '.join(problems)}): loading the fp32 source"
            warn_once("fallback:" + self.real, "%s: %s", self.source.path, out.reason)
            return out
        try:
            with conversion_lock(target):
                # Check again: another process may have converted while we waited.
                out.sibling = self.accept(target, None)
                if out.sibling is not None:
                    out.reason = "converted by another process"
                    return out
                remove_stray_incomplete(target)
                if os.path.exists(target) and not _convert.is_sa3loader_path(target):
                    raise ConversionError(f"{target} appeared and is not an sa3loader file; leaving it alone")
                logger.info("converting %s to fp16 at %s", self.source.path, target)
                result = _convert.convert(self.source, target, metadata, read_only=True)
                out.converted = result
                out.sibling = read_header(target)
                _convert.phase("index")
                self.index.put(self.real, self._row(out.sibling, None, result))
        except LockTimeoutError:
            raise
        except (ConversionError, OSError) as exc:
            out.sibling = None
            out.reason = f"could not write the fp16 sibling ({exc}): loading the fp32 source"
            warn_once("convert:" + self.real, "%s: %s", self.source.path, out.reason)
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


PIN_ATTEMPTS = 3


def open_pinned(sibling: Header) -> int | None:
    """An open descriptor of exactly the validated ``sibling``, or None if it is gone or changed.

    Held from validation to the end of the load, it keeps the file readable
    whatever happens to its name meanwhile (``cache clear``, a republish).
    """
    try:
        fd = os.open(sibling.path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if read_header(fd_path(fd, sibling.path)).sha256 == sibling.sha256:
            return fd
    except (HeaderError, OSError):
        pass
    os.close(fd)
    return None


def resolve_sibling(
    source: Header, cache_dir: str, *, verify: bool = False, pin: bool = False
) -> SiblingOutcome:
    """The sibling to read (found, adopted or converted now); with ``pin``, also an open descriptor."""
    resolver = SiblingResolver(source, cache_dir, verify=verify)
    try:
        for _ in range(PIN_ATTEMPTS):
            outcome = resolver.resolve()
            if not pin or outcome.sibling is None:
                return outcome
            outcome.sibling_fd = open_pinned(outcome.sibling)
            if outcome.sibling_fd is not None:
                return outcome
            vanished = f"{outcome.sibling.path} vanished before it was opened"
            resolver.outcome = SiblingOutcome(events=[*outcome.events, vanished])
        outcome.sibling = None
        outcome.reason = "the fp16 sibling kept vanishing before it could be opened: loading the fp32 source"
        warn_once("pin:" + resolver.real, "%s: %s", source.path, outcome.reason)
        return outcome
    finally:
        resolver.index.close()

"""Finding the fp16 sibling of a source, and checking that it is valid for the source as it is now.

Trust only what you own. A sibling is opened without following symlinks and without
blocking, must be a regular file, and is used only when it belongs to you or root (or to
the source's owner, in a directory no one else can write); a sibling written under another
fingerprint version (another sa3loader) is neither trusted nor overwritten. The accepted
sibling stays open: the load reads exactly the file it checked.

Valid means: sa3loader's marker; exactly the source's tensors, converted; the source's hard
identity (or, for a hub blob, its name, size and header); and its content fingerprint, read
again unless the index row proves the source is the very file that was checked
(``_vouched_for_by``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field

from . import _compare, _config, _faults
from ._compare import Comparison
from ._config import warn_once
from ._format import Header, open_header
from ._host import stat_vouches, unwritten_pages
from ._identity import (
    FileBytes,
    claim_of,
    claims_recorded,
    current_fingerprint,
    describes,
    fingerprint,
    hard_match,
    holds_fp16_of,
    identity_of,
    is_sa3loader_file,
    read_spots,
    stat_stands_for,
)
from ._index import Index
from ._places import beside_path, cache_path, in_cache_dir, in_hf_hub_cache, legacy_beside_path
from ._publication import Publication
from ._records import (
    CONTENT_CHECK_FAILED,
    LAST_USE_STEP_S,
    ConversionResult,
    IndexRow,
    RangeReport,
    SiblingClaim,
    sibling_file,
)
from ._trust import cache_dir_trust, owner_problem, refused_cache_dir_hint
from .errors import HeaderError, Sa3LoaderError, VerificationError

logger = logging.getLogger(__name__)


@dataclass
class SiblingOutcome:
    """What happened while resolving a sibling (reported by ``last_load_info``).

    A context manager: ``sibling``, when open, is closed at the end, and a ``publication``
    still pending is started then, once the load is done with the sibling.
    """

    sibling: Header | None = None
    converted: ConversionResult | None = None
    # The fp16 range report stored when the sibling found was made (a hit converts nothing now).
    stored_range: RangeReport | None = None
    reason: str = ""
    events: list[str] = field(default_factory=list)
    # The content check of ``sibling`` (``verify``), when one was made while resolving it.
    checked: Comparison | None = None
    publication: Publication | None = None

    def note(self, event: str) -> None:
        """Record what the check met, once (a sibling is checked again under the lock)."""
        if event not in self.events:
            self.events.append(event)

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


def index_row(
    finder: SiblingFinder, sibling: Header, old: IndexRow | None, result: ConversionResult | None = None
) -> IndexRow:
    """The index row for ``sibling`` of the finder's source as it is now (a new conversion's
    report, else the old row's, which a revalidation keeps)."""
    converted = result is not None or old is None
    report = RangeReport(result.overflow_to_inf, result.flushed_to_zero) if result is not None else None
    printed = finder.fingerprint()  # first: it sets checked_ns
    return IndexRow(
        source=finder.identity,
        source_path=os.path.abspath(finder.source.path),
        real_path=finder.real,
        fingerprint=printed,
        checked_ns=finder.checked_ns,
        sibling_path=sibling.path,
        sibling_size=sibling.file_size,
        sibling_header_sha256=sibling.sha256,
        sibling_file=sibling_file(_stat_of(sibling)),
        created=time.time() if converted or old is None else old.created,
        range=report if report is not None else (old.range if old is not None else None),
        last_used=time.time(),
    )


def _trusted(cache_dir: str, settings: _config.Settings) -> bool:
    distrust = cache_dir_trust(cache_dir, shared=settings.shared_cache)
    if distrust is not None:
        warn_once(
            f"untrusted:{cache_dir}",
            "ignoring the sa3loader cache dir %s: %s (%s)",
            cache_dir,
            distrust,
            refused_cache_dir_hint(distrust, _config.SHARED_CACHE_ENV),
        )
    return distrust is None


def clean_since(source: Header, opened_ns: int) -> int | None:
    """When the source's identity was taken (``opened_ns``), for a row's racy check: a write
    after it changes the stat. Unless a page waits to be written now, before the content is read
    (a write through a mapping into such a page stamps no time): then no time, and the row is
    racy until a later load checks a clean file. Asked only before the first read of the content
    (``SiblingFinder.fingerprint``): a hit the stat vouches for reads none and records nothing (the
    question walks the file's page cache: 8 ms a 5.8 GB file)."""
    handle = source.handle
    if handle is not None and unwritten_pages(handle.fileno()):
        return None
    return opened_ns


class SiblingFinder:
    """Finds and checks the sibling of one source for one cache dir."""

    def __init__(self, source: Header, cache_dir: str, settings: _config.Settings) -> None:
        self.source = source
        self.cache_dir = cache_dir
        self.settings = settings
        self.real = os.path.realpath(source.path)
        self.identity = identity_of(source)
        self.blob = self.identity.blob
        self._opened_ns = source.handle.opened_ns if source.handle is not None else time.time_ns()
        self.checked_ns: int | None = None  # set as the content is first read: ``fingerprint``
        self.cache_trusted = _trusted(cache_dir, settings)
        self.index = Index(cache_dir, usable=self.cache_trusted)
        self.outcome = SiblingOutcome()
        self._fingerprint: str | None = None
        # The source's bytes the fingerprint read: the spot checks of this find() compare the
        # candidates with them (one read of the source), then they are let go.
        self._spots: FileBytes | None = None
        self._finding = False
        self.failed_verify: set[str] = set()  # checked once: the re-check under the lock skips them
        self.other_version: set[str] = set()  # another sa3loader's siblings: never overwritten
        self.unreadable: dict[str, str] = {}  # siblings this user may not open, and why
        self.made_from_another: set[str] = set()  # siblings made from another file or content
        self.altered: set[str] = set()  # siblings edited since indexed: never adopted again
        self._stat_problem: str | None = None  # why the stat cannot vouch ("": it can)

    def fingerprint(self) -> str:
        """The source's fingerprint: the first read of the content a row records (a conversion,
        a spot check and an index row all ask for it first)."""
        if self._fingerprint is None:
            self.checked_ns = clean_since(self.source, self._opened_ns)
            spots = read_spots(self.source)
            self._fingerprint = fingerprint(self.source, spots)
            self._spots = spots if self._finding else None
        return self._fingerprint

    def beside_allowed(self) -> bool:
        return not in_hf_hub_cache(self.source.path)

    def candidates(self, row: IndexRow | None) -> list[str]:
        paths = [row.sibling_path] if row is not None else []
        if self.beside_allowed():
            paths += [beside_path(self.source.path), legacy_beside_path(self.source.path)]
        if self.cache_trusted:
            paths.append(cache_path(self.cache_dir, self.source.path, self.real, self.blob))
            if self.blob is not None:  # where a version that keyed hub files by path put it
                paths.append(cache_path(self.cache_dir, self.source.path, self.real))
        return list(dict.fromkeys(paths))

    def _open(self, path: str) -> Header | None:
        """The sibling at ``path``, open, if it is a regular sa3loader file we may trust."""
        try:
            sibling = open_header(path, follow_symlinks=False)
        except PermissionError as exc:  # there, maybe, but not ours to read: say so if nothing else works
            self.unreadable[path] = os.strerror(exc.errno) if exc.errno else "permission denied"
            return None
        except (HeaderError, OSError):
            return None
        assert sibling.handle is not None
        shared = self.settings.shared_cache and self.cache_trusted and in_cache_dir(path, self.cache_dir)
        problem = owner_problem(path, sibling.handle.stat, self.identity_owner(), shared=shared)
        if problem is not None:
            sibling.handle.close()
            self.outcome.note(f"untrusted sibling {path}")
            warn_once(f"untrusted-sibling:{path}", "ignoring %s: %s; using your own cache dir", path, problem)
            return None
        return sibling

    def identity_owner(self) -> int:
        handle = self.source.handle
        return handle.stat.st_uid if handle is not None else os.stat(self.source.path).st_uid

    def accept(self, path: str, row: IndexRow | None) -> Header | None:
        """The sibling at ``path``, open, if it is valid for the current source, else None."""
        if path in self.failed_verify or path in self.altered:
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

    def _valid(self, sibling: Header, row: IndexRow | None) -> bool:
        path = sibling.path
        claimed = claim_of(sibling)
        if claimed is None or not is_sa3loader_file(sibling) or not describes(sibling, self.source):
            return False
        # Another size, mtime or header is another file, hub blob or not: a blob's name never
        # stands for its content (a copied cache's blob may be rewritten in place through its
        # link, in a part of a large tensor the fingerprint does not sample).
        if not hard_match(claimed, self.identity):
            self.outcome.note(f"stale sibling {path}")
            self.made_from_another.add(path)
            return False
        if not current_fingerprint(claimed.fingerprint):
            self.outcome.note(f"{path} was written by another sa3loader version")
            self.other_version.add(path)
            return False
        vouched = self._vouched_for_by(row, sibling, claimed.fingerprint)
        if not vouched and _altered(row, sibling, claimed):
            self.outcome.note(f"{path} was altered since it was indexed")
            self.made_from_another.add(path)
            self.altered.add(path)
            return False
        if not vouched and claimed.fingerprint != self.fingerprint():
            self.outcome.note(f"source content changed since {path} was written")
            self.made_from_another.add(path)
            return False
        # A claim predates the conversion's reads (a mapped write stamps nothing): read the sibling.
        if (self.settings.verify or not vouched) and not self.holds_the_source(sibling, path):
            return False
        if not vouched:
            self.outcome.note("adopted" if row is None else "revalidated")
            self._record(sibling, row)
        elif row is not None:
            self._note_use(row)
        return True

    def _record(self, sibling: Header, row: IndexRow | None) -> None:
        """Write the row for ``sibling``; where stat cannot vouch, a row that says the same
        already is kept (a hit there reads the fingerprint, and must not write every time)."""
        new = index_row(self, sibling, row)
        same = row is not None and dataclasses.replace(
            new, checked_ns=row.checked_ns, last_used=row.last_used
        )
        if row is not None and self._stat_problem and same == row:
            return self._note_use(row)
        self.index.put(self.real, new, while_there=True)

    def _vouched_for_by(self, row: IndexRow | None, sibling: Header, claimed: str) -> bool:
        """No need to read the fingerprint again: the index row names this very sibling, made
        from the fingerprint it claims, and the source's stat stands for the content checked
        then (``_identity.stat_stands_for``, which says when it can)."""
        if row is None or row.sibling_path != sibling.path:
            return False
        if not _indexes_this_file(row, sibling):
            self.outcome.note(f"sibling {sibling.path} changed since it was indexed")
            return False
        if row.fingerprint != claimed:
            return False
        return stat_stands_for(row.source, self.identity, row.checked_ns, self._stat_vouches)

    def _stat_vouches(self) -> bool:
        if self._stat_problem is None:
            self._stat_problem = stat_vouches(self.real) or ""
            if self._stat_problem:
                logger.debug("%s: fingerprint read on every load: %s", self.source.path, self._stat_problem)
        return not self._stat_problem

    def holds_the_source(self, sibling: Header, name: str) -> bool:
        """Whether ``sibling`` (as ``name``) holds fp16 of the source now (``holds_fp16_of``): every
        byte under ``verify``, else the fingerprint's spots; not if it cannot be read whole. A failure
        is logged once (the caller converts again); an error reading the source is raised."""
        try:
            if self.settings.verify:
                self.outcome.checked = _compare.verify(self.source, sibling)
            elif not holds_fp16_of(sibling, self.source, self._spots):
                raise VerificationError(f"{name}: not fp16 of {self.source.path} at the fingerprint's spots")
        except (Sa3LoaderError, OSError) as exc:
            if getattr(exc, "filename", None) == self.source.path:
                raise  # the source changed as it was read: the load's error, not the sibling's fault
            problem = str(exc) if isinstance(exc, VerificationError) else f"{name}: not checked whole ({exc})"
        else:
            return True
        logger.warning("%s", problem)
        self.outcome.note(f"{CONTENT_CHECK_FAILED} {name}")
        self.failed_verify.add(name)
        return False

    def find(self) -> Header | None:
        row = self.index.get(self.real)
        if row is not None and not hard_match(row.source, self.identity):
            self.outcome.note("source changed since it was indexed")
            row = None
        self._finding = True
        try:
            for path in self.candidates(row):
                sibling = self.accept(path, row)
                if sibling is not None:
                    # What the row now says, also after accept() rewrote it: it keeps the old report.
                    self.outcome.stored_range = row.range if row is not None else None
                    return sibling
            return None
        finally:
            self._finding, self._spots = False, None  # megabytes, for a conversion's length otherwise

    row_for = index_row  # the row for a sibling of this source (the resolver's, too)

    def _note_use(self, row: IndexRow) -> None:
        """Record the use, at most once per ``LAST_USE_STEP_S`` (the cap evicts the least recently used)."""
        now = time.time()
        if abs(now - row.used()) >= _faults.tuned("last_use_step_s", LAST_USE_STEP_S):
            self.index.put(self.real, dataclasses.replace(row, last_used=now), while_there=True)


def _indexes_this_file(row: IndexRow, sibling: Header) -> bool:
    """Whether ``row`` indexed this very file: its header, its size, and the file itself (another
    put at its name, or this one edited in place, is not: ``sibling_file``; nor is it where an
    older row did not record the file)."""
    return (
        row.sibling_header_sha256 == sibling.sha256
        and row.sibling_size == sibling.file_size
        and row.sibling_file == sibling_file(_stat_of(sibling))
    )


def _stat_of(sibling: Header) -> os.stat_result:
    """The sibling's stat when it was opened (the file read), else now."""
    return sibling.handle.stat if sibling.handle is not None else os.stat(sibling.path)


def _altered(row: IndexRow | None, sibling: Header, claimed: SiblingClaim) -> bool:
    """Whether the row indexed this very sibling, made from the source it still claims, with
    another header: edited since (its claim and fingerprint prove nothing about its data)."""
    return (
        row is not None
        and row.sibling_path == sibling.path
        and row.sibling_header_sha256 != sibling.sha256
        and claims_recorded(claimed, row.source, row.fingerprint)
    )

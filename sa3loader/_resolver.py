"""The sibling a load reads: found, adopted, or converted now.

Check, lock, check again: look for a valid sibling (index row, beside the source, in the
cache dir: ``SiblingFinder``), take the lock for the chosen place, look again, and only then
convert. What an earlier writer left under the lock is published as it is when it is
provably whole (``_unpublished``), or removed. Every failure to write degrades to loading
the fp32 source with one warning; nothing here may stop a load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import logging
import os
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _config, _convert, _faults
from ._config import Settings, warn_once
from ._convert import WrittenSibling, unpublished_sibling
from ._identity import has_float32, is_sa3loader_file, marked_by_sa3loader, sibling_metadata
from ._index import Index
from ._lock import ConversionLock
from ._places import LOCK_SUFFIX, beside_path, cache_path, in_cache_dir, make_beside_dirs, remove_if_empty
from ._publication import HeldUntilPublished, Publication, finish
from ._records import CONTENT_CHECK_FAILED, IndexRow, RangeReport, sibling_file
from ._room import cap_again, keep_under_cap, room_for, room_left, stray_incomplete
from ._trust import beside_dir_problem, cache_place_problem, owned_file_problem, readers_bits, without_group
from .errors import (
    CheckpointChangedError,
    ConversionError,
    LockTimeoutError,
    Sa3LoaderError,
    UnusableLockError,
)

if TYPE_CHECKING:  # the loader and the CLI hand them in: both are above this module
    from ._cache_admin import Eviction
    from ._format import Header
    from ._sibling import SiblingFinder, SiblingOutcome

logger = logging.getLogger(__name__)


# A cache command removes a hidden folder it emptied (``cache clear``): a load may have made it
# just before, to convert into. Made again this many times; nothing was written in it.
FOLDER_TRIES = 3


class _FolderRemoved(Exception):
    """The folder of a sibling's place is gone (its error: the cause): try again."""


def _cache_place(f: SiblingFinder) -> str:
    """Where in the cache dir the source's sibling goes: its blob's place (copies of a hub blob
    share one), or its own where the sibling there was made from another file (a copied cache,
    edited through its link: the two would convert in turn)."""
    shared = cache_path(f.cache_dir, f.source.path, f.real, f.blob)
    own = shared in f.made_from_another and f.blob is not None
    return cache_path(f.cache_dir, f.source.path, f.real) if own else shared


def _anchor(target: str, cache_dir: str) -> str:
    """The folder ``target``'s own folders hang from: the cache dir, or the checkpoint's."""
    return (
        cache_dir
        if in_cache_dir(target, cache_dir)
        else os.path.dirname(os.path.dirname(os.path.dirname(target)))
    )


def _folder_removed(exc: BaseException, target: str) -> bool:
    """Whether ``exc`` says a file of ``target``'s is missing because its folder is gone."""
    return getattr(exc, "errno", None) == errno.ENOENT and not os.path.isdir(os.path.dirname(target))


def overwrite_problem(path: str, *, in_cache_dir: bool, other_version: bool) -> str | None:
    """None when a new sibling may be written at ``path``, else why not.

    Never through another user's file, a symlink or a FIFO, at the sibling's name or its
    lock's; never over another sa3loader version's sibling; and beside the source, never
    over a file that is not an sa3loader sibling.
    """
    problem = owned_file_problem(path) or owned_file_problem(path + LOCK_SUFFIX)
    if problem is not None:
        return problem
    if other_version:
        return "another sa3loader version's sibling is there"
    if not in_cache_dir and os.path.lexists(path) and not marked_by_sa3loader(path):  # a cut-off one too
        return "a file that is not an sa3loader sibling is there"
    return None


def _the_cache_dir(hidden: str, cache_dir: str) -> str | None:  # a checkpoint in ``~``, say
    return "it is the cache dir" if os.path.realpath(hidden) == os.path.realpath(cache_dir) else None


class SiblingResolver:
    """Resolves the sibling of one source for one cache dir: find, lock, find again, convert."""

    def __init__(self, finder: SiblingFinder, evict: Eviction, *, publish_later: bool = False) -> None:
        self.finder, self.evict = finder, evict
        self.source, self.outcome = finder.source, finder.outcome
        self.publish_later = publish_later

    def _overwritable(self, path: str) -> str | None:
        """None when a new sibling may be written at ``path``, else why not (``_trust``)."""
        f = self.finder
        return overwrite_problem(
            path, in_cache_dir=in_cache_dir(path, f.cache_dir), other_version=path in f.other_version
        )

    def _refuse_to_overwrite(self, path: str) -> None:
        """``ConversionError`` when ``path`` may no longer be written (a file saved there since)."""
        problem = self._overwritable(path)
        if problem is not None:
            raise ConversionError(f"{path}: {problem}; leaving it alone", filename=path)

    def targets(self) -> tuple[list[str], list[str]]:
        """Where a new sibling may go, best first, and why the other places may not."""
        f = self.finder
        options, problems = [], []
        if f.settings.place == "cache":
            problems.append(f"${_config.PLACE_ENV}=cache")
        elif f.beside_allowed():
            beside = beside_path(self.source.path)
            hidden = os.path.dirname(beside)
            why_not = _the_cache_dir(hidden, f.cache_dir) or beside_dir_problem(hidden)
            why_not = why_not or self._overwritable(beside)
            if why_not is None:
                options.append(beside)
            else:
                problems.append(f"not beside the source ({beside}: {why_not})")
        else:
            problems.append("the source is in a Hugging Face hub cache, which sa3loader never writes into")
        if f.cache_trusted:
            place = _cache_place(f)
            why_not = cache_place_problem(place, f.cache_dir)
            if why_not is None:
                options.append(place)
            else:
                problems.append(f"not in the cache dir ({place}: {why_not})")
        else:
            problems.append(f"the cache dir {f.cache_dir} is not trusted")
        return options, problems

    def resolve(self) -> SiblingOutcome:
        out, f = self.outcome, self.finder
        # A sibling this process converted and has not yet published, first: its lock is ours
        # until then (a load nested in the factory, another copy of the same hub blob).
        for path in f.candidates(None):
            finish(path)
        if not has_float32(self.source):
            out.reason = (
                "already fp16 (an sa3loader output): loaded as is"
                if is_sa3loader_file(self.source)
                else "no float32 tensors: loaded as is"
            )
            return out
        out.sibling = f.find()
        if out.sibling is not None:
            out.reason = "cache hit"
            return _narrowed_to_readers(out, self.source)
        metadata = sibling_metadata(self.source, f.identity, f.fingerprint())
        try:
            size = _convert.output_size(self.source, metadata)
        except ConversionError as exc:
            out.reason = f"{exc}: loading the fp32 source"
            warn_once("fallback:" + f.real, "%s", out.reason)
            return out
        options, problems = self._places_for(size)
        for target in options:
            placed = self._place_at(target, size, frozenset(options), metadata, problems)
            if not isinstance(placed, str):
                return placed
            problems.append(placed)
        if f.unreadable:  # the likeliest fix first: a sibling is there, unreadable to this user
            path, why = next(iter(f.unreadable.items()))
            problems.insert(
                0, f"{path} may be there but cannot be read by this user ({why}): make it readable"
            )
        out.reason = f"no place for the fp16 sibling ({'; '.join(problems)}): loading the fp32 source"
        warn_once("fallback:" + f.real, "%s: %s", self.source.path, out.reason)
        return out

    def _place_at(
        self, target: str, size: int, options: frozenset[str], metadata: dict[str, str], problems: list[str]
    ) -> SiblingOutcome | str:
        """Convert at ``target``, else why not. Its folder, removed since it was made (``cache
        clear`` removes the hidden folders it empties), is made again only while ``target`` passes
        every check of ``targets`` again (its place may hold another user's folder or a link now)
        and what it hangs from is there (the checkpoint's folder, the cache dir: never one the user
        removed)."""
        for attempt in range(FOLDER_TRIES):
            if attempt and (
                target not in self.targets()[0] or not os.path.isdir(_anchor(target, self.finder.cache_dir))
            ):
                break
            try:
                return self._try_at(target, size, options, metadata, problems)
            except _FolderRemoved as removed:
                error = removed.__cause__
        return f"{os.path.dirname(target)} was removed as it was made ({error})"

    def _try_at(
        self, target: str, size: int, options: frozenset[str], metadata: dict[str, str], problems: list[str]
    ) -> SiblingOutcome | str:
        f = self.finder
        cached = in_cache_dir(target, f.cache_dir)
        made = [] if cached else make_beside_dirs(os.path.dirname(target))
        try:
            problem = room_for(
                f, self.evict, target, size, options, create_under=f.cache_dir if cached else None
            )
            if problem is None:
                if problems:  # not where it would go first: say where, and why
                    logger.info("%s: fp16 sibling at %s (%s)", self.source.path, target, "; ".join(problems))
                return self._convert_at(target, metadata)
        except UnusableLockError as exc:
            problem = str(exc)
        except OSError as exc:
            if _folder_removed(exc, target):
                raise _FolderRemoved from exc
            raise
        remove_if_empty(made)  # not used: no empty hidden folder left beside the checkpoint
        return problem

    def _places_for(self, size: int) -> tuple[list[str], list[str]]:
        """``targets``, once the cap has room for a sibling of ``size`` bytes; none where it cannot."""
        options, problems = self.targets()
        over_cap = keep_under_cap(self.finder, self.evict, size, frozenset(options))
        return ([], [over_cap]) if over_cap is not None else (options, problems)

    def _convert_at(self, target: str, metadata: dict[str, str]) -> SiblingOutcome:
        """Convert to ``target`` under its lock, unless another process did meanwhile, or
        wrote it and ended before publishing it (``_unpublished``).

        With ``publish_later`` the outcome's sibling is the temp file just written,
        and a thread that holds the lock publishes it (``_publication``).
        """
        out, f = self.outcome, self.finder
        try:
            with HeldUntilPublished() as held:
                held.enter_context(ConversionLock(target, timeout=f.settings.lock_timeout))
                # Check again: another load may have converted while we waited.
                out.sibling = f.accept(target, None)
                if out.sibling is not None:
                    out.reason = "converted by another load"  # another process's, or thread's
                    return out
                written = _unpublished(f, target, metadata)
                if written is None:
                    self._refuse_to_overwrite(target)
                    written = _write_new(self.source, target, metadata, f.settings)
                    out.converted = written.result
                held.callback(written.discard)  # until published: a no-op after the rename
                self._hand_off(written, held, target)
        except (LockTimeoutError, UnusableLockError, CheckpointChangedError):
            raise
        except (ConversionError, OSError) as exc:
            if _folder_removed(exc, target):
                raise
            out.close()
            out.sibling = None
            out.converted = None
            out.reason = f"could not write the fp16 sibling ({exc}): loading the fp32 source"
            warn_once("convert:" + f.real, "%s: %s", self.source.path, out.reason)
            return out
        result = written.result
        if out.converted is None:
            out.reason = "cache hit (published what a previous process wrote)"
            out.stored_range = RangeReport(result.overflow_to_inf, result.flushed_to_zero)
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

    def _hand_off(self, written: WrittenSibling, held: contextlib.ExitStack, target: str) -> None:
        """Open what was written for the load, then publish it: now, or (``publish_later``) on a
        thread that takes over ``held`` (the lock, the temp file) once the load is done."""
        out, f = self.outcome, self.finder
        out.sibling = written.open_header()
        row = f.row_for(out.sibling, None, written.result)
        if not self.publish_later:
            _publish(written, f, row, self.evict, f.index)
            return
        out.note("publishing the sibling in the background")
        recheck = functools.partial(self._refuse_to_overwrite, target)
        publish = functools.partial(_publish, written, f, row, self.evict, recheck=recheck)
        out.publication = Publication(target, publish, held.pop_all(), [written.fd])


def _unpublished(finder: SiblingFinder, target: str, metadata: dict[str, str]) -> WrittenSibling | None:
    """Under the lock: what earlier writers of ``target`` left. A temp file a process wrote
    whole and did not publish (it ended first: an ``exec``, a kill) is published as it is
    when it provably holds this source's sibling; every other leftover is removed, and
    when one was, the conversion that follows says why at WARNING."""
    found = None
    prefix, total = _convert.output_prefix(finder.source, metadata)
    for path in stray_incomplete(target):
        if found is None:
            found = unpublished_sibling(path, target, prefix, total)
            if found is not None and not _holds_the_source(found, path, finder):
                found.discard()
                found = None
                finder.outcome.note(f"{CONTENT_CHECK_FAILED} {path}")
            if found is not None:
                finder.outcome.note(f"published {path}, which a previous process wrote")
                logger.info("publishing %s, which a previous process wrote and did not publish", path)
                continue
        with contextlib.suppress(OSError):
            os.unlink(path)
        if found is None:
            written = _convert.WRITTEN_TAG in os.path.basename(path)  # else it ended mid-write
            warn_once(
                "unpublished:" + target,
                "%s: a previous process ended before publishing the fp16 sibling it was writing (%s); "
                "converting again. %s",
                finder.source.path,
                os.path.basename(path),
                "A process that exec()s after a first load should call sa3loader.wait_for_publishing() first"
                if written
                else "It had not written all of it (stopped or killed while converting)",
            )
    return found


def _narrowed_to_readers(out: SiblingOutcome, source: Header) -> SiblingOutcome:
    """``out``, its sibling readable by no more than its checkpoint now (closed since it was made:
    a chmod, a folder made private) where it is ours to change (the next load checks it again:
    its ctime moved)."""
    sibling = out.sibling
    if sibling is None or sibling.handle is None or source.handle is None:
        return out
    now, allowed = (
        stat.S_IMODE(sibling.handle.stat.st_mode),
        readers_bits(source.path, source.handle.stat, sibling.path),
    )
    if sibling.handle.stat.st_gid != source.handle.stat.st_gid:  # a chgrp since: as a copy without its group
        allowed = without_group(allowed)
    extra = now & 0o444 & ~allowed
    if extra and sibling.handle.stat.st_uid == os.geteuid():
        with contextlib.suppress(OSError):
            os.fchmod(sibling.handle.fileno(), now & ~extra)
            out.note(f"{sibling.path} made readable only by those who can read {source.path}")
    return out


def _holds_the_source(written: WrittenSibling, path: str, finder: SiblingFinder) -> bool:
    """Whether the leftover at ``path`` holds fp16 of the source as it is now (its header proves
    the claim, not the data: ``SiblingFinder.holds_the_source``), read after this load's
    question about waiting pages."""
    try:
        header = written.open_header()
    except (Sa3LoaderError, OSError):  # not the header written: not this source's sibling
        return False
    with header:
        return finder.holds_the_source(header, path)


def _write_new(source: Header, target: str, metadata: dict[str, str], settings: Settings) -> WrittenSibling:
    """A new conversion of ``source`` into a temp file beside ``target``, as the load's settings say."""
    logger.info("converting %s to fp16 at %s", source.path, target)
    room = functools.partial(room_left, os.path.dirname(target), source.file_size)
    return _convert.write_sibling(
        source, target, metadata, read_only=True, progress=settings.progress, io=settings.io, room=room
    )


def _publish(
    written: WrittenSibling,
    f: SiblingFinder,
    row: IndexRow,
    evict: Eviction,
    index: Index | None = None,
    recheck: Callable[[], None] | None = None,
) -> None:
    """fsync and rename the written sibling, then record it in the index (a new connection
    when none is given: this may run on the publishing thread), then apply the cap again.
    ``recheck``, just before the rename, raises when the name may no longer be written (the
    load has long returned)."""
    written_file = written.publish(before_rename=recheck)
    _faults.point("index")
    with contextlib.suppress(OSError):  # the rename moved its ctime (another file at the name: not recorded)
        published = os.stat(written.dest)
        if (published.st_dev, published.st_ino) == (written_file.st_dev, written_file.st_ino):
            row = dataclasses.replace(row, sibling_file=sibling_file(published))
    with contextlib.ExitStack() as stack:
        if index is None:
            index = stack.enter_context(Index(f.cache_dir, usable=f.cache_trusted))
        index.put(f.real, row, while_there=True)
        read_only = index.read_only
    if not read_only:
        cap_again(f, evict, row)


def resolve_sibling(
    finder: SiblingFinder, evict: Eviction, *, keep_open: bool = False, publish_later: bool = False
) -> SiblingOutcome:
    """The sibling to read of ``finder``'s source (found, adopted or converted now); ``evict``
    removes the least recently used siblings where the cap or a full disk asks for room.

    With ``keep_open``, ``outcome.sibling`` stays open (use the outcome as a
    context manager): a load reads exactly the file that was checked, whatever
    happens to its name meanwhile (``cache clear``, a republish). With
    ``publish_later`` (and ``keep_open``), a sibling converted now is returned
    before it is published, which a background thread finishes (``_publication``).
    """
    with finder.index:
        outcome = SiblingResolver(finder, evict, publish_later=publish_later and keep_open).resolve()
    if not keep_open and outcome.sibling is not None:
        outcome.close()
        outcome.sibling = dataclasses.replace(outcome.sibling, handle=None)
    return outcome

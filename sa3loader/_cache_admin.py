"""Inspect and clean a cache dir: list rows, prune, clear, repair, and make room for a load
(``Eviction``: the least recently used siblings, under the cap or on a full disk).

``prune`` and ``clear`` build one ``Plan`` (rows to drop, every file and dir to remove, with
sizes), which ``--dry-run`` shows and a run executes as it is: each step checked again under
the sibling's lock; one whose file changed meanwhile is kept and reported, never replaced by
what a second scan finds. Nothing without sa3loader's marker, nothing of another user's, goes."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

from . import _index, _records
from ._cache_dir import siblings_in
from ._config import shared_cache
from ._format import open_header
from ._identity import marked_by_sa3loader, row_status, sibling_matches_source
from ._index import command_index, has_index, refuse_untrusted
from ._lock import conversion_lock
from ._places import (
    LOCK_SUFFIX,
    at_sibling_place,
    beside_path,
    blob_name,
    cache_path,
    canonical_path,
    emptied_beside_dirs,
    emptied_cache_dirs,
    freed,
    in_cache_dir,
    legacy_beside_path,
    siblings_with_leftovers,
    temp_files_of,
)
from ._records import INVALID, MISSING_SOURCE, OK, STALE, Entry, IndexRow, Outcome, Plan, Removal
from ._trust import owned_file_problem
from .errors import LockTimeoutError, Sa3LoaderError, UnusableLockError

NOT_A_SIBLING_PLACE = (
    "it is not in a .cache/sa3loader or the cache dir (an older version's sibling, or your own "
    "converted file): remove it yourself if you do not need it"
)
KEPT_BY_PRUNE = (OK, _records.UNREADABLE_SOURCE)  # valid, or its checkpoint out of reach for now
OVER_CAP = "over cap"  # a valid row whose sibling a cap removes, least recently used first


def _entry(key: str, row: IndexRow | None, cache_dir: str, spots: bool = True) -> Entry:
    if row is None:
        return Entry(
            source=key, sibling="", source_size=0, sibling_size=0, created=0.0, status=INVALID, key=key
        )
    # As a load trusts siblings: anyone's in a cache dir shared on purpose.
    shared = in_cache_dir(row.sibling_path, cache_dir) and shared_cache()
    return Entry(
        source=row.source_path,
        sibling=row.sibling_path,
        source_size=row.source.size,
        sibling_size=row.sibling_size,
        created=row.created,
        status=row_status(row, spots=spots, shared=shared),
        key=key,
        last_used=row.used(),
    )


def entries(cache_dir: str, *, spots: bool = True) -> list[Entry]:
    """Every row as ``cache ls`` shows it, status by a load's rule (``row_status``; spots skipped)."""
    return [_entry(key, row, cache_dir, spots) for key, row in _index.rows(cache_dir)]


def _identity(path: str) -> tuple[int, int, int, int] | None:
    try:
        st = os.lstat(path)
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def file_size(path: str) -> int:
    """What removing ``path`` frees: nothing while another name links its file (a backup)."""
    with contextlib.suppress(OSError):
        return st.st_size if (st := os.lstat(path)).st_nlink <= 1 else 0
    return 0


def _ours(path: str) -> bool:
    """A regular file of yours that carries sa3loader's marker (a truncated one too)."""
    return owned_file_problem(path) is None and os.path.lexists(path) and marked_by_sa3loader(path)


def _leftovers(sibling: str, going: bool) -> list[Removal]:
    """Temp files a killed conversion of ``sibling`` left, and its (empty) lock file when the
    sibling goes or is gone (a sibling that stays keeps its lock): yours only. Call only for a
    sibling ``at_sibling_place``: a row may name any path."""
    found = [
        Removal(t, file_size(t), "temp file", sibling)
        for t in temp_files_of(sibling)
        if owned_file_problem(t) is None
    ]
    lock = sibling + LOCK_SUFFIX
    stays = not going and os.path.lexists(sibling)
    if not stays and os.path.lexists(lock) and owned_file_problem(lock) is None and file_size(lock) == 0:
        found.append(Removal(lock, 0, "lock file", sibling))
    return found


def _plan(
    cache_dir: str,
    rows: list[Entry],
    siblings: list[str],
    named: list[str],
    *,
    sweep: bool = True,
    tidy: bool = True,
) -> Plan:
    """Each sibling to delete, then what conversions of it (and, with ``sweep``, of any sibling in
    the cache dir) left; then the dirs that leaves empty (with ``sweep``, any empty one; with
    ``tidy``, the hidden folders beside checkpoints: not while a load may be about to write one)."""
    canonical = {s: canonical_path(s) for s in [*named, *siblings]}  # resolved once: folders' links
    by_file: dict[str, str] = {}  # one name per file (a row's may reach it through a link): the dir's own
    for s, resolved in canonical.items():
        if at_sibling_place(s, cache_dir) and (resolved not in by_file or s.startswith(cache_dir + os.sep)):
            by_file[resolved] = s
    placed, going = set(by_file.values()), {canonical[s] for s in siblings}
    doomed = {s for s in placed if canonical[s] in going and _ours(s)}
    swept = (
        {s for s in siblings_with_leftovers(cache_dir) if canonical_path(s) not in by_file}
        if sweep
        else set()
    )
    removals = []
    locked = []  # what a lock the run cannot take guards: kept, as the run would
    for sibling in sorted(placed | swept):
        goes = sibling in doomed
        steps = [Removal(sibling, file_size(sibling), "sibling", sibling, _identity(sibling))] if goes else []
        steps += _leftovers(sibling, going=goes)
        why = _lock_problem(sibling) if steps else None
        removals += steps if why is None else []
        locked += [(step, why) for step in steps if why is not None]
    emptied = emptied_cache_dirs(cache_dir, removals)
    if not sweep:
        emptied = [d for d in emptied if any(r.path.startswith(d.path) for r in removals if r not in emptied)]
    kept = [
        (Removal(s, file_size(s), "sibling", s), NOT_A_SIBLING_PLACE)
        for s in siblings
        if canonical[s] not in by_file
    ]
    kept = [k for k in kept if _ours(k[0].path)] + locked
    beside = emptied_beside_dirs(removals) if tidy else []
    return Plan(rows, freed(removals) + emptied + beside, kept)


def plan_prune(cache_dir: str, max_bytes: int | None = None) -> Plan:
    """Rows whose source is gone or changed, and invalid rows; the siblings only they name; leftovers.
    With ``max_bytes``, also the least recently used valid ones over that cap (``_over_cap``)."""
    found, listed = siblings_in(cache_dir), entries(cache_dir)
    # Never delete what a valid row still names, however spelled (a repointed link reuses it).
    in_use = {canonical_path(e.sibling) for e in listed if e.status in KEPT_BY_PRUNE}
    dropped = [e for e in listed if e.status not in KEPT_BY_PRUNE]
    sourceless = [e for e in dropped if e.status in (STALE, MISSING_SOURCE)]
    stale = [e.sibling for e in sourceless if canonical_path(e.sibling) not in in_use]
    # What the run would keep stays in the plan, so the dry run says so too: a sibling another
    # cache dir's load made valid for the current source, one whose lock is another user's.
    needed = {s: why for s in dict.fromkeys(stale) if (why := _still_needed(s, listed)) is not None}
    locked = {s: why for s in stale if s not in needed and _ours(s) and (why := _lock_problem(s))}
    needed |= locked
    siblings = [s for s in stale if s not in needed]
    dropped = [e for e in dropped if e.sibling not in locked]  # as rm: a later prune finds it again
    if max_bytes is not None:
        used = _by_last_use(cache_dir, [e for e in listed if e.status in KEPT_BY_PRUNE])
        rowless = _rowless(found, listed, frozenset())  # no use recorded: the first to go
        on_disk = sum(u.st.st_size for u in used) + sum(map(file_size, rowless))
        gone, excess = _first_out(rowless, on_disk - max_bytes)
        over = _least_used(used, excess, partial=True)
        dropped += over
        siblings += list(dict.fromkeys([*gone, *(e.sibling for e in over)]))
    plan = _plan(cache_dir, dropped, siblings, [e.sibling for e in listed if e.sibling])
    plan.kept += [(Removal(s, file_size(s), "sibling", s), why) for s, why in needed.items() if _ours(s)]
    return plan


def plan_clear(cache_dir: str) -> Plan:
    """Every row, every sibling they name (sa3loader's, yours), every sibling in the cache dir
    no row names (after ``cache repair``, a deleted index), and the leftovers."""
    listed = entries(cache_dir)
    named = list(dict.fromkeys([*(e.sibling for e in listed if e.sibling), *siblings_in(cache_dir)]))
    return _plan(cache_dir, listed, named, named)


def _rowless(found: list[str], listed: list[Entry], keep: frozenset[str]) -> list[str]:
    """Of the siblings ``found`` in the cache dir before ``listed`` was read (one published since is
    named), yours no row names (a lost index's) whose removal frees them: a cap counts them."""
    named = _named_files([e.sibling for e in listed])
    unnamed = [p for p in found if p not in keep and (_identity(p) or ())[:2] not in named]
    return [p for p in unnamed if _ours(p) and not _lock_problem(p) and os.lstat(p).st_nlink == 1]


def _named_files(siblings: list[str]) -> set[tuple[int, ...]]:
    return {ids[:2] for path in siblings if path and (ids := _identity(path))}


def _first_out(paths: list[str], excess: int) -> tuple[list[str], int]:
    """The first of ``paths`` whose removal frees ``excess`` bytes, and what is left to free after."""
    gone = []
    for path in paths:
        if excess <= 0:
            break
        gone.append(path)
        excess -= file_size(path)
    return gone, excess


def _lock_problem(sibling: str) -> str | None:
    """Why a run could not take ``sibling``'s lock (and so keeps it and what it guards), or None."""
    lock = sibling + LOCK_SUFFIX
    problem = owned_file_problem(lock) if os.path.lexists(lock) else None
    return f"its lock file is not yours to take ({problem})" if problem is not None else None


def plan_rm(cache_dir: str, checkpoints: list[str]) -> Plan:
    """For each checkpoint (there or gone): the rows about it, and sa3loader's siblings of yours
    at every place a load of it would look (beside it, its places in the cache dir), with
    what conversions of them left. A sibling another checkpoint's valid row names (a copy of a
    hub cache shares its blob's sibling) stays, and so does one whose lock is another user's,
    with the rows that name it: the plan says so, and executing it does just that."""
    listed = entries(cache_dir)
    rows, siblings, unmatched = [], [], []
    for checkpoint in checkpoints:
        named, real = os.path.abspath(checkpoint), os.path.realpath(checkpoint)
        about = [e for e in listed if e.source == named or (e.key or e.source) == real]
        rows += [e for e in about if e not in rows]
        places = [beside_path(named), legacy_beside_path(named)]
        places += [cache_path(cache_dir, named, real, blob_name(real)), cache_path(cache_dir, named, real)]
        # A typo, a sibling's or a folder's name: nothing of a checkpoint's, even if it exists.
        if not about and not any(os.path.lexists(p) or _leftovers(p, going=True) for p in places):
            unmatched.append(checkpoint)
        for sibling in [*(e.sibling for e in about if e.sibling), *places]:
            if canonical_path(sibling) not in siblings:
                siblings.append(canonical_path(sibling))
    others = {canonical_path(e.sibling) for e in listed if e.sibling and e.status == OK and e not in rows}
    shared = [s for s in siblings if s in others]
    locked = {s: why for s in siblings if s not in others and _ours(s) and (why := _lock_problem(s))}
    rows = [e for e in rows if not e.sibling or canonical_path(e.sibling) not in locked]
    siblings = [s for s in siblings if s not in shared and s not in locked]
    kept = [(Removal(s, file_size(s), "sibling", s), "another checkpoint's row uses it") for s in shared]
    kept += [(Removal(s, file_size(s), "sibling", s), why) for s, why in locked.items()]
    kept += [
        (Removal(s, file_size(s), "sibling", s), problem)
        for s in siblings
        if at_sibling_place(s, cache_dir) and (problem := owned_file_problem(s)) is not None
    ]
    plan = _plan(cache_dir, rows, siblings, siblings, sweep=False)
    plan.kept, plan.unmatched = kept + plan.kept, unmatched
    return plan


def _still_needed(sibling: str, live: list[Entry]) -> str | None:
    """Why a sibling a prune planned to delete must stay: a live row names it, or it is
    valid for the current source (republished through another cache dir), else None."""
    canonical = canonical_path(sibling)
    if any(e.status == OK and canonical_path(e.sibling) == canonical for e in live):
        return "a valid row names it"
    try:
        with open_header(sibling, follow_symlinks=False) as header:
            sources = {e.source for e in live if e.sibling == sibling and e.status != OVER_CAP}
            for source in sources:
                with contextlib.suppress(Sa3LoaderError, OSError), open_header(source) as current:
                    if sibling_matches_source(header, current):
                        return f"it is valid for the current {source}"
    except (Sa3LoaderError, OSError):
        return None
    return None


def _carry_out(step: Removal, live: list[Entry] | None) -> str | None:
    """Remove one planned file; None when done, else why it was kept."""
    if step.kind == "sibling":
        if not _ours(step.path):
            return "it is no longer an sa3loader sibling of yours"
        if step.identity is not None and _identity(step.path) != step.identity:
            return "another file was put there since the plan was made"
        if live is not None:
            reason = _still_needed(step.path, live)
            if reason is not None:
                return reason
    elif owned_file_problem(step.path) is not None:
        return "it is no longer a file of yours"
    elif step.kind == "lock file" and os.path.lexists(step.guard):  # kept above, or put back since
        return "its sibling stays"
    if not os.path.lexists(step.path):
        return "it is already gone"
    os.unlink(step.path)
    return None


def _execute_guarded(sibling: str, steps: list[Removal], live: list[Entry] | None, outcome: Outcome) -> None:
    """The steps one sibling's conversion lock guards, carried out while holding it (never waiting)."""
    lock = sibling + LOCK_SUFFIX
    had_lock = os.path.lexists(lock)
    try:
        with conversion_lock(sibling, timeout=0) as locked:
            if not locked:
                outcome.kept += [(s, "locking is not supported there") for s in steps]
                return
            for step in steps:
                why = _carry_out(step, live)
                if why is None:
                    outcome.removed.append(step)
                else:
                    outcome.kept.append((step, why))
            if not had_lock and os.path.lexists(lock):  # made just now to hold it: not left behind
                os.unlink(lock)
    except LockTimeoutError:
        outcome.kept += [(s, "a conversion holds its lock") for s in steps]
    except UnusableLockError as exc:
        outcome.kept += [(s, str(exc)) for s in steps]
    except OSError as exc:
        outcome.kept += [(s, f"cannot remove it ({exc.strerror or exc})") for s in steps]


def _drop_rows(cache_dir: str, rows: list[Entry]) -> list[Entry]:
    """Delete each planned row that is as it was planned (one rewritten since, by a conversion
    of the source again, is another row: kept); the rows deleted."""
    if not rows and not has_index(cache_dir):
        refuse_untrusted(cache_dir)
        return []
    with command_index(cache_dir) as index:
        as_planned = [
            e
            for e in rows
            if (r := index.get(e.key)) is None or (r.sibling_path, r.created) == (e.sibling, e.created)
        ]
        return [e for e in as_planned if index.delete(e.key)]


def _drop_rows_of_missing(cache_dir: str, removed: set[str]) -> None:
    """Drop each row naming a sibling removed here and missing now, planned or not: a load that
    read a row before the rows went may write it back as the siblings go (its last use), one
    may adopt a sibling no row named when planned. Loads write only while the sibling is there
    (``Index.put``), so after this no row names a sibling removed here."""
    with command_index(cache_dir) as index:
        for key, row in index.items():
            if row is not None and canonical_path(row.sibling_path) in removed:
                index.delete(key, only_if=lambda r: r is not None and not os.path.lexists(r.sibling_path))


def execute(cache_dir: str, plan: Plan, *, pruning: bool) -> Outcome:
    """Carry out ``plan`` as it is: rows first, then each file under its sibling's lock, then dirs."""
    dropped = _drop_rows(cache_dir, plan.rows)
    # Rows a prune keeps, and the sources of those it dropped: a sibling valid for either stays.
    live = entries(cache_dir) + plan.rows if pruning else None
    outcome = Outcome(dropped, [], list(plan.kept))
    guarded: dict[str, list[Removal]] = {}
    for step in plan.removals:
        if step.kind != "empty dir":
            guarded.setdefault(step.guard, []).append(step)
    for sibling, steps in guarded.items():
        _execute_guarded(sibling, steps, live, outcome)
    removed = {canonical_path(step.path) for step in outcome.removed if step.kind == "sibling"}
    if removed:
        _drop_rows_of_missing(cache_dir, removed)
    for step in plan.removals:
        if step.kind == "empty dir":
            try:
                os.rmdir(step.path)
                outcome.removed.append(step)
            except OSError:
                # Not empty because a file in it was kept (said already): nothing more to say.
                if not any(kept.path.startswith(step.path) for kept, _ in outcome.kept):
                    outcome.kept.append((step, "it is not empty"))
    order = {id(step): i for i, step in enumerate(plan.removals)}  # report in the plan's order
    outcome.removed.sort(key=lambda step: order[id(step)])
    outcome.kept.sort(key=lambda kept: order.get(id(kept[0]), -1))  # the plan's own first
    return outcome


class _Used(NamedTuple):
    """A sibling the rows name, its stat, those rows, and whether removing it frees its
    bytes and may be done now (one link only; its lock not another user's)."""

    sibling: str
    st: os.stat_result
    rows: list[Entry]
    evictable: bool


def _by_last_use(cache_dir: str, listed: list[Entry], keep: frozenset[str] = frozenset()) -> list[_Used]:
    """Each sibling of yours ``at_sibling_place`` the rows name, once per file (hard links to one
    file count once), first those no valid row names, then least recently used first."""
    named: dict[str, list[Entry]] = {}
    for entry in listed:
        if entry.sibling not in keep and at_sibling_place(entry.sibling, cache_dir):
            named.setdefault(entry.sibling, []).append(entry)
    found, seen = [], set()
    for sibling, rows in named.items():
        st = os.lstat(sibling) if _ours(sibling) else None
        if st is not None and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            found.append(_Used(sibling, st, rows, st.st_nlink == 1 and not _lock_problem(sibling)))
    return sorted(
        found, key=lambda u: (any(e.status == OK for e in u.rows), max(e.last_used for e in u.rows))
    )


def _least_used(used: list[_Used], excess: int, *, partial: bool = False) -> list[Entry]:
    """The rows (marked ``OVER_CAP``) of the first evictable siblings of ``used`` whose sizes add up
    to ``excess`` bytes; none when all of them would not (``partial``: all of them then)."""
    over: list[Entry] = []
    for u in used:
        if excess <= 0:
            break
        if u.evictable:
            over += [replace(e, status=OVER_CAP) for e in u.rows]
            excess -= u.st.st_size
    return over if excess <= 0 or partial else []


def _eviction(cache_dir: str, over: list[Entry], rowless: list[str]) -> Plan:
    siblings = list(dict.fromkeys([*rowless, *(e.sibling for e in over)]))
    return _plan(cache_dir, over, siblings, siblings, sweep=False, tidy=False)  # a load writes next


def plan_cap(cache_dir: str, max_bytes: int, *, adding: int, keep: frozenset[str]) -> Plan | None:
    """The siblings to remove (no row's first, then the least recently used) so that the rest and
    a new one of ``adding`` bytes at a place in ``keep`` take at most ``max_bytes``; None: cannot."""
    found, listed = siblings_in(cache_dir), entries(cache_dir)
    used, rowless = _by_last_use(cache_dir, listed, keep), _rowless(found, listed, keep)
    on_disk = sum(u.st.st_size for u in used) + sum(map(file_size, rowless))
    gone, excess = _first_out(rowless, on_disk + adding - max_bytes)  # no use recorded: first out
    over = _least_used(used, excess)
    return None if adding > max_bytes or (excess > 0 and not over) else _eviction(cache_dir, over, gone)


def plan_room(cache_dir: str, directory: str, needed: int, keep: frozenset[str], used_before: float) -> Plan:
    """The least recently used siblings on ``directory``'s filesystem, none used since
    ``used_before`` (two loads would take turns evicting each other), that free ``needed``
    bytes there; none when they would not."""
    device = os.stat(directory).st_dev
    used = [
        u
        for u in _by_last_use(cache_dir, entries(cache_dir), keep)
        if u.st.st_dev == device and max(e.last_used for e in u.rows) < used_before
    ]
    return _eviction(cache_dir, _least_used(used, needed), [])


@dataclass(frozen=True)
class Eviction:
    """Room for a load: the least recently used siblings of one cache dir, planned and removed
    as the ``cache`` commands remove them (each step checked again under its lock)."""

    cache_dir: str

    def over_cap(self, cap: int, *, adding: int, keep: frozenset[str]) -> Plan | None:
        return plan_cap(self.cache_dir, cap, adding=adding, keep=keep)

    def for_room(self, directory: str, needed: int, keep: frozenset[str], used_before: float) -> Plan:
        return plan_room(self.cache_dir, directory, needed, keep, used_before)

    def carry_out(self, plan: Plan) -> Outcome:
        # A row-less sibling a load adopted since the plan is in use: kept (rows read only then).
        planned = {e.sibling for e in plan.rows}
        rowless = [r for r in plan.removals if r.kind == "sibling" and r.path not in planned]
        rows = _index.rows(self.cache_dir) if rowless else []
        named = _named_files([row.sibling_path for _, row in rows if row])
        taken = [r for r in rowless if (_identity(r.path) or ())[:2] in named]
        plan.removals = [r for r in plan.removals if r not in taken]
        plan.kept += [(r, "a row names it now") for r in taken]
        return execute(self.cache_dir, plan, pruning=False)


def prune(cache_dir: str) -> Outcome:
    """``plan_prune`` carried out."""
    return execute(cache_dir, plan_prune(cache_dir), pruning=True)


def clear(cache_dir: str) -> Outcome:
    """``plan_clear`` carried out."""
    return execute(cache_dir, plan_clear(cache_dir), pruning=False)

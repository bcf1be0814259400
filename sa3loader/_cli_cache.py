"""``sa3loader cache ls | verify | prune | clear | repair | rm | scan``: the index and the files it names."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import stat
import sys
import time
from dataclasses import asdict
from typing import Any

from . import _cache_admin, _cache_scan, _faults, _index
from ._cache_dir import resolve_cache_dir
from ._cli_output import EXIT_CHECK_FAILED, EXIT_ERROR, EXIT_OK, emit, human_size
from ._places import hub_name


def _ls_line(e: _cache_admin.Entry, paths: bool) -> str:
    if e.status == _cache_admin.INVALID:
        return f"{e.status:15} {e.source}: not a valid index row (loads ignore it; `cache prune` drops it)"
    source = e.source if paths else hub_name(e.source) or e.source
    sibling = f" -> {e.sibling}" if paths else ""
    created, used = (time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) for t in (e.created, e.last_used))
    return (
        f"{e.status:15} {source}{sibling}  {human_size(e.source_size)} -> "
        f"{human_size(e.sibling_size)} sibling, created {created}, last used {used}"
    )


def _bytes_on_disk(paths: set[str]) -> int:
    """The size of each file that exists, once each (rows of copies of a hub blob share one;
    hard links to one file are one file)."""
    files = {}
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(path)
            files[st.st_dev, st.st_ino] = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return sum(files.values())


def _ls_total(rows: list[_cache_admin.Entry]) -> str:
    valid = [e for e in rows if e.status != _cache_admin.INVALID]
    checkpoints, siblings = {e.key or e.source for e in valid}, {e.sibling for e in valid}
    return (
        f"{len(rows)} row(s): {human_size(_bytes_on_disk(checkpoints))} of checkpoints, "
        f"{human_size(_bytes_on_disk(siblings))} of siblings on disk"
    )


def _entry_data(e: _cache_admin.Entry) -> dict[str, Any]:
    data = asdict(e)
    data.pop("key")
    data["hub"] = hub_name(e.source)
    return data


def _removal_data(r: _cache_admin.Removal) -> dict[str, Any]:
    return {"path": r.path, "bytes": r.bytes, "kind": r.kind}


def _removal_lines(removed: list[_cache_admin.Removal], dry_run: bool) -> list[str]:
    """One line per file or dir with its size, then the total."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {r.kind} {r.path} ({human_size(r.bytes)})" for r in removed]
    files = [r for r in removed if r.kind != "empty dir"]
    dirs = len(removed) - len(files)
    total = f"{verb} {len(files)} file(s)" + (f" and {dirs} empty dir(s)" if dirs else "")
    return [*lines, f"{total}, {human_size(sum(r.bytes for r in removed))} in all"]


def _plan_data(plan: _cache_admin.Plan) -> dict[str, Any]:
    return {
        "rows": [_entry_data(e) for e in plan.rows],
        "removed": [_removal_data(r) for r in plan.removals],
        "kept": [{**_removal_data(r), "why": why} for r, why in plan.kept],
    }


def _kept_lines(kept: list[tuple[_cache_admin.Removal, str]], dry_run: bool) -> list[str]:
    verb = "would keep" if dry_run else "kept"
    return [f"{verb} {r.kind} {r.path}: {why}" for r, why in kept]


def _outcome_data(outcome: _cache_admin.Outcome) -> dict[str, Any]:
    return {
        "rows": [_entry_data(e) for e in outcome.rows],
        "removed": [_removal_data(r) for r in outcome.removed],
        "kept": [{**_removal_data(r), "why": why} for r, why in outcome.kept],
    }


def _ask(question: str) -> bool | None:
    """The person's answer; None when they ended the input (Ctrl-D) or pressed Ctrl-C."""
    try:
        answer = input(question)
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    return answer.strip().lower() in ("y", "yes")


def _prune_or_clear(args: argparse.Namespace, cache_dir: str) -> int:
    pruning = args.cache_command == "prune"
    plan = (
        _cache_admin.plan_prune(cache_dir, args.max_size) if pruning else _cache_admin.plan_clear(cache_dir)
    )
    rows = f"{len(plan.rows)} row(s)" + ("" if pruning else f" from {cache_dir}")
    verb = "prune" if pruning else "clear"
    if args.dry_run:
        lines = [f"would prune ({e.status}): {e.source}" for e in plan.rows] if pruning else []
        lines += [*_removal_lines(plan.removals, dry_run=True), *_kept_lines(plan.kept, dry_run=True)]
        lines.append(f"would {verb} {rows}")
        emit(args, {"dry_run": True, **_plan_data(plan)}, lines)
        return EXIT_OK
    if not pruning and not args.yes and not args.json and _faults.fact("interactive", None, interactive()):
        print("\n".join(_removal_lines(plan.removals, dry_run=True)))
        answer = _ask(f"clear {rows} and delete these files? [y/N] ")
        if answer is None:
            print("sa3loader: cancelled: nothing deleted", file=sys.stderr)
            return EXIT_ERROR
        if not answer:
            print("nothing deleted")
            return EXIT_OK
    outcome = _cache_admin.execute(cache_dir, plan, pruning=pruning)
    lines = [f"pruned ({e.status}): {e.source}" for e in outcome.rows] if pruning else []
    lines += [*_removal_lines(outcome.removed, dry_run=False), *_kept_lines(outcome.kept, dry_run=False)]
    lines.append(f"pruned {rows}" if pruning else f"cleared {rows}")
    emit(args, {"dry_run": False, **_outcome_data(outcome)}, lines)
    return EXIT_OK


def _rm(args: argparse.Namespace, cache_dir: str) -> int:
    plan = _cache_admin.plan_rm(cache_dir, args.checkpoints)
    verb = "would remove" if args.dry_run else "removed"
    if args.dry_run:
        lines = [*_removal_lines(plan.removals, dry_run=True), *_kept_lines(plan.kept, dry_run=True)]
        lines.append(f"{verb} {len(plan.rows)} row(s)")
        emit(args, {"dry_run": True, **_plan_data(plan)}, lines)
        return EXIT_OK
    outcome = _cache_admin.execute(cache_dir, plan, pruning=False)
    lines = [*_removal_lines(outcome.removed, dry_run=False), *_kept_lines(outcome.kept, dry_run=False)]
    lines.append(f"{verb} {len(outcome.rows)} row(s)")
    emit(args, {"dry_run": False, **_outcome_data(outcome)}, lines)
    return EXIT_OK


def _scan(args: argparse.Namespace, cache_dir: str) -> int:
    found = _cache_scan.scan(args.checkpoints, {e.sibling: e.source for e in _cache_admin.entries(cache_dir)})
    lines = [
        f"{f.status:15} {f.sibling}  {human_size(f.bytes)}  source: {f.source or 'not recorded'}"
        + (" (gone)" if f.status == _cache_admin.MISSING_SOURCE else "")
        + ("" if f.indexed else "  (no row)")
        for f in found
    ]
    gone = sum(f.status == _cache_admin.MISSING_SOURCE for f in found)
    lines.append(
        f"{len(found)} sibling(s), {human_size(sum(f.bytes for f in found))} on disk; "
        f"{gone} whose checkpoint is gone (remove with `sa3loader cache rm CHECKPOINT`)"
    )
    emit(args, [asdict(f) for f in found], lines)
    return EXIT_OK


def _verify_cache(args: argparse.Namespace, cache_dir: str) -> int:
    checks = _cache_admin.verify_all(cache_dir, progress=not args.json)
    lines = [
        f"{c.result}: {c.entry.source} -> {c.entry.sibling}"
        + (f" (max abs diff {c.max_abs_diff})" if c.max_abs_diff is not None else "")
        for c in checks
    ]
    data = [
        {**_entry_data(c.entry), "check": c.result, "max_abs_diff": _finite(c.max_abs_diff)} for c in checks
    ]
    emit(args, data, lines or ["no rows"])
    # Exit 3 means a problem with a sibling: one whose checkpoint is gone or changed since is
    # not damaged (``cache prune`` tidies it away).
    fine = (_cache_admin.OK, _cache_admin.MISSING_SOURCE, _cache_admin.STALE)
    return EXIT_OK if all(c.result in fine for c in checks) else EXIT_CHECK_FAILED


def _finite(value: float | None) -> float | str | None:
    """A number JSON can hold; inf and nan (a sibling that differs that much) as text."""
    return value if value is None or math.isfinite(value) else str(value)


def _repair(args: argparse.Namespace, cache_dir: str) -> int:
    aside = _index.repair(cache_dir, dry_run=args.dry_run)
    verb = "would set" if args.dry_run else "set"
    line = (
        f"the index in {cache_dir} is sound: nothing to repair"
        if aside is None
        else f"{verb} the corrupt index aside as {aside} and start a new one; "
        "loads adopt the siblings again from their own metadata"
    )
    emit(args, {"dry_run": args.dry_run, "repaired": aside is not None, "set_aside": aside}, [line])
    return EXIT_OK


def cmd_cache(args: argparse.Namespace) -> int:
    cache_dir = resolve_cache_dir(args.cache_dir)
    if args.cache_command == "ls":
        rows = sorted(_cache_admin.entries(cache_dir), key=lambda e: e.last_used)  # least recently used first
        lines = [f"cache dir: {cache_dir}", *(_ls_line(e, args.paths) for e in rows), _ls_total(rows)]
        emit(args, [_entry_data(e) for e in rows], lines)
        return EXIT_CHECK_FAILED if any(e.status == _cache_admin.INVALID for e in rows) else EXIT_OK
    if args.cache_command == "verify":
        return _verify_cache(args, cache_dir)
    if args.cache_command == "repair":
        return _repair(args, cache_dir)
    if args.cache_command == "rm":
        return _rm(args, cache_dir)
    if args.cache_command == "scan":
        return _scan(args, cache_dir)
    return _prune_or_clear(args, cache_dir)


def interactive() -> bool:
    """A person at a terminal, who can be asked before files are deleted."""
    return sys.stdin.isatty() and sys.stdout.isatty()

"""``python -m sa3loader`` / ``sa3loader``: convert ahead of time, warm, inspect the cache.

With ``_cli_output``, the only code that prints (``_cli_args`` holds the parser). Exit codes:
0 success, 1 error (one line on stderr; ``--debug``: the traceback), 2 bad usage, 3 a check
found a problem (README.md). With ``--json`` every outcome, errors included, is one JSON
document on stdout. Global options (``--cache-dir``, ``--json``, ``--debug``) go anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import stat
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from . import _cache_admin, _cache_scan, _cache_verify, _compare, _config, _faults, _index_repair, _records
from ._cache_admin import Eviction
from ._cache_dir import (
    closed_above,
    open_cache_dir_to_all,
    open_siblings_to_all,
    refuse_to_open_others,
    resolve_cache_dir,
)
from ._cli_args import Answered, UsageError, build_parser, check_arguments, parsed
from ._cli_output import (
    EXIT_CHECK_FAILED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    ask,
    emit,
    human_size,
    interactive,
    range_line,
)
from ._convert_dir import (
    FileAction,
    casts_kept,
    checked,
    checkpoints_in,
    convert_file,
    convert_tree,
    existing_sibling,
    not_converted,
    sibling_places,
    sibling_size,
)
from ._format import Header, open_header, read_header
from ._identity import (
    has_float32,
    is_sa3loader_file,
)
from ._places import hub_name, is_temp_name
from ._records import INVALID, MISSING_SOURCE, OK, STALE, Entry, Outcome, Plan, RangeReport, Removal
from ._resolver import resolve_sibling
from ._sibling import SiblingFinder, SiblingOutcome
from .errors import ConversionError, Sa3LoaderError, VerificationError


def _resolved(header: Header, cache_dir: str, verify: bool, *, keep_open: bool) -> SiblingOutcome:
    """The sibling a load of ``header``'s file would read, found or made now as a load would."""
    finder = SiblingFinder(header, cache_dir, _config.settings(verify=verify))
    return resolve_sibling(finder, Eviction(cache_dir), keep_open=keep_open)


def _convert_to_sibling(src: str, cache_dir: str | None, verify: bool) -> FileAction:
    """``convert FILE``: the sibling a load would use, made (or found) and recorded as a load would.

    With ``verify``, the sibling reported is the one checked, new or old; one that
    failed the check was converted again (``replaced_damaged``).
    """
    with open_header(src) as header:
        if not has_float32(header):  # a marker in its metadata (copied from a sibling) is not fp16
            return not_converted(header, src, "unchanged")
        with _resolved(header, resolve_cache_dir(cache_dir), verify, keep_open=True) as outcome:
            if outcome.sibling is None:
                raise ConversionError(f"{src}: {outcome.reason}", filename=src)
            converted = outcome.converted
            report = (
                RangeReport(converted.overflow_to_inf, converted.flushed_to_zero)
                if converted is not None
                else outcome.stored_range  # None: no row kept what its conversion counted
            )
            action = FileAction(
                src,
                outcome.sibling.path,
                "converted" if converted else "unchanged",
                report.overflow_to_inf if report else None,
                report.flushed_to_zero if report else None,
                replaced_damaged=outcome.replaced_damaged,
                casts_kept=casts_kept(header),
            )
            if verify:
                checked(action, outcome.checked or _compare.verify(header, outcome.sibling))
    return action


def cmd_convert(args: argparse.Namespace) -> int:
    if os.path.isdir(args.src):
        actions = convert_tree(
            args.src, args.out, in_place=args.in_place, force=args.force, verify=args.verify
        )
    elif args.out is None and not args.in_place:
        actions = [_convert_to_sibling(args.src, args.cache_dir, args.verify)]
    else:
        actions = [
            convert_file(args.src, args.out, in_place=args.in_place, force=args.force, verify=args.verify)
        ]
    lines = [f"{a.action:9} {a.source} -> {a.output}" + (f"  ({a.note})" if a.note else "") for a in actions]
    repaired = [a for a in actions if a.replaced_damaged]
    lines += [f"replaced  {a.output}: it failed the content check" for a in repaired]
    if args.verify:
        compared = [a for a in actions if a.max_abs_diff is not None]
        worst = max((a.max_abs_diff for a in compared if a.max_abs_diff is not None), default=0.0)
        tensors = sum(a.float_tensors for a in compared)
        lines.append(
            f"verify: max abs diff of fp16(source) vs output = {worst} "
            f"over {tensors} float tensor(s) in {len(compared)} file(s)"
        )
    done = [a for a in actions if a.action in ("converted", "unchanged", "copied")]  # not a skipped one
    lines.append(range_line([(a.overflow_to_inf, a.flushed_to_zero, a.casts_kept) for a in done]))
    emit(args, [asdict(a) for a in actions], lines)
    return EXIT_CHECK_FAILED if repaired else EXIT_OK


def cmd_warm(args: argparse.Namespace) -> int:
    """Create or check the sibling of a checkpoint, or of every checkpoint in a directory."""
    cache_dir = resolve_cache_dir(args.cache_dir)
    if args.readable_by_all:  # before any work
        refuse_to_open_others(cache_dir)
    paths = checkpoints_in(args.ckpt) if os.path.isdir(args.ckpt) else [args.ckpt]
    results, lines, code = [], [], EXIT_OK
    for path in paths:
        data, line, rc = _warm_one(path, cache_dir, args.verify)
        results.append(data)
        lines += line
        code = max(code, rc)
    if not paths:  # a mistyped folder in an image build: the build should stop, as convert's does
        lines.append(f"no .safetensors checkpoint in {args.ckpt}")
        code = EXIT_ERROR
    if args.readable_by_all:
        warmed = [(r["source"], r["sibling"]) for r in results if r.get("sibling")]
        opened = open_siblings_to_all(warmed) + open_cache_dir_to_all(cache_dir)  # refusals first
        for source, sibling in warmed:  # the chmod moved its ctime: checked and recorded again
            if sibling in opened:
                with open_header(source) as header, _resolved(header, cache_dir, False, keep_open=False):
                    pass
        closed = f"; but {shut} keeps them out of it" if (shut := closed_above(cache_dir)) else ""
        lines.append(
            f"made {cache_dir} readable by every user, and each sibling by no more than its checkpoint's "
            f"readers ({len(opened)} path(s) changed){closed}"
        )
        results = [{**r, "opened_to_all": opened} for r in results]
    emit(args, results if os.path.isdir(args.ckpt) else results[0], lines)
    return code


def _warm_one(path: str, cache_dir: str, verify: bool) -> tuple[dict[str, Any], list[str], int]:
    started = time.perf_counter()
    with open_header(path) as header:
        outcome = _resolved(header, cache_dir, verify, keep_open=verify)
        with outcome:
            if verify and outcome.sibling is not None and outcome.checked is None:  # converted now
                outcome.checked = _compare.verify(header, outcome.sibling)
    data: dict[str, Any] = {
        "source": header.path,
        "sibling": outcome.sibling.path if outcome.sibling else None,
        "converted": outcome.converted is not None,
        "reason": outcome.reason,
        "seconds": round(time.perf_counter() - started, 3),
    }
    lines = [f"{data['reason']}: {data['sibling'] or header.path} ({data['seconds']}s)"]
    if outcome.checked is not None:
        data["max_abs_diff"] = outcome.checked.max_abs_diff
        lines.append(
            f"checked every byte against fp16 of the source: max abs diff {outcome.checked.max_abs_diff} "
            f"over {outcome.checked.float_tensors} float tensors"
        )
    if outcome.sibling is None and has_float32(header):
        return data, lines, EXIT_ERROR
    return data, lines, EXIT_CHECK_FAILED if outcome.replaced_damaged else EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    header = read_header(args.ckpt)
    counts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for entry in header.entries:
        counts[entry.dtype] += 1
        nbytes[entry.dtype] += entry.nbytes
    f32 = nbytes.get("F32", 0)
    places = sibling_places(header, resolve_cache_dir(args.cache_dir)) if f32 else ()
    existing = existing_sibling(header, places)
    size = os.path.getsize(existing) if existing else sibling_size(header) if f32 else 0
    data = {
        "path": header.path,
        "file_size": header.file_size,
        "tensors": len(header.entries),
        "by_dtype": {d: {"tensors": counts[d], "bytes": nbytes[d]} for d in sorted(counts)},
        "fp16_sibling_size": size if f32 else None,
        "sibling": existing,
        "is_sa3loader_sibling": is_sa3loader_file(header),
        "metadata": header.metadata,
    }
    lines = [f"{header.path}: {len(header.entries)} tensors, {human_size(header.file_size)}"]
    lines += [f"  {d:8} {counts[d]:6} tensors  {human_size(nbytes[d])}" for d in sorted(counts)]
    if not f32:
        lines.append("no float32 tensors: nothing to convert")
    else:
        lines.append(
            f"fp16 sibling: {human_size(size)} more on disk; model_half=True loads take their weights "
            f"from it ({human_size(size)}) instead of from the checkpoint ({human_size(header.file_size)})"
        )
        there = [p for p in places if os.path.lexists(p)]
        made = "none yet (the first model_half=True load or `sa3loader warm` makes it)"
        if there:  # damaged, made from another version of it, or another file
            made = f"none usable ({there[0]} is there, but it is not this checkpoint's fp16 as it is now)"
        lines.append(f"sibling: {existing} (made for this checkpoint)" if existing else f"sibling: {made}")
    emit(args, data, lines)
    return EXIT_OK


def _ls_line(e: Entry, paths: bool) -> str:
    if e.status == INVALID:
        tail = "not a valid index row (a load of its checkpoint replaces it; `cache prune` drops it)"
        return f"{e.status:15} {e.source}: {tail}"
    source = e.source if paths else hub_name(e.source) or e.source
    sibling = f" -> {e.sibling}" if paths else ""
    created, used = (time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) for t in (e.created, e.last_used))
    return (
        f"{e.status:15} {source}{sibling}  {human_size(e.source_size)} -> "
        f"{human_size(e.sibling_size)} sibling, created {created}, last used {used}"
    )


def _files_on_disk(paths: set[str], follow: bool) -> dict[tuple[int, int], int]:
    """The size of each file that exists, once each (rows of copies of a hub blob share one;
    hard links to one file are one file), by device and inode; a link counted (``follow``:
    a checkpoint's, a hub snapshot's) or not (a link at a sibling's name is no sibling)."""
    files = {}
    for path in paths:
        with contextlib.suppress(OSError, ValueError):
            st = os.stat(path) if follow else os.lstat(path)
            files[st.st_dev, st.st_ino] = st.st_size if stat.S_ISREG(st.st_mode) else 0
    return files


def _bytes_on_disk(paths: set[str], follow: bool = True) -> int:
    return sum(_files_on_disk(paths, follow).values())


def _ls_total(rows: list[Entry]) -> str:
    valid = [e for e in rows if e.status != INVALID]
    checkpoints, siblings = {e.key or e.source for e in valid}, {e.sibling for e in valid}
    return (
        f"{len(rows)} row(s): {human_size(_bytes_on_disk(checkpoints))} of checkpoints, "
        f"{human_size(_bytes_on_disk(siblings, follow=False))} of siblings on disk"
    )


def _entry_data(e: Entry) -> dict[str, Any]:
    data = asdict(e)
    data.pop("key")
    data["hub"] = hub_name(e.source)
    return data


def _removal_data(r: Removal) -> dict[str, Any]:
    return {"path": r.path, "bytes": r.bytes, "kind": r.kind}


def _removal_lines(removed: list[Removal], dry_run: bool) -> list[str]:
    """One line per file or dir with its size, then the total."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {r.kind} {r.path} ({human_size(r.bytes)})" for r in removed]
    files = [r for r in removed if r.kind != "empty dir"]
    dirs = len(removed) - len(files)
    total = f"{verb} {len(files)} file(s)" + (f" and {dirs} empty dir(s)" if dirs else "")
    return [*lines, f"{total}, {human_size(sum(r.bytes for r in removed))} in all"]


def _plan_data(plan: Plan) -> dict[str, Any]:
    return {
        "rows": [_entry_data(e) for e in plan.rows],
        "removed": [_removal_data(r) for r in plan.removals],
        "kept": [{**_removal_data(r), "why": why} for r, why in plan.kept],
    }


def _kept_lines(kept: list[tuple[Removal, str]], dry_run: bool) -> list[str]:
    verb = "would keep" if dry_run else "kept"
    return [f"{verb} {r.kind} {r.path}: {why}" for r, why in kept]


def _outcome_data(outcome: Outcome) -> dict[str, Any]:
    return {
        "rows": [_entry_data(e) for e in outcome.rows],
        "removed": [_removal_data(r) for r in outcome.removed],
        "kept": [{**_removal_data(r), "why": why} for r, why in outcome.kept],
    }


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
    if not pruning and not args.yes and _faults.fact("interactive", None, interactive(args.json)):
        question = f"clear {rows} and delete these files? [y/N] "
        answer = ask(question, _removal_lines(plan.removals, dry_run=True), as_json=args.json)
        if isinstance(answer, BaseException):  # Ctrl-C (130) or Ctrl-D (1)
            code = EXIT_INTERRUPTED if isinstance(answer, KeyboardInterrupt) else EXIT_ERROR
            return _fail(args.json, code, answer, "cancelled")
        if not answer:
            emit(
                args,
                {"dry_run": False, "rows": [], "removed": [], "kept": [], "answer": "no"},
                ["nothing deleted"],
            )
            return EXIT_OK
    outcome = _cache_admin.execute(cache_dir, plan, pruning=pruning)
    lines = [f"pruned ({e.status}): {e.source}" for e in outcome.rows] if pruning else []
    lines += [*_removal_lines(outcome.removed, dry_run=False), *_kept_lines(outcome.kept, dry_run=False)]
    lines.append(f"pruned {rows}" if pruning else f"cleared {rows}")
    emit(args, {"dry_run": False, **_outcome_data(outcome)}, lines)
    return EXIT_OK


def _rm(args: argparse.Namespace, cache_dir: str) -> int:
    plan = _cache_admin.plan_rm(cache_dir, args.checkpoints)
    code = EXIT_ERROR if plan.unmatched else EXIT_OK  # a typo, most likely: said, exit 1
    if args.dry_run:
        data, removed, kept, rows = _plan_data(plan), plan.removals, plan.kept, plan.rows
    else:
        outcome = _cache_admin.execute(cache_dir, plan, pruning=False)
        data, removed, kept, rows = _outcome_data(outcome), outcome.removed, outcome.kept, outcome.rows
    # What matched nothing first; alone where nothing matched (no "removed 0" before it).
    lines = [f"nothing matches {c}: no row of it, nor a sibling or its temp file" for c in plan.unmatched]
    if plan.removals or plan.kept or plan.rows:
        lines += [*_removal_lines(removed, args.dry_run), *_kept_lines(kept, args.dry_run)]
        lines.append(f"{'would remove' if args.dry_run else 'removed'} {len(rows)} row(s)")
    emit(args, {"dry_run": args.dry_run, **data, "unmatched": plan.unmatched}, lines)
    return code


def _scan(args: argparse.Namespace, cache_dir: str) -> int:
    unreadable: list[OSError] = []
    rows = {e.sibling: e.source for e in _cache_admin.entries(cache_dir)}
    found = _cache_scan.scan(args.checkpoints, rows, unreadable)
    lines = [
        f"{f.status:15} {f.sibling}  {human_size(f.bytes)}  source: {f.source or 'not recorded'}"
        + (" (gone)" if f.status == MISSING_SOURCE else "")
        + ("" if f.indexed else "  (no row)")
        for f in found
    ]
    gone = sum(f.status == MISSING_SOURCE for f in found)
    files = _files_on_disk({f.sibling for f in found}, follow=False)  # overlapping dirs, hard links: one
    temp = {f.sibling for f in found if is_temp_name(os.path.basename(f.sibling))}  # a killed conversion's
    temps, size = len(_files_on_disk(temp, follow=False)), human_size(sum(files.values()))
    lines.append(
        f"{len(files) - temps} sibling(s){f' and {temps} temp file(s)' if temps else ''}, {size} on disk; "
        f"{gone} whose checkpoint is gone (remove with `sa3loader cache rm CHECKPOINT`)"
    )
    lines += [f"cannot read {e.filename} ({e.strerror}): siblings under it not counted" for e in unreadable]
    emit(args, [asdict(f) for f in found], lines)
    return EXIT_ERROR if unreadable else EXIT_OK


def _verify_cache(args: argparse.Namespace, cache_dir: str) -> int:
    checks = _cache_verify.verify_all(_cache_admin.entries(cache_dir, spots=False), progress=not args.json)
    lines = [
        f"{c.result}: {c.entry.source} -> {c.entry.sibling}"
        + (f" (max abs diff {c.max_abs_diff})" if c.max_abs_diff is not None else "")
        for c in checks
    ]
    data = [
        {
            **_entry_data(c.entry),
            "status": c.status,
            "check": c.result,
            "max_abs_diff": _finite(c.max_abs_diff),
        }
        for c in checks
    ]
    emit(args, data, lines or ["no rows"])
    # Exit 3: a damaged sibling or a row; one whose checkpoint went or changed is not (prune's).
    fine = (OK, MISSING_SOURCE, STALE, _records.UNREADABLE_SOURCE)  # (a source unreadable for now)
    return EXIT_OK if all(c.result in fine for c in checks) else EXIT_CHECK_FAILED


def _finite(value: float | None) -> float | str | None:
    """A number JSON can hold; inf and nan (a sibling that differs that much) as text."""
    return value if value is None or math.isfinite(value) else str(value)


def _repair(args: argparse.Namespace, cache_dir: str) -> int:
    aside = _index_repair.repair(cache_dir, dry_run=args.dry_run)
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
        return EXIT_CHECK_FAILED if any(e.status == INVALID for e in rows) else EXIT_OK
    if args.cache_command == "verify":
        return _verify_cache(args, cache_dir)
    if args.cache_command == "repair":
        return _repair(args, cache_dir)
    if args.cache_command == "rm":
        return _rm(args, cache_dir)
    if args.cache_command == "scan":
        return _scan(args, cache_dir)
    return _prune_or_clear(args, cache_dir)


COMMANDS = {"convert": cmd_convert, "warm": cmd_warm, "info": cmd_info, "cache": cmd_cache}


def _fail(as_json: bool, code: int, exc: BaseException, kind: str) -> int:
    """Report an error: one JSON document on stdout with ``--json``, else one line on stderr."""
    if as_json:
        error = {"type": type(exc).__name__, "message": str(exc), "filename": getattr(exc, "filename", None)}
        print(json.dumps({"error": error, "exit_code": code}, indent=2, default=str))
    else:
        print(f"sa3loader: {kind}: {exc}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except BrokenPipeError:  # the reader went (| head): the rest, and the exit's flush, go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR


def _main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args = parsed(parser, argv)
        check_arguments(parser, args)
    except Answered as answer:
        print(json.dumps(answer.document, indent=2)) if "--json" in argv else sys.stdout.write(answer.text)
        return EXIT_OK
    except UsageError as exc:
        if "--json" in argv:
            return _fail(True, EXIT_USAGE, exc, "usage")
        sys.stderr.write(exc.usage)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    level = logging.DEBUG if args.debug else _config.verbosity() or logging.WARNING
    logging.basicConfig(level=level, format="sa3loader: %(levelname)s: %(message)s")
    logging.getLogger(_config.LOGGER_NAME).setLevel(level)
    try:
        return int(COMMANDS[args.command](args))
    except VerificationError as exc:
        return _fail(args.json, EXIT_CHECK_FAILED, exc, "check failed")
    except (Sa3LoaderError, OSError) as exc:
        if args.debug or isinstance(exc, BrokenPipeError):  # (``main``'s to answer)
            raise
        return _fail(args.json, EXIT_ERROR, exc, "error")
    except KeyboardInterrupt:
        return _fail(args.json, EXIT_INTERRUPTED, KeyboardInterrupt("stopped by Ctrl-C"), "interrupted")

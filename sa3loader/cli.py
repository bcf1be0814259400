"""``python -m sa3loader`` / ``sa3loader``: convert ahead of time, warm, inspect the cache.

The only module that prints. Exit codes: 0 success, 1 error (one line on
stderr; ``--debug`` for the traceback), 2 bad usage, 3 a check found a problem
(``--verify``, ``cache verify``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from . import _cache_admin, _convert
from ._convert_dir import FileAction, convert_file, convert_tree
from ._format import open_header, read_header
from ._fsutil import resolve_cache_dir
from ._sibling import resolve_sibling
from .errors import ConversionError, Sa3LoaderError, VerificationError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED = 0, 1, 2, 3


def _emit(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            print(line)


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def _human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _convert_to_sibling(src: str, cache_dir: str | None, verify: bool) -> FileAction:
    """``convert FILE``: the sibling a load would use, made (or found) and recorded as a load would."""
    with open_header(src) as header:
        if _convert.is_sa3loader_file(header) or not _convert.has_float32(header):
            return FileAction(src, src, "unchanged")
        outcome = resolve_sibling(header, resolve_cache_dir(cache_dir), verify=verify)
    if outcome.sibling is None:
        raise ConversionError(f"{src}: {outcome.reason}")
    converted = outcome.converted
    report = (
        {"overflow_to_inf": converted.overflow_to_inf, "flushed_to_zero": converted.flushed_to_zero}
        if converted is not None
        else outcome.stored_range or {"overflow_to_inf": 0, "flushed_to_zero": 0}
    )
    return FileAction(
        src, outcome.sibling.path, "converted" if converted else "unchanged",
        report["overflow_to_inf"], report["flushed_to_zero"], verified=verify,
    )  # fmt: skip


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
    lines = [f"{a.action:9} {a.source} -> {a.output}" for a in actions]
    converted = [a for a in actions if a.action == "converted"]
    if args.verify:
        lines.append(f"verify: max abs diff of fp16(source) vs output = 0.0 over {len(converted)} file(s)")
    # An unchanged sibling reports what was stored when it was made.
    reported = [a for a in actions if a.action in ("converted", "unchanged")]
    overflow = sum(a.overflow_to_inf for a in reported)
    flushed = sum(a.flushed_to_zero for a in reported)
    lines.append(f"fp16 range: {overflow} values overflowed to inf, {flushed} nonzero values flushed to zero")
    _emit(args, [asdict(a) for a in actions], lines)
    return EXIT_OK


def cmd_warm(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with open_header(args.ckpt) as header:
        outcome = resolve_sibling(header, resolve_cache_dir(args.cache_dir), verify=args.verify)
    data = {
        "source": header.path,
        "sibling": outcome.sibling.path if outcome.sibling else None,
        "converted": outcome.converted is not None,
        "reason": outcome.reason,
        "seconds": round(time.perf_counter() - started, 3),
    }
    _emit(args, data, [f"{data['reason']}: {data['sibling'] or header.path} ({data['seconds']}s)"])
    if outcome.sibling is None and _convert.has_float32(header):
        return EXIT_ERROR
    return EXIT_OK


def cmd_info(args: argparse.Namespace) -> int:
    header = read_header(args.ckpt)
    counts: Counter[str] = Counter()
    nbytes: Counter[str] = Counter()
    for entry in header.entries:
        counts[entry.dtype] += 1
        nbytes[entry.dtype] += entry.nbytes
    f32 = nbytes.get("F32", 0)
    data = {
        "path": header.path,
        "file_size": header.file_size,
        "tensors": len(header.entries),
        "by_dtype": {d: {"tensors": counts[d], "bytes": nbytes[d]} for d in sorted(counts)},
        "fp16_sibling_size": header.file_size - f32 // 2 if f32 else None,
        "saves_bytes": f32 // 2,
        "is_sa3loader_sibling": _convert.is_sa3loader_file(header),
        "metadata": header.metadata,
    }
    lines = [f"{header.path}: {len(header.entries)} tensors, {_gb(header.file_size)}"]
    lines += [f"  {d:8} {counts[d]:6} tensors  {_gb(nbytes[d])}" for d in sorted(counts)]
    lines.append(
        f"conversion would save {_gb(f32 // 2)} (fp16 sibling about {_gb(header.file_size - f32 // 2)})"
        if f32
        else "no float32 tensors: nothing to convert"
    )
    _emit(args, data, lines)
    return EXIT_OK


def _ls_line(e: _cache_admin.Entry) -> str:
    if e.status == _cache_admin.INVALID:
        return f"{e.status:15} {e.source}: not a valid index row (loads ignore it; `cache prune` drops it)"
    return (
        f"{e.status:15} {e.source} ({_gb(e.source_size)}) -> {e.sibling} ({_gb(e.sibling_size)}), "
        f"created {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.created))}"
    )


def cmd_cache(args: argparse.Namespace) -> int:
    cache_dir = resolve_cache_dir(args.cache_dir)
    if args.cache_command == "ls":
        rows = _cache_admin.entries(cache_dir)
        lines = [f"cache dir: {cache_dir}"] + [_ls_line(e) for e in rows]
        _emit(args, [asdict(e) for e in rows], lines)
        return EXIT_CHECK_FAILED if any(e.status == _cache_admin.INVALID for e in rows) else EXIT_OK
    if args.cache_command == "verify":
        results = _cache_admin.verify_all(cache_dir)
        _emit(
            args,
            [{**asdict(e), "check": check} for e, check in results],
            [f"{check}: {e.source} -> {e.sibling}" for e, check in results] or ["no rows"],
        )
        return EXIT_OK if all(check == _cache_admin.OK for _, check in results) else EXIT_CHECK_FAILED
    if args.cache_command == "prune":
        pruned, removed = _cache_admin.prune(cache_dir, dry_run=args.dry_run)
        verb = "would prune" if args.dry_run else "pruned"
        lines = [f"{verb} ({e.status}): {e.source}" for e in pruned] + _removal_lines(removed, args.dry_run)
        lines.append(f"{verb} {len(pruned)} row(s)")
        _emit(args, {"rows": [asdict(e) for e in pruned], "removed": [asdict(r) for r in removed]}, lines)
        return EXIT_OK
    count, removed = _cache_admin.clear(cache_dir, dry_run=True)
    if not args.dry_run and not args.yes and not args.json and _interactive():
        print("\n".join(_removal_lines(removed, dry_run=True)))
        answer = input(f"clear {count} row(s) from {cache_dir} and delete these files? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    if not args.dry_run:
        count, removed = _cache_admin.clear(cache_dir)
    verb = "would clear" if args.dry_run else "cleared"
    lines = [*_removal_lines(removed, args.dry_run), f"{verb} {count} row(s) from {cache_dir}"]
    _emit(args, {"cleared_rows": count, "removed": [asdict(r) for r in removed]}, lines)
    return EXIT_OK


def _interactive() -> bool:
    """A person at a terminal, who can be asked before files are deleted."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def _removal_lines(removed: list[_cache_admin.Removal], dry_run: bool) -> list[str]:
    """One line per file with its size, then the total."""
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {r.kind} {r.path} ({_human(r.bytes)})" for r in removed]
    total = sum(r.bytes for r in removed)
    return [*lines, f"{verb} {len(removed)} file(s), {_human(total)} in all"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sa3loader",
        description="Convert Stable Audio 3 checkpoints to fp16 ahead of time and manage sa3loader's cache.",
        epilog="Exit codes: 0 ok, 1 error, 2 bad usage, 3 a check found a problem.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    parser.add_argument(
        "--cache-dir",
        help="cache dir (default: $SA3LOADER_CACHE_DIR, else $XDG_CACHE_HOME/sa3loader, "
        "else ~/.cache/sa3loader)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    p = add("convert", "convert a checkpoint file or directory to fp16 (only float32 tensors change)")
    p.add_argument("src", help="a .safetensors file or a checkpoint directory")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out", help="output file or directory (default: the sibling a load uses / <dir>-fp16)"
    )
    where.add_argument(
        "--in-place", action="store_true",
        help="replace each file (temp file + rename): atomic per file, not for the directory as a whole",
    )  # fmt: skip
    p.add_argument("--verify", action="store_true", help="re-read both sides: output must equal fp16(source)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_convert)

    p = add("warm", "create or validate the fp16 sibling of a checkpoint (for image builds, entrypoints)")
    p.add_argument("ckpt")
    p.add_argument("--verify", action="store_true", help="full content check of an existing sibling")
    p.set_defaults(func=cmd_warm)

    p = add("info", "tensors by dtype, sizes, and what conversion would save")
    p.add_argument("ckpt")
    p.set_defaults(func=cmd_info)

    p = add("cache", "list, check, prune or clear the cache")
    p.add_argument(
        "cache_command", choices=["ls", "verify", "prune", "clear"], metavar="ACTION",
        help="ls: list rows; verify: full content check; prune: drop stale rows and leftovers; clear: all",
    )  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="prune, clear: only list what would go")
    p.add_argument("--yes", action="store_true", help="clear: do not ask on a terminal")
    p.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING, format="sa3loader: %(levelname)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except VerificationError as exc:
        print(f"sa3loader: check failed: {exc}", file=sys.stderr)
        return EXIT_CHECK_FAILED
    except (Sa3LoaderError, OSError) as exc:
        if args.debug:
            raise
        print(f"sa3loader: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""``python -m sa3loader`` / ``sa3loader``: convert ahead of time, warm, inspect the cache.

With ``_cli_cache`` (the ``cache`` commands) and ``_cli_output``, the only code that
prints. Exit codes: 0 success, 1 error (one line on
stderr; ``--debug`` for the traceback), 2 bad usage, 3 a check found a problem
(``--verify``, ``cache verify``, ``cache ls`` with invalid rows). With
``--json`` every outcome, errors included, is one JSON document on stdout.
Global options (``--cache-dir``, ``--json``, ``--debug``) go before or after the command.
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
from typing import Any, NoReturn

from . import _compare, _config
from ._cache_dir import open_cache_dir_to_all, open_siblings_to_all, resolve_cache_dir
from ._cli_cache import cmd_cache
from ._cli_output import (
    EXIT_CHECK_FAILED,
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    emit,
    human_size,
)
from ._convert_dir import (
    FileAction,
    checked,
    checkpoints_in,
    convert_file,
    convert_tree,
    existing_sibling,
    sibling_size,
)
from ._format import open_header, read_header
from ._identity import (
    has_float32,
    is_sa3loader_file,
)
from ._records import RangeReport
from ._resolver import resolve_sibling
from ._version import __version__
from .errors import ConversionError, Sa3LoaderError, VerificationError

PATH_ACTIONS = ("rm", "scan")  # cache actions that take paths


class UsageError(Exception):
    """argparse's complaint, raised instead of printed, so ``--json`` can report it as JSON."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class _VersionAsked(Exception):
    """``--version``: printed by ``main``, as JSON too when ``--json`` is given (before or after)."""


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise _VersionAsked


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())


def _convert_to_sibling(src: str, cache_dir: str | None, verify: bool) -> FileAction:
    """``convert FILE``: the sibling a load would use, made (or found) and recorded as a load would.

    With ``verify``, the sibling reported is the one checked, new or old; one that
    failed the check was converted again (``replaced_damaged``).
    """
    with open_header(src) as header:
        if is_sa3loader_file(header) or not has_float32(header):
            return FileAction(src, src, "unchanged")
        with resolve_sibling(header, resolve_cache_dir(cache_dir), verify=verify, keep_open=True) as outcome:
            if outcome.sibling is None:
                raise ConversionError(f"{src}: {outcome.reason}", filename=src)
            converted = outcome.converted
            report = (
                RangeReport(converted.overflow_to_inf, converted.flushed_to_zero)
                if converted is not None
                else outcome.stored_range or RangeReport(0, 0)
            )
            action = FileAction(
                src,
                outcome.sibling.path,
                "converted" if converted else "unchanged",
                report.overflow_to_inf,
                report.flushed_to_zero,
                replaced_damaged=outcome.replaced_damaged,
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
    lines = [f"{a.action:9} {a.source} -> {a.output}" for a in actions]
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
    # An unchanged sibling reports what was stored when it was made.
    reported = [a for a in actions if a.action in ("converted", "unchanged")]
    overflow = sum(a.overflow_to_inf for a in reported)
    flushed = sum(a.flushed_to_zero for a in reported)
    lines.append(f"fp16 range: {overflow} values overflowed to inf, {flushed} nonzero values flushed to zero")
    emit(args, [asdict(a) for a in actions], lines)
    return EXIT_CHECK_FAILED if repaired else EXIT_OK


def cmd_warm(args: argparse.Namespace) -> int:
    """Create or check the sibling of a checkpoint, or of every checkpoint in a directory."""
    cache_dir = resolve_cache_dir(args.cache_dir)
    paths = checkpoints_in(args.ckpt) if os.path.isdir(args.ckpt) else [args.ckpt]
    results, lines, code = [], [], EXIT_OK
    for path in paths:
        data, line, rc = _warm_one(path, cache_dir, args.verify)
        results.append(data)
        lines += line
        code = max(code, rc)
    if not paths:
        lines.append(f"no .safetensors checkpoint in {args.ckpt}")
    if args.readable_by_all:
        warmed = [(r["source"], r["sibling"]) for r in results if r.get("sibling")]
        opened = open_cache_dir_to_all(cache_dir) + open_siblings_to_all(warmed)
        lines.append(
            f"made {cache_dir} readable by every user, and each sibling as readable as its checkpoint "
            f"({len(opened)} path(s) changed)"
        )
        results = [{**r, "opened_to_all": opened} for r in results]
    emit(args, results if os.path.isdir(args.ckpt) else results[0], lines)
    return code


def _warm_one(path: str, cache_dir: str, verify: bool) -> tuple[dict[str, Any], list[str], int]:
    started = time.perf_counter()
    with open_header(path) as header:
        outcome = resolve_sibling(header, cache_dir, verify=verify, keep_open=verify)
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
    existing = existing_sibling(header, resolve_cache_dir(args.cache_dir)) if f32 else None
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
        lines.append(
            f"sibling: {existing} (made for this checkpoint)"
            if existing
            else "sibling: none yet (the first model_half=True load or `sa3loader warm` makes it)"
        )
    emit(args, data, lines)
    return EXIT_OK


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after its name (``hf``, ``pip`` and git do the same)."""
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )
    parser.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    parser.add_argument(
        "--cache-dir",
        default=default,
        help="cache dir (default: $SA3LOADER_CACHE_DIR, else $XDG_CACHE_HOME/sa3loader, "
        "else ~/.cache/sa3loader)",
    )


def _cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "cache_command",
        choices=["ls", "verify", "prune", "clear", "repair", "rm", "scan"],
        metavar="ACTION",
        help="ls: list rows; verify: full content check; prune: drop stale rows and leftovers; clear: all; "
        "repair: set a corrupt index aside and start a new one; rm CHECKPOINT...: their siblings; "
        "scan DIR...: every sibling there, indexed or not",
    )
    p.add_argument(
        "checkpoints", nargs="*", metavar="PATH", help="rm: checkpoints (there or gone); scan: dirs"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="prune, clear, rm, repair: only say what would be done"
    )
    p.add_argument("--paths", action="store_true", help="ls: full paths (hub files are named repo@revision)")
    p.add_argument("--yes", action="store_true", help="clear: do not ask on a terminal")
    p.add_argument(
        "--max-size",
        type=_size_argument,
        metavar="SIZE",
        help="prune: also remove the least recently used siblings until they take at most SIZE (20GB)",
    )
    p.set_defaults(func=cmd_cache)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sa3loader",
        description="Convert Stable Audio 3 checkpoints to fp16 ahead of time and manage sa3loader's cache.",
        epilog="Exit codes: 0 ok, 1 error, 2 bad usage, 3 a check found a problem.",
    )
    parser.add_argument("--version", action=_Version)
    _global_options(parser, default=None)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_options(p, default=argparse.SUPPRESS)  # given here, they win; else the global value
        return p

    p = add("convert", "convert a checkpoint file or directory to fp16 (only float32 tensors change)")
    p.add_argument("src", help="a .safetensors file or a checkpoint directory")
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--out", help="output file or directory (default: the sibling a load uses / <dir>-fp16)"
    )
    where.add_argument(
        "--in-place",
        action="store_true",
        help="replace each file (temp file + rename): atomic per file, not for the directory as a whole",
    )
    p.add_argument("--verify", action="store_true", help="re-read both sides: output must equal fp16(source)")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.set_defaults(func=cmd_convert)

    p = add("warm", "create or check the fp16 sibling of a checkpoint, or of each in a dir (image builds)")
    p.add_argument("ckpt")
    p.add_argument("--verify", action="store_true", help="full content check of an existing sibling")
    p.add_argument(
        "--readable-by-all",
        action="store_true",
        help="image builds: let every user read the cache dir (dirs r-x, index r--); each sibling "
        "gets its checkpoint's read bits (whatever the umask), its .cache/sa3loader its folder's",
    )
    p.set_defaults(func=cmd_warm)

    p = add("info", "tensors by dtype, sizes, and what conversion would save")
    p.add_argument("ckpt")
    p.set_defaults(func=cmd_info)

    _cache_options(add("cache", "list, check, prune, clear or repair the cache, or remove some siblings"))
    return parser


def _check_cache_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not getattr(args, "cache_command", None):
        return
    if (args.cache_command in PATH_ACTIONS) != bool(args.checkpoints):
        parser.error("cache rm and scan take one or more paths; the other cache actions take none")
    if args.max_size is not None and args.cache_command != "prune":
        parser.error("--max-size goes with cache prune")


def _size_argument(text: str) -> int:
    try:
        return _config.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(as_json: bool, code: int, exc: BaseException, kind: str) -> int:
    """Report an error: one JSON document on stdout with ``--json``, else one line on stderr."""
    if as_json:
        error = {"type": type(exc).__name__, "message": str(exc), "filename": getattr(exc, "filename", None)}
        print(json.dumps({"error": error, "exit_code": code}, indent=2, default=str))
    else:
        print(f"sa3loader: {kind}: {exc}", file=sys.stderr)
    return code


def _parsed(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but paths after an option (``cache rm --dry-run CKPT``), which argparse
    leaves unparsed where a command's paths follow its action, are the command's paths."""
    args, extra = parser.parse_known_args(argv)
    ended = extra[:1] == ["--"]  # after "--", even "-x.safetensors" is a path
    paths = extra[1:] if ended else extra
    if getattr(args, "func", None) is cmd_cache and (ended or not any(a.startswith("-") for a in paths)):
        args.checkpoints, extra = [*args.checkpoints, *paths], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = _parsed(parser, argv)
        _check_cache_arguments(parser, args)
    except _VersionAsked:
        if "--json" in argv:
            print(json.dumps({"version": __version__}, indent=2))
        else:
            print(f"sa3loader {__version__}")
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
        return int(args.func(args))
    except VerificationError as exc:
        return _fail(args.json, EXIT_CHECK_FAILED, exc, "check failed")
    except (Sa3LoaderError, OSError) as exc:
        if args.debug:
            raise
        return _fail(args.json, EXIT_ERROR, exc, "error")
    except KeyboardInterrupt:
        return _fail(args.json, EXIT_INTERRUPTED, KeyboardInterrupt("stopped by Ctrl-C"), "interrupted")


if __name__ == "__main__":
    sys.exit(main())

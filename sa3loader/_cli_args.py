"""The command line's words: ``sa3loader``'s parser, its global options, and the checks
argparse cannot make, each a ``UsageError`` (exit 2) that ``--json`` can report as JSON."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any, NoReturn

from . import _config
from ._version import __version__

PATH_ACTIONS = ("rm", "scan")  # cache actions that take paths
PLANNED_ACTIONS = ("prune", "clear", "rm", "repair")  # cache actions --dry-run shows first


class UsageError(Exception):
    """argparse's complaint, raised instead of printed, so ``--json`` can report it as JSON."""

    def __init__(self, message: str, usage: str) -> None:
        super().__init__(message)
        self.usage = usage


class Answered(Exception):
    """``--version`` or ``--help``: printed by ``main`` (``text``), or as one JSON document
    (``document``) when ``--json`` is given, before or after."""

    def __init__(self, document: dict[str, str], text: str) -> None:
        super().__init__(text)
        self.document, self.text = document, text


class _Version(argparse.Action):
    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, help="print the version and exit")

    def __call__(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise Answered({"version": __version__}, f"sa3loader {__version__}\n")


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: main looks for "--json" as written (help, usage errors), so "--jso"
        # would give JSON for some outcomes and text for others.
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())

    def print_help(self, file: Any = None) -> NoReturn:  # argparse's help action, then its exit
        raise Answered({"help": self.format_help()}, self.format_help())


def _global_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after its name (``hf``, ``pip`` and git do the same)."""
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks and debug logs"
    )
    parser.add_argument("--json", action="store_true", default=default, help="machine-readable output")
    parser.add_argument(
        "--cache-dir",
        default=default,
        type=_non_empty,
        help="cache dir (default: $SA3LOADER_CACHE_DIR, else $XDG_CACHE_HOME/sa3loader, "
        "else ~/.cache/sa3loader)",
    )


def _non_empty(value: str) -> str:
    if not value.strip():  # not the current dir: an unset variable, likely
        raise argparse.ArgumentTypeError("empty: give a directory, or leave the option out for the default")
    return value


def _cache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "cache_command",
        choices=["ls", "verify", "prune", "clear", "repair", "rm", "scan"],
        metavar="ACTION",
        help="ls: list rows; verify: full content check; prune: drop stale rows, their siblings and what "
        "killed conversions left in the cache dir or beside an indexed sibling (rm: any); clear: all; "
        "repair: set a corrupt index aside and start a new one; rm CHECKPOINT...: their siblings; "
        "scan DIR...: every sibling there, indexed or not",
    )
    p.add_argument(
        "checkpoints", nargs="*", metavar="PATH", help="rm: checkpoints (there or gone); scan: dirs"
    )
    p.add_argument(
        "--dry-run", action="store_true", help=f"{', '.join(PLANNED_ACTIONS)}: only say what would be done"
    )
    p.add_argument("--paths", action="store_true", help="ls: full paths (hub files are named repo@revision)")
    p.add_argument("--yes", action="store_true", help="clear: do not ask on a terminal")
    p.add_argument(
        "--max-size",
        type=_size_argument,
        metavar="SIZE",
        help="prune: also remove the least recently used siblings until they take at most SIZE (20GB)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="sa3loader",
        description="Convert Stable Audio 3 checkpoints to fp16 ahead of time and manage sa3loader's cache.",
        epilog="Exit codes: 0 ok, 1 error, 2 bad usage, 3 a check found a problem, 130 Ctrl-C.",
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

    p = add("warm", "create or check the fp16 sibling of a checkpoint, or of each in a dir (image builds)")
    p.add_argument("ckpt")
    p.add_argument("--verify", action="store_true", help="full content check of an existing sibling")
    p.add_argument(
        "--readable-by-all",
        action="store_true",
        help="image builds: let every user read the cache dir (dirs r-x, index r--); each sibling "
        "gets its checkpoint's read bits (whatever the umask), its .cache/sa3loader its folder's",
    )

    p = add("info", "tensors by dtype, sizes, and what conversion would save")
    p.add_argument("ckpt")

    _cache_options(add("cache", "list, check, prune, clear or repair the cache, or remove some siblings"))
    return parser


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot tell: options that go with another option or kind of path."""
    if args.command == "convert" and args.force and args.out is None and not args.in_place:
        if not os.path.isdir(args.src):  # a new user's report: --force said "unchanged"
            parser.error(
                "--force replaces an --out file or a directory's output; a file's sibling is "
                "replaced when stale or damaged (cache rm FILE, then convert, makes it anew)"
            )
    if not getattr(args, "cache_command", None):
        return
    if (args.cache_command in PATH_ACTIONS) != bool(args.checkpoints):
        parser.error("cache rm and scan take one or more paths; the other cache actions take none")
    if args.max_size is not None and args.cache_command != "prune":
        parser.error("--max-size goes with cache prune")
    if args.dry_run and args.cache_command not in PLANNED_ACTIONS:  # they change nothing anyway
        parser.error(f"--dry-run goes with cache {', '.join(PLANNED_ACTIONS)}")


def _size_argument(text: str) -> int:
    try:
        return _config.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def parsed(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """``parse_args``, but paths after an option (``cache rm --dry-run CKPT``), which argparse
    leaves unparsed where a command's paths follow its action, are the command's paths."""
    args, extra = parser.parse_known_args(argv)
    ended = extra[:1] == ["--"]  # after "--", even "-x.safetensors" is a path
    paths = extra[1:] if ended else extra
    if args.command == "cache" and (ended or not any(a.startswith("-") for a in paths)):
        args.checkpoints, extra = [*args.checkpoints, *paths], []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args

"""What every command's output shares: exit codes, sizes in one format, text or one JSON document."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_CHECK_FAILED = 0, 1, 2, 3
EXIT_INTERRUPTED = 130


def emit(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            say(line)


def say(text: str) -> None:
    print(printable(text))


def printable(text: str) -> str:
    """``text``, escaped where stdout's encoding cannot hold it (a file name not UTF-8 under a
    strict ``PYTHONIOENCODING=utf-8``: UnicodeEncodeError, a traceback), as stderr writes it."""
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    return text


def human_size(n: int) -> str:
    """Every size the CLI prints, in one format: three significant digits, decimal units (as pip)."""
    for unit, scale in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        shown = float(f"{n / scale:.3g}")  # rounded first: 999,700 B is 1 MB, not 1e+03 kB
        if shown >= 1:
            return f"{shown:.3g} {unit}" if shown < 1000 else f"{shown:.0f} {unit}"
    return f"{n} B"


def range_line(counted: list[tuple[int | None, int | None, bool]]) -> str:
    """The fp16 range report of the files converted, or found (what was stored when each was
    made: None where its row, which kept it, is gone, or where nothing was converted but a load
    casts bf16 or f64): said, never a 0 that nothing counted. Where a counted file keeps bf16 or
    f64 as it is, the count is a model_half load's: said too (only float32 changes in the file)."""
    known = [(inf, zero, kept) for inf, zero, kept in counted if inf is not None and zero is not None]
    overflow, flushed = sum(inf for inf, _, _ in known), sum(zero for _, zero, _ in known)
    line = f"fp16 range: {overflow} values overflowed to inf, {flushed} nonzero values flushed to zero"
    if any(kept for _, _, kept in known):
        line += " (bf16/f64 tensors are kept as they are: counted as a model_half load casts them)"
    unknown = len(counted) - len(known)
    if not unknown:
        return line
    why = "found without the row that kept it, or holding bf16/f64 a load casts"
    return (
        f"{line}; not counted for {unknown} file(s) ({why})" if known else f"fp16 range: not counted ({why})"
    )


def interactive(as_json: bool) -> bool:
    """A person at a terminal, who can be asked before files are deleted (with ``--json``, on stderr)."""
    return sys.stdin.isatty() and (sys.stderr if as_json else sys.stdout).isatty()


def ask(question: str, lines: list[str], *, as_json: bool) -> bool | EOFError | KeyboardInterrupt:
    """The person's yes or no, after ``lines``; the Ctrl-D or Ctrl-C that ended the input instead.
    With ``--json`` all of it goes to stderr: stdout holds one JSON document."""
    stream = sys.stderr if as_json else sys.stdout
    for line in lines:
        print(printable(line), file=stream)
    try:
        if as_json:
            print(printable(question), end="", file=stream, flush=True)
        answer = input("" if as_json else printable(question))
    except (EOFError, KeyboardInterrupt) as ended:
        print(file=stream)
        return type(ended)("nothing deleted")
    return answer.strip().lower() in ("y", "yes")

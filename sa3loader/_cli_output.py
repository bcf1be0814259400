"""What every command's output shares: exit codes, sizes in one format, text or one JSON document."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

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


def printable(text: str, stream: TextIO | None = None) -> str:
    """``text``, escaped where the encoding of ``stream`` (stdout) cannot hold it (a file name not
    UTF-8 under a strict ``PYTHONIOENCODING=utf-8``: UnicodeEncodeError, a traceback), as stderr
    writes it."""
    encoding = getattr(sys.stdout if stream is None else stream, "encoding", None) or "utf-8"
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


def _question_stream(as_json: bool) -> TextIO:
    """Where a question goes: the terminal; stdout where both are (stderr where stdout holds
    ``--json``'s document), stderr where neither is."""
    if as_json:
        return sys.stdout if sys.stdout.isatty() and not sys.stderr.isatty() else sys.stderr
    return sys.stdout if sys.stdout.isatty() else sys.stderr


def interactive(as_json: bool) -> bool:
    """A person at a terminal, who can be asked before files are deleted: stdin and the stream
    the question goes to are terminals (stdout or stderr redirected alone, they still are)."""
    return sys.stdin.isatty() and _question_stream(as_json).isatty()


def ask(question: str, lines: list[str], *, as_json: bool) -> bool | EOFError | KeyboardInterrupt:
    """The person's yes or no, after ``lines``; the Ctrl-D or Ctrl-C that ended the input instead.
    The question is written here (``input()`` itself may prompt on stderr, redirected or not)."""
    stream = _question_stream(as_json)
    for line in lines:
        print(printable(line, stream), file=stream)
    print(printable(question, stream), end="", file=stream, flush=True)
    try:
        answer = input("")
    except (EOFError, KeyboardInterrupt) as ended:
        print(file=stream)
        return type(ended)("nothing deleted")
    return answer.strip().lower() in ("y", "yes")

"""``cache verify``: every row's sibling compared, byte for byte, with fp16 of its checkpoint."""

from __future__ import annotations

from dataclasses import dataclass

from . import _compare
from ._format import open_header
from ._records import DAMAGED, OK, Entry
from .errors import Sa3LoaderError


@dataclass
class Check:
    """What ``verify_all`` found for one row; ``status``: the row's, its content compared."""

    entry: Entry
    result: str  # "ok", or what is wrong
    status: str
    max_abs_diff: float | None = None  # over the float tensors, when both files could be compared


def verify_all(listed: list[Entry], progress: bool = False) -> list[Check]:
    """Full content check of every ok row of ``listed`` (``entries``: its spots need no look)."""
    checks = []
    for entry in listed:
        if entry.status != OK:
            checks.append(Check(entry, entry.status, entry.status))
            continue
        try:
            with (
                open_header(entry.key or entry.source) as source,  # the file the row is about
                open_header(entry.sibling, follow_symlinks=False) as sib,
            ):
                diff = _compare.compare(source, sib, progress=progress)
        except (Sa3LoaderError, OSError) as exc:
            checks.append(Check(entry, f"cannot be checked: {exc}", entry.status))
            continue
        result = OK if diff.equal else f"content mismatch: {', '.join(diff.mismatched[:3])} differ"
        checks.append(Check(entry, result, OK if diff.equal else DAMAGED, diff.max_abs_diff))
    return checks

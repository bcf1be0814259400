"""Inspect and clean a cache dir: list rows, check content, prune, clear.

Nothing here deletes a file that lacks sa3loader's metadata marker.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import _convert
from ._format import read_header
from ._fsutil import SHARED_CACHE_ENV, cache_dir_trust
from ._identity import hard_match, source_identity
from ._index import Index
from .errors import Sa3LoaderError, UntrustedCacheDirError, VerificationError

OK, STALE, MISSING_SOURCE, MISSING_SIBLING = "ok", "stale", "missing source", "missing sibling"
INVALID = "invalid"  # a row of the wrong shape: treated as absent by loads


@dataclass
class Entry:
    source: str
    sibling: str
    source_size: int
    sibling_size: int
    created: float
    status: str


def _status(row: dict[str, Any]) -> str:
    source, sibling = row["source"]["real_path"], row["sibling"]["path"]
    if not os.path.exists(source):
        return MISSING_SOURCE
    if not os.path.exists(sibling):
        return MISSING_SIBLING
    try:
        current = source_identity(read_header(source))
        sib = read_header(sibling)
    except (Sa3LoaderError, OSError):
        return STALE
    if not hard_match(current, row["source"]) or sib.sha256 != row["sibling"]["header_sha256"]:
        return STALE
    return OK


def _entry(key: str, row: dict[str, Any] | None) -> Entry:
    if row is None:
        return Entry(source=key, sibling="", source_size=0, sibling_size=0, created=0.0, status=INVALID)
    return Entry(
        source=row["source"]["path"],
        sibling=row["sibling"]["path"],
        source_size=row["source"]["size"],
        sibling_size=row["sibling"]["size"],
        created=row.get("created", 0.0),
        status=_status(row),
    )


def _open_index(cache_dir: str) -> Index:
    """The index, only of a dir no one else controls: its rows name files to check and delete."""
    distrust = cache_dir_trust(cache_dir)
    if distrust is not None:
        raise UntrustedCacheDirError(
            f"refusing the cache dir {cache_dir}: {distrust} "
            f"(set ${SHARED_CACHE_ENV}=1 for a shared team cache)"
        )
    return Index(cache_dir)


def entries(cache_dir: str) -> list[Entry]:
    index = _open_index(cache_dir)
    try:
        return [_entry(key, row) for key, row in index.items()]
    finally:
        index.close()


def verify_all(cache_dir: str) -> list[tuple[Entry, str]]:
    """Full content check of every ok row: (entry, "ok" or what is wrong)."""
    results = []
    for entry in entries(cache_dir):
        if entry.status != OK:
            results.append((entry, entry.status))
            continue
        try:
            _convert.verify(read_header(entry.source), read_header(entry.sibling))
            results.append((entry, OK))
        except (VerificationError, Sa3LoaderError, OSError) as exc:
            results.append((entry, f"content mismatch: {exc}"))
    return results


def _remove_sibling(path: str) -> bool:
    """Delete ``path`` only if it is an sa3loader sibling."""
    if not _convert.is_sa3loader_path(path):
        return False
    os.unlink(path)
    return True


def prune(cache_dir: str, *, dry_run: bool = False) -> list[Entry]:
    """Drop rows (and their siblings) whose source is gone or changed, and invalid rows."""
    index = _open_index(cache_dir)
    pruned = []
    try:
        listed = [(key, _entry(key, row)) for key, row in index.items()]
        # A sibling path can outlive its row's source: a symlinked checkpoint repointed
        # to another file reuses it. Never delete what a valid row still names.
        in_use = {entry.sibling for _, entry in listed if entry.status == OK}
        for key, entry in listed:
            if entry.status == OK:
                continue
            pruned.append(entry)
            if dry_run:
                continue
            stale_file = entry.status in (STALE, MISSING_SOURCE) and entry.sibling not in in_use
            if stale_file and os.path.exists(entry.sibling):
                _remove_sibling(entry.sibling)
            index.delete(key)
    finally:
        index.close()
    return pruned


def clear(cache_dir: str) -> int:
    """Remove every row and every sibling they name (sa3loader files only)."""
    index = _open_index(cache_dir)
    try:
        for _, row in index.items():
            if row is not None and os.path.exists(row["sibling"]["path"]):
                _remove_sibling(row["sibling"]["path"])
        return index.clear()
    finally:
        index.close()

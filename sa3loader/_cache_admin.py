"""Inspect and clean a cache dir: list rows, check content, prune, clear.

Nothing here deletes a file that lacks sa3loader's metadata marker.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from . import _config, _convert
from ._format import read_header
from ._fsutil import (
    INCOMPLETE_INFIX,
    LOCK_SUFFIX,
    SIBLINGS_SUBDIR,
    cache_dir_trust,
    conversion_lock,
    remove_stray_incomplete,
)
from ._identity import hard_match, source_identity
from ._index import Index
from .errors import LockTimeoutError, Sa3LoaderError, UntrustedCacheDirError, VerificationError

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
            f"(set ${_config.SHARED_CACHE_ENV}=1 for a shared team cache)"
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


@dataclass
class Removal:
    """A file (or empty dir) a cache command removed, or would remove with ``dry_run``."""

    path: str
    bytes: int
    kind: str  # "sibling", "temp file", "lock file", "empty dir"


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0


def _remove_sibling(path: str, dry_run: bool) -> list[Removal]:
    """``path`` if it exists and is an sa3loader sibling; nothing else is ever deleted."""
    if not os.path.exists(path) or not _convert.is_sa3loader_path(path):
        return []
    removal = Removal(path, _size(path), "sibling")
    if not dry_run:
        os.unlink(path)
    return [removal]


def _sweep_one(sibling: str, dry_run: bool) -> list[Removal]:
    """Temp files and the lock of a sibling nobody is converting now, deleted under that lock."""
    pattern = glob.escape(sibling) + INCOMPLETE_INFIX + "*"
    lock = sibling + LOCK_SUFFIX
    temps = sorted(glob.glob(pattern))
    planned = [Removal(t, _size(t), "temp file") for t in temps]
    planned += [Removal(lock, _size(lock), "lock file")] if os.path.exists(lock) else []
    if dry_run or not planned:
        return planned
    try:
        with conversion_lock(sibling, timeout=0) as locked:
            if not locked:
                return []
            sizes = {t: _size(t) for t in glob.glob(pattern)}
            removed = [Removal(t, sizes.get(t, 0), "temp file") for t in remove_stray_incomplete(sibling)]
            os.unlink(lock)
            return [*removed, Removal(lock, 0, "lock file")]
    except (LockTimeoutError, OSError):  # a conversion is running, or the dir is read-only
        return []


def sweep(cache_dir: str, siblings: Iterable[str] = (), *, dry_run: bool = False) -> list[Removal]:
    """Remove what crashed or killed conversions left: temp files, lock files, empty dirs.

    Covers the given siblings (those rows name, often beside their sources) and
    everything under the cache dir's ``siblings/``. Each sibling's leftovers go
    only while holding its conversion lock, so a running conversion is never touched.
    """
    root = os.path.join(cache_dir, SIBLINGS_SUBDIR)
    found = set(siblings)
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(LOCK_SUFFIX):
                found.add(os.path.join(directory, name[: -len(LOCK_SUFFIX)]))
            elif INCOMPLETE_INFIX in name:
                found.add(os.path.join(directory, name.split(INCOMPLETE_INFIX)[0]))
    removed = [r for sibling in sorted(found) for r in _sweep_one(sibling, dry_run)]
    for directory, _, _ in sorted(os.walk(root, topdown=False), reverse=True):
        if directory != root and not dry_run:
            with contextlib.suppress(OSError):  # only empty dirs go
                os.rmdir(directory)
                removed.append(Removal(directory + os.sep, 0, "empty dir"))
    return removed


def prune(cache_dir: str, *, dry_run: bool = False) -> tuple[list[Entry], list[Removal]]:
    """Drop rows (and their siblings) whose source is gone or changed, and invalid rows;
    then ``sweep`` leftovers. Returns the rows dropped and every file removed."""
    index = _open_index(cache_dir)
    pruned: list[Entry] = []
    removed: list[Removal] = []
    try:
        listed = [(key, _entry(key, row)) for key, row in index.items()]
        # A sibling path can outlive its row's source: a symlinked checkpoint repointed
        # to another file reuses it. Never delete what a valid row still names.
        in_use = {entry.sibling for _, entry in listed if entry.status == OK}
        for key, entry in listed:
            if entry.status == OK:
                continue
            pruned.append(entry)
            if entry.status in (STALE, MISSING_SOURCE) and entry.sibling not in in_use:
                removed += _remove_sibling(entry.sibling, dry_run)
            if not dry_run:
                index.delete(key)
    finally:
        index.close()
    return pruned, removed + sweep(cache_dir, [e.sibling for _, e in listed if e.sibling], dry_run=dry_run)


def clear(cache_dir: str, *, dry_run: bool = False) -> tuple[int, list[Removal]]:
    """Remove every row and every sibling they name (sa3loader files only), then ``sweep``.

    Returns the number of rows and every file removed.
    """
    index = _open_index(cache_dir)
    try:
        rows = index.items()
        siblings = [row["sibling"]["path"] for _, row in rows if row is not None]
        removed = [r for sibling in siblings for r in _remove_sibling(sibling, dry_run)]
        count = len(rows) if dry_run else index.clear()
    finally:
        index.close()
    return count, removed + sweep(cache_dir, siblings, dry_run=dry_run)

"""``cache repair``: whether the index is sound, by SQLite's check and by diskcache's own open
of a copy; if not, set it aside for a new one (siblings are adopted again by the next load)."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import time

import diskcache

from ._index import (
    DATABASE_NAME,
    INDEX_ERRORS,
    SafeJSONDisk,
    command_index,
    database_error,
    index_timeout,
)


def diagnose(directory: str) -> str | None:
    """None when the index database in ``directory`` is sound (or absent), else what is wrong.

    A database another process holds is not corrupt: ``CacheIndexError``.
    """
    path = os.path.join(directory, DATABASE_NAME)
    if not os.path.exists(path):
        return None
    try:
        con = sqlite3.connect(path, timeout=index_timeout())
        try:
            (result,) = con.execute("PRAGMA quick_check").fetchone()
            if con.execute("SELECT 1 FROM Cache GROUP BY key, raw HAVING count(*) > 1").fetchone():
                result = "two rows for one key (diskcache cannot open it)"
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise database_error(directory, "be checked", exc) from exc
        return str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)
    return str(result) if result != "ok" else _diskcache_refuses(path)


def _diskcache_refuses(path: str) -> str | None:
    """Why diskcache cannot open or use the database at ``path`` (a Settings table it cannot
    use: an outside attack), tried on a copy (SQLite's backup) in a private temp dir; None
    where it can. The index itself is only read."""
    with tempfile.TemporaryDirectory(prefix="sa3loader-check-") as scratch:
        source = sqlite3.connect(path, timeout=index_timeout())
        copy = sqlite3.connect(os.path.join(scratch, DATABASE_NAME))
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()
        try:
            with diskcache.Cache(scratch, timeout=index_timeout(), disk=SafeJSONDisk) as cache:
                cache.get("")
                cache.set("", {})  # a write culls, as a load's does
        except INDEX_ERRORS as exc:
            return f"diskcache cannot use it ({type(exc).__name__}: {exc})"
    return None


def repair(cache_dir: str, *, dry_run: bool = False) -> str | None:
    """Set a corrupt index aside and start a new one; returns where it went (with ``dry_run``,
    where it would go, and nothing moves), or None if it was fine.

    A locked index is not corrupt: ``CacheIndexError``. Siblings are not touched:
    loads adopt them again from their own metadata.
    """
    with command_index(cache_dir) as index:  # refuses an untrusted dir before anything moves
        problem = diagnose(index.directory)
    if problem is None or dry_run:
        return None if problem is None else f"{index.directory}.corrupt-<time>-<pid>"
    aside = f"{index.directory}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(index.directory, aside)
    with command_index(cache_dir) as index:
        index.items()  # a new, empty index
    return aside

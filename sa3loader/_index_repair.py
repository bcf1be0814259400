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
    ReadOnlyRows,
    SafeJSONDisk,
    command_index,
    database_error,
    index_timeout,
    read_only,
    refuse_expanded,
)


def diagnose(directory: str) -> str | None:
    """None when the index database in ``directory`` is sound (or absent), else what is wrong.

    A database another process holds is not corrupt, nor one that cannot be checked here (no
    room for the copy diskcache opens): ``CacheIndexError``. One this user may only read (a
    baked image's) is read as a load reads it.
    """
    path = os.path.join(directory, DATABASE_NAME)
    if not os.path.exists(path):
        return None
    try:
        con = (
            ReadOnlyRows(directory).connection
            if read_only(directory)
            else sqlite3.connect(path, timeout=index_timeout())
        )
        try:
            (result,) = con.execute("PRAGMA quick_check").fetchone()
            if con.execute("SELECT 1 FROM Cache GROUP BY key, raw HAVING count(*) > 1").fetchone():
                result = "two rows for one key (diskcache cannot open it)"
            return str(result) if result != "ok" else _diskcache_refuses(directory, con)
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            raise database_error(directory, "be checked", exc) from exc
        return str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)


# What diskcache raises from its own code over a Settings table it cannot use (an outside attack).
_SETTINGS_IT_CANNOT_USE = (TypeError, KeyError, ValueError)


def _diskcache_refuses(directory: str, con: sqlite3.Connection) -> str | None:
    """Why diskcache cannot use the database ``con`` reads (a Settings table: a Disk argument, an
    eviction policy, a size limit it cannot use), tried on a copy (SQLite's backup) in a private
    temp dir; None where it can. Nothing there is the index's fault (no room, a path diskcache
    would expand): ``CacheIndexError``, never a diagnosis."""
    try:
        with tempfile.TemporaryDirectory(prefix="sa3loader-check-") as scratch:
            refuse_expanded(scratch)  # diskcache would open another place: $TMPDIR with a $NAME
            copy = sqlite3.connect(os.path.join(scratch, DATABASE_NAME))
            try:
                con.backup(copy)
            finally:
                copy.close()
            try:
                with diskcache.Cache(scratch, timeout=index_timeout(), disk=SafeJSONDisk) as cache:
                    cache.get("")
                    cache.set("", {})  # a write culls, as a load's does
            except _SETTINGS_IT_CANNOT_USE as exc:
                return f"diskcache cannot use it ({type(exc).__name__}: {exc})"
    except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
        raise database_error(directory, "be checked (a copy diskcache opens, in the temp dir)", exc) from exc
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

"""``cache repair``: whether the index is sound, by SQLite's check and by diskcache's own open
of a copy; if not, set it aside for a new one (siblings are adopted again by the next load)."""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import time

import diskcache

from ._index import (
    DATABASE_NAME,
    SQLITE_BUSY,
    SQLITE_CANTOPEN,
    SQLITE_FULL,
    SQLITE_IOERR,
    SQLITE_LOCKED,
    SQLITE_READONLY,
    ReadOnlyRows,
    SafeJSONDisk,
    command_index,
    database_error,
    database_uri,
    index_timeout,
    read_only,
    refuse_expanded,
    sqlite_code,
)
from .errors import CacheIndexError

logger = logging.getLogger(__name__)


def diagnose(directory: str) -> str | None:
    """None when the index database in ``directory`` is sound (or absent), else what is wrong.

    A database another process holds is not corrupt, nor one that cannot be checked here (no
    room for the copy diskcache opens): ``CacheIndexError``. It is opened read-only (a check,
    `--dry-run` too, changes nothing in it); one this user may only read (a baked image's) is
    read as a load reads it.
    """
    path = os.path.join(directory, DATABASE_NAME)
    if not os.path.exists(path):
        return None
    try:
        con = (
            ReadOnlyRows(directory).connection
            if read_only(directory)
            else sqlite3.connect(database_uri(directory) + "?mode=ro", uri=True, timeout=index_timeout())
        )
        try:
            (result,) = con.execute("PRAGMA quick_check").fetchone()
            tables = {name for (name,) in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            # (no table yet: an index a first load has just made, which diskcache finishes)
            if "Cache" in tables and con.execute(_TWO_ROWS_FOR_ONE_KEY).fetchone():
                result = "two rows for one key (diskcache cannot open it)"
            if result == "ok" and "Settings" in tables:
                result = _unknown_setting(con) or result
            return str(result) if result != "ok" else _diskcache_refuses(directory, con)
        finally:
            con.close()
    except sqlite3.OperationalError as exc:
        # Held by another process, or a hot journal only a writer may roll back: not corrupt.
        if sqlite_code(exc) in _NOT_ITS_FAULT or (sqlite_code(exc) is None and _says_not_its_fault(exc)):
            raise database_error(directory, "be checked", exc) from exc
        return str(exc)
    except sqlite3.DatabaseError as exc:
        return str(exc)


_TWO_ROWS_FOR_ONE_KEY = "SELECT 1 FROM Cache GROUP BY key, raw HAVING count(*) > 1"
# What diskcache raises from its own code over a Settings table it cannot use (an outside attack).
_SETTINGS_IT_CANNOT_USE = (TypeError, KeyError, ValueError, sqlite3.Warning)  # (see INDEX_ERRORS)
# SQLite's result codes: BUSY, LOCKED, READONLY (a hot journal a read-only check cannot roll
# back) are not the index's fault; IOERR, FULL, CANTOPEN from the copy are the temp dir's.
_NOT_ITS_FAULT = (SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY)
_THE_TEMP_DIRS = (SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN)


# What diskcache's Settings table holds in an index sa3loader made (it passes no settings of its
# own): diskcache's defaults and counts. diskcache sets every key on itself when it opens, runs
# each sqlite_* as a PRAGMA and gives each disk_* to its Disk: another (``_directory``,
# ``sqlite_locking_mode``, ``sqlite_max_page_count``) moves the index, locks out every other
# load, or fills it, for good.
_SETTINGS_KNOWN = frozenset(diskcache.core.DEFAULT_SETTINGS) | frozenset(diskcache.core.METADATA)


def _unknown_setting(con: sqlite3.Connection) -> str | None:
    for (key,) in con.execute("SELECT key FROM Settings"):
        if key not in _SETTINGS_KNOWN:
            return f"a setting sa3loader's index never has ({key!r}), which diskcache would act on"
    return None


def _says_not_its_fault(exc: sqlite3.Error) -> bool:
    """Where Python (< 3.11) tells no result code: SQLite's own words for BUSY, LOCKED and
    READONLY ("database is locked", "... is busy", "attempt to write a readonly database")."""
    return any(word in str(exc) for word in ("locked", "busy", "readonly"))


def _the_temp_dirs(exc: sqlite3.Error) -> bool:
    """Whether an error from diskcache's open of the copy is the temp dir's (no room, no file),
    not the index's own (a Settings value it runs, a column, a constraint);
    where Python (< 3.11) tells no code, SQLite's words for those three codes say it."""
    code = sqlite_code(exc)
    if code is None:
        return isinstance(exc, sqlite3.OperationalError) and any(w in str(exc) for w in _TEMP_DIR_WORDS)
    return code in _THE_TEMP_DIRS


# sqlite3_errstr of IOERR, FULL and CANTOPEN: how SQLite words them.
_TEMP_DIR_WORDS = ("disk I/O error", "database or disk is full", "unable to open database file")


def _diskcache_refuses(directory: str, con: sqlite3.Connection) -> str | None:
    """Why diskcache cannot use the database ``con`` reads (a Settings table: a Disk argument, an
    eviction policy, a size limit, a PRAGMA it cannot use; a column missing), tried on a copy
    (SQLite's backup) in a private temp dir; None where it can. What is not the index's fault
    (no room there, a path diskcache would expand): ``CacheIndexError``, never a diagnosis."""
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
            except (*_SETTINGS_IT_CANNOT_USE, sqlite3.Error) as exc:
                if isinstance(exc, sqlite3.Error) and _the_temp_dirs(exc):
                    raise
                return f"diskcache cannot use it ({type(exc).__name__}: {exc})"
    except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
        raise database_error(directory, "be checked (a copy diskcache opens, in the temp dir)", exc) from exc
    return None


def repair(cache_dir: str, *, dry_run: bool = False) -> str | None:
    """Set a corrupt index aside and start a new one; returns where it went (with ``dry_run``,
    where it would go, and nothing moves), or None if it was fine.

    A locked index is not corrupt: ``CacheIndexError``. Siblings are not touched:
    loads adopt them again from their own metadata. Once it is set aside, a new one that
    cannot be made now is made by the next load (a warning, not an error: it moved).
    """
    with command_index(cache_dir) as index:  # refuses an untrusted dir before anything moves
        problem = diagnose(index.directory)
    if problem is None or dry_run:
        return None if problem is None else f"{index.directory}.corrupt-<time>-<pid>"
    aside = f"{index.directory}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    try:
        os.rename(index.directory, aside)
    except OSError as exc:
        raise database_error(index.directory, f"be set aside as {aside}", exc) from exc
    try:
        with command_index(cache_dir) as index:
            index.items()  # a new, empty index
    except CacheIndexError as exc:
        logger.warning("set %s aside; a new index is made by the next load (%s)", aside, exc)
    return aside

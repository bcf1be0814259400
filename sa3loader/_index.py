"""The diskcache index: real source path -> JSON record of its sibling.

Rows are plain JSON. diskcache's own ``JSONDisk`` still unpickles rows stored
in pickle mode, so a planted row could run code: ``SafeJSONDisk`` refuses
every mode but raw bytes. Every row is checked against ``ROW_SHAPE`` before
use: a row of another shape is treated as absent (and replaced by the next
write). Keys are paths, which on POSIX are bytes: a path that is not valid
UTF-8 is stored hex-encoded behind a NUL, which no path can contain. The
index is an accelerator, never a requirement: when it cannot be opened or
read, loading goes on without it (a sibling's own metadata is enough to adopt it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import diskcache
from diskcache.core import MODE_RAW, UNKNOWN

from . import _config, _faults
from ._config import info_once, warn_once
from ._places import INDEX_SUBDIR, create_cache_dir
from ._records import IndexRow
from ._trust import cache_dir_trust, refused_cache_dir_hint
from .errors import (
    CacheIndexError,
    UntrustedCacheDirError,
)

logger = logging.getLogger(__name__)

INDEX_TIMEOUT_S = 2.0
DATABASE_NAME = diskcache.core.DBNAME


# What reading or writing the index may raise: SQLite's, the OS's, diskcache's own; and from
# diskcache's code, TypeError, KeyError or ValueError where its Settings table holds what it
# cannot use (a size limit of text, an eviction policy or a Disk argument it has not), and
# sqlite3.Warning where a PRAGMA value there is two statements (Python < 3.11; then a
# ProgrammingError, an Error).
INDEX_ERRORS = (OSError, sqlite3.Error, sqlite3.Warning, diskcache.Timeout, TypeError, KeyError, ValueError)


def index_timeout() -> float:
    return _faults.tuned("index_timeout_s", INDEX_TIMEOUT_S)


# Rows are a few hundred bytes; keep every one inside SQLite, never in side files.
MAX_ROW_BYTES = 1 << 20
_BYTES_KEY_PREFIX = "\x00bytes:"


def encode_key(path: str) -> str:
    """A str SQLite can store for any path, even one that is not valid UTF-8."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return _BYTES_KEY_PREFIX + os.fsencode(path).hex()
    return path


def decode_key(key: str) -> str | None:
    """The path ``encode_key`` made ``key`` of; None for a key it never makes (not hex after the
    prefix, or hex it would not write: a row listed under another key is deleted as that key)."""
    if key.startswith(_BYTES_KEY_PREFIX):
        try:
            path = os.fsdecode(bytes.fromhex(key[len(_BYTES_KEY_PREFIX) :]))
        except ValueError:
            return None
        return path if encode_key(path) == key else None
    return key


class UnsafeRowError(ValueError):
    """A row was not stored by sa3loader (pickled key or value, or not JSON)."""


# What ``SafeJSONDisk.get`` gives for a key it will not unpickle: iteration skips it.
UNSAFE_KEY = object()


class SafeJSONDisk(diskcache.Disk):
    """diskcache ``Disk`` that stores str keys and JSON values, never unpickles, never deletes.

    Rows never own files (values live in SQLite), so ``remove`` does nothing:
    diskcache calls it with a file name taken from the row being replaced or
    deleted, and a planted row could name any file.
    """

    def __init__(self, directory: str, **kwargs: Any) -> None:
        kwargs["min_file_size"] = MAX_ROW_BYTES
        super().__init__(directory, **kwargs)

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError("index keys are str paths")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        if not raw or type(key) is not str:
            return UNSAFE_KEY  # a pickled key: never loaded
        return key

    def remove(self, file_path: str) -> None:
        pass

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[Any, ...]:
        data = json.dumps(value, sort_keys=True).encode("utf-8")
        if read or len(data) >= MAX_ROW_BYTES:
            raise ValueError("index rows are small JSON objects")
        return 0, MODE_RAW, None, sqlite3.Binary(data)

    def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
        return decode_row(mode, value)


def decode_row(mode: int, value: Any) -> Any:
    """A row's JSON value; ``UnsafeRowError`` for any other way of storing it (pickle above all)."""
    if mode != MODE_RAW or not isinstance(value, (bytes, sqlite3.Binary)):
        how = f"stored in mode {mode}" if mode != MODE_RAW else f"holding {type(value).__name__}"
        raise UnsafeRowError(f"refusing an index row {how} (only JSON in bytes is read)")
    try:
        return json.loads(bytes(value).decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (nested too deep for Python): invalid, as ever
        raise UnsafeRowError(f"refusing an index row that is not JSON ({type(exc).__name__})") from None


class ExpandedPath(OSError):
    """A cache dir whose path diskcache would change (``expanduser``, ``expandvars``): its index elsewhere."""


def refuse_expanded(directory: str) -> None:
    """diskcache opens ``directory`` with ``~`` and ``$NAME`` expanded: ``.../$HOME/index`` would be
    an index outside the cache dir, never checked for trust (an outside attack)."""
    opened = os.path.expandvars(os.path.expanduser(directory))  # diskcache's own two steps
    if opened != directory:
        raise ExpandedPath(f"{directory}: diskcache would open {opened}")


def database_error(directory: str, what: str, exc: BaseException) -> CacheIndexError:
    path = os.path.join(directory, DATABASE_NAME)
    if isinstance(exc, ExpandedPath):
        why = "diskcache expands ~ and $NAME in the paths it opens: give it paths without them"
    elif os.path.isdir(directory) and not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        owner = os.stat(directory).st_uid  # a shared cache's index, made by another user first
        why = (
            f"{directory} is uid {owner}'s, closed to this user (uid {os.getuid()}): run this as uid {owner}"
        )
    else:
        why = (
            "If another process holds it, try again; if it is corrupt, `sa3loader cache repair` sets it "
            "aside and starts a new one (siblings are kept and adopted again by the next load)"
        )
    return CacheIndexError(f"{path}: the sa3loader index cannot {what} ({exc}). {why}", filename=path)


def read_only(directory: str) -> bool:
    """An index that exists but cannot be written here: a baked image layer, a read-only mount."""
    path = os.path.join(directory, DATABASE_NAME)
    if not os.path.exists(path):
        return False
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return True
    except OSError:
        pass
    return not (os.access(directory, os.W_OK | os.X_OK) and os.access(path, os.R_OK | os.W_OK))


# SQLite's primary result codes (sqlite3.SQLITE_BUSY and the rest from Python 3.11).
SQLITE_BUSY, SQLITE_LOCKED, SQLITE_READONLY, SQLITE_IOERR, SQLITE_FULL, SQLITE_CANTOPEN = 5, 6, 8, 10, 13, 14


def _codes_told() -> bool:
    """Whether SQLite's errors carry their result code here (Python >= 3.11: its constants too)."""
    return hasattr(sqlite3, "SQLITE_BUSY")


def sqlite_code(exc: BaseException) -> int | None:
    """SQLite's primary result code of ``exc`` (the low byte of an extended one); None where
    Python (< 3.11) tells none: a caller decides by the code, never by the words."""
    code = getattr(exc, "sqlite_errorcode", None) if _codes_told() else None
    return code & 0xFF if isinstance(code, int) else None


def _held_elsewhere(exc: BaseException) -> bool:
    """SQLite's answer that another connection holds the database."""
    return sqlite_code(exc) in (SQLITE_BUSY, SQLITE_LOCKED)


def _plain_rows(directory: str) -> ReadOnlyRows | None:
    """The writable index at ``directory`` opened with SQLite alone; None where there is no
    database, or it is read-only (``Index._open`` says so), or SQLite cannot open it."""
    try:
        if os.path.exists(os.path.join(directory, DATABASE_NAME)) and not read_only(directory):
            return ReadOnlyRows(directory, writable=True)
    except sqlite3.Error:
        pass
    return None


def database_uri(directory: str) -> str:
    """The index database's SQLite URI (no query): any path names its very file, bytes that
    are not UTF-8 and a leading "//" (a URI's host) included."""
    return "file://" + urllib.parse.quote(
        os.fsencode(os.path.abspath(os.path.join(directory, DATABASE_NAME)))
    )


class ReadOnlyRows:
    """diskcache's table read with SQLite alone, never written: an index this user cannot write
    opened read-only (immutable where a WAL's -shm cannot be made), a writable one a load reads
    opened ``mode=rw``; no write lock taken, no database created either way.

    Only rows as ``SafeJSONDisk`` stores them are read (a str key stored raw, a
    JSON value stored raw); anything else is absent, never unpickled.
    """

    def __init__(self, directory: str, *, writable: bool = False) -> None:
        uri = database_uri(directory)
        if writable:  # a load's read of a writable index (``Index.get``): never created here
            # It waits for a held database only where it can tell one by its code (Python >= 3.11,
            # ``_held_elsewhere``); elsewhere the probe after it waits, once.
            wait = index_timeout() if _codes_told() else 0.0
            self._con = sqlite3.connect(uri + "?mode=rw", uri=True, timeout=wait)
            return
        try:
            self._con = sqlite3.connect(uri + "?mode=ro", uri=True, timeout=index_timeout())
            self._con.execute("SELECT count(*) FROM Cache").fetchone()
        except sqlite3.Error:
            # A WAL database on a read-only layer: no -shm file can be made, and nothing
            # can change the file either, so it is read as immutable.
            self._con = sqlite3.connect(uri + "?mode=ro&immutable=1", uri=True, timeout=index_timeout())

    @property
    def connection(self) -> sqlite3.Connection:
        return self._con

    def get(self, key: str) -> Any:
        # diskcache's own get (``Cache.get``): an expired row is absent (sa3loader sets no expiry)
        found = self._con.execute(
            "SELECT mode, value FROM Cache WHERE key = ? AND raw = 1"
            " AND (expire_time IS NULL OR expire_time > ?)",
            (key, time.time()),
        ).fetchmany(2)
        if len(found) > 1:  # diskcache's unique index dropped: its open fails on the table
            raise sqlite3.IntegrityError(f"{len(found)} rows for one key")
        return decode_row(*found[0]) if found else None

    def iterkeys(self) -> list[Any]:
        return [key for (key,) in self._con.execute("SELECT key FROM Cache WHERE raw = 1 ORDER BY rowid")]

    def close(self) -> None:
        self._con.close()


class Index:
    """The index of one cache dir.

    For a load (default) every failure means 'no row' plus one warning: the index
    only speeds loads up. For a cache command (``strict``) a failure is a
    ``CacheIndexError``: reporting an empty cache would say what is not true.
    An index that cannot be written here (a baked image) is read without any
    lock and nothing is recorded in it, with one INFO line.
    """

    def __init__(self, cache_dir: str, *, usable: bool = True, strict: bool = False) -> None:
        self.directory = os.path.join(cache_dir, INDEX_SUBDIR)
        self._cache: diskcache.Cache | ReadOnlyRows | None = None
        # A load's reads before any write: SQLite alone (diskcache's open runs ~80 statements on
        # three connections, a tenth of a DiT's cache hit); any error there takes diskcache's path.
        self._reader: ReadOnlyRows | None = None
        self._plain = not strict
        self._broken = not usable
        self.strict = strict
        self.read_only = False

    def _open(self) -> diskcache.Cache | ReadOnlyRows | None:
        if self._cache is None and not self._broken:
            try:
                if read_only(self.directory):
                    self._cache = ReadOnlyRows(self.directory)
                    self.read_only = True
                    info_once(
                        f"index-read-only:{self.directory}",
                        "sa3loader index at %s is read-only: reading it, recording nothing",
                        self.directory,
                    )
                else:
                    refuse_expanded(self.directory)
                    self._probe()
                    if not os.path.isdir(self.directory):  # a new cache dir
                        create_cache_dir(self.directory)
                    self._cache = diskcache.Cache(self.directory, timeout=index_timeout(), disk=SafeJSONDisk)
            except INDEX_ERRORS as exc:
                self._failed("open", exc)
        return self._cache

    def _plain_reader(self) -> ReadOnlyRows | None:
        """For a load that has not opened diskcache: the writable index read with SQLite alone
        (``_plain_rows``), its rows as diskcache's ``get`` gives them."""
        if self._reader is None and self._cache is None and self._plain and not self._broken:
            self._reader = _plain_rows(self.directory)
            self._plain = self._reader is not None
        return self._reader

    def _probe(self) -> None:
        """Fail fast on a locked or corrupt database: diskcache's own open retries for 60 s."""
        path = os.path.join(self.directory, DATABASE_NAME)
        if not os.path.exists(path):
            return
        con = sqlite3.connect(path, timeout=index_timeout(), isolation_level=None)
        try:
            # diskcache writes while opening; in WAL mode only a write lock tells us it would wait.
            con.execute("BEGIN IMMEDIATE")
            con.execute("ROLLBACK")
        finally:
            con.close()

    def _failed(self, what: str, exc: BaseException) -> None:
        if self.strict:
            raise database_error(self.directory, what, exc) from exc
        self._broken = what == "open"
        warn_once(
            f"index:{self.directory}:{what}",
            "sa3loader index at %s cannot %s (%s); loading without it",
            self.directory,
            what,
            exc,
        )

    def get(self, source_real: str) -> IndexRow | None:
        """The row for this source, or None when there is none or it is not a valid row."""
        return IndexRow.from_json(self._read(source_real))

    def _read(self, source_real: str) -> Any:
        reader = self._plain_reader()
        if reader is not None:
            try:
                return reader.get(encode_key(source_real))
            except (sqlite3.Error, ValueError) as exc:  # an unsafe row too: read again below
                reader.close()
                self._reader, self._plain = None, False
                if _held_elsewhere(exc):  # waited for already: the probe would wait as long again
                    self._failed("open", exc)
        cache = self._open()
        if cache is None:
            return None
        try:
            return cache.get(encode_key(source_real))
        except UnsafeRowError as exc:
            # A read-only index keeps it (reading it never fails for that); a command's reads
            # change nothing (`prune` drops it); a load's drops it.
            kept = self.read_only or self.strict
            what = "read as no row" if kept else "dropped"
            logger.warning("%s: unsafe index row for %s (%s): %s", self.directory, source_real, exc, what)
            if not kept:
                self.delete(source_real)
        except INDEX_ERRORS as exc:
            self._failed("be read", exc)
        return None

    def _writable(self) -> diskcache.Cache | None:
        """The index to write, or None for a load's that cannot be written; a command's
        (``strict``) that cannot be written raises: it would report rows it never removed."""
        cache = self._open()
        if self.read_only and self.strict:
            path = os.path.join(self.directory, DATABASE_NAME)
            raise CacheIndexError(
                f"{path}: the sa3loader index is read-only here (a baked image, or another user's): "
                "nothing was changed; run this as a user who can write it",
                filename=path,
            )
        return None if self.read_only else cache

    def put(self, source_real: str, row: IndexRow, *, while_there: bool = False) -> None:
        """Write ``row``; ``while_there`` (a load's): only while its sibling is on disk, looked at in the
        write's transaction. A cache command drops, after removing siblings, the rows naming a missing
        one (``only_if``): whichever goes first, no load leaves a row naming a sibling removed."""
        cache = self._writable()
        if cache is None:
            return
        try:
            with cache.transact():
                if not while_there or os.path.lexists(row.sibling_path):
                    cache.set(encode_key(source_real), row.to_json())
        except INDEX_ERRORS as exc:
            self._failed("be written", exc)

    def delete(self, source_real: str, only_if: Callable[[IndexRow | None], bool] | None = None) -> bool:
        """Whether a row was deleted; ``only_if``: only a row it accepts, in the delete's transaction."""
        cache = self._writable()
        if cache is None:
            return False
        key = encode_key(source_real)
        try:
            with cache.transact():
                if only_if is not None and not only_if(IndexRow.from_json(cache.get(key))):
                    return False
                return bool(cache.delete(key))
        except INDEX_ERRORS as exc:
            self._failed("be written", exc)
            return False

    def items(self) -> list[tuple[str, IndexRow | None]]:
        """Every row as (source path, row); the row is None when it is not a valid row."""
        cache = self._open()
        if cache is None:
            return []
        try:
            keys = [k for k in cache.iterkeys() if isinstance(k, str)]
        except INDEX_ERRORS as exc:
            self._failed("be read", exc)
            return []
        rows: list[tuple[str, IndexRow | None]] = []
        for key in keys:
            path = decode_key(key)  # not sa3loader's key: an invalid row (``encode_key(key)`` is key)
            rows.append((key, None) if path is None else (path, IndexRow.from_json(self._read(path))))
        return rows

    def clear(self) -> int:
        cache = self._writable()
        if cache is None:
            return 0
        try:
            return int(cache.clear())
        except INDEX_ERRORS as exc:
            self._failed("be written", exc)
            return 0

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if self._cache is not None:
            self._cache.close()
            self._cache = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def command_index(cache_dir: str) -> Iterator[Index]:
    """The index, strict, only of a dir no one else controls: its rows name files to check and delete."""
    refuse_untrusted(cache_dir)
    directory = os.path.join(cache_dir, INDEX_SUBDIR)
    try:
        refuse_expanded(directory)  # before a command (`repair`) moves anything
    except ExpandedPath as exc:
        raise database_error(directory, "open", exc) from exc
    with Index(cache_dir, strict=True) as index:
        yield index


def refuse_untrusted(cache_dir: str) -> None:
    distrust = cache_dir_trust(cache_dir, shared=_config.shared_cache())
    if distrust is not None:
        raise UntrustedCacheDirError(
            f"refusing the cache dir {cache_dir}: {distrust} "
            f"({refused_cache_dir_hint(distrust, _config.SHARED_CACHE_ENV)})",
            filename=cache_dir,
        )


def has_index(cache_dir: str) -> bool:
    """Reading a cache that was never made creates nothing: no dir, no index."""
    return os.path.isdir(os.path.join(cache_dir, INDEX_SUBDIR))


def rows(cache_dir: str) -> list[tuple[str, IndexRow | None]]:
    """Every (key, row) of a cache dir's index, a row of the wrong shape as None; none where
    there is no index (reading a cache that was never made creates nothing)."""
    if not has_index(cache_dir):
        if os.path.isdir(cache_dir):  # others could write there: said, not listed as empty
            refuse_untrusted(cache_dir)
        return []
    with command_index(cache_dir) as index:
        return list(index.items())

"""The index is an accelerator, never a requirement or a door: broken, locked, planted or odd rows
never break a load or run code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.child import digest
from support.loads import load_toy, make_ckpt, reference_digest

import sa3loader
from sa3loader import _faults
from sa3loader._index import Index


@pytest.fixture
def loaded(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache")
    return ckpt, tmp_path / "cache"


@pytest.mark.parametrize("damage", ["garbage", "deleted", "empty"])
def test_broken_index_database_never_breaks_loading(loaded, damage, caplog):
    ckpt, cache = loaded
    db = cache / "index" / "cache.db"
    if damage == "garbage":
        db.write_bytes(b"this is not a sqlite database" * 100)
    elif damage == "deleted":
        db.unlink()
    else:
        db.write_bytes(b"")
    model = load_toy(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    info = sa3loader.last_load_info()
    assert info.cache_hit and not info.converted  # adopted from the sibling's own metadata


def test_locked_index_does_not_stall_loading(loaded, monkeypatch):
    """diskcache's own open retries a locked database for 60 s; the probe gives up first."""
    import diskcache

    ckpt, cache = loaded
    monkeypatch.setitem(_faults.tunings, "index_timeout_s", 0.2)  # how long a locked index is waited for
    opened = []
    real_cache = diskcache.Cache
    monkeypatch.setattr(diskcache, "Cache", lambda *a, **k: opened.append(a) or real_cache(*a, **k))
    holder = sqlite3.connect(cache / "index" / "cache.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        model = load_toy(ckpt, cache)
        assert digest(model) == reference_digest(ckpt)
        assert opened == []  # never handed to diskcache's retrying open
    finally:
        holder.rollback()
        holder.close()


def test_index_row_pointing_at_a_missing_file(loaded):
    ckpt, cache = loaded
    index = Index(str(cache))
    row = index.get(os.path.realpath(ckpt))
    index.put(
        os.path.realpath(ckpt), dataclasses.replace(row, sibling_path=str(cache / "gone.fp16.safetensors"))
    )
    index.close()
    model = load_toy(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().sibling == str(
        ckpt.with_name(".cache") / "sa3loader" / "model.fp16.safetensors"
    )


def test_planted_pickle_row_is_refused_and_never_runs(loaded, tmp_path):
    ckpt, cache = loaded
    marker = tmp_path / "pwned"
    payload = (
        b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    )  # pickle protocol 0: os.system("touch ...")
    index = Index(str(cache))
    index._open()
    index.close()
    with sqlite3.connect(cache / "index" / "cache.db") as db:
        db.execute("DELETE FROM Cache")
        cols = (
            "key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value"
        )
        db.execute(
            f"INSERT INTO Cache ({cols}) VALUES (?, 1, 0, NULL, 0, 0, NULL, 0, 4, NULL, ?)",
            (os.path.realpath(ckpt), payload),
        )
        db.execute(
            f"INSERT INTO Cache ({cols}) VALUES (?, 0, 0, NULL, 0, 0, NULL, 0, 1, NULL, ?)",
            (payload, b"{}"),
        )
    model = load_toy(ckpt, cache)
    assert not marker.exists()
    assert digest(model) == reference_digest(ckpt)
    assert Index(str(cache)).get(os.path.realpath(ckpt)) is not None  # healed with a valid JSON row
    assert not marker.exists()


def test_cache_ls_shows_an_unsafe_row_and_only_prune_drops_it(loaded, capsys):
    """A row stored as anything but JSON (SQLite TEXT here): a command that reads changes
    nothing (`ls` twice says invalid, exit 3); `cache prune` drops it; a load replaces it."""
    from sa3loader import cli

    ckpt, cache = loaded
    with sqlite3.connect(cache / "index" / "cache.db") as db:
        db.execute("UPDATE Cache SET mode = 3, value = ?", ("a row as text",))
    for _ in range(2):
        assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 3
        assert "invalid" in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(cache), "cache", "prune"]) == 0
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0


BAD_ROWS = {
    "list": [1, 2],
    "string": "row",
    "empty": {"schema": 1},
    "source-not-a-dict": "SOURCE_LIST",
    "sibling-size-a-string": "SIBLING_SIZE",
    "range-a-list": "RANGE_LIST",
    "schema-from-the-future": "SCHEMA_2",
}


@pytest.mark.parametrize("bad", list(BAD_ROWS))
def test_index_row_of_the_wrong_shape_is_treated_as_absent(loaded, bad, capsys):
    """JSON-valid rows of another shape: loads ignore and replace them, ``cache ls`` says invalid."""
    from sa3loader import cli

    ckpt, cache = loaded
    key = os.path.realpath(ckpt)
    index = Index(str(cache))
    row = index.get(key).to_json()
    value = BAD_ROWS[bad]
    if value == "SOURCE_LIST":
        value = {**row, "source": [1, 2]}
    elif value == "SIBLING_SIZE":
        value = {**row, "sibling": {**row["sibling"], "size": "big"}}
    elif value == "RANGE_LIST":
        value = {**row, "range": [0, 0]}
    elif value == "SCHEMA_2":
        value = {**row, "schema": 2}
    index._open().set(key, value)
    index.close()
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 3
    assert "invalid" in capsys.readouterr().out
    model = load_toy(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().cache_hit
    assert Index(str(cache)).get(key) is not None  # replaced by a valid row
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0
    index._open().set(key, value)
    index.close()
    assert cli.main(["--cache-dir", str(cache), "cache", "prune"]) == 0
    assert Index(str(cache)).items() == []
    assert (
        ckpt.with_name(".cache") / "sa3loader" / "model.fp16.safetensors"
    ).exists()  # prune of an invalid row deletes no file


def test_source_path_that_is_not_utf8_round_trips_through_the_index(tmp_path):
    raw_dir = os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff"
    os.mkdir(raw_dir)
    ckpt = make_ckpt(Path(os.fsdecode(raw_dir)) / "model.safetensors")
    expected = reference_digest(make_ckpt(tmp_path / "same.safetensors"))  # load_file wants UTF-8 paths
    for expect_hit in (False, True):
        model = load_toy(ckpt, tmp_path / "cache")
        info = sa3loader.last_load_info()
        assert (info.cache_hit, info.converted) == (expect_hit, not expect_hit)
        assert digest(model) == expected
    [(key, row)] = Index(str(tmp_path / "cache")).items()
    assert os.fsencode(key) == os.fsencode(os.path.realpath(ckpt)) and row is not None


def test_a_planted_row_cannot_make_the_index_delete_a_file(loaded, tmp_path):
    """diskcache removes the file a replaced or deleted row names; our rows own no files."""
    ckpt, cache = loaded
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    with sqlite3.connect(cache / "index" / "cache.db") as db:
        db.execute("UPDATE Cache SET filename = ?", (os.path.relpath(victim, cache / "index"),))
    index = Index(str(cache))
    row = index.get(os.path.realpath(ckpt))
    index.put(os.path.realpath(ckpt), row)  # replacing the row
    index.delete(os.path.realpath(ckpt))  # and deleting it
    index.clear()
    index.close()
    assert victim.read_text() == "keep me"


def test_library_never_imports_pickle_or_torch_load():
    package = Path(sa3loader.__file__).parent
    for source in package.glob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, source


def test_a_cache_hit_reads_its_row_without_diskcache_and_writes_through_it(loaded, monkeypatch):
    """A load reads its row with SQLite alone (diskcache's open was a tenth of a DiT's hit); the
    row it writes (a use recorded) goes through diskcache as before."""
    import diskcache

    ckpt, cache = loaded
    index = Index(str(cache))
    row = index.get(os.path.realpath(ckpt))  # checked well after the source was written: not racy
    index.put(os.path.realpath(ckpt), dataclasses.replace(row, checked_ns=row.source.ctime_ns + 10**10))
    index.close()
    opened = []
    real_cache = diskcache.Cache
    monkeypatch.setattr(diskcache, "Cache", lambda *a, **k: opened.append(a) or real_cache(*a, **k))
    for step, opens in ((3600.0, 0), (0.0, 1)):  # a use recorded once an hour; or every time
        monkeypatch.setitem(_faults.tunings, "last_use_step_s", step)
        before = Index(str(cache))._plain_reader().get(os.path.realpath(ckpt))
        model = load_toy(ckpt, cache)
        assert sa3loader.last_load_info().cache_hit and digest(model) == reference_digest(ckpt)
        assert len(opened) == opens
        after = Index(str(cache))._plain_reader().get(os.path.realpath(ckpt))
        assert (after == before) == (opens == 0)  # the row written (its last use) only through diskcache


def _insert_row(db: Path, key: object, raw: int, expire: float | None, mode: int, value: object) -> None:
    with sqlite3.connect(db) as con:
        _insert_into(con, key, raw, expire, mode, value)


def _insert_into(
    con: sqlite3.Connection, key: object, raw: int, expire: float | None, mode: int, value: object
) -> None:
    cols = "key, raw, store_time, expire_time, access_time, access_count, tag, size, mode, filename, value"
    con.execute(
        f"INSERT INTO Cache ({cols}) VALUES (?, ?, 0, ?, 0, 0, NULL, 0, ?, NULL, ?)",
        (key, raw, expire, mode, value),
    )


@pytest.mark.parametrize(
    "raw, expire, mode, value",
    [
        (1, None, 1, b'{"a": 1}'),  # as SafeJSONDisk stores a row
        (1, 1.0, 1, b'{"a": 1}'),  # expired long ago: diskcache's get says absent
        (1, 4e9, 1, b'{"a": 1}'),  # expires in 2096
        (0, None, 1, b'{"a": 1}'),  # a key stored pickled
        (1, None, 4, b"cos\nsystem\n(S'true'\ntR."),  # a pickled value
        (1, None, 3, "text"),  # stored as TEXT
    ],
)
def test_the_plain_read_gives_what_diskcache_gives(loaded, raw, expire, mode, value):
    """The invariant that lets a load skip diskcache's open: for every way a row may be stored,
    SQLite's read gives diskcache's answer (``SafeJSONDisk``: JSON, or ``UnsafeRowError``)."""
    import diskcache

    from sa3loader._index import SafeJSONDisk, UnsafeRowError

    _, cache = loaded
    _insert_row(cache / "index" / "cache.db", "/planted", raw, expire, mode, value)
    answers = []
    for reader in (
        Index(str(cache))._plain_reader(),
        diskcache.Cache(str(cache / "index"), disk=SafeJSONDisk),
    ):
        try:
            answers.append(reader.get("/planted"))
        except UnsafeRowError as exc:
            answers.append(type(exc))
        reader.close()
    assert answers[0] == answers[1]


def test_the_plain_read_makes_no_database(tmp_path):
    """Opened for a read, SQLite never creates the file (a cleared cache dir stays empty); the
    load's read then takes diskcache's path, which makes it as it always did."""
    from sa3loader._index import ReadOnlyRows

    (tmp_path / "index").mkdir()
    with pytest.raises(sqlite3.OperationalError):
        ReadOnlyRows(str(tmp_path / "index"), writable=True)
    assert list((tmp_path / "index").iterdir()) == []
    assert Index(str(tmp_path))._plain_reader() is None


def test_a_cache_dir_whose_name_is_not_utf8_serves_hits(tmp_path):
    """The index is opened by a URI that names any path's very bytes (an outside attack: the
    plain read raised UnicodeEncodeError on every hit)."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    cache = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/cache-\xff"))
    for expect_hit in (False, True, True):
        model = load_toy(ckpt, cache)
        assert sa3loader.last_load_info().cache_hit == expect_hit
        assert digest(model) == reference_digest(ckpt)
        sa3loader.wait_for_publishing()
    assert Index(str(cache))._plain_reader() is not None


def test_a_cache_dir_written_with_a_leading_double_slash_is_read_as_that_very_dir(loaded):
    """POSIX keeps a leading "//"; in a URI it starts a host (``//localhost/x`` was read as /x)."""
    ckpt, cache = loaded
    row = Index(str(cache)).get(os.path.realpath(ckpt))
    index = Index("/" + str(cache))
    assert index._plain_reader() is not None and index.get(os.path.realpath(ckpt)) == row


@contextlib.contextmanager
def held_exclusively(db: Path) -> Iterator[None]:
    """Another connection holding the index, in SQLite's exclusive locking mode."""
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("PRAGMA locking_mode=EXCLUSIVE")
    holder.execute("BEGIN EXCLUSIVE")
    holder.execute("UPDATE Cache SET access_count = access_count + 1")
    try:
        yield
    finally:
        holder.rollback()
        holder.close()


def connects_seen(monkeypatch) -> list[dict]:
    """The keyword arguments of each ``sqlite3.connect`` from here on."""
    seen: list[dict] = []
    real_connect = sqlite3.connect
    monkeypatch.setattr(sqlite3, "connect", lambda *a, **k: seen.append(k) or real_connect(*a, **k))
    return seen


def test_an_index_another_connection_holds_is_waited_for_once(loaded, monkeypatch, caplog):
    """A hit read alone from an index another process holds exclusively gives up after one wait:
    no probe waits as long again (an outside attack: 4 s where 2 s was the rule)."""
    ckpt, cache = loaded
    monkeypatch.setitem(_faults.tunings, "index_timeout_s", 0.2)
    with held_exclusively(cache / "index" / "cache.db"):
        connects = connects_seen(monkeypatch)
        model = load_toy(ckpt, cache)
        assert digest(model) == reference_digest(ckpt)
        # Python < 3.11 tells no result code: a first read that does not wait, then the one probe.
        assert len(connects) == (1 if hasattr(sqlite3, "SQLITE_BUSY") else 2) and "cannot open" in caplog.text


def test_two_rows_for_one_key_are_absent_as_diskcache_has_them(loaded):
    """With diskcache's unique index dropped, its open fails on the table: the row is absent, and
    the plain read says so too (it read the first one)."""
    ckpt, cache = loaded
    db = cache / "index" / "cache.db"
    with sqlite3.connect(db) as con:
        (name,) = con.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '%UNIQUE%'"
        ).fetchone()
        con.execute(f"DROP INDEX {name}")
    _insert_row(db, os.path.realpath(ckpt), 1, None, 1, b'{"a": 1}')
    assert Index(str(cache)).get(os.path.realpath(ckpt)) is None
    model = load_toy(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)


def test_a_row_nested_too_deep_is_absent_not_an_error(loaded):
    """``json.loads`` raises RecursionError on a deep enough value: an invalid row, absent."""
    ckpt, cache = loaded
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        con.execute("UPDATE Cache SET value = ?", (b"[" * 200_000 + b"]" * 200_000,))
    assert Index(str(cache)).get(os.path.realpath(ckpt)) is None
    model = load_toy(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert Index(str(cache)).get(os.path.realpath(ckpt)) is not None  # the load's own: dropped, new


@pytest.mark.parametrize("value", [b"{not json", b"[" * 200_000 + b"]" * 200_000])
def test_a_row_that_is_not_json_is_invalid_to_the_commands_not_their_end(
    loaded, tmp_path, value, capsys, caplog
):
    """One undecodable row (another checkpoint's) made every cache command exit 1, and
    `cache repair` found nothing to repair (an outside attack): `ls` says invalid (and that it
    read it as no row: it once logged "dropping" and kept it), `prune` drops it."""
    from sa3loader import cli

    ckpt, cache = loaded
    _insert_row(cache / "index" / "cache.db", str(tmp_path / "other.safetensors"), 1, None, 1, value)
    for _ in range(2):  # the row is still there
        assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 3
        assert "invalid" in capsys.readouterr().out
    assert "read as no row" in caplog.text and "dropped" not in caplog.text
    assert cli.main(["--cache-dir", str(cache), "cache", "verify"]) == 3  # README: an invalid row
    assert cli.main(["--cache-dir", str(cache), "cache", "prune"]) == 0
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0


def test_cache_repair_sets_aside_an_index_with_two_rows_for_one_key(loaded, capsys):
    """diskcache cannot open such a table (its unique index): `repair` must not call it sound."""
    from sa3loader import cli

    ckpt, cache = loaded
    db = cache / "index" / "cache.db"
    with sqlite3.connect(db) as con:
        unique = "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '%UNIQUE%'"
        (name,) = con.execute(unique).fetchone()
        con.execute(f"DROP INDEX {name}")
    _insert_row(db, os.path.realpath(ckpt), 1, None, 1, b'{"a": 1}')
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 1
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 0
    assert "sound" not in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0


def test_the_read_only_open_makes_no_database(tmp_path):
    """The immutable fallback (a read-only layer) opens read-only too: nothing is created."""
    from sa3loader._index import ReadOnlyRows

    (tmp_path / "index").mkdir()
    with pytest.raises(sqlite3.OperationalError):
        ReadOnlyRows(str(tmp_path / "index")).get("/x")
    assert list((tmp_path / "index").iterdir()) == []


def test_a_cache_dir_with_a_dollar_keeps_its_index_inside_it(tmp_path, monkeypatch, caplog):
    """diskcache expands ``$NAME`` in its path: ``.../d$HOME`` put the index under ``.../d/<home>``,
    outside the cache dir and its trust check (an outside attack). It is not opened there."""
    monkeypatch.setenv("SA3_TEST_DIR", "elsewhere")
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    cache = tmp_path / "d$SA3_TEST_DIR"
    for _ in range(2):
        model = load_toy(ckpt, cache)
        assert digest(model) == reference_digest(ckpt)
        sa3loader.wait_for_publishing()
    assert not (tmp_path / "delsewhere").exists()
    assert "diskcache would open" in caplog.text


def test_a_python_that_cannot_tell_a_held_index_waits_for_it_once(loaded, monkeypatch, caplog):
    """Python 3.10's SQLite errors carry no code: the plain read does not wait, the probe does."""
    ckpt, cache = loaded
    monkeypatch.delattr(sqlite3, "SQLITE_BUSY", raising=False)  # as Python 3.10's module
    monkeypatch.setitem(_faults.tunings, "index_timeout_s", 0.2)
    with held_exclusively(cache / "index" / "cache.db"):
        connects = connects_seen(monkeypatch)
        model = load_toy(ckpt, cache)
        assert digest(model) == reference_digest(ckpt)
        assert [k.get("timeout") for k in connects] == [0.0, 0.2]  # the plain read, the probe
        assert "cannot open" in caplog.text


SETTINGS_DISKCACHE_CANNOT_USE = {
    "a Disk argument": ("disk_compress_level", 1),  # what diskcache's own JSONDisk stores
    "an eviction policy": ("eviction_policy", "bogus"),
    "a size limit of text": ("size_limit", "abc"),
    "a PRAGMA SQLite cannot run": ("sqlite_cache_size", "1 2"),
    "two statements": ("sqlite_cache_size", "1; SELECT 1"),
    "a read-only connection": ("sqlite_query_only", 1),
    # diskcache sets every key on itself: its directory elsewhere (repair blamed the temp dir)
    "an attribute of its own": ("_directory", "/nonexistent"),
    # a PRAGMA that fills the index at once: nothing recorded, and repair called it sound (an attack)
    "a size SQLite stops at": ("sqlite_max_page_count", 1),
}


@pytest.mark.parametrize("setting", list(SETTINGS_DISKCACHE_CANNOT_USE))
def test_settings_diskcache_cannot_use_break_no_load_and_repair_sets_them_aside(loaded, setting, capsys):
    """diskcache raised TypeError or KeyError from its open or its cull: loads failed untyped, and
    `cache repair` called the index sound while `cache ls` failed (an outside attack)."""
    from sa3loader import cli

    ckpt, cache = loaded
    key, value = SETTINGS_DISKCACHE_CANNOT_USE[setting]
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        con.execute("INSERT OR REPLACE INTO Settings (key, value) VALUES (?, ?)", (key, value))
    for ckpt_now in (ckpt, make_ckpt(ckpt.with_name("new.safetensors"), seed=5)):
        model = load_toy(ckpt_now, cache)
        assert digest(model) == reference_digest(ckpt_now)
        sa3loader.wait_for_publishing()
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 0
    assert "sound" not in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0


def test_repair_of_a_cache_dir_diskcache_would_open_elsewhere_moves_nothing(tmp_path, monkeypatch):
    """Refused before anything moves (it moved the index aside, then failed: exit 1 after the change)."""
    from sa3loader import cli

    monkeypatch.setenv("SA3_TEST_DIR", "elsewhere")
    cache = tmp_path / "d$SA3_TEST_DIR"
    (cache / "index").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    (cache / "index" / "cache.db").write_bytes(b"not a database" * 100)
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 1
    assert sorted(p.name for p in cache.iterdir()) == ["index"]


def _scratch_at(monkeypatch, folder: Path, *inside: str) -> None:
    """``tempfile.TemporaryDirectory()`` gives ``folder`` (made with folders ``inside``, removed after)."""
    import shutil
    import tempfile

    @contextlib.contextmanager
    def scratch(*args, **kwargs):
        for name in ("", *inside):
            (folder / name).mkdir(parents=True, exist_ok=True)
        try:
            yield str(folder)
        finally:
            shutil.rmtree(folder)

    monkeypatch.setattr(tempfile, "TemporaryDirectory", scratch)


def test_repair_never_sets_aside_a_sound_index_it_could_not_check(loaded, tmp_path, monkeypatch):
    """A temp dir where diskcache's copy cannot be written (full, here a WAL file it cannot make)
    is no fault of the index: a typed error, exit 1, the index kept (it was set aside)."""
    from sa3loader import cli

    ckpt, cache = loaded
    _scratch_at(monkeypatch, tmp_path / "scratch", "cache.db-wal")
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 1
    assert (cache / "index" / "cache.db").exists()
    assert not any(p.name.startswith("index.corrupt") for p in cache.iterdir())


def test_repair_checks_no_copy_diskcache_would_open_elsewhere(loaded, tmp_path, monkeypatch):
    """diskcache expands $NAME in the temp dir's path too: it opened an empty database elsewhere
    and called a broken index sound (an outside attack). A typed error; nothing made there."""
    from sa3loader import cli

    ckpt, cache = loaded
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        con.execute("INSERT OR REPLACE INTO Settings (key, value) VALUES ('eviction_policy', 'bogus')")
    monkeypatch.setenv("SA3_TEST_DIR", "elsewhere")
    _scratch_at(monkeypatch, tmp_path / "t$SA3_TEST_DIR")
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 1
    assert not (tmp_path / "telsewhere").exists()


def _md5s(folder: Path) -> dict[str, str]:
    import hashlib

    # (-shm: SQLite's shared-memory index of the WAL, which every reader rebuilds: no content)
    return {
        p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.suffix != ".db-shm"
    }


def test_a_checked_index_is_left_as_it_was_and_a_dry_run_changes_nothing(loaded, tmp_path):
    """A writer that stopped left rows in the WAL: SQLite's check, opened read-write, folded them
    into the database as it closed (an outside attack: `repair --dry-run` rewrote cache.db)."""
    from sa3loader import cli

    _, cache = loaded
    writer = sqlite3.connect(cache / "index" / "cache.db")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("UPDATE Cache SET access_count = access_count + 1")
    writer.commit()
    stopped = tmp_path / "stopped"
    shutil.copytree(cache, stopped)  # as the writer left it
    writer.close()
    before = _md5s(stopped / "index")
    assert "cache.db-wal" in before
    assert cli.main(["--cache-dir", str(stopped), "cache", "repair", "--dry-run"]) == 0
    assert _md5s(stopped / "index") == before


def test_an_index_a_first_load_has_just_made_is_sound(loaded):
    """SQLite makes the file before diskcache makes its tables: an empty one is not corrupt."""
    from sa3loader import cli

    _, cache = loaded
    for path in (cache / "index").iterdir():
        path.unlink()
    (cache / "index" / "cache.db").write_bytes(b"")
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 0
    assert sorted(p.name for p in (cache / "index").iterdir())[:1] == ["cache.db"]
    assert not any(p.name.startswith("index.corrupt") for p in cache.iterdir())


def test_repair_that_cannot_move_the_index_says_so_typed(loaded, monkeypatch):
    from sa3loader._index_repair import repair
    from sa3loader.errors import CacheIndexError

    _, cache = loaded
    (cache / "index" / "cache.db").write_bytes(b"not a database" * 100)
    monkeypatch.setattr(os, "rename", lambda *a: (_ for _ in ()).throw(PermissionError(1, "not permitted")))
    with pytest.raises(CacheIndexError, match="be set aside"):
        repair(str(cache))


def test_repair_that_moved_the_index_says_so_when_no_new_one_can_be_made(loaded, monkeypatch, caplog):
    """The index set aside is the repair: a new one the next load makes (a warning, exit 0)."""
    import diskcache

    from sa3loader import cli

    _, cache = loaded
    (cache / "index" / "cache.db").write_bytes(b"not a database" * 100)
    monkeypatch.setattr(
        diskcache, "Cache", lambda *a, **k: (_ for _ in ()).throw(sqlite3.OperationalError("full"))
    )
    assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 0
    assert any(p.name.startswith("index.corrupt") for p in cache.iterdir())
    assert "a new index is made by the next load" in caplog.text


def test_a_hot_journal_a_read_only_check_cannot_roll_back_is_not_called_corrupt(loaded, tmp_path):
    """An index in rollback-journal mode whose writer stopped mid-transaction: the read-only
    check cannot roll it back ("attempt to write a readonly database"), which said corrupt."""
    from sa3loader import cli

    _, cache = loaded
    stopped = tmp_path / "stopped"
    shutil.copytree(cache, stopped)
    db = stopped / "index" / "cache.db"
    writer = sqlite3.connect(db, isolation_level=None)
    writer.execute("PRAGMA journal_mode = delete")
    writer.execute("PRAGMA cache_size = 1")  # the transaction's pages spill into the file
    writer.execute("BEGIN")
    for n in range(2000):
        _insert_into(writer, f"/spill/{n}", 1, None, 1, b"x" * 1000)
    shutil.copy(db, tmp_path / "cache.db")
    shutil.copy(str(db) + "-journal", tmp_path / "cache.db-journal")
    writer.execute("ROLLBACK")
    writer.close()
    for name in ("cache.db", "cache.db-journal"):  # as the stopped writer left them
        shutil.copy(tmp_path / name, stopped / "index" / name)
    assert cli.main(["--cache-dir", str(stopped), "cache", "repair", "--dry-run"]) == 1
    assert not any(p.name.startswith("index.corrupt") for p in stopped.iterdir())


def test_a_row_with_more_in_its_range_is_read_as_a_row(loaded, tmp_path, monkeypatch, capsys):
    """Extra keys are allowed (a newer writer's), in ``range`` too: it raised an untyped TypeError
    from every load of the checkpoint, a capped load of any other, and every cache command (an
    outside attack), while `cache repair` called the index sound."""
    import json

    from sa3loader import cli

    ckpt, cache = loaded
    db = cache / "index" / "cache.db"
    with sqlite3.connect(db) as con:
        row = json.loads(con.execute("SELECT value FROM Cache").fetchone()[0])
        row["range"]["newer_field"] = 0
        con.execute("UPDATE Cache SET value = ?", (json.dumps(row).encode(),))
    got = Index(str(cache)).get(os.path.realpath(ckpt))
    assert (
        got is not None
        and got.range is not None
        and got.range.overflow_to_inf == row["range"]["overflow_to_inf"]
    )
    assert digest(load_toy(ckpt, cache)) == reference_digest(ckpt)
    monkeypatch.setenv("SA3LOADER_CACHE_MAX", "1GB")
    other = make_ckpt(tmp_path / "other.safetensors")
    assert digest(load_toy(other, cache)) == reference_digest(other)
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0
    assert "invalid" not in capsys.readouterr().out


@pytest.mark.parametrize("hexed", ["zz", "2F 74 FF", b"/tmp/x\x00y".hex(), "the checkpoint's path"])
def test_a_key_sa3loader_never_makes_is_an_invalid_row_not_an_error(
    loaded, tmp_path, monkeypatch, capsys, hexed
):
    """A key with the bytes prefix and no hex after it: every command that lists rows raised an
    untyped ValueError, and so did a capped load of any checkpoint; hex that ``encode_key`` would
    not write was listed (and deleted) as another key, so prune said it pruned rows it left (two
    outside attacks). Such a row is invalid, and `prune` removes it."""
    from sa3loader import cli

    ckpt, cache = loaded
    if hexed == "the checkpoint's path":
        hexed = os.fsencode(os.path.realpath(ckpt)).hex()
    _insert_row(cache / "index" / "cache.db", "\x00bytes:" + hexed, 1, None, 1, b'{"a": 1}')
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 3
    assert "invalid" in capsys.readouterr().out
    monkeypatch.setenv("SA3LOADER_CACHE_MAX", "1GB")
    other = make_ckpt(tmp_path / "other.safetensors")
    assert digest(load_toy(other, cache)) == reference_digest(other)
    assert cli.main(["--cache-dir", str(cache), "cache", "prune"]) == 0
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        assert not con.execute("SELECT count(*) FROM Cache WHERE key LIKE ?", ("\x00bytes:%",)).fetchone()[0]


@pytest.mark.parametrize(
    ("part", "field", "value"),
    [
        ("sibling", "path", "\ud800"),
        ("source", "path", "\ud800"),
        ("source", "size", 10**400),
        ("sibling", "size", -(10**30)),
        ("sibling", "size", -1),
        ("source", "size", -1),
        ("range", "overflow_to_inf", -5),
        ("range", "flushed_to_zero", -1),
    ],
)
def test_a_row_holding_what_the_os_cannot_take_is_invalid_not_an_error(loaded, part, field, value):
    """A lone surrogate (``os.open``, ``print`` raise UnicodeEncodeError) or an integer no C integer
    holds (``OverflowError`` printing a size): a load, ls, prune and the dry runs raised untyped
    errors (an outside attack). A negative size or count, which no file or count has, was printed
    as it was. Such a row is invalid: the load replaces it."""
    import json

    from sa3loader import cli

    ckpt, cache = loaded
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        row = json.loads(con.execute("SELECT value FROM Cache").fetchone()[0])
        row[part][field] = value
        con.execute("UPDATE Cache SET value = ?", (json.dumps(row).encode(),))
    for command, rc in ((["ls"], 3), (["ls", "--json"], 3), (["verify"], 3), (["prune", "--dry-run"], 0)):
        assert cli.main(["--cache-dir", str(cache), "cache", *command]) == rc, command
    assert cli.main(["--cache-dir", str(cache), "cache", "clear", "--dry-run"]) == 0
    assert digest(load_toy(ckpt, cache)) == reference_digest(ckpt)
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0


def test_a_row_holds_every_inode_and_device_the_os_gives(loaded):
    """``st_ino`` and ``st_dev`` are unsigned 64-bit (overlayfs' xino sets the top bit), and
    ``st_mtime_ns`` passes 2**63 in 2262 (an outside attack: such a file's row was invalid, every
    load adopted it again and the cap evicted it first): valid; one bit more is not."""
    import json

    from sa3loader._records import valid_row

    ckpt, cache = loaded
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        row = json.loads(con.execute("SELECT value FROM Cache").fetchone()[0])
    for field in ("inode", "device", "mtime_ns", "ctime_ns"):  # times past 2262 too (ext4: 2446)
        for value, valid in (((1 << 64) - 1, True), (1 << 64, False), (-(1 << 63), True)):
            assert valid_row({**row, "source": {**row["source"], field: value}}) is valid, (field, value)

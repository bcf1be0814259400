"""Cache commands at any moment: ``cache clear`` or an unlink during a load never breaks it;
``prune`` keeps what a repointed symlink reuses; ``prune`` and ``clear`` sweep what killed
conversions left but never touch a running one; the cache dir carries a CACHEDIR.TAG."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model
from support.loads import load_toy, make_ckpt
from support.toymodel import build, reference

import sa3loader
from sa3loader._format import read_header
from sa3loader._identity import is_sa3loader_file


@pytest.mark.parametrize("io", ["mmap", "read"])
@pytest.mark.parametrize("command", ["clear", "unlink"])
def test_cache_commands_during_a_load_never_break_it(ckpt, tmp_path, command, io):
    """The load holds the sibling open from validation on: deleting its name mid-build is harmless."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"

    def factory_that_races(config):
        if command == "clear":
            _cache_admin.clear(str(cache))
        else:
            sibling.unlink()
        assert not sibling.exists()
        return build()

    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=cache, model_factory=factory_that_races, io=io
    )
    info = sa3loader.last_load_info()
    assert info.cache_hit and info.build == "fast" and info.io == io
    assert_same_model(model, reference(ckpt))


def test_prune_keeps_a_sibling_that_a_repointed_symlink_reuses(tmp_path):
    from sa3loader import _cache_admin

    torch.manual_seed(0)
    a = save(random_like_state(build(), seed=3), tmp_path / "a.safetensors")
    b = save(random_like_state(build(), seed=4), tmp_path / "b.safetensors")
    link = tmp_path / "model.safetensors"
    link.symlink_to(a.name)
    cache = tmp_path / "cache"
    load_toy(link, cache)
    link.unlink()
    link.symlink_to(b.name)  # the same sibling name now belongs to b
    load_toy(link, cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    pruned = _cache_admin.prune(str(cache)).rows
    assert [e.status for e in pruned] == ["stale"] and sibling.exists()
    model = load_toy(link, cache)
    assert sa3loader.last_load_info().cache_hit
    assert_same_model(model, reference(b))


@pytest.mark.parametrize("spelling", ["/./", "//"])
def test_prune_keeps_a_sibling_a_valid_row_names_when_a_stale_row_spells_it_otherwise(tmp_path, spelling):
    """A stale row naming the same sibling as ``dir/./name`` (an outside attack): prune compared
    the strings and deleted the file a valid row still names."""
    import json
    import sqlite3

    from sa3loader import _cache_admin

    torch.manual_seed(0)
    a = save(random_like_state(build(), seed=3), tmp_path / "a.safetensors")
    cache = tmp_path / "cache"
    load_toy(a, cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "a.fp16.safetensors"
    with sqlite3.connect(cache / "index" / "cache.db") as con:
        columns = [c[1] for c in con.execute("PRAGMA table_info(Cache)")]
        values = dict(zip(columns, con.execute("SELECT * FROM Cache").fetchone(), strict=True))
        row = json.loads(values["value"])
        gone = str(tmp_path / "gone.safetensors")
        row["source"]["path"] = row["source"]["real_path"] = gone
        row["sibling"]["path"] = str(tmp_path) + spelling + ".cache/sa3loader/a.fp16.safetensors"
        values.pop("rowid", None)
        values.update(key=gone, value=json.dumps(row).encode())
        con.execute(
            f"INSERT INTO Cache ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
            list(values.values()),
        )
    pruned = _cache_admin.prune(str(cache)).rows
    assert [e.status for e in pruned] == ["missing source"] and sibling.exists()
    load_toy(a, cache)
    assert sa3loader.last_load_info().cache_hit


@pytest.mark.parametrize("command", ["prune", "clear"])
def test_prune_and_clear_sweep_leftovers_but_not_a_running_conversion(tmp_path, command):
    """A SIGTERM mid-conversion leaves a temp file; locks and emptied dirs stay behind too."""
    import fcntl

    from sa3loader import _cache_admin

    torch.manual_seed(0)
    beside = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    hub = tmp_path / "hub" / "models--o--n" / "snapshots" / "r" / "model.safetensors"
    hub.parent.mkdir(parents=True)
    save(random_like_state(build(), seed=4), hub)
    cache = tmp_path / "cache"
    load_toy(beside, cache)
    load_toy(hub, cache)
    killed = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.incomplete-999-deadbeef"
    killed.write_bytes(b"half a sibling")
    stray_dir = cache / "siblings" / "0123456789abcdef"
    stray_dir.mkdir()
    (stray_dir / "old.fp16.safetensors.incomplete-1-2a2a2a2a").write_bytes(b"x")
    running_dir = cache / "siblings" / "fedcba9876543210"
    running_dir.mkdir()
    running = running_dir / "busy.fp16.safetensors.incomplete-5-6b6b6b6b"
    running.write_bytes(b"being written")
    holder = os.open(running_dir / "busy.fp16.safetensors.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a conversion in progress
    try:
        if command == "prune":
            removals = _cache_admin.prune(str(cache)).removed
        else:
            removals = _cache_admin.clear(str(cache)).removed
        removed = [r.path for r in removals]
    finally:
        os.close(holder)
    assert not killed.exists() and not stray_dir.exists()
    lock = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.lock"
    assert str(killed) in removed
    assert (str(lock) in removed) == (command == "clear")  # a sibling that stays keeps its lock
    assert running.exists()  # its lock is held: never touched
    assert not list(tmp_path.glob("*.lock"))
    assert (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists() == (command == "prune")
    load_toy(beside, cache)  # and loading still works
    assert sa3loader.last_load_info().build == "fast"


def test_the_cache_dir_carries_a_cachedir_tag(ckpt, tmp_path):
    load_toy(ckpt, tmp_path / "cache")
    tag = (tmp_path / "cache" / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55\n")


@pytest.mark.parametrize("command", ["load", "prune", "clear", "rm"])
def test_a_users_file_named_like_a_temp_file_is_never_removed(ckpt, tmp_path, command):
    """Only a name of exactly the shape sa3loader gives a temp file is taken for one: a user's
    ``<sibling>.incomplete-epoch3.safetensors`` (or one beside the checkpoint) is theirs."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    hidden = tmp_path / ".cache" / "sa3loader"
    hidden.mkdir(parents=True)
    users = [
        hidden / "model.fp16.safetensors.incomplete-epoch3.safetensors",
        hidden / "model.fp16.safetensors.incomplete-1-2",
        hidden / "model.fp16.safetensors.incomplete-\u0661\u0662-deadbeef",  # digits, not ASCII ones
        hidden / "model.fp16.safetensors.incomplete-verify-\uff11",
        tmp_path / "model.safetensors.incomplete-keep",
    ]
    for path in users:
        path.write_bytes(b"mine")
    load_toy(ckpt, cache)  # converts, sweeping what earlier writers of the sibling left
    if command == "prune":
        _cache_admin.prune(str(cache))
    elif command == "clear":
        _cache_admin.clear(str(cache))
    elif command == "rm":
        _cache_admin.execute(str(cache), _cache_admin.plan_rm(str(cache), [str(ckpt)]), pruning=False)
    assert all(path.read_bytes() == b"mine" for path in users)


def plant_row(cache, source, sibling):
    """A row in the index naming ``sibling`` for ``source``, as a team-mate could add to a shared
    cache (or an older version wrote): whatever it names, only sa3loader's places are touched."""
    from sa3loader._index import Index
    from sa3loader._records import IndexRow, SourceIdentity

    identity = SourceIdentity(1, 1, "h", 1, 1, 1)
    row = IndexRow(
        identity, str(source), str(source), "f", None, str(sibling), 1, "h", time.time() - 9e4, None
    )
    with Index(str(cache)) as index:
        index.put(str(source), row)


@pytest.mark.parametrize("command", ["prune", "clear", "cap", "prune --max-size"])
def test_what_a_row_names_outside_sa3loaders_places_is_never_deleted(tmp_path, command, monkeypatch):
    """A checkpoint converted in place carries sa3loader's marker, as does your own ``convert
    --out`` file; a row naming them, or naming ``project/poetry`` (whose lock would be
    ``poetry.lock``), deletes nothing: only ``.cache/sa3loader`` and the cache dir's siblings."""
    from sa3loader import _cache_admin, _config, _convert_dir

    cache = tmp_path / "cache"
    converted = make_ckpt(tmp_path / "ck" / "model.safetensors")
    _convert_dir.convert_file(str(converted), in_place=True)
    mine = make_ckpt(tmp_path / "m" / "a.safetensors")
    _convert_dir.convert_file(str(mine), out=str(tmp_path / "m" / "a.fp16.safetensors"))
    (tmp_path / "project").mkdir()
    (tmp_path / "project" / "poetry.lock").write_text("[[package]]\n")
    plant_row(cache, tmp_path / "gone-1.safetensors", converted)
    plant_row(cache, tmp_path / "gone-2.safetensors", tmp_path / "m" / "a.fp16.safetensors")
    plant_row(cache, tmp_path / "gone-3.safetensors", tmp_path / "project" / "poetry")
    if command == "prune":
        outcome = _cache_admin.prune(str(cache))
        assert (str(converted), _cache_admin.NOT_A_SIBLING_PLACE) in [
            (r.path, why) for r, why in outcome.kept
        ]
    elif command == "clear":
        _cache_admin.clear(str(cache))
    elif command == "cap":
        monkeypatch.setenv(_config.CACHE_MAX_ENV, "60kB")  # room for b only once the others go
        load_toy(make_ckpt(tmp_path / "n" / "b.safetensors"), cache)
    else:
        _cache_admin.execute(str(cache), _cache_admin.plan_prune(str(cache), 1), pruning=True)
    assert is_sa3loader_file(read_header(converted)) and (tmp_path / "m" / "a.fp16.safetensors").exists()
    assert (tmp_path / "project" / "poetry.lock").read_text() == "[[package]]\n"


@pytest.mark.parametrize("command", ["prune", "clear"])
def test_an_empty_dir_at_a_lock_name_is_never_removed(tmp_path, monkeypatch, command):
    """A directory where a sibling's lock goes: the lock cannot be taken, so the sibling and
    what the lock guards stay, and so does the directory (it is not sa3loader's to remove)."""
    from sa3loader import _cache_admin

    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    ckpt, cache = make_ckpt(tmp_path / "model.safetensors"), tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = Path(sa3loader.last_load_info().sibling)
    lock = Path(f"{sibling}.lock")
    lock.unlink()
    lock.mkdir()
    make_ckpt(ckpt, seed=4)  # the row is stale
    planned = getattr(_cache_admin, f"plan_{command}")(str(cache))
    done = getattr(_cache_admin, command)(str(cache))
    assert [r.path for r in planned.removals] == [r.path for r in done.removed]
    assert str(lock) + os.sep not in [r.path for r in done.removed]
    assert lock.is_dir() and sibling.exists()


def test_a_sibling_replaced_after_the_plan_is_kept_with_its_row(tmp_path):
    """The plan is carried out as made: a sibling converted again meanwhile (another process, a
    retrained checkpoint) is another file, and its new row another row: both stay."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    a = make_ckpt(tmp_path / "a.safetensors")
    load_toy(a, cache)
    plan = _cache_admin.plan_prune(str(cache), max_bytes=0)  # a is over a cap of nothing
    assert [e.source for e in plan.rows] == [str(a)]
    make_ckpt(a, seed=9)  # retrained
    load_toy(a, cache)  # converted again: a new sibling and row
    outcome = _cache_admin.execute(str(cache), plan, pruning=True)
    sibling = tmp_path / ".cache" / "sa3loader" / "a.fp16.safetensors"
    assert {(r.path, why) for r, why in outcome.kept} == {
        (str(sibling), "another file was put there since the plan was made"),
        (f"{sibling}.lock", "its sibling stays"),  # the lock the new sibling's conversions take
    }
    assert sibling.exists() and Path(f"{sibling}.lock").exists()
    assert [e.source for e in _cache_admin.entries(str(cache))] == [str(a)]
    assert_same_model(load_toy(a, cache), reference(a))
    assert sa3loader.last_load_info().cache_hit


def test_a_row_naming_an_impossible_path_is_invalid_and_harms_no_load(tmp_path, monkeypatch):
    from sa3loader import _config

    cache = tmp_path / "cache"
    a = make_ckpt(tmp_path / "a.safetensors")
    load_toy(a, cache)
    plant_row(cache, tmp_path / "gone.safetensors", tmp_path / "x\x00y.fp16.safetensors")
    monkeypatch.setenv(_config.CACHE_MAX_ENV, "20GB")
    load_toy(make_ckpt(tmp_path / "b.safetensors"), cache)
    assert sa3loader.last_load_info().converted
    from sa3loader import _cache_admin

    assert "invalid" in [e.status for e in _cache_admin.entries(str(cache))]
    _cache_admin.prune(str(cache))
    assert "invalid" not in [e.status for e in _cache_admin.entries(str(cache))]


@pytest.mark.parametrize("command", ["clear", "prune --max-size"])
def test_a_cache_command_that_empties_a_hidden_folder_removes_it(ckpt, tmp_path, command):
    """Nothing of sa3loader's is left in a checkpoint's folder once its siblings are gone: no empty
    ``.cache/sa3loader``, no empty ``.cache`` (one holding your own files stays)."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    if command == "clear":
        _cache_admin.clear(str(cache))
    else:
        _cache_admin.execute(str(cache), _cache_admin.plan_prune(str(cache), max_bytes=0), pruning=True)
    assert not (tmp_path / ".cache").exists()
    (tmp_path / ".cache" / "huggingface").mkdir(parents=True)  # yours: hf download --local-dir
    load_toy(ckpt, cache)
    _cache_admin.clear(str(cache))
    assert [p.name for p in (tmp_path / ".cache").iterdir()] == ["huggingface"]


@pytest.mark.parametrize("closed", ["file", "folder"])
def test_prune_keeps_the_sibling_of_a_checkpoint_it_cannot_read_now(tmp_path, monkeypatch, capsys, closed):
    """A checkpoint made unreadable for a while (chmod 000, as its owner's other users see it;
    root reads anyway, so the OS's refusal is played here) is neither gone nor changed: ``cache
    ls`` says so, ``cache prune`` keeps its sibling, and the next load is a hit."""
    from sa3loader import cli

    ckpt = make_ckpt(tmp_path / "m" / "model.safetensors")
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = ckpt.parent / ".cache" / "sa3loader" / "model.fp16.safetensors"
    real_open, refused = os.open, os.path.realpath(ckpt)

    def refusing(path, flags, *args, **kwargs):
        if os.path.realpath(path) == refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    real_stat = os.stat

    def refusing_stat(path, *args, **kwargs):  # a folder above it closed: not even its stat
        if os.fspath(path) == refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refusing)
    if closed == "folder":
        monkeypatch.setattr(os, "stat", refusing_stat)
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0
    assert "unreadable source" in capsys.readouterr().out
    assert cli.main(["--cache-dir", str(cache), "cache", "prune"]) == 0
    assert "pruned 0 row(s)" in capsys.readouterr().out and sibling.exists()  # its row stays too
    assert cli.main(["--cache-dir", str(cache), "cache", "verify"]) == 0  # no sibling's fault
    monkeypatch.undo()
    load_toy(ckpt, cache)
    assert sa3loader.last_load_info().cache_hit


def test_a_folder_holding_other_files_given_as_the_cache_dir_gets_no_cachedir_tag(ckpt, tmp_path):
    """Backup tools skip a tagged folder whole: a project folder with files of its own is used
    as the cache dir, but not tagged."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine\n")
    load_toy(ckpt, project)
    assert (project / "index").is_dir() and not (project / "CACHEDIR.TAG").exists()


def test_an_empty_cache_dir_is_refused_not_taken_for_the_current_dir(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(tmp_path.iterdir())
    with pytest.raises(sa3loader.ConfigError, match="cache_dir is empty"):
        load_toy(ckpt, "")
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("command", [["prune"], ["clear", "--yes"], ["rm", "CKPT"]])
def test_the_cache_dir_by_another_spelling_is_still_the_cache_dir(tmp_path, monkeypatch, command):
    """Loads named the cache dir through a symlinked folder, a command names it as it really is
    (or the other way round): its siblings are the cache dir's, removed with their rows, not kept
    as 'not in the cache dir' (an outside attack: prune stranded the sibling, saying so)."""
    from support.cli import run

    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    ckpt = make_ckpt(tmp_path / "ckpt" / "model.safetensors")
    load_toy(ckpt, tmp_path / "link" / "c")
    sibling = Path(sa3loader.last_load_info().sibling)
    assert sibling.is_relative_to(tmp_path / "link") and sibling.exists()
    if command[0] != "rm":
        ckpt.unlink()  # prune's reason; clear and rm need none
    args = [str(ckpt) if a == "CKPT" else a for a in command]
    out = run("cache", *args, cache=tmp_path / "real" / "c").stdout
    assert "not in a .cache/sa3loader or the cache dir" not in out
    assert not sibling.exists() and not list((tmp_path / "real" / "c").rglob("*.safetensors"))


@pytest.mark.parametrize("met_at", ["the room check", "the lock"])
def test_a_load_makes_again_the_folder_a_cache_command_removed_before_it_converted(ckpt, tmp_path, met_at):
    """``cache clear`` removes the hidden folder it empties; a load that had just made it to convert
    into (its old sibling stale) met the folder gone at its next step: it raised FileNotFoundError
    (the room check's statvfs) or read fp32 (the lock file's open). It makes the folder again."""
    from support.faults import faked

    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    make_ckpt(ckpt, seed=4)  # rewritten: the sibling beside it is stale, the load converts
    hidden = tmp_path / ".cache" / "sa3loader"
    asked = []

    def free_bytes(path, real):
        asked.append(path)
        if path == str(hidden) and len(asked) == (1 if met_at == "the room check" else 2):
            _cache_admin.clear(str(cache))  # what a `sa3loader cache clear` beside the load does
            assert not hidden.exists()
        return real

    with faked(free_bytes=free_bytes):
        model = load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling == str(hidden / "model.fp16.safetensors"), info.reason
    assert_same_model(model, reference(ckpt))
    assert [e.status for e in _cache_admin.entries(str(cache))] == ["ok"]


def test_a_load_writes_no_row_for_a_sibling_removed_while_it_checked_it(ckpt, tmp_path):
    """A load checking its sibling (the row no longer vouches: it reads the fingerprint's spots)
    writes the row again after; `cache clear` removed the row and the sibling meanwhile. The load
    goes on from the file it opened, and leaves no row naming a missing sibling (`cache verify`
    would exit 3)."""
    import dataclasses

    from support.faults import injected

    from sa3loader import _cache_admin
    from sa3loader._index import Index

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    with Index(str(cache)) as index:
        ((key, row),) = index.items()
        index.put(key, dataclasses.replace(row, checked_ns=None))  # racy: the next load reads the spots
    sibling = Path(row.sibling_path)

    cleared: list = []

    def removed_while_checked(name, subject=None):
        if name == "spots" and not cleared:
            cleared.append(None)  # once (the command reads spots too)
            cleared[0] = _cache_admin.clear(str(cache))  # `sa3loader cache clear` beside the load

    with injected(removed_while_checked):
        model = load_toy(ckpt, cache)
    assert sa3loader.last_load_info().cache_hit and not sibling.exists() and cleared[0].rows
    assert_same_model(model, reference(ckpt))
    assert _cache_admin.entries(str(cache)) == []


def test_a_row_a_load_writes_back_while_a_command_removes_its_sibling_goes_too(ckpt, tmp_path):
    """`cache clear` drops the rows, then removes each sibling under its lock. A load that read a
    row before may write it back in between (its last use; the sibling still there): once the
    siblings are gone, the command drops again every planned row whose sibling is missing."""
    from support.faults import injected

    from sa3loader import _cache_admin
    from sa3loader._index import Index

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    with Index(str(cache)) as index:
        ((key, row),) = index.items()

    def written_back(name, subject=None):
        if name == "locked":  # the command holds the sibling's lock; its rows are dropped
            with Index(str(cache)) as index:
                index.put(key, row, while_there=True)  # as a load's last use: the sibling is there

    with injected(written_back):
        outcome = _cache_admin.clear(str(cache))
    assert [r.kind for r in outcome.removed].count("sibling") == 1
    assert _cache_admin.entries(str(cache)) == []


@pytest.mark.parametrize("planted", ["a link elsewhere", "the checkpoint's folder removed"])
def test_a_folder_made_again_passes_every_check_of_a_first_one(tmp_path, planted):
    """The folder a load made, removed by a cache command, is made again only where a first one
    could go: a link put at `.cache` meanwhile (another user of a group-writable folder) sent the
    sibling into the link's folder; a checkpoint folder the user removed was made again, with a
    sibling of a checkpoint that was gone (an outside attack). Now: the next place (the cache dir)."""
    from support.faults import faked

    from sa3loader import _cache_admin

    folder, cache, elsewhere = tmp_path / "run1", tmp_path / "cache", tmp_path / "elsewhere"
    ckpt = make_ckpt(folder / "model.safetensors")
    load_toy(ckpt, cache)
    make_ckpt(ckpt, seed=4)  # stale: the load converts
    kept = make_ckpt(tmp_path / "kept" / "model.safetensors", seed=4)  # what the load opened, for after
    hidden, once = folder / ".cache" / "sa3loader", []
    elsewhere.mkdir()

    def free_bytes(path, real):
        if path == str(hidden) and not once:
            once.append(path)
            _cache_admin.clear(str(cache))  # removes the emptied .cache/sa3loader and .cache
            if planted == "a link elsewhere":
                (folder / ".cache").symlink_to(elsewhere)
            else:
                shutil.rmtree(folder)
        return real

    with faked(free_bytes=free_bytes):
        model = load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert list(elsewhere.iterdir()) == []  # nothing through the link
    assert info.converted and info.sibling.startswith(str(cache) + os.sep), info.reason
    assert_same_model(model, reference(kept))
    assert planted == "a link elsewhere" or not folder.exists()  # never made again


def test_a_row_a_load_writes_for_a_sibling_no_row_named_when_planned_goes_too(ckpt, tmp_path, monkeypatch):
    """`cache clear` planned a sibling no row named (the index lost: `cache repair`); a load adopted
    it, writing a row the plan did not know, before the run removed it (an outside attack)."""
    from sa3loader import _cache_admin, _config

    monkeypatch.setenv(_config.PLACE_ENV, "cache")
    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    shutil.rmtree(cache / "index")
    plan = _cache_admin.plan_clear(str(cache))
    assert [r.kind for r in plan.removals].count("sibling") == 1 and not plan.rows
    load_toy(ckpt, cache)
    assert "adopted" in sa3loader.last_load_info().events
    outcome = _cache_admin.execute(str(cache), plan, pruning=False)
    assert [r.kind for r in outcome.removed].count("sibling") == 1
    assert _cache_admin.entries(str(cache)) == []

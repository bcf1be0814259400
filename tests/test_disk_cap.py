"""A cap on the siblings' disk, least recently used first: ``SA3LOADER_CACHE_MAX`` bounds what
the siblings an index names take on disk, a load records a sibling's last use (at most once an
hour), a filesystem short of space loses its least recently used siblings before a load falls
back, ``cache ls`` shows and sorts by last use and ``cache prune --max-size`` applies a cap once."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
from support.checkpoints import settled
from support.cli import run
from support.compare import assert_same_model
from support.faults import at, faked, injected, tuned
from support.loads import load_toy, make_ckpt
from support.processes import dead_pid
from support.toymodel import reference

import sa3loader
from sa3loader import _config
from sa3loader._index import Index
from sa3loader._records import IndexRow

SIBLING = os.path.join(".cache", "sa3loader")


def three_checkpoints(tmp_path):
    """Saved a while ago: a hit is a plain hit, never a revalidation (which rewrites the row)."""
    made = [make_ckpt(tmp_path / f"{name}.safetensors", seed=seed) for seed, name in enumerate("abc", 3)]
    for path in made:
        os.utime(path, (time.time() - 100, time.time() - 100))
    settled(*made)
    return made


def sibling_of(ckpt):
    return ckpt.parent / SIBLING / ckpt.name.replace(".safetensors", ".fp16.safetensors")


def test_a_cap_removes_the_least_recently_used_sibling_not_the_oldest(tmp_path, monkeypatch, caplog):
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    with tuned(last_use_step_s=0.0):  # every use recorded: the order is the test's, not the clock's
        load_toy(a, cache)  # made first
        load_toy(b, cache)
        load_toy(a, cache)  # used again: b is now the least recently used
    size = sibling_of(a).stat().st_size
    monkeypatch.setenv(_config.CACHE_MAX_ENV, str(2 * size + size // 2))  # room for two
    caplog.set_level("INFO", logger="sa3loader")
    model = load_toy(c, cache)
    assert sa3loader.last_load_info().converted
    assert_same_model(model, reference(c))
    assert sibling_of(a).exists() and sibling_of(c).exists() and not sibling_of(b).exists()
    assert f"removed the least recently used sibling {sibling_of(b)}" in caplog.text
    rows = json.loads(run("--json", "cache", "ls", cache=cache).stdout)
    assert [r["source"] for r in rows] == [str(a), str(c)]  # least recently used first
    assert rows[0]["last_used"] <= rows[1]["last_used"]
    assert ", last used " in run("cache", "ls", cache=cache).stdout
    load_toy(b, cache)  # needs its sibling again: converted, and now a goes
    assert sa3loader.last_load_info().converted and not sibling_of(a).exists()


def test_a_sibling_larger_than_the_cap_is_not_written_and_the_load_says_why(tmp_path, monkeypatch):
    a, b, _ = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    monkeypatch.setenv(_config.CACHE_MAX_ENV, "1kB")
    model = load_toy(b, cache)
    info = sa3loader.last_load_info()
    assert info.sibling is None and f"larger than ${_config.CACHE_MAX_ENV} (1 kB)" in info.reason
    assert sibling_of(a).exists() and not sibling_of(b).exists()  # nothing was removed for nothing
    assert_same_model(model, reference(b))


def test_a_hit_records_its_use_at_most_once_an_hour(tmp_path):
    a, _, _ = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    with Index(str(cache)) as index:
        made = index.get(os.path.realpath(a))
        assert made is not None and made.used() >= made.created
    load_toy(a, cache)
    with Index(str(cache)) as index:
        assert index.get(os.path.realpath(a)) == made  # within the hour: no write at all
        hour_ago = time.time() - 3700
        index.put(os.path.realpath(a), IndexRow(**{**made.__dict__, "last_used": hour_ago}))
    load_toy(a, cache)
    assert sa3loader.last_load_info().cache_hit
    with Index(str(cache)) as index:
        assert index.get(os.path.realpath(a)).used() > hour_ago + 3600


def test_a_row_an_older_version_wrote_was_last_used_when_it_was_made():
    row = {
        "schema": 1,
        "source": {"size": 1, "mtime_ns": 1, "header_sha256": "h", "inode": 1, "device": 1, "ctime_ns": 1},
    }
    row["source"].update({"path": "/m", "real_path": "/m"})
    row.update(
        fingerprint="f",
        sibling={"path": "/s", "size": 1, "header_sha256": "h"},
        converter_version="1",
        created=12.5,
        range=None,
    )
    from sa3loader._records import SCHEMA_VERSION

    row["schema"] = SCHEMA_VERSION
    parsed = IndexRow.from_json(row)
    assert parsed is not None and parsed.last_used is None and parsed.used() == 12.5
    for planted in (float("nan"), float("inf"), 1e300, -5, True, "yesterday"):
        assert IndexRow.from_json({**row, "last_used": planted}).used() == 12.5
        assert IndexRow.from_json({**row, "created": planted}) is None  # `cache ls` cannot print it


def used_hours_ago(cache, ckpt, hours):
    with Index(str(cache)) as index:
        row = index.get(os.path.realpath(ckpt))
        index.put(
            os.path.realpath(ckpt), IndexRow(**{**row.__dict__, "last_used": time.time() - hours * 3600})
        )


@pytest.mark.parametrize("idle", [True, False])
def test_a_full_disk_loses_its_least_recently_used_sibling_before_the_load_falls_back(tmp_path, idle):
    """The checkpoint folder's filesystem holds room for one more sibling only once the least
    recently used one there is gone: the new sibling still goes beside its checkpoint. A sibling
    used within the hour is never taken (two loads would take turns evicting each other)."""
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    load_toy(b, cache)
    if idle:
        used_hours_ago(cache, a, 3)
        used_hours_ago(cache, b, 2)
    size, source = sibling_of(a).stat().st_size, a.stat().st_size

    def disk_free(path, real):  # a disk that has room for one sibling besides the room rule's
        if str(path).startswith(str(tmp_path / SIBLING)) or str(path) == str(tmp_path / ".cache"):
            used = sum(p.stat().st_size for p in (tmp_path / SIBLING).glob("*.fp16.safetensors"))
            return (64 << 20) + source + 3 * size - used - 1
        return 0  # nowhere else: no fallback to the cache dir

    with faked(free_bytes=disk_free):
        model = load_toy(c, cache)
    assert sa3loader.last_load_info().converted == idle and sibling_of(c).exists() == idle
    assert sibling_of(a).exists() != idle and sibling_of(b).exists()
    assert_same_model(model, reference(c))


@pytest.mark.parametrize(
    "text, size",
    [("20GB", 20 * 10**9), ("500MiB", 500 << 20), ("1.5 TB", 15 * 10**11), ("1000", 1000), ("2kib", 2048)],
)
def test_sizes_are_read_as_written(text, size):
    assert _config.parse_size(text) == size


@pytest.mark.parametrize("text", ["20G", "-1GB", "lots", "1e9", "", "1" * 400, "9" * 30 + "TB"])
def test_a_size_that_does_not_say_its_unit_is_refused(text, monkeypatch, tmp_path):
    with pytest.raises(ValueError):
        _config.parse_size(text)
    if text:
        monkeypatch.setenv(_config.CACHE_MAX_ENV, text)
        with pytest.raises(sa3loader.ConfigError, match=_config.CACHE_MAX_ENV):
            load_toy(make_ckpt(tmp_path / "m.safetensors"), tmp_path / "cache")


def test_prune_max_size_removes_the_least_recently_used_until_the_rest_fit(tmp_path):
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    with tuned(last_use_step_s=0.0):
        for ckpt in (a, b, c, a):
            load_toy(ckpt, cache)
    size = sibling_of(a).stat().st_size
    dry = run("cache", "prune", "--max-size", str(size + 1), "--dry-run", cache=cache).stdout
    assert dry.startswith(f"would prune (over cap): {b}\nwould prune (over cap): {c}\n")
    assert sibling_of(b).exists()
    run("cache", "prune", "--max-size", str(size + 1), cache=cache)
    assert [p.name for p in (tmp_path / SIBLING).glob("*.fp16.safetensors")] == ["a.fp16.safetensors"]
    assert [r["source"] for r in json.loads(run("--json", "cache", "ls", cache=cache).stdout)] == [str(a)]
    assert (
        "goes with cache prune" in run("cache", "clear", "--max-size", "1GB", cache=cache, check_rc=2).stderr
    )
    assert "not a size" in run("cache", "prune", "--max-size", "20G", cache=cache, check_rc=2).stderr


def test_a_conversion_not_yet_published_counts_under_the_cap(tmp_path, monkeypatch):
    """Two first loads one after the other in one process: the first one's sibling is still
    being published (no row yet) when the second one checks the cap."""
    a, b, _ = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    size = sibling_of(a).stat().st_size
    sibling_of(a).unlink()
    monkeypatch.setenv(_config.CACHE_MAX_ENV, str(size + size // 2))  # room for one
    with injected(at("index", lambda: time.sleep(0.5))):  # the row comes late
        load_toy(a, cache, published=False)
        load_toy(b, cache)
    on_disk = [p for p in (tmp_path / SIBLING).glob("*.fp16.safetensors")]
    assert sum(p.stat().st_size for p in on_disk) <= size + size // 2, on_disk


def test_hard_links_to_one_sibling_count_once_and_are_never_evicted(tmp_path, monkeypatch):
    """``cp -al run1 run1-copy``: two rows, one file. Removing one link frees nothing."""
    (tmp_path / "run1").mkdir()
    a = make_ckpt(tmp_path / "run1" / "a.safetensors")
    cache = tmp_path / "cache"
    load_toy(a, cache)
    os.system(f"cp -al {tmp_path / 'run1'} {tmp_path / 'run1-copy'}")
    load_toy(tmp_path / "run1-copy" / "a.safetensors", cache)
    size = sibling_of(a).stat().st_size
    assert f"{size / 1e3:.3g} kB of siblings on disk" in run("cache", "ls", cache=cache).stdout
    monkeypatch.setenv(_config.CACHE_MAX_ENV, str(2 * size + size // 2))
    load_toy(make_ckpt(tmp_path / "b.safetensors"), cache)  # fits: the links count once
    assert sa3loader.last_load_info().converted and sibling_of(a).exists()


def test_a_full_disk_where_removing_every_sibling_would_not_do_removes_none(tmp_path):
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    used_hours_ago(cache, a, 3)
    with faked(free_bytes=lambda path, real: 1000):  # far too little, anywhere
        load_toy(c, cache)
    assert "no place for the fp16 sibling" in sa3loader.last_load_info().reason
    assert sibling_of(a).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI runs as root)")
def test_a_sibling_whose_lock_is_another_users_is_not_removed_and_the_cap_holds(tmp_path, monkeypatch):
    a, b, _ = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    os.chown(f"{sibling_of(a)}.lock", 65534, 65534)  # a teammate's load in a shared folder
    size = sibling_of(a).stat().st_size
    monkeypatch.setenv(_config.CACHE_MAX_ENV, str(size + size // 2))
    load_toy(b, cache)
    info = sa3loader.last_load_info()
    assert info.sibling is None and "does not fit under" in info.reason
    assert sibling_of(a).exists() and [
        r["source"] for r in json.loads(run("--json", "cache", "ls", cache=cache).stdout)
    ] == [str(a)]
    dry = run("cache", "prune", "--max-size", "1kB", "--dry-run", cache=cache).stdout
    assert "would remove sibling" not in dry


def test_loads_that_converted_at_once_end_under_the_cap(tmp_path, monkeypatch):
    """Another process's row lands between this load's cap check and its publication (each
    made room for its own sibling alone): once this one's row is in, the cap is applied
    again and the least recently used other sibling goes, never the new one."""
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    load_toy(a, cache)
    load_toy(b, cache)
    index = Index(str(cache))
    landing = index.get(os.path.realpath(b))
    index.delete(os.path.realpath(b))  # b's conversion, still running elsewhere
    size = sibling_of(a).stat().st_size
    monkeypatch.setenv(_config.CACHE_MAX_ENV, str(2 * size + size // 2))  # room for two
    with injected(at("convert", lambda: Index(str(cache)).put(os.path.realpath(b), landing))):
        load_toy(c, cache)
    assert sa3loader.last_load_info().converted and sibling_of(c).exists()
    on_disk = [p for p in (tmp_path / SIBLING).glob("*.fp16.safetensors")]
    assert sum(p.stat().st_size for p in on_disk) <= 2 * size + size // 2, on_disk
    assert not sibling_of(a).exists()  # the least recently used


def test_a_process_that_ends_while_publishing_under_a_cap_publishes_quietly(tmp_path):
    """The cap is applied again once the sibling is in, by the publication the process waits
    for at exit; reading a row's fingerprint then cannot start a thread pool (Python refuses new
    futures at exit): it reads in its own thread. No false 'could not publish' warning."""
    from support.processes import fork_child

    a, b = (
        make_ckpt(tmp_path / "a" / "model.safetensors"),
        make_ckpt(tmp_path / "b" / "model.safetensors", seed=4),
    )
    cache = tmp_path / "cache"
    load_toy(a, cache)  # a row whose status the cap reads
    env = {_config.CACHE_MAX_ENV: "1GB", "CHILD_SLOW_PUBLISH": "0.5", "SA3LOADER_PLACE": "cache"}
    child = fork_child("load", str(b), str(cache), extra_env=env)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and json.loads(out)["converted"], err
    assert "could not publish" not in err and "cannot apply" not in err, err
    load_toy(b, cache)
    assert sa3loader.last_load_info().cache_hit


def test_loads_converting_at_once_never_leave_less_room_than_the_rule_keeps(tmp_path, monkeypatch):
    """Two first loads on a disk with room for one sibling (and the next checkpoint, and the
    margin): each checks the free space before either wrote a byte. Each takes its sibling's
    bytes on disk before writing and checks again, so the later sees both: never two siblings."""
    import threading

    from sa3loader import _faults

    a, b, _ = three_checkpoints(tmp_path)
    hidden = tmp_path / SIBLING
    load_toy(a, tmp_path / "probe")  # the sibling's size, then gone
    size, source = sibling_of(a).stat().st_size, a.stat().st_size
    for path in hidden.iterdir():
        path.unlink()
    budget = (64 << 20) + source + size + size // 2

    def taken() -> int:  # a file renamed or removed by the other load meanwhile takes nothing
        blocks = 0
        for p in hidden.iterdir():
            with contextlib.suppress(FileNotFoundError):
                blocks += p.stat().st_blocks if p.is_file() else 0
        return blocks * 512

    def disk_free(path, real):  # what the files there take, reserved blocks too
        if str(path).startswith(str(hidden)) or str(path) == str(tmp_path / ".cache"):
            return budget - taken()
        return 0  # nowhere else: no fallback to the cache dir

    both_checked = threading.Barrier(2, timeout=30)
    monkeypatch.setattr(_faults, "hook", lambda name, subject=None: name == "convert" and both_checked.wait())
    infos = []

    def first_load(ckpt):
        load_toy(ckpt, tmp_path / "cache")
        infos.append(sa3loader.last_load_info())

    with faked(free_bytes=disk_free):
        threads = [threading.Thread(target=first_load, args=(ckpt,)) for ckpt in (a, b)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert disk_free(str(hidden), None) >= source + (64 << 20)
    assert len(infos) == 2 and sum(bool(i.converted) for i in infos) <= 1
    assert all(i.converted or "not enough free space" in i.reason for i in infos), [i.reason for i in infos]


def test_a_cap_that_cannot_be_applied_writes_no_sibling(tmp_path, monkeypatch):
    """The index damaged: the siblings it names cannot be counted, so a new one could take the
    disk past $SA3LOADER_CACHE_MAX. The load reads fp32 and says why; after `cache repair`,
    it converts again under the cap."""
    a, b, _ = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    load_toy(a, cache)
    monkeypatch.setenv(_config.CACHE_MAX_ENV, "1GB")
    (cache / "index" / "cache.db").write_bytes(b"not a database" * 100)
    load_toy(b, cache)
    info = sa3loader.last_load_info()
    assert not info.converted and info.sibling is None and "cannot be applied" in info.reason, info.reason
    assert len(list((cache / "siblings").rglob("*.safetensors"))) == 1
    run("cache", "repair", cache=cache)
    load_toy(b, cache)
    assert sa3loader.last_load_info().converted


def a_dead_writers_leftover(tmp_path):
    """Checkpoint a, its hidden folder emptied but for the temp file a killed conversion of it
    left (its sibling's bytes taken); the sibling's size, the checkpoint's, the temp file."""
    from sa3loader._places import incomplete_prefix

    a, _, _ = three_checkpoints(tmp_path)
    hidden = tmp_path / SIBLING
    load_toy(a, tmp_path / "probe")
    size, source = sibling_of(a).stat().st_size, a.stat().st_size
    for path in hidden.iterdir():
        path.unlink()
    leftover = f"{incomplete_prefix(str(sibling_of(a)))}{dead_pid()}-abcd1234"  # no such process
    with open(leftover, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return a, hidden, size, source, leftover


def test_a_killed_conversions_leftover_counts_as_free_room_for_the_next_load(tmp_path):
    """A conversion killed mid-write leaves a temp file holding the sibling's bytes (taken on
    disk when it began). On a disk with room for one sibling, the next load of that checkpoint
    counts them as free: under the lock it removes them, then converts (README: 'a temp file
    the next load ... removes'). Its size shows them (ls, du, cache scan)."""
    a, hidden, size, source, leftover = a_dead_writers_leftover(tmp_path)
    budget = (64 << 20) + source + size + size // 2  # one sibling, with the leftover gone

    def disk_free(path, real):
        if str(path).startswith(str(hidden)) or str(path) == str(tmp_path / ".cache"):
            return budget - sum(p.stat().st_blocks * 512 for p in hidden.iterdir() if p.is_file())
        return 0

    with faked(free_bytes=disk_free):
        model = load_toy(a, tmp_path / "cache")
    assert sa3loader.last_load_info().converted, sa3loader.last_load_info().reason
    assert not os.path.exists(leftover)
    assert_same_model(model, reference(a))


def test_a_conversion_takes_its_siblings_bytes_before_writing_them(tmp_path):
    """The temp file holds the whole sibling on disk, and says so by its size, before the
    first byte of data is written: a kill then leaves what ls, du and cache scan can see."""
    a, _, _ = three_checkpoints(tmp_path)
    seen = []

    def look():
        (temp,) = [p for p in (tmp_path / SIBLING).iterdir() if ".incomplete-" in p.name]
        seen.append((temp.stat().st_size, temp.stat().st_blocks * 512))

    with injected(at("header", look)):
        load_toy(a, tmp_path / "cache")
    size = sibling_of(a).stat().st_size
    assert len(seen) == 1 and seen[0][0] == size and seen[0][1] >= size, (seen, size)


def test_a_leftover_another_name_links_is_no_room_where_nothing_checks_again(tmp_path):
    """Without fallocate (no second look once the bytes are written), a leftover counts as free
    only when removing it frees its blocks: one another name links (a backup, a snapshot's)
    frees nothing, and the load reads fp32 rather than fill the disk past the rule."""
    a, hidden, size, source, leftover = a_dead_writers_leftover(tmp_path)
    os.link(leftover, tmp_path / "kept-by-a-backup")
    budget = (64 << 20) + source + size + size // 2  # one sibling beside the leftover: not two

    def disk_free(path, real):  # blocks by file, however many names it has
        if str(path).startswith(str(hidden)) or str(path) == str(tmp_path / ".cache"):
            files = [p for p in (*hidden.iterdir(), tmp_path / "kept-by-a-backup") if p.is_file()]
            return budget - sum({p.stat().st_ino: p.stat().st_blocks * 512 for p in files}.values())
        return 0

    with faked(free_bytes=disk_free, fallocate=lambda subject, real: None):
        load_toy(a, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert not info.converted and "not enough free space" in info.reason, info.reason


def siblings_in_cache(cache):
    return sorted((cache / "siblings").rglob("*.fp16.safetensors"))


@pytest.mark.parametrize("how", ["a load under the cap", "cache prune --max-size"])
def test_siblings_a_lost_index_named_count_toward_the_cap_and_go_first(tmp_path, monkeypatch, how):
    """The index deleted (or set aside by `cache repair`): its siblings in the cache dir still
    take the disk the cap is about. A load (or `prune --max-size`) counts them, and with no use
    recorded they go before any sibling a row names."""
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    load_toy(a, cache)
    load_toy(b, cache)
    size = siblings_in_cache(cache)[0].stat().st_size
    shutil.rmtree(cache / "index")  # both siblings now no row names
    if how == "a load under the cap":
        monkeypatch.setenv(_config.CACHE_MAX_ENV, str(2 * size + size // 2))  # room for two
        load_toy(c, cache)
        assert sa3loader.last_load_info().converted
    else:
        run("cache", "prune", "--max-size", str(size + size // 2), cache=cache)
    left = siblings_in_cache(cache)
    assert (
        sum(p.stat().st_size for p in left) <= (2 if how == "a load under the cap" else 1) * size + size // 2
    )
    assert len(left) == (2 if how == "a load under the cap" else 1), left


def test_a_sibling_a_row_names_again_outlives_those_no_row_names(tmp_path, monkeypatch):
    """After the index is lost, a load of a adopts its sibling again (a row names it, just
    used); b's no row names. A cap with room for two, then c: b's goes, a's stays, whatever
    order their folders have."""
    a, b, c = three_checkpoints(tmp_path)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    for first, second in ((a, b), (b, a)):
        shutil.rmtree(cache, ignore_errors=True)
        load_toy(first, cache)
        load_toy(second, cache)
        adopted = sa3loader.last_load_info().sibling
        size = siblings_in_cache(cache)[0].stat().st_size
        shutil.rmtree(cache / "index")
        load_toy(second, cache)  # a row names its sibling again
        monkeypatch.setenv(_config.CACHE_MAX_ENV, str(2 * size + size // 2))
        load_toy(c, cache)
        monkeypatch.delenv(_config.CACHE_MAX_ENV)
        assert sa3loader.last_load_info().converted
        left = [str(p) for p in siblings_in_cache(cache)]
        assert len(left) == 2 and adopted in left, (left, adopted)


def test_row_less_siblings_the_cap_may_remove_are_only_this_cache_dirs_own_and_free_bytes(
    tmp_path, monkeypatch
):
    """Never another cache dir's, reached through a link at ``siblings`` (their rows name them);
    never one another name links (removing it frees nothing); and one a load adopts between the
    plan and its execution stays (a row names it now, and the load uses it)."""
    from sa3loader._cache_admin import Eviction
    from sa3loader._cache_dir import siblings_in

    a, b, c = three_checkpoints(tmp_path)
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    theirs, mine = tmp_path / "theirs", tmp_path / "mine"
    load_toy(a, theirs)
    mine.mkdir()
    (mine / "siblings").symlink_to(theirs / "siblings")
    run("cache", "prune", "--max-size", "1", cache=mine)
    assert len(siblings_in_cache(theirs)) == 1  # not reached through the link
    load_toy(b, tmp_path / "own")
    load_toy(c, tmp_path / "own")
    first, other = map(Path, siblings_in(str(tmp_path / "own")))  # in the order the cap looks
    os.link(first, tmp_path / "backup")
    shutil.rmtree(tmp_path / "own" / "index")
    run("cache", "prune", "--max-size", "1", cache=tmp_path / "own")
    assert first.exists() and not other.exists()  # removing the linked one would free nothing
    linked = first
    os.unlink(tmp_path / "backup")
    plan = Eviction(str(tmp_path / "own")).over_cap(1 << 40, adding=1 << 40, keep=frozenset())
    assert plan is not None and [r.path for r in plan.removals if r.kind == "sibling"] == [str(linked)]
    load_toy(b if linked.name.startswith("b.") else c, tmp_path / "own")  # adopted: a row names it
    outcome = Eviction(str(tmp_path / "own")).carry_out(plan)
    assert linked.exists() and "a row names it now" in [why for _, why in outcome.kept]


def test_the_no_room_reason_names_the_siblings_own_size_not_less_its_leftovers(tmp_path):
    """A killed conversion's temp file counts as free (it goes before a byte is written), but the
    reason printed the size less it: "a -7336 B sibling" (an outside attack)."""
    from sa3loader._cli_output import human_size

    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache")
    sibling = sibling_of(ckpt)
    size = sibling.stat().st_size
    sibling.unlink()
    leftover = sibling.parent / f"{sibling.name}.incomplete-{dead_pid()}-0bad1dea"
    leftover.write_bytes(os.urandom(3 * size))  # a killed conversion's, larger than the sibling
    with faked(free_bytes=lambda path, real: 1000):
        load_toy(ckpt, tmp_path / "cache")
    reason = sa3loader.last_load_info().reason
    said = re.findall(r"free\): a (.*?) sibling would leave less", reason)
    assert said == [human_size(size)] * 2, reason  # beside the checkpoint, then in the cache dir

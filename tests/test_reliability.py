"""Concurrency, crashes, corruption, hostile input and environment faults.

Each test checks one promise of the README's Guarantees section.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import random_like_state, save
from child import digest
from conftest import writable
from toymodel import build, reference

import sa3loader
from sa3loader import _convert, _fsutil, _sibling
from sa3loader._format import read_header
from sa3loader._fsutil import conversion_lock
from sa3loader._index import Index

HERE = Path(__file__).resolve().parent
KILL_PHASES = ["header", "data", "fsync", "rename", "index"]
RANDOM_KILL_TRIALS = 30
PROCESSES = 8
BIG_DIM = 512


def make_ckpt(path: Path, dim: int = 32, seed: int = 3) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(random_like_state(build({"dim": dim}), seed=seed), path)


def reference_digest(path: Path, dim: int = 32) -> str:
    return digest(reference(path, config={"dim": dim}))


def child(*args: str, dim: int = 32, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
    # One thread each: eight processes on two cores otherwise spin in OpenMP barriers.
    env = {
        **os.environ,
        "TOY_DIM": str(dim),
        "PYTHONPATH": str(HERE),
        "SA3LOADER_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        **(extra_env or {}),
    }
    return subprocess.Popen(
        [sys.executable, str(HERE / "child.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kwargs,
    )


def load_at_once(ckpt: Path, caches: list[Path], env: dict[str, str]) -> list[dict]:
    """One child process per cache dir, all started together; their reports, in order."""
    procs = [child("load", str(ckpt), str(cache), dim=BIG_DIM, extra_env=env) for cache in caches]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def load_here(path: Path, cache: Path, dim: int = 32, **kwargs):
    torch.manual_seed(0)
    return sa3loader.load_diffusion_cond(
        {"dim": dim}, path, "cpu", True, cache_dir=cache, model_factory=build, **kwargs
    )


def lock_is_free(sibling: Path) -> bool:
    with conversion_lock(str(sibling), timeout=0.5) as locked:
        return locked


# ------------------------------------------------------------------ concurrency
@pytest.mark.slow
@pytest.mark.parametrize("shared_cache", [True, False], ids=["one-cache", "eight-caches"])
def test_processes_loading_a_cold_checkpoint_convert_once(tmp_path, shared_cache):
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    caches = [tmp_path / ("cache" if shared_cache else f"cache{i}") for i in range(PROCESSES)]
    # Whoever converts sleeps 3 s mid-write, so every loader arrives while it converts.
    results = load_at_once(ckpt, caches, {"CHILD_SLOW_CONVERT": "3"})
    assert sum(r["converted"] for r in results) == 1
    assert all(r["converted"] or r["cache_hit"] for r in results)  # nobody fell back to fp32
    assert {r["digest"] for r in results} == {reference_digest(ckpt, BIG_DIM)}
    assert not list(tmp_path.glob("*.incomplete-*"))


@pytest.mark.slow
def test_reader_while_a_new_sibling_is_published(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    load_here(ckpt, tmp_path / "cache", BIG_DIM)
    expected = reference_digest(ckpt, BIG_DIM)
    writer = child("republish", str(ckpt), "15")
    assert writer.stdout.readline().strip() == "ready"
    seen = 0
    while writer.poll() is None or seen < 3:
        model = load_here(ckpt, tmp_path / "cache", BIG_DIM)
        assert digest(model) == expected
        seen += 1
        if seen > 200:
            break
    writer.communicate(timeout=120)
    assert writer.returncode == 0 and seen >= 3


# ----------------------------------------------------------------------- crashes
def assert_healed(ckpt: Path, cache: Path, dim: int) -> None:
    sibling = ckpt.with_name("model.fp16.safetensors")
    assert lock_is_free(sibling)
    if sibling.exists():  # only a complete, correct file may have been published
        _convert.verify(read_header(ckpt), read_header(sibling))
    model = load_here(ckpt, cache, dim)
    assert digest(model) == reference_digest(ckpt, dim)
    assert sa3loader.last_load_info().sibling == str(sibling)
    assert not list(ckpt.parent.glob("*.incomplete-*"))
    _convert.verify(read_header(ckpt), read_header(sibling))


@pytest.mark.slow
@pytest.mark.parametrize("phase", KILL_PHASES)
def test_sigkill_at_each_phase_heals(tmp_path, phase):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    proc = child("kill-at", phase, str(ckpt), str(tmp_path / "cache"))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    if phase in ("header", "data", "fsync"):
        assert list(tmp_path.glob("*.incomplete-*"))  # the crash left its temp file behind
    assert_healed(ckpt, tmp_path / "cache", 32)


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_bad_sibling(tmp_path):
    """Kill points are chosen by progress (bytes written), never by the clock: deterministic."""
    rng = random.Random(20261125)
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    total = sa3loader._sibling.resolve_sibling(read_header(ckpt), str(tmp_path / "probe")).converted.size
    (tmp_path / "model.fp16.safetensors").unlink()
    for trial, limit in enumerate(sorted(rng.randint(1, total) for _ in range(RANDOM_KILL_TRIALS))):
        cache = tmp_path / f"cache{trial}"
        proc = child("kill-after", str(limit), str(ckpt), str(cache), dim=BIG_DIM)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"not killed after {limit} of {total} bytes"
        assert not (tmp_path / "model.fp16.safetensors").exists()  # nothing published mid-write
        assert_healed(ckpt, cache, BIG_DIM)
        (tmp_path / "model.fp16.safetensors").unlink()


def test_hard_identity_change_rejects_even_when_samples_match(tmp_path, monkeypatch):
    """A size/mtime change the sampled fingerprint misses still means reconvert."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_here(ckpt, tmp_path / "cache")
    claimed = read_header(ckpt.with_name("model.fp16.safetensors")).metadata["sa3loader.source_fingerprint"]
    monkeypatch.setattr(_sibling, "fingerprint", lambda header: claimed)
    st = os.stat(ckpt)
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_here(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted


# ------------------------------------------------------------ corruption, index
@pytest.fixture
def loaded(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_here(ckpt, tmp_path / "cache")
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
    model = load_here(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    info = sa3loader.last_load_info()
    assert info.cache_hit and not info.converted  # adopted from the sibling's own metadata


def test_locked_index_does_not_stall_loading(loaded, monkeypatch):
    """diskcache's own open retries a locked database for 60 s; the probe gives up first."""
    import diskcache

    ckpt, cache = loaded
    opened = []
    real_cache = diskcache.Cache
    monkeypatch.setattr(diskcache, "Cache", lambda *a, **k: opened.append(a) or real_cache(*a, **k))
    holder = sqlite3.connect(cache / "index" / "cache.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        model = load_here(ckpt, cache)
        assert digest(model) == reference_digest(ckpt)
        assert opened == []  # never handed to diskcache's retrying open
    finally:
        holder.rollback()
        holder.close()


def test_index_row_pointing_at_a_missing_file(loaded):
    ckpt, cache = loaded
    index = Index(str(cache))
    row = index.get(os.path.realpath(ckpt))
    row["sibling"]["path"] = str(cache / "gone.fp16.safetensors")
    index.put(os.path.realpath(ckpt), row)
    index.close()
    model = load_here(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().sibling == str(ckpt.with_name("model.fp16.safetensors"))


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
    model = load_here(ckpt, cache)
    assert not marker.exists()
    assert digest(model) == reference_digest(ckpt)
    assert Index(str(cache)).get(os.path.realpath(ckpt))["schema"] == 1  # healed with a JSON row
    assert not marker.exists()


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
    row = index.get(key)
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
    model = load_here(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().cache_hit
    assert Index(str(cache)).get(key) is not None  # replaced by a valid row
    assert cli.main(["--cache-dir", str(cache), "cache", "ls"]) == 0
    index._open().set(key, value)
    index.close()
    assert cli.main(["--cache-dir", str(cache), "cache", "prune"]) == 0
    assert Index(str(cache)).items() == []
    assert ckpt.with_name("model.fp16.safetensors").exists()  # prune of an invalid row deletes no file


def test_source_path_that_is_not_utf8_round_trips_through_the_index(tmp_path):
    raw_dir = os.fsencode(str(tmp_path)) + b"/caf\xe9-\xff"
    os.mkdir(raw_dir)
    ckpt = make_ckpt(Path(os.fsdecode(raw_dir)) / "model.safetensors")
    expected = reference_digest(make_ckpt(tmp_path / "same.safetensors"))  # load_file wants UTF-8 paths
    for expect_hit in (False, True):
        model = load_here(ckpt, tmp_path / "cache")
        info = sa3loader.last_load_info()
        assert (info.cache_hit, info.converted) == (expect_hit, not expect_hit)
        assert digest(model) == expected
    [(key, row)] = Index(str(tmp_path / "cache")).items()
    assert os.fsencode(key) == os.fsencode(os.path.realpath(ckpt)) and row is not None


def test_library_never_imports_pickle_or_torch_load():
    package = Path(sa3loader.__file__).parent
    for source in package.glob("*.py"):
        text = source.read_text()
        assert "import pickle" not in text and "torch.load(" not in text, source


# ------------------------------------------------------------- hostile input
def rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize(
    "raw",
    [
        (2**64 - 1).to_bytes(8, "little") + b"{}",
        (50_000_000).to_bytes(8, "little") + b"{",
        b"",
        (2).to_bytes(8, "little") + b"{}" + b"\0" * 3,
    ],
    ids=["length-2^64", "length-past-eof", "empty", "data-without-tensors"],
)
def test_hostile_checkpoint_fails_clearly_and_writes_nothing(tmp_path, raw):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(raw)
    before = rss_anon()
    with pytest.raises(sa3loader.HeaderError) as err:
        load_here(ckpt, tmp_path / "cache")
    assert rss_anon() - before < 50 * 1024 * 1024
    assert str(ckpt) in str(err.value) and isinstance(err.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("name", ["dir with spaces/model.safetensors", "müsik ☃/モデル.safetensors"])
def test_odd_paths_load_normally(tmp_path, name):
    ckpt = make_ckpt(tmp_path / name)
    for _ in range(2):
        model = load_here(ckpt, tmp_path / "cache")
        assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().cache_hit


def test_missing_checkpoint_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_here(tmp_path / "nope.safetensors", tmp_path / "cache")
    with pytest.raises(IsADirectoryError):
        load_here(tmp_path, tmp_path / "cache")


# -------------------------------------------------------- environment faults
def assert_fp32_fallback(ckpt: Path, cache: Path, caplog, expect: str) -> None:
    model = load_here(ckpt, cache)
    info = sa3loader.last_load_info()
    assert info.sibling is None and not info.converted
    assert digest(model) == reference_digest(ckpt)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and expect in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert not list(ckpt.parent.rglob("*.incomplete-*"))
    assert not ckpt.with_name("model.fp16.safetensors").exists()


def test_enospc_during_write(tmp_path, monkeypatch, caplog):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    real_write = os.write
    written = {"n": 0}

    def full_disk(fd, data):
        written["n"] += 1
        if written["n"] > 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(_convert.os, "write", full_disk)
    assert_fp32_fallback(ckpt, tmp_path / "cache", caplog, "could not write")


def test_not_enough_free_space_up_front(tmp_path, monkeypatch, caplog):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    monkeypatch.setattr(_sibling, "free_bytes", lambda path: 1024)
    assert_fp32_fallback(ckpt, tmp_path / "cache", caplog, "not enough free space")


def test_read_only_source_and_unusable_cache_dir(tmp_path, monkeypatch, caplog):
    ckpt = make_ckpt(tmp_path / "src" / "model.safetensors")
    real = _sibling.dir_writable
    monkeypatch.setattr(_sibling, "dir_writable", lambda d: "src" not in d and real(d))
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("x")
    assert_fp32_fallback(ckpt, not_a_dir, caplog, "cannot create")


def test_no_home_falls_back_to_temp_with_a_warning(tmp_path, monkeypatch, caplog):
    for var in ("HOME", "XDG_CACHE_HOME", "SA3LOADER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_fsutil.os.path, "expanduser", lambda p: p)
    monkeypatch.setattr(_fsutil.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert _fsutil.resolve_cache_dir().startswith(str(tmp_path / "tmp"))
    assert "no usable home" in caplog.text


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_flock_unsupported_still_loads(tmp_path, monkeypatch, caplog, code):
    ckpt = make_ckpt(tmp_path / "model.safetensors")

    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(_fsutil.fcntl, "flock", no_locks)
    model = load_here(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert digest(model) == reference_digest(ckpt)
    assert len([r for r in caplog.records if "locking is not supported" in r.getMessage()]) == 1


def test_lock_timeout_raises_typed_error(tmp_path, monkeypatch):
    """flock locks belong to open file descriptions: one held here blocks the load's own."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "0.3")
    lock = os.open(str(ckpt.with_name("model.fp16.safetensors.lock")), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(sa3loader.LockTimeoutError) as err:
            load_here(ckpt, tmp_path / "cache")
        assert isinstance(err.value, TimeoutError)
    finally:
        os.close(lock)


# ------------------------------------------------------------------- cache trust
def no_home(monkeypatch, tmp_path) -> Path:
    for var in ("HOME", "XDG_CACHE_HOME", "SA3LOADER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(_fsutil.os.path, "expanduser", lambda p: p)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(_fsutil.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(_fsutil.tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp" / f"sa3loader-{os.getuid()}"


def plant(fixed: Path, ckpt: Path) -> Path:
    """Another user's doing: a sibling with the victim's identity and other weights, in ``fixed``."""
    outcome = sa3loader._sibling.resolve_sibling(read_header(ckpt), str(fixed))
    planted = Path(outcome.sibling.path)
    assert str(planted).startswith(str(fixed))  # a hub-style source: the sibling went to the cache
    raw = bytearray(planted.read_bytes())
    raw[-64:] = b"\x11" * 64
    writable(planted).write_bytes(bytes(raw))
    return planted


PLANTED_BECAUSE = {
    "world-writable": "it is world-writable",
    "symlink": "it is a symlink",
    "other-owner": "it is owned by uid 65534",
    "a-file": "it cannot be created or written",
}


@pytest.mark.parametrize("how", sorted(PLANTED_BECAUSE))
def test_a_planted_fallback_cache_dir_is_never_used(tmp_path, monkeypatch, caplog, how):
    """Without a home the cache falls back to <tmp>/sa3loader-<uid>; someone else may have made it."""
    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    ckpt = make_ckpt(hub / "model.safetensors")  # in a hub cache: siblings go to the cache dir
    fixed = no_home(monkeypatch, tmp_path)
    if how == "a-file":
        fixed.write_bytes(b"not a dir")
    elif how == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        plant(elsewhere, ckpt)
        fixed.symlink_to(elsewhere)
    else:
        fixed.mkdir(mode=0o700)
        plant(fixed, ckpt)
        if how == "world-writable":
            fixed.chmod(0o777)
        elif os.getuid() == 0:
            os.chown(fixed, 65534, 65534)
        else:
            pytest.skip("only root can give a dir to another user")
    chosen = _fsutil.resolve_cache_dir()
    assert chosen != str(fixed) and os.stat(chosen).st_mode & 0o777 == 0o700
    assert f"{fixed} is not usable ({PLANTED_BECAUSE[how]}); using {chosen}" in caplog.text
    model = load_here(ckpt, Path(chosen))
    assert digest(model) == reference_digest(ckpt)
    assert not sa3loader.last_load_info().sibling.startswith(str(fixed) + os.sep)


def test_an_untrusted_cache_dir_is_ignored_unless_shared_on_purpose(tmp_path, monkeypatch, caplog):
    from sa3loader import cli

    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    ckpt = make_ckpt(hub / "model.safetensors")
    cache = tmp_path / "team-cache"
    cache.mkdir()
    planted = plant(cache, ckpt)
    cache.chmod(0o777)
    model = load_here(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().sibling is None  # nowhere trusted to write: fp32
    assert "ignoring the sa3loader cache dir" in caplog.text
    assert cli.main(["--cache-dir", str(cache), "cache", "clear"]) == 1
    assert planted.exists()
    monkeypatch.setenv("SA3LOADER_SHARED_CACHE", "1")  # a team cache, shared on purpose
    load_here(ckpt, cache)
    assert sa3loader.last_load_info().sibling == str(planted)


def test_dirs_sa3loader_creates_are_private(tmp_path):
    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    ckpt = make_ckpt(hub / "model.safetensors")
    cache = tmp_path / "new" / "cache"
    load_here(ckpt, cache)
    sibling = Path(sa3loader.last_load_info().sibling)
    for directory in (cache, cache / "index", sibling.parent, sibling.parent.parent):
        assert directory.stat().st_mode & 0o777 == 0o700, directory


def test_a_lock_taken_on_a_deleted_lock_file_is_taken_again(tmp_path, monkeypatch):
    """prune deletes lock files under the lock; a waiter that then gets the old inode must retry."""
    sibling = tmp_path / "model.fp16.safetensors"
    real_flock = _fsutil.fcntl.flock
    calls = []

    def flock_then_lose_the_file(fd, op):
        real_flock(fd, op)
        if op & fcntl.LOCK_EX:
            calls.append(os.fstat(fd).st_ino)
            if len(calls) == 1:  # as if a prune removed it just before we got it
                os.unlink(str(sibling) + ".lock")

    monkeypatch.setattr(_fsutil.fcntl, "flock", flock_then_lose_the_file)
    with conversion_lock(str(sibling), timeout=5) as locked:
        assert locked
        held = os.stat(str(sibling) + ".lock").st_ino
    assert len(calls) == 2 and calls[-1] == held


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


# ------------------------------------------------------------ network filesystems
@pytest.mark.slow
def test_hosts_without_a_shared_flock_still_convert_once(tmp_path):
    """On NFS flock may not reach other hosts: faked here by a flock that always succeeds.
    The lease file keeps it to one conversion among processes that all arrive at once."""
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    caches = [tmp_path / f"cache{i}" for i in range(4)]
    results = load_at_once(ckpt, caches, {"CHILD_SLOW_CONVERT": "3", "CHILD_FAKE_NFS": "1"})
    assert sum(r["converted"] for r in results) == 1
    assert {r["digest"] for r in results} == {reference_digest(ckpt, BIG_DIM)}
    assert not (tmp_path / "model.fp16.safetensors.lease").exists()


@pytest.mark.parametrize("age", [0, 3600], ids=["held", "stale"])
def test_a_lease_from_another_host(tmp_path, monkeypatch, age):
    """A fresh lease means wait (then LockTimeoutError); one left unrefreshed is taken over."""
    monkeypatch.setattr(_fsutil, "network_filesystem", lambda path: "nfs4")
    sibling = tmp_path / "model.fp16.safetensors"
    lease = Path(str(sibling) + ".lease")
    lease.write_text("other-host:123:abc")
    then = lease.stat().st_mtime - age
    os.utime(lease, (then, then))
    if age == 0:
        with pytest.raises(sa3loader.LockTimeoutError, match="another host"):
            with conversion_lock(str(sibling), 0.3):
                pass
        assert lease.read_text() == "other-host:123:abc"
    else:
        with conversion_lock(str(sibling), 5) as locked:
            assert locked and lease.read_text() != "other-host:123:abc"
        assert not lease.exists()

"""Converts once: a first load converts and later loads hit; an fp32 load never converts; many
processes at once convert once between them; each cache dir keeps its own rows and adopts a
sibling it did not make; readers never see a torn file; locks are taken again when their file
was replaced; hosts without a shared flock use a lease."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.child import digest
from support.compare import assert_same_model
from support.faults import fake_mount_table, faked
from support.loads import load_toy, make_ckpt, reference_digest
from support.processes import load_at_once, start_child
from support.toymodel import build, reference

import sa3loader
from sa3loader import _faults
from sa3loader._index import Index
from sa3loader._lock import conversion_lock

PROCESSES = 8

BIG_DIM = 512


def lock_is_free(sibling: Path) -> bool:
    with conversion_lock(str(sibling), timeout=0.5) as locked:
        return locked


@pytest.mark.slow
@pytest.mark.parametrize("shared_cache", [True, False], ids=["one-cache", "eight-caches"])
def test_processes_loading_a_cold_checkpoint_convert_once(tmp_path, shared_cache):
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    caches = [tmp_path / ("cache" if shared_cache else f"cache{i}") for i in range(PROCESSES)]
    # Whoever converts sleeps 3 s mid-write, so every loader arrives while it converts.
    results = load_at_once(ckpt, caches, {"CHILD_SLOW_CONVERT": "3"}, BIG_DIM)
    assert sum(r["converted"] for r in results) == 1
    assert all(r["converted"] or r["cache_hit"] for r in results)  # nobody fell back to fp32
    assert {r["digest"] for r in results} == {reference_digest(ckpt, BIG_DIM)}
    assert not list(tmp_path.rglob("*.incomplete-*"))


@pytest.mark.slow
def test_reader_while_a_new_sibling_is_published(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    load_toy(ckpt, tmp_path / "cache", dim=BIG_DIM)
    expected = reference_digest(ckpt, BIG_DIM)
    writer = start_child("republish", str(ckpt), "15")
    assert writer.stdout.readline().strip() == "ready"
    seen = 0
    while writer.poll() is None or seen < 3:
        model = load_toy(ckpt, tmp_path / "cache", dim=BIG_DIM)
        assert digest(model) == expected
        seen += 1
        if seen > 200:
            break
    writer.communicate(timeout=120)
    assert writer.returncode == 0 and seen >= 3


def test_a_lock_taken_on_a_deleted_lock_file_is_taken_again(tmp_path, monkeypatch):
    """prune deletes lock files under the lock; a waiter that then gets the old inode must retry."""
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    sibling.parent.mkdir(parents=True)
    real_flock = fcntl.flock
    calls = []

    def flock_then_lose_the_file(fd, op):
        real_flock(fd, op)
        if op & fcntl.LOCK_EX:
            calls.append(os.fstat(fd).st_ino)
            if len(calls) == 1:  # as if a prune removed it just before we got it
                os.unlink(str(sibling) + ".lock")

    monkeypatch.setattr(fcntl, "flock", flock_then_lose_the_file)
    with conversion_lock(str(sibling), timeout=5) as locked:
        assert locked
        held = os.stat(str(sibling) + ".lock").st_ino
    assert len(calls) == 2 and calls[-1] == held


@pytest.mark.slow
def test_hosts_without_a_shared_flock_still_convert_once(tmp_path):
    """On NFS flock may not reach other hosts: faked here by a flock that always succeeds.
    The lease file keeps it to one conversion among processes that all arrive at once."""
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    caches = [tmp_path / f"cache{i}" for i in range(4)]
    results = load_at_once(
        ckpt, caches, {"CHILD_SLOW_CONVERT": "3", "CHILD_FAKE_NFS": str(tmp_path)}, BIG_DIM
    )
    assert sum(r["converted"] for r in results) == 1
    assert {r["digest"] for r in results} == {reference_digest(ckpt, BIG_DIM)}
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.lease").exists()


def a_lease_on_nfs(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A sibling's path on a network filesystem (a faked mount table), and its lease's (its
    folder made, the lease not)."""
    monkeypatch.setitem(
        _faults.tunings, "mount_table", str(fake_mount_table(tmp_path / "mountinfo", {tmp_path: "nfs4"}))
    )
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    sibling.parent.mkdir(parents=True)
    return sibling, Path(str(sibling) + ".lease")


def waited_for_or_taken(sibling: Path, lease: Path, *, taken: bool, wait_s: float) -> None:
    """Another host's lease (``other-host:123:abc``) is taken over, or waited for ``wait_s``
    (then ``LockTimeoutError``, the lease as it was)."""
    if taken:
        with conversion_lock(str(sibling), 5) as locked:
            assert locked and lease.read_text() != "other-host:123:abc"
        return
    with pytest.raises(sa3loader.LockTimeoutError, match="another host"):
        with conversion_lock(str(sibling), wait_s):
            pass
    assert lease.read_text() == "other-host:123:abc"


@pytest.mark.parametrize("age", [0, 3600], ids=["held", "stale"])
def test_a_lease_from_another_host(tmp_path, monkeypatch, age):
    """A fresh lease means wait (then LockTimeoutError); one left unrefreshed is taken over."""
    sibling, lease = a_lease_on_nfs(tmp_path, monkeypatch)
    lease.write_text("other-host:123:abc")
    then = lease.stat().st_mtime - age
    os.utime(lease, (then, then))
    waited_for_or_taken(sibling, lease, taken=age > 0, wait_s=0.3)
    assert age == 0 or not lease.exists()


@pytest.mark.parametrize("planted", ["a link to nothing", "a FIFO"])
def test_a_lease_name_that_is_no_file_is_refused_at_once_and_kept(tmp_path, monkeypatch, planted):
    """Where the lease goes (a network filesystem), a link to nothing or a FIFO someone put
    there: the lock is ``UnusableLockError`` at once (the load writes its sibling elsewhere),
    the thing kept. A link made the wait spin without end (past its timeout); a FIFO, reading
    the holder's name blocked for a writer (an outside attack)."""
    sibling, lease = a_lease_on_nfs(tmp_path, monkeypatch)
    if planted == "a FIFO":
        os.mkfifo(lease)
    else:
        lease.symlink_to(tmp_path / "nowhere")
    raised: list[BaseException] = []

    def take() -> None:
        try:
            with conversion_lock(str(sibling), 2.0):
                pass
        except BaseException as exc:  # (what the test looks at)
            raised.append(exc)

    taker = threading.Thread(target=take, daemon=True)
    taker.start()
    taker.join(10)
    assert not taker.is_alive(), "the lock waited past its timeout"
    assert [type(e) for e in raised] == [sa3loader.UnusableLockError]
    assert "not a regular file" in str(raised[0])
    assert lease.is_symlink() if planted != "a FIFO" else stat.S_ISFIFO(lease.lstat().st_mode)


@pytest.mark.parametrize("refreshed", [False, True], ids=["silent", "refreshed"])
def test_a_lease_stamped_in_the_future_is_stale_once_it_stops_changing(tmp_path, monkeypatch, refreshed):
    """Another host's clock a day ahead (or a planted file): its lease's mtime is in the future,
    so its age by this host's clock is negative. A holder that stopped refreshing it is taken
    over once it has not changed for the stale time, by this process's clock (it waited out
    the whole lock timeout, an hour by default); one still refreshing it is waited for."""
    sibling, lease = a_lease_on_nfs(tmp_path, monkeypatch)
    monkeypatch.setitem(_faults.tunings, "lease_stale_s", 0.3)
    lease.write_text("other-host:123:abc")
    ahead = time.time() + 86400
    os.utime(lease, (ahead, ahead))
    stop = threading.Event()

    def holder() -> None:  # the other host's refresher, its clock still a day ahead
        while not stop.wait(0.05):
            now = time.time() + 86400
            os.utime(lease, (now, now))

    refresher = threading.Thread(target=holder, daemon=True)
    if refreshed:
        refresher.start()
    try:
        waited_for_or_taken(sibling, lease, taken=not refreshed, wait_s=1.0)
    finally:
        stop.set()
        if refreshed:
            refresher.join()


def test_first_load_converts_second_does_not(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1 and sa3loader.last_load_info().converted
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1 and sa3loader.last_load_info().cache_hit
    rows = Index(str(tmp_path / "cache")).items()
    assert [key for key, _ in rows] == [os.path.realpath(ckpt)]
    row = rows[0][1]
    assert row is not None and row.sibling_path == str(
        tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    )
    assert row.sibling_size == os.path.getsize(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors")
    assert row.source.size == os.path.getsize(ckpt)


def test_fp32_load_never_creates_a_sibling(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache", half=False)
    assert conversions == []
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


def test_lost_index_adopts_the_sibling(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1 and "adopted" in sa3loader.last_load_info().events


def test_two_cache_dirs_keep_their_own_rows(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "a")
    assert Index(str(tmp_path / "b")).items() == []
    load_toy(ckpt, tmp_path / "b")  # adopts the shared sibling beside the source, writes its own row
    assert len(conversions) == 1
    assert len(Index(str(tmp_path / "a")).items()) == 1 and len(Index(str(tmp_path / "b")).items()) == 1


def test_read_only_source_dir_puts_sibling_in_each_cache(ckpt, tmp_path, conversions, monkeypatch):
    # Tests run as root, who can write anywhere: make the source dir read-only by decree.
    with faked(dir_writable=lambda d, real: d != str(tmp_path) and real):
        for name in ("a", "b"):
            model = load_toy(ckpt, tmp_path / name)
            assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / name))
            assert_same_model(model, reference(ckpt))
    assert len(conversions) == 2
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


def hub_snapshot(tmp_path, ckpt, revision):
    repo = tmp_path / "hub" / "models--org--sa3"
    blob = repo / "blobs" / "abc123"
    if not blob.exists():
        blob.parent.mkdir(parents=True)
        shutil.copyfile(ckpt, blob)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
    return snap / "model.safetensors"


def test_hub_cache_sibling_goes_to_cache_and_follows_the_blob(ckpt, tmp_path, conversions):
    first = hub_snapshot(tmp_path, ckpt, "rev1")
    second = hub_snapshot(tmp_path, ckpt, "rev2")
    model = load_toy(first, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(tmp_path / "cache"))
    assert not any("fp16" in p.name for p in (tmp_path / "hub").rglob("*"))
    assert_same_model(model, reference(ckpt))
    load_toy(second, tmp_path / "cache")
    assert len(conversions) == 1 and sa3loader.last_load_info().sibling == info.sibling


def test_model_and_model_safetensors_keep_their_own_siblings(tmp_path, conversions):
    torch.manual_seed(0)
    plain = save(random_like_state(build(), seed=3), tmp_path / "model")
    suffixed = save(random_like_state(build(), seed=4), tmp_path / "model.safetensors")
    for _ in range(2):
        for path in (plain, suffixed):
            assert_same_model(load_toy(path, tmp_path / "cache"), reference(path))
    assert len(conversions) == 2
    hidden = tmp_path / ".cache" / "sa3loader"
    assert sorted(p.name for p in hidden.glob("*fp16*") if not p.name.endswith(".lock")) == [
        "model-fp16.safetensors",
        "model.fp16.safetensors",
    ]


def test_threads_loading_one_checkpoint_convert_once_and_say_which_waited(tmp_path):
    """Two threads of one process: one converts, the other waits for its lock and reads what
    it wrote, and says so (not "another process")."""
    import threading
    import time

    from support.faults import at, injected

    ckpt = make_ckpt(tmp_path / "model.safetensors")
    converting = threading.Event()
    reasons: list[str] = []

    def load() -> None:
        _, info = sa3loader.load(
            {"dim": 32}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build
        )
        reasons.append(info.reason)

    with injected(at("convert", lambda: (converting.set(), time.sleep(1.0)))):
        first = threading.Thread(target=load)
        first.start()
        assert converting.wait(30)
        second = threading.Thread(target=load)
        second.start()
        first.join(60)
        second.join(60)
    assert sorted(reasons) == ["converted", "converted by another load"]

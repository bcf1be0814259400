"""Many processes at once: one conversion between them, readers never see a torn file, locks taken
again when their file was replaced, hosts without a shared flock, leases.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from support.child import digest
from support.faults import fake_mount_table
from support.loads import load_toy, make_ckpt, reference_digest
from support.processes import load_at_once, start_child

import sa3loader
from sa3loader import _faults
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
    assert not list(tmp_path.glob("*.incomplete-*"))


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
    sibling = tmp_path / "model.fp16.safetensors"
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
    assert not (tmp_path / "model.fp16.safetensors.lease").exists()


@pytest.mark.parametrize("age", [0, 3600], ids=["held", "stale"])
def test_a_lease_from_another_host(tmp_path, monkeypatch, age):
    """A fresh lease means wait (then LockTimeoutError); one left unrefreshed is taken over."""
    monkeypatch.setitem(
        _faults.tunings, "mount_table", str(fake_mount_table(tmp_path / "mountinfo", {tmp_path: "nfs4"}))
    )
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

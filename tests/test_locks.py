"""No child keeps a lock, and no load waits on a lock its own process holds.

flock belongs to the open file description, which a forked child shares: a worker
forked while its parent converts must close its copy, or it holds the lock after
the parent dies and every other loader waits the whole timeout. A lease (network
filesystems) left by a dead process on this host is taken over at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from support.checkpoints import toy_hub_checkpoint
from support.child import digest
from support.faults import at, fake_mount_table, injected, thread_starts_refused
from support.loads import load_toy, make_ckpt, reference_digest
from support.processes import fork_child
from support.toymodel import build

import sa3loader
from sa3loader import _faults
from sa3loader._lock import _lease_token, conversion_lock

WAIT_S = 60
needs_proc = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")


def descriptors_on(path: Path) -> int:
    """How many of this process's descriptors are open on the file at ``path``."""
    target = os.stat(path)
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/self/fd/{fd}")
            count += (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino)
    return count


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@needs_proc
def test_a_child_forked_while_another_thread_converts_holds_no_lock(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    lock = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.lock"
    converting, release = threading.Event(), threading.Event()

    def hold() -> None:
        converting.set()
        assert release.wait(WAIT_S)

    infos = []

    def load() -> None:
        load_toy(ckpt, tmp_path / "cache")
        infos.append(sa3loader.last_load_info())

    with injected(at("data", hold)):
        loader = threading.Thread(target=load)
        loader.start()
        try:
            assert converting.wait(WAIT_S)
            assert descriptors_on(lock) == 1
            pid = os.fork()
            if pid == 0:
                os._exit(descriptors_on(lock))
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0  # the child has no copy
            assert descriptors_on(lock) == 1  # the parent's is still open
        finally:
            release.set()
            loader.join(WAIT_S)
    assert infos[0].converted


@pytest.mark.slow
def test_when_a_parent_that_forked_while_converting_dies_the_next_load_converts(tmp_path, monkeypatch):
    """A pre-fork server's worker lives on after its parent was killed mid-conversion: another
    process's load takes the lock at once (it waited the whole timeout, then failed)."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    marker = tmp_path / "worker-pid"
    parent = fork_child("fork-while-converting", str(ckpt), str(tmp_path / "cache"), str(marker))
    worker = None
    try:
        wait_for(lambda: marker.exists() and marker.read_text(), "the worker to be forked")
        worker = int(marker.read_text())
        os.kill(parent.pid, signal.SIGKILL)
        parent.communicate(timeout=WAIT_S)
        os.kill(worker, 0)  # the worker lives on
        monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "20")
        model = load_toy(ckpt, tmp_path / "cache")
        assert sa3loader.last_load_info().converted
        assert digest(model) == reference_digest(ckpt)
    finally:
        if worker is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


def test_a_load_nested_in_the_factory_does_not_wait_for_another_copy_of_the_same_blob(tmp_path, monkeypatch):
    """Two copies of a hub cache share one sibling (by blob): the outer load holds its lock
    until its model is built, and the nested load of the other copy publishes it first."""
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "0")
    first = toy_hub_checkpoint(tmp_path / "hf", "org/model", "a" * 40)
    shutil.copytree(tmp_path / "hf", tmp_path / "hf-copy", symlinks=True)
    second = tmp_path / "hf-copy" / first.relative_to(tmp_path / "hf")
    inner = []

    def factory(config):
        if not inner:
            inner.append(load_toy(second, tmp_path / "cache", published=False))
        return build(config)

    model = load_toy(first, tmp_path / "cache", factory=factory, published=False)
    assert digest(model) == digest(inner[0]) == reference_digest(first)
    assert sa3loader.wait_for_publishing(WAIT_S)


def test_a_lease_whose_holder_on_this_host_is_gone_is_taken_over_at_once(tmp_path, monkeypatch):
    """On a network filesystem the lock adds a lease file; one left by a process of this host
    that no longer exists is taken at once, not after a minute of silence."""
    monkeypatch.setitem(
        _faults.tunings, "mount_table", str(fake_mount_table(tmp_path / "mountinfo", {tmp_path: "nfs4"}))
    )
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that no longer exists
    sibling = tmp_path / "model.fp16.safetensors"  # the lock, wherever its sibling lives
    lease = Path(str(sibling) + ".lease")
    mine = _lease_token()
    lease.write_text(mine.replace(f":{os.getpid()}:", f":{pid}:"))
    with conversion_lock(str(sibling), timeout=2) as locked:  # a fresh lease: it would wait 60 s
        assert locked and f":{pid}:" not in lease.read_text()  # its pid field (not in the random part)
    assert not lease.exists()

    lease.write_text(mine.replace(f":{os.getpid()}:", f":{os.getppid()}:"))  # a live holder is waited for
    with pytest.raises(sa3loader.LockTimeoutError), conversion_lock(str(sibling), timeout=0.3):
        pass


def _on_a_network_filesystem(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A sibling path whose lock takes a lease (the mount table says NFS); and the lease's path."""
    monkeypatch.setitem(
        _faults.tunings, "mount_table", str(fake_mount_table(tmp_path / "mountinfo", {tmp_path: "nfs4"}))
    )
    sibling = tmp_path / "model.fp16.safetensors"
    return sibling, Path(str(sibling) + ".lease")


def test_a_lease_whose_refresher_cannot_start_is_held_and_given_back(tmp_path, monkeypatch):
    """Under a pids limit the lease's refresher thread cannot start: the lock is still taken (the
    lease unrefreshed, which is logged) and given back, not a bare RuntimeError with the lease left."""
    sibling, lease = _on_a_network_filesystem(tmp_path, monkeypatch)
    monkeypatch.setattr(threading.Thread, "start", thread_starts_refused("sa3loader-lease", after=0))
    with conversion_lock(str(sibling), timeout=2) as locked:
        assert locked and f":{os.getpid()}:" in lease.read_text()
    assert not lease.exists()


def test_a_ctrl_c_while_the_lease_refresher_is_joined_leaves_no_lease(tmp_path, monkeypatch):
    """Ctrl-C lands as the lock waits for the lease's refresher to end: the lease is already given
    back (a lease of this live process would hold off every other loader for a minute)."""
    sibling, lease = _on_a_network_filesystem(tmp_path, monkeypatch)
    real_join = threading.Thread.join

    def join(thread: threading.Thread, timeout: float | None = None) -> None:
        if thread.name == "sa3loader-lease":
            real_join(thread, timeout)  # the refresher ends: the interrupt comes after
            raise KeyboardInterrupt
        real_join(thread, timeout)

    monkeypatch.setattr(threading.Thread, "join", join)
    with pytest.raises(KeyboardInterrupt), conversion_lock(str(sibling), timeout=2) as locked:
        assert locked and lease.exists()
    assert not lease.exists()


def test_a_lease_this_process_left_behind_is_taken_over_at_once(tmp_path, monkeypatch):
    """A lease of this process's pid that no conversion here holds was left by one that Ctrl-C
    stopped: the next load in the process takes it at once, not after a minute (an attack saw a
    reload hang on it); one another conversion here holds is waited for."""
    sibling, lease = _on_a_network_filesystem(tmp_path, monkeypatch)
    lease.write_text(_lease_token())  # this pid's, held by no one

    def no_flock(fd: int, operation: int) -> None:  # an NFS mount without locks: the lease alone
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with conversion_lock(str(sibling), timeout=2) as locked:
        assert locked and lease.exists()
        with pytest.raises(sa3loader.LockTimeoutError), conversion_lock(str(sibling), timeout=0.3):
            pass  # its lease, held here, is waited for
    assert not lease.exists()


@pytest.mark.parametrize("call", ["write", "close"])
def test_a_ctrl_c_as_the_lease_is_made_leaves_no_lease(tmp_path, monkeypatch, call):
    """Ctrl-C lands as the lease file is written (an empty lease is no one's to take over for a
    minute) or just after it is closed, before the lock is held: no lease is left."""
    sibling, lease = _on_a_network_filesystem(tmp_path, monkeypatch)
    real = getattr(os, call)
    interrupted: list[int] = []

    def interrupting(fd: int, *args):
        is_lease = not interrupted and os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == lease.name
        if is_lease and call == "write":
            interrupted.append(fd)
            raise KeyboardInterrupt
        got = real(fd, *args)
        if is_lease:
            interrupted.append(fd)
            raise KeyboardInterrupt
        return got

    monkeypatch.setattr(os, call, interrupting)
    with pytest.raises(KeyboardInterrupt), conversion_lock(str(sibling), timeout=2):
        pass
    monkeypatch.undo()
    assert interrupted and not lease.exists()


def test_an_empty_lease_left_unchanged_is_taken_over_in_seconds(tmp_path, monkeypatch):
    """A holder writes its token the moment it makes the lease: an empty one that stays so was
    made by a creation Ctrl-C cut short (attack: 1,417 of 17,991 interrupts), and is taken."""
    sibling, lease = _on_a_network_filesystem(tmp_path, monkeypatch)
    monkeypatch.setitem(_faults.tunings, "empty_lease_s", 0.3)
    lease.write_bytes(b"")
    with conversion_lock(str(sibling), timeout=10) as locked:
        assert locked and lease.read_text().split(":")[-2] == str(os.getpid())
    assert not lease.exists()


def test_a_lease_whose_refresher_never_started_is_given_back_with_the_interrupt(tmp_path, monkeypatch):
    """Ctrl-C inside the refresher's start, before it ran: the load raises KeyboardInterrupt (not
    RuntimeError from joining a thread never started) and leaves no lease."""
    sibling, lease = _on_a_network_filesystem(tmp_path, monkeypatch)
    real_start = threading.Thread.start

    def start(thread: threading.Thread) -> None:
        if thread.name == "sa3loader-lease":  # its OS thread made, named, not yet run: as a signal
            thread._ident = threading.get_ident()  # noqa: SLF001  lands in start's wait for it
            raise KeyboardInterrupt
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt), conversion_lock(str(sibling), timeout=2):
        pass
    assert not lease.exists()

"""A first load returns before its sibling is published; the publication finishes on a thread
that holds the lock, the process waits for it at exit, and a kill or a failure there heals."""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from support.child import digest
from support.faults import injected
from support.loads import load_toy, make_ckpt, reference_digest
from support.processes import fork_child
from support.toymodel import build

import sa3loader
from sa3loader import _compare, _faults
from sa3loader._format import read_header
from sa3loader._lock import conversion_lock
from sa3loader._publication import HeldUntilPublished

WAIT_S = 30


def lock_is_free(sibling: Path) -> bool:
    try:
        with conversion_lock(str(sibling), timeout=0.2) as locked:
            return locked
    except sa3loader.LockTimeoutError:
        return False


@pytest.fixture
def held_at_fsync(monkeypatch):
    """Holds the publication at its fsync until ``release.set()``; ``reached`` says it got there."""
    reached, release = threading.Event(), threading.Event()

    def hook(name: str, subject: str | None = None) -> None:
        if name == "fsync":
            reached.set()
            assert release.wait(WAIT_S)

    monkeypatch.setattr(_faults, "hook", hook)
    yield reached, release
    release.set()
    assert sa3loader.wait_for_publishing(WAIT_S)


def test_a_first_load_returns_a_correct_model_before_its_sibling_is_published(tmp_path, held_at_fsync):
    reached, release = held_at_fsync
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"

    model = load_toy(ckpt, tmp_path / "cache", published=False)

    info = sa3loader.last_load_info()
    assert info.converted and info.sibling == str(sibling)
    assert digest(model) == reference_digest(ckpt)  # built from the temp file, before any fsync
    assert reached.is_set() and not sibling.exists()
    assert len(list(tmp_path.rglob("*.incomplete-*"))) == 1
    assert not lock_is_free(sibling)  # the publishing thread holds it
    assert not sa3loader.wait_for_publishing(0.1)

    release.set()
    assert sa3loader.wait_for_publishing(WAIT_S)
    assert lock_is_free(sibling) and not list(tmp_path.rglob("*.incomplete-*"))
    _compare.verify(read_header(ckpt), read_header(sibling))
    load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit  # the index row was written too


def test_a_second_load_in_the_same_process_waits_for_the_publication(tmp_path, held_at_fsync):
    _, release = held_at_fsync
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache", published=False)
    threading.Timer(0.5, release.set).start()

    model = load_toy(ckpt, tmp_path / "cache", published=False)  # waits on the lock, then finds it

    info = sa3loader.last_load_info()
    assert not info.converted and info.sibling == str(
        tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    )
    assert digest(model) == reference_digest(ckpt)


def test_a_publication_that_fails_leaves_nothing_and_the_next_load_converts(tmp_path, monkeypatch, caplog):
    ckpt = make_ckpt(tmp_path / "model.safetensors")

    def hook(name: str, subject: str | None = None) -> None:
        if name == "rename":
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(_faults, "hook", hook)
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        model = load_toy(ckpt, tmp_path / "cache", published=False)
        assert sa3loader.wait_for_publishing(WAIT_S)
    assert digest(model) == reference_digest(ckpt)
    assert any("could not publish the fp16 sibling" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()
    assert not list(tmp_path.rglob("*.incomplete-*"))
    monkeypatch.setattr(_faults, "hook", None)

    load_toy(ckpt, tmp_path / "cache", published=False)
    assert sa3loader.last_load_info().converted
    assert sa3loader.wait_for_publishing(WAIT_S)
    assert (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


@pytest.mark.slow
def test_a_process_that_ends_waits_for_its_publication(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    proc = fork_child("load", str(ckpt), str(tmp_path / "cache"), extra_env={"CHILD_SLOW_PUBLISH": "1"})
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and json.loads(out)["converted"]
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert sibling.exists() and lock_is_free(sibling)
    assert not list(tmp_path.rglob("*.incomplete-*"))
    load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit


@pytest.mark.slow
@pytest.mark.parametrize("end", ["kill", "exec"])
def test_a_process_that_ends_while_publishing_leaves_a_sibling_the_next_load_publishes(tmp_path, end):
    """A kill, or a launcher that exec()s the real server after a first load: the publishing
    thread is gone and the whole sibling is in its temp file. The next load publishes it
    (fsync first, then the rename), converting nothing."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    proc = fork_child(f"{end}-publishing", str(ckpt), str(tmp_path / "cache"))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == (-signal.SIGKILL if end == "kill" else 0), err
    assert json.loads(out.splitlines()[0])["digest"] == reference_digest(ckpt)  # the load had returned
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert not sibling.exists() and list(tmp_path.rglob("*.incomplete-written-*"))
    assert lock_is_free(sibling)

    points = []
    with injected(lambda name, subject=None: points.append(name)):
        model = load_toy(ckpt, tmp_path / "cache", published=False)
        assert sa3loader.wait_for_publishing(WAIT_S)
    info = sa3loader.last_load_info()
    assert info.cache_hit and not info.converted and "data" not in points
    assert any(e.startswith("published ") and "previous process" in e for e in info.events)
    assert points.index("fsync") < points.index("rename")
    assert digest(model) == reference_digest(ckpt)
    assert not list(tmp_path.rglob("*.incomplete-*"))
    _compare.verify(read_header(ckpt), read_header(sibling))
    load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit  # and indexed: found again


@pytest.mark.parametrize("why", ["another-boot", "interrupted"])
def test_a_leftover_that_cannot_be_proved_whole_is_converted_again_with_a_warning(tmp_path, caplog, why):
    """A temp file written before a restart (its pages may never have reached the disk), or by a
    conversion killed mid-write: converted again, and the WARNING says why and what to do."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "probe")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    if why == "another-boot":
        leftover = (
            tmp_path
            / ".cache"
            / "sa3loader"
            / f"model.fp16.safetensors.incomplete-written-{'0' * 32}-0-0-1-abcd1234"
        )
        leftover.write_bytes(sibling.read_bytes())
    else:
        leftover = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.incomplete-1-abcd1234"
        leftover.write_bytes(sibling.read_bytes()[:1000])
    sibling.unlink()
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    warnings = [r.getMessage() for r in caplog.records if "ended before publishing" in r.getMessage()]
    advice = "wait_for_publishing()" if why == "another-boot" else "It had not written all of it"
    assert len(warnings) == 1 and advice in warnings[0] and leftover.name in warnings[0]
    assert not leftover.exists() and digest(model) == reference_digest(ckpt)


@pytest.mark.parametrize(
    ("data", "verify"),
    [
        ("as-converted", False),
        ("as-converted", True),
        ("other-at-a-spot", False),
        ("other-off-the-spots", True),
    ],
)
def test_a_leftover_is_published_only_where_it_holds_the_sources_fp16(tmp_path, data, verify):
    """A whole leftover with this source's header: its writer's reads may have seen a value
    written through a mapping into a dirty page and put back since (no time stamped), so its
    header proves nothing of its data. Published where it holds fp16 of the source as it is now
    at the fingerprint's spots, or at every byte with ``verify``; else converted again."""
    from sa3loader._host import boot_id

    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=512)  # attn weights: 3 MiB, spots apart
    load_toy(ckpt, tmp_path / "probe", dim=512)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    header = read_header(sibling)
    entry = header.by_name["blocks.0.attn.weight"]
    at = header.data_start + entry.begin + {"other-at-a-spot": 0, "other-off-the-spots": 200_000}.get(data, 0)
    if data != "as-converted":
        raw[at : at + 2] = b"\x00\x64" if raw[at : at + 2] != b"\x00\x64" else b"\x00\x65"
    leftover = sibling.with_name(f"{sibling.name}.incomplete-written-{boot_id()}-0-0-1-abcd1234")
    leftover.write_bytes(bytes(raw))
    sibling.unlink()
    model = load_toy(ckpt, tmp_path / "cache", dim=512, verify=verify)
    info = sa3loader.last_load_info()
    assert bool(info.converted) == (data != "as-converted"), info.events
    assert any(e.startswith("content check failed") for e in info.events) == bool(info.converted)
    assert digest(model) == reference_digest(ckpt, dim=512)
    assert not leftover.exists()
    _compare.verify(read_header(ckpt), read_header(sibling))


def a_whole_leftover(tmp_path):
    """A checkpoint, and its sibling as a killed conversion left it: written whole, not published."""
    from sa3loader._host import boot_id

    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "probe")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    leftover = sibling.with_name(f"{sibling.name}.incomplete-written-{boot_id()}-0-0-1-abcd1234")
    leftover.write_bytes(sibling.read_bytes())
    sibling.unlink()
    return ckpt, sibling, leftover


def test_a_leftover_cut_short_while_it_is_checked_is_converted_again(tmp_path):
    """Truncated as its spots are read: not the sibling of this source, so converted again
    (never an error that fails the load)."""
    ckpt, sibling, leftover = a_whole_leftover(tmp_path)

    def cut(name, subject=None):
        if name == "spots" and subject == str(sibling) and leftover.exists():
            os.truncate(leftover, 1000)

    with injected(cut):
        model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert digest(model) == reference_digest(ckpt)


def test_a_source_cut_short_while_a_leftover_is_checked_fails_the_load_not_the_leftover(tmp_path):
    """The leftover's check reads the source's spots again; a source truncated then is the load's
    error (the source's, typed), not a fault of the leftover: it stays for the next load, unblamed."""
    ckpt, _, leftover = a_whole_leftover(tmp_path)
    source_reads = []

    def cut(name, subject=None):  # the fingerprint's read, then the leftover check's
        if name == "spots" and subject == str(ckpt):
            source_reads.append(subject)
            if len(source_reads) == 2:
                os.truncate(ckpt, 1000)

    with injected(cut), pytest.raises(sa3loader.errors.TruncatedFileError) as raised:
        load_toy(ckpt, tmp_path / "cache")
    assert raised.value.filename == str(ckpt) and leftover.exists()


def test_a_forked_child_does_not_wait_for_its_parents_publication(tmp_path, held_at_fsync):
    """A server that forks workers after a first load: the publishing thread is the parent's."""
    load_toy(make_ckpt(tmp_path / "model.safetensors"), tmp_path / "cache", published=False)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if sa3loader.wait_for_publishing(2) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not sa3loader.wait_for_publishing(0.1)  # the parent's is still held at its fsync


def test_a_load_of_the_same_checkpoint_inside_the_factory_does_not_wait_on_its_own_lock(
    tmp_path, monkeypatch
):
    """The outer load holds the conversion lock until its model is built; the inner one
    publishes the pending sibling first instead of waiting on that lock."""
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "0")
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    inner = []

    def factory(config):
        if not inner:
            inner.append(load_toy(ckpt, tmp_path / "cache", published=False))
        return build(config)

    model = load_toy(ckpt, tmp_path / "cache", factory=factory, published=False)
    assert digest(model) == digest(inner[0]) == reference_digest(ckpt)
    assert sa3loader.wait_for_publishing(WAIT_S)
    assert (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


def test_a_second_load_with_no_lock_timeout_finds_the_sibling_being_published(
    tmp_path, monkeypatch, held_at_fsync
):
    _, release = held_at_fsync
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "0")
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache", published=False)
    threading.Timer(0.5, release.set).start()
    model = load_toy(ckpt, tmp_path / "cache", published=False)
    assert sa3loader.last_load_info().cache_hit
    assert digest(model) == reference_digest(ckpt)


def test_a_file_saved_at_the_siblings_name_meanwhile_is_left_alone(tmp_path, held_at_fsync, caplog):
    _, release = held_at_fsync
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    load_toy(ckpt, tmp_path / "cache", published=False)
    sibling.write_bytes(b"the user's own export")
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        release.set()
        assert sa3loader.wait_for_publishing(WAIT_S)
    assert sibling.read_bytes() == b"the user's own export"
    assert not list(tmp_path.rglob("*.incomplete-*"))
    assert any("could not publish the fp16 sibling" in r.getMessage() for r in caplog.records)


def test_where_no_thread_can_be_started_the_sibling_is_published_in_the_load(tmp_path, monkeypatch):
    real_start = threading.Thread.start

    def no_new_threads(thread):
        if thread.name == "sa3loader-publish":
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", no_new_threads)
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    model = load_toy(ckpt, tmp_path / "cache", published=False)
    assert digest(model) == reference_digest(ckpt)
    assert (
        tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    ).exists()  # published before the load returned
    assert sa3loader.wait_for_publishing(0)
    assert lock_is_free(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors")


def lock_descriptors(sibling: Path) -> int:
    """How many of this process's descriptors are open on ``sibling``'s lock file."""
    lock = os.stat(str(sibling) + ".lock")
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/self/fd/{fd}")
            count += (st.st_dev, st.st_ino) == (lock.st_dev, lock.st_ino)
    return count


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")
def test_a_forked_child_closes_its_copy_of_the_lock(tmp_path, held_at_fsync):
    """A parent that dies before it publishes must not leave its lock held by a child that lives on."""
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    load_toy(make_ckpt(tmp_path / "model.safetensors"), tmp_path / "cache", published=False)
    assert lock_descriptors(sibling) == 1
    pid = os.fork()
    if pid == 0:
        os._exit(lock_descriptors(sibling))
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert lock_descriptors(sibling) == 1 and not lock_is_free(sibling)  # the parent's is still held


def leftovers(tmp_path: Path) -> list[str]:
    return [p.name for p in tmp_path.rglob("*") if ".incomplete-" in p.name]


@pytest.mark.parametrize("thread_made", [False, True], ids=["before-the-thread", "thread-made"])
def test_a_ctrl_c_inside_the_publishers_start_still_publishes_once(tmp_path, monkeypatch, thread_made):
    """Ctrl-C lands in ``Thread.start`` of the publisher (where CPython acts on a pending signal):
    the thread may run or not. Once waited for, the sibling is published, once; the next load of
    the process hits it instead of waiting for ever on a publication no one runs (an attack)."""
    ckpt = make_ckpt(tmp_path / "m" / "model.safetensors")
    real_start = threading.Thread.start
    interrupted: list[str] = []

    def start(thread: threading.Thread) -> None:
        if thread.name == "sa3loader-publish" and not interrupted:
            interrupted.append(thread.name)
            if thread_made:
                real_start(thread)
            raise KeyboardInterrupt
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(KeyboardInterrupt):
        load_toy(ckpt, tmp_path / "cache", published=False)
    assert interrupted and sa3loader.wait_for_publishing(WAIT_S)
    model = load_toy(ckpt, tmp_path / "cache", published=False)
    assert sa3loader.last_load_info().cache_hit and digest(model) == reference_digest(ckpt)
    assert leftovers(tmp_path) == []


def test_a_ctrl_c_as_the_lock_is_handed_to_the_publication_releases_it(tmp_path, monkeypatch):
    """Ctrl-C inside the publication's constructor, the lock and the temp file already taken from
    the load: they are released and removed, or the next load here waits on its own lock."""
    ckpt = make_ckpt(tmp_path / "m" / "model.safetensors")
    real_fstat = os.fstat
    interrupted: list[int] = []

    def fstat(fd):
        frame = sys._getframe(1)
        while frame is not None and "publish" not in frame.f_locals:
            frame = frame.f_back
        if frame is not None and frame.f_code.co_name == "__init__" and not interrupted:
            interrupted.append(fd)  # the publication's look at the temp file's descriptor
            raise KeyboardInterrupt
        return real_fstat(fd)

    monkeypatch.setattr(os, "fstat", fstat)
    with pytest.raises(KeyboardInterrupt):
        load_toy(ckpt, tmp_path / "cache", published=False)
    monkeypatch.undo()
    assert interrupted
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "5")
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted and digest(model) == reference_digest(ckpt)
    assert leftovers(tmp_path) == []


FORKS_AND_ENDS = """
import os, sys, threading
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import sa3loader
from sa3loader import _faults
from support.loads import load_toy, make_ckpt
tmp = Path(sys.argv[1])
reached, release = threading.Event(), threading.Event()
def hook(name, subject=None):
    if name == "fsync":
        reached.set()
        release.wait(60)
_faults.hook = hook
load_toy(make_ckpt(tmp / "model.safetensors"), tmp / "cache", published=False)
assert reached.wait(60)
pid = os.fork()
if pid:
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    release.set()
    assert sa3loader.wait_for_publishing(60)
    print("published" if (tmp / ".cache" / "sa3loader" / "model.fp16.safetensors").exists() else "gone")
# the child returns: the interpreter ends normally, freeing what it holds (the parent's publication)
"""


def test_a_forked_child_that_ends_normally_leaves_its_parents_publication_alone(tmp_path):
    """A worker forked while its parent publishes, ending as a Python program does (its objects
    freed): the parent's lock and temp file, copied into the child, are not the child's to close
    or remove. In a new process: pytest's own exit is not the child's."""
    tests = str(Path(__file__).parent)
    command = [sys.executable, "-c", FORKS_AND_ENDS, str(tmp_path), tests]
    child = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert child.returncode == 0 and child.stdout.strip() == "published", child.stdout + child.stderr[-2000:]


def test_a_forked_childs_copy_of_a_dropped_hold_is_the_parents_to_close(tmp_path):
    """``HeldUntilPublished`` closes itself when dropped, in its own process only: a forked child
    that frees its copy leaves the parent's lock held and its temp file in place."""
    sibling, temp = tmp_path / "model.fp16.safetensors", tmp_path / "model.incomplete"
    temp.write_bytes(b"half-written")
    held = HeldUntilPublished()
    assert held.enter_context(conversion_lock(str(sibling), timeout=5))
    held.callback(temp.unlink)
    pid = os.fork()
    if pid == 0:  # the child's only reference: freed here, at once
        del held
        gc.collect()
        os._exit(0)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert temp.exists() and not lock_is_free(sibling)
    del held  # the parent's own drop closes it
    gc.collect()
    assert not temp.exists() and lock_is_free(sibling)

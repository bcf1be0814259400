"""A conversion casts float32 straight from a mapping of the source only under a read lease
(``_source_reads``): the same bytes as reading it; a writer that opens the file meanwhile waits
for a stripe, not the conversion, and its truncation never kills the process (SIGBUS), the load
failing with a typed error instead; where the lease cannot be had or its break could hurt
(someone has the file open for writing, SIGURG caught, a short lease-break-time, not the
file's owner), every byte is read."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.faults import faked, mounted, tuned
from support.processes import child_env

from sa3loader import _convert, _source_reads
from sa3loader._format import open_header

pytestmark = pytest.mark.skipif(
    not hasattr(fcntl, "F_SETLEASE"), reason="read leases are Linux's (F_SETLEASE)"
)

SMALL = {"piece_elements": 1024, "stripe_bytes": 8192}  # many stripes from a small file


@pytest.fixture
def leasable(tmp_path):
    """A read lease can be had here (the owner, a local filesystem, leases on, breaks slow enough)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    fd = os.open(probe, os.O_RDONLY)
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
    except OSError as exc:
        pytest.skip(f"no read lease on {tmp_path} ({exc.strerror})")
    finally:
        os.close(fd)
    if _source_reads._break_seconds() < _source_reads.MIN_BREAK_SECONDS:
        pytest.skip(f"/proc/sys/fs/lease-break-time is under {_source_reads.MIN_BREAK_SECONDS} s here")


def checkpoint(path: Path) -> Path:
    torch.manual_seed(0)
    tensors = {f"w{i}": torch.randn(64, 257) for i in range(6)}
    tensors["ids"] = torch.arange(99, dtype=torch.int64)
    tensors["tiny"] = torch.full((5,), 1e-9)  # flushed by the cast: counted either way
    save_file(tensors, str(path))
    return path


def bytes_read() -> int:
    """What this process's read calls returned so far (a mapping's page faults are not reads)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def converted(src: Path, dest: Path, io: str | None = None) -> tuple[bytes, tuple[int, int], int]:
    """The sibling's bytes, its range counts, and how many bytes the conversion read."""
    before = bytes_read()
    with open_header(src) as header:
        result = _convert.convert(header, str(dest), {}, io=io)
    read = bytes_read() - before
    return dest.read_bytes(), (result.overflow_to_inf, result.flushed_to_zero), read


def test_a_leased_conversion_reads_float32_from_the_mapping_and_writes_what_reading_writes(
    tmp_path, leasable
):
    src = checkpoint(tmp_path / "model.safetensors")
    with tuned(**SMALL):
        mapped, mapped_counts, mapped_read = converted(src, tmp_path / "mapped.safetensors")
        with faked(source_lease=lambda path, real: False):
            read, read_counts, all_read = converted(src, tmp_path / "read.safetensors")
    assert mapped == read and mapped_counts == read_counts == (0, 5)
    assert all_read >= FLOAT32_BYTES > mapped_read  # float32 came from the mapping, not read calls


FLOAT32_BYTES = 6 * 64 * 257 * 4


def test_no_lease_while_someone_has_the_file_open_for_writing_or_sigurg_is_caught(tmp_path):
    src = checkpoint(tmp_path / "model.safetensors")
    expected = converted(src, tmp_path / "plain.safetensors")[0]
    with open(src, "r+b"):  # the kernel refuses the lease (EAGAIN)
        data, _, read = converted(src, tmp_path / "open.safetensors")
    assert data == expected and read >= FLOAT32_BYTES
    previous = signal.signal(signal.SIGURG, lambda *args: None)  # a break would call it
    try:
        data, _, read = converted(src, tmp_path / "caught.safetensors")
    finally:
        signal.signal(signal.SIGURG, previous)
    assert data == expected and read >= FLOAT32_BYTES


def test_io_read_maps_no_file_the_source_included(tmp_path, leasable, monkeypatch):
    """``io="read"`` (or $SA3LOADER_IO=read, which ``convert`` follows) is for where mappings
    are unreliable: the conversion reads its source too."""
    src = checkpoint(tmp_path / "model.safetensors")
    assert converted(src, tmp_path / "argument.safetensors", io="read")[2] >= FLOAT32_BYTES
    assert converted(src, tmp_path / "mapped.safetensors")[2] < FLOAT32_BYTES
    monkeypatch.setenv("SA3LOADER_IO", "read")
    assert converted(src, tmp_path / "env.safetensors")[2] >= FLOAT32_BYTES


def test_no_lease_on_an_overlay_another_users_file_or_with_sigurg_caught_in_c(tmp_path, leasable):
    """An overlay's lease is on its own inode while the mapping is a layer's (a write to the
    layer would not wait); root may lease another user's file, whose writers would then wait
    on it; a handler set in C (a native library's) is not one ``signal.getsignal`` sees."""
    src = checkpoint(tmp_path / "model.safetensors")
    assert converted(src, tmp_path / "ext4.safetensors")[2] < FLOAT32_BYTES  # else nothing is tested
    with mounted(tmp_path / "mounts", {tmp_path: "overlay rw,lowerdir=/a,upperdir=/b"}):
        assert converted(src, tmp_path / "overlay.safetensors")[2] >= FLOAT32_BYTES
    libc = ctypes.CDLL(None, use_errno=True)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.signal(signal.SIGURG, ctypes.cast(libc.getpid, ctypes.c_void_p))  # never called: no break
    try:
        assert converted(src, tmp_path / "c-handler.safetensors")[2] >= FLOAT32_BYTES
    finally:
        libc.signal(signal.SIGURG, 0)  # SIG_DFL
    if os.geteuid() == 0:  # root could lease a file of nobody's
        os.chown(src, 65534, 65534)
        assert converted(src, tmp_path / "theirs.safetensors")[2] >= FLOAT32_BYTES


def test_no_lease_when_the_kernel_would_end_a_break_sooner_than_a_stripe_is_sure_to_take(tmp_path, leasable):
    src = checkpoint(tmp_path / "model.safetensors")
    assert converted(src, tmp_path / "default.safetensors")[2] < FLOAT32_BYTES
    with faked(lease_break_seconds=lambda subject, real: _source_reads.MIN_BREAK_SECONDS - 1):
        assert converted(src, tmp_path / "short.safetensors")[2] >= FLOAT32_BYTES


WRITER = r"""
import fcntl, os, sys, threading, time
from support.faults import set_hook
from sa3loader import _convert, _faults, Sa3LoaderError
from sa3loader._format import open_header

src, dest, action = sys.argv[1:4]

def breaking(path):
    inode = f":{os.stat(path).st_ino} "
    return any("BREAKING" in line and inode in line for line in open("/proc/locks"))
_faults.tunings.update({"piece_elements": 1024, "stripe_bytes": 8192})
_convert.WORKERS = 2
opened, go, done, taken = threading.Event(), threading.Event(), threading.Event(), []

def writer():
    fd = os.open(src, os.O_RDWR)  # breaks the lease: waits until it is given back
    opened.set()
    go.wait(20)
    if action == "truncate":
        os.ftruncate(fd, 0)
        os.write(fd, b"not a checkpoint any more")
    os.close(fd)
    done.set()

def hook(name, subject=None):
    if name != "stripe":
        return
    taken.append(1)
    if len(taken) == 3:  # the writer asks for the file; go on once the break is pending
        threading.Thread(target=writer).start()
        deadline = time.monotonic() + 20
        while not breaking(src) and time.monotonic() < deadline:
            time.sleep(0.001)
    elif len(taken) == 4:  # a stripe later: the conversion gave the lease back, the writer has the file
        print("writer opened mid-conversion:", opened.wait(20), flush=True)
        go.set()
        done.wait(20)  # its write lands mid-conversion, however busy the machine

set_hook(hook)
try:
    with open_header(src) as header:
        _convert.convert(header, dest, {})
    print("converted", flush=True)
except Sa3LoaderError as exc:
    print("typed error:", type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize("action", ["open", "truncate"])
def test_a_writer_waits_for_a_stripe_and_its_truncation_is_a_typed_error_never_sigbus(
    tmp_path, leasable, action
):
    """Run in a child: a SIGBUS would end it by signal. The writer opens the file for writing at
    the third stripe (the lease breaks); by the fourth it has the file: the conversion gave the
    lease back, not at its end. A writer that only opened changes nothing: converted. One that
    truncates and writes then: the conversion reads on with ``pread`` and fails, typed."""
    src = checkpoint(tmp_path / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, "-c", WRITER, str(src), str(tmp_path / "out.safetensors"), action],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert "writer opened mid-conversion: True" in proc.stdout
    outcome = "converted" if action == "open" else "typed error:"
    assert outcome in proc.stdout, proc.stdout + proc.stderr


FORKED = r"""
import os, signal, subprocess, sys, threading, time
from support.faults import set_hook
from sa3loader import _convert, _faults
from sa3loader._format import open_header

src, dest, pidfile, when = sys.argv[1:5]
_faults.tunings.update({"piece_elements": 1024, "stripe_bytes": 8192})
taken, forked = [], threading.Event()
mine = os.open(src, os.O_RDONLY)  # the program's own descriptor of the checkpoint

def fork_a_child():  # from a thread other than the main one: the child lives on
    pid = os.fork()
    if pid == 0:
        with open(pidfile + ".mine", "w") as f:
            f.write(os.readlink(f"/proc/self/fd/{mine}"))
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)
        os.dup2(null, 2)  # the test reads the parent's output to its end
        time.sleep(120)
        os._exit(0)
    with open(pidfile, "w") as f:
        f.write(str(pid))
    forked.set()

def breaking(path):
    inode = f":{os.stat(path).st_ino} "
    return any("BREAKING" in line and inode in line for line in open("/proc/locks"))

def hook(name, subject=None):
    if name == "convert" and when == "before":  # the load's descriptor is open, no lease yet
        threading.Thread(target=fork_a_child).start()
        forked.wait(20)
    if name != "stripe":
        return
    taken.append(1)
    if len(taken) == 3 and when == "mid":
        fork_a_child()
    if len(taken) == 3 and when == "breaking":  # a writer waits on the lease, no stripe begins
        writer = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.open({src!r}, os.O_WRONLY)"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,  # the test reads ours to the end
        )
        with open(pidfile + ".writer", "w") as f:
            f.write(str(writer.pid))
        deadline = time.monotonic() + 20
        while not breaking(src) and time.monotonic() < deadline:
            time.sleep(0.001)
        fork_a_child()
        os.kill(os.getpid(), signal.SIGKILL)
    if len(taken) == 4 and when == "breaking":
        time.sleep(30)  # the other worker: no stripe of its own would give the lease back
    if len(taken) == 5:
        forked.wait(20)
        os.kill(os.getpid(), signal.SIGKILL)

set_hook(hook)
with open_header(src) as header:
    _convert.convert(header, dest, {})
"""


@pytest.mark.parametrize("when", ["before", "mid", "breaking"])
def test_a_child_forked_during_a_conversion_keeps_no_lease_once_the_converter_is_killed(
    tmp_path, leasable, when
):
    """A lease belongs to an open file, which a child's copy keeps open: after the converting
    process died a writer would wait the whole lease-break-time (an O_NONBLOCK one fails with
    EAGAIN at once, which this test asks). Forked before the lease was taken, while it is
    held, or while a writer waits on it. The program's own descriptor of the checkpoint stays
    what it was in the child."""
    src = checkpoint(tmp_path / "model.safetensors")
    pidfile = tmp_path / "child.pid"
    proc = subprocess.run(
        [sys.executable, "-c", FORKED, str(src), str(tmp_path / "out.safetensors"), str(pidfile), when],
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    child = int(pidfile.read_text())
    writer = Path(f"{pidfile}.writer")
    try:
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        assert Path(f"{pidfile}.mine").read_text() == str(src)  # not pointed at /dev/null
        os.kill(child, 0)  # the child is alive
        fd = os.open(src, os.O_WRONLY | os.O_NONBLOCK)  # BlockingIOError while a lease is held
        os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        if writer.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(writer.read_text()), signal.SIGKILL)


def test_the_lease_is_given_back_and_the_signal_reset_when_the_conversion_ends(tmp_path, leasable):
    src = checkpoint(tmp_path / "model.safetensors")
    with open_header(src) as header:
        fd = header.handle.fileno()
        _convert.convert(header, str(tmp_path / "out.safetensors"), {})
        assert fcntl.fcntl(fd, fcntl.F_GETLEASE) == fcntl.F_UNLCK
        assert fcntl.fcntl(fd, fcntl.F_GETSIG) == 0

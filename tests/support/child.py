"""Subprocess entry points for the concurrency and crash tests.

python -m support.child load CKPT CACHE            -> prints {"converted", "cache_hit", "digest"}
python -m support.child kill-at PHASE CKPT CACHE   -> SIGKILLs itself when conversion reaches PHASE
python -m support.child kill-after N CKPT CACHE    -> SIGKILLs itself once conversion has written
                                                      (or, mapped, taken stripes of) N bytes
python -m support.child kill-publishing CKPT CACHE -> prints the load's result, then SIGKILLs itself
                                                      while the sibling is being published
python -m support.child republish CKPT N           -> rewrites the published sibling N times
python -m support.child interrupt-mid-write CKPT OUT -> Ctrl-C while every worker is mid-stripe; prints
                                                      what ran after the KeyboardInterrupt was raised

(with ``PYTHONPATH=tests``; ``support.processes`` starts them).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import torch

import sa3loader
from sa3loader import _convert, _faults
from sa3loader._format import read_header
from sa3loader._places import beside_path
from support.faults import fake_mount_table, set_hook
from support.siblings import resolve_sibling
from support.toymodel import build


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in list(model.state_dict().items()) + list(model.named_buffers()):
        t = value.detach().contiguous().reshape(-1)
        h.update(f"{key}:{t.dtype}:{tuple(value.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load(ckpt: str, cache: str) -> dict:
    torch.manual_seed(0)
    config = {"dim": int(os.environ.get("TOY_DIM", "32"))}
    model = sa3loader.load_diffusion_cond(config, ckpt, "cpu", True, cache_dir=cache, model_factory=build)
    info = sa3loader.last_load_info()
    return {"converted": info.converted, "cache_hit": info.cache_hit, "digest": digest(model)}


def cmd_load(ckpt: str, cache: str) -> None:
    # Hold a phase open: the conversion's, so loaders overlap; the publication's, so
    # the process ends while its sibling is still being published.
    slow = {"data": os.environ.get("CHILD_SLOW_CONVERT"), "fsync": os.environ.get("CHILD_SLOW_PUBLISH")}
    set_hook(lambda name, subject=None: time.sleep(float(slow[name])) if slow.get(name) else None)
    print(json.dumps(load(ckpt, cache)), flush=True)


def cmd_kill_publishing(ckpt: str, cache: str) -> None:
    returned = threading.Event()

    def hook(name: str, subject: str | None = None) -> None:
        if name == "fsync":  # on the publishing thread, once the load has returned
            returned.wait()
            os.kill(os.getpid(), signal.SIGKILL)

    set_hook(hook)
    print(json.dumps(load(ckpt, cache)), flush=True)
    returned.set()
    time.sleep(60)  # killed long before


def cmd_exec_publishing(ckpt: str, cache: str) -> None:
    """A launcher: load (converting), then exec the real program while the sibling is still
    being published; the publishing thread dies with the old program."""
    reached = threading.Event()

    def hook(name: str, subject: str | None = None) -> None:
        if name == "fsync":
            reached.set()
            time.sleep(60)

    set_hook(hook)
    print(json.dumps(load(ckpt, cache)), flush=True)
    assert reached.wait(60)
    os.execv(sys.executable, [sys.executable, "-c", "print('exec')"])


def cmd_kill_at(phase: str, ckpt: str, cache: str) -> None:
    def hook(name: str, subject: str | None = None) -> None:
        if name == phase:
            os.kill(os.getpid(), signal.SIGKILL)

    set_hook(hook)
    load(ckpt, cache)


KILL_STRIPE_BYTES = 64 << 10  # many stripes in a small file: kills all along it


def cmd_kill_after(limit: str, ckpt: str, cache: str) -> None:
    written = [0]
    real_pwrite = os.pwrite

    def counted(n: int) -> int:
        written[0] += n  # workers race here: a kill a few bytes late is still a kill mid-write
        if written[0] >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)
        return n

    # The converter's writers: pwrite for the header (and every stripe where the new file is
    # not mapped); a stripe a worker takes, for its bytes, where it is cast into the mapping.
    os.pwrite = lambda fd, data, offset: counted(real_pwrite(fd, data, offset))
    _faults.tunings["stripe_bytes"] = KILL_STRIPE_BYTES
    set_hook(lambda name, subject=None: counted(KILL_STRIPE_BYTES) if name == "stripe" else None)
    resolve_sibling(read_header(ckpt), cache)


def cmd_interrupt_mid_write(ckpt: str, out: str) -> None:
    """The first worker at a stripe sends Ctrl-C; each then waits 0.3 s before writing its stripe,
    so the KeyboardInterrupt reaches the main thread while every worker is mid-stripe."""
    raised_at: list[float] = []
    after: list[str] = []
    interrupt = threading.Lock()

    def hook(name: str, subject: str | None = None) -> None:
        if name != "stripe" or raised_at:
            return
        if interrupt.acquire(blocking=False):
            os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        if raised_at:  # the load has returned: nothing may run on for it now
            after.append(threading.current_thread().name)

    set_hook(hook)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, started however
    _faults.tunings["stripe_bytes"] = KILL_STRIPE_BYTES
    if os.environ.get("CHILD_WRITE_WITH_PWRITE"):
        _faults.facts["writes_in_place"] = lambda subject, real: False
    try:
        _convert.convert(read_header(ckpt), out, {}, read_only=True)
    except KeyboardInterrupt:
        raised_at.append(time.monotonic())
    time.sleep(0.6)  # a worker left running would cast into the closed mapping now
    alive = [t.name for t in threading.enumerate() if t.name == "sa3loader-convert"]
    folder = Path(out).parent
    print(
        json.dumps(
            {
                "interrupted": bool(raised_at),
                "ran_after": after,
                "alive": alive,
                "left": sorted(p.name for p in folder.iterdir() if ".incomplete" in p.name),
            }
        )
    )


def cmd_republish(ckpt: str, count: str) -> None:
    header = read_header(ckpt)
    sibling = read_header(beside_path(ckpt))
    metadata = dict(sibling.metadata)
    print("ready", flush=True)
    for _ in range(int(count)):
        _convert.convert(header, sibling.path, metadata)


def fake_network_filesystem_without_flock(directory: str) -> None:
    """As on an NFS mount whose flock does not reach other hosts: every lock "succeeds"."""
    import fcntl
    import tempfile

    table = Path(tempfile.mkdtemp()) / "mountinfo"
    _faults.tunings["mount_table"] = str(fake_mount_table(table, {directory: "nfs4"}))
    fcntl.flock = lambda fd, op: None  # this process's OS, faked: it lives only for the test


def cmd_fork_while_converting(ckpt: str, cache: str, marker: str) -> None:
    """A pre-fork server: a thread converts (held mid-write) while the main thread forks a
    worker, whose pid goes to ``marker``; the test then kills this process."""
    converting = threading.Event()

    def hook(name: str, subject: str | None = None) -> None:
        if name == "data":
            converting.set()
            time.sleep(3600)

    set_hook(hook)
    threading.Thread(target=load, args=(ckpt, cache), daemon=True).start()
    assert converting.wait(60)
    pid = os.fork()
    if pid == 0:
        time.sleep(120)  # a worker that lives on
        os._exit(0)
    Path(marker).write_text(str(pid))
    time.sleep(3600)


COMMANDS = {
    "fork-while-converting": cmd_fork_while_converting,
    "load": cmd_load,
    "kill-at": cmd_kill_at,
    "kill-publishing": cmd_kill_publishing,
    "exec-publishing": cmd_exec_publishing,
    "kill-after": cmd_kill_after,
    "interrupt-mid-write": cmd_interrupt_mid_write,
    "republish": cmd_republish,
}


if __name__ == "__main__":
    if os.environ.get("CHILD_LOG_LEVEL"):  # what a service's log would show, on stderr
        import logging

        logging.basicConfig(level=os.environ["CHILD_LOG_LEVEL"], format="%(levelname)s %(name)s: %(message)s")
    if os.environ.get("CHILD_FAKE_NFS"):
        fake_network_filesystem_without_flock(os.environ["CHILD_FAKE_NFS"])
    COMMANDS[sys.argv[1]](*sys.argv[2:])

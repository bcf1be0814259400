"""The one way tests reach inside sa3loader: its seam, ``sa3loader._faults``.

- ``injected(hook)``: ``hook(name, subject)`` runs at every fault point reached in the block
  (``at(point, action)`` makes one that acts at one point);
- ``faked(**facts)``: each ``fact(subject, real)`` answers in place of the OS;
- ``tuned(**sizes)``: smaller sizes, to reach a case cheaply;
- ``mounted(table, {dir: fstype})``: a mount table in which each dir is of its type.

No test replaces a name inside the package; patching ``os``, ``fcntl``, ``mmap``,
``threading`` or torch itself is fine where a fault is the OS's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sa3loader import _faults

Hook = Callable[[str, "str | None"], object]


def set_hook(hook: Hook | None) -> None:
    """For a child process that lives only for the test: the hook stays set."""
    _faults.hook = hook  # type: ignore[assignment]


@contextlib.contextmanager
def injected(hook: Hook) -> Iterator[None]:
    """``hook(name, subject)`` runs at every fault point reached inside the block (then any hook
    set outside it)."""
    saved = _faults.hook

    def both(name: str, subject: str | None) -> None:
        hook(name, subject)
        if saved is not None:
            saved(name, subject)

    _faults.hook = both
    try:
        yield
    finally:
        _faults.hook = saved


def at(point: str, action: Callable[[], object]) -> Hook:
    """A hook that runs ``action`` at ``point`` only."""
    return lambda name, subject=None: action() if name == point else None


def recorded(points: list[tuple[str, str | None]]) -> Hook:
    """A hook that appends every (point, subject) reached to ``points``."""
    return lambda name, subject=None: points.append((name, subject))


@contextlib.contextmanager
def _set(table: dict[str, Any], values: dict[str, Any]) -> Iterator[None]:
    saved = dict(table)
    table.update(values)
    try:
        yield
    finally:
        table.clear()
        table.update(saved)


def faked(**facts: Callable[[Any, Any], Any]) -> contextlib.AbstractContextManager[None]:
    """Inside the block, ``facts[name](subject, real)`` is what the OS said."""
    return _set(_faults.facts, facts)


def tuned(**sizes: Any) -> contextlib.AbstractContextManager[None]:
    """Inside the block, these sizes replace sa3loader's (``piece_elements=7``, ...)."""
    return _set(_faults.tunings, sizes)


def fake_mount_table(table: Path, mounts: dict[Path | str, str]) -> Path:
    """Write a mount table at ``table``: ``/`` on ext4, and each of ``mounts`` (a directory and
    its filesystem type) mounted there, as ``/proc/self/mountinfo`` lays it out. A type may say
    more: ``ext4@7:3`` on that device, ``btrfs@/dev/loop3`` from that source, ``ext4 ro`` a
    read-only filesystem, ``overlay rw,lowerdir=/a:/b`` an overlay on those dirs."""
    lines = ["22 1 0:21 / / rw,relatime - ext4 /dev/vda rw"]
    for i, (point, described) in enumerate(mounts.items()):
        escaped = str(point).replace("\\", "\\134").replace(" ", "\\040")
        typed, _, options = described.partition(" ")
        fstype, _, device = typed.partition("@")
        source = device if device.startswith("/dev/") else "server:/x"
        device = device if device and source == "server:/x" else f"0:{50 + i}"
        lines.append(f"{90 + i} 22 {device} / {escaped} rw shared:1 - {fstype} {source} {options or 'rw'}")
    table.write_text("\n".join(lines) + "\n")
    return table


def mounted(table: Path, mounts: dict[Path | str, str]) -> contextlib.AbstractContextManager[None]:
    """Inside the block, sa3loader reads a mount table in which each of ``mounts`` is of its type."""
    return tuned(mount_table=str(fake_mount_table(table, mounts)))


def thread_starts_refused(name: str | None, after: int) -> Callable[[threading.Thread], None]:
    """A ``threading.Thread.start`` as under a pids limit: threads named ``name`` (None: any
    thread) past the first ``after`` cannot be started (the OS's fault, patched on ``threading``)."""
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start(thread: threading.Thread) -> None:
        if name in (None, thread.name) and len(started) >= after:
            raise RuntimeError("can't start new thread")
        started.append(thread)
        real_start(thread)

    return start


def interrupt_main_thread(after: float, times: int, gap: float) -> threading.Thread:
    """Ctrl-C ``times`` times, ``gap`` seconds apart, ``after`` seconds from now (SIGINT to this
    process: the main thread raises KeyboardInterrupt where it is; ``ctrl_c_raises``)."""

    def send() -> None:
        time.sleep(after)
        for _ in range(times):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(gap)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    return sender


def sent_all(sender: threading.Thread) -> None:
    """Wait for the last signal, absorbing any that the code under test let through (a failure shown by
    the test's asserts, not a KeyboardInterrupt that stops the whole run)."""
    while sender.is_alive():
        try:
            sender.join(0.01)
        except KeyboardInterrupt:
            pass
    try:
        time.sleep(0.05)  # a signal still in flight lands here
    except KeyboardInterrupt:
        pass

"""The one way tests reach inside a load: sa3loader's named fault points (``sa3loader._faults``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

from sa3loader import _faults


def set_hook(hook: Callable[[str], None] | None) -> None:
    """For a child process that lives only for the test: the hook stays set."""
    _faults.hook = hook


@contextlib.contextmanager
def injected(hook: Callable[[str], None]) -> Iterator[None]:
    """``hook(name)`` runs at every fault point reached inside the block."""
    saved = _faults.hook
    _faults.hook = hook
    try:
        yield
    finally:
        _faults.hook = saved


def at(point: str, action: Callable[[], object]) -> Callable[[str], None]:
    """A hook that runs ``action`` at ``point`` only."""
    return lambda name: action() if name == point else None


def fake_mount_table(table: Path, mounts: dict[Path | str, str]) -> Path:
    """Write a mount table at ``table``: ``/`` on ext4, and each of ``mounts`` (a directory and
    its filesystem type) mounted there, as ``/proc/self/mountinfo`` lays it out."""
    lines = ["22 1 0:21 / / rw,relatime - ext4 /dev/vda rw"]
    for i, (point, fstype) in enumerate(mounts.items()):
        escaped = str(point).replace("\\", "\\134").replace(" ", "\\040")
        lines.append(f"{90 + i} 22 0:{50 + i} / {escaped} rw,relatime shared:1 - {fstype} server:/x rw")
    table.write_text("\n".join(lines) + "\n")
    return table


@contextlib.contextmanager
def mounted(table: Path, mounts: dict[Path | str, str]) -> Iterator[None]:
    """Inside the block, sa3loader reads a mount table in which each of ``mounts`` is of its type."""
    saved = _faults.MOUNT_TABLE
    _faults.MOUNT_TABLE = str(fake_mount_table(table, mounts))
    try:
        yield
    finally:
        _faults.MOUNT_TABLE = saved

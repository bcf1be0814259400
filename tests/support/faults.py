"""The one way tests reach inside a load: sa3loader's named fault points (``sa3loader._faults``)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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

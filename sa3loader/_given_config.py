"""The config a second build gets after a refused fast one: the one given, as it came.

The fast attempt runs the factory first; a factory that changes its config (``pop`` of the
keys it handles) would leave the second run a config upstream's single run never saw: a
KeyError, or another model. Containers (``dict``, ``OrderedDict``, ``list``, ``tuple``) are
copied ``DEPTH`` levels down, every other object kept as itself (a ``torch.dtype``, a path, a
class of the user's): what a factory changes inside such an object is not seen.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

DEPTH = 32  # deeper (or a container that holds itself): kept as itself from there on
_MAPPINGS = (dict, OrderedDict)
_SEQUENCES = (list, tuple)


def snapshot(config: Any, depth: int = DEPTH) -> Any:
    """``config``'s containers copied (their own classes only: a subclass may construct
    otherwise), holding the very same keys and leaf objects."""
    kind = type(config)
    if depth == 0:
        return config
    if kind in _MAPPINGS:
        return kind((key, snapshot(value, depth - 1)) for key, value in config.items())
    if kind in _SEQUENCES:
        return kind(snapshot(value, depth - 1) for value in config)
    return config


def unchanged(config: Any, taken: Any, depth: int = DEPTH) -> bool:
    """Whether ``config`` is as it was when ``taken`` was its ``snapshot``: containers of the same
    classes, the same key objects in the same order, the same objects at the leaves. By identity,
    not ``==``: equal is not the same to a factory (``1`` and ``True``, another key order)."""
    kind = type(taken)
    if depth == 0 or kind not in _MAPPINGS + _SEQUENCES:
        return config is taken
    if type(config) is not kind or len(config) != len(taken):
        return False
    if kind in _MAPPINGS:
        if any(a is not b for a, b in zip(config, taken, strict=True)):
            return False
        config, taken = list(config.values()), list(taken.values())
    return all(unchanged(a, b, depth - 1) for a, b in zip(config, taken, strict=True))

"""The config a second build gets after a refused fast one: the caller's own, as it came.

The fast attempt runs the factory first; a factory that changes its config (``pop`` of the
keys it handles, a value it writes back) would leave the second run a config upstream's single
run never saw: a KeyError, or another model. ``Snapshot`` keeps the contents of every container
the config reaches (dicts, lists, sets; tuples are walked), each once however often it is
reached (a dict shared by two keys, one that holds itself), and puts them back in place: the
second run gets the caller's very objects, and leaves them as upstream's run would. What a
factory changes inside any other object (a dataclass, a class of the user's) is not seen.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from typing import Any

# Containers put back in place: their own ``clear``/``update``/slice assignment, as the builtins'.
_MAPPINGS = (dict, OrderedDict, defaultdict)
_LISTS = (list,)
_SETS = (set,)


def _contents(container: Any) -> list[Any]:
    """What ``container`` holds, as objects: (key, value) pairs of a mapping, in order."""
    return list(container.items()) if type(container) in _MAPPINGS else list(container)


def _walked(value: Any) -> bool:
    return type(value) in _MAPPINGS + _LISTS + _SETS or isinstance(value, tuple)


class Snapshot:
    """Every container ``config`` reaches, with what it held when taken."""

    def __init__(self, config: Any) -> None:
        self._held: dict[int, tuple[Any, list[Any]]] = {}  # id -> (container, its contents)
        pending = [config]
        while pending:  # not recursive: any depth, any cycle
            value = pending.pop()
            if not _walked(value) or id(value) in self._held:
                continue
            contents = _contents(value)
            self._held[id(value)] = (value, contents)
            for item in contents:
                pending.extend(item if type(value) in _MAPPINGS else (item,))

    def changed(self) -> bool:
        """Whether any container holds other objects now, or the same in another order (by
        identity, not ``==``: equal is not the same to a factory, ``1`` and ``True``)."""
        return any(_changed(container, contents) for container, contents in self._held.values())

    def put_back(self) -> None:
        """Every container that changed, as it was taken, in place (a tuple cannot change; a
        set gets its members back, its order then Python's)."""
        for container, contents in self._held.values():
            if not _changed(container, contents):
                continue
            if type(container) in _LISTS:
                container[:] = contents
            else:
                container.clear()
                container.update(contents)


def _changed(container: Any, contents: list[Any]) -> bool:
    now = _contents(container)
    if type(container) in _SETS:  # its order is the hash table's: the members tell
        return {id(x) for x in now} != {id(x) for x in contents}
    if type(container) in _MAPPINGS:  # (key, value) pairs made anew by ``items``
        now, contents = [x for pair in now for x in pair], [x for pair in contents for x in pair]
    return len(now) != len(contents) or any(a is not b for a, b in zip(now, contents, strict=True))

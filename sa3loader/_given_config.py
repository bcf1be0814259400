"""The config a second build gets after a refused fast one: the caller's own, as it came.

The fast attempt runs the factory first; a factory that changes its config (``pop`` of the
keys it handles, a value it writes back) would leave the second run a config upstream's single
run never saw: a KeyError, or another model. ``Snapshot`` keeps the contents of every dict,
list and set the config reaches (subclasses too, with their attributes: an EasyDict mirrors
its keys there; tuples are walked), each once however often it is reached (a dict shared by
two keys, one that holds itself), and puts back in place those that changed: the second
run gets the caller's very objects, and leaves them as upstream's run would. Through the
builtins' own methods (a subclass's ``update`` may convert what it is given). A set gets its
members back, in the order its new table gives. Not seen: what changes inside any other
object (a deque, a dataclass, a class of the user's).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any


def _mapping(container: dict) -> type[dict]:
    """Whose methods read and write ``container``: an OrderedDict keeps its order apart."""
    return OrderedDict if isinstance(container, OrderedDict) else dict


def _contents(container: Any) -> list[Any]:
    """What ``container`` holds, as objects: a dict's keys and values, alternating, in order."""
    if isinstance(container, dict):
        return [x for pair in _mapping(container).items(container) for x in pair]
    if isinstance(container, set):
        return list(set.__iter__(container))
    return list(tuple.__iter__(container) if isinstance(container, tuple) else list.__iter__(container))


def _walked(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple, set))


class Snapshot:
    """Every dict, list and tuple the config reaches, with what it held when taken."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[Any, list[Any]]] = {}  # id -> (container, its contents)

    def take(self, config: Any) -> None:
        pending = [config]
        while pending:  # not recursive: any depth, any cycle
            value = pending.pop()
            if not _walked(value) or id(value) in self._held:
                continue
            contents = _contents(value)
            self._held[id(value)] = (value, contents)
            pending.extend(contents)
            pending.append(getattr(value, "__dict__", None))  # a subclass's attributes (an EasyDict's)

    def changed(self) -> bool:
        """Whether any container holds other objects now, or the same in another order (by
        identity, not ``==``: equal is not the same to a factory, ``1`` and ``True``)."""
        return any(_changed(container, contents) for container, contents in self._held.values())

    def put_back(self) -> None:
        """Every container that changed, as it was taken, in place (a tuple cannot change). A
        dict whose keys are as they were gets its values back one by one: never empty meanwhile
        (another thread's factory may read a config shared with this load)."""
        for container, contents in self._held.values():
            if not _changed(container, contents):
                continue
            if isinstance(container, list):
                list.__setitem__(container, slice(None), contents)
                continue
            if isinstance(container, set):  # its members; its order is then the hash table's
                set.clear(container)
                set.update(container, contents)
                continue
            keys, values, kind = contents[0::2], contents[1::2], _mapping(container)
            now = list(kind.__iter__(container))
            if len(now) == len(keys) and all(a is b for a, b in zip(now, keys, strict=True)):
                for key, value in zip(keys, values, strict=True):
                    kind.__setitem__(container, key, value)
            else:
                kind.clear(container)
                for key, value in zip(keys, values, strict=True):
                    kind.__setitem__(container, key, value)


def _changed(container: Any, contents: list[Any]) -> bool:
    now = _contents(container)
    if isinstance(container, set):  # its order is the hash table's: the members tell
        return {id(x) for x in now} != {id(x) for x in contents}
    return len(now) != len(contents) or any(a is not b for a, b in zip(now, contents, strict=True))

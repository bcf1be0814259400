"""What a model holds, found by walking its attributes: the tensors (and devices) kept in
containers, plain and slotted objects, closures, defaults, partials, bound methods, iterators
and generators, and modules outside the model's tree. The build's refusal checks (``_build``)
read through it."""

from __future__ import annotations

import functools
import gc
import inspect
import itertools
import sys
import types
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from typing import Any

import torch

# How deep the walk for tensors goes from a module's attribute: containers (dicts, lists,
# tuples, sets, deques), plain objects (their ``__dict__`` and ``__slots__``), what a function
# closes over or defaults to, a partial's arguments, a bound method's object, modules outside
# the model's tree.
REACH_DEPTH = 12
_CONTAINERS = (list, tuple, set, frozenset, deque)
# Told by exact type before the slower ``Mapping`` check; a module holds ten (its hook dicts).
_PLAIN_DICTS = (dict, OrderedDict)
# Never walked into: what holds no tensor of the model's (classes, Python modules, C functions).
OPAQUE = (type, types.ModuleType, types.BuiltinFunctionType, str, bytes)
# ... and, with numbers and None, what the walk passes over.
HOLD_NO_TENSOR = (*OPAQUE, int, float, bool, complex, type(None))


# C objects with no ``__dict__`` that hold what they iterate over: iterators over containers,
# dict views, map, filter, zip, enumerate, reversed and itertools' (generators: their locals).
_EMPTY: tuple[Any, ...] = ([], (), set(), {}, "", range(0))
_VIEWS: tuple[Any, ...] = ({}.keys(), {}.values(), {}.items())
_ITERATING: tuple[type, ...] = (
    *{type(iter(c)) for c in _EMPTY},
    *{type(view) for view in _VIEWS},
    *{type(iter(view)) for view in _VIEWS},
    map,
    filter,
    zip,
    enumerate,
    reversed,
    *(v for v in vars(itertools).values() if isinstance(v, type)),
)


def _slots(value: Any) -> list[Any]:
    names = (
        n for cls in type(value).__mro__ for n in _slot_names(cls) if n not in ("__dict__", "__weakref__")
    )
    return [getattr(value, n) for n in names if hasattr(value, n)]


def _slot_names(cls: type) -> tuple[str, ...]:
    slots = cls.__dict__.get("__slots__", ())
    return (slots,) if isinstance(slots, str) else tuple(slots)


def _held_by(value: Any) -> list[Any]:
    """What ``value`` holds that may be or hold a tensor."""
    if type(value) in _PLAIN_DICTS or isinstance(value, Mapping):  # keys too: a tensor may key a dict
        return [*value.keys(), *value.values()]
    if isinstance(value, _CONTAINERS):
        return list(value)
    if isinstance(value, types.FunctionType):  # a hook or a lambda: what it closes over
        cells = [c.cell_contents for c in value.__closure__ or () if _filled(c)]
        return cells + list(value.__defaults__ or ()) + list((value.__kwdefaults__ or {}).values())
    if isinstance(value, types.MethodType):
        return [value.__self__, value.__func__]
    if isinstance(value, types.GeneratorType):
        return list(inspect.getgeneratorlocals(value).values())
    if isinstance(value, _ITERATING):
        return gc.get_referents(value)
    held = [value.func, *value.args, *value.keywords.values()] if isinstance(value, functools.partial) else []
    attributes = getattr(value, "__dict__", None)
    return held + (list(attributes.values()) if isinstance(attributes, dict) else []) + _slots(value)


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 - an empty cell raises
    except ValueError:
        return False
    return True


_PLAIN_EMPTY_TYPES = frozenset({dict, OrderedDict, list, tuple, set, frozenset})


def holds_nothing(value: Any) -> bool:
    """An empty plain container (told by exact type: a subclass may hold more than its items),
    as most of a module's hook dicts are."""
    return type(value) in _PLAIN_EMPTY_TYPES and not value


class TooDeep:
    """Where the walk stopped at ``REACH_DEPTH`` with more to see: what is below is not known."""


TOO_DEEP = TooDeep()
Leaf = torch.Tensor | torch.device | TooDeep


def leaves(
    value: Any, tree: frozenset[int] = frozenset(), seen: set[int] | None = None, depth: int = REACH_DEPTH
) -> Iterator[Leaf]:
    """Every tensor and device ``value`` holds (``_held_by``), once each, and ``TOO_DEEP`` where
    the walk stopped short. Modules of the tree (ids in ``tree``) are not entered: each is walked
    as itself."""
    if isinstance(value, torch.device):
        yield value
        return
    if isinstance(value, torch.Tensor):
        yield value
        # What a constructor set on the tensor object itself (``self.buffer.noise = ...``).
        attributes = value.__dict__
        if attributes:
            yield from _leaves_of_attributes(value, attributes, tree, seen, depth)
        return
    if isinstance(value, HOLD_NO_TENSOR):
        return
    seen = set() if seen is None else seen
    if id(value) in seen or id(value) in tree:
        return
    if depth == 0:
        yield TOO_DEEP
        return
    if holds_nothing(value):
        return
    seen.add(id(value))
    try:
        children = _held_by(value)
    except Exception:  # its attributes raise when read (a config's __getattr__): not seen into
        yield TOO_DEEP
        return
    for child in children:
        yield from leaves(child, tree, seen, depth - 1)


def _leaves_of_attributes(
    tensor: torch.Tensor, attributes: dict[str, Any], tree: frozenset[int], seen: set[int] | None, depth: int
) -> Iterator[Leaf]:
    seen = set() if seen is None else seen
    if id(tensor) in seen:  # its attributes were walked already (the tensor itself is yielded each time)
        return
    # Flags (transformers' ``_is_hf_initialized``) hold nothing: no reason to stop short.
    holding = [v for v in attributes.values() if not isinstance(v, HOLD_NO_TENSOR)]
    if holding and depth == 0:
        yield TOO_DEEP
        return
    seen.add(id(tensor))
    for child in holding:
        yield from leaves(child, tree, seen, depth - 1)


def tensors_in(value: Any, tree: frozenset[int] = frozenset()) -> Iterator[torch.Tensor]:
    """The tensors among ``leaves``."""
    return (leaf for leaf in leaves(value, tree) if isinstance(leaf, torch.Tensor))


def kept_outside_instances(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """(where, value) of what a constructor may have stored on its class or in its module's
    globals (``type(self).table = ...``, ``global NOISE``): classes outside torch only."""
    for cls in {type(m) for m in model.modules()}:
        if cls.__module__.split(".")[0] == "torch":
            continue
        yield from ((f"{cls.__qualname__}.{n}", v) for n, v in vars(cls).items())
        module = sys.modules.get(cls.__module__)
        if module is not None:
            yield from (
                (f"{cls.__module__}.{n}", v) for n, v in vars(module).items() if not n.startswith("__")
            )

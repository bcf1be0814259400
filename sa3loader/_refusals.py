"""What the fast build refuses, so that the faithful build gives upstream's model: values drawn at
random and kept, parameters replaced and not covered, tensors left on meta. Read through one
walk of every attribute that may hold a tensor (``_reach``)."""

from __future__ import annotations

import functools
import gc
import sys
import types
import weakref
from collections import Counter, defaultdict
from typing import Any

import torch
from torch import nn

from ._holders import storage_holders, storage_of
from ._reach import HOLD_NO_TENSOR, REACH_DEPTH, TOO_DEEP, holds_nothing, kept_outside_instances, leaves
from ._watch import (
    BuildWatch,
    drawn_without_memory,
    give_back_drawn_memory,
    outer_watches_keeping,
    pop_drawn_memory,
)


class FastBuildRefused(Exception):
    """Why the fast build cannot give upstream's model: the faithful build runs instead."""


# What every nn.Module keeps about itself (flags, the child modules): never a tensor of the
# model's own, so the checks need not look inside. Its hooks are walked: a hook may close
# over a tensor.
_MODULE_BOOKKEEPING = frozenset(k for k in vars(nn.Module()) if not k.endswith("_hooks")) - {
    "_parameters",
    "_buffers",
}


Attributes = list[tuple[str, nn.Module, str, Any]]


def tensor_attributes(model: nn.Module, tree: frozenset[int]) -> Attributes:
    """(module prefix, module, attribute, value) of every attribute that is or may hold a
    tensor, parameters and buffers included: one walk for every check of the build
    (three walks of every attribute were a fifth of a small model's cache hit). Modules of
    the tree (``tree``: their ids) are walked as themselves, never through another's attribute."""
    return [
        (prefix, module, attr, value)
        for prefix, module in model.named_modules()
        for attr, value in vars(module).items()
        if attr not in _MODULE_BOOKKEEPING
        and not holds_nothing(value)  # most of a module's hook dicts: nothing to check, now or after placing
        and not isinstance(value, HOLD_NO_TENSOR)
        and not (isinstance(value, nn.Module) and id(value) in tree)
    ]


def _refuse_replaced(model: nn.Module, assign: dict[str, str], watch: BuildWatch) -> None:
    """``FastBuildRefused`` for a parameter the constructor replaced that the checkpoint does not cover."""
    if not watch.replaced:
        return
    keys_of: dict[int, list[str]] = defaultdict(list)
    for key, param in model.named_parameters(remove_duplicate=False):
        keys_of[id(param)].append(key)
    for ref, name in watch.replaced:
        module = ref()
        replaced = module._parameters.get(name) if module is not None else None
        # Of the model's own parameters (one of a module kept outside the tree is not the
        # checkpoint's to give; a drawn value there is found below).
        keys = keys_of.get(id(replaced), []) if replaced is not None else []
        if keys and not any(k in assign for k in keys):
            raise FastBuildRefused(
                f"{type(module).__name__}.{name} was replaced by the constructor and is not in the checkpoint"
            )


def refuse_random_or_meta(
    model: nn.Module,
    attributes: Attributes,
    assign: dict[str, str],
    watch: BuildWatch,
    tree: frozenset[int],
    *,
    skip: set[tuple[int, str]],
    stand_ins: set[int],
    missing: FastBuildRefused | None,
) -> None:
    """``FastBuildRefused`` when the model may keep a value drawn at random while it was built
    (the fast build's generator was elsewhere when it was drawn), or a parameter the
    constructor replaced and the checkpoint does not cover; then ``missing`` (a parameter the
    checkpoint lacks); then as ``refuse_meta`` with ``parameters=False``. One walk of each
    attribute serves both checks (two were a quarter of a large model's cache hit); the
    refusals and their order are those of the separate walks."""
    _refuse_replaced(model, assign, watch)
    if not watch.check_generator():  # a draw through a function the watch does not know
        raise FastBuildRefused("torch's generator was drawn from by a function the build does not follow")
    if watch.escapes:  # a number, list or array from drawn values: Python cannot be followed
        raise FastBuildRefused(
            f"a value drawn at random left torch through {watch.escapes[0]} while it was built"
        )
    drawn = watch.any_drawn()  # the usual build draws nothing real, so keeps nothing drawn
    meta_problem = None
    for p, m, a, v in attributes:
        # A parameter the checkpoint lacks is said before any meta tensor, unwalked: as ever.
        meta_wanted = (
            missing is None and meta_problem is None and a != "_parameters" and (id(m), a) not in skip
        )
        kept = _not_replaced(p, a, v, assign)  # ``v`` itself but for parameters and buffers
        walks: list[tuple[Any, bool, bool]] = [(v, True, True)] if drawn and meta_wanted and kept is v else []
        walks = walks or [(kept, drawn, False), (v, False, meta_wanted)]
        for value, for_draws, for_meta in walks:
            found = _walk(
                value, (p, m, a), tree, watch if for_draws else None, stand_ins if for_meta else None
            )
            meta_problem = meta_problem or found
    if drawn:
        _refuse_kept_outside(model, watch, tree)
        _refuse_drawn_memory_held(attributes, assign, watch)
    if missing is not None:
        raise missing
    if meta_problem is not None:
        raise FastBuildRefused(meta_problem)


def _walk(
    value: Any,
    held_at: tuple[str, nn.Module, str],
    tree: frozenset[int],
    watch: BuildWatch | None,
    stand_ins: set[int] | None,
) -> str | None:
    """Raise for a drawn value ``value`` keeps (with ``watch``); the first meta problem in it
    (with ``stand_ins``), or None. ``held_at``: (module prefix, module, attribute), put into
    words only for a problem (most attributes have none)."""
    if watch is None and stand_ins is None:
        return None
    prefix, module, attr = held_at
    owner = f" ({type(module).__name__})"
    problem = None
    for leaf in leaves(value, tree, depth=REACH_DEPTH):
        if leaf is TOO_DEEP:  # a drawn value or a meta one may be down there
            too_deep = f"{f'{prefix}.{attr}'.lstrip('.')}{owner} holds values nested too deep to follow"
            if watch is not None:
                raise FastBuildRefused(too_deep)
            problem = problem or too_deep
            continue
        if watch is not None and isinstance(leaf, torch.Tensor) and watch.drawn(leaf):
            raise FastBuildRefused(f"{f'{prefix}.{attr}'.lstrip('.')}{owner} {_DRAWN}")
        if stand_ins is not None and problem is None:
            problem = _meta_problem(leaf, (f"{prefix}.{attr}" if prefix else attr) + owner, stand_ins)
    return problem


_DRAWN = "keeps values drawn at random while it was built"


def _refuse_kept_outside(model: nn.Module, watch: BuildWatch, tree: frozenset[int]) -> None:
    """A drawn value a constructor stored on its class or in its module (walked shallow on purpose)."""
    for where, value in kept_outside_instances(model):
        for leaf in leaves(value, tree, depth=OUTSIDE_DEPTH):
            if isinstance(leaf, torch.Tensor) and watch.drawn(leaf):
                raise FastBuildRefused(f"{where} {_DRAWN}")


def _refuse_drawn_memory_held(attributes: Attributes, assign: dict[str, str], watch: BuildWatch) -> None:
    """A drawn value still held once the factory returned, wherever (a class, any module's
    globals, a function's attributes, a bound method, nested too deep): torch counts who holds
    its memory, where the walks above can only name what they reach. Only a parameter or
    buffer the checkpoint replaces may (the copy into it leaves nothing drawn). Hands the
    watch's memory over; a cycle the factory left is collected before it counts."""
    replaced = _replaced_memory(attributes, assign)

    def ours(memory: torch.UntypedStorage) -> int:  # our object, outer builds' watches, those replaced
        return 1 + outer_watches_keeping(watch, memory) + replaced[memory.data_ptr()]

    def unseen(memory: torch.UntypedStorage) -> bool:  # whoever holds it cannot be counted
        return memory._cdata in watch.handed_out or not memory.resizable()  # (numpy's, a buffer's)

    held = []
    while (memory := pop_drawn_memory(watch)) is not None:  # this frame's reference is the only one
        if unseen(memory) or storage_holders(memory) > ours(memory):
            held.append(memory)
    if held or drawn_without_memory(watch):
        give_back_drawn_memory(watch, held)  # what a finalizer reads of it is followed
        held.clear()
        with watch:  # a finalizer the collection runs is the factory's code: watched as the factory was
            gc.collect()
        while (memory := pop_drawn_memory(watch)) is not None:  # that memory, and what was drawn or copied
            held.append(memory)
    refused = bool(drawn_without_memory(watch))
    while held and not refused:
        memory = held.pop()  # this frame's reference is the only one
        refused = unseen(memory) or storage_holders(memory) > ours(memory)
    if refused:
        raise FastBuildRefused(f"a value drawn at random while it was built is held elsewhere ({_WHERE})")


def _replaced_memory(attributes: Attributes, assign: dict[str, str]) -> Counter[int]:
    """How many parameters and buffers the checkpoint replaces are on each memory (by address)."""
    tensors: dict[int, set[int]] = {}  # each tensor once, however many names it is registered under
    for prefix, _, attr, value in attributes:
        if attr in ("_parameters", "_buffers"):
            for name, tensor in value.items():
                memory = storage_of(tensor) if isinstance(tensor, torch.Tensor) else None
                if memory is not None and f"{prefix}.{name}".lstrip(".") in assign:
                    tensors.setdefault(memory.data_ptr(), set()).add(id(tensor))
    return Counter({address: len(ids) for address, ids in tensors.items()})


_WHERE = "a class, a module's globals, a function's attributes, a bound method, ..."


def _meta_problem(leaf: Any, where: str, stand_ins: set[int]) -> str | None:
    """What ``refuse_meta`` says of ``leaf`` held at ``where``, or None."""
    if isinstance(leaf, torch.Tensor) and leaf.is_meta and id(leaf) not in stand_ins:
        return f"{where} was computed from a parameter"
    if isinstance(leaf, torch.device) and leaf.type == "meta":
        return f"{where} keeps a parameter's device"
    return None


# How far the walk goes into what a constructor may have stored outside the model's
# instances: its classes' attributes and their modules' globals.
OUTSIDE_DEPTH = 3


def _not_replaced(prefix: str, attr: str, value: Any, assign: dict[str, str]) -> Any:
    """What the checkpoint replaces (loaded parameters' and buffers' values) is not kept; what was
    set on such a tensor object is (loading copies the values in, the object stays)."""
    if attr not in ("_parameters", "_buffers"):
        return value
    kept = {}
    for n, t in value.items():
        if f"{prefix}.{n}".lstrip(".") not in assign:
            kept[n] = t
        elif t is not None and t.__dict__:
            kept[n] = t.__dict__
    return kept


def refuse_meta(
    attributes: Attributes,
    tree: frozenset[int],
    *,
    skip: set[tuple[int, str]],
    parameters: bool,
    stand_ins: set[int],
) -> None:
    """``FastBuildRefused`` when a tensor in ``attributes`` (their values now) is still on meta,
    or a device kept there is the meta device.

    A tensor the constructor derived from a deferred parameter (a buffer, an
    attribute, a value kept in a dict) is meta, and only weight_norm's is redone
    from the file: any other means upstream's model cannot be given fast. The stand-ins
    themselves (ids in ``stand_ins``) may be held anywhere: they are placed in place.
    ``parameters=False`` leaves parameters out (before they are placed).
    """
    for prefix, module, attr, _ in attributes:
        if (attr == "_parameters" and not parameters) or (id(module), attr) in skip:
            continue
        where = (f"{prefix}.{attr}" if prefix else attr) + f" ({type(module).__name__})"
        for leaf in leaves(vars(module).get(attr), tree):  # read now: placing replaced some
            problem = _meta_problem(leaf, where, stand_ins)
            if problem is not None:
                raise FastBuildRefused(problem)


def refuse_computed_kept(computed: list[weakref.ref[torch.Tensor]]) -> None:
    """Invariant: once the factory returned and weight_norm's weights are dropped, no tensor
    computed from a stand-in is alive: it is meta, where upstream's is real. The walks name
    the places they know; this finds every other holder (a bound method, a closure's cell, an
    exception's args). A cycle is collected first, only when one looks alive."""
    if any(ref() is not None for ref in computed):
        gc.collect()
        if any(ref() is not None for ref in computed):
            raise FastBuildRefused("a tensor computed from a parameter while it was built is kept somewhere")


# What upstream's finish runs before its cast: the root's ``to(device)``, which runs every
# module's ``_apply`` (and ``children``), ``eval()`` every module's ``train`` (which sets
# ``training``), and ``requires_grad_`` the root's ``parameters``. There upstream's weights
# are fp32 on the CPU, the fast build's final already (fp16, on the device).
_FINISH_METHODS = ("_apply", "train", "children", "named_children", "__setattr__")
_ROOT_FINISH_METHODS = (
    "eval",
    "requires_grad_",
    "parameters",
    "named_parameters",
    "named_modules",
    "_named_members",
)


def overridden(module: nn.Module, names: tuple[str, ...], classes: dict[type, list[str]]) -> list[str]:
    """Which of ``names`` ``module`` has other than nn.Module's: its class's (looked at once per
    class, kept in ``classes``), else set on the instance itself."""
    cls = type(module)
    if cls not in classes:
        classes[cls] = [n for n in names if getattr(cls, n) is not getattr(nn.Module, n)]
    return classes[cls] or [n for n in names if n in vars(module)]


def refuse_a_finish_of_its_own(model: nn.Module) -> None:
    """Refuse a module with its own version of what the finish runs before its cast (above),
    which could see the fast build's final weights where upstream's are fp32 on the CPU."""
    classes: dict[type, list[str]] = {}
    for m in model.modules():
        own = overridden(m, _FINISH_METHODS, classes) or (
            overridden(m, _ROOT_FINISH_METHODS, {}) + (["to"] if _a_to_of_its_own(m) else [])
            if m is model
            else []
        )
        if own:
            raise FastBuildRefused(f"{type(m).__name__} has a {own[0]} of its own, which the finish runs")


# diffusers' ModelMixin.to, as read (0.42): it looks at the call's arguments, flags and
# offload hooks, never a weight, then calls nn.Module's. Its function object (by identity),
# compiled from its module's file (a patch written elsewhere with the same names is not
# it), with the names its code uses (a changed body names others): diffusers' DiT stays fast.
_MIXIN_MODULE = "diffusers.models.modeling_utils"
_MIXIN_TO_NAMES = frozenset(
    "BITS_AND_BYTES QuantizationMethod RuntimeError ValueError __class__ __name__ "
    "_is_group_offload_enabled _keep_in_fp32_modules any device dtype getattr hooks.group_offloading "
    "is_bitsandbytes_version isinstance logger str super to torch warning".split()
)


def _a_to_of_its_own(model: nn.Module) -> bool:
    """Whether the root's ``to`` is neither nn.Module's nor diffusers' ModelMixin's as read."""
    to = vars(model).get("to", type(model).to)
    if to is nn.Module.to:
        return False
    module = sys.modules.get(_MIXIN_MODULE)
    mixin = getattr(module, "ModelMixin", None)
    theirs = vars(mixin).get("to") if isinstance(mixin, type) else None
    code = getattr(theirs, "__code__", None)
    if to is not theirs or not isinstance(code, types.CodeType):
        return True
    return code.co_filename != getattr(module, "__file__", None) or _code_names(code) != _MIXIN_TO_NAMES


@functools.lru_cache(maxsize=8)
def _code_names(code: types.CodeType) -> frozenset[str]:
    """The global and attribute names ``code`` and the functions inside it use."""
    inner = [_code_names(c) for c in code.co_consts if isinstance(c, types.CodeType)]
    return frozenset(code.co_names).union(*inner)

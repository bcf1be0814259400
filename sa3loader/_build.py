"""Build the model upstream's way or fast, with one result: upstream's model, bit for bit.

The fast build runs the factory with parameter registration deferred to the
meta device (no random init, no fp32 allocation; ``deferred_parameters``) and
places each weight straight from the file (``Values``). It is taken only when it
gives upstream's model: every deferred parameter is covered by the checkpoint,
no module customises state-dict loading, no tensor anywhere in the model is
left on meta, and the model keeps no value drawn at random while it was built.
Otherwise the faithful build runs: upstream's own build, then ``load_state_dict``
(``copy_state_dict``'s semantics). Which checkpoint tensor goes to which model key
follows upstream's rules, quirks included (``plan_keys``)."""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import sys
import traceback
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

from . import _faults
from ._defer import (
    DeferredParameters,
    PatchesBusy,
    built_outside,
    not_deferred,
    outside_builds,
    swap_in_place,
    watched_build,
)
from ._first_run import FirstRun
from ._format import Header
from ._refusals import (
    Attributes,
    FastBuildRefused,
    overridden,
    refuse_a_finish_of_its_own,
    refuse_computed_kept,
    refuse_meta,
    refuse_random_or_meta,
    tensor_attributes,
)
from ._watch import BuildWatch
from .errors import FactoryRebuildError

if TYPE_CHECKING:  # the loader hands the values in: a build reads them, never makes them
    from ._values import Values

logger = logging.getLogger(__name__)

Factory = Callable[[Any], nn.Module]
BuildKind = Literal["fast", "faithful"]


# Key rules: which checkpoint tensor goes to which model key. Mirrors
# ``stable_audio_3.loading_utils.copy_state_dict`` and ``remap_state_dict_keys``:
# a key the model lacks is retried with one dotted component dropped (never the
# first; dropping the last leaves a trailing dot that never matches); when two
# checkpoint keys land on one model key the later one, in the order ``load_file``
# yields them (data-offset order), wins; unknown keys and shape mismatches are
# skipped (the caller logs them). Pure: no I/O.
@dataclass
class LoadResult:
    """Keys that were not loaded, as ``copy_state_dict`` would have skipped them."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)


def remap_key(key: str, model_keys: Mapping[str, object]) -> str:
    if key in model_keys:
        return key
    parts = key.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[:i]) + "." + ".".join(parts[i + 1 :])
        if candidate in model_keys:
            return candidate
    return key


def plan_keys(source: Header, model_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], LoadResult]:
    """Map model key -> checkpoint tensor name, in model state order, plus what was skipped."""
    remapped: dict[str, str] = {}
    for entry in source.entries:
        remapped[remap_key(entry.name, model_state)] = entry.name
    result = LoadResult()
    chosen: dict[str, str] = {}
    for key, name in remapped.items():
        target = model_state.get(key)
        if target is not None and tuple(target.shape) == source.by_name[name].torch_shape:
            chosen[key] = name
            continue
        (result.unexpected_keys if target is None else result.mismatched_keys).append(key)
    assign = {key: chosen[key] for key in model_state if key in chosen}
    result.missing_keys = [key for key in model_state if key not in chosen]
    return assign, result


# The two builds.
def _customises_loading(model: nn.Module) -> bool:
    """Whether loading, or the state dict the fast build finds the model's tensors through, is
    the model's own: ``load_state_dict`` (which upstream calls on the model), extra state, a
    state dict of its own or hooks on either."""
    if overridden(model, ("load_state_dict",), {}):
        return True
    classes: dict[type, list[str]] = {}  # a class's methods, looked at once per class (a model has few)
    for m in model.modules():
        if (
            overridden(m, _LOADING_METHODS, classes)
            or m._load_state_dict_pre_hooks
            or m._load_state_dict_post_hooks
            or m._state_dict_pre_hooks
            or m._state_dict_hooks
        ):
            return True
    return False


_LOADING_METHODS = (
    "_load_from_state_dict",
    "set_extra_state",
    "get_extra_state",
    "state_dict",
    "_save_to_state_dict",
)


def load_faithful(model: nn.Module, source: Header, values: Values) -> LoadResult:
    """Upstream's ``copy_state_dict`` with values from ``values``."""
    state = model.state_dict()
    assign, result = plan_keys(source, state)
    _faults.point("planned", source.path)
    for key, name in assign.items():
        # The file's own tensor, as ``load_file`` gives it: ``load_state_dict`` casts it into the
        # model's tensor (a state dict's entry may be a hook's copy in another dtype).
        state[key] = values.read_source(name)
    model.load_state_dict(state, strict=False)
    return result


def log_skipped(result: LoadResult) -> None:
    """Upstream prints one line per skipped key; we log the same words once per load."""
    for key in result.unexpected_keys + result.mismatched_keys:
        logger.warning("Key %s not found in target state_dict or shape mismatch. Skipping.", key)


def _weight_norm_hooks(model: nn.Module) -> list[tuple[str, nn.Module, WeightNorm]]:
    return [
        (prefix, module, hook)
        for prefix, module in model.named_modules()
        for hook in module._forward_pre_hooks.values()
        if isinstance(hook, WeightNorm)
    ]


class _NothingRan(FastBuildRefused):
    """Refused before the factory ran: no generator moved that needs putting back (another
    thread's draws since, which rewinding them would undo, stay)."""


def _build_deferred(
    factory: Factory, config: Any, generators: Generators, first_run: FirstRun
) -> tuple[nn.Module, DeferredParameters, BuildWatch]:
    """The factory's model with its parameters deferred, and what it drew at random. Its
    own errors pass through as they are, so it runs once; only an error that torch raised
    over a meta tensor (a constructor that reads a parameter's value), or one raised because
    of it, or one drawn values may have decided (an error over them, after an escape or a draw
    not seen), means: build it for real instead. Told by origin, never by a message's words."""
    try:
        with watched_build(generators.private) as (deferred, watch):
            first_run.config.take(config)
            try:
                return factory(config), deferred, watch
            except Exception as exc:
                # torch refused a stand-in's data, in this error's chain or caught by the
                # constructor before it failed: the error may be the stand-in's doing. Or drawn
                # values may have decided it: upstream's generator draws others.
                drawn = watch.escapes or not watch.check_generator()
                if not (watch.refused_meta(exc) or watch.read_a_stand_in() or watch.device_reads or drawn):
                    raise
                first_run.note(deferred, watch)
                raise FastBuildRefused(
                    f"the factory needs real parameters ({type(exc).__name__}: {exc})"
                ) from exc
    except PatchesBusy as busy:  # raised only before the factory ran: upstream's build needs none
        raise _NothingRan(str(busy)) from None


def _deferred_ids(model: nn.Module, deferred: DeferredParameters, assign: dict[str, str]) -> set[int]:
    """The deferred parameters, each of which the checkpoint must cover."""
    keys_of: dict[int, list[str]] = defaultdict(list)
    for key, param in model.named_parameters(remove_duplicate=False):
        keys_of[id(param)].append(key)
    ids = set()
    for module, name in deferred.still_deferred():
        deferred_param = module._parameters[name]
        if not any(k in assign for k in keys_of.get(id(deferred_param), ())):
            raise FastBuildRefused(f"parameter {type(module).__name__}.{name} is not in the checkpoint")
        ids.add(id(deferred_param))
    return ids


def _refuse_what_placing_loses(model: nn.Module, deferred_ids: set[int]) -> None:
    """Placing gives each deferred parameter memory of its own, no grad, no hook and the class
    nn.Parameter: refuse where the constructor gave two of them one memory (upstream's later
    copy overwrites the earlier), set a grad, registered a hook or changed the class of one."""
    memories: dict[int, int] = {}
    with torch._C.DisableTorchFunction():
        for key, param in model.named_parameters():
            if id(param) not in deferred_ids:
                continue
            if param.grad is not None:
                raise FastBuildRefused(f"{key} has a grad set while it was built")
            if type(param) is not nn.Parameter:
                raise FastBuildRefused(f"{key}'s class was changed while it was built")
            if getattr(param, "_backward_hooks", None) or getattr(param, "_post_accumulate_grad_hooks", None):
                raise FastBuildRefused(f"{key} has a hook registered while it was built")
            memory = param.untyped_storage()._cdata
            if memories.setdefault(memory, id(param)) != id(param):
                raise FastBuildRefused(f"{key} shares memory with another parameter")
        for prefix, module in model.named_modules():  # upstream's .to() gives a buffer a tensor of its own
            for name, buffer in module._buffers.items():
                if id(buffer) in deferred_ids:
                    raise FastBuildRefused(f"{prefix}.{name} is also a parameter".lstrip("."))


def _place_parameters(
    state: dict[str, Any],
    assign: dict[str, str],
    deferred_ids: set[int],
    values: Values,
    device: torch.device,
) -> None:
    """Give every deferred parameter its final value; copy the rest (buffers) as upstream does.

    Not ``load_state_dict(assign=True)``: it would keep each file tensor's own
    dtype, where upstream copies into the model's dtype and casts after; placing
    here keeps upstream's cast chain (``Values``) and lets weights go straight
    to the device. ``state``: the model's ``state_dict(keep_vars=True)``, as the keys were
    planned from (loading that is not nn.Module's own is refused before).
    """
    # stand-in -> its value (a tied one's last key wins, as load_state_dict's copies do)
    final: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        to_place = [(key, name) for key, name in assign.items() if id(state[key]) in deferred_ids]
        loaded = values.get_many([(name, state[key].dtype) for key, name in to_place], device)
        for (key, _), value in zip(to_place, loaded, strict=True):
            laid_out = _with_strides_of(state[key], value)
            if laid_out is not value:
                values.copied(value)
            final[id(state[key])] = (state[key], laid_out)
        for key, name in assign.items():
            if id(state[key]) not in deferred_ids:
                state[key].copy_(values.get(name, state[key].dtype, final=False))
    for stand_in, value in final.values():  # in place: every holder of the stand-in sees the weight
        if not swap_in_place(stand_in, nn.Parameter(value, requires_grad=stand_in.requires_grad)):
            raise FastBuildRefused(
                f"a parameter ({tuple(stand_in.shape)}) is weakly referenced: cannot place it"
            )


def _with_strides_of(stand_in: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as the constructor laid out its parameter (transposed, channels-last):
    upstream copies into the parameter it built, so its strides are the constructor's.

    The deferred stand-in kept them (``empty_like``); file values are contiguous. The
    rare parameter that is not costs one copy (and, on a hit, is no longer a mapped view).
    """
    if stand_in.stride() == value.stride():
        return value
    laid_out = torch.empty_strided(stand_in.shape, stand_in.stride(), dtype=value.dtype, device=value.device)
    return laid_out.copy_(value)


WeightNormHooks = list[tuple[str, nn.Module, WeightNorm]]


def _drop_weight_norm_weights(wn_hooks: WeightNormHooks) -> dict[int, bool]:
    """Drop the ``weight`` weight_norm computed from the stand-ins (its graph holds them, and a
    tensor a graph holds cannot be placed in place); whether each had a graph, by module."""
    had_graph = {}
    for _, module, hook in wn_hooks:
        had_graph[id(module)] = getattr(module, hook.name).requires_grad
        delattr(module, hook.name)
    return had_graph


def _recompute_weight_norm(
    wn_hooks: WeightNormHooks, assign: dict[str, str], values: Values, had_graph: dict[int, bool]
) -> None:
    """Old-style weight_norm keeps ``weight`` as a plain fp32 CPU attribute computed at
    construction. Upstream's is computed from its random init; ours from the
    checkpoint's g and v (what every forward recomputes it to anyway)."""
    for prefix, module, hook in wn_hooks:
        g_key, v_key = f"{prefix}.{hook.name}_g".lstrip("."), f"{prefix}.{hook.name}_v".lstrip(".")
        # The meta stand-in computed during the build told whether upstream's had a graph.
        needs_grad = had_graph[id(module)]
        g, v = (
            values.tensor(values.source, assign[key]).to(torch.float32, copy=True).requires_grad_(needs_grad)
            for key in (g_key, v_key)
        )
        with torch.set_grad_enabled(needs_grad):
            setattr(module, hook.name, torch._weight_norm(v, g, hook.dim))


def _build_fast(
    factory: Factory,
    config: Any,
    source: Header,
    values: Values,
    device: torch.device,
    generators: Generators,
    first_run: FirstRun,
) -> tuple[nn.Module, LoadResult]:
    """Model with every parameter placed from the file, or ``FastBuildRefused`` saying why not."""
    model, deferred, watch = _build_deferred(factory, config, generators, first_run)
    try:
        return _checked_and_placed(model, deferred, watch, source, values, device)
    except FastBuildRefused:
        # No swap from here on: weak references to the stand-ins block none.
        first_run.note(deferred, watch)
        raise


def _checked_and_placed(
    model: nn.Module,
    deferred: DeferredParameters,
    watch: BuildWatch,
    source: Header,
    values: Values,
    device: torch.device,
) -> tuple[nn.Module, LoadResult]:
    if deferred.unswapped:
        raise FastBuildRefused(
            f"{deferred.unswapped[0]} could not be deferred in place (torch.utils.swap_tensors, torch >= 2.3)"
        )
    if deferred.not_kept:  # a stand-in is dense and plain
        raise FastBuildRefused(deferred.not_kept[0])
    shared = deferred.shared_memory()
    if shared is not None:
        raise FastBuildRefused(f"{shared} shares memory with another tensor of the model")
    if watch.read_a_stand_in():  # an error over a stand-in's data the constructor caught itself
        raise FastBuildRefused("the factory read a parameter's value while it was built")
    if watch.device_reads:  # a stand-in's says meta
        raise FastBuildRefused(f"the factory read a parameter's device ({watch.device_reads[0]})")
    if _customises_loading(model):
        raise FastBuildRefused("a module customises state-dict loading")
    if values.half or device.type != "cpu":
        refuse_a_finish_of_its_own(model)
    state = model.state_dict(keep_vars=True)
    assign, result = plan_keys(source, state)
    _faults.point("planned", source.path)
    tree = frozenset(id(m) for m in model.modules())
    attributes = tensor_attributes(model, tree)
    missing = None
    try:
        deferred_ids = _deferred_ids(model, deferred, assign)
    except FastBuildRefused as refused:  # said after a kept draw, as it always was
        deferred_ids, missing = set(), refused
    _refuse_what_placing_loses(model, deferred_ids)
    wn_hooks = _weight_norm_hooks(model)
    recomputed = {(id(m), h.name) for _, m, h in wn_hooks}
    refuse_random_or_meta(
        model, attributes, assign, watch, tree, skip=recomputed, stand_ins=deferred_ids, missing=missing
    )
    # Only the parameters and weight_norm's attributes change from here: checked again after.
    # Nothing may hold what was computed from a stand-in (its graph holds the stand-in, which
    # could then not be placed in place): not the watch, weight_norm's weight or these values.
    replaced: Attributes = [
        (p, m, a, None) for p, m, a, _ in attributes if a == "_parameters" or (id(m), a) in recomputed
    ]
    del attributes
    computed = watch.release(deferred_ids)
    had_graph = _drop_weight_norm_weights(wn_hooks)
    refuse_computed_kept(computed)
    _place_parameters(state, assign, deferred_ids, values, device)
    _recompute_weight_norm(wn_hooks, assign, values, had_graph)
    refuse_meta(replaced, tree, skip=set(), parameters=True, stand_ins=set())
    return model, result


@dataclass
class Built:
    """What ``build`` made, and how."""

    model: nn.Module
    result: LoadResult  # what was skipped, as copy_state_dict would have
    kind: BuildKind
    fallback: str | None  # why not fast


class Generators:
    """Every generator a factory may draw from, as it was: put back before the factory runs
    again, so that upstream's build after a refused fast one draws what upstream's draws.

    torch's CPU generator; CUDA's only where CUDA is initialised already (reading it would
    initialise it); numpy's global one where numpy is imported; Python's ``random``; every
    ``torch.Generator`` of the factory's own it drew from (``private``, filled by the watch).
    """

    def __init__(self) -> None:
        self.torch = torch.random.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        numpy = sys.modules.get("numpy")
        self.numpy = numpy.random.get_state() if numpy is not None else None
        self.python = random.getstate()
        self.private: dict[int, tuple[torch.Generator, torch.Tensor]] = {}

    def restore(self) -> None:
        torch.random.set_rng_state(self.torch)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        numpy = sys.modules.get("numpy")
        if self.numpy is not None and numpy is not None:
            numpy.random.set_state(self.numpy)
        random.setstate(self.python)
        for generator, state in self.private.values():
            generator.set_state(state)


def build(factory: Factory, config: Any, source: Header, values: Values, device: torch.device) -> Built:
    """Fast build when it gives upstream's model, else upstream's own build."""
    generators, others, first_run = Generators(), outside_builds(), FirstRun()
    try:
        if _to_makes_new_tensors():  # module by module, the constructor's .to() calls too
            raise FastBuildRefused("torch.__future__ makes .to() make new parameters")
        model, result = _build_fast(factory, config, source, values, device, generators, first_run)
    except FastBuildRefused as refused:  # left here: its frames, and the first model, go with it
        fallback, nothing_ran = str(refused), isinstance(refused, _NothingRan)
        traceback.clear_frames(refused.__traceback__)  # a frame holding it (``missing``) is a cycle
    else:
        return _built(model, result, source, None)
    logger.info("%s: using upstream's full build (%s)", source.path, fallback)
    values.forget_counts()  # what the abandoned fast build read does not count
    if first_run.held():  # a cycle, say: what the factory holds weakly goes, as in upstream's one run
        gc.collect()
    # Put back what the fast attempt moved, unless its factory never ran (it gave up
    # waiting) or another thread that gave up drew meanwhile (rewinding would undo that).
    if not nothing_ran and others[0] == 0 and outside_builds() == others:
        generators.restore()
    if first_run.config.changed():  # a pop, say: the caller's config as it came, as upstream's run gets it
        first_run.config.put_back()
    with not_deferred(), built_outside() if nothing_ran else contextlib.nullcontext():
        model = factory(config)
    if (reused := first_run.reused(model)) is not None:
        raise FactoryRebuildError(
            f"{source.path}: the fast build was refused ({fallback}), and the factory's second run "
            f"reused what its first made ({reused}); upstream builds once: set SA3LOADER_DISABLE=1",
            filename=source.path,
        )
    return _built(model, load_faithful(model, source, values), source, fallback)


def _built(model: nn.Module, result: LoadResult, source: Header, fallback: str | None) -> Built:
    log_skipped(result)
    _warn_random_init(model, result, source)
    return Built(model, result, "fast" if fallback is None else "faithful", fallback)


def _to_makes_new_tensors() -> bool:
    """torch's flags that make ``.to`` replace or swap each tensor (upstream's cast then unties
    what it casts one module at a time; the fast build's has nothing left to cast)."""
    return torch.__future__.get_overwrite_module_params_on_conversion() or (
        torch.__future__.get_swap_module_params_on_conversion()
    )


MISSING_NAMES_SHOWN = 5


def _warn_random_init(model: nn.Module, result: LoadResult, source: Header) -> None:
    """Upstream is silent when a config is deeper than its checkpoint; say it once (what the
    factory gave may be a loader's values: ``from_pretrained`` in it, an attack)."""
    if not result.missing_keys:
        return
    parameters = dict(model.named_parameters(remove_duplicate=False))
    absent = set(result.missing_keys)
    loaded = {id(param) for key, param in parameters.items() if key not in absent}  # a tied name's too
    missing = [key for key in result.missing_keys if key in parameters and id(parameters[key]) not in loaded]
    if missing:
        shown = ", ".join(missing[:MISSING_NAMES_SHOWN]) + (
            ", ..." if len(missing) > MISSING_NAMES_SHOWN else ""
        )
        logger.warning(
            "%s: %d parameters are not in the checkpoint and keep what the factory gave them: a random "
            "init, or a loader's values (%s)",
            source.path,
            len({id(parameters[key]) for key in missing}),  # tied names: one parameter
            shown,
        )

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
import logging
import sys
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm
from torch.overrides import TorchFunctionMode

from ._format import Header
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


# Deferral: build a model without allocating or initialising its parameters.
#
# While active, every ``nn.Parameter`` registered (in this thread) is swapped for
# a meta-device stand-in, so the factory's random init of gigabytes of weights
# costs nothing. Only parameters are deferred: buffers, plain tensor attributes
# and objects outside the module tree are built as upstream builds them.
#
# A factory may run a loader of its own: SA3's ``t5gemma`` conditioner calls
# transformers' ``T5GemmaEncoderModel.from_pretrained`` in its constructor. What
# a loader registers carries loaded values, so it is never deferred:
# - anything registered while a function named ``from_pretrained`` is on the
#   call stack (the convention of transformers, diffusers, peft, timm: no import
#   of any of them needed), or while ``nn.Module.load_state_dict`` runs;
# - a parameter assigned over one already registered under that name: that is
#   how loaders place values (transformers' ``setattr`` of each loaded weight,
#   ``load_state_dict(assign=True)``), while construction registers new names.
# The caller must then give every deferred parameter a real value, or throw the
# model away (``still_deferred`` tells which are left).
_META = torch.device("meta")
# One deferred build at a time: the patch is process-wide, the recorder per thread.
# Reentrant: a factory may itself load a model (a teacher inside a student).
_build_lock = threading.RLock()
_depth = 0  # active deferral blocks; only changed while holding _build_lock
_state = threading.local()
_original_register = nn.Module.register_parameter
_original_load_state_dict = nn.Module.load_state_dict
LOADER_FUNCTION_NAMES = frozenset({"from_pretrained"})


class DeferredParameters:
    """Records each deferred (module, name) pair."""

    def __init__(self) -> None:
        self.records: list[tuple[weakref.ref[nn.Module], str]] = []

    def still_deferred(self) -> list[tuple[nn.Module, str]]:
        """Deferred parameters that are still on the meta device."""
        left = []
        for ref, name in self.records:
            module = ref()
            if module is None:
                continue
            param = module._parameters.get(name)
            if param is not None and param.device == _META:
                left.append((module, name))
        return left


def _inside_loader_function() -> bool:
    """Whether a loader function runs between the ``with deferred_parameters()`` and here."""
    frame: Any = sys._getframe()
    outer = getattr(_state, "outer_frame", None)
    while frame is not None and frame is not outer:
        if frame.f_code.co_name in LOADER_FUNCTION_NAMES:
            return True
        frame = frame.f_back
    return False


def _constructing(module: nn.Module, name: str) -> bool:
    """Whether this registration builds a new parameter (defer it) rather than loads one."""
    if getattr(_state, "loading", 0):
        return False
    if module._parameters.get(name) is not None:
        return False  # a value assigned over a registered parameter
    return not _inside_loader_function()


def _register_deferred(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    recorder: DeferredParameters | None = getattr(_state, "recorder", None)
    if recorder is not None and type(param) is nn.Parameter and _constructing(self, name):
        # Parameters derived from deferred ones (weight_norm's g and v) are meta already.
        # Our own ops here need no RandomDraws' look (a meta stand-in holds no value).
        with torch._C.DisableTorchFunction():
            if param.device != _META:
                param = nn.Parameter(torch.empty_like(param, device=_META), requires_grad=param.requires_grad)
            _original_register(self, name, param)
        recorder.records.append((weakref.ref(self), name))
        return
    _original_register(self, name, param)


def _load_state_dict_not_deferred(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    _state.loading = getattr(_state, "loading", 0) + 1
    try:
        return _original_load_state_dict(self, *args, **kwargs)
    finally:
        _state.loading -= 1


class deferred_parameters:  # noqa: N801  (used as ``with deferred_parameters() as deferred:``)
    """Defer parameters registered in this thread until exit; yields the ``DeferredParameters``.

    Blocks nest: an inner block records its own parameters, and the outer
    block's recorder is back when it exits.
    """

    def __enter__(self) -> DeferredParameters:
        global _depth
        _build_lock.acquire()
        self._saved = (getattr(_state, "recorder", None), getattr(_state, "outer_frame", None))
        if _depth == 0:
            nn.Module.register_parameter = _register_deferred  # type: ignore[method-assign]
            nn.Module.load_state_dict = _load_state_dict_not_deferred  # type: ignore[method-assign]
        _depth += 1
        recorder = DeferredParameters()
        _state.recorder = recorder
        # Only loaders called from inside the block count: the whole load may itself
        # run inside one (upstream's ``StableAudioModel.from_pretrained``).
        _state.outer_frame = sys._getframe(1)
        return recorder

    def __exit__(self, *exc: object) -> None:
        global _depth
        _state.recorder, _state.outer_frame = self._saved
        _depth -= 1
        if _depth == 0:
            nn.Module.register_parameter = _original_register  # type: ignore[method-assign]
            nn.Module.load_state_dict = _original_load_state_dict  # type: ignore[method-assign]
        _build_lock.release()


@contextlib.contextmanager
def not_deferred() -> Iterator[None]:
    """Build for real inside a deferral block (a nested load's faithful build, say)."""
    saved = (getattr(_state, "recorder", None), getattr(_state, "outer_frame", None))
    _state.recorder = None
    try:
        yield
    finally:
        _state.recorder, _state.outer_frame = saved


# The two builds.
def _customises_loading(model: nn.Module) -> bool:
    return any(
        type(m)._load_from_state_dict is not nn.Module._load_from_state_dict
        or m._load_state_dict_pre_hooks
        or m._load_state_dict_post_hooks
        for m in model.modules()
    )


def load_faithful(model: nn.Module, source: Header, values: Values) -> LoadResult:
    """Upstream's ``copy_state_dict`` with values from ``values``."""
    state = model.state_dict()
    assign, result = plan_keys(source, state)
    for key, name in assign.items():
        state[key] = values.get(name, state[key].dtype, final=False)
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


class _FastBuildRefused(Exception):
    """Why the fast build cannot give upstream's model: the faithful build runs instead."""


def _about_meta(exc: BaseException) -> bool:
    """Whether an error (or one it came from) is torch refusing a meta tensor's data."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if "meta" in str(seen).lower():
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _build_deferred(factory: Factory, config: Any) -> tuple[nn.Module, DeferredParameters, RandomDraws]:
    """The factory's model with its parameters deferred, and what it drew at random. Its
    own errors pass through as they are, so it runs once; only an error about meta tensors
    (a constructor that reads a parameter's value) means: build it for real instead."""
    try:
        with deferred_parameters() as deferred, RandomDraws() as draws:
            return factory(config), deferred, draws
    except Exception as exc:
        if not _about_meta(exc):
            raise
        raise _FastBuildRefused(f"the factory needs real parameters ({type(exc).__name__}: {exc})") from exc


def _deferred_ids(model: nn.Module, deferred: DeferredParameters, assign: dict[str, str]) -> set[int]:
    """The deferred parameters, each of which the checkpoint must cover."""
    keys_of: dict[int, list[str]] = defaultdict(list)
    for key, param in model.named_parameters(remove_duplicate=False):
        keys_of[id(param)].append(key)
    ids = set()
    for module, name in deferred.still_deferred():
        deferred_param = module._parameters[name]
        if not any(k in assign for k in keys_of.get(id(deferred_param), ())):
            raise _FastBuildRefused(f"parameter {type(module).__name__}.{name} is not in the checkpoint")
        ids.add(id(deferred_param))
    return ids


# Nested containers (dicts, lists, tuples, sets) searched for tensors in module attributes.
CONTAINER_DEPTH = 4


def _tensors_in(value: Any, depth: int = CONTAINER_DEPTH) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, depth - 1)
    elif depth and isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from _tensors_in(v, depth - 1)


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def _holds_meta(value: Any) -> bool:
    return any(t.is_meta for t in _tensors_in(value))


# torch functions that draw from a generator.
RANDOM_DRAWS = frozenset(
    "rand randn randint randperm rand_like randn_like randint_like normal bernoulli multinomial"
    " poisson dropout uniform_ normal_ random_ exponential_ geometric_ log_normal_ cauchy_ bernoulli_".split()
)


class RandomDraws(TorchFunctionMode):
    """While active, marks every real tensor that holds values drawn at random, or
    computed from such (an in-place op marks the tensor it writes).

    A value drawn while the factory runs deferred is not upstream's: upstream's
    generator is further on by then, having run the random init the fast build skips.
    """

    def __init__(self) -> None:
        super().__init__()
        self._drawn: dict[int, weakref.ref[torch.Tensor]] = {}  # by id; the ref tells a reused id

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in RANDOM_DRAWS and name.endswith("_") and args and _is_meta(args[0]):
            return args[0]  # the init of a deferred stand-in: meta draws nothing, so skip it
        out = func(*args, **kwargs) if kwargs else func(*args)
        # Nothing is scanned until something real was drawn: a build on meta costs one call per op.
        if name in RANDOM_DRAWS or (self._drawn and self._reads_drawn(args, kwargs)):
            written = list(_tensors_in(out, 2))
            if name.endswith("_") and args and isinstance(args[0], torch.Tensor):
                written.append(args[0])  # in place (also __setitem__, which returns None)
            for t in written:
                self._mark(t)
        return out

    def _reads_drawn(self, args: tuple, kwargs: dict | None) -> bool:
        """Whether an argument (or a tensor in a list or tuple argument) holds drawn values."""
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, torch.Tensor):
                if self.drawn(value):
                    return True
            elif isinstance(value, (list, tuple)):
                if any(isinstance(v, torch.Tensor) and self.drawn(v) for v in value):
                    return True
        return False

    def _mark(self, tensor: torch.Tensor) -> None:
        for t in (tensor, tensor._base):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._drawn[id(t)] = weakref.ref(t)

    def any_drawn(self) -> bool:
        return bool(self._drawn)

    def drawn(self, tensor: torch.Tensor) -> bool:
        for t in (tensor, tensor._base):
            ref = self._drawn.get(id(t))
            if ref is not None and ref() is t:
                return True
        return False


# What every nn.Module keeps about itself (hooks, flags, the child modules): never a
# tensor of the model's own, so the checks below need not look inside.
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module())) - {"_parameters", "_buffers"}
_CONTAINERS = (torch.Tensor, dict, list, tuple, set, frozenset)
Attributes = list[tuple[str, nn.Module, str, Any]]


def _tensor_attributes(model: nn.Module) -> Attributes:
    """(module prefix, module, attribute, value) of every attribute that is or may hold a
    tensor, parameters and buffers included: one walk for every check of the build
    (three walks of every attribute were a fifth of a small model's cache hit)."""
    return [
        (prefix, module, attr, value)
        for prefix, module in model.named_modules()
        for attr, value in vars(module).items()
        if attr not in _MODULE_BOOKKEEPING and isinstance(value, _CONTAINERS)
    ]


def _refuse_random(attributes: Attributes, assign: dict[str, str], draws: RandomDraws) -> None:
    """``_FastBuildRefused`` when the model keeps a value drawn at random while it was
    built: a buffer the checkpoint does not replace, or a tensor attribute."""
    if not draws.any_drawn():  # the usual build draws nothing real, so keeps nothing drawn
        return
    for prefix, module, attr, value in attributes:
        if attr == "_parameters":  # every parameter is placed from the file
            continue
        if attr == "_buffers":
            value = {n: b for n, b in value.items() if f"{prefix}.{n}".lstrip(".") not in assign}
        for tensor in _tensors_in(value):
            if draws.drawn(tensor):
                where = f"{prefix}.{attr}" if prefix else attr
                raise _FastBuildRefused(
                    f"{where} ({type(module).__name__}) keeps values drawn at random while it was built"
                )


def _refuse_meta(attributes: Attributes, *, skip: set[tuple[int, str]], parameters: bool) -> None:
    """``_FastBuildRefused`` when a tensor in ``attributes`` (their values now) is still on meta.

    A tensor the constructor derived from a deferred parameter (a buffer, an
    attribute, a value kept in a dict) is meta, and only weight_norm's is redone
    from the file: any other means upstream's model cannot be given fast.
    ``parameters=False`` leaves parameters out (before they are placed).
    """
    for prefix, module, attr, _ in attributes:
        if (attr == "_parameters" and not parameters) or (id(module), attr) in skip:
            continue
        if _holds_meta(vars(module).get(attr)):  # read now: placing replaced some
            where = f"{prefix}.{attr}" if prefix else attr
            raise _FastBuildRefused(f"{where} ({type(module).__name__}) was computed from a parameter")


def _place_parameters(
    model: nn.Module, assign: dict[str, str], deferred_ids: set[int], values: Values, device: torch.device
) -> None:
    """Give every deferred parameter its final value; copy the rest (buffers) as upstream does.

    Not ``load_state_dict(assign=True)``: it would keep each file tensor's own
    dtype, where upstream copies into the model's dtype and casts after; placing
    here keeps upstream's cast chain (``Values``) and lets weights go straight
    to the device.
    """
    state = model.state_dict(keep_vars=True)
    placed: dict[int, nn.Parameter] = {}
    with torch.no_grad():
        to_place = [(key, name) for key, name in assign.items() if id(state[key]) in deferred_ids]
        loaded = values.get_many([(name, state[key].dtype) for key, name in to_place], device)
        for (key, _), value in zip(to_place, loaded, strict=True):
            placed[id(state[key])] = nn.Parameter(
                _with_strides_of(state[key], value), requires_grad=state[key].requires_grad
            )
        for key, name in assign.items():
            if id(state[key]) not in deferred_ids:
                state[key].copy_(values.get(name, state[key].dtype, final=False))
    for module in model.modules():
        for pname, registered in module._parameters.items():
            if registered is not None and id(registered) in placed:
                module._parameters[pname] = placed[id(registered)]


def _with_strides_of(stand_in: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` laid out as the constructor laid out its parameter (transposed, channels-last):
    upstream copies into the parameter it built, so its strides are the constructor's.

    The deferred stand-in kept them (``empty_like``); file values are contiguous. The
    rare parameter that is not costs one copy (and, on a hit, is no longer a mapped view).
    """
    if value.numel() < 2 or stand_in.stride() == value.stride():
        return value
    laid_out = torch.empty_strided(stand_in.shape, stand_in.stride(), dtype=value.dtype, device=value.device)
    return laid_out.copy_(value)


def _recompute_weight_norm(
    wn_hooks: list[tuple[str, nn.Module, WeightNorm]], assign: dict[str, str], values: Values
) -> None:
    """Old-style weight_norm keeps ``weight`` as a plain fp32 CPU attribute computed at
    construction. Upstream's is computed from its random init; ours from the
    checkpoint's g and v (what every forward recomputes it to anyway)."""
    for prefix, module, hook in wn_hooks:
        g_key, v_key = f"{prefix}.{hook.name}_g".lstrip("."), f"{prefix}.{hook.name}_v".lstrip(".")
        # The meta stand-in computed during the build tells whether upstream's had a graph.
        needs_grad = getattr(module, hook.name).requires_grad
        g, v = (
            values.tensor(values.source, assign[key]).to(torch.float32, copy=True).requires_grad_(needs_grad)
            for key in (g_key, v_key)
        )
        with torch.set_grad_enabled(needs_grad):
            setattr(module, hook.name, torch._weight_norm(v, g, hook.dim))


def _build_fast(
    factory: Factory, config: Any, source: Header, values: Values, device: torch.device
) -> tuple[nn.Module, LoadResult]:
    """Model with every parameter placed from the file, or ``_FastBuildRefused`` saying why not."""
    model, deferred, draws = _build_deferred(factory, config)
    if _customises_loading(model):
        raise _FastBuildRefused("a module customises state-dict loading")
    assign, result = plan_keys(source, model.state_dict(keep_vars=True))
    attributes = _tensor_attributes(model)
    _refuse_random(attributes, assign, draws)
    deferred_ids = _deferred_ids(model, deferred, assign)
    wn_hooks = _weight_norm_hooks(model)
    recomputed = {(id(m), h.name) for _, m, h in wn_hooks}
    _refuse_meta(attributes, skip=recomputed, parameters=False)
    _place_parameters(model, assign, deferred_ids, values, device)
    _recompute_weight_norm(wn_hooks, assign, values)
    # Only the parameters and weight_norm's attributes were replaced since the check above.
    replaced = [a for a in attributes if a[2] == "_parameters" or (id(a[1]), a[2]) in recomputed]
    _refuse_meta(replaced, skip=set(), parameters=True)
    return model, result


@dataclass
class Built:
    """What ``build`` made, and how."""

    model: nn.Module
    result: LoadResult  # what was skipped, as copy_state_dict would have
    kind: BuildKind
    fallback: str | None  # why not fast


def build(factory: Factory, config: Any, source: Header, values: Values, device: torch.device) -> Built:
    """Fast build when it gives upstream's model, else upstream's own build."""
    rng = torch.random.get_rng_state()
    fallback = None
    try:
        model, result = _build_fast(factory, config, source, values, device)
    except _FastBuildRefused as refused:
        fallback = str(refused)
        logger.info("%s: using upstream's full build (%s)", source.path, fallback)
        values.forget_counts()  # what the abandoned fast build read does not count
        torch.random.set_rng_state(rng)
        with not_deferred():  # inside a factory that is itself being built deferred
            model = factory(config)
        result = load_faithful(model, source, values)
    log_skipped(result)
    _warn_random_init(model, result, source)
    return Built(model, result, "fast" if fallback is None else "faithful", fallback)


MISSING_NAMES_SHOWN = 5


def _warn_random_init(model: nn.Module, result: LoadResult, source: Header) -> None:
    """Upstream is silent when a config is deeper than its checkpoint; say it once."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    missing = [key for key in result.missing_keys if key in parameters]
    if missing:
        shown = ", ".join(missing[:MISSING_NAMES_SHOWN]) + (
            ", ..." if len(missing) > MISSING_NAMES_SHOWN else ""
        )
        logger.warning(
            "%s: %d parameters are not in the checkpoint and keep their random init (%s)",
            source.path,
            len(missing),
            shown,
        )

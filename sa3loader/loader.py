"""``load_diffusion_cond`` and the generic load-into-module it is built on.

Two ways to build, one result. The fast path builds the model with deferred
parameters (no random init, no fp32 allocation) and places each weight
straight from the file (``_values``: mapped, read, or streamed to the device).
The faithful path is upstream's own: real init, then ``load_state_dict``.
The fast path is taken only when it can give
the identical model: every deferred parameter is covered by the checkpoint
and no module customises state-dict loading; otherwise the faithful path runs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm

from . import _config, _upstream
from ._defer import DeferredParameters, deferred_parameters, not_deferred
from ._format import Header, check_unchanged, open_header
from ._fsutil import resolve_cache_dir
from ._keys import LoadResult, plan_keys
from ._sibling import SiblingOutcome, resolve_sibling
from ._values import Values, resolve_io, streams_to
from .errors import UpstreamNotFoundError

logger = logging.getLogger(__name__)

Factory = Callable[[Any], nn.Module]


@dataclass
class LoadInfo:
    """What the last ``load_diffusion_cond`` in this process did."""

    source: str = ""
    sibling: str | None = None
    model_half: bool = False
    cache_hit: bool = False
    converted: bool = False
    build: str = ""  # "fast", "faithful" or "upstream" (SA3LOADER_DISABLE)
    io: str = ""  # "mmap" or "read" on the CPU; "stream" straight to another device
    bytes_read: int = 0  # weight bytes placed as read from a file, with no cast
    staging_bytes: int = 0  # host buffers (pinned when possible) used to stream to a device
    reason: str = ""
    fallback: str | None = None
    overflow_to_inf: int | None = None
    flushed_to_zero: int | None = None
    timings: dict[str, float] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)
    result: LoadResult = field(default_factory=LoadResult)


_last_info = LoadInfo()


def last_load_info() -> LoadInfo:
    """Report of the last load in this process (cache hit, conversion, fallback, timings)."""
    return _last_info


def _finish(model: nn.Module, device: torch.device | str, half: bool) -> nn.Module:
    model.to(device).eval().requires_grad_(False)
    if half:
        model.to(torch.float16)
    return model


def _customises_loading(model: nn.Module) -> bool:
    return any(
        type(m)._load_from_state_dict is not nn.Module._load_from_state_dict
        or m._load_state_dict_pre_hooks
        or m._load_state_dict_post_hooks
        for m in model.modules()
    )


def _load_faithful(model: nn.Module, source: Header, values: Values) -> LoadResult:
    """Upstream's ``copy_state_dict`` with values from ``values``."""
    state = model.state_dict()
    assign, result = plan_keys(source, state)
    for key, name in assign.items():
        state[key] = values.get(name, state[key].dtype, final=False)
    model.load_state_dict(state, strict=False)
    return result


def _log_skipped(result: LoadResult) -> None:
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


def _build_deferred(factory: Factory, config: Any) -> tuple[nn.Module, DeferredParameters]:
    """The factory's model with its parameters deferred. Its own errors pass through as they
    are, so it runs once; only an error about meta tensors (a constructor that reads a
    parameter's value) means: build it for real instead."""
    try:
        with deferred_parameters() as deferred:
            return factory(config), deferred
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


def _holds_meta(value: Any, depth: int = CONTAINER_DEPTH) -> bool:
    if isinstance(value, torch.Tensor):
        return value.is_meta
    if depth and isinstance(value, dict):
        return any(_holds_meta(v, depth - 1) for v in value.values())
    if depth and isinstance(value, (list, tuple, set, frozenset)):
        return any(_holds_meta(v, depth - 1) for v in value)
    return False


def _refuse_meta(model: nn.Module, *, skip: set[tuple[int, str]], parameters: bool) -> None:
    """``_FastBuildRefused`` when a tensor anywhere in the model is still on meta.

    A tensor the constructor derived from a deferred parameter (a buffer, an
    attribute, a value kept in a dict) is meta, and only weight_norm's is redone
    from the file: any other means upstream's model cannot be given fast.
    ``parameters=False`` leaves parameters out (before they are placed).
    """
    for prefix, module in model.named_modules():
        for attr, value in vars(module).items():
            if attr == "_modules" or (attr == "_parameters" and not parameters) or (id(module), attr) in skip:
                continue
            if _holds_meta(value):
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
            placed[id(state[key])] = nn.Parameter(value, requires_grad=state[key].requires_grad)
        for key, name in assign.items():
            if id(state[key]) not in deferred_ids:
                state[key].copy_(values.get(name, state[key].dtype, final=False))
    for module in model.modules():
        for pname, registered in module._parameters.items():
            if registered is not None and id(registered) in placed:
                module._parameters[pname] = placed[id(registered)]


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
    model, deferred = _build_deferred(factory, config)
    if _customises_loading(model):
        raise _FastBuildRefused("a module customises state-dict loading")
    assign, result = plan_keys(source, model.state_dict(keep_vars=True))
    deferred_ids = _deferred_ids(model, deferred, assign)
    wn_hooks = _weight_norm_hooks(model)
    _refuse_meta(model, skip={(id(m), h.name) for _, m, h in wn_hooks}, parameters=False)
    _place_parameters(model, assign, deferred_ids, values, device)
    _recompute_weight_norm(wn_hooks, assign, values)
    _refuse_meta(model, skip=set(), parameters=True)
    return model, result


def _build(
    factory: Factory, config: Any, source: Header, values: Values, device: torch.device, info: LoadInfo
) -> nn.Module:
    """Fast build when it gives upstream's model, else upstream's own build."""
    rng = torch.random.get_rng_state()
    try:
        model, result = _build_fast(factory, config, source, values, device)
    except _FastBuildRefused as refused:
        why_not = str(refused)
        logger.info("%s: using upstream's full build (%s)", source.path, why_not)
        info.fallback = why_not
        values.forget_counts()  # what the abandoned fast build read does not count
        torch.random.set_rng_state(rng)
        with not_deferred():  # inside a factory that is itself being built deferred
            model = factory(config)
        result = _load_faithful(model, source, values)
        info.build = "faithful"
    else:
        info.build = "fast"
    # The faithful build reads on the CPU and moves the model, as upstream does.
    info.io = "stream" if streams_to(device) and info.build == "fast" else values.cpu_io
    info.bytes_read = values.bytes_read
    info.staging_bytes = values.staging_bytes
    _log_skipped(result)
    _warn_random_init(model, result, source)
    info.result = result
    return model


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
            source.path, len(missing), shown,
        )  # fmt: skip


def load_into_module(
    module: nn.Module, ckpt_path: str | os.PathLike[str], *, io: str | None = None
) -> LoadResult:
    """Load a safetensors checkpoint into any module with upstream's semantics.

    Same as ``copy_state_dict(module, load_file(ckpt_path))``: keys are remapped
    by dropping one component, unknown keys and shape mismatches are skipped,
    parameters missing from the file keep their values. Returns what was skipped.
    """
    io_mode = resolve_io(io)
    with open_header(ckpt_path) as source, Values(source, None, half=False, io=io_mode) as values:
        result = _load_faithful(module, source, values)
        check_unchanged(source)
    _log_skipped(result)
    return result


def _upstream_original() -> Callable[..., nn.Module]:
    original = _upstream.original_load_diffusion_cond()
    if original is None:
        raise UpstreamNotFoundError(
            f"${_config.DISABLE_ENV}=1 calls upstream's load_diffusion_cond, "
            "but stable_audio_3 is not importable"
        )
    return original


def _record_sibling(info: LoadInfo, outcome: SiblingOutcome, source: Header) -> None:
    """What resolving the sibling did, into ``info``; one warning if values overflowed."""
    info.reason, info.events = outcome.reason, outcome.events
    info.sibling = outcome.sibling.path if outcome.sibling is not None else None
    info.converted = outcome.converted is not None
    info.cache_hit = outcome.sibling is not None and not info.converted
    if outcome.converted is not None:
        info.overflow_to_inf = outcome.converted.overflow_to_inf
        info.flushed_to_zero = outcome.converted.flushed_to_zero
        info.timings["convert_s"] = outcome.converted.seconds
        if info.overflow_to_inf:
            logger.warning(
                "%s: %d finite values overflow fp16 and became inf (model.to(torch.float16) does the same)",
                source.path, info.overflow_to_inf,
            )  # fmt: skip


def load_diffusion_cond(
    model_config: Any,
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device = "cuda",
    model_half: bool = False,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    model_factory: Factory | None = None,
    verify: bool | None = None,
    io: str | None = None,
) -> nn.Module:
    """Drop-in for ``stable_audio_3.loading_utils.load_diffusion_cond``.

    With ``model_half=True`` the fp32 checkpoint is converted once to an fp16
    sibling, which later loads read instead. The model is bit for bit the one
    upstream returns. ``verify`` (or $SA3LOADER_VERIFY=1) re-checks the sibling's
    full content against the source before using it. For a CPU ``device``,
    ``io`` (or $SA3LOADER_IO) picks "mmap" (default, zero-copy) or "read" (plain
    reads into fresh memory); other devices are streamed to through a small
    ring of pinned buffers.
    """
    global _last_info
    info = LoadInfo(source=os.fspath(ckpt_path), model_half=bool(model_half))
    _last_info = info
    if _config.disabled():
        info.build = "upstream"
        with not_deferred():  # a load nested in a factory being built deferred
            if model_factory is None:
                return _upstream_original()(model_config, ckpt_path, device, model_half)
            model = model_factory(model_config)
        info.result = load_into_module(model, ckpt_path)
        return _finish(model, device, bool(model_half))

    started = time.perf_counter()
    requested_io = _config.io_mode(io)  # a bad value fails before any work
    factory = (
        model_factory
        if model_factory is not None
        else _upstream.factory_function("create_diffusion_cond_from_config")
    )
    info.timings["import_s"] = time.perf_counter() - started  # stable_audio_3's, the first time
    sibling_started = time.perf_counter()
    target = torch.device(device)
    torch.empty(0).to(target)  # raises exactly as upstream's model.to(device) would, before any work
    with open_header(ckpt_path) as source:
        outcome = SiblingOutcome(reason="fp32 load")
        if model_half:
            outcome = resolve_sibling(
                source, resolve_cache_dir(cache_dir), verify=_config.verify(verify), keep_open=True
            )
        with outcome:
            info.timings["sibling_s"] = time.perf_counter() - sibling_started
            _record_sibling(info, outcome, source)
            build_started = time.perf_counter()
            io_mode = resolve_io(requested_io, outcome.sibling.path if outcome.sibling is not None else None)
            with Values(source, outcome.sibling, bool(model_half), io_mode) as values:
                values.prefetch_early(target)
                model = _build(factory, model_config, source, values, target, info)
            check_unchanged(source)  # a rewrite in place during the load: never a mix of two versions
    _finish(model, target, bool(model_half))
    now = time.perf_counter()
    info.timings["build_s"] = now - build_started
    info.timings["read_s"] = values.read_seconds
    info.timings["total_s"] = now - started
    logger.info(
        "loaded %s: %s, %s build, %.2fs", source.path, info.reason, info.build, info.timings["total_s"]
    )
    _last_info = info  # again: loads nested in the factory set it meanwhile
    return model


AUTOENCODER_PREFIX = "pretransform.model."


def load_autoencoder(
    config_path: str | os.PathLike[str],
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device = "cpu",
    *,
    model_factory: Factory | None = None,
    io: str | None = None,
) -> nn.Module:
    """Drop-in for ``stable_audio_3.loading_utils.load_autoencoder``.

    Reads only the ``pretransform.model.`` tensors of a combined checkpoint (or
    every tensor of a bare autoencoder checkpoint), fp32, and returns
    ``autoencoder.to(device)``: like upstream, not switched to eval mode.
    """
    global _last_info
    info = LoadInfo(source=os.fspath(ckpt_path), reason="autoencoder fp32 load")
    _last_info = info
    with open(config_path) as f:
        config = json.load(f)
    if model_factory is None:
        create = _upstream.factory_function("create_autoencoder_from_config")
        model_factory = lambda cfg: create(cfg["model"], cfg["sample_rate"])  # noqa: E731
    factory = model_factory
    io_mode = resolve_io(io)
    target = torch.device(device)
    torch.empty(0).to(target)
    with open_header(ckpt_path) as whole:
        source = whole
        if any(e.name.startswith(AUTOENCODER_PREFIX) for e in whole.entries):
            source = whole.subset(AUTOENCODER_PREFIX)
        with Values(source, None, half=False, io=io_mode) as values:
            model = _build(factory, config, source, values, target, info)
        check_unchanged(whole)
    _last_info = info
    return model.to(target)

"""The public loaders: ``load_diffusion_cond``, ``load_autoencoder``, ``load_into_module``.

A load reads top to bottom: open the checkpoint (``_format``), find or make its
fp16 sibling (``_sibling``), read the final values in upstream's cast order
(``_values``), build the model fast or upstream's way (``_build``), finish as
upstream does (``.to(device).eval()``, then fp16). ``last_load_info()`` says what
the last load did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from . import _config, _faults, _upstream
from ._build import (
    BuildKind,
    Built,
    Factory,
    LoadResult,
    build,
    load_faithful,
    log_skipped,
    not_deferred,
)
from ._cache_admin import Eviction
from ._cache_dir import resolve_cache_dir
from ._config import IoMode
from ._format import Header, check_unchanged, open_for_reading, open_header
from ._resolver import resolve_sibling
from ._sibling import SiblingFinder, SiblingOutcome
from ._values import Values, resolve_io, streams_to
from .errors import ConfigError, UpstreamNotFoundError

logger = logging.getLogger(__name__)

DISABLED_REASON = f"${_config.DISABLE_ENV}=1: upstream's own loader"


@dataclass
class LoadInfo:
    """What one load did (``last_load_info()``).

    ``reason`` is one line: ``fp32 load``, ``cache hit``, ``cache hit (published what a previous
    process wrote)``, ``converted``, ``converted by another load``, ``no float32 tensors:
    loaded as is``, ``already fp16 (an sa3loader output): loaded as is``, ``meta device:
    upstream's build and load``, ``autoencoder fp32 load``, ``DISABLED_REASON``
    (``$SA3LOADER_DISABLE=1: upstream's own loader``), or why no sibling could be used, ending
    in ``loading the fp32 source``.

    ``events``, in order, what the sibling check met: ``adopted`` (a valid sibling without an
    index row), ``revalidated`` (its fingerprint read again: the source was copied or touched,
    the row was racy or another version's, or the filesystem's stat cannot vouch),
    ``stale sibling P``, ``source changed since it was indexed``, ``source content changed since
    P was written``, ``sibling P changed since it was indexed``, ``P was written by another
    sa3loader version``, ``untrusted sibling P``, ``content check failed for P`` (``verify``),
    ``published P, which a previous process wrote``, ``publishing the sibling in the background``.

    ``timings`` in seconds: ``import_s`` (``stable_audio_3``'s factory, the first time),
    ``sibling_s`` (finding, checking or converting the sibling), ``build_s``, ``read_s``
    (placing weights), ``total_s``, and ``convert_s`` when it converted; of a
    ``load_autoencoder``, ``build_s``, ``read_s`` and ``total_s``; on the meta device,
    ``import_s`` and ``total_s``; with ``DISABLED_REASON``, ``total_s`` alone.
    """

    source: str = ""  # the checkpoint as given
    sibling: str | None = None  # the sibling read; None: the fp32 checkpoint was read
    model_half: bool = False
    cache_hit: bool = False  # a valid sibling was found (or published from what a process left)
    converted: bool = False  # this load wrote the sibling
    build: BuildKind | Literal["upstream", ""] = ""  # "upstream": SA3LOADER_DISABLE; "": not built yet
    io: IoMode | Literal["stream", ""] = ""  # how CPU weights were read; "stream": to another device
    bytes_read: int = 0  # file tensors' bytes read into fresh memory (or streamed), cast after or not
    bytes_mapped: int = 0  # file tensors' bytes placed as views of the sibling's mapping (faulted in on use)
    staging_bytes: int = 0  # host buffers used to stream to a device (what was pinned, when pinned)
    staging_pinned: bool = False  # the staging buffers were pinned (page-locked) memory
    reason: str = ""  # see above
    fallback: str | None = None  # why the fast build was refused
    # The fp16 range report: finite checkpoint values that are inf in fp16, nonzero ones that
    # are 0, over every float dtype; counted by the conversion from the checkpoint's dtypes (a
    # hit reports what its conversion recorded); None when nothing was converted. A value the
    # model casts elsewhere (an fp32 tensor into a bf16 parameter) is counted as fp16 holds it.
    overflow_to_inf: int | None = None
    flushed_to_zero: int | None = None
    timings: dict[str, float] = field(default_factory=dict)  # see above
    events: list[str] = field(default_factory=list)  # see above
    # The keys upstream's copy_state_dict would skip, and the parameters left at their init.
    result: LoadResult = field(default_factory=LoadResult)
    settings: _config.Settings | None = None  # what the load read from its arguments and the environment


class _Reports:
    """The last load of each thread, and of the process: the one owner of load reports.

    Per thread, so that in a threaded server a thread reads the load it made; a
    thread that made none (asking from an event loop for a load run in an
    executor) reads the last load in the process.
    """

    def __init__(self) -> None:
        self._mine = threading.local()
        self._process = LoadInfo()

    def record(self, info: LoadInfo) -> None:
        self._mine.info = info
        self._process = info

    def last(self) -> LoadInfo:
        mine: LoadInfo | None = getattr(self._mine, "info", None)
        return mine if mine is not None else self._process

    @contextlib.contextmanager
    def recording(self, info: LoadInfo) -> Iterator[None]:
        """``info`` is the last load while it runs and after, recorded again at its end (loads
        nested in its factory recorded theirs); one that fails leaves the reports as they were."""
        mine, process = getattr(self._mine, "info", None), self._process
        self.record(info)
        try:
            yield
        except BaseException:
            self._mine.info = mine
            if self._process is info:  # not another thread's load since
                self._process = process
            raise
        self.record(info)


_reports = _Reports()


def last_load_info() -> LoadInfo:
    """What the last load made by this thread did (cache hit, conversion, fallback, timings);
    where this thread made none, the last load in the process. A load nested in a model
    factory does not replace its outer load's report."""
    return _reports.last()


def _now() -> float:
    """The clock of a load's timings (a test may run it on a clock of its own)."""
    return _faults.fact("clock", None, time.perf_counter())


def _finish(model: nn.Module, device: torch.device | str | int | None, half: bool) -> nn.Module:
    model.to(device).eval().requires_grad_(False)
    if half:
        model.to(torch.float16)
    return model


def _target_device(device: str | torch.device | int | None) -> torch.device:
    """The device weights go to; None is the CPU, as upstream's ``model.to(None)`` leaves it.

    Fails exactly as upstream's ``model.to(device)`` would, before any work.
    """
    target = torch.device("cpu") if device is None else torch.device(device)
    torch.empty(0).to(target)
    return target


def _on_meta(
    factory: Factory, config: Any, device: Any, half: bool, source: Header, info: LoadInfo
) -> nn.Module:
    """Upstream's build, load and ``.to("meta")``, the load not skipped: a plain tensor that shares
    a parameter's memory (old-style spectral_norm's ``weight``, a ``.data`` kept) stays on the CPU
    with the loaded values, and a module's own load checks may raise. The fp32 file is read,
    through the load's descriptor; no sibling is made.
    """
    with not_deferred():
        model = factory(config)
    info.result, info.bytes_read = _copy_state_dict(model, source, "read")
    info.build, info.io, info.reason = "faithful", "read", "meta device: upstream's build and load"
    return _finish(model, device, half)


def _built(built: Built, values: Values, device: torch.device, info: LoadInfo) -> nn.Module:
    """Record in ``info`` how the model was built and read; the model."""
    info.build, info.fallback, info.result = built.kind, built.fallback, built.result
    if built.kind == "faithful":  # upstream's: the checkpoint read on the CPU, the model moved
        info.io, info.sibling = "read", None
    else:
        info.io = "stream" if streams_to(device) else values.cpu_io
    info.bytes_read = values.bytes_read
    info.bytes_mapped = values.bytes_mapped
    info.staging_bytes = values.staging_bytes
    info.staging_pinned = values.staging_pinned
    return built.model


def load_into_module(
    module: nn.Module, ckpt_path: str | os.PathLike[str], *, io: str | None = None
) -> LoadResult:
    """Load a safetensors checkpoint into any module with upstream's semantics.

    Same as ``copy_state_dict(module, load_file(ckpt_path))``: keys are remapped
    by dropping one component, unknown keys and shape mismatches are skipped,
    parameters missing from the file keep their values. Returns what was skipped.
    """
    io_mode = resolve_io(_config.io_mode(io))
    with open_header(ckpt_path) as source:
        return _copy_state_dict(module, source, io_mode)[0]


def _copy_state_dict(module: nn.Module, source: Header, io_mode: IoMode) -> tuple[LoadResult, int]:
    """Upstream's ``copy_state_dict(module, load_file(...))`` through ``source``'s descriptor
    (a rewrite in place meanwhile: ``CheckpointChangedError``); what was skipped (logged), and
    the bytes read."""
    with Values(source, None, half=False, io=io_mode) as values:
        result = load_faithful(module, source, values)
        check_unchanged(source)
    log_skipped(result)
    return result, values.bytes_read


def _upstream_original() -> Callable[..., nn.Module]:
    original = _upstream.original_load_diffusion_cond()
    if original is None or original in (load_diffusion_cond, load):  # set by hand: it would recurse
        why = "is not importable" if original is None else "has sa3loader's there (use install())"
        raise UpstreamNotFoundError(
            f"${_config.DISABLE_ENV}=1 calls upstream's load_diffusion_cond, but stable_audio_3 {why}"
        )
    return original


def _record_sibling(info: LoadInfo, outcome: SiblingOutcome, source: Header) -> None:
    """What resolving the sibling did, into ``info``; one warning if values overflowed."""
    info.reason, info.events = outcome.reason, outcome.events
    info.sibling = outcome.sibling.path if outcome.sibling is not None else None
    info.converted = outcome.converted is not None
    info.cache_hit = outcome.sibling is not None and not info.converted
    if info.cache_hit and outcome.stored_range is not None:  # what the conversion counted
        info.overflow_to_inf = outcome.stored_range.overflow_to_inf
        info.flushed_to_zero = outcome.stored_range.flushed_to_zero
    if outcome.converted is not None:
        info.overflow_to_inf = outcome.converted.overflow_to_inf
        info.flushed_to_zero = outcome.converted.flushed_to_zero
        info.timings["convert_s"] = outcome.converted.seconds
        if info.overflow_to_inf:
            logger.warning(
                "%s: %d finite values overflow fp16 and became inf (model.to(torch.float16) does the same)",
                source.path,
                info.overflow_to_inf,
            )


class Loaded(NamedTuple):
    """What ``load`` returns: the model, and what this load did."""

    model: nn.Module
    info: LoadInfo


def load(
    model_config: Any,
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device | int | None = "cuda",
    model_half: bool = False,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    model_factory: Factory | None = None,
    verify: bool | None = None,
    io: str | None = None,
) -> Loaded:
    """``load_diffusion_cond``'s model with this load's ``LoadInfo``: for code that makes loads
    in several threads or tasks and wants each one's report, not the thread's last (which
    ``last_load_info()`` still gives)."""
    info = LoadInfo(source=os.fspath(ckpt_path), model_half=bool(model_half))
    with _reports.recording(info):
        model = _load_into(
            info,
            model_config,
            ckpt_path,
            device,
            model_half,
            cache_dir=cache_dir,
            model_factory=model_factory,
            verify=verify,
            io=io,
        )
    return Loaded(model, info)


def load_diffusion_cond(
    model_config: Any,
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device | int | None = "cuda",
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
    return load(
        model_config,
        ckpt_path,
        device,
        model_half,
        cache_dir=cache_dir,
        model_factory=model_factory,
        verify=verify,
        io=io,
    ).model


def _load_into(
    info: LoadInfo,
    model_config: Any,
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device | int | None = "cuda",
    model_half: bool = False,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    model_factory: Factory | None = None,
    verify: bool | None = None,
    io: str | None = None,
) -> nn.Module:
    """The load itself, recording what it does in ``info`` (``load``'s)."""
    started = _now()
    # A bad value fails before any work.
    info.settings = settings = _config.load_settings(io=io, verify=verify)
    if settings.disabled:
        info.build, info.reason = "upstream", DISABLED_REASON
        with not_deferred():  # a load nested in a factory being built deferred
            if model_factory is None:
                model = _upstream_original()(model_config, ckpt_path, device, model_half)
            else:
                model = model_factory(model_config)
                info.result = load_into_module(model, ckpt_path, io="read")  # no $SA3LOADER_IO
                _finish(model, device, bool(model_half))
        info.timings["total_s"] = _now() - started
        return model

    _faults.point("import")
    factory = (
        model_factory
        if model_factory is not None
        else _upstream.factory_function("create_diffusion_cond_from_config")
    )
    info.timings["import_s"] = _now() - started  # stable_audio_3's, the first time
    sibling_started = _now()
    target = _target_device(device)
    with open_header(ckpt_path) as source:
        if target.type == "meta":  # upstream's model.to("meta"), after its load
            model = _on_meta(factory, model_config, device, bool(model_half), source, info)
            info.timings["total_s"] = _now() - started
            return model
        outcome = SiblingOutcome(reason="fp32 load")
        if model_half:
            finder = SiblingFinder(source, resolve_cache_dir(cache_dir), settings)
            outcome = resolve_sibling(finder, Eviction(finder.cache_dir), keep_open=True, publish_later=True)
        with outcome:
            info.timings["sibling_s"] = _now() - sibling_started
            _record_sibling(info, outcome, source)
            build_started = _now()
            io_mode = resolve_io(settings.io, outcome.sibling.path if outcome.sibling is not None else None)
            with Values(
                source, outcome.sibling, bool(model_half), io_mode, pin=settings.pin, ring=settings.ring
            ) as values:
                values.prefetch_early(target)
                model = _built(build(factory, model_config, source, values, target), values, target, info)
            check_unchanged(source)  # a rewrite in place during the load: never a mix of two versions
    _finish(model, target, bool(model_half))
    now = _now()
    info.timings["build_s"] = now - build_started
    info.timings["read_s"] = values.read_seconds
    info.timings["total_s"] = now - started
    logger.info(
        "loaded %s: %s, %s build, %.2fs", source.path, info.reason, info.build, info.timings["total_s"]
    )
    return model


AUTOENCODER_PREFIX = "pretransform.model."


def load_autoencoder(
    config_path: str | os.PathLike[str],
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device | int | None = "cpu",
    *,
    model_factory: Factory | None = None,
    io: str | None = None,
) -> nn.Module:
    """Drop-in for ``stable_audio_3.loading_utils.load_autoencoder``.

    Reads only the ``pretransform.model.`` tensors of a combined checkpoint (or
    every tensor of a bare autoencoder checkpoint), fp32, and returns
    ``autoencoder.to(device)``: like upstream, not switched to eval mode.
    """
    info = LoadInfo(source=os.fspath(ckpt_path), reason="autoencoder fp32 load")
    with _reports.recording(info):
        return _load_autoencoder_into(info, config_path, ckpt_path, device, model_factory, io)


def _load_autoencoder_into(
    info: LoadInfo,
    config_path: str | os.PathLike[str],
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device | int | None,
    model_factory: Factory | None,
    io: str | None,
) -> nn.Module:
    started = _now()
    info.settings = settings = _config.load_settings(io=io)  # the same settings as load_diffusion_cond
    if settings.disabled and model_factory is None:
        info.build, info.reason = "upstream", DISABLED_REASON
        model = _upstream.loading_utils_function("load_autoencoder")(config_path, ckpt_path, device)
        info.timings["total_s"] = _now() - started
        return model
    config = _model_config(os.fspath(config_path))
    if model_factory is None:
        create = _upstream.factory_function("create_autoencoder_from_config")
        model_factory = lambda cfg: create(cfg["model"], cfg["sample_rate"])  # noqa: E731
    factory = model_factory
    target = _target_device(device)
    with open_header(ckpt_path) as whole:
        source = whole
        if any(e.name.startswith(AUTOENCODER_PREFIX) for e in whole.entries):
            source = whole.subset(AUTOENCODER_PREFIX)
        io_mode = resolve_io(settings.io)
        build_started = _now()
        with Values(source, None, half=False, io=io_mode, pin=settings.pin, ring=settings.ring) as values:
            if settings.disabled:  # upstream's build with the given factory
                info.build, info.reason = "upstream", DISABLED_REASON
                with not_deferred():
                    model = factory(config)
                info.result = load_faithful(model, source, values)
            else:
                model = _built(build(factory, config, source, values, target), values, target, info)
        check_unchanged(whole)
    now = _now()
    info.timings.update(build_s=now - build_started, read_s=values.read_seconds, total_s=now - started)
    return model.to(target)


def _model_config(path: str) -> Any:
    """The JSON config upstream's ``json.load`` reads; a file that is not one is a typed error."""
    with os.fdopen(open_for_reading(path, kind="model config"), encoding="utf-8") as f:
        try:
            return json.load(f)
        except (ValueError, OSError) as exc:  # JSON, UTF-8, or a read error
            raise ConfigError(f"{path}: not a JSON model config ({exc})", filename=path) from exc


def install() -> None:
    """Make upstream's ``load_diffusion_cond`` call sa3loader's in every module that binds it,
    under any name (so ``StableAudioModel.from_pretrained`` too); nothing is patched at import."""
    _upstream.install(load_diffusion_cond)


def uninstall() -> None:
    """Undo ``install()``; a no-op when it was not installed."""
    _upstream.uninstall()


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """``with sa3loader.installed(): ...``: ``install()`` for the block only."""
    with _upstream.installed(load_diffusion_cond):
        yield

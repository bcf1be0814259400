"""Build a model without allocating or initialising its parameters.

While active, every ``nn.Parameter`` registered (in this thread) is swapped for
a meta-device stand-in, so the factory's random init of gigabytes of weights
costs nothing. Only parameters are deferred: buffers, plain tensor
attributes and objects outside the module tree are built as upstream builds
them.

A factory may run a loader of its own: SA3's ``t5gemma`` conditioner calls
transformers' ``T5GemmaEncoderModel.from_pretrained`` in its constructor.
What a loader registers carries loaded values, so it is never deferred:

- anything registered while a function named ``from_pretrained`` is on the
  call stack (the convention of transformers, diffusers, peft, timm: no
  import of any of them needed), or while ``nn.Module.load_state_dict`` runs;
- a parameter assigned over one already registered under that name: that is
  how loaders place values (transformers' ``setattr`` of each loaded weight,
  ``load_state_dict(assign=True)``), while construction registers new names.

The caller must then give every deferred parameter a real value, or throw
the model away (``still_deferred`` tells which are left).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

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

"""Opt-in switch of a whole application to sa3loader, without editing call sites.

``stable_audio_3.model`` imports ``load_diffusion_cond`` by name, so replacing
it in ``loading_utils`` alone would miss ``StableAudioModel.from_pretrained``:
``install()`` rebinds it in every already-imported module that bound
upstream's function, and ``uninstall()`` puts each one back.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from . import _upstream
from .errors import UpstreamNotFoundError

UPSTREAM_MODULES = (_upstream.LOADING_UTILS_MODULE, _upstream.MODEL_MODULE)
FUNCTION_NAME = _upstream.LOADER_NAME

_patched: list[tuple[Any, Callable[..., Any]]] = []


def install() -> None:
    """Make upstream's ``load_diffusion_cond`` call sa3loader's, everywhere it is bound."""
    from .loader import load_diffusion_cond  # one way only: loader never imports this module

    if _patched:
        return
    for name in UPSTREAM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UpstreamNotFoundError(
                f"sa3loader.install() patches stable_audio_3, which is not importable ({exc})"
            ) from exc
    original: Callable[..., Any] = getattr(sys.modules[UPSTREAM_MODULES[0]], FUNCTION_NAME)
    _upstream.replaced_original = original
    for module in list(sys.modules.values()):
        if getattr(module, FUNCTION_NAME, None) is original:
            setattr(module, FUNCTION_NAME, load_diffusion_cond)
            _patched.append((module, original))


def uninstall() -> None:
    """Undo ``install()``; a no-op when it was not installed."""
    while _patched:
        module, original = _patched.pop()
        setattr(module, FUNCTION_NAME, original)
    _upstream.replaced_original = None


@contextlib.contextmanager
def installed() -> Iterator[None]:
    """``with sa3loader.installed(): ...``: ``install()`` for the block only."""
    install()
    try:
        yield
    finally:
        uninstall()

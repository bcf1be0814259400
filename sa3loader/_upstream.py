"""What sa3loader takes from stable_audio_3, imported only when a load needs it.

stable_audio_3 is not on PyPI: ``import sa3loader`` never imports it. The
model factories are looked up at load time, and upstream's own
``load_diffusion_cond`` is remembered here when ``install()`` replaces it, so
that ``SA3LOADER_DISABLE=1`` can still call it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from .errors import UpstreamNotFoundError

FACTORY_MODULE = "stable_audio_3.factory"
LOADING_UTILS_MODULE = "stable_audio_3.loading_utils"
MODEL_MODULE = "stable_audio_3.model"
LOADER_NAME = "load_diffusion_cond"

# Upstream's load_diffusion_cond while install() has replaced it; None otherwise.
replaced_original: Callable[..., Any] | None = None


def factory_function(name: str) -> Callable[..., Any]:
    """``stable_audio_3.factory.<name>``."""
    try:
        factory = importlib.import_module(FACTORY_MODULE)
    except ImportError as exc:
        raise UpstreamNotFoundError(
            "sa3loader needs stable_audio_3 to build the model: install it "
            "(pip install --no-deps -e path/to/stable-audio-3) or pass model_factory=..."
        ) from exc
    function: Callable[..., Any] = getattr(factory, name)
    return function


def original_load_diffusion_cond() -> Callable[..., Any] | None:
    """Upstream's own function, even while ``install()`` is active; None without stable_audio_3."""
    if replaced_original is not None:
        return replaced_original
    try:
        module = importlib.import_module(LOADING_UTILS_MODULE)
    except ImportError:
        return None
    function: Callable[..., Any] = getattr(module, LOADER_NAME)
    return function

"""Everything that touches stable_audio_3: lazy imports, and the opt-in ``install()`` patch.

stable_audio_3 is not on PyPI: ``import sa3loader`` never imports it. The model
factories are looked up at load time. ``stable_audio_3.model`` imports
``load_diffusion_cond`` by name, so replacing it in ``loading_utils`` alone would
miss ``StableAudioModel.from_pretrained``: ``install()`` rebinds it in every
already-imported module that bound upstream's function, and ``uninstall()`` puts
each one back. Upstream's own function is remembered meanwhile, so that
``SA3LOADER_DISABLE=1`` can still call it."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from .errors import UpstreamNotFoundError

# Lazy imports.
FACTORY_MODULE = "stable_audio_3.factory"
LOADING_UTILS_MODULE = "stable_audio_3.loading_utils"
MODEL_MODULE = "stable_audio_3.model"
LOADER_NAME = "load_diffusion_cond"


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


def loading_utils_function(name: str) -> Callable[..., Any]:
    """``stable_audio_3.loading_utils.<name>``, as upstream has it (``install()`` does not
    replace any function but ``load_diffusion_cond``)."""
    try:
        module = importlib.import_module(LOADING_UTILS_MODULE)
    except ImportError as exc:
        raise UpstreamNotFoundError(
            f"$SA3LOADER_DISABLE=1 calls upstream's {name}, but stable_audio_3 is not importable ({exc})"
        ) from exc
    function: Callable[..., Any] = getattr(module, name)
    return function


def original_load_diffusion_cond() -> Callable[..., Any] | None:
    """Upstream's own function, even while ``install()`` is active; None without stable_audio_3."""
    if _installation.original is not None:
        return _installation.original
    try:
        module = importlib.import_module(LOADING_UTILS_MODULE)
    except ImportError:
        return None
    function: Callable[..., Any] = getattr(module, LOADER_NAME)
    return function


# The opt-in patch: a whole application switched to sa3loader without editing call sites.
UPSTREAM_MODULES = (LOADING_UTILS_MODULE, MODEL_MODULE)


class _Installation:
    """What ``install()`` replaced, so that ``uninstall()`` puts it back and
    ``SA3LOADER_DISABLE=1`` can still call upstream's own function: the one owner of this state."""

    def __init__(self) -> None:
        self.patched: list[tuple[Any, Callable[..., Any]]] = []  # (module, upstream's function)
        self.original: Callable[..., Any] | None = None  # upstream's, while installed


_installation = _Installation()


def install(load_diffusion_cond: Callable[..., Any]) -> None:
    """Make upstream's ``load_diffusion_cond`` call ``load_diffusion_cond`` (sa3loader's),
    everywhere it is bound."""
    if _installation.patched:
        return
    for name in UPSTREAM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UpstreamNotFoundError(
                f"sa3loader.install() patches stable_audio_3, which is not importable ({exc})"
            ) from exc
    original: Callable[..., Any] = getattr(sys.modules[UPSTREAM_MODULES[0]], LOADER_NAME)
    _installation.original = original
    for module in list(sys.modules.values()):
        if getattr(module, LOADER_NAME, None) is original:
            setattr(module, LOADER_NAME, load_diffusion_cond)
            _installation.patched.append((module, original))


def uninstall() -> None:
    """Undo ``install()``; a no-op when it was not installed."""
    while _installation.patched:
        module, original = _installation.patched.pop()
        setattr(module, LOADER_NAME, original)
    _installation.original = None


@contextlib.contextmanager
def installed(load_diffusion_cond: Callable[..., Any]) -> Iterator[None]:
    """``install(load_diffusion_cond)`` for the block only."""
    install(load_diffusion_cond)
    try:
        yield
    finally:
        uninstall()

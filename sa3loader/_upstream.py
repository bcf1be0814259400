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
import threading
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
    ``SA3LOADER_DISABLE=1`` can still call upstream's own function: the one owner of this state.

    ``install()`` holds the patch until ``uninstall()``; each ``installed()`` block holds it
    for the block (nested, or in other threads): it is removed when no one holds it.
    """

    def __init__(self) -> None:
        self.patched: list[tuple[Any, str, Any]] = []  # (module, name, what it had bound)
        self.original: Callable[..., Any] | None = None  # upstream's, while installed
        self.ours: Callable[..., Any] | None = None  # what the modules were given
        self.explicit = False  # install() was called
        self.blocks = 0  # installed() blocks open, in any thread
        self.lock = threading.Lock()


_installation = _Installation()


def _patch(load_diffusion_cond: Callable[..., Any]) -> None:
    if _installation.patched:
        return
    for name in UPSTREAM_MODULES:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise UpstreamNotFoundError(
                f"sa3loader.install() patches stable_audio_3, which is not importable ({exc})"
            ) from exc
    # loading_utils' function (a wrapper someone set, maybe) and the one ``model`` looks up for
    # ``from_pretrained``: every module bound to either gets ours.
    original: Callable[..., Any] = getattr(sys.modules[UPSTREAM_MODULES[0]], LOADER_NAME)
    bound = [getattr(sys.modules[name], LOADER_NAME) for name in UPSTREAM_MODULES]
    _installation.original, _installation.ours = original, load_diffusion_cond
    # Under any name (``from ... import load_diffusion_cond as load``): by identity. Upstream's
    # modules first: a module imported meanwhile (another thread) then binds ours.
    ids = {id(f) for f in bound}
    first = [sys.modules[name] for name in UPSTREAM_MODULES]
    for module in first:
        _rebind(module, ids, load_diffusion_cond)
    for module in list(sys.modules.values()):  # taken once upstream's modules bind ours
        if all(module is not f for f in first):
            _rebind(module, ids, load_diffusion_cond)


def _rebind(module: Any, ids: set[int], ours: Callable[..., Any]) -> None:
    """Every name ``module`` binds to a function whose id is in ``ids``, bound to ``ours``."""
    namespace = _namespace(module)
    for name, had in list(namespace.items()):
        if id(had) in ids:
            namespace[name] = ours
            _installation.patched.append((module, name, had))


def _namespace(module: Any) -> dict[str, Any]:
    """Where ``module`` binds its names: read there, a lazy module's ``__getattr__`` (which may
    import, or raise) never runs; anything in ``sys.modules`` with no dict of its own binds nothing."""
    try:
        namespace = object.__getattribute__(module, "__dict__")
    except Exception:  # none (slots), or a property of its own that fails: no binding to read
        return {}
    return namespace if type(namespace) is dict else {}  # a dict of its own kind may refuse a write


def _unpatch() -> None:
    """Put back each module's own binding, unless someone rebound it since (their patch stays)."""
    while _installation.patched:
        module, name, had = _installation.patched.pop()
        namespace = _namespace(module)
        if namespace.get(name) is _installation.ours:
            namespace[name] = had
    _installation.original = _installation.ours = None


def _unpatch_unless_held() -> None:
    """The patch goes when no one holds it: no ``install()`` and no ``installed()`` block open."""
    if not _installation.explicit and not _installation.blocks:
        _unpatch()


def install(load_diffusion_cond: Callable[..., Any]) -> None:
    """Make upstream's ``load_diffusion_cond`` call ``load_diffusion_cond`` (sa3loader's),
    in every module that binds it (under any name), until ``uninstall()``."""
    with _installation.lock:
        _patch(load_diffusion_cond)
        _installation.explicit = True


def uninstall() -> None:
    """Undo ``install()`` (an ``installed()`` block still open keeps the patch until it ends);
    a no-op when it was not installed. A module that imported the name while installed keeps
    sa3loader's: it is not told from one that imported it from sa3loader."""
    with _installation.lock:
        _installation.explicit = False
        _unpatch_unless_held()


@contextlib.contextmanager
def installed(load_diffusion_cond: Callable[..., Any]) -> Iterator[None]:
    """The patch for the block; an ``install()`` made before it stays after it."""
    with _installation.lock:
        _patch(load_diffusion_cond)
        _installation.blocks += 1
    try:
        yield
    finally:
        with _installation.lock:
            _installation.blocks -= 1
            _unpatch_unless_held()

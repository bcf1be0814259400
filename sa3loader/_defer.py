"""Everything that patches torch or ``nn.Module`` while a model is built fast, in one place.

Inside ``with watched_build() as watch:`` (``_build`` opens it around the factory):

- ``nn.Module.register_parameter`` swaps every new parameter for a meta-device stand-in
  (no random init, no fp32 allocation), except what a loader registers: anything
  registered while a function named ``from_pretrained`` runs inside the build (the
  convention of transformers, diffusers, peft, timm: nothing of theirs is imported),
  or while ``nn.Module.load_state_dict`` runs. A value assigned over a registered
  parameter outside a loader is recorded as *replaced by the constructor*.
- ``torch.get_rng_state`` (as ``torch`` and ``torch.random`` name it) marks the state
  it returns as drawn: the fast build's generator is elsewhere.
- ``nn.Parameter`` made from a drawn tensor is drawn too.
- ``BuildWatch``, a torch function mode, marks every tensor a random draw writes and
  every tensor computed from one, skips the random init of meta stand-ins, notes
  each way a drawn value leaves torch (``item()``, ``tolist()``, ``numpy()``,
  ``float()``, ``bool()``, printing: from there on Python arithmetic cannot be
  followed), and notes each error torch raises over a deferred stand-in or a meta
  tensor computed from one, so that the caller can tell torch refusing a stand-in's
  data (build upstream's way instead) from the factory's own errors, its own meta
  tensors' included (passed through), by origin, never by message.
- The CPU generator's state is compared before each draw the watch sees with the state
  after the previous one (and at the end): a difference is a draw through a function
  it does not know, so the build cannot say what it kept (``manual_seed`` and
  ``set_rng_state`` are patched to say they are not draws). ``Tensor.set_``, which
  never reaches a torch function mode, is patched to mark what it shares.

The patches are process-wide while any watched build runs (one ``_Patches`` object
owns them and their depth, under a reentrant lock: a factory may load a model itself);
what they record is per thread.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

_META = torch.device("meta")
LOADER_FUNCTION_NAMES = frozenset({"from_pretrained"})

# torch functions that draw from a generator.
RANDOM_DRAWS = frozenset(
    "rand randn randint randperm rand_like randn_like randint_like normal bernoulli multinomial"
    " poisson dropout uniform_ normal_ random_ exponential_ geometric_ log_normal_ cauchy_ bernoulli_"
    " dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout rrelu rrelu_ gumbel_softmax"
    " binomial _standard_gamma _sample_dirichlet native_dropout"
    # torch.nn.init's, which the watch sees whole (the draws inside them are not looked at)
    " trunc_normal_ kaiming_uniform_ kaiming_normal_ xavier_uniform_ xavier_normal_"
    " orthogonal_ sparse_".split()
)
# Functions whose answer about a tensor is not its values: reading them from a drawn tensor
# lets nothing drawn out. Anything else that returns no tensor (a number, a list, an array,
# a string) carries drawn values out of torch.
METADATA_FUNCTIONS = frozenset(
    "size dim ndimension numel nelement stride storage_offset element_size is_contiguous"
    " is_floating_point is_complex is_signed is_pinned is_shared data_ptr get_device __len__"
    " is_set_to is_nonzero_shape type __hash__ __get__ __set__ requires_grad_ register_hook".split()
)
# Properties (read through ``__get__``) that are not values.
METADATA_PROPERTIES = frozenset(
    "shape dtype device requires_grad is_leaf is_cuda is_meta is_cpu is_sparse is_quantized is_mkldnn"
    " layout ndim names itemsize nbytes grad_fn output_nr _version _base".split()
)
# Containers searched for tensors in what a function returns.
OUTPUT_DEPTH = 2


def _generator_state() -> torch.Tensor:
    return torch.default_generator.get_state()


def _tensors_out(value: Any, depth: int = OUTPUT_DEPTH) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif depth and isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_out(v, depth - 1)


def _is_meta(value: Any) -> bool:
    return isinstance(value, torch.Tensor) and value.is_meta


def _name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: say which
        return "." + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


class BuildWatch(TorchFunctionMode):
    """What a factory did with random draws and meta tensors while it ran (see the module doc)."""

    def __init__(self) -> None:
        super().__init__()
        self._drawn: dict[int, weakref.ref[torch.Tensor]] = {}  # by id; the ref tells a reused id
        self.escapes: list[str] = []  # how drawn values left torch: "Tensor.item()", ...
        self._meta_errors: list[BaseException] = []  # errors torch raised over a stand-in's data
        self._stand_ins: dict[int, weakref.ref[torch.Tensor]] = {}  # by id; the ref tells a reused id
        self.replaced: list[tuple[weakref.ref[nn.Module], str]] = []  # parameters the constructor replaced
        # The CPU generator's state after the last draw the watch saw: a state it did not leave
        # means a draw it did not see (a function missing from RANDOM_DRAWS), whose values it
        # cannot have marked.
        self._generator_after: torch.Tensor = _generator_state()
        self.unseen_draw = False

    def generator_set(self) -> None:
        """The factory set the generator (``manual_seed``, ``set_rng_state``): not a draw."""
        self._generator_after = _generator_state()

    def check_generator(self) -> bool:
        """Whether every draw from the CPU generator so far went through a function the watch sees."""
        if not self.unseen_draw and not torch.equal(_generator_state(), self._generator_after):
            self.unseen_draw = True
        return not self.unseen_draw

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "").split(".", 1)[0]  # torch.ops' "randn.default" is randn
        draws = name in RANDOM_DRAWS
        if draws and name.endswith("_") and args and _is_meta(args[0]):
            return args[0]  # the init of a deferred stand-in: meta draws nothing, so skip it
        if draws:
            self.check_generator()
        try:
            out = func(*args, **kwargs) if kwargs else func(*args)
        except Exception as exc:
            if self._from_stand_in(args, kwargs):
                self._meta_errors.append(exc)
            raise
        finally:
            if draws:
                self._generator_after = _generator_state()
        if self._stand_ins:
            self._follow_stand_ins(args, kwargs, out)
        # Nothing is scanned until something real was drawn: a build on meta costs one call per op.
        if draws or (self._drawn and self._reads_drawn(args, kwargs)):
            self._follow_draws(func, name, args, kwargs, out)
        return out

    def _follow_draws(self, func: Any, name: str, args: tuple, kwargs: dict | None, out: Any) -> None:
        returned = list(_tensors_out(out))
        written = list(returned)
        if name.endswith("_") and args and isinstance(args[0], torch.Tensor):
            written.append(args[0])  # in place (also __setitem__, which returns None)
        if name == "copy_" and len(args) > 1 and not self._reads_drawn(args[1:], kwargs):
            self.unmark(args[0])  # every value of the destination is now the source's
            written = []
        for t in written:
            self.mark(t)
        if not returned and out is not None and self._escapes(func, name, out):
            self.escapes.append(f"Tensor.{_name(func).lstrip('.')}")

    def stand_in(self, tensor: torch.Tensor) -> None:
        """``tensor`` is a deferred parameter's meta stand-in, or was computed from one."""
        self._stand_ins[id(tensor)] = weakref.ref(tensor)

    def _follow_stand_ins(self, args: tuple, kwargs: dict | None, out: Any) -> None:
        metas = [t for t in _tensors_out(out) if t.is_meta]
        if metas and self._from_stand_in(args, kwargs):
            for t in metas:
                self.stand_in(t)

    def _from_stand_in(self, args: tuple, kwargs: dict | None) -> bool:
        values = (*args, *kwargs.values()) if kwargs else args
        for v in values:
            for t in _tensors_out(v):
                for candidate in (t, t._base) if t.is_meta else ():
                    ref = self._stand_ins.get(id(candidate))
                    if ref is not None and ref() is candidate:
                        return True
        return False

    @staticmethod
    def _escapes(func: Any, name: str, out: Any) -> bool:
        """Whether ``out`` (no tensor, not None), computed from drawn values, carries values out of
        torch: a number, a list, an array, a string, a storage. Metadata does not."""
        if name == "__get__":
            return _name(func)[1:] not in METADATA_PROPERTIES
        if name in METADATA_FUNCTIONS:
            return False
        return not isinstance(out, (torch.dtype, torch.device, torch.Size))

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

    def mark(self, tensor: torch.Tensor) -> None:
        for t in (tensor, tensor._base):
            if isinstance(t, torch.Tensor) and not t.is_meta:
                self._drawn[id(t)] = weakref.ref(t)

    def unmark(self, tensor: torch.Tensor) -> None:
        """``tensor`` no longer holds drawn values (its base may: other elements of it)."""
        ref = self._drawn.get(id(tensor))
        if ref is not None and ref() is tensor:
            del self._drawn[id(tensor)]

    def any_drawn(self) -> bool:
        return bool(self._drawn) or bool(self.escapes) or not self.check_generator()

    def drawn(self, tensor: torch.Tensor) -> bool:
        for t in (tensor, tensor._base):
            ref = self._drawn.get(id(t))
            if ref is not None and ref() is t:
                return True
        return False

    def refused_meta(self, exc: BaseException) -> bool:
        """Whether ``exc``, or an error it came from, is one torch raised over a stand-in's data."""
        seen: BaseException | None = exc
        for _ in range(8):
            if seen is None:
                return False
            if any(seen is e for e in self._meta_errors):
                return True
            seen = seen.__cause__ or seen.__context__
        return False


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


_original_register = nn.Module.register_parameter
_original_load_state_dict = nn.Module.load_state_dict
_original_get_rng_state = torch.random.get_rng_state
_original_parameter_new = nn.Parameter.__new__
_original_parameter_new_slot = nn.Parameter.__dict__["__new__"]  # the staticmethod itself, put back as it was
_original_set_ = torch.Tensor.set_  # never reaches a torch function mode
_original_manual_seed = torch.random.manual_seed
_original_set_rng_state = torch.random.set_rng_state


class _Patches:
    """The process-wide patches and their depth: installed while any watched build runs,
    in any thread; each thread's build records into its own ``_state``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0  # watched builds running; only changed while holding ``lock``
        # Each thread's recorder, watch, outer frame and loading depth: what its build records.
        self.local = threading.local()

    def enter(self) -> None:
        self.lock.acquire()
        if self.depth == 0:
            nn.Module.register_parameter = _register_deferred  # type: ignore[method-assign]
            nn.Module.load_state_dict = _load_state_dict_not_deferred  # type: ignore[method-assign]
            torch.get_rng_state = torch.random.get_rng_state = _get_rng_state_drawn
            nn.Parameter.__new__ = staticmethod(_parameter_new)  # type: ignore[method-assign]
            torch.manual_seed = torch.random.manual_seed = _manual_seed_seen
            torch.Tensor.set_ = _set_seen  # type: ignore[method-assign,assignment]
            torch.set_rng_state = torch.random.set_rng_state = _set_rng_state_seen
        self.depth += 1

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            nn.Module.register_parameter = _original_register  # type: ignore[method-assign]
            nn.Module.load_state_dict = _original_load_state_dict  # type: ignore[method-assign]
            torch.get_rng_state = torch.random.get_rng_state = _original_get_rng_state
            nn.Parameter.__new__ = _original_parameter_new_slot  # type: ignore[method-assign]
            torch.manual_seed = torch.random.manual_seed = _original_manual_seed
            torch.Tensor.set_ = _original_set_  # type: ignore[method-assign]
            torch.set_rng_state = torch.random.set_rng_state = _original_set_rng_state
        self.lock.release()


_patches = _Patches()


def _inside_loader_function() -> bool:
    """Whether a loader function runs between the ``with watched_build()`` and here."""
    frame: Any = sys._getframe()
    outer = getattr(_patches.local, "outer_frame", None)
    while frame is not None and frame is not outer:
        if frame.f_code.co_name in LOADER_FUNCTION_NAMES:
            return True
        frame = frame.f_back
    return False


def _register_deferred(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    recorder: DeferredParameters | None = getattr(_patches.local, "recorder", None)
    if recorder is None or type(param) is not nn.Parameter or getattr(_patches.local, "loading", 0) > 0:
        _original_register(self, name, param)
        return
    if _inside_loader_function():  # a loader's value
        _original_register(self, name, param)
        return
    if self._parameters.get(name) is not None:
        # A value assigned over a registered parameter, by the constructor: it must come from
        # the checkpoint, or the fast build keeps a value upstream's would not have.
        _patches.local.watch.replaced.append((weakref.ref(self), name))
        _original_register(self, name, param)
        return
    # Parameters derived from deferred ones (weight_norm's g and v) are meta already.
    # Our own ops here need no look from the watch (a meta stand-in holds no value).
    with torch._C.DisableTorchFunction():
        if param.device != _META:
            param = nn.Parameter(torch.empty_like(param, device=_META), requires_grad=param.requires_grad)
        _original_register(self, name, param)
    recorder.records.append((weakref.ref(self), name))
    _patches.local.watch.stand_in(param)


def _load_state_dict_not_deferred(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    _patches.local.loading = getattr(_patches.local, "loading", 0) + 1
    try:
        return _original_load_state_dict(self, *args, **kwargs)
    finally:
        _patches.local.loading -= 1


def _get_rng_state_drawn() -> torch.Tensor:
    state = _original_get_rng_state()
    watch: BuildWatch | None = getattr(_patches.local, "watch", None)
    if watch is not None:
        watch.mark(state)
    return state


def _set_seen(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """``set_`` makes ``self`` share another tensor's values, unseen by the watch: drawn ones too."""
    out = _original_set_(self, *args, **kwargs)
    watch: BuildWatch | None = getattr(_patches.local, "watch", None)
    source = args[0] if args else kwargs.get("source")
    if watch is not None and isinstance(source, torch.Tensor) and watch.drawn(source):
        watch.mark(self)
    return out


def _manual_seed_seen(seed: int) -> torch.Generator:
    watch: BuildWatch | None = getattr(_patches.local, "watch", None)
    if watch is not None:
        watch.check_generator()  # an unseen draw before it stays seen (``fork_rng`` sets it back)
    generator = _original_manual_seed(seed)
    if watch is not None:
        watch.generator_set()
    return generator


def _set_rng_state_seen(new_state: torch.Tensor) -> None:
    watch: BuildWatch | None = getattr(_patches.local, "watch", None)
    if watch is not None:
        watch.check_generator()
    _original_set_rng_state(new_state)
    if watch is not None:
        watch.generator_set()


def _parameter_new(cls: type, data: torch.Tensor | None = None, requires_grad: bool = True) -> Any:
    param: torch.Tensor = _original_parameter_new(cls, data, requires_grad)
    watch: BuildWatch | None = getattr(_patches.local, "watch", None)
    if watch is not None and isinstance(data, torch.Tensor) and watch.drawn(data):
        watch.mark(param)
    return param


def _saved_state() -> tuple[Any, Any, Any]:
    return (
        getattr(_patches.local, "recorder", None),
        getattr(_patches.local, "watch", None),
        getattr(_patches.local, "outer_frame", None),
    )


@contextlib.contextmanager
def watched_build() -> Iterator[tuple[DeferredParameters, BuildWatch]]:
    """Run a factory inside: its parameters deferred, its random draws and meta errors watched.

    Blocks nest: an inner block records its own parameters, and the outer block's
    recorder is back when it exits.
    """
    _patches.enter()
    saved = _saved_state()
    recorder, watch = DeferredParameters(), BuildWatch()
    _patches.local.recorder, _patches.local.watch = recorder, watch
    # Only loaders called from inside the block count: the whole load may itself
    # run inside one (upstream's ``StableAudioModel.from_pretrained``).
    _patches.local.outer_frame = sys._getframe(2)
    try:
        with watch:
            yield recorder, watch
    finally:
        _patches.local.recorder, _patches.local.watch, _patches.local.outer_frame = saved
        _patches.exit()


@contextlib.contextmanager
def not_deferred() -> Iterator[None]:
    """Build for real inside a watched build (a nested load's faithful build, say)."""
    saved = _saved_state()
    _patches.local.recorder, _patches.local.watch = None, None
    try:
        yield
    finally:
        _patches.local.recorder, _patches.local.watch, _patches.local.outer_frame = saved


def run_unwatched(function: Callable[[], Any]) -> Any:
    """``function()`` with no torch function mode looking (the build's own ops)."""
    with torch._C.DisableTorchFunction():
        return function()

"""What a factory does with random draws and meta tensors while a model is built fast:
``BuildWatch``, a torch function mode that ``_defer.watched_build`` opens (its doc says
what the watch marks and notes)."""

from __future__ import annotations

import operator
import sys
import weakref
from collections.abc import Iterator
from types import FunctionType
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ._draw_checks import ChecksDraws, check_arguments
from ._escapes import (
    ARGUMENT_DEPTH,
    HANDS_OUT_MEMORY,
    METADATA_NAMES,
    decided_by_values,
    escapes,
    metadata_of_meta,
    op_name,
    parts,
)
from ._holders import covers_its_memory, storage_of

_META = torch.device("meta")

# torch functions that draw from a generator.
RANDOM_DRAWS = frozenset(
    "rand randn randint randperm rand_like randn_like randint_like normal bernoulli multinomial"
    " poisson dropout uniform_ normal_ random_ exponential_ geometric_ log_normal_ cauchy_ bernoulli_"
    " dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout rrelu rrelu_ gumbel_softmax"
    " binomial _standard_gamma _sample_dirichlet native_dropout"
    # functional forms (torch.ops.aten's), drawing into a new tensor
    " uniform exponential cauchy log_normal geometric normal_functional random"
    # torch.nn.init's, which the watch sees whole (the draws inside them are not looked at)
    " trunc_normal_ kaiming_uniform_ kaiming_normal_ xavier_uniform_ xavier_normal_"
    " orthogonal_ sparse_".split()
)

# torch.nn.init's functions among them, by identity (see ``BuildWatch.__torch_function__``).
_NN_INIT_DRAWS = frozenset(f for name, f in vars(nn.init).items() if name in RANDOM_DRAWS and callable(f))

# What tells a stand-in (meta) from upstream's parameter, read into a plain value (a string, a
# bool) that the build cannot follow: the device, and the text of the tensor.
DEVICE_PROPERTIES = frozenset(
    "device is_cpu is_cuda is_meta is_mps is_xpu is_xla is_ipu is_hpu is_mtia is_maia is_vulkan".split()
)
DEVICE_METHODS = frozenset("get_device data_ptr __repr__ __str__ __format__".split())


# Where torch dispatches a Python method of a tensor to a mode: not the code that called it.
_DISPATCH_MODULES = frozenset({"torch.overrides", "torch._tensor"})


def _reader(frame: Any) -> Any:
    """The frame of the code that called a torch function, past torch's dispatch and any mode
    above the watch (``with torch.device(...)``'s); None where there is none."""
    while frame is not None and (
        frame.f_globals.get("__name__") in _DISPATCH_MODULES or frame.f_code.co_name == "__torch_function__"
    ):
        frame = frame.f_back
    return frame


def _torchs(frame: Any) -> bool:
    """Whether the code at ``frame`` is torch's own: ``nn.init`` or ``load_state_dict`` asking
    ``is_meta`` act on the answer and keep nothing of it."""
    module = frame.f_globals.get("__name__", "") if frame is not None else ""
    return module == "torch" or module.startswith("torch.")


def _given_own_generator(frame: Any) -> bool:
    """Whether torch's code at ``frame`` was given a generator of the factory's own: an nn.init
    function that returns at once for meta (``trunc_normal_``) skips a draw that would move it."""
    given = frame.f_locals.get("generator")
    return isinstance(given, torch.Generator) and given is not torch.default_generator


# Containers searched for tensors in what a function returns, and in its arguments
# (``torch.tensor([[x[0], x[1]], [x[2], x[3]]])``).
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


def _torchs_own(func: Any) -> bool:
    """A builtin, or a Python function of torch's own (nn.init, nn.functional, Tensor's methods)."""
    module = getattr(func, "__module__", None) or ""
    return not isinstance(func, FunctionType) or module.startswith("torch.")


def _init_into_meta(func: Any, args: tuple, kwargs: dict | None) -> bool:
    """An nn.init function of torch's own (by identity) given a meta tensor (by keyword)."""
    return bool(func in _NN_INIT_DRAWS and kwargs and not args and _is_meta(kwargs.get("tensor")))


# The argument types an nn.init call may be recognised by (``InitCalls.key``): plain values.
_PLAIN_VALUES = (int, float, str, bool, type(None))  # a generator moves each call (``check_arguments``)
# What nn.init's functions look up as they run: a factory that wraps one sees every call.
_nn_init_functions = operator.itemgetter(*(name for name, v in vars(nn.init).items() if callable(v)))
_NN_INIT_AS_MADE = _nn_init_functions(vars(nn.init))
_TENSOR_DRAWS_AS_MADE = (torch.Tensor.uniform_, torch.Tensor.normal_)
_increment_version = getattr(torch.autograd.graph, "increment_version", None)  # torch >= 2.1
_modes_below = getattr(torch._C, "_len_torch_function_stack", None)  # inside a mode: those under it


class InitCalls:
    """nn.init calls into meta that returned, each with how far it moved its tensor's version.

    The invariant: an nn.init function of torch's own, given a meta tensor, reads only the
    tensor's shape, strides, dtype and flags and its other arguments (meta holds no values and
    takes no draw; a draw made elsewhere shows as unseen the first time), so the same call again
    does the same: returns the tensor, moves its version as far (``increment_version``), warns
    and raises nothing. ``key`` is None where that is not known: a zero-element tensor (kaiming's
    warn each call), an inference tensor (written to only in inference mode), a class that may
    dispatch the call itself, an argument that is not a plain value (bool and int told apart),
    or nn.init's functions not as torch made them, or another torch function mode under the
    watch (it sees each call upstream's build makes). A view is keyed by its strides: the in-place
    rules that look at a view's base hold in grad mode, and nn.init writes under ``no_grad``.
    """

    def __init__(self) -> None:
        self.moved: dict[tuple, int] = {}

    @staticmethod
    def key(func: Any, kwargs: dict) -> tuple | None:
        tensor = kwargs["tensor"]
        others = tuple((k, type(v), v) for k, v in kwargs.items() if k != "tensor")
        if _increment_version is None or type(tensor) not in (torch.Tensor, nn.Parameter):
            return None
        if tensor.numel() == 0 or tensor.is_inference():
            return None
        if any(type(v) not in _PLAIN_VALUES for _, _, v in others) or not _torchs_init():
            return None
        if _modes_below is None or _modes_below():  # another mode would see the call: every time
            return None
        return (func, tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.requires_grad, others)

    def repeat(self, call: tuple | None, tensor: torch.Tensor) -> bool:
        """Whether ``call`` returned before; if so, ``tensor``'s version is moved as it moved then."""
        moved = self.moved.get(call)  # type: ignore[arg-type]  # None (run each time) is no key
        for _ in range(moved or 0):
            _increment_version(tensor)  # type: ignore[misc]
        return moved is not None

    def returned(self, call: tuple, moved: int) -> None:
        self.moved[call] = moved


def _written(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` after an in-place op that was not run: its version moved as the op's would
    (a saved-tensor check at backward, a factory reading ``_version``)."""
    if _increment_version is not None and not tensor.is_inference():
        _increment_version(tensor)
    return tensor


def _draw_to_skip(name: str, args: tuple) -> bool:
    """An in-place draw into a meta tensor: meta draws nothing (``check_arguments`` checks it). Not
    one autograd may refuse (in grad mode, into a tensor that requires grad: upstream's build
    raises for a leaf), which runs on meta and fails as upstream's does."""
    if not (name.endswith("_") and args and _is_meta(args[0])):
        return False
    return not (torch.is_grad_enabled() and args[0].requires_grad)


def _torchs_init() -> bool:
    """Whether nn.init's functions, and the draws they make, are torch's as imported."""
    drawn = (torch.Tensor.uniform_, torch.Tensor.normal_)
    try:
        functions = _nn_init_functions(vars(nn.init))  # in C: 3 us a call, not 6 (346 calls a DiT)
    except KeyError:  # one deleted
        return False
    return drawn == _TENSOR_DRAWS_AS_MADE and all(map(operator.is_, functions, _NN_INIT_AS_MADE))


GeneratorStates = dict[int, tuple[torch.Generator, torch.Tensor]]


def _remember(known: GeneratorStates, value: Any) -> None:
    """``value``, if a generator of the factory's own, into ``known`` as it is before its first
    draw (put back before upstream's build runs after a refused fast one)."""
    if isinstance(value, torch.Generator) and value is not torch.default_generator:
        known.setdefault(id(value), (value, value.get_state()))


def _generator_states(known: GeneratorStates, args: tuple, kwargs: dict | None) -> GeneratorStates:
    """The state now of each generator of the factory's own in ``known`` or passed here (added to
    ``known``)."""
    passed = (*args, *kwargs.values()) if kwargs else args
    for value in (*passed, *(v for c in passed if isinstance(c, (list, tuple)) for v in c)):
        _remember(known, value)
    return {key: (g, g.get_state()) for key, (g, _) in known.items()}


def _any_moved(before: GeneratorStates | None) -> bool:
    return any(not torch.equal(g.get_state(), state) for g, state in (before or {}).values())


def _in_chain(exc: BaseException, errors: list[BaseException]) -> bool:
    """Whether ``exc``, or an error it came from (however many times wrapped), is one of ``errors``."""
    visited: set[int] = set()
    seen: BaseException | None = exc
    while seen is not None and id(seen) not in visited:
        if any(seen is e for e in errors):
            return True
        visited.add(id(seen))
        seen = seen.__cause__ or seen.__context__
    return False


class BuildWatch(TorchFunctionMode):
    """What a factory did with random draws and meta tensors while it ran (see the module doc)."""

    def __init__(self, generators: GeneratorStates | None = None, outer: BuildWatch | None = None) -> None:
        super().__init__()
        self.outer = outer  # the watch of a build this one runs inside (a load in a factory)
        # Each generator of the factory's own (not torch's default) as it was before its first draw:
        # put back before upstream's build runs after a refused fast one.
        self.generators = {} if generators is None else generators
        self._drawn: dict[int, weakref.ref[torch.Tensor]] = {}  # by id; the ref tells a reused id
        # Memory drawn values were written to, kept (its address not reused) until checked: aliases.
        self._drawn_storages: dict[int, torch.UntypedStorage] = {}
        self.escapes: list[str] = []  # how drawn values left torch: "Tensor.item()", ...
        self._meta_errors: list[BaseException] = []  # torch's over a stand-in's data; real memory from one
        self.device_reads: list[str] = []  # how a stand-in's device was read: "Tensor.is_cpu", ...
        self._stand_ins: dict[int, weakref.ref[torch.Tensor]] = {}  # by id; the ref tells a reused id
        self.replaced: list[tuple[weakref.ref[nn.Module], str]] = []  # parameters the constructor replaced
        # The CPU generator after the last draw seen: another state is a draw not seen (not in RANDOM_DRAWS).
        self._generator_after: torch.Tensor = _generator_state()
        self.unseen_draw = False
        self.handed_out: set[int] = set()  # memory given to code torch does not see (its _cdata)
        self._inits = InitCalls()

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
        if name in METADATA_NAMES and args and metadata_of_meta(func, args, kwargs):
            return _read_metadata(self, func, args)
        draws = name in RANDOM_DRAWS
        if name in HANDS_OUT_MEMORY and args and (memory := storage_of(args[0])) is not None:
            self.handed_out.add(memory._cdata)  # what is drawn into it later may leave unseen
        # A function of torch's own draws only what it returns or writes into its tensor; any other
        # (torch's override protocol) runs unwatched: the generators' states tell what it drew.
        own = _torchs_own(func)
        if draws and kwargs:
            _remember(self.generators, kwargs.get("generator"))
            # Into a stand-in by ``out=``, from a generator of the factory's own: moved on meta by nothing.
            self.unseen_draw |= _is_meta(kwargs.get("out")) and id(kwargs.get("generator")) in self.generators
        if draws and own and _draw_to_skip(name, args) and self._from_stand_in(args[:1], None):
            self.unseen_draw |= not check_arguments(func, args, kwargs)  # upstream's checks; its generator
            return _written(args[0])
        if draws and _init_into_meta(func, args, kwargs) and self._from_stand_in((kwargs["tensor"],), None):
            return self._init_into_meta(func, name, kwargs)
        looked_at = draws and own
        if looked_at:
            self.check_generator()
        private = None if own else _generator_states(self.generators, args, kwargs)
        try:
            out = func(*args, **kwargs) if kwargs else func(*args)
        except Exception as exc:
            self._note_error(exc, args, kwargs)
            raise
        finally:
            if looked_at:
                self._generator_after = _generator_state()
            self.unseen_draw = self.unseen_draw or (private is not None and _any_moved(private))
        self._follow(func, name, draws, args, kwargs, out)
        return out

    def _init_into_meta(self, func: Any, name: str, kwargs: dict) -> Any:
        return _run_init_into_meta(self, func, name, kwargs)

    def _note_error(self, exc: Exception, args: tuple, kwargs: dict | None) -> None:
        if self._from_stand_in(args, kwargs):
            self._meta_errors.append(exc)
        if self._drawn and self._reads_drawn(args, kwargs):  # drawn values may decide whether it raises
            self.escapes.append(f"an error over drawn values ({type(exc).__name__})")

    def _follow(self, func: Any, name: str, draws: bool, args: tuple, kwargs: dict | None, out: Any) -> None:
        if self._stand_ins:
            self._follow_stand_ins(func, name, args, kwargs, out)
        # Nothing is scanned until something real was drawn: a build on meta costs one call per op.
        if draws or (self._drawn and self._reads_drawn(args, kwargs)):
            self._follow_draws(func, name, args, kwargs, out)

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
        if escapes(func, name, out, returned) or decided_by_values(name, args, kwargs):
            self.escapes.append(f"Tensor.{op_name(func).lstrip('.')}")

    def stand_in(self, tensor: torch.Tensor) -> None:
        """``tensor`` is a deferred parameter's meta stand-in, or was computed from one."""
        self._stand_ins[id(tensor)] = weakref.ref(tensor)

    def _follow_stand_ins(self, func: Any, name: str, args: tuple, kwargs: dict | None, out: Any) -> None:
        returned = list(_tensors_out(out))
        metas = [t for t in returned if t.is_meta]
        reveals = name in DEVICE_METHODS or (name == "__get__" and op_name(func)[1:] in DEVICE_PROPERTIES)
        if (returned or reveals) and self._from_stand_in(args, kwargs):
            if len(metas) < len(returned):  # a CPU x meta matmul or conv: memory nothing wrote
                self._meta_errors.append(RuntimeError(f"{op_name(func)} made real memory of a stand-in"))
            for t in metas:
                self.stand_in(t)
            reader = _reader(sys._getframe(2)) if reveals else None
            if reveals and not _torchs(reader):
                self.device_reads.append(f"Tensor.{op_name(func).lstrip('.')}")
            elif reveals and _given_own_generator(reader):  # a draw skipped: one not followed
                self.unseen_draw = True

    def _from_stand_in(self, args: tuple, kwargs: dict | None) -> bool:
        values = (*args, *kwargs.values()) if kwargs else args
        for v in values:
            for t in _tensors_out(v):
                for candidate in (t, t._base) if t.is_meta else ():
                    ref = self._stand_ins.get(id(candidate))
                    if ref is not None and ref() is candidate:
                        return True
        return False

    def _reads_drawn(self, args: tuple | list, kwargs: dict | None, depth: int = ARGUMENT_DEPTH) -> bool:
        """Whether an argument (in lists, tuples, slices too) holds drawn values; a hot loop."""
        for value in (*args, *kwargs.values()) if kwargs else args:
            if isinstance(value, torch.Tensor):
                if self.drawn(value):
                    return True
            elif depth and (inner := parts(value)) is not None and self._reads_drawn(inner, None, depth - 1):
                return True
        return False

    def mark(self, tensor: torch.Tensor) -> None:
        with torch._C.DisableTorchFunction():  # the watch's own look (called from a patch too)
            for t in (tensor, tensor._base):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    self._drawn[id(t)] = weakref.ref(t)
                    storage = storage_of(t)
                    if storage is not None:  # any other tensor on this memory (an alias) holds it too
                        self._drawn_storages[storage.data_ptr()] = storage

    def unmark_everywhere(self, tensor: torch.Tensor) -> None:
        """``unmark`` in this watch and every watch it runs inside (they all see the same ops)."""
        watch: BuildWatch | None = self
        while watch is not None:
            watch.unmark(tensor)
            watch = watch.outer

    def unmark(self, tensor: torch.Tensor) -> None:
        """``tensor`` no longer holds drawn values (its base may: other elements of it)."""
        ref = self._drawn.get(id(tensor))
        if ref is not None and ref() is tensor:
            del self._drawn[id(tensor)]
        storage = storage_of(tensor) if self._drawn_storages else None  # each deferred parameter: cheap
        if storage is not None and storage.data_ptr() in self._drawn_storages:
            if covers_its_memory(tensor, storage):  # all of its memory overwritten
                del self._drawn_storages[storage.data_ptr()]

    def release(self, stand_ins: set[int]) -> list[weakref.ref[torch.Tensor]]:
        """Drop every reference the watch holds (``swap_in_place`` refuses a tensor with a weak
        one); weak ones to what was computed from the stand-ins (not to them: ``stand_ins``)."""
        computed = [ref for key, ref in self._stand_ins.items() if key not in stand_ins]
        self._drawn.clear()
        self._drawn_storages.clear()
        self._stand_ins.clear()
        return computed

    def any_drawn(self) -> bool:
        return bool(self._drawn) or bool(self.escapes) or not self.check_generator()

    def drawn(self, tensor: torch.Tensor) -> bool:
        if not self._drawn and not self._drawn_storages:
            return False  # nothing drawn yet
        ref = self._drawn.get(id(tensor))
        if ref is not None and ref() is tensor:
            return True
        with torch._C.DisableTorchFunction():  # the watch's own look (called from a patch too)
            if tensor.is_meta:  # never marked, nor its base (``mark``): most of a build's arguments
                return False
            base = tensor._base
        ref = self._drawn.get(id(base))
        if base is not None and ref is not None and ref() is base:
            return True
        if self._drawn_storages:
            storage = storage_of(tensor)
            return storage is not None and storage.data_ptr() in self._drawn_storages
        return False

    def refused_meta(self, exc: BaseException) -> bool:
        """Whether ``exc``, or an error it came from, is one torch raised over a stand-in's data."""
        return _in_chain(exc, self._meta_errors)

    def read_a_stand_in(self) -> bool:
        """Whether torch refused a stand-in's data during the build, even where the constructor
        caught the error itself (its fallback value is not upstream's)."""
        return bool(self._meta_errors)


def pop_drawn_memory(watch: BuildWatch) -> torch.UntypedStorage | None:
    """One memory drawn values were written to, handed over: ``watch`` keeps it no longer."""
    return watch._drawn_storages.popitem()[1] if watch._drawn_storages else None


def give_back_drawn_memory(watch: BuildWatch, memories: list[torch.UntypedStorage]) -> None:
    """``pop_drawn_memory``'s memory kept by ``watch`` again (its aliases are drawn again)."""
    for memory in memories:
        watch._drawn_storages[memory.data_ptr()] = memory


def outer_watches_keeping(watch: BuildWatch, storage: torch.UntypedStorage) -> int:
    """How many watches of builds ``watch`` runs in (a load in a factory) keep ``storage`` too."""
    count, outer = 0, watch.outer
    while outer is not None:
        count += outer._drawn_storages.get(storage.data_ptr()) is storage
        outer = outer.outer
    return count


def _read_metadata(watch: BuildWatch, func: Any, args: tuple) -> Any:
    """``metadata_of_meta``'s call: its error over a stand-in noted, as the full look notes it."""
    try:
        return func(*args)
    except Exception as exc:
        watch._note_error(exc, args, None)
        raise


def _run_init_into_meta(watch: BuildWatch, func: Any, name: str, kwargs: dict) -> Any:
    """nn.init's functions (by identity; tensor by keyword) draw nothing into meta: they run their
    checks, warnings and errors as upstream's, unlooked at (a draw elsewhere shows as unseen)."""
    tensor, call = kwargs["tensor"], InitCalls.key(func, kwargs)
    if watch._inits.repeat(call, tensor):
        return tensor
    version = tensor._version if call is not None else 0  # an inference tensor has none
    try:
        with ChecksDraws():  # the draws it makes into meta: checked as real memory checks them
            out = func(**kwargs)
    except Exception as exc:
        watch._note_error(exc, (), kwargs)
        raise
    if out is tensor:  # nothing new came out: nothing to follow
        if call is not None:  # (an inference tensor, never keyed, has no version to read)
            watch._inits.returned(call, tensor._version - version)
        return out
    watch._follow(func, name, True, (), kwargs, out)
    return out


def drawn_without_memory(watch: BuildWatch) -> list[torch.Tensor]:
    """Marked tensors still held that have no memory torch can count (nested, mkldnn)."""
    return [t for t in drawn_alive(watch) if not t.is_meta and t.numel() and storage_of(t) is None]


def drawn_alive(watch: BuildWatch) -> list[torch.Tensor]:
    """Every tensor a draw wrote, or computed from one, still held."""
    return _alive(watch._drawn)


def stand_ins_alive(watch: BuildWatch) -> list[torch.Tensor]:
    """Every stand-in, and tensor computed from one, still held."""
    return _alive(watch._stand_ins)


def _alive(refs: dict[int, weakref.ref[torch.Tensor]]) -> list[torch.Tensor]:
    return [t for t in (ref() for ref in refs.values()) if t is not None]

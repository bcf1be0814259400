"""Everything that patches torch or ``nn.Module`` while a model is built fast, in one place.

Inside ``with watched_build() as watch:`` (``_build`` opens it around the factory):

- ``nn.Module.register_parameter`` turns every new parameter into a meta-device stand-in,
  in place (``swap_in_place``: every holder of the object holds the stand-in, later the
  weight; no random init, no fp32 allocation), except what a loader registers: anything
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
what they record is per thread. A build waits at most ``PATCHES_WAIT_S`` for another
thread's build to end, then raises ``PatchesBusy`` (the caller builds upstream's way): the
other build may be waiting for this thread (a factory that loads a part in a worker thread
and joins it), and upstream's build needs no patches. Once a load gave up on a build, later
ones give up on it at once (the worker's next part).
"""

from __future__ import annotations

import contextlib
import copyreg
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from . import _faults
from ._holders import storage_holders
from ._watch import BuildWatch

_META = torch.device("meta")
LOADER_FUNCTION_NAMES = frozenset({"from_pretrained"})


class DeferredParameters:
    """Records each deferred (module, name) pair."""

    def __init__(self) -> None:
        self.records: list[tuple[weakref.ref[nn.Module], str]] = []
        self.unswapped: list[str] = []  # deferred as a new object: references to the old one are stale
        self.not_kept: list[str] = []  # what a (dense, plain) stand-in does not keep, and of what
        # The memory of each parameter something else held when it was deferred (a tensor it was
        # made from), kept alive until ``shared_memory`` looks again.
        self.held_elsewhere: list[tuple[str, torch.UntypedStorage]] = []
        # Parameters made while the factory runs, by id (held: the id stays theirs). Only these
        # are deferred: one made before (a model of the caller's, tied in) keeps its memory.
        self.made: dict[int, torch.Tensor] = {}

    def shared_memory(self) -> str | None:
        """A deferred parameter whose memory is still another's once the factory returned:
        another parameter's, a buffer's, an attribute's. Upstream copies into that memory, and
        every holder sees the checkpoint's value (the last copy's, for two parameters); a
        stand-in gives the parameter memory of its own. A constructor's local variable is gone
        by then. Forgets the memory it kept."""
        seen: set[int] = set()
        try:
            while self.held_elsewhere:
                where, storage = self.held_elsewhere.pop()  # this frame's reference is the only one
                if storage._cdata in seen or storage_holders(storage) > 1:  # more than our own
                    return where
                seen.add(storage._cdata)
            return None
        finally:
            self.held_elsewhere.clear()

    def stand_ins(self) -> list[nn.Parameter]:
        """Every deferred parameter: its stand-in, or the value placed since."""
        held = ((ref(), name) for ref, name in self.records)
        return [
            p
            for module, name in held
            if module is not None and (p := module._parameters.get(name)) is not None
        ]

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


# Long enough for any factory of another thread to run (a cold text encoder included): two
# independent loads should both build fast; a factory that waits for a worker that loads
# stalls this long once instead of for ever.
PATCHES_WAIT_S = 60.0


class PatchesBusy(Exception):
    """Another thread's watched build held the patches for ``PATCHES_WAIT_S``."""


class _Patches:
    """The process-wide patches and their depth: installed while any watched build runs,
    in any thread; each thread's build records into its own ``_state``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.depth = 0  # watched builds running; only changed while holding ``lock``
        # Each thread's recorder, watch, outer frame and loading depth: what its build records.
        self.local = threading.local()
        # Upstream's builds run by threads that gave up waiting (``PatchesBusy``): running now,
        # and started ever. Their draws are theirs: a refused build must not rewind them.
        self.outside_running = self.outside_started = 0
        self.outside_lock = threading.Lock()
        self.owner: int | None = None  # the thread holding ``lock``, while one does
        # Builds started (depth 0 to 1), and the one a load last gave up waiting for: a factory
        # that joins a worker which loads would make each of the worker's loads wait in turn.
        self.builds, self.given_up_on = 0, -1

    def reset_in_child(self) -> None:
        """A forked child has only the thread that forked: a build another thread held at the fork
        never ends there, so its patches come off and its lock goes (or every load in the
        child waits ``PATCHES_WAIT_S``, then builds upstream's way). The forking thread's own
        build (a factory that forks) goes on in the child and keeps them."""
        self.outside_lock = threading.Lock()
        self.outside_running = getattr(self.local, "outside", 0)
        if self.owner != threading.get_ident():  # no build, or another thread's (maybe half-way in)
            self.depth, self.lock = 0, threading.RLock()
            self._uninstall()

    def enter(self) -> None:
        if not self.lock.acquire(blocking=False):
            self._wait()
        try:  # an interrupt here leaves neither the lock held nor a patch on
            if self.depth == 0:
                self.owner = threading.get_ident()
                self.builds += 1
                self._install()
            self.depth += 1
        except BaseException:
            if self.depth == 0:
                self._uninstall()
            self.lock.release()
            raise

    def _wait(self) -> None:
        """Take the lock another thread's build holds, waiting at most ``PATCHES_WAIT_S``, and not
        at all while a build that a load gave up waiting for holds it; else ``PatchesBusy``."""
        holding = self.builds  # the build holding the lock: the next starts only once it ends
        if self.given_up_on == holding:
            if self.lock.acquire(blocking=False):  # it ended meanwhile
                return
            raise PatchesBusy(
                "another thread's fast build, which a load gave up waiting for, held the build patches"
            )
        _faults.point("patches busy")  # wait
        wait_s = _faults.tuned("patches_wait_s", PATCHES_WAIT_S)
        if not self.lock.acquire(timeout=wait_s):
            self.given_up_on = holding
            raise PatchesBusy(f"another thread's fast build held the build patches for {wait_s:g} s")

    def exit(self) -> None:
        self.depth -= 1
        if self.depth == 0:
            self._uninstall()
        self.lock.release()

    @staticmethod
    def _install() -> None:
        nn.Module.register_parameter = _register_deferred  # type: ignore[method-assign]
        nn.Module.load_state_dict = _load_state_dict_not_deferred  # type: ignore[method-assign]
        torch.get_rng_state = torch.random.get_rng_state = _get_rng_state_drawn
        nn.Parameter.__new__ = staticmethod(_parameter_new)  # type: ignore[method-assign]
        torch.manual_seed = torch.random.manual_seed = _manual_seed_seen
        torch.Tensor.set_ = _set_seen  # type: ignore[method-assign,assignment]
        torch.set_rng_state = torch.random.set_rng_state = _set_rng_state_seen

    def _uninstall(self) -> None:
        nn.Module.register_parameter = _original_register  # type: ignore[method-assign]
        nn.Module.load_state_dict = _original_load_state_dict  # type: ignore[method-assign]
        torch.get_rng_state = torch.random.get_rng_state = _original_get_rng_state
        nn.Parameter.__new__ = _original_parameter_new_slot  # type: ignore[method-assign]
        torch.manual_seed = torch.random.manual_seed = _original_manual_seed
        torch.Tensor.set_ = _original_set_  # type: ignore[method-assign]
        torch.set_rng_state = torch.random.set_rng_state = _original_set_rng_state
        self.owner = None


_patches = _Patches()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_patches.reset_in_child)


def _inside_loader_function() -> bool:
    """Whether a loader function runs between the ``with watched_build()`` and here."""
    frame: Any = sys._getframe()
    outer = getattr(_patches.local, "outer_frame", None)
    while frame is not None and frame is not outer:
        if frame.f_code.co_name in LOADER_FUNCTION_NAMES:
            return True
        frame = frame.f_back
    return False


def _registered_by_a_loader() -> bool:
    """Whether ``load_state_dict`` or a loader function registers it (a loader's value)."""
    return getattr(_patches.local, "loading", 0) > 0 or _inside_loader_function()


def _register_deferred(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    recorder: DeferredParameters | None = getattr(_patches.local, "recorder", None)
    if (
        recorder is None
        or type(param) is not nn.Parameter
        or recorder.made.get(id(param)) is not param  # the caller's: upstream copies into it, as placing does
        or _registered_by_a_loader()
    ):
        _original_register(self, name, param)
        return
    if self._parameters.get(name) is not None:
        # A value assigned over a registered parameter, by the constructor: it must come from
        # the checkpoint, or the fast build keeps a value upstream's would not have.
        _patches.local.watch.replaced.append((weakref.ref(self), name))
        _original_register(self, name, param)
        return
    if _placing_would_change(param):  # left as the constructor made it; the build refused after
        recorder.not_kept.append(f"{type(self).__name__}.{name} is quantized, sparse or a conjugate view")
        _original_register(self, name, param)
        return
    # Parameters derived from deferred ones (weight_norm's g and v) are meta already.
    # Our own ops here need no look from the watch (a meta stand-in holds no value).
    # The constructor's own object becomes the stand-in (its data swapped for meta), so every
    # reference it keeps (a tied module, a list of parameters, attributes set on it) stays
    # the model's parameter, as in upstream's build.
    with torch._C.DisableTorchFunction():
        where = f"{type(self).__name__}.{name}"
        if param.is_inference():  # written to only in inference mode: upstream's copy into it fails
            recorder.not_kept.append(f"{where} is an inference tensor")
        if param.device != _META:
            meta = torch.empty_like(param, device=_META)  # holds nothing drawn: no ``_parameter_new``
            stand_in = _original_parameter_new(nn.Parameter, meta, param.requires_grad)
            if not _layout_kept(param, stand_in):  # upstream copies into the constructor's layout
                recorder.not_kept.append(f"{where} has gaps, an offset, spare or shared memory")
            storage = param.untyped_storage()
            if not storage.resizable():  # numpy's, a buffer's: who else holds it cannot be told
                recorder.not_kept.append(f"{where} is memory torch does not own (numpy, a buffer)")
            elif storage_holders(storage) > 2:  # more than the parameter and its storage's object
                recorder.held_elsewhere.append((where, storage))
            _patches.local.watch.unmark_everywhere(param)  # its value is dropped (and the weak refs with it)
            if not swap_in_place(param, stand_in):
                recorder.unswapped.append(where)
                param = stand_in
    _patches.local.watch.stand_in(param)
    _original_register(self, name, param)  # watched: what a registration hook reads of it is seen
    recorder.records.append((weakref.ref(self), name))


def _placing_would_change(param: torch.Tensor) -> bool:
    """Quantized, sparse (or mkldnn), a zero tensor, a conjugate or negative view: upstream's
    copy into it keeps that (or raises), placing would give a plain dense tensor (and meta has
    no quantized kernels)."""
    with torch._C.DisableTorchFunction():
        kind = param.is_quantized or param.layout != torch.strided or param._is_zerotensor()
        return kind or param.is_conj() or param.is_neg()


def _layout_kept(param: torch.Tensor, stand_in: torch.Tensor) -> bool:
    """Whether ``stand_in`` is laid out as ``param`` is: same strides, no offset, no spare memory."""
    return (
        stand_in.stride() == param.stride()
        and param.storage_offset() == 0
        and param.untyped_storage().nbytes() == param.numel() * param.element_size()
    )


def swap_in_place(target: torch.Tensor, replacement: torch.Tensor) -> bool:
    """Give ``target`` (the object its holders refer to) ``replacement``'s data and class, keeping
    its own attributes; False where torch cannot (before 2.3, or a weak reference to either)."""
    swap = getattr(torch.utils, "swap_tensors", None)
    if swap is None:
        return False
    attributes = dict(target.__dict__)
    try:
        if _data_alone(target, replacement):  # swap_tensors' last step: 1 us, not 24
            torch._C._swap_tensor_impl(target, replacement)  # refuses a weak reference C++ holds
            return True
        swap(target, replacement)
    except RuntimeError:
        return False
    target.__dict__.clear()
    target.__dict__.update(attributes)
    return True


def _data_alone(target: torch.Tensor, replacement: torch.Tensor) -> bool:
    """Whether swapping the two tensors' data is all ``swap_tensors`` would do that
    ``swap_in_place`` keeps: one class (its class swap is a no-op, and the attributes stay with
    ``target``), no slots, no weak reference to either (it refuses), each used only by its
    Python object (its use-count check passes without marking an autograd node)."""
    return (
        type(target) is type(replacement)
        and not copyreg._slotnames(type(target))  # type: ignore[attr-defined]
        and target._use_count() == 1  # type: ignore[attr-defined]
        and replacement._use_count() == 1  # type: ignore[attr-defined]
        and not weakref.getweakrefs(target)
        and not weakref.getweakrefs(replacement)
    )


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
    if watch is not None and isinstance(source, (torch.UntypedStorage, torch.TypedStorage)):
        with torch._C.DisableTorchFunction():  # our own look
            watch.handed_out.add(self.untyped_storage()._cdata)  # a storage object the factory holds
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
    recorder: DeferredParameters | None = getattr(_patches.local, "recorder", None)
    if recorder is not None:
        recorder.made[id(param)] = param
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
def watched_build(
    generators: dict[int, tuple[torch.Generator, torch.Tensor]] | None = None,
) -> Iterator[tuple[DeferredParameters, BuildWatch]]:
    """Run a factory inside: its parameters deferred, its random draws and meta errors watched;
    the factory's own generators, as they were before its first draw from each, go into
    ``generators``.

    Blocks nest: an inner block records its own parameters, and the outer block's
    recorder is back when it exits.
    """
    saved = _saved_state()
    recorder, watch = DeferredParameters(), BuildWatch(generators, outer=saved[1])
    # Only loaders called from inside the block count: the whole load may itself
    # run inside one (upstream's ``StableAudioModel.from_pretrained``).
    outer_frame = sys._getframe(2)
    _patches.enter()
    try:  # from the moment the lock is held: an interrupt anywhere after leaks neither
        _patches.local.recorder, _patches.local.watch = recorder, watch
        _patches.local.outer_frame = outer_frame
        with _watching(watch):
            yield recorder, watch
    finally:
        recorder.made.clear()  # a temporary Parameter is not kept past the factory
        _patches.local.recorder, _patches.local.watch, _patches.local.outer_frame = saved
        _patches.exit()


@contextlib.contextmanager
def _watching(watch: BuildWatch) -> Iterator[None]:
    """``with watch:``, except that leaving takes the watch itself off the mode stack, not the
    mode on top: a constructor that enters a mode of its own and never leaves it keeps that mode
    on, as upstream's build does, and the watch (which keeps drawn memory alive) does not."""
    watch.__enter__()
    try:
        yield
    finally:
        above = []
        while torch._C._len_torch_function_stack():
            mode = torch._C._pop_torch_function_stack()
            if mode is watch:
                break
            above.append(mode)
        for mode in reversed(above):
            torch._C._push_on_torch_function_stack(mode)


@contextlib.contextmanager
def built_outside() -> Iterator[None]:
    """Upstream's build of a thread that gave up waiting for another thread's build."""
    with _patches.outside_lock:
        _patches.outside_running += 1
        _patches.outside_started += 1
    _patches.local.outside = getattr(_patches.local, "outside", 0) + 1  # what a forked child keeps
    try:
        yield
    finally:
        _patches.local.outside -= 1
        with _patches.outside_lock:
            _patches.outside_running -= 1


def outside_builds() -> tuple[int, int]:
    """(running, started) of ``built_outside`` builds: unchanged and (0, n) over a build means
    no other thread's upstream build drew meanwhile."""
    with _patches.outside_lock:
        return _patches.outside_running, _patches.outside_started


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

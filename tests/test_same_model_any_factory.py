"""The model upstream gives, with any factory.

A tensor the constructor derives from a parameter is never left on the meta device; a value
drawn at random while the model is built, by any function (one no torch function mode sees
included), and kept anywhere (a buffer, a Python number, a list, an RNG state, a plain or
slotted object, a deque, a closure, a partial, a hook) gives upstream's build, generators
included; a parameter the
constructor replaces must be in the checkpoint; a text encoder loaded inside the factory keeps
the fast build; loads nest (a teacher inside a student); a factory that fails runs once and its
error passes through unchanged, an error over its own meta tensors too. Loading or a state dict
that the model customises, parameters that share memory or are laid out with gaps, grads set
in the constructor and a parameter's device read into a plain value give upstream's build."""

from __future__ import annotations

import collections
import copy
import ctypes
import dataclasses
import functools
import gc
import itertools
import operator
import random
import re
import subprocess
import sys
import threading
import types
import warnings
import weakref
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model, bits
from support.faults import at, injected, tuned
from support.loads import load_toy
from support.processes import child_env, toy_zygote
from support.toymodel import ToyDiT, build, reference
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

import sa3loader
from sa3loader import _faults


class DerivedInADict(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.derived = {"scaled": [self.blocks[0].ff.weight.detach() * 2]}


class DerivedBuffer(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scaled", self.blocks[0].ff.weight.detach() * 2, persistent=False)


def upstream_recipe(cls, ckpt, half, seed=True):
    if seed:
        torch.manual_seed(0)
    model = cls()
    model.load_state_dict(load_file(str(ckpt)), strict=False)
    model.to("cpu").eval().requires_grad_(False)
    return model.to(torch.float16) if half else model  # upstream's call: complex tensors too


def built_as_upstreams(tmp_path, make, kind, *, half=False, state=None) -> tuple[nn.Module, nn.Module]:
    """A checkpoint (``state``, else the toy's) loaded by ``make``: the ``kind`` of build said,
    and a model equal to upstream's recipe's. Returns both."""
    ckpt = save(
        random_like_state(build(), seed=3) if state is None else state, tmp_path / "model.safetensors"
    )
    ref = upstream_recipe(make, ckpt, half)
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=lambda c: make()
    )
    assert sa3loader.last_load_info().build == kind
    assert_same_model(model, ref)
    return model, ref


@pytest.mark.parametrize("cls", [DerivedInADict, DerivedBuffer], ids=["in-a-dict", "non-persistent-buffer"])
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_a_tensor_derived_from_a_parameter_is_upstreams(tmp_path, cls, half):
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=lambda config: cls()
    )
    info = sa3loader.last_load_info()
    assert info.build == "faithful" and "computed from a parameter" in info.fallback
    ref = upstream_recipe(cls, ckpt, half)
    assert_same_model(model, ref)
    ours = model.derived["scaled"][0] if cls is DerivedInADict else model.scaled
    theirs = ref.derived["scaled"][0] if cls is DerivedInADict else ref.scaled
    assert not ours.is_meta and torch.equal(bits(ours), bits(theirs))


class RandomBuffer(ToyDiT):
    """A non-persistent buffer drawn at random after the init upstream runs and we skip."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.randn(8), persistent=False)


class RandomScaledAttribute(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.table = {"scaled": torch.randn(8) * 0.5 + 1}


class RandomInPlace(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.zeros(8), persistent=False)
        nn.init.normal_(self.noise[:4])  # through a view


class RandomAssignedInto(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.zeros(8), persistent=False)
        self.noise[2:6] = torch.randn(4)


class RandomButSaved(ToyDiT):
    """A persistent buffer drawn at random, which the checkpoint then replaces: nothing kept."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.randn(8))


@pytest.mark.parametrize(
    "cls",
    [RandomBuffer, RandomScaledAttribute, RandomInPlace, RandomAssignedInto],
    ids=["buffer", "computed-attribute", "in-place-on-a-view", "assigned-into"],
)
def test_a_value_drawn_at_random_and_kept_is_upstreams(tmp_path, cls):
    """The fast build skips the random init, so its generator is elsewhere when the value is
    drawn: upstream's build runs instead, and the value (and the generator after) are upstream's."""
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    ours_after = torch.rand(4)
    info = sa3loader.last_load_info()
    assert info.build == "faithful" and "drawn at random" in info.fallback
    ref = upstream_recipe(cls, ckpt, True)
    assert torch.equal(ours_after, torch.rand(4))  # the generator where upstream's load leaves it
    assert_same_model(model, ref)
    for name in ("noise", "table"):
        if hasattr(ref, name):
            ours, theirs = getattr(model, name), getattr(ref, name)
            ours, theirs = (ours["scaled"], theirs["scaled"]) if name == "table" else (ours, theirs)
            assert torch.equal(bits(ours), bits(theirs))


def test_a_value_drawn_at_random_that_the_checkpoint_replaces_keeps_the_fast_build(tmp_path):
    torch.manual_seed(0)
    state = random_like_state(RandomButSaved(), seed=3)
    ckpt = save(state, tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: RandomButSaved()
    )
    assert sa3loader.last_load_info().build == "fast"
    assert_same_model(model, upstream_recipe(RandomButSaved, ckpt, True))


def test_a_failing_factory_runs_once_and_its_error_passes_through(tmp_path):
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    calls = []

    class FactoryError(Exception):
        pass

    def failing(config):
        calls.append(config)
        raise FactoryError("no such encoder: t5gemma-xl")

    with pytest.raises(FactoryError, match="no such encoder") as err:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=failing)
    assert len(calls) == 1 and type(err.value) is FactoryError


NESTED = """
import torch
import sa3loader
from support.toymodel import build

def teacher_reading_parameters(config):  # its own fast build is refused: faithful, nested
    model = build(config)
    model.norm_at_init = float(model.blocks[0].ff.weight.detach().norm())
    return model

def student(config):
    model = build(config)
    model.__dict__["teacher"] = sa3loader.load_diffusion_cond(
        {{}}, {teacher!r}, "cpu", False, model_factory=build)
    if {with_reader!r}:
        model.__dict__["reader"] = sa3loader.load_diffusion_cond(
            {{}}, {teacher!r}, "cpu", False, model_factory=teacher_reading_parameters)
    return model

torch.manual_seed(0)
model = sa3loader.load_diffusion_cond(
    {{}}, {student!r}, "cpu", True, cache_dir={cache!r}, model_factory=student)
reader = model.__dict__.get("reader", model.teacher)
print(sa3loader.last_load_info().build, model.teacher.blocks[0].ff.weight.is_meta,
      reader.blocks[0].ff.weight.is_meta, model.blocks[0].ff.weight.dtype)
"""


@pytest.mark.parametrize("with_reader", [False, True], ids=["teacher", "teacher-and-reader"])
def test_loads_nest_inside_a_factory(tmp_path, with_reader):
    """A factory that loads a teacher itself (or a nested call under install()) never deadlocks.
    A nested model whose own build read its random init (``float(weight.norm())``) keeps a number
    drawn where the outer fast build's generator was elsewhere: the outer build is upstream's."""
    torch.manual_seed(0)
    teacher = save(random_like_state(build(), seed=4), tmp_path / "teacher.safetensors")
    student = save(random_like_state(build(), seed=3), tmp_path / "student.safetensors")
    script = NESTED.format(
        teacher=str(teacher), student=str(student), cache=str(tmp_path / "c"), with_reader=with_reader
    )
    proc = toy_zygote().run("-c", script, env=child_env(), timeout=120)  # a deadlock fails, not hangs
    assert proc.returncode == 0, proc.stderr
    outer = "faithful" if with_reader else "fast"
    assert proc.stdout.split() == [outer, "False", "False", "torch.float16"]


def child_output(template: str, tmp_path, **seeds: int) -> list[str]:
    """The words ``template`` prints, run in a fresh process with a checkpoint per name in
    ``seeds`` (its path formatted in under that name) and a cache dir (``cache``)."""
    torch.manual_seed(0)
    paths = {
        name: str(save(random_like_state(build(), seed=seed), tmp_path / f"{name}.safetensors"))
        for name, seed in seeds.items()
    }
    proc = toy_zygote().run(
        "-c", template.format(cache=str(tmp_path / "c"), **paths), env=child_env(), timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split()


NESTED_IN_A_THREAD = """
import threading
import torch
from safetensors.torch import load_file
import sa3loader
from support.faults import tuned
from support.toymodel import build

TEACHER_LOADS = []

def student(config):
    model = build(config)

    def load_teacher():
        teacher = sa3loader.load_diffusion_cond({{}}, {teacher!r}, "cpu", False, model_factory=build)
        TEACHER_LOADS.append((teacher, sa3loader.last_load_info()))

    worker = threading.Thread(target=load_teacher)
    worker.start()
    worker.join()
    model.__dict__["teacher"] = TEACHER_LOADS[-1][0]
    return model

torch.manual_seed(0)
with tuned(patches_wait_s=0.5):
    model = sa3loader.load_diffusion_cond(
        {{}}, {student!r}, "cpu", True, cache_dir={cache!r}, model_factory=student)
weight = load_file({teacher!r})["blocks.0.ff.weight"]
print(sa3loader.last_load_info().build, *[info.build for _, info in TEACHER_LOADS],
      "held the build patches" in str(TEACHER_LOADS[0][1].fallback),
      torch.equal(model.teacher.blocks[0].ff.weight.view(torch.int32), weight.view(torch.int32)))
"""


def test_a_factory_that_loads_a_part_in_a_worker_thread_and_joins_it_does_not_hang(tmp_path):
    """The outer fast build holds the build patches while its factory waits for the worker; the
    worker's load waits for them only so long, then builds upstream's way (which needs none).
    Its random init, drawn meanwhile from torch's generator, then refuses the outer fast build
    (another thread drawing), whose faithful build loads the teacher again, fast."""
    out = child_output(NESTED_IN_A_THREAD, tmp_path, teacher=4, student=3)  # a deadlock fails, not hangs
    assert out == ["faithful", "faithful", "fast", "True", "True"]


PARTS_IN_A_THREAD = """
import threading
import torch
import sa3loader
from support.faults import at, injected, tuned
from support.toymodel import build

WAITS, BUILDS = [], []

def student(config):
    model = build(config)

    def load_parts():
        for _ in range(3):
            sa3loader.load_diffusion_cond({{}}, {teacher!r}, "cpu", False, model_factory=build)
            BUILDS.append(sa3loader.last_load_info().build)

    worker = threading.Thread(target=load_parts)
    worker.start()
    worker.join()
    return model

torch.manual_seed(0)
with tuned(patches_wait_s=0.5), injected(at("patches busy", lambda: WAITS.append(1))):
    sa3loader.load_diffusion_cond({{}}, {student!r}, "cpu", True, cache_dir={cache!r}, model_factory=student)
print(len(WAITS), *BUILDS)
"""


def test_a_worker_that_loads_parts_for_a_waiting_factory_waits_once(tmp_path):
    """The worker's first load waits for the outer build, gives up and builds upstream's way; its
    next loads give up on that build at once (each waited in turn). The outer build, refused
    (the worker drew meanwhile), runs the factory again: the worker's loads then build fast."""
    assert (
        child_output(PARTS_IN_A_THREAD, tmp_path, teacher=4, student=3)
        == ["1"] + ["faithful"] * 3 + ["fast"] * 3
    )


class ZerosOnly(nn.Module):
    """Draws nothing when built: its faithful build leaves torch's generator where it was."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(4))


def test_a_load_that_gave_up_waiting_for_another_threads_build_rewinds_no_draw(tmp_path):
    """A load that waited too long for the build patches builds upstream's way without having
    run its factory, so it puts no generator back: a draw the other thread's build made
    meanwhile stays where it is, and that build stays fast."""
    torch.manual_seed(0)
    ckpt_a = save(random_like_state(build(), seed=3), tmp_path / "a.safetensors")
    ckpt_b = save({"w": torch.ones(4)}, tmp_path / "b.safetensors")
    a_building, b_waiting, b_done = threading.Event(), threading.Event(), threading.Event()
    infos = {}

    def factory_a(config):
        model = build(config)
        a_building.set()
        assert b_waiting.wait(30)
        torch.randn(3)  # a draw the model does not keep: the fast build stands
        assert b_done.wait(30)
        return model

    def load_a():
        sa3loader.load_diffusion_cond(
            {}, ckpt_a, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory_a
        )
        infos["a"] = sa3loader.last_load_info()

    thread = threading.Thread(target=load_a)
    with tuned(patches_wait_s=2.0), injected(at("patches busy", b_waiting.set)):
        thread.start()
        assert a_building.wait(30)
        try:
            sa3loader.load_diffusion_cond(
                {}, ckpt_b, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: ZerosOnly()
            )
            infos["b"] = sa3loader.last_load_info()
        finally:
            b_done.set()
            thread.join(60)
    assert infos["b"].build == "faithful" and "held the build patches" in infos["b"].fallback
    assert infos["a"].build == "fast", infos["a"].fallback


def test_a_refused_build_does_not_rewind_a_thread_that_gave_up_waiting_for_it(tmp_path):
    """Thread B gave up waiting for A's build and runs upstream's build meanwhile; A's build is
    then refused. A must not put torch's generator back: that would rewind B's seeded draws."""
    pa = save({"w": torch.ones(4)}, tmp_path / "a.safetensors")
    pb = save({"w": torch.ones(4)}, tmp_path / "b.safetensors")
    inside, go, drawn = threading.Event(), threading.Event(), threading.Event()
    models = {}

    class ReadsItsWeight(nn.Module):
        """Refuses the fast build (reads a parameter's value); waits for ``go`` the first time."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))
            if not inside.is_set():
                inside.set()  # holding the build patches
                assert go.wait(30)
            self.total = float(self.w.detach().sum())

    class SeedsThenDraws(nn.Module):
        """Seeds, lets A go on, then keeps a draw the checkpoint does not replace."""

        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(4))
            torch.manual_seed(123)
            go.set()
            assert drawn.wait(30)
            self.extra = nn.Parameter(torch.randn(4))

    def load(key, cls, path):
        models[key] = sa3loader.load_diffusion_cond(
            {}, path, "cpu", False, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
        )

    holder = threading.Thread(target=load, args=("a", ReadsItsWeight, pa))
    waiter = threading.Thread(target=load, args=("b", SeedsThenDraws, pb))
    with tuned(patches_wait_s=0.3):
        holder.start()
        assert inside.wait(30)
        waiter.start()
        holder.join(60)  # A's refused build and its upstream build end before B draws
        drawn.set()
        waiter.join(60)
    torch.manual_seed(123)
    assert torch.equal(models["b"].extra, torch.randn(4))
    assert torch.equal(models["a"].w, torch.ones(4))


FORKED = """
import os, threading, torch
from torch import nn
from torch.nn import functional as F
import sa3loader
from support.faults import tuned
from support.toymodel import build

ORIGINAL = nn.Module.register_parameter
building, release, children = threading.Event(), threading.Event(), []


def holding(config):
    model = build(config)
    building.set()
    assert release.wait(60)
    return model


def forking(config):
    model = build(config)
    children.append(os.fork())
    return model


def load(factory, path):
    return sa3loader.load_diffusion_cond({{}}, path, "cpu", True, cache_dir={cache!r}, model_factory=factory)


def in_child(work, report):
    try:
        work()
        patches_off = nn.Module.register_parameter is ORIGINAL
        os.write(report, f"{{sa3loader.last_load_info().build}} {{patches_off}}".encode())
    finally:
        os._exit(0)


def reported(pid, report):
    os.waitpid(pid, 0)
    return os.read(report, 200).decode() or "nothing"


torch.manual_seed(0)
with tuned(patches_wait_s=1.0):
    thread = threading.Thread(target=load, args=(holding, {a!r}))
    thread.start()
    assert building.wait(60)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        in_child(lambda: load(build, {b!r}), write)
    print(reported(pid, read))
    release.set()
    thread.join(60)

    read, write = os.pipe()
    try:
        load(forking, {b!r})
    except BaseException as error:
        if children[-1] == 0:  # the child's end of the build failed: say so, and go
            os.write(write, type(error).__name__.encode())
            os._exit(1)
        raise
    if children[-1] == 0:
        in_child(lambda: None, write)
    print(reported(children[-1], read), sa3loader.last_load_info().build)
"""


def test_a_child_forked_while_a_build_runs_builds_fast_and_finishes_its_own(tmp_path):
    """A child forked while another thread's build holds the build patches has no such thread:
    the patches are off there and its load builds fast at once (it waited, then built
    upstream's way). A child forked by the build's own factory finishes that build, fast, and
    takes the patches off."""
    assert child_output(FORKED, tmp_path, a=4, b=3) == ["fast", "True", "fast", "True", "fast"]


def test_an_interrupt_as_the_build_patches_go_on_leaves_them_off(tmp_path, monkeypatch):
    """A ``KeyboardInterrupt`` after the build patches' lock is taken releases it and takes off
    what was put on: the next load, in any thread, builds fast."""
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "m.safetensors")
    original, real_get_ident = nn.Module.register_parameter, threading.get_ident

    def interrupted_once() -> int:
        if sys._getframe(1).f_code.co_name == "enter" and not interrupted_once.done:
            interrupted_once.done = True
            raise KeyboardInterrupt
        return real_get_ident()

    interrupted_once.done = False
    monkeypatch.setattr(threading, "get_ident", interrupted_once)
    with pytest.raises(KeyboardInterrupt):
        load_toy(ckpt, tmp_path / "c")
    assert interrupted_once.done and nn.Module.register_parameter is original
    builds = []

    def load_in_a_thread() -> None:
        load_toy(ckpt, tmp_path / "c")
        builds.append(sa3loader.last_load_info().build)

    with tuned(patches_wait_s=0.5):  # a leaked lock: this waits, then builds upstream's way
        worker = threading.Thread(target=load_in_a_thread)
        worker.start()
        worker.join(60)
    assert builds == ["fast"]


class Strided(ToyDiT):
    """Parameters laid out as a constructor may lay them out: transposed, channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.transposed = torch.nn.Parameter(torch.randn(8, 4).t())
        self.conv2d = torch.nn.Conv2d(4, 8, 3)
        self.conv2d.weight = torch.nn.Parameter(self.conv2d.weight.to(memory_format=torch.channels_last))
        # one and no element, dense, strides of their own: what upstream's copy keeps
        self.one = torch.nn.Parameter(torch.empty_strided((1, 1), (3, 7)).zero_())
        self.none = torch.nn.Parameter(torch.empty_strided((2, 0), (5, 11)))


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
@pytest.mark.parametrize("io", ["mmap", "read"])
def test_parameters_keep_the_strides_upstream_gives_them(tmp_path, half, io):
    torch.manual_seed(0)
    ckpt = save(random_like_state(Strided(), seed=3), tmp_path / "model.safetensors")
    for _ in range(2 if half else 1):  # the conversion, then the hit
        torch.manual_seed(0)
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=lambda config: Strided(), io=io
        )
        assert sa3loader.last_load_info().build == "fast"
        ref = upstream_recipe(Strided, ckpt, half)
        assert_same_model(model, ref)
        for name, value in ref.named_parameters():
            assert dict(model.named_parameters())[name].stride() == value.stride(), name
    assert model.transposed.stride() == (1, 4) and model.conv2d.weight.is_contiguous(
        memory_format=torch.channels_last
    )
    assert model.one.stride() == (3, 7) and model.none.stride() == (5, 11)


class KeptAsPythonList(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.order = torch.randperm(8).tolist()


class KeptAsPythonNumber(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.rand(()).item() * 2 + 1  # Python arithmetic on a drawn number


class KeptAsFloatOfATensor(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.scale = float(torch.rand(()) * 2 + 1)


class NumpySeededFromTorch(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.table = np.random.default_rng(torch.randint(0, 2**31, ()).item()).standard_normal(4)


class KeptRngState(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("state", torch.get_rng_state(), persistent=False)


class InAPlainObject(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.extras = types.SimpleNamespace(noise=torch.randn(4), weight=nn.Parameter(torch.randn(3)))


@dataclasses.dataclass(slots=True)
class SlottedBox:
    value: torch.Tensor


class InASlottedObject(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.box = SlottedBox(torch.randn(4))


class InADeque(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.history = collections.deque([torch.randn(4)])


class InAClosure(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        noise = torch.randn(4)
        self.noise = lambda: noise


class InAPartial(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.shift = functools.partial(torch.add, torch.randn(4))


class InAHook(ToyDiT):
    """Only a hook holds the draw (as a default argument)."""

    def __init__(self) -> None:
        super().__init__()
        noise = torch.randn(4)
        self.register_forward_pre_hook(lambda module, args, noise=noise: None)


def _hook_noise(model: nn.Module) -> list[float]:
    hooks = list(model._forward_pre_hooks.values())
    return hooks[-1].__defaults__[0].tolist()


KEPT = {
    "list": (KeptAsPythonList, lambda m: m.order),
    "number": (KeptAsPythonNumber, lambda m: m.scale),
    "float-of-a-tensor": (KeptAsFloatOfATensor, lambda m: m.scale),
    "numpy-seeded-from-torch": (NumpySeededFromTorch, lambda m: m.table.tolist()),
    "rng-state": (KeptRngState, lambda m: m.state.tolist()),
    "plain-object": (InAPlainObject, lambda m: (m.extras.noise.tolist(), m.extras.weight.tolist())),
    "slotted-object": (InASlottedObject, lambda m: m.box.value.tolist()),
    "deque": (InADeque, lambda m: m.history[0].tolist()),
    "closure": (InAClosure, lambda m: m.noise().tolist()),
    "partial": (InAPartial, lambda m: m.shift.args[0].tolist()),
    "hook": (InAHook, _hook_noise),
}


@pytest.mark.parametrize("kind", list(KEPT))
def test_a_value_drawn_at_random_and_kept_outside_a_tensor_is_upstreams(tmp_path, kind):
    """Python numbers, lists, numpy arrays, RNG states, tensors in plain objects: the watch
    follows drawn values through item(), tolist(), float() and into objects, and the model
    that keeps one is upstream's build, with the generator where upstream's load leaves it."""
    cls, kept = KEPT[kind]
    torch.manual_seed(0)
    ckpt = save(random_like_state(cls(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    after = torch.rand(4)
    info = sa3loader.last_load_info()
    assert info.build == "faithful", info.fallback
    ref = upstream_recipe(cls, ckpt, True)
    assert torch.equal(after, torch.rand(4))
    assert kept(model) == kept(ref)
    assert_same_model(model, ref)


def _shared_with_a_draw() -> torch.Tensor:
    return torch.zeros(8).set_(torch.randn(8))  # set_ never reaches a torch function mode


def _data_of_a_draw() -> torch.Tensor:
    kept = torch.zeros(8)
    kept.data = torch.randn(8)
    return kept


def _hidden_draw() -> torch.Tensor:
    with torch._C.DisableTorchFunction():  # no mode sees this: only the generator tells
        return torch.randn(8)


def _hidden_draw_then_state_put_back() -> torch.Tensor:
    with torch.random.fork_rng():  # draws unseen, then sets the generator back
        _hidden_draw()
    return torch.ones(8)


# Draws the watch knows by name, through torch.ops, through torch.distributions, by sharing
# storage, and draws it cannot see at all (only the generator's state shows them).
DRAWS = {
    "dropout2d": lambda: nn.functional.dropout2d(torch.ones(1, 8, 1, 1), 0.5, True).flatten(),
    "alpha_dropout": lambda: nn.functional.alpha_dropout(torch.ones(8), 0.5, True),
    "rrelu": lambda: nn.functional.rrelu(-torch.ones(8), training=True),
    "gumbel_softmax": lambda: nn.functional.gumbel_softmax(torch.zeros(8)),
    "binomial": lambda: torch.binomial(torch.full((8,), 10.0), torch.full((8,), 0.5)),
    "gamma-sample": lambda: torch.distributions.Gamma(torch.ones(8), torch.ones(8)).sample(),
    "dirichlet-sample": lambda: torch.distributions.Dirichlet(torch.ones(8)).sample(),
    "torch.ops": lambda: torch.ops.aten.randn.default([8]),
    "set_": _shared_with_a_draw,
    "data=": _data_of_a_draw,
    "unseen": _hidden_draw,
}


class KeepsADraw(ToyDiT):
    draw = staticmethod(DRAWS["unseen"])

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("kept", type(self).draw(), persistent=False)


@pytest.mark.parametrize("how", list(DRAWS))
def test_a_value_drawn_by_any_function_and_kept_is_upstreams(tmp_path, how):
    cls = type("Keeps", (KeepsADraw,), {"draw": staticmethod(DRAWS[how])})
    torch.manual_seed(0)
    ckpt = save(random_like_state(cls(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    info = sa3loader.last_load_info()
    assert info.build == "faithful", info.fallback
    ref = upstream_recipe(cls, ckpt, True)
    assert torch.equal(bits(model.kept), bits(ref.kept))
    assert_same_model(model, ref)


def test_an_unseen_draw_hidden_by_putting_the_generator_back_is_still_seen(tmp_path):
    """``fork_rng`` sets the state back after a draw no mode saw: the check before the set
    catches it (a factory that then keeps nothing drawn is refused all the same: safe)."""
    cls = type("Keeps", (KeepsADraw,), {"draw": staticmethod(_hidden_draw_then_state_put_back)})
    torch.manual_seed(0)
    ckpt = save(random_like_state(cls(), seed=3), tmp_path / "model.safetensors")
    sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    assert "generator" in sa3loader.last_load_info().fallback


def test_a_factory_that_seeds_the_generator_keeps_the_fast_build(tmp_path):
    """``manual_seed`` is not a draw: a factory that seeds and then only builds layers stays fast."""

    class Seeded(ToyDiT):
        def __init__(self) -> None:
            torch.manual_seed(5)
            super().__init__()

    built_as_upstreams(tmp_path, Seeded, "fast", half=True, state=random_like_state(Seeded(), seed=3))


class DrawsFromNumpyAndRandom(ToyDiT):
    """Draws from numpy's and Python's generators; its checkpoint lacks a parameter, so the fast
    build is refused after the factory ran once."""

    def __init__(self) -> None:
        super().__init__()
        self.numpy_noise = np.random.standard_normal(3).tolist()
        self.python_noise = random.random()
        self.extra = nn.Linear(2, 2)


def test_after_a_refused_fast_build_every_generator_is_where_upstreams_is(tmp_path):
    torch.manual_seed(0)
    state = random_like_state(DrawsFromNumpyAndRandom(), seed=3)
    ckpt = save(
        {k: v for k, v in state.items() if not k.startswith("extra.")}, tmp_path / "model.safetensors"
    )

    def seeded():
        torch.manual_seed(0)
        np.random.seed(1)
        random.seed(2)

    seeded()
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: DrawsFromNumpyAndRandom()
    )
    ours_after = (torch.rand(2).tolist(), np.random.rand(), random.random())
    assert sa3loader.last_load_info().build == "faithful"
    seeded()
    ref = upstream_recipe(DrawsFromNumpyAndRandom, ckpt, True, seed=False)
    assert ours_after == (torch.rand(2).tolist(), np.random.rand(), random.random())
    assert (model.numpy_noise, model.python_noise) == (ref.numpy_noise, ref.python_noise)
    assert_same_model(model, ref)


def test_a_factory_error_that_mentions_meta_passes_through_after_one_call(tmp_path):
    """Only torch's refusal of a meta tensor's data means "build it for real": told by where
    the error came from, never by the word "meta" in a message."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    calls = []

    def factory(config):
        calls.append(config)
        build(config)
        raise KeyError("the config has no 'metadata' section")

    with pytest.raises(KeyError, match="metadata") as err:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory)
    assert len(calls) == 1 and type(err.value) is KeyError


def test_a_factory_error_over_its_own_meta_tensors_passes_through_after_one_call(tmp_path):
    """A factory may use meta tensors itself (shape inference without memory): torch's error
    over one of those is the factory's own, not a refusal of a deferred parameter's data."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    calls = []

    def factory(config):
        calls.append(config)
        model = build(config)
        probe = torch.empty(1, 5, device="meta")
        model.out_width = (probe @ torch.empty(16, 4, device="meta")).shape[-1]  # 5 != 16: torch raises
        return model

    with pytest.raises(RuntimeError) as err:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory)
    assert len(calls) == 1 and type(err.value) is RuntimeError


class ReplacesARegisteredParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 4)
        self.head.weight = nn.Parameter(torch.randn(4, 4) * 0.02)  # its own init, over the registered one


@pytest.mark.parametrize("covered", [False, True], ids=["not-in-the-checkpoint", "in-the-checkpoint"])
def test_a_parameter_the_constructor_replaces_is_upstreams(tmp_path, covered):
    torch.manual_seed(0)
    state = random_like_state(ReplacesARegisteredParameter(), seed=3)
    if not covered:
        del state["head.weight"]
    ckpt = save(state, tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {},
        ckpt,
        "cpu",
        True,
        cache_dir=tmp_path / "c",
        model_factory=lambda c: ReplacesARegisteredParameter(),
    )
    info = sa3loader.last_load_info()
    assert info.build == ("fast" if covered else "faithful"), info.fallback
    assert_same_model(model, upstream_recipe(ReplacesARegisteredParameter, ckpt, True))


@pytest.mark.parametrize("half", [True, False])
def test_toy_model_matches_plain_torch_recipe(ckpt, tmp_path, half):
    model = load_toy(ckpt, tmp_path / "cache", half)
    assert sa3loader.last_load_info().build == "fast"
    assert_same_model(model, reference(ckpt, half))
    assert model.blocks[0].rope.scale.dtype == (torch.float16 if half else torch.float32)  # non-persistent


def test_factory_that_reads_parameters_falls_back_to_the_faithful_build(ckpt, tmp_path):
    def reading_factory(config):
        model = build(config)
        model.initial_norm = float(model.blocks[0].ff.weight.detach().norm())  # needs real values
        return model

    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=reading_factory
    )
    info = sa3loader.last_load_info()
    assert info.build == "faithful" and "needs real parameters" in info.fallback
    torch.manual_seed(0)
    ref = reading_factory({})
    ref.load_state_dict(load_file(str(ckpt)), strict=False)
    assert_same_model(model, ref.eval().requires_grad_(False).half())
    assert model.initial_norm == ref.initial_norm


def test_load_into_module_reports_skipped_keys(tmp_path):
    torch.manual_seed(0)
    state = random_like_state(build(), seed=1)
    state["unknown.key"] = torch.ones(2)
    state["half_part.bias"] = torch.ones(7)  # wrong shape
    del state["blocks.0.ff.weight"]
    ckpt = save(state, tmp_path / "model.safetensors")
    module = build()
    before = module.blocks[0].ff.weight.detach().clone()
    result = sa3loader.load_into_module(module, ckpt)
    assert result.unexpected_keys == ["unknown.key"]
    assert result.mismatched_keys == ["half_part.bias"]
    assert set(result.missing_keys) == {"blocks.0.ff.weight", "half_part.bias"}
    assert torch.equal(module.blocks[0].ff.weight, before)


@pytest.mark.parametrize("style", ["load_state_dict", "assign", "from_pretrained"])
def test_encoder_loaded_inside_the_factory_keeps_the_fast_build(tmp_path, style):
    """What a nested loader registers carries loaded values: never deferred, loaded once."""
    from support.toymodel import OutsideEncoder

    config = {"encoder_style": style}
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(config), seed=1), tmp_path / "model.safetensors")
    calls = []
    factory = lambda cfg: calls.append(cfg) or build(cfg)  # noqa: E731
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        config, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory
    )
    assert (sa3loader.last_load_info().build, sa3loader.last_load_info().fallback) == ("fast", None)
    assert len(calls) == 1
    encoder = model.conditioner.encoder
    assert isinstance(encoder, OutsideEncoder) and "encoder" not in model.conditioner._modules
    assert_same_model(model, reference(ckpt, config=config))
    assert encoder.embed.weight.dtype == torch.bfloat16 and not encoder.embed.weight.is_meta


def test_a_load_called_from_a_from_pretrained_still_defers(tmp_path):
    """Upstream's ``StableAudioModel.from_pretrained`` calls the loader: only loaders
    running inside the factory keep their parameters, the DiT's are still placed."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")

    def from_pretrained():
        return sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, model_factory=build)

    from_pretrained()
    info = sa3loader.last_load_info()
    state = build().state_dict()  # parameters and persistent buffers: every value read
    placed = sum(v.nbytes for k, v in load_file(str(ckpt)).items() if k in state)
    assert (info.build, info.bytes_read) == ("fast", placed)


def test_a_failing_factory_stops_the_early_prefetch(tmp_path, monkeypatch):
    """The sibling is faulted in while the factory runs; a factory error stops it where it is
    (the pieces not yet started are never touched) and propagates."""
    import threading
    import time

    torch.manual_seed(0)
    ckpt = save(random_like_state(build({"dim": 256}), seed=1), tmp_path / "model.safetensors")
    sa3loader.load_diffusion_cond(
        {"dim": 256}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build
    )
    touched = []
    started = threading.Event()

    def slow_touch(name, subject=None):  # a cold disk: every piece takes a while
        if name == "touch":
            touched.append(subject)
            started.set()
            time.sleep(0.05)

    monkeypatch.setitem(_faults.tunings, "prefetch_piece_bytes", 16 * 1024)
    monkeypatch.setitem(_faults.tunings, "prefetch_hot_piece_bytes", 16 * 1024)  # in the page cache
    monkeypatch.setattr(_faults, "hook", slow_touch)

    def broken(config):
        assert started.wait(10)  # the prefetch is under way
        raise RuntimeError("factory broke")

    with pytest.raises(RuntimeError, match="factory broke"):
        sa3loader.load_diffusion_cond(
            {"dim": 256}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=broken
        )
    assert not [t for t in threading.enumerate() if t.name == "sa3loader-prefetch"]
    pieces = (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").stat().st_size // (16 * 1024)
    assert 0 < len(touched) < pieces // 2, (len(touched), pieces)


# Ordinary constructors that hold on to what they register, or to where it lives: the fast
# build keeps every holder pointing at the model's parameter (deferred and placed in place)
# or, where it cannot, is refused. Each compares with upstream's recipe under the same seed.
class TiedThroughALocal(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        shared = nn.Parameter(torch.zeros(4))
        self.enc, self.dec = nn.Module(), nn.Module()
        self.enc.pos = shared
        self.dec.pos = shared


class KeepsItsOwnHandle(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        scale = nn.Parameter(torch.ones(4))
        self.scale = scale
        self.decay_exempt = [scale, self.blocks[0].ff.bias]


class TagsItsParameters(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.blocks[0].ff.bias._no_weight_decay = True


class KeepsTheDevice(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.device = self.blocks[0].ff.weight.device


class CatchesTorchsRefusal(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        try:
            self.init_scale = float(self.blocks[0].ff.weight.detach().abs().max())
        except RuntimeError:  # a fallback value upstream never takes
            self.init_scale = 1.0


HOLDERS = {
    "tied-through-a-local": (
        TiedThroughALocal,
        "fast",
        lambda m: (m.enc.pos is m.dec.pos, bits(m.dec.pos).tolist()),
    ),
    "own-handle": (
        KeepsItsOwnHandle,
        "fast",
        lambda m: [h is p for h, p in zip(m.decay_exempt, (m.scale, m.blocks[0].ff.bias), strict=True)],
    ),
    "tagged-parameter": (
        TagsItsParameters,
        "fast",
        lambda m: getattr(m.blocks[0].ff.bias, "_no_weight_decay", None),
    ),
    "kept-device": (KeepsTheDevice, "faithful", lambda m: str(m.device)),
    "caught-refusal": (CatchesTorchsRefusal, "faithful", lambda m: m.init_scale),
}


@pytest.mark.parametrize("kind", list(HOLDERS))
def test_what_a_constructor_holds_of_its_parameters_is_upstreams(tmp_path, kind):
    cls, build_kind, held = HOLDERS[kind]
    torch.manual_seed(0)
    ckpt = save(random_like_state(cls(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    info = sa3loader.last_load_info()
    assert info.build == build_kind, info.fallback
    ref = upstream_recipe(cls, ckpt, True)
    assert held(model) == held(ref)
    assert_same_model(model, ref)


class CatchesAStandInsMissingDim(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        try:  # IndexError here and upstream: caught over a stand-in, it refuses as any such error
            self.blocks[0].ff.weight.size(5)
        except IndexError:
            self.caught = True


class ReadsTheDimOfADrawnInteger(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.rank = torch.randint(1, 9, (1,)).dim()  # read as a number: counted as drawn values read


class ReadsItsParametersMetadata(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        weight = self.blocks[0].ff.weight
        self.fan = (weight.dim(), weight.size(1), weight.grad_fn)


@pytest.mark.parametrize(
    "cls, kind",
    [
        (CatchesAStandInsMissingDim, "faithful"),
        (ReadsTheDimOfADrawnInteger, "faithful"),
        (ReadsItsParametersMetadata, "fast"),
    ],
    ids=["error-over-a-stand-in", "drawn-integer", "stand-in"],
)
def test_metadata_reads_take_the_short_way_only_where_the_full_look_sees_nothing(tmp_path, cls, kind):
    """``dim``, ``size`` and ``grad_fn`` of a stand-in skip the watch's full look (a DiT's build
    reads them 922 times): an error over a stand-in is still noted, and a drawn tensor's are
    still looked at, as before."""
    built_as_upstreams(tmp_path, cls, kind, half=True)


def test_a_nested_factory_reading_the_outer_stand_ins_metadata_keeps_both_builds_fast(tmp_path):
    """The short way looks at the stand-in under no torch function mode: an outer load's watch
    saw its ``is_meta`` as a device read and refused (helper-81's attack)."""
    inner_ckpt = save(
        {"lin.weight": torch.randn(2, 3), "lin.bias": torch.randn(2)}, tmp_path / "inner.safetensors"
    )

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)

            def width(config):  # the inner factory reads the outer build's stand-in
                weight = self.a.weight
                return nn.Sequential(nn.Linear(weight.size(1) if weight.dim() == 2 else 5, 2))

            self.inner = sa3loader.load_diffusion_cond(
                {}, inner_ckpt, "cpu", False, cache_dir=tmp_path / "ci", model_factory=width
            )

    torch.manual_seed(0)
    outer_state = {"a.weight": torch.randn(3, 3), "a.bias": torch.randn(3)}
    outer_state.update({"inner.0.weight": torch.randn(2, 3), "inner.0.bias": torch.randn(2)})
    ckpt = save(outer_state, tmp_path / "outer.safetensors")
    sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=lambda c: Outer()
    )
    info = sa3loader.last_load_info()
    assert info.build == "fast", info.fallback


def test_torchs_refusal_wrapped_any_number_of_times_or_caught_builds_upstreams_way(tmp_path):
    """A constructor that catches torch's refusal of a stand-in's data and then fails, or wraps
    it in nine layers of ``raise ... from``: the faithful build runs, as upstream's would."""

    class Layered(ToyDiT):
        def __init__(self) -> None:
            super().__init__()
            try:
                self.s = float(self.blocks[0].ff.weight.detach().sum())
            except RuntimeError as exc:
                error: Exception = exc
                for i in range(9):
                    try:
                        raise ValueError(f"layer {i} failed") from error
                    except ValueError as wrapped:
                        error = wrapped
                raise error from None

    class FailsLater(ToyDiT):
        def __init__(self) -> None:
            super().__init__()
            try:
                norm = float(self.blocks[0].ff.weight.detach().norm())
            except RuntimeError:
                norm = None
            self.inv_norm = 1.0 / norm  # TypeError on the fast build only

    for cls in (Layered, FailsLater):
        torch.manual_seed(0)
        ckpt = save(random_like_state(cls(), seed=3), tmp_path / f"{cls.__name__}.safetensors")
        torch.manual_seed(0)
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c, cls=cls: cls()
        )
        assert sa3loader.last_load_info().build == "faithful"
        assert_same_model(model, upstream_recipe(cls, ckpt, True))


class AliasedBeforeTheDraw(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.zeros(4), persistent=False)
        torch.empty(0).set_(self.noise).normal_()  # drawn through an alias made before


class AliasedThroughNumpy(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("noise", torch.zeros(4), persistent=False)
        torch.from_numpy(self.noise.numpy()).normal_()


class FromNestedLists(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        x = torch.randn(4)
        self.register_buffer("noise", torch.tensor([[x[0], x[1]], [x[2], x[3]]]), persistent=False)


class ReadThroughAnAddress(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        import ctypes

        drawn = torch.randn(4)
        raw = ctypes.string_at(drawn.data_ptr(), 16)
        self.register_buffer("noise", torch.frombuffer(bytearray(raw), dtype=torch.float32), persistent=False)


class KeyedByADraw(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.codebook = {torch.randn(4): "first"}

    @property
    def noise(self) -> torch.Tensor:  # only the dict's key holds it
        return next(iter(self.codebook))


class KeptOnTheClass(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        type(self).noise = torch.randn(4)


class NestedTooDeep(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        value: object = torch.randn(4)
        for _ in range(20):
            value = [value]
        self.history = value

    @property
    def noise(self) -> torch.Tensor:  # only the nested lists hold it
        deepest = self.history
        while isinstance(deepest, list):
            deepest = deepest[0]
        return deepest


class KeptInAModuleGlobal(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        global _NOISE
        _NOISE = torch.randn(4)

    @property
    def noise(self) -> torch.Tensor:
        return _NOISE


_NOISE = torch.zeros(4)
PRIVATE = torch.Generator().manual_seed(7)


class DrawsFromItsOwnGenerator(ToyDiT):
    """Through aten's functional ``uniform``; its checkpoint lacks a parameter (refused fast)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer(
            "noise", torch.ops.aten.uniform.default(torch.zeros(4), generator=PRIVATE), persistent=False
        )


MISSED = {
    "alias-set_": AliasedBeforeTheDraw,
    "alias-numpy": AliasedThroughNumpy,
    "nested-lists": FromNestedLists,
    "data_ptr": ReadThroughAnAddress,
    "dict-key": KeyedByADraw,
    "class-attribute": KeptOnTheClass,
    "module-global": KeptInAModuleGlobal,
    "nested-too-deep": NestedTooDeep,
    "own-generator": DrawsFromItsOwnGenerator,
}


@pytest.mark.parametrize("kind", list(MISSED))
def test_a_draw_kept_where_the_watch_once_missed_it_is_upstreams(tmp_path, kind):
    cls = MISSED[kind]
    torch.manual_seed(0)
    PRIVATE.manual_seed(7)
    ckpt = save(random_like_state(cls(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    PRIVATE.manual_seed(7)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    ours = model.noise.clone()
    assert sa3loader.last_load_info().build == "faithful", sa3loader.last_load_info().fallback
    PRIVATE.manual_seed(7)
    ref = upstream_recipe(cls, ckpt, True)
    assert torch.equal(bits(ours), bits(ref.noise))
    assert_same_model(model, ref)


class Settings:
    """A config object as many codebases keep one: unknown attributes raise (``__dict__`` too)."""

    __slots__ = ("_data",)

    def __init__(self) -> None:
        object.__setattr__(self, "_data", {"width": 8})

    def __getattr__(self, name):
        return self._data[name]


class KeepsSettings(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.settings = Settings()


class DerivedUnderADottedName(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        setattr(self, ".scaled", self.blocks[0].ff.weight.detach() * 2)


@pytest.mark.parametrize("missing", [False, True], ids=["covered", "a-parameter-missing"])
def test_an_attribute_the_walk_cannot_read_into_neither_breaks_the_load_nor_the_refusal_order(
    tmp_path, missing
):
    """A config whose attributes raise when read is not seen into (the load raised before): the
    toy model draws at random, so what the config may hide refuses the fast build, before a
    parameter the checkpoint lacks would, as the separate walks did; upstream's model either way."""
    torch.manual_seed(0)
    state = random_like_state(build(), seed=3)
    if missing:
        state.pop(next(k for k in state if k.endswith("ff.weight")))
    ckpt = save(state, tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda config: KeepsSettings()
    )
    info = sa3loader.last_load_info()
    assert (info.build, info.fallback) == (
        "faithful",
        "settings (KeepsSettings) holds values nested too deep to follow",
    )
    assert_same_model(model, upstream_recipe(KeepsSettings, ckpt, True))


def test_a_refusal_names_the_attribute_as_it_is_named(tmp_path):
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    sa3loader.load_diffusion_cond(
        {},
        ckpt,
        "cpu",
        True,
        cache_dir=tmp_path / "c",
        model_factory=lambda config: DerivedUnderADottedName(),
    )
    assert (
        sa3loader.last_load_info().fallback
        == ".scaled (DerivedUnderADottedName) was computed from a parameter"
    )


class InitsAnEmptyParameter(ToyDiT):
    """nn.init's functions take the tensor by keyword through torch's override protocol: on a
    deferred parameter they still run (a zero-element one warns, as upstream's build does)."""

    def __init__(self) -> None:
        super().__init__()
        self.empty = nn.Parameter(torch.empty(0, 4))
        nn.init.kaiming_uniform_(self.empty)


class InitsSparsely(ToyDiT):
    """``sparse_`` draws on the CPU besides its draw into the parameter (``randperm``), and
    reaches the watch op by op (it takes no part in torch's override protocol)."""

    def __init__(self) -> None:
        super().__init__()
        self.sparse = nn.Parameter(torch.empty(6, 4))
        nn.init.sparse_(self.sparse, 0.5)


class InitsAVectorWithAFan(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.vector = nn.Parameter(torch.empty(4))
        nn.init.kaiming_uniform_(self.vector)  # no fan for one dimension: upstream's build raises


def fast_and_upstreams_warning_alike(cls, tmp_path, half):
    """The fast build of ``cls`` and upstream's, each warning of zero-element inits: the models,
    and upstream's warnings (the fast build's are the same)."""
    ckpt = save(random_like_state(cls(), seed=3), tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="zero-element") as ours:
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
        )
    assert sa3loader.last_load_info().build == "fast"
    with pytest.warns(UserWarning, match="zero-element") as theirs:
        ref = upstream_recipe(cls, ckpt, half)
    said = [str(w.message) for w in theirs]
    assert [str(w.message) for w in ours] == said
    return model, ref, said


def test_nn_inits_checks_and_warnings_run_on_a_deferred_parameter(tmp_path):
    model, ref, _ = fast_and_upstreams_warning_alike(InitsAnEmptyParameter, tmp_path, True)
    assert_same_model(model, ref)

    ckpt = save(random_like_state(build(), seed=3), tmp_path / "vector.safetensors")
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        InitsAVectorWithAFan()
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: InitsAVectorWithAFan()
        )


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape), requires_grad=False)


def _inference_parameter() -> nn.Parameter:
    with torch.inference_mode():  # written to outside it: an error
        return _parameter(4, 4)


def _inference_scratch() -> torch.Tensor:
    with torch.inference_mode():  # meta in upstream's build too
        return torch.empty(4, 4, device="meta")


SECOND_INITS = {  # after kaiming_uniform_(square, a=1): a call that looks alike, and upstream's error
    "other arguments": (
        functools.partial(_parameter, 4, 4),
        {"a": 1, "nonlinearity": "bogus"},
        "Unsupported",
    ),
    "other shape": (functools.partial(_parameter, 4), {"a": 1}, "fewer than 2 dimensions"),
    "a bool for an int": (functools.partial(_parameter, 4, 4), {"a": True}, "not a valid number"),
    "an inference parameter": (_inference_parameter, {"a": 1}, "Inplace update to inference tensor"),
    "an inference tensor": (_inference_scratch, {"a": 1}, "Inplace update to inference tensor"),
}


class InitsAlike(ToyDiT):
    """nn.init calls into stand-ins that look alike: the fast build skips a repeat of a call that
    returned (``_watch.InitCalls``), moving the tensor's version as the call would, and never a
    call that may do otherwise (``SECOND_INITS``: each raises where the first did not), nor
    one into a zero-element tensor (it warns each time)."""

    def __init__(self, second: str | None = None) -> None:
        super().__init__()
        self.square = _parameter(4, 4)
        make, kwargs, _ = (
            SECOND_INITS[second] if second else (functools.partial(_parameter, 4, 4), {"a": 1}, "")
        )
        second_tensor = make()
        if isinstance(second_tensor, nn.Parameter):
            self.second = second_tensor
        self.empties = nn.ParameterList([nn.Parameter(torch.empty(0, 4)) for _ in range(2)])
        nn.init.kaiming_uniform_(self.square, a=1)
        nn.init.kaiming_uniform_(second_tensor, **kwargs)
        nn.init.kaiming_uniform_(second_tensor, a=1)  # a repeat into the same tensor: written again
        self.register_buffer("writes", torch.tensor(float(second_tensor._version)), persistent=False)
        for empty in self.empties:
            nn.init.kaiming_uniform_(empty)


def test_an_init_call_that_repeats_one_that_returned_is_skipped_only_if_it_does_the_same(tmp_path):
    model, ref, said = fast_and_upstreams_warning_alike(InitsAlike, tmp_path, False)
    assert said.count("Initializing zero-element tensors is a no-op") == 2
    assert model.writes.item() == ref.writes.item() == 2
    assert_same_model(model, ref)


@pytest.mark.parametrize("second", sorted(SECOND_INITS))
def test_an_init_call_that_looks_like_one_that_returned_still_raises_as_upstreams(tmp_path, second):
    make, _, error = SECOND_INITS[second]
    with pytest.raises((ValueError, RuntimeError), match=error):
        InitsAlike(second)
    # A checkpoint that covers every parameter: the fast build runs the call.
    state = {**random_like_state(InitsAlike(), seed=3), "second": torch.randn(make().shape)}
    ckpt = save(state, tmp_path / "second.safetensors")
    with pytest.raises((ValueError, RuntimeError), match=error):
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", False, cache_dir=tmp_path, model_factory=functools.partial(alike, second)
        )


def alike(second, config):
    return InitsAlike(second)


class InitsInInferenceMode(ToyDiT):
    """An nn.init call into an inference tensor, in inference mode: allowed (upstream's build too);
    such a tensor has no version counter to read."""

    def __init__(self) -> None:
        super().__init__()
        with torch.inference_mode():
            nn.init.uniform_(torch.empty(4, 4, device="meta"))


def test_an_init_call_into_an_inference_tensor_in_inference_mode_builds_fast(tmp_path):
    built_as_upstreams(tmp_path, InitsInInferenceMode, "fast", half=True)


class CountsCalls(ToyDiT):
    """Counts the calls its layers' inits make of a function nn.init uses (a tracing tool that
    wraps it): each call runs, the fast build's too."""

    def __init__(self) -> None:
        before = len(CALLS)
        super().__init__()
        self.register_buffer("calls", torch.tensor(float(len(CALLS) - before)), persistent=False)


CALLS: list[object] = []


@pytest.mark.parametrize(("owner", "name"), [(nn.init, "calculate_gain"), (torch.Tensor, "uniform_")])
def test_a_function_nn_init_uses_that_a_factory_wrapped_sees_every_call(tmp_path, monkeypatch, owner, name):
    wrapped = getattr(owner, name)
    # It counts, keeping no argument: a parameter kept that the model no longer has (weight_norm's
    # weight) would be meta on the fast build, its init on upstream's (refused: the next test).
    monkeypatch.setattr(owner, name, lambda *a, **k: CALLS.append(name) or wrapped(*a, **k))
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: CountsCalls()
    )
    assert sa3loader.last_load_info().build == "fast"
    ref = upstream_recipe(CountsCalls, ckpt, True)
    assert model.calls.item() == ref.calls.item() > 1
    assert_same_model(model, ref)


def test_a_factory_that_keeps_a_parameter_the_model_no_longer_has_builds_upstreams(tmp_path, monkeypatch):
    """weight_norm replaces a convolution's weight with g and v: a wrapper that kept its init's
    arguments holds that weight, real on upstream's build, a meta stand-in on the fast one."""
    kept: list = []
    wrapped = torch.Tensor.uniform_
    monkeypatch.setattr(torch.Tensor, "uniform_", lambda *a, **k: kept.append(a) or wrapped(*a, **k))
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = load_toy(ckpt, tmp_path / "c", True, factory=lambda c: build())
    assert sa3loader.last_load_info().build == "faithful"
    assert_same_model(model, upstream_recipe(build, ckpt, True))


class CountsInitCalls(TorchFunctionMode):
    """A caller's mode around the load: it sees each nn.init call the factory makes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.seen += getattr(func, "__module__", None) == "torch.nn.init"
        return func(*args, **(kwargs or {}))


def test_a_mode_around_the_load_sees_every_init_call_upstreams_build_makes(tmp_path):
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    with CountsInitCalls() as ours:
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: ToyDiT()
        )
    assert sa3loader.last_load_info().build == "fast"
    with CountsInitCalls() as theirs:
        upstream_recipe(ToyDiT, ckpt, True)
    assert ours.seen == theirs.seen > 2


class WritesByHand(ToyDiT):
    """Draws into its parameters by hand and through nn.init functions that reach the watch op
    by op, and keeps how often each was written: a draw skipped on a stand-in moves its version
    as the draw would."""

    def __init__(self) -> None:
        super().__init__()
        self.square, self.other = _parameter(4, 4), _parameter(4, 4)
        with torch.no_grad():
            self.square.normal_()
        nn.init.xavier_uniform_(self.other)
        versions = [self.square._version, self.other._version]
        self.register_buffer("writes", torch.tensor(versions, dtype=torch.float32), persistent=False)


def test_a_draw_skipped_on_a_stand_in_moves_its_version_as_the_draw_would(tmp_path):
    ckpt = save(random_like_state(WritesByHand(), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: WritesByHand()
    )
    assert sa3loader.last_load_info().build == "fast"
    ref = upstream_recipe(WritesByHand, ckpt, True)
    assert model.writes.tolist() == ref.writes.tolist() == [1, 1]
    assert_same_model(model, ref)


HELD_WEAKLY: list[object] = []


class HoldsAParameterWeakly(ToyDiT):
    """Something outside the model holds a weak reference to a parameter (Python's, or one C++
    holds): torch's swap refuses such a tensor, so the fast build does too (before it is
    registered, or after)."""

    def __init__(self, when: str = "after") -> None:
        super().__init__()
        extra = nn.Parameter(torch.empty(4, 4))
        ref = torch._C._WeakTensorRef if when.startswith("c++") else weakref.ref
        if when == "before":
            HELD_WEAKLY.append(ref(extra))
        self.extra = extra
        if when.endswith("after"):
            HELD_WEAKLY.append(ref(self.extra))


@pytest.mark.parametrize("when", ["before", "after", "c++ after"])
def test_a_parameter_held_weakly_is_not_swapped_and_the_model_is_upstreams(tmp_path, when):
    ckpt = save(random_like_state(HoldsAParameterWeakly(), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: HoldsAParameterWeakly(when)
    )
    info = sa3loader.last_load_info()
    assert info.build == "faithful"
    assert (
        "weakly referenced" if when.endswith("after") else "could not be deferred in place"
    ) in info.fallback
    assert_same_model(model, upstream_recipe(functools.partial(HoldsAParameterWeakly, when), ckpt, True))


class DrawsIntoALeafInGradMode(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.empty(4, 4))
        self.extra.normal_()  # not under no_grad: autograd refuses, in upstream's build


def test_a_draw_autograd_refuses_fails_as_upstreams(tmp_path):
    # Every parameter in the checkpoint: the fast build runs the draw.
    state = {**random_like_state(build(), seed=3), "extra": torch.randn(4, 4)}
    ckpt = save(state, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad") as theirs:
        DrawsIntoALeafInGradMode()
    load = functools.partial(sa3loader.load_diffusion_cond, {}, ckpt, "cpu", True, cache_dir=tmp_path)
    with pytest.raises(RuntimeError, match="a leaf Variable that requires grad") as ours:
        load(model_factory=lambda c: DrawsIntoALeafInGradMode())
    assert str(ours.value) == str(theirs.value)


class ItsOwnParameter(nn.Parameter):
    pass


class ChangesAParametersClass(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.empty(4, 4))
        self.extra.__class__ = ItsOwnParameter  # after it is registered


def test_a_parameter_whose_class_the_constructor_changed_keeps_it(tmp_path):
    ckpt = save(random_like_state(ChangesAParametersClass(), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: ChangesAParametersClass()
    )
    assert "class was changed" in sa3loader.last_load_info().fallback
    assert type(model.extra) is ItsOwnParameter
    assert_same_model(model, upstream_recipe(ChangesAParametersClass, ckpt, True))


def test_an_init_that_draws_beside_its_parameter_is_upstreams(tmp_path):
    ckpt = save(random_like_state(InitsSparsely(), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: InitsSparsely()
    )
    assert sa3loader.last_load_info().build == "fast"  # the permutation is seen, and not kept
    assert_same_model(model, upstream_recipe(InitsSparsely, ckpt, True))


def uniform_(tensor):
    """Named like nn.init's draw and dispatched the same way (its tensor by keyword), but not
    nn.init's: it computes a new tensor from the parameter."""
    if torch.overrides.has_torch_function_variadic(tensor):
        return torch.overrides.handle_torch_function(uniform_, (tensor,), tensor=tensor)
    return tensor * 2


class KeepsANumberFromALookalikeInit(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        try:  # the fast build's meta read is caught: the number must still be upstream's
            self.scale = float(uniform_(self.blocks[0].ff.weight).abs().sum())
        except RuntimeError:
            self.scale = 1.0


class KeepsADrawOnATensorsOwnAttribute(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("marker", torch.zeros(1), persistent=False)
        self.marker.noise = torch.randn(3)  # a Python attribute of the buffer's tensor


def noise_like(tensor, generator=None):
    """A Python function dispatched through torch's override protocol: its body runs unwatched."""
    if torch.overrides.has_torch_function_variadic(tensor):
        return torch.overrides.handle_torch_function(
            noise_like, (tensor,), tensor=tensor, generator=generator
        )
    return torch.randn(4, generator=generator)


class KeepsAHiddenDrawFromItsOwnGenerator(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        nn.init.uniform_(self.blocks[0].ff.weight, generator=generator)  # moves it in upstream's build only
        self.register_buffer("noise", noise_like(self.blocks[0].ff.weight, generator), persistent=False)


SET_ASIDE: dict[str, torch.Tensor] = {}


def normal_(tensor, by_keyword=False):
    """Named like a draw, not torch's: it draws elsewhere, and records a call on its tensor."""
    if torch.overrides.has_torch_function_variadic(tensor):
        if by_keyword:  # as nn.init passes its tensor
            return torch.overrides.handle_torch_function(normal_, (tensor,), tensor=tensor, by_keyword=True)
        return torch.overrides.handle_torch_function(normal_, (tensor,), tensor)
    SET_ASIDE["last"] = torch.randn(3)
    tensor.label = "initialised"
    return tensor


class KeepsWhatALookalikeDrewAside(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        for by_keyword in (False, True):
            normal_(self.blocks[0].ff.weight, by_keyword=by_keyword)
            self.register_buffer(f"aside_{by_keyword}", SET_ASIDE["last"], persistent=False)
        self.label = self.blocks[0].ff.weight.label


class KeepsADrawOnALoadedParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.blocks[0].ff.weight.noise = torch.randn(3)  # the checkpoint loads its values, not this


OWN_GENERATOR = torch.Generator()


def noise_from_own_generator(tensor):
    if torch.overrides.has_torch_function_variadic(tensor):
        return torch.overrides.handle_torch_function(noise_from_own_generator, (tensor,), tensor)
    return torch.randn(4, generator=OWN_GENERATOR)  # a generator it closes over


class KeepsAHiddenDrawFromAGeneratorATensorDrewFrom(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        OWN_GENERATOR.manual_seed(1)
        with torch.no_grad():
            self.blocks[0].ff.weight.normal_(generator=OWN_GENERATOR)  # moves it in upstream's build only
        self.register_buffer("noise", noise_from_own_generator(self.blocks[0].ff.weight), persistent=False)


class LooksEmpty(dict):
    """Says it is empty, yet holds a tensor: what ``len`` says is not what the walk reads."""

    def __init__(self, tensor: torch.Tensor) -> None:
        super().__init__()
        self.tensor = tensor

    def __len__(self) -> int:
        return 0

    def values(self):
        return [self.tensor]


class KeepsADrawInAContainerThatLooksEmpty(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.table = LooksEmpty(torch.randn(3))


@pytest.mark.parametrize(
    "cls",
    [
        KeepsADrawInAContainerThatLooksEmpty,
        KeepsANumberFromALookalikeInit,
        KeepsADrawOnATensorsOwnAttribute,
        KeepsAHiddenDrawFromItsOwnGenerator,
        KeepsWhatALookalikeDrewAside,
        KeepsADrawOnALoadedParameter,
        KeepsAHiddenDrawFromAGeneratorATensorDrewFrom,
    ],
    ids=[
        "looks-empty",
        "lookalike-init",
        "tensor-attribute",
        "hidden-private-draw",
        "lookalike-draws-aside",
        "loaded-parameter-attribute",
        "generator-a-tensor-drew-from",
    ],
)
def test_what_an_attacker_found_kept_is_upstreams(tmp_path, cls):
    SET_ASIDE.clear()
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(  # fp32: a cast would make new tensors, without the attribute
        {}, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )
    assert sa3loader.last_load_info().build == "faithful"
    ref = upstream_recipe(cls, ckpt, False)
    assert_same_model(model, ref)
    if cls is KeepsANumberFromALookalikeInit:
        assert model.scale == ref.scale != 1.0
    elif cls is KeepsADrawOnATensorsOwnAttribute:
        assert torch.equal(model.marker.noise, ref.marker.noise)
    elif cls is KeepsWhatALookalikeDrewAside:
        assert model.label == ref.label == "initialised"
        for name in ("aside_False", "aside_True"):
            assert torch.equal(getattr(model, name), getattr(ref, name))
    elif cls is KeepsADrawInAContainerThatLooksEmpty:
        assert torch.equal(model.table.tensor, ref.table.tensor)
    elif cls is KeepsADrawOnALoadedParameter:
        assert torch.equal(model.blocks[0].ff.weight.noise, ref.blocks[0].ff.weight.noise)
    else:
        assert torch.equal(bits(model.noise), bits(ref.noise))


# What a second outside attack found: loading that a module customises, parameters that share
# memory or are laid out in ways a stand-in cannot keep, grads set in the constructor, and a
# parameter's device read into a plain value.
class StateDictInBf16(nn.Module):
    """A state-dict hook that hands out bf16 copies: upstream still copies the fp32 file value
    into the fp32 parameter (rounding through bf16 was the fast and faithful builds' error)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_state_dict_post_hook(self.in_bf16)

    @staticmethod
    def in_bf16(module, state, prefix, local_metadata):
        for key in list(state):
            state[key] = state[key].detach().to(torch.bfloat16)


class StateDictSwapsNames(nn.Module):
    """A state-dict hook that swaps two entries: the fast build finds the model's tensors through
    the state dict; upstream's ``load_state_dict`` copies by the modules' own names."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.register_state_dict_post_hook(self.swapped)

    @staticmethod
    def swapped(module, state, prefix, local_metadata):
        state["a.weight"], state["b.weight"] = state["b.weight"], state["a.weight"]


class WithExtraState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.scale = 1.0

    def get_extra_state(self):
        return torch.tensor([self.scale])

    def set_extra_state(self, state):
        self.scale = float(state[0])


class OverridesLoadStateDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.loaded = False

    def load_state_dict(self, state_dict, strict=True, assign=False):
        out = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.loaded = True
        return out


class SharesMemory(nn.Module):
    """Two parameters over one memory: upstream's second copy overwrites the first."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(4, 4))
        self.w2 = nn.Parameter(self.w1.data)
        self.head = nn.Parameter(self.w1[:2].detach())


class MadeFromOneTensor(nn.Module):
    """Two parameters made from one tensor, before either is registered: one memory."""

    def __init__(self) -> None:
        super().__init__()
        made_from = torch.zeros(4, 4)
        self.w1 = nn.Parameter(made_from)
        self.w2 = nn.Parameter(made_from)


class KeepsTheTensorItsParameterWasMadeFrom(nn.Module):
    """A buffer registered after, and an attribute set before, on a parameter's memory: they
    show the checkpoint's values after upstream's copy into it."""

    def __init__(self) -> None:
        super().__init__()
        made_from, other = torch.zeros(4, 4), torch.zeros(4)
        self.w = nn.Parameter(made_from)
        self.register_buffer("w_alias", made_from, persistent=False)
        self.kept = other
        self.b = nn.Parameter(other)


class MadeFromMemoryTorchDoesNotOwn(nn.Module):
    """numpy's memory, kept by the module as an array: upstream's copy shows through it."""

    def __init__(self) -> None:
        super().__init__()
        self.array = np.zeros((4, 4), dtype=np.float32)
        self.w = nn.Parameter(torch.from_numpy(self.array))
        self.raw = bytearray(16)
        self.b = nn.Parameter(torch.frombuffer(self.raw, dtype=torch.float32))


class KeepsItsParametersStorage(nn.Module):
    """The storage object of a parameter's memory, kept before it is registered (untyped and
    typed): upstream's copy into that memory shows through it."""

    def __init__(self) -> None:
        super().__init__()
        w, b = nn.Parameter(torch.zeros(4, 4)), nn.Parameter(torch.zeros(4))
        self.kept = w.untyped_storage()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # TypedStorage is deprecated
            self.kept_typed = b.storage()
        self.w, self.b = w, b


class LaidOutWithGaps(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gaps = nn.Parameter(torch.zeros(4, 8)[:, :4])
        self.offset = nn.Parameter(torch.zeros(10)[2:])
        self.strided = nn.Parameter(torch.zeros(4, 4)[::2])
        self.spare = nn.Parameter(torch.zeros(10)[:8])  # its memory is larger than it


class OneValueRepeated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1).expand(4))


class SetsGrads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        for p in self.lin.parameters():
            p.grad = torch.zeros_like(p)


class KeepsItsDevice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.device_type = self.lin.weight.device.type
        self.device_name = str(next(self.parameters()).device)
        self.on_cpu = self.lin.weight.is_cpu
        self.described = repr(self.lin.bias)


class RefusesMeta(nn.Module):
    """Raises its own error on meta parameters: upstream's never are."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        if self.lin.weight.is_meta:
            raise RuntimeError("this model cannot be built on the meta device")


class OverridesLoadingOnInstances(nn.Module):
    """``load_state_dict``, ``state_dict`` and ``_load_from_state_dict`` set on instances."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        load, state = self.load_state_dict, self.state_dict

        def doubled(state_dict, *args, **kwargs):
            return load({k: v * 2 for k, v in state_dict.items()}, *args, **kwargs)

        self.load_state_dict = doubled

        def swapped(*args, **kwargs):
            out = state(*args, **kwargs)
            out["a.bias"], out["b.bias"] = out["b.bias"], out["a.bias"]
            return out

        self.state_dict = swapped
        base = self.b._load_from_state_dict

        def flipped(state_dict, prefix, *rest):
            state_dict[prefix + "weight"] = state_dict[prefix + "weight"].flip(0)
            return base(state_dict, prefix, *rest)

        self.b._load_from_state_dict = flipped


class HooksItsParameters(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.lin.weight.register_hook(lambda grad: grad * 3)
        self.lin.bias.register_post_accumulate_grad_hook(lambda p: None)


class ReadsItsDeviceInsideADeviceContext(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        with torch.device("cpu"):
            self.lin = nn.Linear(4, 4)
            self.device_type = self.lin.weight.device.type
            self.on_cpu = self.lin.weight.is_cpu


class TiesByAddress(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        self.tied = self.a.weight.data_ptr() == self.b.weight.data_ptr()


class RegistrationHookReadsTheDevice(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def hook(module, name, param):
            self.registered_on = param.device.type

        handle = nn.modules.module.register_module_parameter_registration_hook(hook)
        try:
            self.lin = nn.Linear(4, 4)
        finally:
            handle.remove()


def fp32_state(cls) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    shapes = {k: v.shape for k, v in cls().state_dict().items() if isinstance(v, torch.Tensor)}
    return {k: torch.randn(shape, generator=gen) for k, shape in shapes.items()}


@pytest.mark.parametrize(
    "cls",
    [
        StateDictInBf16,
        StateDictSwapsNames,
        WithExtraState,
        OverridesLoadStateDict,
        SharesMemory,
        MadeFromOneTensor,
        KeepsTheTensorItsParameterWasMadeFrom,
        KeepsItsParametersStorage,
        MadeFromMemoryTorchDoesNotOwn,
        LaidOutWithGaps,
        SetsGrads,
        KeepsItsDevice,
        RefusesMeta,
        OverridesLoadingOnInstances,
        HooksItsParameters,
        ReadsItsDeviceInsideADeviceContext,
        TiesByAddress,
        RegistrationHookReadsTheDevice,
    ],
    ids=lambda c: c.__name__,
)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_what_an_attacker_found_in_loading_and_layouts_is_upstreams(tmp_path, cls, half):
    state = fp32_state(cls)
    if cls is WithExtraState:
        state["_extra_state"] = torch.tensor([0.125])
    ckpt = save(state, tmp_path / "model.safetensors")
    ref = upstream_recipe(cls, ckpt, half)
    for _ in ("converts", "hit"):
        torch.manual_seed(0)
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
        )
        sa3loader.wait_for_publishing()
        assert sa3loader.last_load_info().build == "faithful"
        assert_same_model(model, ref)
        for key, value in ref.named_parameters(remove_duplicate=False):
            mine = model.get_parameter(key)
            assert (mine.stride(), mine.storage_offset()) == (value.stride(), value.storage_offset()), key
            assert mine.untyped_storage().nbytes() == value.untyped_storage().nbytes(), key
            assert (mine.grad is None) == (value.grad is None), key
            for hooks in ("_backward_hooks", "_post_accumulate_grad_hooks"):
                assert bool(getattr(mine, hooks, None)) == bool(getattr(value, hooks, None)), (key, hooks)
            if value.grad is not None:
                assert torch.equal(bits(mine.grad), bits(value.grad)) and mine.grad.dtype == value.grad.dtype
        plain = {k: v for k, v in vars(ref).items() if isinstance(v, (bool, int, float, str))}
        assert {k: vars(model)[k] for k in plain} == plain
        if cls is SharesMemory and not half:
            assert model.w1.data_ptr() == model.w2.data_ptr() == model.head.data_ptr()
        if cls is MadeFromMemoryTorchDoesNotOwn:
            assert np.array_equal(model.array, ref.array) and model.raw == ref.raw
        if cls is KeepsTheTensorItsParameterWasMadeFrom:  # the checkpoint's values, as upstream's
            assert torch.equal(bits(model.w_alias), bits(ref.w_alias)) and torch.equal(model.kept, ref.kept)
        if cls is KeepsItsParametersStorage:
            assert bytes(model.kept) == bytes(ref.kept)
            assert bytes(model.kept_typed.untyped()) == bytes(ref.kept_typed.untyped())


class MadeFromALocalTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        made_from = torch.zeros(4, 4)  # held by this frame as the parameter is registered, then gone
        self.w = nn.Parameter(made_from)
        self.lin = nn.Linear(4, 4)


def test_a_parameter_made_from_a_local_tensor_keeps_the_fast_build(tmp_path):
    ckpt = save(fp32_state(MadeFromALocalTensor), tmp_path / "model.safetensors")
    ref = upstream_recipe(MadeFromALocalTensor, ckpt, True)
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: MadeFromALocalTensor()
    )
    assert sa3loader.last_load_info().build == "fast", sa3loader.last_load_info().fallback
    assert_same_model(model, ref)


class NotesWhetherParametersMemoryWent(nn.Module):
    """Four parameters, each made just before it is registered: whether the memory it was made
    with is freed by the time registration returns is noted."""

    went: ClassVar[list[bool]] = []

    def __init__(self) -> None:
        super().__init__()
        for i in range(4):
            param = nn.Parameter(torch.ones(4, 4))
            memory = StorageWeakRef(param.untyped_storage())  # does not hold it
            setattr(self, f"w{i}", param)
            del param  # the module's, on the meta device where deferred
            self.went.append(memory.expired())


def test_the_fast_build_keeps_no_parameters_memory_that_nothing_else_holds(tmp_path):
    """A deferred parameter's own memory goes at once: only one whose memory something else
    holds is kept (to be looked at after the factory). Were every one kept, the fast build of
    SA3 medium would hold the fp32 model it exists not to make."""
    ckpt = save(fp32_state(NotesWhetherParametersMemoryWent), tmp_path / "model.safetensors")
    for _ in ("converts", "hit"):
        NotesWhetherParametersMemoryWent.went.clear()
        factory = lambda c: NotesWhetherParametersMemoryWent()  # noqa: E731
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory)
        assert sa3loader.last_load_info().build == "fast", sa3loader.last_load_info().fallback
        assert NotesWhetherParametersMemoryWent.went == [True] * 4


def test_a_parameter_laid_over_one_value_fails_as_upstreams(tmp_path):
    ckpt = save(fp32_state(OneValueRepeated), tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError) as upstream_error:
        upstream_recipe(OneValueRepeated, ckpt, True, seed=False)
    with pytest.raises(RuntimeError) as ours:
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: OneValueRepeated()
        )
    assert str(ours.value) == str(upstream_error.value)


class PassesThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class EntersAModeAndStays(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        PassesThrough().__enter__()  # never left
        self.lin = nn.Linear(4, 4)


def test_a_mode_the_constructor_leaves_on_stays_on_and_the_watch_does_not(tmp_path):
    ckpt = save({"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4)}, tmp_path / "model.safetensors")
    try:
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: EntersAModeAndStays()
        )
        stack = [type(mode) for mode in _get_current_function_mode_stack()]
    finally:
        while torch._C._len_torch_function_stack():
            torch._C._pop_torch_function_stack()
    assert stack == [PassesThrough]


# What a third outside attack found: drawn values leaving torch through a shape they decide,
# and through whether torch raises over them. The fast build skipped the init before the draw,
# so its generator was elsewhere: its mask, its branch, were not upstream's.
class KeepsTheShapeOfADrawnMask(ToyDiT):
    def __init__(self, how: str) -> None:
        super().__init__()
        keep = torch.rand(100) > 0.5
        positions = torch.arange(100)
        if how == "nonzero":
            self.n_kept = keep.nonzero().shape[0]
        elif how == "masked-select":
            self.n_kept = positions.masked_select(keep).size(0)
        else:
            self.n_kept = len(positions[keep])
        self.register_buffer("kept", torch.arange(self.n_kept), persistent=False)


class BranchesOnAnErrorOverADraw(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        try:
            torch._assert_async(torch.rand(()) > 0.4)  # upstream's, seeded 0, draws 0.32: raises
            self.branch = "passed"
        except RuntimeError:
            self.branch = "raised"


class RaisesOverADraw(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        torch.zeros(1)[(torch.rand(1) + 0.6).long()]  # index 1 raises: upstream's, seeded 0, draws 0.32


@pytest.mark.parametrize(
    "make",
    [
        functools.partial(KeepsTheShapeOfADrawnMask, "nonzero"),
        functools.partial(KeepsTheShapeOfADrawnMask, "masked-select"),
        functools.partial(KeepsTheShapeOfADrawnMask, "mask-index"),
        BranchesOnAnErrorOverADraw,
        RaisesOverADraw,
    ],
    ids=["nonzero", "masked-select", "mask-index", "caught-error", "error"],
)
def test_a_drawn_value_read_through_a_shape_or_an_error_gives_upstreams_build(tmp_path, make):
    model, ref = built_as_upstreams(tmp_path, make, "faithful")
    assert getattr(model, "n_kept", None) == getattr(ref, "n_kept", None)
    assert getattr(model, "branch", None) == getattr(ref, "branch", None)


class InitsWith(nn.Module):
    """A layer, an integer parameter, then ``init`` run over them in the constructor."""

    def __init__(self, init) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.idx = nn.Parameter(torch.empty(2, 2, dtype=torch.long), requires_grad=False)
        init(self)


BAD_DRAWS = {
    "uniform-bounds-reversed": lambda m: nn.init.uniform_(m.lin.weight, 1.0, 0.0),
    "normal-std-below-0": lambda m: m.lin.weight.data.normal_(0, -1.0),
    "bernoulli-p-above-1": lambda m: m.lin.weight.data.bernoulli_(1.5),
    "random-from-above-to": lambda m: m.lin.weight.detach().random_(5, 2),
    "kaiming-into-integers": lambda m: nn.init.kaiming_uniform_(m.idx),
    "bernoulli-tensor-p-above-1": lambda m: m.lin.weight.data.bernoulli_(torch.full((4, 4), 1.5)),
    "bernoulli-tensor-p-of-another-shape": lambda m: m.lin.weight.data.bernoulli_(torch.full((5,), 0.5)),
}


@pytest.mark.parametrize("bad", list(BAD_DRAWS), ids=list(BAD_DRAWS))
def test_a_draw_into_a_stand_in_fails_as_upstreams_draw_into_memory(tmp_path, bad):
    """Meta checks few of a draw's arguments, and a draw skipped on a stand-in none: each is
    checked on one element of the CPU, so the constructor fails as upstream's does."""
    state = {"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4), "idx": torch.arange(4).view(2, 2)}
    ckpt = save(state, tmp_path / "model.safetensors")
    with pytest.raises(Exception) as upstream:
        InitsWith(BAD_DRAWS[bad])
    for half in (False, True):
        with pytest.raises(Exception) as ours:
            sa3loader.load_diffusion_cond(
                {},
                ckpt,
                "cpu",
                half,
                cache_dir=tmp_path / "c",
                model_factory=lambda c: InitsWith(BAD_DRAWS[bad]),
            )
        assert (type(ours.value), str(ours.value)) == (type(upstream.value), str(upstream.value))


def _yields(value):
    yield value


@pytest.mark.parametrize(
    "keep",
    [
        lambda drawn: iter([drawn]),
        lambda drawn: _yields(drawn),
        lambda drawn: {"k": drawn}.values(),
        lambda drawn: map(torch.neg, [drawn]),
        lambda drawn: itertools.cycle([drawn]),
    ],
    ids=["list-iterator", "generator", "dict-view", "map", "itertools-cycle"],
)
def test_a_draw_kept_in_an_iterator_gives_upstreams_build(tmp_path, keep):
    """Objects with no ``__dict__`` that hold what they iterate over: walked as containers are."""

    class KeepsADrawInAnIterator(ToyDiT):
        def __init__(self) -> None:
            super().__init__()
            self.kept = keep(torch.randn(2))

    model, ref = built_as_upstreams(tmp_path, KeepsADrawInAnIterator, "faithful")
    assert torch.equal(next(iter(model.kept)), next(iter(ref.kept)))


class DrawsIntoAZeroElementParameter(nn.Module):
    """Upstream's draw into no element runs no dtype check (normal_ into int64, random_ into
    complex64 return at once): the probe of the fast build has no element either."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.codes = nn.Parameter(torch.empty(0, dtype=torch.int64), requires_grad=False)
        self.codes.data.normal_()
        self.z = nn.Parameter(torch.empty(0, 3, dtype=torch.complex64))
        self.z.data.random_()


def test_a_draw_into_a_zero_element_stand_in_fails_only_where_upstreams_does(tmp_path):
    state = {k: v for k, v in fp32_state(DrawsIntoAZeroElementParameter).items() if v.dtype == torch.float32}
    ckpt = save({**state, "codes": torch.empty(0, dtype=torch.int64)}, tmp_path / "model.safetensors")
    ref = upstream_recipe(DrawsIntoAZeroElementParameter, ckpt, False)
    model = load_toy(ckpt, tmp_path / "c", False, factory=lambda c: DrawsIntoAZeroElementParameter())
    assert_same_model(model, ref)


VALUE_DECIDED = {  # (width, seed, body): each differs between upstream's draws and the fast build's
    "bernoulli-p-above-1": (64, 4, lambda m: torch.bernoulli(torch.rand(4) * 1.15)),
    "normal-std-below-0": (64, 2, lambda m: torch.normal(torch.zeros(4), torch.randn(4) + 1.5)),
    "index-out-of-range": (64, 6, lambda m: torch.zeros(10)[torch.randint(0, 12, (3,))]),
    "one-hot-width": (64, 0, lambda m: setattr(m, "n", F.one_hot(torch.randint(0, 5, (3,))).shape[1])),
    "sparse-count": (
        64,
        2,
        lambda m: setattr(m, "n", (torch.rand(8) > 0.5).float().to_sparse().indices().shape[1]),
    ),
    "drawn-size": (64, 2, lambda m: setattr(m, "n", torch.ones(torch.randint(1, 9, ())).shape[0])),
    "drawn-slice-bound": (
        64,
        2,
        lambda m: setattr(m, "n", torch.zeros(10)[: torch.randint(1, 9, ())].shape[0]),
    ),
    # A fourth attack: sizes in lists, a float read as a number, indexes out of range elsewhere.
    "size-in-a-list": (8, 0, lambda m: setattr(m, "n", torch.ones([torch.randint(1, 50, ()), 3]).shape[0])),
    "float-step": (8, 14, lambda m: setattr(m, "n", torch.arange(0.0, 10.0, torch.rand(()) + 0.5).shape[0])),
    "index-add": (8, 14, lambda m: torch.zeros(10).index_add_(0, torch.randint(0, 11, (2,)), torch.ones(2))),
    "cross-entropy": (8, 14, lambda m: F.cross_entropy(torch.zeros(2, 10), torch.randint(0, 11, (2,)))),
    "aten-index": (
        8,
        14,
        lambda m: torch.ops.aten.index.Tensor(torch.zeros(10), [torch.randint(0, 11, (2,))]),
    ),
}


class DecidesByDrawnValues(nn.Module):
    def __init__(self, width, body) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)  # its init, skipped by the fast build, moves the generator
        body(self)


@pytest.mark.parametrize("case", list(VALUE_DECIDED), ids=list(VALUE_DECIDED))
def test_drawn_values_read_as_a_number_an_index_or_a_size_give_upstreams_outcome(tmp_path, case):
    """Whether torch raises, or a shape, told by drawn values that torch reads in C++."""
    width, seed, body = VALUE_DECIDED[case]
    state = {"lin.weight": torch.randn(width, width), "lin.bias": torch.randn(width)}
    ckpt = save(state, tmp_path / "m.safetensors")

    def outcome(load):
        torch.manual_seed(seed)
        try:
            model = load()
        except Exception as exc:
            return type(exc), str(exc)
        return getattr(model, "n", None), [bits(t).numpy().tobytes() for t in model.state_dict().values()]

    def upstream():
        model = DecidesByDrawnValues(width, body)
        model.load_state_dict(load_file(str(ckpt)), strict=False)
        return model.eval().requires_grad_(False)

    theirs = outcome(upstream)
    for _ in ("converts", "hit"):
        ours = outcome(
            lambda: sa3loader.load_diffusion_cond(
                {},
                ckpt,
                "cpu",
                False,
                cache_dir=tmp_path / "c",
                model_factory=lambda c: DecidesByDrawnValues(width, body),
            )
        )
        assert ours == theirs


class KeepsTheGeneratorItDrawsParametersFrom(nn.Module):
    """A generator of its own, kept, drawing parameters' init: nn.init's (the same call twice),
    a tensor's own draw, into a transposed layout (torch's CPU normal_ draws by the layout)."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(7)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        for lin in (self.a, self.b):
            nn.init.normal_(lin.weight, generator=self.g)
        self.t = nn.Parameter(torch.empty(8, 4).t())
        with torch.no_grad():
            self.t.normal_(generator=self.g)
            self.a.bias.uniform_(generator=self.g)


def test_a_kept_generator_moves_as_upstreams_build_moves_it(tmp_path):
    """Upstream's build draws each parameter's init from the model's own generator; the fast
    build draws nothing into its stand-ins, but moves that generator as those draws would: its
    next draws (noise the model makes later) are upstream's."""
    make = KeepsTheGeneratorItDrawsParametersFrom
    state = {k: torch.randn(v.shape) for k, v in make().state_dict().items()}
    for _ in ("converts", "hit"):
        model, ref = built_as_upstreams(tmp_path, make, "fast", state=state)
        assert torch.equal(model.g.get_state(), ref.g.get_state())


class DrawsFromItsGeneratorByAComputedProbability(nn.Module):
    """A draw into a parameter from its own generator, by a probability computed from another
    parameter: on meta nothing can be drawn, so the generator cannot be moved as upstream's."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(7)
        self.q, self.w = nn.Parameter(torch.zeros(8)), nn.Parameter(torch.empty(8))
        with torch.no_grad():
            self.w.bernoulli_(torch.sigmoid(self.q), generator=self.g)


def test_a_kept_generator_the_fast_build_cannot_move_takes_upstreams_build(tmp_path):
    make = DrawsFromItsGeneratorByAComputedProbability
    model, ref = built_as_upstreams(
        tmp_path, make, "faithful", state={"q": torch.randn(8), "w": torch.randn(8)}
    )
    assert torch.equal(model.g.get_state(), ref.g.get_state())


# Drawn values kept where no walk of the model looks: each class keeps one (after a linear
# layer whose skipped init moves the fast build's generator elsewhere) and says where (``held``).
class _KeepsADrawAfterASkippedInit(nn.Module):
    """A linear layer (its init skipped on the fast build), then a draw ``keep`` puts somewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.keep(torch.randn(3))

    def keep(self, drawn: torch.Tensor) -> None:
        raise NotImplementedError


class _Holder:
    t: torch.Tensor


class _RotaryBase(_KeepsADrawAfterASkippedInit):
    table: torch.Tensor | None = None


_ANOTHER_MODULE = types.ModuleType("another_module_of_the_factory")
_NESTED_DEEP: dict = {}


class KeptInAFunctionsDict(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        def shift(x):
            return x + shift.bias

        shift.bias = drawn  # type: ignore[attr-defined]
        self.shift = shift

    def held(self):
        return self.shift.bias


class KeptInALambdasGlobals(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        self.shift = eval("lambda x: x + B", {"B": drawn})

    def held(self):
        return self.shift.__globals__["B"]


class KeptInAModuleObject(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        self.namespace = types.ModuleType("namespace")
        self.namespace.t = drawn

    def held(self):
        return self.namespace.t


class KeptInAMethodcaller(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        self.add = operator.methodcaller("add", drawn)

    def held(self):
        return self.add(torch.zeros(3))


class KeptOnAClassItHolds(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        _Holder.t = drawn
        self.kind = _Holder

    def held(self):
        return self.kind.t


class KeptByABoundBuiltin(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        self.noise = drawn.clone

    def held(self):
        return self.noise()


class KeptOnItsBaseClass(_RotaryBase):
    def keep(self, drawn):
        _RotaryBase.table = drawn

    def held(self):
        return self.table


class KeptInAnotherModulesGlobal(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        _ANOTHER_MODULE.noise = drawn  # type: ignore[attr-defined]

    def held(self):
        return _ANOTHER_MODULE.noise  # type: ignore[attr-defined]


class KeptNestedDeepInItsModulesGlobal(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        _NESTED_DEEP["a"] = {"b": {"c": {"d": [drawn]}}}

    def held(self):
        return _NESTED_DEEP["a"]["b"]["c"]["d"][0]


class KeptAfterACopyOverPartOfIt(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        x = torch.randn(8)
        x.as_strided((4, 2), (1, 1)).copy_(torch.zeros(4, 2))  # offset 0, all 8 spanned: 5 written
        _NESTED_DEEP["a"] = {"b": {"c": {"d": [x]}}}

    def held(self):
        return _NESTED_DEEP["a"]["b"]["c"]["d"][0]


class KeptAsAnMkldnnTensor(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        _NESTED_DEEP["a"] = {"b": {"c": {"d": [drawn.to_mkldnn()]}}}

    def held(self):
        return _NESTED_DEEP["a"]["b"]["c"]["d"][0].to_dense()


class DrawnIntoNumpysMemory(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        self.array = np.zeros(3, dtype=np.float32)
        torch.from_numpy(self.array).normal_()

    def held(self):
        return torch.from_numpy(self.array)


class DrawnIntoABytearray(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        self.raw = bytearray(12)
        torch.frombuffer(self.raw, dtype=torch.float32).normal_()

    def held(self):
        return torch.frombuffer(self.raw, dtype=torch.float32)


class CopiedThroughAStorageTakenBefore(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        x, copy = torch.empty(3), torch.empty(3)
        memory = x.untyped_storage()  # before the draw: no drawn value is read through torch
        x.normal_()
        copy.untyped_storage().copy_(memory)
        self.register_buffer("copy", copy, persistent=False)

    def held(self):
        return self.copy


class CopiedThroughAPointerTakenBefore(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        x, copy = torch.empty(3), torch.empty(3)
        address = x.data_ptr()
        x.normal_()
        ctypes.memmove(copy.data_ptr(), address, 12)
        self.register_buffer("copy", copy, persistent=False)

    def held(self):
        return self.copy


class KeptThroughAStorageItMade(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        memory = torch.UntypedStorage(12)  # the factory's own storage object: no op hands it out
        torch.empty(0).set_(memory, 0, (3,), (1,)).normal_()
        copy = torch.empty(3)
        copy.untyped_storage().copy_(memory)
        self.register_buffer("copy", copy, persistent=False)

    def held(self):
        return self.copy


class _CopiesOutWhenCollected:
    """In a reference cycle: collected after the build, when its finalizer keeps a copy."""

    def __init__(self, drawn: torch.Tensor) -> None:
        self.drawn, self.itself = drawn, self

    def __del__(self) -> None:
        _NESTED_DEEP["a"] = {"b": {"c": {"d": [self.drawn.clone()]}}}


class KeptByAFinalizer(_KeepsADrawAfterASkippedInit):
    def keep(self, drawn):
        _CopiesOutWhenCollected(drawn)

    def held(self):
        return _NESTED_DEEP["a"]["b"]["c"]["d"][0]


class KeptBesideABufferTiedUnderThreeNames(_KeepsADrawAfterASkippedInit):
    """One view registered as three buffers the checkpoint replaces (one tensor, not three
    holders), and the other half of the drawn memory, which nothing replaces."""

    def keep(self, drawn):
        x = torch.randn(8)
        half = x[:4]
        for name in "abc":
            self.register_buffer(name, half)
        _NESTED_DEEP["a"] = {"b": {"c": {"d": [x[4:]]}}}

    def held(self):
        return _NESTED_DEEP["a"]["b"]["c"]["d"][0]


@pytest.mark.parametrize(
    "cls",
    [
        KeptInAFunctionsDict,
        KeptInALambdasGlobals,
        KeptInAModuleObject,
        KeptInAMethodcaller,
        KeptOnAClassItHolds,
        KeptByABoundBuiltin,
        KeptOnItsBaseClass,
        KeptInAnotherModulesGlobal,
        KeptNestedDeepInItsModulesGlobal,
        KeptAfterACopyOverPartOfIt,
        KeptAsAnMkldnnTensor,
        DrawnIntoNumpysMemory,
        DrawnIntoABytearray,
        CopiedThroughAStorageTakenBefore,
        CopiedThroughAPointerTakenBefore,
        KeptThroughAStorageItMade,
        KeptByAFinalizer,
        KeptBesideABufferTiedUnderThreeNames,
    ],
)
def test_a_drawn_value_held_anywhere_after_the_build_takes_upstreams_build(tmp_path, cls):
    """Wherever a drawn value is held once the factory returned (torch counts who holds its
    memory), the fast build is refused: the value kept is upstream's."""
    state = {"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4)}
    if cls is KeptBesideABufferTiedUnderThreeNames:
        state |= {name: torch.randn(4) for name in "abc"}
    ckpt = save(state, tmp_path / "model.safetensors")
    gc.disable()  # a cycle the factory left is there when the build is checked (as after a large one)
    try:
        ref = upstream_recipe(cls, ckpt, False)
        gc.collect()  # (a finalizer keeps its copy when the collection comes)
        expected = ref.held().clone()
        torch.manual_seed(0)
        model = load_held(cls, ckpt, tmp_path)
        build = sa3loader.last_load_info().build
        gc.collect()
        held = model.held()
    finally:
        gc.enable()
    assert build == "faithful", cls
    assert torch.equal(held, expected)


def load_held(cls, ckpt, tmp_path):
    return sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
    )


class LeavesADrawInACycle(nn.Module):
    """A drawn value the constructor left in a reference cycle: garbage, held by nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        cycle: dict = {"noise": torch.randn(3)}
        cycle["self"] = cycle


def test_a_drawn_value_left_in_garbage_keeps_the_fast_build(tmp_path):
    state = {"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4)}
    gc.disable()  # the cycle is still there when the build is checked, as after a large build
    try:
        built_as_upstreams(tmp_path, LeavesADrawInACycle, "fast", state=state)
    finally:
        gc.enable()


class DrawsABufferTheCheckpointReplaces(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.register_buffer("table", torch.randn(3))


def test_a_drawn_buffer_the_checkpoint_replaces_keeps_the_fast_build(tmp_path):
    state = {"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4), "table": torch.randn(3)}
    built_as_upstreams(tmp_path, DrawsABufferTheCheckpointReplaces, "fast", state=state)


class UsesAJaggedTensorAfterADraw(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        torch.randn(2)  # a draw kept nowhere: the watch looks at every op after it
        jagged = torch.nested.as_nested_tensor([torch.ones(3), torch.ones(5)], layout=torch.jagged)
        self.register_buffer("lengths", (jagged * 2).offsets().diff(), persistent=False)


def test_a_jagged_tensor_after_a_draw_builds_as_upstreams(tmp_path):
    """A jagged nested tensor has no memory torch can point at: the watch's look must not raise."""
    state = {"lin.weight": torch.randn(4, 4), "lin.bias": torch.randn(4)}
    built_as_upstreams(tmp_path, UsesAJaggedTensorAfterADraw, "fast", state=state)


class DrawsFromItsGeneratorThroughInitsThatSkipMeta(nn.Module):
    """nn.init's trunc_normal_, orthogonal_ and sparse_ return at once for a meta tensor, unseen
    but for reading is_meta: nothing is drawn there, yet upstream's build moves the model's own
    generator. The fast build cannot: refused."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(7)
        self.a, self.b, self.c = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        nn.init.trunc_normal_(self.a.weight, generator=self.g)
        nn.init.orthogonal_(self.b.weight, generator=self.g)
        nn.init.sparse_(self.c.weight, 0.5, generator=self.g)


def test_a_kept_generator_moves_through_inits_that_skip_meta(tmp_path):
    make = DrawsFromItsGeneratorThroughInitsThatSkipMeta
    state = {k: torch.randn(v.shape) for k, v in make().state_dict().items()}
    model, ref = built_as_upstreams(tmp_path, make, "faithful", state=state)
    assert torch.equal(model.g.get_state(), ref.g.get_state())


class DrawsIntoAParameterByOut(nn.Module):
    """``torch.randn(..., generator=g, out=w)``: upstream's draw moves the model's own generator;
    into a stand-in it moves nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.Generator().manual_seed(7)
        self.w = nn.Parameter(torch.empty(8), requires_grad=False)  # (out= resizes: not a grad leaf)
        torch.randn(8, generator=self.g, out=self.w)


def test_a_draw_by_out_from_a_kept_generator_takes_upstreams_build(tmp_path):
    model, ref = built_as_upstreams(
        tmp_path, DrawsIntoAParameterByOut, "faithful", state={"w": torch.randn(8)}
    )
    assert torch.equal(model.g.get_state(), ref.g.get_state())


# What an outside attack on layouts found (12-07): what upstream's copy into a parameter keeps
# and placing would not (quantized, a conjugate or negative view), and what upstream's finish
# runs before its cast while the fast build's weights are final already (a module's own train
# or _apply, a parameter that is also a buffer, torch's conversion flags), or a factory that
# changes its config before a refusal (it runs again).
class KeepsAConjugateParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.conj = nn.Parameter(torch.zeros(3, dtype=torch.complex64).conj())
        self.neg = nn.Parameter(torch._neg_view(torch.zeros(3, dtype=torch.complex64)))


class KeepsAQuantizedParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Parameter(
            torch.quantize_per_tensor(torch.zeros(3), 0.1, 0, torch.qint8), requires_grad=False
        )


class FusesOnEval(ToyDiT):
    def train(self, mode: bool = True):
        out = super().train(mode)
        if not mode:  # an inference copy computed from the weights as they are then
            self.fused = (self.blocks[0].ff.weight * 2).detach()
        return out


class MovesItsOwnWay(ToyDiT):
    def _apply(self, fn, recurse=True):
        self.seen = self.blocks[0].ff.weight.detach().clone()
        return super()._apply(fn, recurse)


class ToOfItsOwn(ToyDiT):
    def to(self, *args, **kwargs):
        self.seen = self.blocks[0].ff.weight.detach().clone()
        return super().to(*args, **kwargs)


class EvalOfItsOwn(ToyDiT):
    def eval(self):
        self.seen = self.blocks[0].ff.weight.detach().clone()
        return super().eval()


class TrainSetOnTheInstance(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        block = self.blocks[0]
        block.train = lambda mode=True: (setattr(self, "seen", block.ff.weight.detach().clone()), block)[1]


class RegistersAParameterAsABuffer(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.zeros(3))
        self.sub = nn.Module()
        self.sub.register_buffer("wb", self.extra, persistent=False)


class TiesAndHolds(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.blocks[1].ff.weight = self.blocks[0].ff.weight
        self.held = [self.blocks[0].ff.bias]


class KeepsExtraStateItNeverLoads(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.extra = torch.zeros(3)

    def get_extra_state(self):  # no set_extra_state: load_state_dict leaves it as it is
        return self.extra


class KeepsADerivedTensorDeepDown(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        deep: list = [self.blocks[0].ff.weight * 2]
        for _ in range(13):  # deeper than the walk follows
            deep = [deep]
        self.deep = deep


class KeepsADerivedTensorInABoundMethod(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.scaled = (self.blocks[0].ff.weight * 2).mul  # the walk reads no bound method's self


class KeepsADerivedTensorInAClosure(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        derived = self.blocks[0].ff.weight * 2
        self.scaled = lambda: derived  # the walk reads no closure's cells


class KeepsAProbeOfARealInputThroughAParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.probe = torch.ones(1, 32) @ self.blocks[0].ff.weight.t()  # CPU x meta: real memory


class ChildrenOfItsOwn(ToyDiT):
    def children(self):
        self.seen = self.blocks[0].ff.weight.detach().clone()
        return super().children()


class SetsItsOwnWay(ToyDiT):
    def __setattr__(self, name, value):
        if name == "training" and not value:  # eval() sets it
            object.__setattr__(self, "seen", self.blocks[0].ff.weight.detach().clone())
        super().__setattr__(name, value)


def _deepest(value: list) -> torch.Tensor:
    while isinstance(value, list):
        value = value[0]
    return value


KEPT_ASIDE = {
    KeepsAProbeOfARealInputThroughAParameter: lambda m: m.probe,
    ChildrenOfItsOwn: lambda m: m.seen,
    SetsItsOwnWay: lambda m: m.seen,
    FusesOnEval: lambda m: m.fused,
    MovesItsOwnWay: lambda m: m.seen,
    ToOfItsOwn: lambda m: m.seen,
    EvalOfItsOwn: lambda m: m.seen,
    TrainSetOnTheInstance: lambda m: m.seen,
    KeepsExtraStateItNeverLoads: lambda m: m.extra,
    KeepsADerivedTensorDeepDown: lambda m: _deepest(m.deep),
    KeepsADerivedTensorInABoundMethod: lambda m: m.scaled.__self__,
    KeepsADerivedTensorInAClosure: lambda m: m.scaled(),
}
EXTRA_STATE = {
    KeepsAConjugateParameter: {
        "conj": torch.randn(3, dtype=torch.complex64),
        "neg": torch.randn(3, dtype=torch.complex64),
    },
    KeepsAQuantizedParameter: {"q": torch.tensor([0.25, -1.0, 3.0])},
    RegistersAParameterAsABuffer: {"extra": torch.tensor([1.0, 2.0, 3.0])},
    KeepsExtraStateItNeverLoads: {"_extra_state": torch.ones(3)},
}


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
@pytest.mark.parametrize(
    "cls",
    [
        KeepsAConjugateParameter,
        KeepsAQuantizedParameter,
        FusesOnEval,
        MovesItsOwnWay,
        ToOfItsOwn,
        EvalOfItsOwn,
        TrainSetOnTheInstance,
        RegistersAParameterAsABuffer,
        KeepsExtraStateItNeverLoads,
        KeepsADerivedTensorDeepDown,
        KeepsADerivedTensorInABoundMethod,
        KeepsADerivedTensorInAClosure,
        KeepsAProbeOfARealInputThroughAParameter,
        ChildrenOfItsOwn,
        SetsItsOwnWay,
    ],
    ids=[
        "conjugate",
        "quantized",
        "train-of-its-own",
        "apply-of-its-own",
        "to-of-its-own",
        "eval-of-its-own",
        "train-on-the-instance",
        "parameter-as-buffer",
        "get-extra-state",
        "derived-deep-down",
        "derived-in-a-bound-method",
        "derived-in-a-closure",
        "real-input-through-a-parameter",
        "children-of-its-own",
        "setattr-of-its-own",
    ],
)
def test_what_placing_or_the_finish_would_change_is_built_as_upstreams(tmp_path, cls, half):
    state = random_like_state(build(), seed=3) | EXTRA_STATE.get(cls, {})
    ckpt = save(state, tmp_path / "model.safetensors")
    for _ in range(2 if half else 1):  # the conversion, then the hit
        torch.manual_seed(0)
        model = load_toy(ckpt, tmp_path / "c", half, factory=lambda c: cls())
        ref = upstream_recipe(cls, ckpt, half)
        finish_only = cls in (
            ChildrenOfItsOwn,
            SetsItsOwnWay,
            FusesOnEval,
            MovesItsOwnWay,
            ToOfItsOwn,
            EvalOfItsOwn,
            TrainSetOnTheInstance,
        )  # fp32, CPU: same
        assert sa3loader.last_load_info().build == ("fast" if finish_only and not half else "faithful")
        if cls is KeepsAQuantizedParameter:
            assert model.q.is_quantized and torch.equal(model.q.int_repr(), ref.q.int_repr())
            model.q, ref.q = None, None  # the comparison below reads bits of dense tensors
        assert_same_model(model, ref)
        if cls is KeepsAConjugateParameter and not half:  # the cast to fp16 keeps the real part
            assert model.conj.is_conj() and model.neg.is_neg()
        kept = KEPT_ASIDE.get(cls)
        if kept is not None:  # what the class keeps outside its parameters: upstream's too
            assert torch.equal(bits(kept(model)), bits(kept(ref))) and kept(model).dtype == kept(ref).dtype
        if cls is RegistersAParameterAsABuffer:
            assert (model.sub.wb is model.extra) == (ref.sub.wb is ref.extra)


@pytest.mark.parametrize("flag", ["overwrite", "swap"])
def test_torchs_conversion_flags_give_upstreams_tensors(tmp_path, flag):
    """With either flag, upstream's cast to fp16 makes new tensors module by module (tied
    weights come apart, a list keeps the fp32 one): the fast build has none left to cast."""
    setter = getattr(torch.__future__, f"set_{flag}_module_params_on_conversion")
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    setter(True)
    try:
        for _ in range(2):
            try:  # with swap, old-style weight_norm's parameters cannot be loaded
                ref = upstream_recipe(TiesAndHolds, ckpt, True)
            except RuntimeError as upstreams:
                with pytest.raises(type(upstreams)):
                    load_toy(ckpt, tmp_path / "c", True, factory=lambda c: TiesAndHolds())
                assert flag == "swap"
                return
            torch.manual_seed(0)
            model = load_toy(ckpt, tmp_path / "c", True, factory=lambda c: TiesAndHolds())
            assert sa3loader.last_load_info().build == "faithful"
            assert_same_model(model, ref)
            for m in (model, ref):
                m.tied = m.blocks[1].ff.weight is m.blocks[0].ff.weight
                m.shared = m.blocks[1].ff.weight.data_ptr() == m.blocks[0].ff.weight.data_ptr()
            assert (model.tied, model.shared, model.held[0].dtype) == (
                ref.tied,
                ref.shared,
                ref.held[0].dtype,
            )
    finally:
        setter(False)


class PopsItsConfig(ToyDiT):
    def __init__(self, config: dict) -> None:
        super().__init__(dim=config.pop("dim"))
        self.kept = config
        self.gappy = nn.Parameter(torch.zeros(4, 6)[:, ::2])  # gaps: the fast build refuses after it ran


class ReordersAndNormalisesItsConfig(ToyDiT):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.order = list(config)
        self.kind = type(config["flag"]).__name__
        if config["how"] == "order":
            config["type"] = config.pop("type")  # equal, another key order
        else:
            config["flag"] = bool(config["flag"])  # equal, another type
        self.gappy = nn.Parameter(torch.zeros(4, 6)[:, ::2])  # the fast build refuses after it ran


@pytest.mark.parametrize("how", ["order", "type"])
@pytest.mark.parametrize("make", [dict, collections.OrderedDict], ids=["dict", "ordered-dict"])
def test_a_config_changed_where_equality_cannot_see_it_is_given_again_as_it_came(tmp_path, make, how):
    def given():
        return make([("type", "toy"), ("flag", 1), ("ids", {3: [None, 2.5]}), ("how", how)])

    ckpt = save(
        random_like_state(ReordersAndNormalisesItsConfig(given()), seed=3), tmp_path / "model.safetensors"
    )
    model = sa3loader.load_diffusion_cond(
        given(), ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=ReordersAndNormalisesItsConfig
    )
    assert sa3loader.last_load_info().build == "faithful"
    assert (model.order, model.kind) == (["type", "flag", "ids", "how"], "int")


def test_a_factory_that_changes_its_config_builds_upstreams_model_after_a_refusal(tmp_path):
    """Upstream runs the factory once; after a refused fast build it runs again, on the config
    as the caller gave it (a copy: JSON's types), not as the first run left it."""
    config = {"dim": 32, "nested": {"a": [1, 2.5, None, "x"]}}
    state = random_like_state(PopsItsConfig(dict(config, nested={"a": [1]})), seed=3)
    ckpt = save(state, tmp_path / "model.safetensors")
    given = {"dim": 32, "nested": {"a": [1, 2.5, None, "x"]}}
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        given, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=PopsItsConfig
    )
    assert sa3loader.last_load_info().build == "faithful"
    torch.manual_seed(0)
    upstreams = {"dim": 32, "nested": {"a": [1, 2.5, None, "x"]}}
    ref = PopsItsConfig(upstreams)
    ref.load_state_dict(load_file(str(ckpt)), strict=False)
    ref.eval().requires_grad_(False)
    assert_same_model(model, ref)
    assert given == upstreams == model.kept == {"nested": {"a": [1, 2.5, None, "x"]}}


class PopsAConfigOfObjects(ToyDiT):
    def __init__(self, config: dict) -> None:
        super().__init__(dim=config.pop("dim"))
        self.kept = config
        self.extra = nn.Parameter(torch.zeros(3, dtype=config["dtype"]))  # not in the checkpoint: refused


def test_a_factory_that_pops_from_a_config_of_objects_builds_upstreams_model_after_a_refusal(tmp_path):
    """A config holding objects other than JSON's (a torch.dtype, a path): its containers are
    given again as they came, holding the caller's very objects (an attack: a KeyError)."""
    dtype, where = torch.float32, Path("somewhere")
    state = random_like_state(PopsAConfigOfObjects({"dim": 32, "dtype": dtype}), seed=3)
    ckpt = save({k: v for k, v in state.items() if k != "extra"}, tmp_path / "model.safetensors")
    given = {"dim": 32, "dtype": dtype, "where": [where]}
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        given, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=PopsAConfigOfObjects
    )
    assert sa3loader.last_load_info().build == "faithful"
    torch.manual_seed(0)
    ref = PopsAConfigOfObjects({"dim": 32, "dtype": dtype, "where": [where]})
    ref.load_state_dict(load_file(str(ckpt)), strict=False)
    ref.eval().requires_grad_(False)
    assert_same_model(model, ref)
    assert model.kept == {"dtype": dtype, "where": [where]} and model.kept["where"][0] is where


class StampsAndSharesItsConfig(ToyDiT):
    """Writes a draw into its config and keeps it; pops through one of two keys that share a
    dict (an attack: the copy split them, and the caller's config kept the first run's stamp)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        config["stamp"] = torch.randn(()).item()  # an escaped draw: the fast build is refused
        size = config["enc"].pop("size", 2) + config["dec"].get("size", 8)
        self.head = nn.Linear(4, size)
        self.kept = config


def test_the_second_run_gets_the_callers_own_config_put_back_and_leaves_it_as_upstreams(tmp_path):
    def given():
        shared = {"size": 3}
        return {"enc": shared, "dec": shared}

    ckpt = save(random_like_state(StampsAndSharesItsConfig(given()), seed=3), tmp_path / "model.safetensors")
    config = given()
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        config, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=StampsAndSharesItsConfig
    )
    assert sa3loader.last_load_info().build == "faithful"
    upstreams = given()
    torch.manual_seed(0)
    ref = StampsAndSharesItsConfig(upstreams)
    ref.load_state_dict(load_file(str(ckpt)), strict=False)
    ref.eval().requires_grad_(False)
    assert_same_model(model, ref)
    assert model.kept is config and config == upstreams and config["enc"] is config["dec"]


_CALLERS_ENCODER: list[nn.Embedding] = []


class TiesTheCallersEmbedding(nn.Module):
    """Ties in a parameter of a model the caller built before the load (a text encoder's)."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.tok_emb = _CALLERS_ENCODER[0].weight
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize("covered", [True, False], ids=["in-the-checkpoint", "not-in-it"])
def test_a_parameter_of_the_callers_tied_in_keeps_its_memory_and_loads_as_upstreams(tmp_path, covered):
    """An attack: the caller's own parameter, registered by the factory, was deferred (its data
    swapped for meta in place): the caller's encoder lost its weights, and the load raised. Only
    parameters made while the factory runs are deferred; upstream copies into the caller's."""
    state = {"tok_emb": torch.full((5, 4), 3.0), "head.weight": torch.ones(2, 4), "head.bias": torch.zeros(2)}
    ckpt = save(
        state if covered else {k: v for k, v in state.items() if k != "tok_emb"}, tmp_path / "m.safetensors"
    )
    results = []
    for ours in (True, False):
        torch.manual_seed(1)
        _CALLERS_ENCODER[:] = [nn.Embedding(5, 4)]
        if ours:
            model = load_toy(ckpt, tmp_path / "c", half=False, factory=TiesTheCallersEmbedding)
            assert sa3loader.last_load_info().build == "fast"  # the caller's is no stand-in to cover
        else:
            model = upstream_recipe(lambda: TiesTheCallersEmbedding({}), ckpt, False)
        assert model.tok_emb is _CALLERS_ENCODER[0].weight and model.tok_emb.device.type == "cpu"
        results.append(model)
    assert_same_model(*results)
    _CALLERS_ENCODER.clear()


class ReinitialisesTheCallersLayer(nn.Module):
    """Ties in a layer the caller built, re-initialises every Linear (the usual ``apply``),
    and has a parameter the checkpoint lacks: refused after the first run drew into the
    caller's layer, which the second run draws into again."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        self.cond = _CALLERS_ENCODER[0]
        self.head = nn.Linear(4, 2)
        self.extra = nn.Parameter(torch.zeros(3))
        self.apply(lambda m: nn.init.xavier_uniform_(m.weight) if isinstance(m, nn.Linear) else None)


def test_a_callers_layer_drawn_into_again_by_the_second_run_is_upstreams(tmp_path):
    """A third attack: the first run's draw into the caller's real layer was noted as drawn, and
    the second run holding it (drawn into again, as upstream's one run does) was refused."""
    state = {"cond.weight": torch.ones(4, 4), "cond.bias": torch.zeros(4)}
    ckpt = save(
        state | {"head.weight": torch.ones(2, 4), "head.bias": torch.zeros(2)}, tmp_path / "m.safetensors"
    )
    results = []
    for ours in (True, False):
        torch.manual_seed(1)
        _CALLERS_ENCODER[:] = [nn.Linear(4, 4)]
        if ours:
            results.append(load_toy(ckpt, tmp_path / "c", factory=ReinitialisesTheCallersLayer))
            assert sa3loader.last_load_info().build == "faithful"
        else:
            results.append(upstream_recipe(lambda: ReinitialisesTheCallersLayer({}), ckpt, True))
        assert results[-1].cond is _CALLERS_ENCODER[0]
    assert_same_model(*results)
    _CALLERS_ENCODER.clear()


_ENCODERS: dict[str, nn.Linear] = {}


class SharesACachedEncoder(nn.Module):
    """The shared encoder built once per process (a module cache), and a parameter the
    checkpoint lacks: the fast build is refused after the factory ran."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        if "enc" not in _ENCODERS:
            _ENCODERS["enc"] = nn.Linear(4, 4)
        self.enc = _ENCODERS["enc"]
        self.head = nn.Linear(4, 2)
        self.extra = nn.Parameter(torch.zeros(3))


def _encoder_and_head(path: Path) -> Path:
    state = {"enc.weight": torch.ones(4, 4), "enc.bias": torch.zeros(4)}
    return save(state | {"head.weight": torch.full((2, 4), 2.0), "head.bias": torch.zeros(2)}, path)


@pytest.mark.parametrize("cached_before", [False, True], ids=["cached-by-the-load", "cached-before"])
def test_a_second_run_that_reuses_the_first_runs_module_is_a_typed_error(tmp_path, cached_before):
    """Upstream builds once. A second run that reuses a module the refused first run cached holds
    its meta stand-ins: a FactoryRebuildError saying what to do (an attack: NotImplementedError
    from the finish). A module cached before the load is real in both runs: upstream's model."""
    ckpt = _encoder_and_head(tmp_path / "model.safetensors")
    _ENCODERS.clear()
    try:
        if cached_before:
            torch.manual_seed(0)
            SharesACachedEncoder({})
            model = load_toy(ckpt, tmp_path / "c", factory=SharesACachedEncoder)
            assert sa3loader.last_load_info().build == "faithful"
            ref = upstream_recipe(lambda: SharesACachedEncoder({}), ckpt, True)
            assert model.enc is ref.enc and bool((model.enc.weight == 1).all())
            assert_same_model(model, ref)
            return
        with pytest.raises(sa3loader.FactoryRebuildError, match="enc.weight: a stand-in") as raised:
            load_toy(ckpt, tmp_path / "c", factory=SharesACachedEncoder)
        assert isinstance(raised.value, RuntimeError) and raised.value.filename == str(ckpt)
        assert "SA3LOADER_DISABLE=1" in str(raised.value)
    finally:
        _ENCODERS.clear()


_KEPT: dict = {}


class KeepsFromItsFirstRun(nn.Module):
    """A factory that keeps something of its first run (``how``), and a parameter the
    checkpoint lacks: the fast build is refused after it ran."""

    def __init__(self, config: dict) -> None:
        super().__init__()
        how = config["how"]
        if how == "weak module cache":
            gc.collect()
            self.enc = _KEPT.get("enc") or nn.Linear(4, 4)
            _KEPT["enc"] = self.enc  # a WeakValueDictionary: alive only while a model holds it
        elif how == "random buffer":
            _KEPT.setdefault("fourier", torch.randn(4, 4))
            self.enc = nn.Linear(4, 4)
            self.register_buffer("fourier", _KEPT["fourier"], persistent=False)
        elif how == "copied prototype":
            _KEPT.setdefault("proto", nn.Linear(4, 4))
            self.enc = copy.deepcopy(_KEPT["proto"])
        elif how == "tensor from a parameter":
            self.enc = nn.Linear(4, 4)
            _KEPT.setdefault("norms", self.enc.weight.detach().norm(dim=1))
            self.register_buffer("norms", _KEPT["norms"], persistent=False)
        self.head = nn.Linear(4, 2)
        self.extra = nn.Parameter(torch.zeros(3))


@pytest.mark.parametrize(
    ("how", "said"),
    [
        ("weak module cache", None),
        ("random buffer", "fourier: a tensor it drew at random"),
        ("copied prototype", "enc.weight: on meta, made from what the first run left"),
        ("tensor from a parameter", "norms: a stand-in"),
    ],
)
def test_what_a_factory_keeps_of_its_first_run_is_upstreams_or_a_typed_error(tmp_path, how, said):
    """A second attack: the refused first model, alive during the second run, kept a weak cache
    full (upstream's one run finds it empty); a kept drawn buffer was reused silently with values
    of another generator position; a prototype's copies and a tensor computed from a stand-in
    were meta, and the finish raised torch's NotImplementedError."""
    global _KEPT
    _KEPT = weakref.WeakValueDictionary() if how == "weak module cache" else {}
    ckpt = _encoder_and_head(tmp_path / "model.safetensors")
    factory = functools.partial(lambda c, how: KeepsFromItsFirstRun({"how": how}), how=how)
    try:
        if said is not None:
            with pytest.raises(sa3loader.FactoryRebuildError, match=re.escape(said)):
                load_toy(ckpt, tmp_path / "c", factory=factory)
            return
        ours = load_toy(ckpt, tmp_path / "c", factory=factory).state_dict()
        assert sa3loader.last_load_info().build == "faithful"
        ours = {key: bits(value).clone() for key, value in ours.items()}
        gc.collect()  # our model gone: upstream's one run finds the weak cache empty too
        theirs = upstream_recipe(lambda: factory({}), ckpt, True).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], bits(theirs[k])) for k in ours)
    finally:
        _KEPT = {}


def test_a_refused_build_of_a_plain_model_runs_no_full_collection(tmp_path):
    """A fourth attack: our own frame held the refusal (``missing``), a cycle that kept the first
    model alive, so every refused load ran gc.collect() (+230 ms with transformers imported).
    Collections are counted through gc.callbacks, automatic ones off meanwhile."""
    ckpt = _encoder_and_head(tmp_path / "model.safetensors")
    started: list[int] = []

    def count(phase, info):
        if phase == "start":
            started.append(info["generation"])

    gc.collect()
    gc.disable()
    gc.callbacks.append(count)
    try:
        load_toy(ckpt, tmp_path / "c", factory=lambda c: KeepsFromItsFirstRun({"how": "nothing"}))
    finally:
        gc.callbacks.remove(count)
        gc.enable()
    assert sa3loader.last_load_info().build == "faithful" and started == []


class SharesACachedEncoderAndAWeakReference(SharesACachedEncoder):
    """The shared encoder cached per process, and a head weakly referenced: placing refuses at
    the head, after the encoder's weights were placed (real, loaded) by the refused attempt."""

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        del self.extra  # in the checkpoint: every parameter is
        self.watched = weakref.ref(self.head.weight)


def test_a_second_run_that_reuses_a_module_placed_before_the_refusal_loads_upstreams_model(tmp_path):
    """Reuse of a stand-in already placed (loaded, real) is no stand-in left empty: the
    checkpoint is copied into it again, and the model is upstream's."""
    ckpt = _encoder_and_head(tmp_path / "model.safetensors")
    _ENCODERS.clear()
    try:
        model = load_toy(ckpt, tmp_path / "c", factory=SharesACachedEncoderAndAWeakReference)
        info = sa3loader.last_load_info()
        assert info.build == "faithful" and "weakly referenced" in info.fallback
        assert not model.enc.weight.is_meta and bool((model.enc.weight == 1).all())
        _ENCODERS.clear()
        ref = upstream_recipe(lambda: SharesACachedEncoderAndAWeakReference({}), ckpt, True)
        model.watched = ref.watched = None
        assert_same_model(model, ref)
    finally:
        _ENCODERS.clear()


class KeepsAZeroTensorParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Parameter(torch._efficientzerotensor(3))


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_a_zero_tensor_parameter_fails_as_upstreams_copy_into_it_does(tmp_path, half):
    """A zero tensor is immutable: upstream's copy into it raises; placing would not have."""
    state = random_like_state(build(), seed=3) | {"z": torch.ones(3)}
    ckpt = save(state, tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError) as upstreams:
        upstream_recipe(KeepsAZeroTensorParameter, ckpt, half)
    with pytest.raises(type(upstreams.value)):
        load_toy(ckpt, tmp_path / "c", half, factory=lambda c: KeepsAZeroTensorParameter())


class KeepsASparseParameter(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        self.sp = nn.Parameter(torch.eye(3, 4).to_sparse(), requires_grad=False)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_a_sparse_parameter_is_built_as_upstreams(tmp_path, half):
    """Placing gives a dense tensor: a sparse parameter is built as upstream builds it, kept
    sparse when the checkpoint lacks it, and failing as upstream's copy when it has it."""
    state = random_like_state(build(), seed=3)
    ckpt = save(state, tmp_path / "model.safetensors")
    for _ in range(2 if half else 1):  # the conversion, then the hit
        torch.manual_seed(0)
        model = load_toy(ckpt, tmp_path / "c", half, factory=lambda c: KeepsASparseParameter())
        ref = upstream_recipe(KeepsASparseParameter, ckpt, half)
        assert sa3loader.last_load_info().build == "faithful"
        assert model.sp.layout == ref.sp.layout == torch.sparse_coo
        assert torch.equal(bits(model.sp.to_dense()), bits(ref.sp.to_dense()))
        model.sp, ref.sp = None, None  # the comparison below reads bits of dense tensors
        assert_same_model(model, ref)
    ckpt = save(state | {"sp": torch.ones(3, 4)}, tmp_path / "with-sp.safetensors")
    with pytest.raises(RuntimeError) as upstreams:
        upstream_recipe(KeepsASparseParameter, ckpt, half)
    with pytest.raises(type(upstreams.value)):
        load_toy(ckpt, tmp_path / "c", half, factory=lambda c: KeepsASparseParameter())


class KeepsItsConfig(ToyDiT):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.kept = config
        self.gappy = nn.Parameter(torch.zeros(4, 6)[:, ::2])  # gaps: the fast build refuses after it ran


def _nested(levels: int) -> list:
    config: list = []
    for _ in range(levels):
        config = [config]
    return config


def test_a_config_that_holds_itself_is_given_to_both_builds_as_it_came(tmp_path):
    """The copy goes 32 levels down: a config that holds itself is not copied (no
    RecursionError); both builds get the caller's own object."""
    config: dict = {"dim": 32}
    config["more"] = config
    ckpt = save(random_like_state(KeepsItsConfig({}), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        config, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=KeepsItsConfig
    )
    assert sa3loader.last_load_info().build == "faithful"
    assert model.kept is config


def test_a_config_nested_30_levels_deep_is_copied_for_the_second_build(tmp_path):
    """Within the 32 levels the copy goes, a factory that pops gets the config as given again."""
    config = {"dim": 32, "nested": _nested(30)}
    ckpt = save(random_like_state(PopsItsConfig(dict(config)), seed=3), tmp_path / "model.safetensors")
    model = sa3loader.load_diffusion_cond(
        config, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=PopsItsConfig
    )
    assert sa3loader.last_load_info().build == "faithful"
    assert model.kept == {"nested": _nested(30)} and config == {"nested": _nested(30)}


class KeepsWeightData(nn.Module):
    """A plain tensor sharing a parameter's memory, as old-style spectral_norm keeps ``weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)
        self.kept = self.layer.weight.data


class RefusesInf(nn.Module):
    """A module's own load check."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 3)

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        if any(bool(v.isinf().any()) for k, v in state_dict.items() if k.startswith(prefix)):
            raise RuntimeError("refused: inf in the checkpoint")
        super()._load_from_state_dict(state_dict, prefix, *args)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_on_the_meta_device_the_checkpoint_is_loaded_before_the_move_as_upstreams(tmp_path, half):
    """Upstream loads, then moves to meta: what shares a parameter's memory outside the module
    tree keeps the loaded values on the CPU, and a module's own load check raises as upstream's."""
    state = {"layer.weight": torch.arange(12.0).reshape(3, 4) + 1, "layer.bias": torch.ones(3)}
    ckpt = save(state, tmp_path / "model.safetensors")

    def upstreams(cls, path):
        model = cls()
        model.load_state_dict(load_file(str(path)), strict=False)
        model.to("meta").eval().requires_grad_(False)
        return model.to(torch.float16) if half else model

    def ours(cls, path):
        return sa3loader.load_diffusion_cond(
            {}, path, "meta", half, cache_dir=tmp_path / "c", model_factory=lambda c: cls()
        )

    ref, model = upstreams(KeepsWeightData, ckpt), ours(KeepsWeightData, ckpt)
    assert ref.kept.device.type == "cpu" and torch.equal(ref.kept, state["layer.weight"])
    assert model.kept.device.type == "cpu" and torch.equal(bits(model.kept), bits(ref.kept))
    assert model.layer.weight.is_meta and model.layer.weight.dtype == ref.layer.weight.dtype
    inf = save({**state, "layer.bias": torch.full((3,), float("inf"))}, tmp_path / "inf.safetensors")
    with pytest.raises(RuntimeError, match="refused: inf"):
        upstreams(RefusesInf, inf)
    with pytest.raises(RuntimeError, match="refused: inf"):
        ours(RefusesInf, inf)
    assert not (tmp_path / "c").exists()  # no sibling on meta


class DrawsIntoAnEmptyIntegerMetaTensor(ToyDiT):
    def __init__(self) -> None:
        super().__init__()
        nn.init.normal_(torch.empty(0, 3, device="meta", dtype=torch.int64))  # meta's kernel refuses


def test_a_draw_the_meta_kernel_refuses_on_the_factorys_own_meta_tensor_raises_as_upstream(tmp_path):
    """A fourth attack: the skipped meta kernel (a draw checked whole on the CPU) hid meta's own
    refusal of an int dtype, which the CPU's kernel does not check on zero elements."""
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    with pytest.raises(RuntimeError) as upstreams:
        upstream_recipe(DrawsIntoAnEmptyIntegerMetaTensor, ckpt, True)
    with pytest.raises(type(upstreams.value), match="floating-point"):
        load_toy(ckpt, tmp_path / "c", factory=lambda c: DrawsIntoAnEmptyIntegerMetaTensor())


class DrawsIntoItsOwnMetaTensors(ToyDiT):
    """Meta tensors of its own (no stand-in): upstream's build draws into meta too, where the
    CPU's checks (bounds, an int dtype's kernel) never run."""

    def __init__(self) -> None:
        super().__init__()
        nn.init.uniform_(torch.empty(2, 3, device="meta"), 1.0, 0.0)
        torch.empty(4, device="meta", dtype=torch.int64).uniform_()


def test_a_draw_into_the_factorys_own_meta_tensor_is_not_checked_as_cpu_memory(tmp_path):
    """A fourth attack: the CPU probe, meant for stand-ins (upstream draws into real memory
    there), ran on the factory's own meta tensors and raised where upstream's build does not."""
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    ref = upstream_recipe(DrawsIntoItsOwnMetaTensors, ckpt, True)
    torch.manual_seed(0)
    model = load_toy(ckpt, tmp_path / "c", factory=lambda c: DrawsIntoItsOwnMetaTensors())
    assert_same_model(model, ref)  # a draw that leaves torch on meta refuses: upstream's build


LOADS_WITHOUT_DYNAMO = """
import sys
import torch
from safetensors.torch import save_file
from torch import nn
import sa3loader
if "torch._dynamo" in sys.modules:
    print("imported before the load")
    sys.exit(0)
def factory(config):
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv1d(8, 8, 3), nn.Embedding(4, 8))
save_file(factory({}).state_dict(), sys.argv[1] + "/model.safetensors")
for _ in range(2):  # the conversion, then the hit
    ckpt, cache = sys.argv[1] + "/model.safetensors", sys.argv[1] + "/c"
    sa3loader.load({}, ckpt, "cpu", True, model_factory=factory, cache_dir=cache)
    assert sa3loader.last_load_info().build == "fast"
print("imported" if "torch._dynamo" in sys.modules else "not imported")
"""


def test_a_fast_build_of_nn_init_layers_does_not_import_torch_dynamo(tmp_path):
    """torch wraps a dispatch mode's ``__torch_dispatch__``, and some meta kernels (``normal_``'s
    Python reference), so that their first call imports torch._dynamo: 1.1 s that every first
    load in a fresh process paid (a new user's report). The draw checks' mode opts out, and
    skips the meta kernel of a draw it checked whole; nothing compiles inside a build."""
    run = subprocess.run(
        [sys.executable, "-c", LOADS_WITHOUT_DYNAMO, str(tmp_path)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    if run.stdout.strip() == "imported before the load":
        pytest.skip("this torch imports torch._dynamo with torch itself")
    assert run.stdout.strip() == "not imported"

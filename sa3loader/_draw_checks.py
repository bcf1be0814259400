"""A random draw the fast build does not run (into a meta stand-in), checked as torch checks a
draw into real memory: upstream's build runs it on the CPU, where a bound out of order
(``uniform_(w, 1, 0)``), a probability above 1 or a dtype the kernel lacks raises; on meta most
of those checks never run, and a skipped draw runs none."""

from __future__ import annotations

from types import FunctionType
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# The in-place draws nn.init's functions make, as the dispatcher names them.
IN_PLACE_DRAWS = frozenset(
    "uniform_ normal_ random_ exponential_ geometric_ log_normal_ cauchy_ bernoulli_".split()
)


def check_arguments(func: Any, args: tuple, kwargs: dict | None) -> bool:
    """Run the in-place draw ``func`` (a meta tensor first) on one element (none, for a
    zero-element tensor) of the CPU of that dtype, from a generator of its own: its checks raise
    as upstream's draw into the real tensor does; the value drawn is dropped, and no generator
    of torch's moves. With tensor arguments (a probability per element), on the whole shape;
    with a meta one (computed from a stand-in), not at all. A generator of the factory's own
    moves as upstream's draw moves it (its later draws are the model's): the draw is run on the
    whole shape, laid out as the stand-in is (torch's CPU kernels draw by the layout). False
    where such a generator could not be moved."""
    tensors = [a for a in (*args[1:], *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
    given = (kwargs or {}).get("generator")
    moves = isinstance(given, torch.Generator) and given is not torch.default_generator
    if isinstance(func, FunctionType) or any(t.is_meta for t in tensors):
        return not moves
    # Upstream's draw refuses a generator of another device before it draws: so does the probe.
    own = given if moves or (isinstance(given, torch.Generator) and given.device.type != "cpu") else None
    with torch._C.DisableTorchFunction():
        try:
            # A zero-element tensor skips some of a kernel's checks (its dtype's): so does the probe.
            shape = args[0].shape if tensors else (min(1, args[0].numel()),)
            probe = (
                torch.empty_strided(args[0].shape, args[0].stride(), dtype=args[0].dtype)
                if moves
                else torch.empty(shape, dtype=args[0].dtype)
            )
        except (RuntimeError, TypeError):  # a dtype the CPU cannot hold: nothing to check it on
            return not moves
        func(probe, *args[1:], **{**(kwargs or {}), "generator": own or torch.Generator()})
    return True


class ChecksDraws(TorchDispatchMode):
    """Around an nn.init call run into meta: each in-place draw it makes there (which a torch
    function mode does not see: the call is the mode's) is checked first (``check_arguments``)."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        """No ``torch._disable_dynamo`` wrapper, whose first call imports torch._dynamo (1.1 s: a
        fresh process's every first load paid it); nothing compiles inside a build's nn.init."""
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = getattr(getattr(func, "overloadpacket", None), "__name__", "")
        if name in IN_PLACE_DRAWS and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            check_arguments(func, args, kwargs)  # (no meta argument but the tensor: it moves a generator)
            if _probed_whole(args, kwargs):
                return args[0]
        return func(*args, **(kwargs or {}))


def _probed_whole(args: tuple, kwargs: dict | None) -> bool:
    """Whether ``check_arguments`` ran every check the meta kernel would: numbers alone, on a
    dtype the CPU holds. Meta draws nothing, so the kernel is skipped: some are Python references
    (``normal_``'s) whose first call imports torch._dynamo (1.1 s)."""
    if any(isinstance(a, torch.Tensor) for a in (*args[1:], *(kwargs or {}).values())):
        return False
    if args[0].numel() == 0:  # the CPU kernel checks nothing then; meta's raises for an int dtype
        return False
    try:
        torch.empty(0, dtype=args[0].dtype)
    except (RuntimeError, TypeError):
        return False
    return True

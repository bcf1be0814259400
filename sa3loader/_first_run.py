"""What a refused fast attempt's factory run made that the second run may reuse: a module, a
parameter or a drawn tensor the factory keeps (a cache of its own, a prototype it copies).

Upstream runs the factory once. Reused, a stand-in still on meta holds nothing (copying the
checkpoint into it does nothing: the finish fails), and a tensor drawn at random holds what the
fast attempt's generator gave, at another position than upstream's. Noted at the refusal
only, weakly (placing, before it, needs no weak reference to a parameter: it blocks the swap).
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
from torch import nn

from ._given_config import Snapshot
from ._watch import drawn_alive, stand_ins_alive

if TYPE_CHECKING:  # handed in by the build
    from ._defer import DeferredParameters
    from ._watch import BuildWatch

STAND_IN, DRAWN = "a stand-in of its parameters, left empty", "a tensor it drew at random"
Made = tuple["weakref.ref[torch.Tensor]", str, int]  # the tensor, its kind, its version then


class FirstRun:
    def __init__(self) -> None:
        self._made: dict[int, Made] = {}  # by id; the ref tells a reused id
        self.config = Snapshot()  # taken as the factory starts: under the build lock, another thread's done

    def note(self, deferred: DeferredParameters, watch: BuildWatch) -> None:
        """At the refusal: the deferred parameters, what was computed from them, what was drawn."""
        for tensor in [*deferred.stand_ins(), *stand_ins_alive(watch)]:
            self._made[id(tensor)] = (weakref.ref(tensor), STAND_IN, 0)
        for tensor in drawn_alive(watch):
            self._made.setdefault(id(tensor), (weakref.ref(tensor), DRAWN, _version(tensor)))

    def reused(self, model: nn.Module) -> str | None:
        """What of the first run the second run's ``model`` holds, said; None where nothing. A
        stand-in placed before the refusal holds loaded values (the checkpoint goes in again);
        a drawn tensor the second run wrote into again (a caller's module re-initialised:
        its version moved) holds the second run's draw."""
        tensors: list[tuple[str, torch.Tensor]] = [*model.named_parameters(remove_duplicate=False)]
        tensors += model.named_buffers(remove_duplicate=False)
        for key, tensor in tensors:
            ref, kind, version = self._made.get(id(tensor), (None, "", 0))
            if ref is None or ref() is not tensor:
                continue
            if (kind == STAND_IN and tensor.is_meta) or (kind == DRAWN and _version(tensor) == version):
                return f"{key}: {kind}"
        if any(t.is_meta for _, t in tensors) and self._left_on_meta():
            key = next(k for k, t in tensors if t.is_meta)
            return f"{key}: on meta, made from what the first run left (a prototype it copies?)"
        return None

    def held(self) -> bool:
        """Whether anything the first run made is still held: a cycle, or the factory's own."""
        return any(ref() is not None for ref, _, _ in self._made.values())

    def _left_on_meta(self) -> bool:
        """Whether a stand-in of the first run is still held (the first model dropped)."""
        alive = (ref() for ref, kind, _ in self._made.values() if kind == STAND_IN)
        return any(t is not None and t.is_meta for t in alive)


def _version(tensor: torch.Tensor) -> int:
    """Its in-place writes so far; -1 where torch keeps no count (an inference tensor)."""
    try:
        return tensor._version
    except RuntimeError:
        return -1

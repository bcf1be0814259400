"""Who holds a tensor's memory, as torch counts it: the fast build's checks that no memory it
drops (a parameter's constructor value, a drawn value) is still held by something else."""

from __future__ import annotations

import sys

import torch


def storage_of(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The memory ``tensor`` lives in; None for meta, empty or storage-less tensors."""
    with torch._C.DisableTorchFunction():  # our own look: not the factory's
        if tensor.is_meta or tensor.numel() == 0:
            return None
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return None
        return storage if storage.data_ptr() else None


def storage_holders(storage: torch.UntypedStorage) -> int:
    """How many hold this memory: each tensor on it, its Python object, and each reference to
    that object beyond the caller's one (a storage kept, typed or untyped, shows the memory
    too). Where torch cannot say, more than any check allows (the build is refused)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return sys.maxsize
    holders = use_count(storage._cdata)
    # Less this frame's argument; torch's own reference to the object comes and goes with the
    # tensors on the memory, so the baseline is measured for the same case.
    return holders + sys.getrefcount(storage) - 1 - _STORAGE_REFERENCES_HELD_ONCE[holders > 1]


def _references_to_a_storage_held_once(with_a_tensor: bool) -> int:
    """``sys.getrefcount`` of a storage object that one local variable holds (torch holds one
    more while a tensor is on the memory, in the versions measured)."""
    tensor = torch.empty(1)
    storage = tensor.untyped_storage()
    if not with_a_tensor:
        del tensor
    return sys.getrefcount(storage)


# Measured once, at import: never inside a build, whose watch sees every torch call.
_STORAGE_REFERENCES_HELD_ONCE = {case: _references_to_a_storage_held_once(case) for case in (False, True)}

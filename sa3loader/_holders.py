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
            return storage if storage.data_ptr() else None
        except (RuntimeError, NotImplementedError):  # (a jagged nested tensor's raises at data_ptr)
            return None


def covers_its_memory(tensor: torch.Tensor, storage: torch.UntypedStorage) -> bool:
    """Whether ``tensor`` is each byte of ``storage`` once: from its start, as many bytes, laid
    out as some order of a contiguous layout (a transposed one is; a view whose elements
    overlap spans the memory yet leaves some of it unwritten)."""
    if tensor.storage_offset() != 0 or tensor.nbytes != storage.nbytes():
        return False
    expected, dims = 1, zip(tensor.shape, tensor.stride(), strict=True)
    for size, stride in sorted((d for d in dims if d[0] != 1), key=lambda d: d[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def storage_holders(storage: torch.UntypedStorage, held_once: dict[bool, int] | None = None) -> int:
    """How many hold this memory: each tensor on it, its Python object, and each reference to
    that object beyond the caller's one (a storage kept, typed or untyped, shows the memory
    too). Where torch cannot say, more than any check allows (the build is refused)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    if use_count is None:
        return sys.maxsize
    holders = use_count(storage._cdata)
    # Less the references a caller's one local makes as it reaches ``getrefcount`` (one per call
    # on Python 3.11, two on 3.10: measured through this very call, as ``held_once``); torch's
    # own reference to the object comes and goes with the tensors on the memory.
    once = (held_once or _STORAGE_REFERENCES_HELD_ONCE)[holders > 1]
    return holders + sys.getrefcount(storage) - once


def _references_to_a_storage_held_once(with_a_tensor: bool) -> int:
    """What ``storage_holders`` counts beyond the memory's use count for a storage that one local
    variable holds, called as the build calls it (torch holds one more while a tensor is on
    the memory, in the versions measured)."""
    tensor = torch.empty(1)
    storage = tensor.untyped_storage()
    if not with_a_tensor:
        del tensor
    return storage_holders(storage, {False: 0, True: 0}) - torch._C._storage_Use_Count(storage._cdata)


# Measured once, at import: never inside a build, whose watch sees every torch call.
_STORAGE_REFERENCES_HELD_ONCE = (
    {case: _references_to_a_storage_held_once(case) for case in (False, True)}
    if hasattr(torch._C, "_storage_Use_Count")
    else {False: 0, True: 0}
)

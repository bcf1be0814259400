"""How values drawn at random leave torch while a model is built: what an op returns (a number,
a list, a string), the shape it gives, whether it raises, or a tensor it reads as numbers in
C++. ``_watch`` asks of every op that reads drawn values."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

# Lists, tuples and slices searched for tensors in an op's arguments.
ARGUMENT_DEPTH = 4


# Functions whose answer about a tensor is not its values: reading them from a drawn tensor
# lets nothing drawn out. Anything else that returns no tensor (a number, a list, an array,
# a string) carries drawn values out of torch.
METADATA_FUNCTIONS = frozenset(
    "size dim ndimension numel nelement stride storage_offset element_size is_contiguous"
    " is_floating_point is_complex is_signed is_pinned is_shared get_device __len__"
    " is_set_to is_nonzero_shape type __hash__ __get__ __set__ requires_grad_ register_hook"
    " _has_compatible_shallow_copy_type _is_view is_inference is_conj is_neg".split()
)


# Functions whose result's shape the values they read decide (a drawn mask's count): the shape
# of such a result carries drawn values out as a number would, however it is read.
SHAPE_FROM_VALUES = frozenset(
    "nonzero argwhere masked_select unique unique_consecutive unique_dim _unique _unique2 bincount"
    " repeat_interleave tensor_split one_hot to_sparse _to_sparse _pack_padded_sequence".split()
)


# Functions that raise, or not, by the values they read: either way tells drawn values.
VALUE_CHECKS = frozenset(
    "_assert_async _assert_scalar _functional_assert_async _functional_assert_scalar cholesky"
    " linalg_cholesky inverse linalg_inv solve linalg_solve lu linalg_lu_factor multinomial"
    " bernoulli normal poisson".split()  # (an index out of range: ``decided_by_values``)
)


# Functions that give a tensor's memory to code torch does not see (a pointer, a storage, an
# array): a value drawn into that memory later can leave through it, unseen.
HANDS_OUT_MEMORY = frozenset(
    "untyped_storage storage _typed_storage data_ptr numpy __array__ __dlpack__".split()
)


# What each registration (``grad_fn``) and nn.init's fan (``dim``, ``size``) read of a stand-in:
# metadata of a meta tensor, never drawn (``_watch``'s ``mark``), so the watch's full look would
# only note an error over a stand-in: these take a short way (922 calls in a DiT's build).
METADATA_OF = frozenset(
    {torch.Tensor.dim, torch._C.TensorBase.size, vars(torch._C.TensorBase)["grad_fn"].__get__}
)
METADATA_NAMES = frozenset(f.__name__ for f in METADATA_OF)  # looked at first: a name's hash is kept


def metadata_of_meta(func: Any, args: tuple, kwargs: dict | None) -> bool:
    """``func`` is one of ``METADATA_OF``, of a plain meta tensor, with number arguments only."""
    if kwargs or func not in METADATA_OF or type(args[0]) not in (torch.Tensor, torch.nn.Parameter):
        return False
    with torch._C.DisableTorchFunction():  # our own look: not the factory's (an outer load's watch)
        return args[0].is_meta and all(type(a) is int for a in args[1:])


# Properties (read through ``__get__``) that are not values.
METADATA_PROPERTIES = frozenset(
    "shape dtype device requires_grad is_leaf is_cuda is_meta is_cpu is_sparse is_quantized is_mkldnn"
    " layout ndim names itemsize nbytes grad_fn output_nr _version _base".split()
)


def decided_by_values(name: str, args: tuple, kwargs: dict | None) -> bool:
    """Whether an op reading drawn values lets them decide a shape (``SHAPE_FROM_VALUES``),
    whether it raises (``VALUE_CHECKS``), or reads a tensor as numbers in C++, unseen: an
    integer or boolean one (an index, a mask) or a one-element one (a size), however nested."""
    if name in SHAPE_FROM_VALUES or name in VALUE_CHECKS or (name == "where" and len(args) == 1):
        return True
    read = argument_tensors((*args, *(kwargs or {}).values()), ARGUMENT_DEPTH)
    return any(not t.is_floating_point() or t.numel() == 1 for t in read)


def argument_tensors(values: tuple | list, depth: int) -> Iterator[torch.Tensor]:
    for value in values:
        if isinstance(value, torch.Tensor):
            yield value
        elif depth and (inner := parts(value)) is not None:
            yield from argument_tensors(inner, depth - 1)


def parts(value: Any) -> tuple | list | None:
    """What a list or tuple holds, or a slice's bounds; None for anything else."""
    slice_bounds = (value.start, value.stop, value.step) if isinstance(value, slice) else None
    return value if isinstance(value, (list, tuple)) else slice_bounds


def op_name(func: Any) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: say which
        return "." + getattr(getattr(func, "__self__", None), "__name__", "?")
    return name


def escapes(func: Any, name: str, out: Any, returned: list) -> bool:
    """Whether ``out`` (no tensor: none ``returned``; not None), computed from drawn values,
    carries values out of torch: a number, a list, an array, a string. Metadata does not."""
    if returned or out is None:
        return False
    if name == "__get__":
        return op_name(func)[1:] not in METADATA_PROPERTIES
    if name in METADATA_FUNCTIONS:
        return False
    return not isinstance(out, (torch.dtype, torch.device, torch.Size))

"""Dtypes: the torch dtype of each safetensors dtype, and the one conversion sa3loader makes
(float32 to float16; every other dtype is kept as it is)."""

from __future__ import annotations

import torch

from .errors import HeaderError

_DTYPE_NAMES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "U16": "uint16",
    "U32": "uint32",
    "U64": "uint64",
    "BOOL": "bool",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}
# Some arrived late (uint16/32/64 in torch 2.3, e8m0 and fp4 later): older releases cannot load them.
TORCH_DTYPES: dict[str, torch.dtype] = {
    st: getattr(torch, name) for st, name in _DTYPE_NAMES.items() if hasattr(torch, name)
}


def torch_dtype(dtype: str, path: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype, or a ``HeaderError`` naming the file."""
    try:
        return TORCH_DTYPES[dtype]
    except KeyError:
        raise HeaderError(
            f"{path}: torch {torch.__version__} has no dtype for {dtype} tensors", filename=path
        ) from None


def converted_dtype(dtype: str) -> str:
    """Only float32 becomes float16; every other dtype is kept as it is."""
    return "F16" if dtype == "F32" else dtype

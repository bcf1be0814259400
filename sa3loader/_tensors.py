"""Tensors that are views of a private, copy-on-write mapping of a safetensors file.

``MAP_PRIVATE`` means an in-place edit of a loaded weight (fine-tuning, say)
copies the touched page into the process and never writes into the file; the
pages that are only read stay shared with the page cache.
"""

from __future__ import annotations

import mmap

import torch

from ._format import Header, TensorEntry

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "BOOL": torch.bool, "C64": torch.complex64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip


class MappedFile:
    """A safetensors file mapped copy-on-write; ``tensor()`` returns zero-copy views."""

    def __init__(self, header: Header) -> None:
        self.header = header
        with open(header.path, "rb") as f:
            self._map = mmap.mmap(
                f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
            )
        if len(self._map) != header.file_size:
            raise OSError(f"{header.path} changed size while it was being opened")
        if hasattr(mmap, "MADV_WILLNEED"):
            self._map.madvise(mmap.MADV_WILLNEED)

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        dtype = TORCH_DTYPES[entry.dtype]
        if entry.numel == 0:
            return torch.empty(entry.shape, dtype=dtype)
        offset = self.header.data_start + entry.begin
        if offset % dtype.itemsize:
            # Files from other writers may misalign a tensor: copy it instead of viewing.
            data = bytearray(self._map[offset : offset + entry.nbytes])
            return torch.frombuffer(data, dtype=dtype).view(entry.shape)
        return torch.frombuffer(self._map, dtype=dtype, count=entry.numel, offset=offset).view(entry.shape)

    def by_name(self, name: str) -> torch.Tensor:
        return self.tensor(self.header.by_name[name])

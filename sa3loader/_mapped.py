"""Tensors that are views of a private, copy-on-write mapping of a safetensors file.

``MAP_PRIVATE`` means an in-place edit of a loaded weight (fine-tuning, say)
copies the touched page into the process and never writes into the file; the
pages that are only read stay shared with the page cache.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from ._format import Header, TensorEntry, reading
from ._ranges import plan_chunks
from .errors import FileAccessError, HeaderError, TruncatedFileError

PAGE_BYTES = mmap.PAGESIZE
PREFETCH_PIECE_BYTES = 64 * 1024 * 1024
PREFETCH_THREADS = 4
_DTYPE_NAMES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U8": "uint8", "U16": "uint16", "U32": "uint32", "U64": "uint64",
    "BOOL": "bool", "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E8M0": "float8_e8m0fnu",
    "F4": "float4_e2m1fn_x2",
}  # fmt: skip
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


class MappedFile:
    """A safetensors file mapped copy-on-write; ``tensor()`` returns zero-copy views."""

    def __init__(self, header: Header) -> None:
        """Map ``header``'s file, through the descriptor it was parsed from when it is open."""
        self.header = header
        with reading(header) as fd:
            try:
                self._map = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)  # MAP_PRIVATE
            except OSError as exc:  # ENOMEM under an address-space limit, say
                raise FileAccessError(
                    f"{header.path}: cannot map it ({exc.strerror}); SA3LOADER_IO=read reads it instead",
                    filename=header.path,
                    errno=exc.errno,
                ) from exc
        if len(self._map) != header.file_size:
            self._map.close()
            raise TruncatedFileError(
                f"{header.path}: changed size while it was being opened", filename=header.path
            )

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        dtype = torch_dtype(entry.dtype, self.header.path)
        if entry.numel == 0:
            return torch.empty(entry.torch_shape, dtype=dtype)
        offset = self.header.data_start + entry.begin
        if offset % dtype.itemsize:
            # Files from other writers may misalign a tensor: copy it instead of viewing.
            data = bytearray(self._map[offset : offset + entry.nbytes])
            return torch.frombuffer(data, dtype=dtype).view(entry.torch_shape)
        tensor = torch.frombuffer(self._map, dtype=dtype, count=entry.numel, offset=offset)
        return tensor.view(entry.torch_shape)

    def prefetch(
        self, offsets: Sequence[int], sizes: Sequence[int], stop: threading.Event | None = None
    ) -> None:
        """Fault in the pages of these ranges now, 64 MB pieces on 4 threads.

        Touched lazily, weights fault in model order, which jumps around the
        file and defeats readahead. One touch per page, in file order within
        each piece, with several pieces in flight keeps the disk's queue full
        (figures in benchmarks/README.md). ``stop`` abandons the pieces not yet
        started.
        """
        view = torch.frombuffer(self._map, dtype=torch.uint8)
        chunks = plan_chunks(list(zip(offsets, sizes, strict=True)), PREFETCH_PIECE_BYTES)

        def touch(start: int, length: int) -> None:
            if stop is None or not stop.is_set():
                view[start : start + length : PAGE_BYTES].sum()

        with ThreadPoolExecutor(PREFETCH_THREADS) as pool:
            for _ in pool.map(lambda c: touch(c.file_offset, c.length), chunks):
                pass

"""Torch ops run on the calling thread alone while a worker of ours does its piece.

The converter runs as many workers as there are cores; each of their ops (a cast, a range
count) split over every core again, an OpenMP team per calling thread, and a conversion on
2 cores took 1.3-1.5x as long (benchmarks/README.md). ``torch.set_num_threads(1)`` would
also set the count every thread started later takes, the user's included; this changes
only the calling thread's own OpenMP setting (nthreads-var is per thread), in the OpenMP
runtimes this process has already loaded, and puts it back. Where none is found (no
``/proc``, another runtime), ops go on splitting: slower, never different (the converter's
ops are elementwise, min/max and counts)."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator

import torch

# Library names of the OpenMP runtimes torch is built with: GNU's, LLVM's, Intel's.
OPENMP_NAMES = ("libgomp", "libomp", "libiomp5")
MAPS = "/proc/self/maps"


def loaded_openmp() -> list[ctypes.CDLL]:
    """The OpenMP runtimes mapped into this process (never loads one: ``RTLD_NOLOAD``)."""
    try:
        with open(MAPS, encoding="utf-8", errors="replace") as maps:
            fields = [line.split(maxsplit=5) for line in maps]
    except OSError:
        return []
    paths = {f[5].strip() for f in fields if len(f) == 6}  # address perms offset dev inode path
    found = []
    for path in sorted(p for p in paths if os.path.basename(p).startswith(OPENMP_NAMES)):
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:  # not a library, or no longer loaded
            continue
        if hasattr(lib, "omp_set_num_threads") and hasattr(lib, "omp_get_max_threads"):
            found.append(lib)
    return found


@contextlib.contextmanager
def serial_ops(runtimes: list[ctypes.CDLL]) -> Iterator[None]:
    """Torch ops of the calling thread on that thread alone, inside the block."""
    # torch sets a thread's OpenMP count at its first parallel op (from the process-wide
    # count): let it do that now, or it would undo the setting below.
    torch.get_num_threads()
    before = [lib.omp_get_max_threads() for lib in runtimes]
    for lib in runtimes:
        lib.omp_set_num_threads(1)
    try:
        yield
    finally:
        for lib, count in zip(runtimes, before, strict=True):
            lib.omp_set_num_threads(count)

"""The staging ring's shapes (slots x chunk size), swept on a device: which to choose.

The one benchmark that measures sa3loader's internals on purpose (it imports the
ring itself, ``sa3loader._io``): run through ``bench_load.py --device cuda``.
"""

from __future__ import annotations

import statistics
import time

from load_child import pinned_h2d

# Ring shapes (slots, MB per slot) the --device cuda sweep tries, all within the
# 512 MB staging goal; the library's default is RING_SLOTS x RING_SLOT_BYTES (ring_shape).
RING_SWEEP = [(2, 128), (4, 64), (8, 32), (16, 16), (4, 32), (8, 16), (16, 8), (8, 64)]


def ring_sweep(path: str, device: str) -> dict:
    """Each ring shape's GB/s into tensors already on ``device``, and with reads alone.

    Destinations are allocated once, outside the clock, so this isolates the
    ring: reads into staging plus copies out of it. "reads only" drops the
    copies, which says whether the disk side or the copy side is the limit.
    """
    import torch

    from sa3loader._format import read_header
    from sa3loader._io import DeviceCopies, stream_into, torch_dtype

    class ReadsOnly(DeviceCopies):
        def send(self, slot: int, pairs: list) -> None:
            pass

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    out: dict = {}
    started = time.perf_counter()  # the first pinned allocation, before any is cached
    torch.empty(256 * 1024 * 1024, dtype=torch.uint8, pin_memory=device == "cuda")
    out["first 256 MB staging allocation s"] = time.perf_counter() - started
    header = read_header(path)
    dests = [
        torch.empty(e.torch_shape, dtype=torch_dtype(e.dtype, path), device=device) for e in header.entries
    ]
    offsets = [header.data_start + e.begin for e in header.entries]
    nbytes = sum(e.nbytes for e in header.entries)
    shapes = []
    for slots, chunk_mb in RING_SWEEP:
        row: dict = {"slots": slots, "chunk MB": chunk_mb}
        for name, copies in (("GB/s", None), ("reads only GB/s", ReadsOnly())):
            times = []
            for _ in range(3):
                sync()
                started = time.perf_counter()
                stream_into(path, dests, offsets, chunk_bytes=chunk_mb << 20, slots=slots, copies=copies)
                sync()
                times.append(time.perf_counter() - started)
            row[name] = nbytes / statistics.median(times) / 1e9
        shapes.append(row)
    out["ring"] = shapes
    if device == "cuda":
        floor = pinned_h2d(nbytes)
        out["pinned H2D GB/s"] = floor["bytes"] / floor["seconds"] / 1e9
    return out


def print_ring_sweep(r: dict) -> None:
    print(
        f"\nstaging ring sweep (hot sibling, destinations preallocated; medians of 3); "
        f"first 256 MB staging allocation {r['first 256 MB staging allocation s'] * 1e3:.0f} ms, "
        f"pinned H2D {r.get('pinned H2D GB/s', float('nan')):.1f} GB/s"
    )
    best = max(r["ring"], key=lambda row: row["GB/s"])
    for row in r["ring"]:
        mark = "  <- best" if row is best else ""
        print(
            f"  {row['slots']:3d} slots x {row['chunk MB']:4d} MB  {row['GB/s']:7.2f} GB/s  "
            f"reads only {row['reads only GB/s']:7.2f} GB/s{mark}"
        )

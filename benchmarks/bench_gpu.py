"""``bench_load.py --device cuda``: hot loads to the GPU (upstream's loader, the cache hit and its
transfer phase, ``load_file`` of the sibling, pinned copies of the same bytes: the floor), then
the staging ring's shapes (slots x chunk size) swept to say which to choose.

Through the public API: each ring shape is set with ``SA3LOADER_RING=SLOTSxMB`` and timed as a
cache hit to the device, whose transfer phase ``last_load_info()`` reports (``bytes_read``
over ``timings["read_s"]``).
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from bench_load import median, print_ratios, run_child
from fixtures import (
    Bench,
    prepare,
    warm,
)
from load_child import pinned_h2d

# Ring shapes (slots, MB per slot) the --device cuda sweep tries, all within the 512 MB
# staging goal; the library's default depends on the machine's cores (design.md).
RING_SWEEP = [(2, 128), (4, 64), (8, 32), (16, 16), (4, 32), (8, 16), (16, 8), (8, 64)]


def ring_sweep(ckpt: str, config: dict, device: str) -> dict:
    """Each ring shape's GB/s in the transfer phase of a cache hit to ``device``."""
    import torch

    import sa3loader

    out: dict = {}
    started = time.perf_counter()  # the first pinned allocation, before any is cached
    torch.empty(256 * 1024 * 1024, dtype=torch.uint8, pin_memory=device == "cuda")
    out["first 256 MB staging allocation s"] = time.perf_counter() - started
    shapes = []
    for slots, chunk_mb in RING_SWEEP:
        os.environ["SA3LOADER_RING"] = f"{slots}x{chunk_mb}"
        rates, staging = [], 0
        for _ in range(3):
            sa3loader.load_diffusion_cond(config, ckpt, device, True)
            info = sa3loader.last_load_info()
            assert info.cache_hit and info.io == "stream", info.reason
            rates.append(info.bytes_read / info.timings["read_s"] / 1e9)
            staging = info.staging_bytes
        shapes.append(
            {
                "slots": slots,
                "chunk MB": chunk_mb,
                "GB/s": statistics.median(rates),
                "staging MB": staging >> 20,
            }
        )
        nbytes = info.bytes_read
    del os.environ["SA3LOADER_RING"]
    out["ring"] = shapes
    if device == "cuda":
        floor = pinned_h2d(nbytes)
        out["pinned H2D GB/s"] = floor["bytes"] / floor["seconds"] / 1e9
    return out


def print_ring_sweep(r: dict) -> None:
    print(
        f"\nstaging ring sweep (hot cache hits, transfer phase; medians of 3); "
        f"first 256 MB staging allocation {r['first 256 MB staging allocation s'] * 1e3:.0f} ms, "
        f"pinned H2D {r.get('pinned H2D GB/s', float('nan')):.1f} GB/s"
    )
    best = max(r["ring"], key=lambda row: row["GB/s"])
    for row in r["ring"]:
        mark = "  <- best" if row is best else ""
        print(
            f"  {row['slots']:3d} slots x {row['chunk MB']:4d} MB  {row['GB/s']:7.2f} GB/s  "
            f"staging {row['staging MB']} MB{mark}"
        )


def measure_cuda(bench: Bench) -> None:
    """Hot page cache, model_half=True, device="cuda": each figure in a fresh process."""
    import torch

    args = bench.args
    size = bench.ckpt.stat().st_size
    shutil.rmtree(bench.cache, ignore_errors=True)
    r = run_child("first", bench)
    assert r["converted"], r
    sibling = bench.sibling = Path(r["sibling"])
    m: dict[str, list[float]] = {}
    for _ in range(args.runs):
        prepare("hot", bench)
        r = run_child("upstream", bench)
        m.setdefault("upstream to GPU s", []).append(r["seconds"])
        prepare("hot", bench)
        r = run_child("hit", bench)
        assert r["cache_hit"] and r["build"] == "fast" and r["io"] == "stream", r
        m.setdefault("hit to GPU s", []).append(r["seconds"])
        m.setdefault("transfer phase s", []).append(r["read_s"])
        m.setdefault("transfer phase GB/s", []).append(r["bytes_read"] / r["read_s"] / 1e9)
        m.setdefault("staging host memory (MB)", []).append(r["staging_bytes"] / 1e6)
        warm(sibling)
        r = run_child("load_file", bench, ckpt=sibling)
        m.setdefault("safetensors load_file(sibling, cuda) s", []).append(r["seconds"])
        r = run_child("h2d", bench, ckpt=sibling)
        m.setdefault("pinned H2D GB/s", []).append(r["bytes"] / r["seconds"] / 1e9)
        print("run done: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in m.items()))
    sib_gb = sibling.stat().st_size / 1e9
    print(
        f"\nmachine: {torch.cuda.get_device_name()}, {os.cpu_count()} cores, fp32 {size / 1e9:.2f} GB, "
        f"sibling {sib_gb:.2f} GB, scale {args.scale}, {args.runs} runs, medians"
    )
    for name, values in m.items():
        print(f"  {name:48} {median(values):10.3f}")
    med = {k: median(v) for k, v in m.items()}
    print_ratios(
        {
            "transfer phase GB/s / pinned H2D GB/s": med["transfer phase GB/s"] / med["pinned H2D GB/s"],
            "upstream to GPU / hit to GPU": med["upstream to GPU s"] / med["hit to GPU s"],
            "load_file to GPU / hit to GPU": med["safetensors load_file(sibling, cuda) s"]
            / med["hit to GPU s"],
            "staging host memory (MB)": max(m["staging host memory (MB)"]),
        }
    )
    print_ring_sweep(run_child("ring", bench))

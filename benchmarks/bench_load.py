"""Benchmark: upstream's loader vs sa3loader on a synthetic full-size SA3 checkpoint.

    python benchmarks/bench_load.py [--layout ../shared/layouts/sa3_medium_layout.json] [--scale 1.0]

Writes an fp32 checkpoint with the exact key/shape/dtype layout of the real
checkpoint (random values), then times, each in a fresh process with only the
load call timed (imports excluded), hot (file in page cache) and cold
(``posix_fadvise(DONTNEED)``, then ``COLD_SETTLE_S`` seconds, just before timing):

- upstream's ``load_diffusion_cond(model_half=True)`` on the fp32 file;
- sa3loader's first load (convert + load) and cache hit (load, then a touch of
  one byte per page of every weight, timed separately);
- conversion alone, and ``cat`` of the sibling to /dev/null (the floor);
- the cache hit again with ``io="read"`` (plain reads, no mapping).

``--device cuda`` instead times hot loads to the GPU: upstream's loader, the
cache hit (its transfer phase in GB/s), ``safetensors.torch.load_file(sibling,
device="cuda")`` and pinned host-to-device copies of the same bytes (the floor),
then sweeps the staging ring's shape (slots x chunk size) to say what to tune.

Peak RssAnon is sampled from /proc/self/status every 2 ms (``ru_maxrss``
counts mapped file pages and misleads). Prints medians and the ratios of the
goals. ``--scale`` < 1 keeps that fraction of the DiT blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests"))

from upstream_env import find_upstream  # noqa: E402

DEFAULT_LAYOUT = REPO.parent / "shared" / "layouts" / "sa3_medium_layout.json"
SAMPLE_EVERY_S = 0.002
PAGE = os.sysconf("SC_PAGE_SIZE")
DISK_MARGIN = 1.15
# On the dev box's virtual disk a read right after POSIX_FADV_DONTNEED is still
# served fast (the host caches it); a few seconds later it is truly cold: a
# 4.6 GB cat took 1.6-1.8 s at once and 4.4-4.7 s after 6 s. Every cold figure
# (loads and cat alike) waits this long after the drop, so they compare fairly.
COLD_SETTLE_S = 8.0
# Ring shapes (slots, MB per slot) the --device cuda sweep tries, all within the
# 512 MB staging goal; the library's default is RING_SLOTS x RING_BYTES / RING_SLOTS.
RING_SWEEP = [(2, 128), (4, 64), (8, 32), (16, 16), (4, 32), (8, 16), (16, 8), (8, 64)]
GOALS = {
    "hit (load+touch) / cat, hot": ("<=", 1.3),
    "upstream / hit (load+touch), hot": (">=", 30.0),
    "first load / upstream": ("<=", 1.0),
    "conversion peak RssAnon over baseline (MB)": ("<=", 300.0),
    "hit peak RssAnon over baseline / sibling size": ("<=", 0.1),
    "hit (load+touch) / cat, cold": ("<=", 1.3),
    "transfer phase GB/s / pinned H2D GB/s": (">=", 0.8),
    "upstream to GPU / hit to GPU": (">=", 30.0),
    "staging host memory (MB)": ("<=", 512.0),
}


# ---------------------------------------------------------------- child side
def rss_anon() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    def __init__(self) -> None:
        self.base = rss_anon()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(SAMPLE_EVERY_S)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def pinned_h2d(nbytes: int) -> dict:
    """The floor for the transfer phase: pinned host-to-device copies of ``nbytes``."""
    import torch

    piece = 256 * 1024 * 1024
    host = torch.empty(piece, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(piece, dtype=torch.uint8, device="cuda")
    dev.copy_(host, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    done = 0
    while done < nbytes:
        n = min(piece, nbytes - done)
        dev[:n].copy_(host[:n], non_blocking=True)
        done += n
    torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - started, "bytes": nbytes}


def ring_sweep(path: str, device: str) -> dict:
    """Each ring shape's GB/s into tensors already on ``device``, and with reads alone.

    Destinations are allocated once, outside the clock, so this isolates the
    ring: reads into staging plus copies out of it. "reads only" drops the
    copies, which says whether the disk side or the copy side is the limit.
    """
    import torch

    from sa3loader._format import read_header
    from sa3loader._stream import DeviceCopies, stream_into
    from sa3loader._tensors import TORCH_DTYPES

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
    dests = [torch.empty(e.shape, dtype=TORCH_DTYPES[e.dtype], device=device) for e in header.entries]
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


def model_config(scale: float) -> dict:
    root = find_upstream()
    config = json.loads((root / "configs" / "sa3_medium_model_config.json").read_text())
    dit = config["model"]["diffusion"]["config"]
    dit["depth"] = max(1, round(dit["depth"] * scale))
    return config


def child(args: argparse.Namespace) -> None:
    import torch
    from upstream_env import import_upstream, install_t5gemma_standin

    factory = import_upstream(find_upstream())
    install_t5gemma_standin(factory)
    import stable_audio_3.loading_utils as lu

    import sa3loader
    from sa3loader._format import read_header
    from sa3loader._sibling import resolve_sibling

    config = model_config(args.scale)
    device = args.device
    out: dict = {}
    if device == "cuda":  # CUDA context set up before the clock, as a warm server has it
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    if args.drop:  # after the imports, so the timed load starts as cold as cat does
        settle_cold([Path(p) for p in args.drop.split(",")])
    if args.child == "h2d":
        print("RESULT " + json.dumps(pinned_h2d(Path(args.ckpt).stat().st_size)))
        return
    if args.child == "ring":
        print("RESULT " + json.dumps(ring_sweep(args.ckpt, device)))
        return
    with PeakSampler() as sampler:
        started = time.perf_counter()
        if args.child == "upstream":
            model = lu.load_diffusion_cond(config, args.ckpt, device=device, model_half=True)
        elif args.child == "convert":
            model = resolve_sibling(read_header(args.ckpt), args.cache)
        elif args.child == "load_file":
            from safetensors.torch import load_file

            model = load_file(args.ckpt, device=device)
        else:
            model = sa3loader.load_diffusion_cond(
                config, args.ckpt, device, True, cache_dir=args.cache, io=args.io
            )
            info = sa3loader.last_load_info()
            out.update(build=info.build, cache_hit=info.cache_hit, converted=info.converted, io=info.io,
                       read_s=info.timings["read_s"], bytes_read=info.bytes_read,
                       staging_bytes=info.staging_bytes)  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - started
        if args.child == "hit" and device == "cpu":
            started = time.perf_counter()
            total = 0
            for t in list(model.parameters()) + list(model.buffers()):
                if t.numel():
                    total += int(t.detach().reshape(-1).view(torch.uint8)[::PAGE].sum())
            out["touch_seconds"] = time.perf_counter() - started
    out.update(peak_anon=sampler.peak, base_anon=sampler.base)
    print("RESULT " + json.dumps(out))


# --------------------------------------------------------------- parent side
def drop_cache(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(path: Path) -> None:
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)


def hot_or_cold(temp: str, drop: tuple[Path, ...], hot: Path) -> tuple[Path, ...]:
    """Hot: read ``hot`` into the page cache now. Cold: the files to drop just before timing."""
    if temp == "hot":
        warm(hot)
        return ()
    return drop


def settle_cold(paths: tuple[Path, ...] | list[Path]) -> None:
    drop_cache(*paths)
    time.sleep(COLD_SETTLE_S)


def run_child(
    mode: str,
    args: argparse.Namespace,
    ckpt: Path,
    cache: Path,
    io: str = "mmap",
    drop: tuple[Path, ...] = (),
) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--ckpt", str(ckpt), "--cache", str(cache),
           "--scale", str(args.scale), "--device", args.device, "--io", io,
           "--drop", ",".join(str(p) for p in drop)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "SA3LOADER_PROGRESS": "0"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def time_cat(path: Path, cold: bool = False) -> float:
    if cold:
        settle_cold([path])
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def write_checkpoint(layout_path: Path, scale: float, path: Path) -> int:
    """Random fp32 values in the layout's keys/shapes/dtypes, for the scaled model's keys."""
    import torch
    from upstream_env import import_upstream, install_t5gemma_standin

    from sa3loader._convert import CHUNK_ELEMENTS
    from sa3loader._format import layout
    from sa3loader._tensors import TORCH_DTYPES

    factory = import_upstream(find_upstream())
    install_t5gemma_standin(factory)
    with torch.device("meta"):
        model = factory.create_diffusion_cond_from_config(model_config(scale))
    wanted = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    entries = json.loads(layout_path.read_text())["state_dict"]
    names = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "bool": "BOOL"}
    tensors = [(e["key"], names[e["dtype"]], tuple(e["shape"])) for e in entries if e["key"] in wanted]
    for key, dtype, shape in tensors:
        assert wanted[key] == (shape, TORCH_DTYPES[dtype]), f"layout and model differ at {key}"
    assert len(tensors) == len(wanted), "the model has keys the layout lacks"
    prefix, placed = layout(tensors, {"format": "pt"})
    assert {e.dtype for e in placed} <= {"F32"}, "the synthetic writer fills float32 tensors only"
    gen = torch.Generator().manual_seed(0)
    buf = bytearray(CHUNK_ELEMENTS * 4)
    values = torch.frombuffer(buf, dtype=torch.float32)
    with open(path, "wb") as f:
        f.write(prefix)
        for entry in placed:
            remaining = entry.numel
            while remaining:
                n = min(remaining, CHUNK_ELEMENTS)
                values[:n].normal_(0.0, 0.02, generator=gen)
                f.write(memoryview(buf)[: n * 4])
                remaining -= n
    return path.stat().st_size


def median(values: list[float]) -> float:
    return statistics.median(values)


def parent(args: argparse.Namespace) -> None:
    if find_upstream() is None:
        raise SystemExit("upstream source not found: set SA3LOADER_UPSTREAM")
    work = Path(args.workdir).resolve()
    if str(work).startswith("/dev/shm"):
        raise SystemExit("--workdir must be on disk, not /dev/shm (RAM)")
    work.mkdir(parents=True, exist_ok=True)
    layout_info = json.loads(Path(args.layout).read_text())["summary"]
    scale = args.scale
    free = shutil.disk_usage(work).free
    need = lambda s: (layout_info["bytes_fp32"] + layout_info["bytes_fp16"]) * s * DISK_MARGIN  # noqa: E731
    while need(scale) > free and scale > 0.05:
        new = round(scale / 2, 3)
        print(f"only {free / 1e9:.1f} GB free in {work}: scale {scale} needs {need(scale) / 1e9:.1f} GB; "
              f"trying scale {new}")  # fmt: skip
        scale = new
    args.scale = scale
    ckpt = work / "model.safetensors"
    sibling = work / "model.fp16.safetensors"
    cache = work / "cache"
    started = time.perf_counter()
    size = write_checkpoint(Path(args.layout), scale, ckpt)
    print(f"wrote {ckpt} ({size / 1e9:.2f} GB fp32, scale {scale}) in {time.perf_counter() - started:.0f}s")

    def fresh() -> None:
        shutil.rmtree(cache, ignore_errors=True)
        sibling.unlink(missing_ok=True)

    results: dict[str, dict[str, list]] = {}

    def record(temp: str, name: str, value: float) -> None:
        results.setdefault(temp, {}).setdefault(name, []).append(value)

    if args.device == "cuda":
        return measure_cuda(args, ckpt, sibling, cache, fresh, size)
    for temp in ("hot", "cold"):
        for _ in range(args.runs):
            # upstream
            r = run_child("upstream", args, ckpt, cache, drop=hot_or_cold(temp, (ckpt,), ckpt))
            record(temp, "upstream s", r["seconds"])
            record(temp, "upstream peak RssAnon MB", (r["peak_anon"] - r["base_anon"]) / 1e6)
            # conversion alone
            fresh()
            r = run_child("convert", args, ckpt, cache, drop=hot_or_cold(temp, (ckpt,), ckpt))
            record(temp, "convert s", r["seconds"])
            record(
                temp, "conversion peak RssAnon over baseline (MB)", (r["peak_anon"] - r["base_anon"]) / 1e6
            )
            # first load
            fresh()
            r = run_child("first", args, ckpt, cache, drop=hot_or_cold(temp, (ckpt,), ckpt))
            assert r["converted"], r
            record(temp, "first load s", r["seconds"])
            record(temp, "first load peak RssAnon MB", (r["peak_anon"] - r["base_anon"]) / 1e6)
            # cache hit
            r = run_child("hit", args, ckpt, cache, drop=hot_or_cold(temp, (ckpt, sibling), sibling))
            assert r["cache_hit"] and r["build"] == "fast", r
            record(temp, "hit load s", r["seconds"])
            record(temp, "hit touch s", r["touch_seconds"])
            record(temp, "hit (load+touch) s", r["seconds"] + r["touch_seconds"])
            record(temp, "hit peak RssAnon MB", (r["peak_anon"] - r["base_anon"]) / 1e6)
            # cache hit with plain reads instead of a mapping
            both = hot_or_cold(temp, (ckpt, sibling), sibling)
            r = run_child("hit", args, ckpt, cache, io="read", drop=both)
            assert r["cache_hit"] and r["io"] == "read", r
            record(temp, "hit io=read (load+touch) s", r["seconds"] + r["touch_seconds"])
            # cat floor
            record(temp, "cat sibling s", time_cat(sibling, cold=temp == "cold"))
            print(f"{temp} run done: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in results[temp].items()))

    sib_mb = sibling.stat().st_size / 1e6
    print(f"\nmachine: {os.cpu_count()} cores, fp32 {size / 1e9:.2f} GB, sibling {sib_mb / 1e3:.2f} GB, "
          f"scale {scale}, {args.runs} runs, medians")  # fmt: skip
    for temp, metrics in results.items():
        print(f"\n[{temp}]")
        for name, values in metrics.items():
            print(f"  {name:48} {median(values):10.3f}")
    ratios = {}
    for temp, m in results.items():
        ratios[f"hit (load+touch) / cat, {temp}"] = median(m["hit (load+touch) s"]) / median(
            m["cat sibling s"]
        )
        ratios[f"upstream / hit (load+touch), {temp}"] = median(m["upstream s"]) / median(
            m["hit (load+touch) s"]
        )
        ratios[f"upstream / hit (load only), {temp}"] = median(m["upstream s"]) / median(m["hit load s"])
        ratios[f"first load / upstream, {temp}"] = median(m["first load s"]) / median(m["upstream s"])
        ratios[f"hit io=read (load+touch) / cat, {temp}"] = median(m["hit io=read (load+touch) s"]) / median(
            m["cat sibling s"]
        )
    hot = results["hot"]
    ratios["first load / upstream"] = ratios["first load / upstream, hot"]
    ratios["conversion peak RssAnon over baseline (MB)"] = max(
        max(results[t]["conversion peak RssAnon over baseline (MB)"]) for t in results
    )
    ratios["hit peak RssAnon over baseline / sibling size"] = max(hot["hit peak RssAnon MB"]) / sib_mb
    print_ratios(ratios)
    if not args.keep:
        shutil.rmtree(work)


def print_ratios(ratios: dict[str, float]) -> None:
    print("\nratios (goal)")
    for name, value in ratios.items():
        goal = GOALS.get(name)
        verdict = ""
        if goal:
            ok = value <= goal[1] if goal[0] == "<=" else value >= goal[1]
            verdict = f"goal {goal[0]} {goal[1]}: {'met' if ok else 'NOT met'}"
        print(f"  {name:52} {value:10.3f}  {verdict}")


def measure_cuda(args: argparse.Namespace, ckpt: Path, sibling: Path, cache: Path, fresh, size: int) -> None:
    """Hot page cache, model_half=True, device="cuda": each figure in a fresh process."""
    import torch

    fresh()
    assert run_child("first", args, ckpt, cache)["converted"]
    m: dict[str, list[float]] = {}
    for _ in range(args.runs):
        warm(ckpt)
        r = run_child("upstream", args, ckpt, cache)
        m.setdefault("upstream to GPU s", []).append(r["seconds"])
        warm(sibling)
        r = run_child("hit", args, ckpt, cache)
        assert r["cache_hit"] and r["build"] == "fast" and r["io"] == "stream", r
        m.setdefault("hit to GPU s", []).append(r["seconds"])
        m.setdefault("transfer phase s", []).append(r["read_s"])
        m.setdefault("transfer phase GB/s", []).append(r["bytes_read"] / r["read_s"] / 1e9)
        m.setdefault("staging host memory (MB)", []).append(r["staging_bytes"] / 1e6)
        warm(sibling)
        r = run_child("load_file", args, sibling, cache)
        m.setdefault("safetensors load_file(sibling, cuda) s", []).append(r["seconds"])
        r = run_child("h2d", args, sibling, cache)
        m.setdefault("pinned H2D GB/s", []).append(r["bytes"] / r["seconds"] / 1e9)
        print("run done: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in m.items()))
    sib_gb = sibling.stat().st_size / 1e9
    print(f"\nmachine: {torch.cuda.get_device_name()}, {os.cpu_count()} cores, fp32 {size / 1e9:.2f} GB, "
          f"sibling {sib_gb:.2f} GB, scale {args.scale}, {args.runs} runs, medians")  # fmt: skip
    for name, values in m.items():
        print(f"  {name:48} {median(values):10.3f}")
    med = {k: median(v) for k, v in m.items()}
    print_ratios({
        "transfer phase GB/s / pinned H2D GB/s": med["transfer phase GB/s"] / med["pinned H2D GB/s"],
        "upstream to GPU / hit to GPU": med["upstream to GPU s"] / med["hit to GPU s"],
        "load_file to GPU / hit to GPU": med["safetensors load_file(sibling, cuda) s"] / med["hit to GPU s"],
        "staging host memory (MB)": max(m["staging host memory (MB)"]),
    })  # fmt: skip
    print_ring_sweep(run_child("ring", args, sibling, cache))


def print_ring_sweep(r: dict) -> None:
    print(f"\nstaging ring sweep (hot sibling, destinations preallocated; medians of 3); "
          f"first 256 MB staging allocation {r['first 256 MB staging allocation s'] * 1e3:.0f} ms, "
          f"pinned H2D {r.get('pinned H2D GB/s', float('nan')):.1f} GB/s")  # fmt: skip
    best = max(r["ring"], key=lambda row: row["GB/s"])
    for row in r["ring"]:
        mark = "  <- best" if row is best else ""
        print(f"  {row['slots']:3d} slots x {row['chunk MB']:4d} MB  {row['GB/s']:7.2f} GB/s  "
              f"reads only {row['reads only GB/s']:7.2f} GB/s{mark}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layout", default=str(DEFAULT_LAYOUT))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=str(REPO / "bench-data"))
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu",
        help="cuda: hot loads to the GPU vs upstream, load_file and a pinned copy",
    )  # fmt: skip
    parser.add_argument("--io", default="mmap", help=argparse.SUPPRESS)
    parser.add_argument("--drop", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()

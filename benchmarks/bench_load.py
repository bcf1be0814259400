"""Benchmark: upstream's loader vs sa3loader on a synthetic full-size SA3 checkpoint,
built and served the way the released models are: the real ``t5gemma`` conditioner
loads a T5Gemma encoder at the released b-b size with transformers, from an offline
Hugging Face hub cache (``tests/hub_fixture.py``), inside the factory.

    python benchmarks/bench_load.py [--model medium|small-music] [--scale 1.0] [--runs 3]

Writes an fp32 checkpoint with the exact key/shape/dtype layout of the real one
(random values) and serves it with its config under the repo id upstream's
``model_configs`` uses. Then, each in a fresh process, hot (files in the page
cache) and cold (``posix_fadvise(DONTNEED)``, then ``COLD_SETTLE_S`` seconds):

- load rows, imports excluded (the child imports torch, stable_audio_3 and
  transformers before the clock starts): upstream's
  ``load_diffusion_cond(model_half=True)``, sa3loader's first load (convert +
  load) and cache hit (load, then a touch of one byte per page of every weight,
  timed apart), the hit with ``io="read"``, conversion alone, the text encoder
  alone (tokenizer + config + ``from_pretrained``, as the conditioner makes them)
  and ``cat`` of the sibling (the floor);
- start-up rows: ``python -c`` to a model ready for ``generate``, imports
  included, for ``load_diffusion_cond(model_half=True)`` and for
  ``StableAudioModel.from_pretrained`` (fp32 on a CPU machine, as upstream forces
  it), upstream against sa3loader's cache hit, split into importing, loading the
  text encoder and placing the DiT. Cold drops the checkpoint, sibling and encoder
  files, not the Python environment.

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
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"
sys.path.insert(0, str(TESTS))

from support.hub_fixture import SA3_REPO, hf_env  # noqa: E402
from support.memory import rss_anon  # noqa: E402
from support.upstream_env import find_upstream  # noqa: E402

SHARED = REPO.parent / "shared"


@dataclass(frozen=True)
class Model:
    layout: Path
    config: str  # file name under the upstream source's configs/
    repo_id: str  # where upstream's model_configs looks for it


MODELS = {
    "medium": Model(
        SHARED / "layouts" / "sa3_medium_layout.json",
        "sa3_medium_model_config.json",
        "stabilityai/stable-audio-3-medium",
    ),
    "small-music": Model(
        SHARED / "layouts" / "sa3_small_music_layout.json",
        "sa3_small_music_model_config.reconstructed.json",
        SA3_REPO,
    ),
}
ENCODER_SIZE = "b-b"
SAMPLE_EVERY_S = 0.002
PAGE = os.sysconf("SC_PAGE_SIZE")
DISK_MARGIN = 1.15
# On the dev box's virtual disk a read right after POSIX_FADV_DONTNEED is still
# served fast (the host caches it); a few seconds later it is truly cold. Every
# cold figure (loads and cat alike) waits this long after the drop, so they compare fairly.
COLD_SETTLE_S = 8.0
# Ring shapes (slots, MB per slot) the --device cuda sweep tries, all within the
# 512 MB staging goal; the library's default is RING_SLOTS x RING_BYTES / RING_SLOTS.
RING_SWEEP = [(2, 128), (4, 64), (8, 32), (16, 16), (4, 32), (8, 16), (16, 8), (8, 64)]
GOALS = {
    "upstream / hit (load+touch), hot": (">=", 30.0),
    "hit (load+touch) / (text encoder alone + cat sibling), hot": ("<=", 1.3),
    "from_pretrained: sa3loader / upstream load, hot": ("<=", 0.3),
    "first load / upstream": ("<=", 1.0),
    "hit (load+touch) / cat, hot": ("<=", 1.3),
    "hit (load+touch) / cat, cold": ("<=", 1.3),
    "conversion peak RssAnon over baseline (MB)": ("<=", 300.0),
    "hit peak RssAnon over baseline / sibling size": ("<=", 0.1),
    "transfer phase GB/s / pinned H2D GB/s": (">=", 0.8),
    "upstream to GPU / hit to GPU": (">=", 30.0),
    "staging host memory (MB)": ("<=", 512.0),
}


# ---------------------------------------------------------------- child side
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


def model_config(model: Model, scale: float) -> dict:
    config = json.loads((find_upstream() / "configs" / model.config).read_text())
    dit = config["model"]["diffusion"]["config"]
    dit["depth"] = max(1, round(dit["depth"] * scale))
    return config


def time_text_encoder() -> list[float]:
    """Seconds spent in the loads upstream's t5gemma conditioner makes: tokenizer, config, encoder.

    Each class's ``from_pretrained`` is wrapped; only the outermost call counts, as
    ``AutoTokenizer`` may load the config itself. Returns a one-element list that grows.
    """
    import transformers

    spent = [0.0]
    depth = [0]
    for cls in (transformers.AutoTokenizer, transformers.AutoConfig, transformers.T5GemmaEncoderModel):
        original = cls.from_pretrained.__func__

        def timed(klass, *args, _original=original, **kwargs):
            depth[0] += 1
            started = time.perf_counter()
            try:
                return _original(klass, *args, **kwargs)
            finally:
                depth[0] -= 1
                if not depth[0]:
                    spent[0] += time.perf_counter() - started

        cls.from_pretrained = classmethod(timed)
    return spent


def load_text_encoder(config: dict) -> object:
    """The three loads the t5gemma conditioner makes, with its arguments, and nothing else."""
    from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel

    prompt = next(c["config"] for c in config["model"]["conditioning"]["configs"] if c["type"] == "t5gemma")
    repo, kwargs = prompt["repo_id"], {"subfolder": prompt["subfolder"]}
    AutoTokenizer.from_pretrained(repo, **kwargs)
    encoder_config = AutoConfig.from_pretrained(repo, **kwargs)
    encoder_config.is_encoder_decoder = False
    return T5GemmaEncoderModel.from_pretrained(repo, config=encoder_config, **kwargs).train(False)


def timed_load(args: argparse.Namespace, config: dict, out: dict) -> object:
    """The one call a load row times; sa3loader's report goes into ``out``."""
    import stable_audio_3.loading_utils as lu

    import sa3loader
    from sa3loader._format import read_header
    from sa3loader._sibling import resolve_sibling

    if args.child == "upstream":
        return lu.load_diffusion_cond(config, args.ckpt, device=args.device, model_half=True)
    if args.child == "convert":
        return resolve_sibling(read_header(args.ckpt), args.cache)
    if args.child == "encoder":
        return load_text_encoder(config)
    if args.child == "load_file":
        from safetensors.torch import load_file

        return load_file(args.ckpt, device=args.device)
    model = sa3loader.load_diffusion_cond(
        config, args.ckpt, args.device, True, cache_dir=args.cache, io=args.io
    )
    info = sa3loader.last_load_info()
    out.update(
        build=info.build,
        fallback=info.fallback,
        cache_hit=info.cache_hit,
        converted=info.converted,
        io=info.io,
        sibling=info.sibling,
        read_s=info.timings["read_s"],
        bytes_read=info.bytes_read,
        staging_bytes=info.staging_bytes,
    )
    return model


def touch_every_page(model) -> float:
    """Seconds to read one byte per page of every weight (what a first forward pass faults in)."""
    import torch

    started = time.perf_counter()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.numel():
            int(t.detach().reshape(-1).view(torch.uint8)[::PAGE].sum())
    return time.perf_counter() - started


def child(args: argparse.Namespace) -> None:
    import torch
    from support.upstream_env import import_upstream

    import_upstream(find_upstream())
    import stable_audio_3.loading_utils  # noqa: F401
    import transformers  # noqa: F401  upstream imports it inside the factory: kept out of the clock
    from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel  # noqa: F401

    import sa3loader  # noqa: F401

    encoder_seconds = time_text_encoder()
    config = json.loads(Path(args.config).read_text())
    if args.device == "cuda":  # CUDA context set up before the clock, as a warm server has it
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()
    if args.drop:  # after the imports, so the timed load starts as cold as cat does
        settle_cold([Path(p) for p in args.drop.split(",")])
    if args.child in ("h2d", "ring"):
        result = (
            pinned_h2d(Path(args.ckpt).stat().st_size)
            if args.child == "h2d"
            else ring_sweep(args.ckpt, args.device)
        )
        print("RESULT " + json.dumps(result))
        return
    out: dict = {}
    with PeakSampler() as sampler:
        started = time.perf_counter()
        model = timed_load(args, config, out)
        if args.device == "cuda":
            torch.cuda.synchronize()
        out["seconds"] = time.perf_counter() - started
        out["encoder_s"] = encoder_seconds[0]
        if args.child == "hit" and args.device == "cpu":
            out["touch_seconds"] = touch_every_page(model)
    out.update(peak_anon=sampler.peak, base_anon=sampler.base)
    print("RESULT " + json.dumps(out))


# What a user runs, timed from the interpreter's start to a model ready for generate.
# The upstream source is not installed, so the first lines put it on sys.path.
STARTUP_SCRIPT = """
import time, sys, json
sys.path[:0] = [{tests!r}, {bench!r}]
from support.upstream_env import find_upstream, import_upstream
import_upstream(find_upstream())
import torch, stable_audio_3.model, stable_audio_3.loading_utils
from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel
{import_ours}
import bench_load
spent = bench_load.time_text_encoder()
imported = time.time()
{load}
ready = time.time()
print("RESULT " + json.dumps({{"imported": imported, "ready": ready, "encoder_s": spent[0]}}))
"""
STARTUP_LOADS = {
    "load_diffusion_cond": """
from huggingface_hub import hf_hub_download
config = json.load(open(hf_hub_download({repo!r}, "model_config.json")))
model = {function}(config, hf_hub_download({repo!r}, "model.safetensors"), device="cpu", model_half=True)
""",
    "from_pretrained": """
model = stable_audio_3.model.StableAudioModel.from_pretrained({name!r}, device="cpu")
""",
}


def startup_script(api: str, ours: bool, name: str) -> str:
    function = "sa3loader.load_diffusion_cond" if ours else "stable_audio_3.loading_utils.load_diffusion_cond"
    if api == "from_pretrained":
        import_ours = "import sa3loader; sa3loader.install()" if ours else ""
    else:
        import_ours = "import sa3loader" if ours else ""
    load = STARTUP_LOADS[api].format(repo=MODELS[name].repo_id, name=name, function=function)
    return STARTUP_SCRIPT.format(tests=str(TESTS), bench=str(HERE), import_ours=import_ours, load=load)


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


def settle_cold(paths: tuple[Path, ...] | list[Path]) -> None:
    drop_cache(*paths)
    time.sleep(COLD_SETTLE_S)


@dataclass
class Bench:
    """Where this run's files are: the hub (HF_HOME), the served checkpoint, the cache dir."""

    args: argparse.Namespace
    hf_home: Path
    ckpt: Path  # the snapshot's model.safetensors (a symlink to its blob)
    config: Path
    encoder: Path  # the T5Gemma weights, dropped with the checkpoint for cold runs
    cache: Path
    sibling: Path | None = None

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **hf_env(self.hf_home),
            "SA3LOADER_PROGRESS": "0",
            "SA3LOADER_CACHE_DIR": str(self.cache),
        }

    def files(self) -> tuple[Path, ...]:
        return tuple(p for p in (self.ckpt, self.encoder, self.sibling) if p is not None)


def result_of(proc: subprocess.CompletedProcess, what: str) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def run_child(
    mode: str, bench: Bench, io: str = "mmap", drop: tuple[Path, ...] = (), ckpt: Path | None = None
) -> dict:
    args = bench.args
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--ckpt",
        str(ckpt or bench.ckpt),
        "--config",
        str(bench.config),
        "--cache",
        str(bench.cache),
        "--device",
        args.device,
        "--io",
        io,
        "--drop",
        ",".join(str(p) for p in drop),
    ]
    return result_of(subprocess.run(cmd, capture_output=True, text=True, env=bench.env()), mode)


def run_startup(api: str, ours: bool, bench: Bench, cold: bool) -> dict:
    """``python -c`` to a model ready for generate: total, import, text encoder and DiT seconds."""
    # The Python environment starts warm on both sides: the run before (upstream's 9 GB
    # of anonymous memory and page cache) may have evicted torch's libraries.
    imports = startup_script(api, ours, bench.args.model).split("imported = time.time()")[0]
    subprocess.run([sys.executable, "-c", imports], capture_output=True, env=bench.env(), check=True)
    if cold:
        settle_cold(bench.files())
    script = startup_script(api, ours, bench.args.model)
    launched = time.time()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=bench.env())
    r = result_of(proc, f"start-up {api}")
    load = r["ready"] - r["imported"]
    return {
        "total": r["ready"] - launched,
        "import": r["imported"] - launched,
        "load": load,
        "text encoder": r["encoder_s"],
        "DiT": load - r["encoder_s"],
    }


def time_cat(path: Path, cold: bool = False) -> float:
    if cold:
        settle_cold([path])
    started = time.perf_counter()
    subprocess.run(["cat", str(path)], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def write_checkpoint(layout_path: Path, depth: int, path: Path) -> int:
    """Random fp32 values in the layout's keys/shapes, without DiT blocks at or past ``depth``.

    The model is not built to list its keys: that would load the text encoder. A
    layout that does not fit the config shows up as a hit that is not fast.
    """
    import torch

    from sa3loader._convert import CHUNK_ELEMENTS
    from sa3loader._format import layout

    block = re.compile(r"^model\.model\.transformer\.layers\.(\d+)\.")
    entries = json.loads(layout_path.read_text())["state_dict"]
    kept = [e for e in entries if not ((m := block.match(e["key"])) and int(m.group(1)) >= depth)]
    assert {e["dtype"] for e in kept} <= {"float32"}, "the synthetic writer fills float32 tensors only"
    prefix, placed = layout([(e["key"], "F32", tuple(e["shape"])) for e in kept], {"format": "pt"})
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


def set_up(args: argparse.Namespace, work: Path) -> Bench:
    """The offline hub: the b-b encoder in the small-music repo, the model in its own repo."""
    from support.hub_fixture import ENCODER_SUBFOLDER, REVISION, write_encoder, write_model

    model = MODELS[args.model]
    hf_home = work / "hf"
    marker = work / "written.json"
    wanted = {"model": args.model, "scale": args.scale, "encoder": ENCODER_SIZE}
    config = model_config(model, args.scale)
    snapshot = hf_home / "hub" / ("models--" + model.repo_id.replace("/", "--")) / "snapshots" / REVISION
    if not (args.keep and marker.exists() and json.loads(marker.read_text()) == wanted):
        shutil.rmtree(hf_home, ignore_errors=True)
        marker.unlink(missing_ok=True)
        started = time.perf_counter()
        write_encoder(hf_home, ENCODER_SIZE)
        raw = work / "model.safetensors"
        size = write_checkpoint(model.layout, config["model"]["diffusion"]["config"]["depth"], raw)
        assert write_model(hf_home, config, raw, model.repo_id) == snapshot
        marker.write_text(json.dumps(wanted))
        print(
            f"wrote {args.model} ({size / 1e9:.2f} GB fp32, scale {args.scale}) and the {ENCODER_SIZE} "
            f"text encoder into {hf_home} in {time.perf_counter() - started:.0f}s"
        )
    encoder = next(hf_home.glob(f"hub/*/snapshots/*/{ENCODER_SUBFOLDER}/model.safetensors"))
    return Bench(
        args, hf_home, snapshot / "model.safetensors", snapshot / "model_config.json", encoder, work / "cache"
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


def prepare(temp: str, bench: Bench) -> tuple[Path, ...]:
    """Hot: read every file into the page cache now. Cold: the files to drop just before timing."""
    if temp == "hot":
        for path in bench.files():
            if path.exists():
                warm(path)
        return ()
    return bench.files()


def workdir_and_scale(args: argparse.Namespace) -> Path:
    """The work dir (on disk), shrinking ``--scale`` with a message when it lacks room."""
    work = Path(args.workdir).resolve()
    if str(work).startswith("/dev/shm"):
        raise SystemExit("--workdir must be on disk, not /dev/shm (RAM)")
    work.mkdir(parents=True, exist_ok=True)
    layout_info = json.loads(MODELS[args.model].layout.read_text())["summary"]
    free = shutil.disk_usage(work).free
    need = lambda s: (layout_info["bytes_fp32"] + layout_info["bytes_fp16"]) * s * DISK_MARGIN  # noqa: E731
    while need(args.scale) > free and args.scale > 0.05:
        new = round(args.scale / 2, 3)
        print(
            f"only {free / 1e9:.1f} GB free in {work}: scale {args.scale} needs "
            f"{need(args.scale) / 1e9:.1f} GB; trying scale {new}"
        )
        args.scale = new
    return work


Record = Callable[[str, float], None]


def anon_mb(r: dict) -> float:
    return (r["peak_anon"] - r["base_anon"]) / 1e6


def measure_loads(temp: str, bench: Bench, record: Record) -> None:
    """One round of the load rows: upstream, conversion, first load, hits, encoder, cat."""
    r = run_child("upstream", bench, drop=prepare(temp, bench))
    record("upstream s", r["seconds"])
    record("upstream peak RssAnon MB", anon_mb(r))
    shutil.rmtree(bench.cache, ignore_errors=True)
    r = run_child("convert", bench, drop=prepare(temp, bench))
    record("convert s", r["seconds"])
    record("conversion peak RssAnon over baseline (MB)", anon_mb(r))
    shutil.rmtree(bench.cache, ignore_errors=True)
    r = run_child("first", bench, drop=prepare(temp, bench))
    assert r["converted"] and r["build"] == "fast", r
    bench.sibling = Path(r["sibling"])
    record("first load s", r["seconds"])
    record("first load peak RssAnon MB", anon_mb(r))
    r = run_child("hit", bench, drop=prepare(temp, bench))
    assert r["cache_hit"] and r["build"] == "fast", r
    record("hit load s", r["seconds"])
    record("hit touch s", r["touch_seconds"])
    record("hit (load+touch) s", r["seconds"] + r["touch_seconds"])
    record("hit text encoder s", r["encoder_s"])
    record("hit peak RssAnon MB", anon_mb(r))
    r = run_child("hit", bench, io="read", drop=prepare(temp, bench))
    assert r["cache_hit"] and r["io"] == "read", r
    record("hit io=read (load+touch) s", r["seconds"] + r["touch_seconds"])
    r = run_child("encoder", bench, drop=prepare(temp, bench))
    record("text encoder alone s", r["seconds"])
    prepare(temp, bench)
    record("cat sibling s", time_cat(bench.sibling, cold=temp == "cold"))


def measure_startups(temp: str, bench: Bench, record: Record) -> None:
    for api in STARTUP_LOADS:
        for side in ("upstream", "sa3loader"):
            prepare(temp, bench)
            for part, seconds in run_startup(api, side == "sa3loader", bench, cold=temp == "cold").items():
                record(f"start-up {api} {side}: {part} s", seconds)


def report(args: argparse.Namespace, bench: Bench, results: dict[str, dict[str, list]]) -> None:
    assert bench.sibling is not None
    size, sib_mb = bench.ckpt.stat().st_size, bench.sibling.stat().st_size / 1e6
    print(
        f"\nmachine: {os.cpu_count()} cores; {args.model}: fp32 {size / 1e9:.2f} GB, "
        f"sibling {sib_mb / 1e3:.2f} GB, scale {args.scale}; text encoder {ENCODER_SIZE}; "
        f"{args.runs} runs, medians"
    )
    for temp, metrics in results.items():
        print(f"\n[{temp}]")
        for name, values in metrics.items():
            print(f"  {name:56} {median(values):10.3f}")
    ratios = ratios_of(results, sib_mb)
    print_ratios(ratios)
    print("\n" + markdown_tables(results, ratios))


def parent(args: argparse.Namespace) -> None:
    if find_upstream() is None:
        raise SystemExit("upstream source not found: set SA3LOADER_UPSTREAM")
    work = workdir_and_scale(args)
    bench = set_up(args, work)
    if args.device == "cuda":
        measure_cuda(bench)
    else:
        results: dict[str, dict[str, list]] = {}
        for temp in ("hot", "cold"):
            metrics = results.setdefault(temp, {})
            record: Record = lambda name, value, m=metrics: m.setdefault(name, []).append(value)  # noqa: E731
            for _ in range(args.runs):
                measure_loads(temp, bench, record)
                measure_startups(temp, bench, record)
                print(f"{temp} run done: " + ", ".join(f"{k}={v[-1]:.2f}" for k, v in metrics.items()))
        report(args, bench, results)
    if not args.keep:
        shutil.rmtree(work)


def ratios_of(results: dict[str, dict[str, list]], sib_mb: float) -> dict[str, float]:
    def m(temp: str, name: str) -> float:
        return median(results[temp][name])

    ratios = {}
    for temp in results:
        hit = m(temp, "hit (load+touch) s")
        ratios[f"upstream / hit (load+touch), {temp}"] = m(temp, "upstream s") / hit
        ratios[f"hit (load+touch) / (text encoder alone + cat sibling), {temp}"] = hit / (
            m(temp, "text encoder alone s") + m(temp, "cat sibling s")
        )
        ratios[f"hit (load+touch) / cat, {temp}"] = hit / m(temp, "cat sibling s")
        ratios[f"hit io=read (load+touch) / cat, {temp}"] = m(temp, "hit io=read (load+touch) s") / m(
            temp, "cat sibling s"
        )
        ratios[f"first load / upstream, {temp}"] = m(temp, "first load s") / m(temp, "upstream s")
        ratios[f"hit (load+touch) / upstream, {temp}"] = hit / m(temp, "upstream s")
        for api in STARTUP_LOADS:
            for part in ("load", "total"):
                ours = m(temp, f"start-up {api} sa3loader: {part} s")
                theirs = m(temp, f"start-up {api} upstream: {part} s")
                label = "load" if part == "load" else "start-up"
                ratios[f"{api}: sa3loader / upstream {label}, {temp}"] = ours / theirs
    ratios["first load / upstream"] = ratios["first load / upstream, hot"]
    ratios["conversion peak RssAnon over baseline (MB)"] = max(
        max(results[t]["conversion peak RssAnon over baseline (MB)"]) for t in results
    )
    ratios["hit peak RssAnon over baseline / sibling size"] = (
        max(results["hot"]["hit peak RssAnon MB"]) / sib_mb
    )
    return ratios


LOAD_ROWS = [
    ("upstream `load_diffusion_cond(model_half=True)`", "upstream s", "upstream peak RssAnon MB"),
    ("sa3loader first load (convert + load)", "first load s", "first load peak RssAnon MB"),
    ("conversion alone", "convert s", "conversion peak RssAnon over baseline (MB)"),
    ("sa3loader cache hit (load + page touch)", "hit (load+touch) s", "hit peak RssAnon MB"),
    ("  of which the text encoder", "hit text encoder s", None),
    ('sa3loader cache hit, `io="read"` (load + touch)', "hit io=read (load+touch) s", None),
    ("text encoder alone (tokenizer + config + `from_pretrained`)", "text encoder alone s", None),
    ("`cat` of the sibling", "cat sibling s", None),
]


def markdown_tables(results: dict[str, dict[str, list]], ratios: dict[str, float]) -> str:
    """The figures as the Markdown tables benchmarks/README.md shows (medians)."""

    def cell(temp: str, name: str | None, unit: str = "s") -> str:
        values = results.get(temp, {}).get(name or "")
        if not values:
            return ""
        return f"{median(values):.3g} s" if unit == "s" else f"+{median(values):.0f} MB"

    lines = ["| load (imports excluded) | hot | cold | peak RssAnon (hot) |", "|---|---|---|---|"]
    for label, name, rss in LOAD_ROWS:
        lines.append(f"| {label} | {cell('hot', name)} | {cell('cold', name)} | {cell('hot', rss, 'MB')} |")
    lines += [
        "",
        "| start-up, `python -c` to a model ready | hot: total = import + text encoder + DiT | "
        "cold: total = import + text encoder + DiT |",
        "|---|---|---|",
    ]
    for api in STARTUP_LOADS:
        for side in ("upstream", "sa3loader"):
            parts = []
            for temp in ("hot", "cold"):
                m = {
                    p: median(results[temp][f"start-up {api} {side}: {p} s"])
                    for p in ("total", "import", "text encoder", "DiT")
                }
                parts.append(
                    f"{m['total']:.2f} = {m['import']:.2f} + {m['text encoder']:.2f} + {m['DiT']:.2f}"
                )
            lines.append(f"| `{api}`, {side} | {parts[0]} | {parts[1]} |")
    lines += ["", "| ratio (same run) | measured | goal | met? |", "|---|---|---|---|"]
    for name, value in ratios.items():
        goal = goal_of(name)
        if goal is None:
            lines.append(f"| {name} | {value:.3g} | | |")
            continue
        shown = f"{goal[0].replace('<=', '≤').replace('>=', '≥')} {goal[1]:g}"
        lines.append(
            f"| {name} | {value:.3g} | {shown} | {'met' if goal_met(value, goal) else '**missed**'} |"
        )
    return "\n".join(lines)


def goal_of(name: str) -> tuple[str, float] | None:
    """A ratio's goal: its own, else ≤ 1 for any sa3loader-over-upstream figure."""
    goal = GOALS.get(name)
    if goal is None and (" / upstream" in name or name.startswith("first load / upstream")):
        goal = ("<=", 1.0)
    return goal


def goal_met(value: float, goal: tuple[str, float]) -> bool:
    return value <= goal[1] if goal[0] == "<=" else value >= goal[1]


def print_ratios(ratios: dict[str, float]) -> None:
    """Each ratio with its goal; every sa3loader-over-upstream figure must stay <= 1."""
    print("\nratios (goal)")
    for name, value in ratios.items():
        goal = goal_of(name)
        verdict = f"goal {goal[0]} {goal[1]}: {'met' if goal_met(value, goal) else 'NOT met'}" if goal else ""
        print(f"  {name:62} {value:10.3f}  {verdict}")


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
    print_ring_sweep(run_child("ring", bench, ckpt=sibling))


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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(MODELS), default="medium", help="which layout and config")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workdir", default=str(REPO / "bench-data"))
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the synthetic files, and reuse them when a later run asks for the same model and scale",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: hot loads to the GPU vs upstream, load_file and a pinned copy",
    )
    parser.add_argument("--io", default="mmap", help=argparse.SUPPRESS)
    parser.add_argument("--drop", default="", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.child else parent(args)


if __name__ == "__main__":
    main()

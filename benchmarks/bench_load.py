"""Benchmark: upstream's loader vs sa3loader on a synthetic full-size SA3 checkpoint,
built and served the way the released models are: the real ``t5gemma`` conditioner
loads a T5Gemma encoder at the released b-b size with transformers, from an offline
Hugging Face hub cache (``tests/support/hub_fixture.py``), inside the factory.

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

In three parts: ``fixtures.py`` (the files, hot and cold), ``load_child.py`` (one
timed load in a fresh process) and this report, with the one goals table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from fixtures import (
    ENCODER_SIZE,
    HERE,
    MODELS,
    REPO,
    TESTS,
    Bench,
    find_upstream,
    prepare,
    set_up,
    settle_cold,
    time_cat,
    workdir_and_scale,
)

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
import load_child
spent = load_child.time_text_encoder()
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
        str(HERE / "load_child.py"),
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


def median(values: list[float]) -> float:
    return statistics.median(values)


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
        from bench_gpu import measure_cuda  # here: bench_gpu imports this module

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
    parent(parser.parse_args())


if __name__ == "__main__":
    main()

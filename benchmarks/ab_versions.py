"""A/B: the same loads under two checkouts of sa3loader, alternating, each in a fresh process.

    python benchmarks/ab_versions.py --baseline /path/to/other/checkout [--model medium] [--runs 5]

For a change that should cost nothing (or win something) on the loads users make:
the released pipeline from ``fixtures.py``'s offline hub (the real ``t5gemma``
conditioner, the b-b text encoder, a full-size synthetic DiT), hot (files in the
page cache). Rows: the ``model_half=True`` cache hit (load, then a touch of every
weight page) and the fp32 load (``model_half=False``). Imports are excluded: the
clock runs around ``load_diffusion_cond`` only. Each checkout has its own cache
dir, warmed once before timing. Baseline and this checkout alternate in pairs, so
drift in the machine's state falls on both; the report gives medians and the
ratio this / baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TESTS = REPO / "tests"

CHILD = """
import json, sys, time
sys.path[:0] = [{checkout!r}, {tests!r}, {bench!r}]
import os
os.environ.update({env!r})
from support.upstream_env import find_upstream, import_upstream
import_upstream(find_upstream())
import stable_audio_3.loading_utils, transformers, torch
import sa3loader
assert sa3loader.__file__.startswith({checkout!r}), sa3loader.__file__
import load_child
config = json.loads(open({config!r}).read())
started = time.perf_counter()
model = sa3loader.load_diffusion_cond(config, {ckpt!r}, "cpu", {half}, cache_dir={cache!r})
loaded = time.perf_counter() - started
touched = load_child.touch_every_page(model)
info = sa3loader.last_load_info()
print("RESULT " + json.dumps({{"load_s": loaded, "touch_s": touched, "cache_hit": info.cache_hit,
                               "build": info.build}}))
"""


def run(checkout: Path, bench: object, half: bool, cache: Path) -> dict:
    from support.hub_fixture import hf_env

    script = CHILD.format(
        checkout=str(checkout),
        tests=str(TESTS),
        bench=str(HERE),
        env=hf_env(bench.hf_home),  # type: ignore[attr-defined]
        config=str(bench.config),
        ckpt=str(bench.ckpt),
        half=half,
        cache=str(cache),  # type: ignore[attr-defined]
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd="/")
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--baseline", type=Path, required=True, help="another checkout's root (holds sa3loader/)"
    )
    parser.add_argument("--model", default="medium", choices=["medium", "small-music"])
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--work", type=Path, default=Path("/tmp/sa3loader-ab"))
    parser.add_argument("--keep", action="store_true", help="reuse the checkpoint already written in --work")
    parser.add_argument("--rows", nargs="+", default=["hit", "fp32"], choices=["hit", "fp32"])
    args = parser.parse_args()
    sys.path[:0] = [str(TESTS), str(HERE)]
    import fixtures

    args.work.mkdir(parents=True, exist_ok=True)
    bench = fixtures.set_up(args, args.work)
    sides = {"baseline": args.baseline.resolve(), "this": REPO}
    caches = {name: args.work / f"cache-{name}" for name in sides}
    rows = {"hit (load + touch)": True, "fp32 load (load + touch)": False}
    times: dict[tuple[str, str], list[float]] = {(row, side): [] for row in rows for side in sides}
    for side, checkout in sides.items():  # convert once each, and warm every file
        run(checkout, bench, True, caches[side])
    for path in [*bench.files(), *args.work.glob("cache-*/siblings/*/*.safetensors")]:
        fixtures.warm(path)
    rows = {row: half for row, half in rows.items() if ("hit" if half else "fp32") in args.rows}
    for i in range(args.runs):
        for row, half in rows.items():
            order = list(sides) if i % 2 == 0 else list(reversed(sides))
            for side in order:
                # Hot means hot: an fp32 load's 9 GB of anonymous memory may have evicted the files.
                for path in [bench.ckpt, bench.encoder, *caches[side].glob("siblings/*/*.safetensors")]:
                    fixtures.warm(path)
                result = run(sides[side], bench, half, caches[side])
                assert result["build"] == "fast" and result["cache_hit"] == half, result
                times[(row, side)].append(result["load_s"] + result["touch_s"])
    report = {}
    for row in rows:  # the rows measured
        base, this = (statistics.median(times[(row, side)]) for side in sides)
        report[row] = {"baseline_s": round(base, 3), "this_s": round(this, 3), "ratio": round(this / base, 3)}
    print(json.dumps({"model": args.model, "runs": args.runs, **report}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

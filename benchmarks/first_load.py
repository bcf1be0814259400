"""The first load (no sibling yet) against upstream's load, in alternating pairs, hot and cold.

    python benchmarks/first_load.py [--model small-music|medium] [--runs 3] [--keep]

Each run is a pair of fresh processes (``load_child.py``, imports before the
clock): upstream's ``load_diffusion_cond(model_half=True)`` and sa3loader's first
load, which converts. The order inside a pair alternates from one run to the
next, and the cache dir is emptied before every first load. Hot means every file
was read into the page cache just before; cold means the checkpoint and the text
encoder were dropped (``posix_fadvise(DONTNEED)``) and left for ``COLD_SETTLE_S``.

Besides the load's own time, a first load reports when its sibling was
published: the load returns once the sibling's bytes are written, and fsync,
rename and the index row finish on a background thread, which the process waits
for before it exits.

Goals (issue 23): first load / upstream <= 0.5, hot and cold (the median of the
pairs' ratios); peak RssAnon of a first load <= 0.6 x upstream's.
"""

from __future__ import annotations

import shutil
import statistics

from bench_load import anon_mb, run_child
from fixtures import Bench, cpu_bench_parser, prepare, set_up, workdir_and_scale

GOAL_TIME, GOAL_ANON = 0.5, 0.6


def one_pair(bench: Bench, temp: str, upstream_first: bool) -> dict[str, float]:
    measured = {}
    for side in ("upstream", "first") if upstream_first else ("first", "upstream"):
        if side == "first":
            shutil.rmtree(bench.cache, ignore_errors=True)
        r = run_child(side, bench, drop=prepare(temp, bench))
        if side == "first":
            assert r["converted"] and r["build"] == "fast", r
            measured["published s"] = r.get("published_s", r["seconds"])  # before: published in the load
        measured[f"{side} s"] = r["seconds"]
        measured[f"{side} peak RssAnon MB"] = anon_mb(r)
    measured["ratio"] = measured["first s"] / measured["upstream s"]
    return measured


def report(results: dict[str, list[dict[str, float]]], bench: Bench) -> None:
    print(f"\n{bench.args.model}: medians of {len(results['hot'])} pairs\n")
    print("| | upstream | first load | first / upstream (median of pairs) | sibling published after |")
    print("|---|---|---|---|---|")
    goals = []
    for temp, pairs in results.items():

        def med(key: str, pairs: list[dict[str, float]] = pairs) -> float:
            return statistics.median(p[key] for p in pairs)

        ratio = med("ratio")
        each = ", ".join(f"{p['ratio']:.2f}" for p in pairs)
        print(
            f"| {temp}: load (s) | {med('upstream s'):.2f} | {med('first s'):.2f} | {ratio:.3f} "
            f"({each}) | {med('published s'):.2f} s |"
        )
        anon = med("first peak RssAnon MB") / med("upstream peak RssAnon MB")
        print(
            f"| {temp}: peak RssAnon added (MB) | {med('upstream peak RssAnon MB'):.0f} | "
            f"{med('first peak RssAnon MB'):.0f} | {anon:.3f} | |"
        )
        goals.append((f"first load / upstream, {temp} <= {GOAL_TIME}", ratio, ratio <= GOAL_TIME))
        goals.append((f"peak RssAnon first load / upstream, {temp} <= {GOAL_ANON}", anon, anon <= GOAL_ANON))
    print("\n| goal | measured | met |\n|---|---|---|")
    for name, value, met in goals:
        print(f"| {name} | {value:.3f} | {'met' if met else 'MISSED'} |")


def main() -> None:
    parser = cpu_bench_parser(__doc__, runs=3)
    parser.add_argument("--temps", nargs="+", default=["hot", "cold"], choices=["hot", "cold"])
    args = parser.parse_args()
    args.device = "cpu"
    bench = set_up(args, workdir_and_scale(args))
    results: dict[str, list[dict[str, float]]] = {}
    for temp in args.temps:
        for run in range(args.runs):
            pair = one_pair(bench, temp, upstream_first=run % 2 == 0)
            results.setdefault(temp, []).append(pair)
            print(f"{temp} pair {run + 1}: " + ", ".join(f"{k}={v:.2f}" for k, v in pair.items()), flush=True)
    report(results, bench)


if __name__ == "__main__":
    main()

"""Several workers on one host load one model at once: N = 1, 2, 4 processes.

    python benchmarks/many_workers.py [--model small-music] [--runs 3] [--keep]

Servers run several worker processes (uvicorn or gunicorn workers, one process per
request queue, Ray actors on one node), each loading the same model. Upstream's
load costs each worker the whole model in anonymous memory. A sa3loader cache hit
maps the sibling: one file-backed copy in the page cache, shared by every process
that maps it.

Each child (``load_child.py``) imports first, prints READY and waits. When all N
are ready, the parent releases them together and times until the last one has
loaded; a hit also touches every page of its weights, as a first forward pass
would. Files are hot (in the page cache), and the sibling exists before the first
round.

Reports for each N, medians over ``--runs`` rounds:
- the slowest load;
- the total anonymous memory the loads added (the sum over processes of peak
  RssAnon minus RssAnon before the load);
- RssFile per process: mapped file pages, which are the same sibling pages in
  every hit.

Goals (issue 23): the total RssAnon of 4 hits is at most 0.1 x one upstream load's;
the slowest of N hits takes at most 1.25 x ceil(N / cores) x one hit.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fixtures import HERE, Bench, cpu_bench_parser, prepare, set_up, workdir_and_scale

COUNTS = (1, 2, 4)
CORES = os.cpu_count() or 1


def load_at_once(mode: str, bench: Bench, n: int) -> dict:
    """N ``load_child.py --child MODE`` processes released together; what each reported."""
    with tempfile.TemporaryDirectory() as temp:
        start = Path(temp) / "start"
        cmd = [
            sys.executable,
            str(HERE / "load_child.py"),
            *("--child", mode, "--ckpt", str(bench.ckpt), "--config", str(bench.config)),
            *("--cache", str(bench.cache), "--start-file", str(start)),
        ]
        procs = [
            subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=bench.env())
            for _ in range(n)
        ]
        for proc in procs:  # upstream's imports print to stdout too
            assert proc.stdout is not None
            while (line := proc.stdout.readline()) and line.strip() != "READY":
                pass
            if not line:
                raise SystemExit(f"{mode} child ended before it was ready:\n{proc.communicate()[1][-3000:]}")
        released = time.time()
        start.touch()
        results = []
        for proc in procs:
            out, err = proc.communicate()
            lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not lines:
                raise SystemExit(f"{mode} child failed:\n{out[-3000:]}\n{err[-3000:]}")
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    if mode == "hit":
        assert all(r["cache_hit"] and r["build"] == "fast" for r in results), results
    return {
        "slowest_s": max(r["ended_at"] for r in results) - released,
        "anon_mb": sum(r["peak_anon"] - r["base_anon"] for r in results) / 1e6,
        "rss_file_mb": statistics.median(r["rss_file"] for r in results) / 1e6,
        "sibling": results[0].get("sibling"),
    }


def measure(bench: Bench, runs: int, upstream_up_to: int) -> dict[tuple[str, int], list[dict]]:
    rows: dict[tuple[str, int], list[dict]] = {}
    for _ in range(runs):
        for n in COUNTS:
            # Alternate the two sides, each round hot again (upstream's anonymous memory may evict).
            for mode in ("hit", "upstream"):
                if mode == "upstream" and n > upstream_up_to:
                    continue
                prepare("hot", bench)
                rows.setdefault((mode, n), []).append(load_at_once(mode, bench, n))
    return rows


def median_of(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def report(rows: dict[tuple[str, int], list[dict]]) -> None:
    print(f"\n{CORES} cores; medians of {len(rows[('hit', 1)])} rounds\n")
    print("| loader | N | slowest load (s) | RssAnon added, all N (MB) | RssFile per process (MB) |")
    print("|---|---|---|---|---|")
    for (mode, n), found in sorted(rows.items()):
        slowest, anon, rss_file = (median_of(found, k) for k in ("slowest_s", "anon_mb", "rss_file_mb"))
        print(f"| {mode} | {n} | {slowest:.2f} | {anon:.0f} | {rss_file:.0f} |")
    one_hit = median_of(rows[("hit", 1)], "slowest_s")
    print("\n| goal | measured | met |")
    print("|---|---|---|")
    if ("upstream", 1) in rows:  # --upstream-up-to 0: hits only, no memory baseline
        ratio = median_of(rows[("hit", 4)], "anon_mb") / median_of(rows[("upstream", 1)], "anon_mb")
        met = "met" if ratio <= 0.1 else "MISSED"
        print(f"| RssAnon of 4 hits / one upstream load's <= 0.1 | {ratio:.3f} | {met} |")
    for n in COUNTS[1:]:
        allowed = 1.25 * math.ceil(n / CORES)
        ratio = median_of(rows[("hit", n)], "slowest_s") / one_hit
        met = "met" if ratio <= allowed else "MISSED"
        print(f"| slowest of {n} hits / one hit <= {allowed:.2f} | {ratio:.2f} | {met} |")


def main() -> None:
    parser = cpu_bench_parser(__doc__, runs=3)
    parser.add_argument(
        "--upstream-up-to", type=int, default=4, help="largest N to run upstream for (memory)"
    )
    args = parser.parse_args()
    args.device = "cpu"
    work = workdir_and_scale(args)
    bench = set_up(args, work)
    prepare("hot", bench)
    first = load_at_once("first", bench, 1)  # makes the sibling; every round after is a hit
    bench.sibling = Path(first["sibling"])  # kept hot with the rest
    print(f"first load (makes the sibling {bench.sibling}): {first['slowest_s']:.1f} s")
    report(measure(bench, args.runs, args.upstream_up_to))


if __name__ == "__main__":
    main()

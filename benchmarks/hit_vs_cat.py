"""A hot cache hit against ``cat`` of its sibling, in alternating pairs: the small-model hit goal.

    python benchmarks/hit_vs_cat.py [--model small-music] [--runs 5] [--keep]

Each pair is a fresh-process hit (``load_child.py --child hit``: load, then a
touch of every weight page; imports before the clock) and a ``cat`` of the
sibling to /dev/null, both hot, in alternating order. The hit includes loading
the T5Gemma text encoder with transformers, which upstream's conditioner does
inside the factory; the child times it apart (``encoder_s``), so the report also
gives sa3loader's own part: the hit without the encoder.

Goal (issue 23): small-model hit <= 1.3 x cat.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from bench_load import run_child
from fixtures import cpu_bench_parser, prepare, set_up, time_cat, workdir_and_scale

GOAL = 1.3


def main() -> None:
    parser = cpu_bench_parser(__doc__, runs=5)
    args = parser.parse_args()
    args.device = "cpu"
    bench = set_up(args, workdir_and_scale(args))
    prepare("hot", bench)
    r = run_child("hit", bench)  # makes the sibling when there is none yet
    assert r["cache_hit"] or r["converted"], r
    bench.sibling = Path(r["sibling"])
    rows: list[dict[str, float]] = []
    for run in range(args.runs):
        row: dict[str, float] = {}
        for side in ("hit", "cat") if run % 2 == 0 else ("cat", "hit"):
            prepare("hot", bench)
            if side == "cat":
                row["cat"] = time_cat(bench.sibling)
                continue
            r = run_child("hit", bench)
            assert r["cache_hit"] and r["build"] == "fast", r
            row["hit"] = r["seconds"] + r["touch_seconds"]
            row["encoder"] = r["encoder_s"]
        row["own"] = row["hit"] - row["encoder"]
        rows.append(row)
        print(", ".join(f"{k}={v:.3f}" for k, v in row.items()), flush=True)

    def med(key: str) -> float:
        return statistics.median(r[key] for r in rows)

    ratios = {
        "hit (load+touch) / cat": statistics.median(r["hit"] / r["cat"] for r in rows),
        "hit without the text encoder / cat": statistics.median(r["own"] / r["cat"] for r in rows),
        "hit / (text encoder + cat)": statistics.median(r["hit"] / (r["encoder"] + r["cat"]) for r in rows),
    }
    print(f"\n{args.model}, hot, medians of {len(rows)} pairs")
    print(
        f"hit (load+touch) {med('hit'):.3f} s, of which text encoder {med('encoder'):.3f} s; "
        f"cat {med('cat'):.3f} s\n"
    )
    print("| ratio (median of pairs) | measured | goal | met |\n|---|---|---|---|")
    for name, value in ratios.items():
        print(f"| {name} | {value:.2f} | <= {GOAL} | {'met' if value <= GOAL else 'MISSED'} |")


if __name__ == "__main__":
    main()

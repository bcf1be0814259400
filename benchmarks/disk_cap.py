"""The newcomer's run (issue 30): a trainer saves 9 checkpoints and an eval job loads each one
once with ``model_half=True`` (a first load: it converts), with and without a cap.

    python benchmarks/disk_cap.py [--model small-music] [--scale 0.25] [--cap-siblings 3] [--keep-files]

Two folders hold the same 9 checkpoints (hard links: the same bytes; each step differs from
the last in its final 4 KiB, as a new save does). For each step the two loads of that
step run in fresh processes (``load_child.py first``: imports before the clock; the sibling
published before it ends), the
order alternating from step to step: one folder with no cap, the other with
``SA3LOADER_CACHE_MAX`` = ``--cap-siblings`` siblings' worth plus half of one. After each step, the
bytes its siblings take on disk in each folder (``.cache/sa3loader``) are recorded.

Goals: with the cap, the siblings never take more than the cap; without it, all 9 stay (the
default is unchanged); load time with the cap / without, the median of the 9 pairs, within
0.9-1.1 (eviction costs nothing a user would see).
"""

from __future__ import annotations

import os
import shutil
import statistics
from dataclasses import replace
from pathlib import Path

from bench_load import run_child
from fixtures import Bench, cpu_bench_parser, set_up, warm, workdir_and_scale

STEPS = 9
CAP_ENV = "SA3LOADER_CACHE_MAX"


def siblings_bytes(folder: Path) -> int:
    hidden = folder / ".cache" / "sa3loader"
    return sum(p.stat().st_size for p in hidden.glob("*.safetensors")) if hidden.is_dir() else 0


def write_steps(raw: Path, folders: list[Path]) -> list[str]:
    """step_01 .. step_09 in each folder: copies of ``raw`` whose last 4 KiB differ."""
    names = []
    for step in range(1, STEPS + 1):
        name = f"step_{step:02d}.safetensors"
        first = folders[0] / name
        shutil.copyfile(raw, first)
        with open(first, "r+b") as f:
            f.seek(-4096, os.SEEK_END)
            f.write(os.urandom(4096))
        for other in folders[1:]:
            os.link(first, other / name)
        names.append(name)
    return names


def one_load(bench: Bench, folder: Path, name: str, cap: int | None) -> dict:
    saved = os.environ.pop(CAP_ENV, None)
    if cap is not None:
        os.environ[CAP_ENV] = str(cap)
    try:
        warm(folder / name)  # hot, as a checkpoint the trainer has just written is
        r = run_child("first", replace(bench, cache=folder / "cache"), ckpt=folder / name)
    finally:
        os.environ.pop(CAP_ENV, None)
        if saved is not None:
            os.environ[CAP_ENV] = saved
    assert r["converted"] and r["build"] == "fast", r
    return {"seconds": r["seconds"], "published_s": r["published_s"], "disk": siblings_bytes(folder)}


def main() -> None:
    parser = cpu_bench_parser(__doc__, runs=1)
    parser.add_argument("--cap-siblings", type=int, default=3, help="siblings' worth of disk the cap allows")
    parser.add_argument("--keep-files", action="store_true", help="leave the 9 checkpoints for a look")
    parser.set_defaults(scale=0.25)
    args = parser.parse_args()
    args.device = "cpu"
    bench = set_up(args, workdir_and_scale(args))
    work = Path(args.workdir).resolve()
    folders = {"no cap": work / "steps-no-cap", "cap": work / "steps-cap"}
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    names = write_steps(bench.ckpt.resolve(), list(folders.values()))
    cap = None
    rows = []
    for step, name in enumerate(names):
        row: dict[str, dict] = {}
        for side in ("no cap", "cap") if step % 2 == 0 else ("cap", "no cap"):
            row[side] = one_load(bench, folders[side], name, cap if side == "cap" else None)
        if cap is None:  # the first sibling's size sets the cap: --cap-siblings of them and half of one
            size = siblings_bytes(folders["no cap"])
            cap = args.cap_siblings * size + size // 2
        rows.append(row)
        print(
            f"{name}: no cap {row['no cap']['seconds']:.2f} s, {row['no cap']['disk'] / 1e9:.2f} GB; "
            f"cap {row['cap']['seconds']:.2f} s, {row['cap']['disk'] / 1e9:.2f} GB",
            flush=True,
        )
    assert cap is not None
    ratios = [r["cap"]["seconds"] / r["no cap"]["seconds"] for r in rows]
    worst = max(r["cap"]["disk"] for r in rows)
    last = {side: rows[-1][side]["disk"] / 1e9 for side in ("no cap", "cap")}
    most = {side: max(r[side]["disk"] for r in rows) / 1e9 for side in ("no cap", "cap")}
    print(
        f"\n{args.model} scale {args.scale}, {STEPS} steps, "
        f"cap {cap / 1e9:.2f} GB ({args.cap_siblings}.5 siblings)\n"
    )
    print("| | no cap | cap |\n|---|---|---|")
    print(f"| siblings on disk after {STEPS} steps | {last['no cap']:.2f} GB | {last['cap']:.2f} GB |")
    print(f"| most the siblings took after a step | {most['no cap']:.2f} GB | {most['cap']:.2f} GB |")
    for key, label in (("seconds", "first load (s)"), ("published_s", "sibling published after (s)")):
        med = {side: statistics.median(r[side][key] for r in rows) for side in ("no cap", "cap")}
        print(f"| {label}, median of {STEPS} | {med['no cap']:.2f} | {med['cap']:.2f} |")
    ratio = statistics.median(ratios)
    print(f"\ncap / no cap load time, per pair: {', '.join(f'{x:.2f}' for x in ratios)}")
    print("\n| goal | measured | met |\n|---|---|---|")
    goals = [
        (
            f"with the cap, siblings never above it ({cap / 1e9:.2f} GB)",
            f"{worst / 1e9:.2f} GB",
            worst <= cap,
        ),
        (
            f"without it, all {STEPS} siblings stay",
            f"{rows[-1]['no cap']['disk'] / 1e9:.2f} GB",
            rows[-1]["no cap"]["disk"] >= STEPS * (rows[0]["no cap"]["disk"] - 4096),
        ),
        ("load time cap / no cap (median of pairs) in 0.9-1.1", f"{ratio:.3f}", 0.9 <= ratio <= 1.1),
    ]
    for name, value, met in goals:
        print(f"| {name} | {value} | {'met' if met else 'MISSED'} |")
    if not args.keep_files:
        for folder in folders.values():
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

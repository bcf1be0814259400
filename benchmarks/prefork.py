"""A pre-fork server: the parent loads the model, then forks its workers (gunicorn ``--preload``).

    python benchmarks/prefork.py [--model small-music] [--runs 3] [--workers 2] [--keep]

Two things a deployer needs to know, measured on the synthetic hub (files hot):

1. **Memory.** Each side (upstream's ``load_diffusion_cond(model_half=True)``, a
   sa3loader cache hit) runs in a fresh parent that loads with
   ``torch.set_num_threads(1)``, then forks ``--workers`` workers; each worker reads
   one byte of every page of every weight (what its first request faults in) and
   then waits; with all of them alive, the parent reads each one's Pss
   (``smaps_rollup``: shared pages divided among the processes sharing them) and
   RssAnon, and its own Pss. Forked workers share the parent's pages
   either way; a hit's weights are file pages of the sibling, upstream's anonymous
   pages copied on write. Sides alternate in pairs; the table gives medians.
2. **The thread-pool hang.** A parent that ran a parallel torch op before forking
   (any load does) leaves the child an intra-op pool it cannot use: the child's next
   parallel op never returns (GNU OpenMP after ``fork``; upstream's load and
   sa3loader's alike). Checked with torch's default thread count and with
   ``torch.set_num_threads(1)`` before the load: a worker counts as hung when a
   2000x2000 matmul has not returned in ``HANG_AFTER_S``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from fixtures import HERE, Bench, cpu_bench_parser, find_upstream, prepare, set_up, workdir_and_scale

HANG_AFTER_S = 10.0


def _smaps_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _status_kb(field: str, pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _fork_and_measure(workers: int, work) -> dict:
    """Fork ``workers`` children that each run ``work()`` and then wait; with every worker
    ready and alive, read each one's Pss and RssAnon and the parent's; then let them exit."""
    go_read, go_write = os.pipe()
    ready_pipes, pids = [], []
    for _ in range(workers):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_end)
            os.close(go_write)
            try:
                work()
                os.write(write_end, b"ready")
            finally:
                os.read(go_read, 1)  # returns when the parent closes its end
                os._exit(0)
        os.close(write_end)
        ready_pipes.append(read_end)
        pids.append(pid)
    os.close(go_read)
    for read_end in ready_pipes:
        ready = os.read(read_end, len(b"ready"))  # the worker stays alive: no EOF to wait for
        os.close(read_end)
        if ready != b"ready":
            raise SystemExit("a worker failed")
    measured = {
        "parent_pss_mb": _smaps_kb("Pss") / 1024,
        "workers": [
            {"pss_mb": _smaps_kb("Pss", pid) / 1024, "anon_mb": _status_kb("RssAnon", pid) / 1024}
            for pid in pids
        ],
    }
    os.close(go_write)
    for pid in pids:
        os.waitpid(pid, 0)
    return measured


def memory_child(args: argparse.Namespace) -> dict:
    """Load as one side, fork workers that touch every weight page, report Pss and RssAnon."""
    import torch
    from load_child import timed_load, touch_every_page
    from support.upstream_env import import_upstream

    torch.set_num_threads(1)  # the fix for the hang (see the module doc)
    import_upstream(find_upstream())
    config = json.loads(open(args.config).read())
    loaded: dict = {}
    model = timed_load(argparse.Namespace(**{**vars(args), "device": "cpu", "io": "mmap"}), config, loaded)
    if args.child == "hit":
        assert loaded["cache_hit"] and loaded["build"] == "fast", loaded

    def work() -> None:
        touch_every_page(model)

    return _fork_and_measure(args.workers, work)


def hang_child(args: argparse.Namespace) -> dict:
    """Whether a forked worker's parallel op returns, after the parent ran one."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    a = torch.randn(2000, 2000)
    (a @ a).sum()  # what any load does: the intra-op pool has started

    def work() -> dict:
        (a @ a).sum()
        return {"returned": True}

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        os.write(write_end, json.dumps(work()).encode())
        os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + HANG_AFTER_S
    while time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG)[0]:
            with os.fdopen(read_end) as f:
                return json.loads(f.read())
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(read_end)
    return {"returned": False}


def run_child(bench: Bench, *extra: str) -> dict:
    cmd = [sys.executable, str(HERE / "prefork.py"), *extra]
    cmd += ["--ckpt", str(bench.ckpt), "--config", str(bench.config), "--cache", str(bench.cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=bench.env())
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{extra} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    if "--child" in sys.argv:
        parser = argparse.ArgumentParser()
        parser.add_argument("--child", required=True)
        for name in ("--ckpt", "--config", "--cache"):
            parser.add_argument(name)
        parser.add_argument("--workers", type=int, default=2)
        parser.add_argument("--threads", type=int, default=0)
        args = parser.parse_args()
        result = hang_child(args) if args.child == "hang" else memory_child(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    parser = cpu_bench_parser(__doc__, runs=3)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    bench = set_up(args, workdir_and_scale(args))
    warm = [sys.executable, "-m", "sa3loader", "warm", str(bench.ckpt), "--cache-dir", str(bench.cache)]
    subprocess.run(warm, check=True, env=bench.env(), capture_output=True)  # the hit side's sibling
    results: dict[str, list[dict]] = {"upstream": [], "hit": []}
    for run in range(args.runs):
        for side in ("upstream", "hit") if run % 2 == 0 else ("hit", "upstream"):
            prepare("hot", bench)
            results[side].append(run_child(bench, "--child", side, "--workers", str(args.workers)))
    print(f"\n{args.model}, {args.workers} workers forked after the load, medians of {args.runs} runs (MB)\n")
    print("| | parent Pss | each worker's Pss | each worker's RssAnon | parent + workers Pss |")
    print("|---|---|---|---|---|")
    for side, runs in results.items():
        worker_pss = statistics.median(w["pss_mb"] for r in runs for w in r["workers"])
        worker_anon = statistics.median(w["anon_mb"] for r in runs for w in r["workers"])
        parent = statistics.median(r["parent_pss_mb"] for r in runs)
        total = statistics.median(r["parent_pss_mb"] + sum(w["pss_mb"] for w in r["workers"]) for r in runs)
        print(f"| {side} | {parent:.0f} | {worker_pss:.0f} | {worker_anon:.0f} | {total:.0f} |")
    print("\n| torch threads in the parent | worker's matmul after fork |")
    print("|---|---|")
    for threads in (0, 1):
        r = run_child(bench, "--child", "hang", "--threads", str(threads))
        label = "default" if threads == 0 else str(threads)
        print(f"| {label} | {'returned' if r['returned'] else f'hung ({HANG_AFTER_S:.0f} s)'} |")
    if not args.keep:
        import shutil

        shutil.rmtree(bench.cache, ignore_errors=True)


if __name__ == "__main__":
    main()

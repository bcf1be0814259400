"""Soak: many processes loading while sources are republished, loaders are killed and the
cache is pruned and cleared under them. Run by hand, not in the test suite:

    python benchmarks/soak.py --minutes 10 [--loaders 4] [--dim 256]

- loaders: processes that load the toy SA3-shaped model in a loop (``model_half`` True
  and False, ``io`` mmap and read, one shared cache dir) and record, for each model
  that returned, when the load started and ended and the digest of every tensor;
- a publisher: every ``--publish-every`` seconds a new version of the checkpoint (all
  tensors and buffers differ) replaces it, by temp file + ``os.replace`` mostly and
  sometimes by rewriting the file in place (``cp`` over it);
- a killer: SIGKILLs a random loader every ``--kill-every`` seconds (it is restarted);
- an admin: ``sa3loader cache prune`` or ``cache clear --yes`` every ``--admin-every`` seconds.

At the end it checks that every model that returned equals exactly one version that
was live during its load (published before the load ended and not replaced before it
began), that a load that failed failed with a documented ``Sa3LoaderError``, that after
one ``cache prune`` no temp file, lock file or empty dir is left, and that ``cache
verify`` passes. Exit 0 only if all of that holds. Prints one summary line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"

LOADER = """
import json, os, random, sys, time, traceback
sys.path.insert(0, {tests!r})
import torch
import sa3loader
from support.child import digest
from support.toymodel import build
ckpt, cache, log, dim = {ckpt!r}, {cache!r}, {log!r}, {dim}
rng = random.Random(os.getpid())
with open(log, "a", buffering=1) as out:
    while True:
        half, io = rng.random() < 0.7, rng.choice(["mmap", "read"])
        started = time.time()
        try:
            torch.manual_seed(0)
            model = sa3loader.load_diffusion_cond(
                {{"dim": dim}}, ckpt, "cpu", half, cache_dir=cache, model_factory=build, io=io)
            record = {{"ok": True, "digest": digest(model), "event": sa3loader.last_load_info().reason}}
        except sa3loader.Sa3LoaderError as exc:
            record = {{"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}}
        except Exception as exc:
            record = {{"ok": False, "error": "UNTYPED " + type(exc).__name__,
                       "message": traceback.format_exc()[-600:]}}
        record.update(start=started, end=time.time(), half=half, io=io)
        out.write(json.dumps(record) + "\\n")
"""


def reference_digests(path: Path, dim: int) -> dict[bool, str]:
    """The digest of upstream's recipe for this file, for each ``model_half``."""
    from support.child import digest
    from support.toymodel import reference

    return {half: digest(reference(path, half=half, config={"dim": dim})) for half in (False, True)}


def write_version(work: Path, index: int, dim: int) -> Path:
    import torch
    from support.checkpoints import random_like_state, save
    from support.toymodel import build

    torch.manual_seed(0)
    return save(random_like_state(build({"dim": dim}), seed=1000 + index), work / f"v{index}.safetensors")


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        self.ckpt = work / "ckpt" / "model.safetensors"
        self.cache = work / "cache"
        self.log = work / "loads.jsonl"
        self.versions = [write_version(work, i, args.dim) for i in range(args.versions)]
        self.digests = [reference_digests(v, args.dim) for v in self.versions]
        self.published: list[tuple[float, int]] = []  # (time, version) of each publish
        self.loaders: list[subprocess.Popen] = []
        self.admin_proc: subprocess.Popen | None = None
        self.counts = {"kills": 0, "republished": 0, "rewritten_in_place": 0, "prunes": 0, "clears": 0}

    def publish(self, version: int, in_place: bool) -> None:
        source = self.versions[version]
        if in_place:
            with open(self.ckpt, "r+b" if self.ckpt.exists() else "wb") as f:  # cp over it
                f.truncate(0)
                f.write(source.read_bytes())
            self.counts["rewritten_in_place"] += 1
        else:
            staged = self.ckpt.with_name(".model.staged")
            shutil.copyfile(source, staged)
            os.replace(staged, self.ckpt)
            self.counts["republished"] += 1
        self.published.append((time.time(), version))

    def start_loader(self) -> subprocess.Popen:
        script = LOADER.format(
            tests=str(TESTS), ckpt=str(self.ckpt), cache=str(self.cache), log=str(self.log), dim=self.args.dim
        )
        env = {**os.environ, "SA3LOADER_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
        return subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.DEVNULL)

    def admin(self) -> None:
        """Start a cache command unless the last one still runs (it takes a Python start-up)."""
        if self.admin_proc is not None and self.admin_proc.poll() is None:
            return
        command = random.choice([["prune"], ["clear", "--yes"]])
        self.admin_proc = subprocess.Popen(
            [sys.executable, "-m", "sa3loader", "cache", *command, "--cache-dir", str(self.cache)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.counts["prunes" if command == ["prune"] else "clears"] += 1

    def run(self) -> None:
        self.ckpt.parent.mkdir()
        self.publish(0, in_place=False)
        self.loaders = [self.start_loader() for _ in range(self.args.loaders)]
        deadline = time.time() + self.args.minutes * 60
        next_publish = next_kill = next_admin = time.time()
        version = 0
        while time.time() < deadline:
            now = time.time()
            if now >= next_publish:
                version = (version + 1) % len(self.versions)
                self.publish(version, in_place=random.random() < self.args.in_place_share)
                next_publish = now + self.args.publish_every
            if now >= next_kill:
                victim = random.randrange(len(self.loaders))
                self.loaders[victim].send_signal(signal.SIGKILL)
                self.loaders[victim].wait()
                self.loaders[victim] = self.start_loader()
                self.counts["kills"] += 1
                next_kill = now + self.args.kill_every
            if now >= next_admin:
                self.admin()
                next_admin = now + self.args.admin_every
            time.sleep(0.05)
        for proc in self.loaders:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        if self.admin_proc is not None:
            self.admin_proc.wait()

    def live_during(self, start: float, end: float) -> set[int]:
        """Versions that were the published one at some moment of [start, end]."""
        live = set()
        for i, (at, version) in enumerate(self.published):
            replaced_at = self.published[i + 1][0] if i + 1 < len(self.published) else float("inf")
            if at <= end and replaced_at >= start:
                live.add(version)
        return live

    def one_live_version(self, load: dict) -> bool:
        """The returned model equals one version that was live during its load."""
        live = self.live_during(load["start"], load["end"])
        return any(self.digests[v][load["half"]] == load["digest"] for v in live)

    def check(self) -> dict:
        loads = [json.loads(line) for line in self.log.read_text().splitlines() if line.strip()]
        returned = [r for r in loads if r["ok"]]
        mixed = [r for r in returned if not self.one_live_version(r)]
        failures: dict[str, int] = {}
        for r in loads:
            if not r["ok"]:
                failures[r["error"]] = failures.get(r["error"], 0) + 1
        untyped = [r for r in loads if not r["ok"] and r["error"].startswith("UNTYPED")]
        cli = [sys.executable, "-m", "sa3loader", "--cache-dir", str(self.cache)]
        subprocess.run([*cli, "cache", "prune"], capture_output=True, timeout=300)
        debris = [
            str(p)
            for p in self.work.rglob("*")
            if ".incomplete-" in p.name
            or p.name.endswith((".lock", ".lease"))
            or (p.is_dir() and p.parent.name == "siblings" and not any(p.iterdir()))
        ]
        verify = subprocess.run([*cli, "cache", "verify"], capture_output=True, text=True, timeout=600)
        return {
            "minutes": self.args.minutes,
            "loaders": self.args.loaders,
            "loads": len(loads),
            "returned": len(returned),
            "mixed": len(mixed),
            "failures": failures,
            "untyped": len(untyped),
            **self.counts,
            "debris_after_prune": debris,
            "verify_rc": verify.returncode,
            "examples": {"mixed": mixed[:3], "untyped": untyped[:3]},
        }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--loaders", type=int, default=4)
    parser.add_argument("--dim", type=int, default=256, help="toy model width (256: about 1.5 MB)")
    parser.add_argument("--versions", type=int, default=5)
    parser.add_argument("--publish-every", type=float, default=1.0)
    parser.add_argument("--in-place-share", type=float, default=0.2, help="share of rewrites made in place")
    parser.add_argument("--kill-every", type=float, default=3.0)
    parser.add_argument("--admin-every", type=float, default=5.0)
    parser.add_argument("--work", type=Path, help="working dir (default: a fresh temp dir, removed after)")
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    work = args.work or Path(tempfile.mkdtemp(prefix="sa3loader-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        soak = Soak(args, work)
        soak.run()
        summary = soak.check()
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(summary))
    ok = not summary["mixed"] and not summary["untyped"] and not summary["debris_after_prune"]
    return 0 if ok and summary["verify_rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

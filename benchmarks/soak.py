"""Soak: many processes loading while sources are republished, loaders are killed and the
cache is pruned and cleared under them. Run by hand, not in the test suite:

    python benchmarks/soak.py --minutes 10 [--loaders 4] [--dim 256]

- loaders: processes that load the toy SA3-shaped model in a loop (``model_half`` True
  and False, ``io`` mmap and read, one shared cache dir) and record, for each model
  that returned, when the load started and ended and the digest of every tensor;
- three sources, each load picking one: a plain checkpoint; a Hugging Face hub cache
  (a snapshot link to ``blobs/<sha256>``); and a copy of that cache (``cp -a``, another
  ``HF_HOME``), whose blobs are shared with the first by name;
- a publisher: every ``--publish-every`` seconds a new version (all tensors and buffers
  differ) of one source: the plain checkpoint by temp file + ``os.replace`` mostly and
  sometimes rewritten in place (``cp`` over it); the hub by a new blob and the snapshot
  link repointed, or a re-download of the blob it names; the copy by ``cp
  version.safetensors <copy>/snapshots/<rev>/model.safetensors``, which follows the link
  and rewrites the copied blob in place (its name then lies about its content);
- pre-fork parents: processes that load in a thread and fork a worker while it converts
  (the worker lives on a few seconds, holding nothing);
- a killer: SIGKILLs a random loader or pre-fork parent every ``--kill-every`` seconds
  (it is restarted);
- an admin: ``sa3loader cache prune`` or ``cache clear --yes`` every ``--admin-every`` seconds.

Every loader runs with ``SA3LOADER_LOCK_TIMEOUT=--lock-timeout``: a load that waits on a
lock no live process holds (a dead parent's, kept by its worker) times out. At the end it
checks that every model that returned equals exactly one version that was live at its
source during its load (published before the load ended and not replaced before it
began), that no load timed out on a lock, that a load that failed failed with a
documented ``Sa3LoaderError``, that after one ``cache prune`` no temp file, lock file or
empty dir is left, and that ``cache verify`` passes. Exit 0 only if all of that holds.
Prints one summary line of JSON.
"""

from __future__ import annotations

import argparse
import hashlib
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
import json, os, random, sys, threading, time, traceback
sys.path.insert(0, {tests!r})
import torch
import sa3loader
from support.child import digest
from support.toymodel import build
sources, cache, log, dim, prefork = {sources!r}, {cache!r}, {log!r}, {dim}, {prefork!r}
rng = random.Random(os.getpid())

def load_once(out):
    source = rng.choice(list(sources))
    half, io = prefork or rng.random() < 0.7, rng.choice(["mmap", "read"])
    started = time.time()
    try:
        torch.manual_seed(0)
        model = sa3loader.load_diffusion_cond(
            {{"dim": dim}}, sources[source], "cpu", half, cache_dir=cache, model_factory=build, io=io)
        info = sa3loader.last_load_info()
        record = {{"ok": True, "digest": digest(model), "event": info.reason,
                   "sibling_s": info.timings.get("sibling_s", 0.0)}}
    except sa3loader.Sa3LoaderError as exc:
        record = {{"ok": False, "error": type(exc).__name__, "message": str(exc)[:300]}}
    except Exception as exc:
        record = {{"ok": False, "error": "UNTYPED " + type(exc).__name__,
                   "message": traceback.format_exc()[-600:]}}
    record.update(source=source, start=started, end=time.time(), half=half, io=io, prefork=prefork)
    out.write(json.dumps(record) + "\\n")

with open(log, "a", buffering=1) as out:
    while True:
        if not prefork:
            load_once(out)
            continue
        # A pre-fork server: load in a thread, fork a worker while it runs (mid-conversion, often).
        loader = threading.Thread(target=load_once, args=(out,))
        loader.start()
        time.sleep(rng.random() * 0.05)
        if os.fork() == 0:
            time.sleep(2 + 6 * rng.random())  # a worker that lives on, holding nothing
            os._exit(0)
        loader.join()
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


HUB_REPO = "models--org--soak"
REVISION = "0" * 40


class Soak:
    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args, self.work = args, work
        hub = work / "hf" / "hub" / HUB_REPO
        self.sources = {
            "plain": work / "ckpt" / "model.safetensors",
            "hub": hub / "snapshots" / REVISION / "model.safetensors",
            "hub-copy": work / "hf-copy" / "hub" / HUB_REPO / "snapshots" / REVISION / "model.safetensors",
        }
        self.cache = work / "cache"
        self.log = work / "loads.jsonl"
        self.versions = [write_version(work, i, args.dim) for i in range(args.versions)]
        self.digests = [reference_digests(v, args.dim) for v in self.versions]
        self.blobs = [hashlib.sha256(v.read_bytes()).hexdigest() for v in self.versions]
        # (time, version) of each publish, by source
        self.published: dict[str, list[tuple[float, int]]] = {name: [] for name in self.sources}
        self.loaders: list[subprocess.Popen] = []
        self.admin_proc: subprocess.Popen | None = None
        self.counts = {
            "kills": 0,
            "republished": 0,
            "rewritten_in_place": 0,
            "hub_new_revision": 0,
            "hub_redownloaded": 0,
            "hub_copy_overwritten": 0,
            "prunes": 0,
            "clears": 0,
        }

    def publish(self, source: str, version: int, in_place: bool) -> None:
        path, new = self.sources[source], self.versions[version]
        if source == "plain" and in_place or source == "hub-copy":
            with open(path, "r+b" if path.exists() else "wb") as f:  # cp over it (through the link)
                f.truncate(0)
                f.write(new.read_bytes())
            self.counts["rewritten_in_place" if source == "plain" else "hub_copy_overwritten"] += 1
        elif source == "plain":
            staged = path.with_name(".model.staged")
            shutil.copyfile(new, staged)
            os.replace(staged, path)
            self.counts["republished"] += 1
        else:
            self._publish_blob(path, version, redownload=in_place)
        self.published[source].append((time.time(), version))

    def _publish_blob(self, link: Path, version: int, redownload: bool) -> None:
        """As huggingface_hub does: the blob written as a temp file and renamed (a re-download
        of the blob the link names, or a new one), then the snapshot link repointed."""
        blobs = link.parent.parent.parent / "blobs"
        blob = blobs / self.blobs[version]
        if redownload or not blob.exists():
            staged = blobs / (blob.name + ".incomplete")
            shutil.copyfile(self.versions[version], staged)
            os.replace(staged, blob)
        staged_link = link.with_name(".link.staged")
        staged_link.unlink(missing_ok=True)
        staged_link.symlink_to(os.path.relpath(blob, link.parent))
        os.replace(staged_link, link)
        self.counts["hub_redownloaded" if redownload else "hub_new_revision"] += 1

    def start_loader(self, prefork: bool = False) -> subprocess.Popen:
        script = LOADER.format(
            tests=str(TESTS),
            sources={name: str(path) for name, path in self.sources.items()},
            cache=str(self.cache),
            log=str(self.log),
            dim=self.args.dim,
            prefork=prefork,
        )
        env = {
            **os.environ,
            "SA3LOADER_PROGRESS": "0",
            "OMP_NUM_THREADS": "1",
            "SA3LOADER_LOCK_TIMEOUT": str(self.args.lock_timeout),
        }
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

    def set_up_sources(self) -> None:
        self.sources["plain"].parent.mkdir(parents=True)
        self.publish("plain", 0, in_place=False)
        (self.sources["hub"].parent.parent.parent / "blobs").mkdir(parents=True)
        self.sources["hub"].parent.mkdir(parents=True)
        self.publish("hub", 0, in_place=False)
        shutil.copytree(self.work / "hf", self.work / "hf-copy", symlinks=True)  # cp -a: times kept
        self.published["hub-copy"].append((time.time(), 0))

    def run(self) -> None:
        self.set_up_sources()
        forkers = self.args.preforks
        self.loaders = [self.start_loader(prefork=i < forkers) for i in range(self.args.loaders + forkers)]
        deadline = time.time() + self.args.minutes * 60
        next_publish = next_kill = next_admin = time.time()
        version = 0
        while time.time() < deadline:
            now = time.time()
            if now >= next_publish:
                version = (version + 1) % len(self.versions)
                source = random.choice(list(self.sources))
                self.publish(source, version, in_place=random.random() < self.args.in_place_share)
                next_publish = now + self.args.publish_every
            if now >= next_kill:
                victim = random.randrange(len(self.loaders))
                self.loaders[victim].send_signal(signal.SIGKILL)
                self.loaders[victim].wait()
                self.loaders[victim] = self.start_loader(prefork=victim < forkers)
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

    def live_during(self, source: str, start: float, end: float) -> set[int]:
        """Versions that were the published one at ``source`` at some moment of [start, end]."""
        live = set()
        published = self.published[source]
        for i, (at, version) in enumerate(published):
            replaced_at = published[i + 1][0] if i + 1 < len(published) else float("inf")
            if at <= end and replaced_at >= start:
                live.add(version)
        return live

    def one_live_version(self, load: dict) -> bool:
        """The returned model equals one version that was live at its source during its load."""
        live = self.live_during(load["source"], load["start"], load["end"])
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
        lock_waits = sorted((r.get("sibling_s", 0.0) for r in returned), reverse=True)
        cli = [sys.executable, "-m", "sa3loader", "--cache-dir", str(self.cache)]
        subprocess.run([*cli, "cache", "prune"], capture_output=True, timeout=300)
        debris = [
            str(p)
            for p in self.work.rglob("*")
            if ".incomplete-" in p.name
            or (p.name.endswith((".lock", ".lease")) and not p.with_suffix("").exists())  # kept by a sibling
            or (p.is_dir() and p.parent.name == "siblings" and not any(p.iterdir()))
        ]
        verify = subprocess.run([*cli, "cache", "verify"], capture_output=True, text=True, timeout=600)
        return {
            "minutes": self.args.minutes,
            "loaders": self.args.loaders,
            "loads": len(loads),
            "returned": len(returned),
            "mixed": len(mixed),
            "by_source": {name: sum(r["source"] == name for r in returned) for name in self.sources},
            "by_prefork_parents": sum(r["prefork"] for r in returned),
            "lock_timeouts": failures.get("LockTimeoutError", 0),
            "slowest_sibling_s": [round(s, 2) for s in lock_waits[:3]],
            "failures": failures,
            "untyped": len(untyped),
            **self.counts,
            "debris_after_prune": debris,
            "verify_rc": verify.returncode,
            "verify_said": (verify.stdout + verify.stderr)[-1500:] if verify.returncode else "",
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
    parser.add_argument("--preforks", type=int, default=2, help="pre-fork parents, besides the loaders")
    parser.add_argument(
        "--lock-timeout", type=float, default=60.0, help="seconds a load waits on a lock, then fails"
    )
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
    ok = not (
        summary["mixed"] or summary["untyped"] or summary["debris_after_prune"] or summary["lock_timeouts"]
    )
    return 0 if ok and summary["verify_rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Loads in fresh processes, as users' would be: ``python -m support.child ...``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
# A load in a fresh process takes seconds; one that hangs fails its test instead of the suite.
LOAD_TIMEOUT_S = 120


def child_env(dim: int = 32, extra: dict[str, str] | None = None) -> dict[str, str]:
    # One thread each: eight processes on two cores otherwise spin in OpenMP barriers.
    return {
        **os.environ,
        "TOY_DIM": str(dim),
        "PYTHONPATH": str(TESTS),
        "SA3LOADER_PROGRESS": "0",
        "OMP_NUM_THREADS": "1",
        **(extra or {}),
    }


def child_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "support.child", *args]


def start_child(*args: str, dim: int = 32, extra_env: dict | None = None, **kwargs) -> subprocess.Popen:
    """``support.child`` started now, its output piped."""
    return subprocess.Popen(
        child_command(*args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(dim, extra_env),
        **kwargs,
    )


def load_in_a_child(ckpt: Path, cache: Path, dim: int = 32, extra_env: dict | None = None) -> dict:
    """One toy load in a fresh process; its report (converted, cache_hit, digest)."""
    proc = subprocess.run(
        child_command("load", str(ckpt), str(cache)),
        capture_output=True,
        text=True,
        env=child_env(dim, extra_env),
        timeout=LOAD_TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def load_at_once(ckpt: Path, caches: list[Path], env: dict[str, str], dim: int) -> list[dict]:
    """One child process per cache dir, all started together; their reports, in order."""
    procs = [start_child("load", str(ckpt), str(cache), dim=dim, extra_env=env) for cache in caches]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results

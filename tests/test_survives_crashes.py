"""A conversion killed at any point leaves only complete, correct siblings, and the next load heals."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.child import digest
from support.loads import load_toy, make_ckpt, reference_digest
from support.processes import LOAD_TIMEOUT_S, fork_child, start_child
from support.siblings import resolve_sibling

import sa3loader
from sa3loader import _compare
from sa3loader._format import read_header
from sa3loader._lock import conversion_lock

BIG_DIM = 512
KILL_PHASES = ["header", "data", "fsync", "rename", "index"]

RANDOM_KILL_TRIALS = 30


def lock_is_free(sibling: Path) -> bool:
    with conversion_lock(str(sibling), timeout=0.5) as locked:
        return locked


def assert_healed(ckpt: Path, cache: Path, dim: int, expected: str | None = None) -> None:
    """``expected``: the reference digest, when the caller has it already."""
    sibling = ckpt.with_name(".cache") / "sa3loader" / "model.fp16.safetensors"
    assert lock_is_free(sibling)
    if sibling.exists():  # only a complete, correct file may have been published
        _compare.verify(read_header(ckpt), read_header(sibling))
    model = load_toy(ckpt, cache, dim=dim)
    assert digest(model) == (expected or reference_digest(ckpt, dim))
    assert sa3loader.last_load_info().sibling == str(sibling)
    assert not list(ckpt.parent.rglob("*.incomplete-*"))
    _compare.verify(read_header(ckpt), read_header(sibling))


@pytest.mark.slow
@pytest.mark.parametrize("phase", KILL_PHASES)
def test_sigkill_at_each_phase_heals(tmp_path, phase):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    proc = fork_child("kill-at", phase, str(ckpt), str(tmp_path / "cache"))
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    if phase in ("header", "data", "fsync"):
        assert list(tmp_path.rglob("*.incomplete-*"))  # the crash left its temp file behind
    assert_healed(ckpt, tmp_path / "cache", 32)


@pytest.mark.slow
def test_sigkill_at_random_points_never_leaves_a_bad_sibling(tmp_path):
    """Kill points are chosen by progress (bytes written), never by the clock: deterministic."""
    rng = random.Random(20261125)
    ckpt = make_ckpt(tmp_path / "model.safetensors", dim=BIG_DIM)
    total = resolve_sibling(read_header(ckpt), str(tmp_path / "probe")).converted.size
    (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").unlink()
    expected = reference_digest(ckpt, BIG_DIM)
    for trial, limit in enumerate(sorted(rng.randint(1, total) for _ in range(RANDOM_KILL_TRIALS))):
        cache = tmp_path / f"cache{trial}"
        proc = fork_child("kill-after", str(limit), str(ckpt), str(cache), dim=BIG_DIM)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, f"not killed after {limit} of {total} bytes"
        assert not (
            tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
        ).exists()  # nothing published mid-write
        assert_healed(ckpt, cache, BIG_DIM, expected)
        (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").unlink()


@pytest.mark.parametrize("writer", ["mapping", "pwrite"])
def test_ctrl_c_mid_write_returns_once_no_worker_runs(tmp_path, writer):
    """On CPython < 3.13 a join that Ctrl-C interrupts makes the next join return while the
    thread runs: a worker then cast into the closed mapping (SIGSEGV) or wrote through a closed
    descriptor. The load raises KeyboardInterrupt only once every worker has stopped."""
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(1_000_000), "b": torch.randn(10)}, str(ckpt))
    env = {"CHILD_WRITE_WITH_PWRITE": "1"} if writer == "pwrite" else {}
    child = start_child("interrupt-mid-write", str(ckpt), str(tmp_path / "out.safetensors"), extra_env=env)
    out, err = child.communicate(timeout=LOAD_TIMEOUT_S)
    assert child.returncode == 0, err
    assert json.loads(out.strip().splitlines()[-1]) == {
        "interrupted": True,
        "ran_after": [],
        "alive": [],
        "left": [],
    }

"""Synthetic checkpoints whose every float value differs from a model's init."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# Bit patterns that expose a sloppy cast: signed zero, NaN, infinities,
# fp16 overflow, values that flush to zero in fp16, fp16 subnormals.
SPECIAL_VALUES = [-0.0, float("nan"), float("inf"), float("-inf"), 70000.0, -1e-9, 3e-6, 6.1e-5]


def random_like_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """New values for every state-dict entry, keeping dtype and shape."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in model.state_dict().items():
        if value.is_floating_point():
            fresh = torch.randn(value.shape, generator=gen, dtype=torch.float32) * 0.5 + 0.01
            if fresh.numel() >= len(SPECIAL_VALUES):
                fresh.view(-1)[: len(SPECIAL_VALUES)] = torch.tensor(SPECIAL_VALUES)
            out[key] = fresh.to(value.dtype)
        else:
            out[key] = value.clone() + 1
    return out


def save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def first_key(state: dict[str, torch.Tensor], *, contains: str, min_numel: int = 2) -> str:
    return next(k for k, v in state.items() if contains in k and v.numel() >= min_numel)


def toy_hub_checkpoint(
    hf_home: Path, repo_id: str, revision: str, blob: str | None = None, seed: int = 3
) -> Path:
    """The toy model's checkpoint as ``hf download`` leaves it in a hub cache: a blob named
    by the sha256 of its content (unless ``blob`` names it), a snapshot symlink to it, and
    ``refs/main`` naming the revision. Another revision may be added beside. No network."""
    import hashlib
    import os

    from support.toymodel import build

    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    written = save(random_like_state(build(), seed=seed), repo / "blobs" / "incoming")
    name = blob or hashlib.sha256(written.read_bytes()).hexdigest()
    written.rename(repo / "blobs" / name)
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(repo / "blobs" / name, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot / "model.safetensors"


def settled(*paths: Path) -> None:
    """Write each file's pages out and wait until a check of it comes after its ctime's tick: then
    a load's index row may vouch for it (a check within the tick, or of a file with pages still
    to write, is racy: ``sa3loader._identity.racy``, ``sa3loader._host.unwritten_pages``)."""
    from sa3loader import _identity

    for path in paths:
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        ctime = path.stat().st_ctime_ns
        tick = _identity.RACY_WINDOW_NS if ctime % _identity.SECOND_NS == 0 else _identity.CTIME_TICK_NS
        time.sleep(max(0.0, (ctime + tick - time.time_ns()) / 1e9))

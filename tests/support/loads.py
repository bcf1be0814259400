"""The toy load, one way for every test: a seeded build of ``support.toymodel`` from a checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

import sa3loader
from support.checkpoints import random_like_state, save
from support.child import digest
from support.toymodel import build, reference


def make_ckpt(path: Path, dim: int = 32, seed: int = 3) -> Path:
    torch.manual_seed(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(random_like_state(build({"dim": dim}), seed=seed), path)


def reference_digest(path: Path, dim: int = 32) -> str:
    return digest(reference(path, config={"dim": dim}))


def load_toy(
    path: Path,
    cache: Path,
    half: bool = True,
    *,
    dim: int = 32,
    factory=build,
    published: bool = True,
    **kwargs,
):
    """The toy model as upstream's recipe seeds it (``manual_seed(0)``), loaded by sa3loader on the CPU.

    ``published``: a sibling this load converted is published before it returns, so
    that the test's next step finds the files and rows in place (tests/test_publication.py
    checks what happens before).
    """
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {"dim": dim}, path, "cpu", half, cache_dir=cache, model_factory=factory, **kwargs
    )
    if published:
        assert sa3loader.wait_for_publishing(60)
    return model

"""Quickstart: load a small SA3-shaped model twice with model_half=True.

Runs offline without stable_audio_3: the model comes from ``model_factory``.
The first load converts the fp32 checkpoint to an fp16 sibling; the second is
a cache hit. Both are checked bit for bit against fp32-load-then-cast.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import warnings

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import weight_norm

import sa3loader

warnings.filterwarnings("ignore", message=".*weight_norm.*is deprecated")


class TinySA3(nn.Module):
    """A DiT block, a weight-normed conv, a RoPE buffer: the shapes SA3 is made of."""

    def __init__(self, dim: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {"norm": nn.LayerNorm(dim), "attn": nn.Linear(dim, 3 * dim), "ff": nn.Linear(dim, dim)}
            )
            for _ in range(depth)
        )
        self.mapping = weight_norm(nn.Conv1d(dim, dim, 3))
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 64, 2).float() / 64))
        self.register_buffer("inv_freq", inv_freq)


def build(config: dict) -> TinySA3:
    return TinySA3(**config)


def main() -> None:
    config = {"dim": 256, "depth": 4}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "model.safetensors")
        torch.manual_seed(0)
        save_file({k: v + 0.25 for k, v in build(config).state_dict().items()}, ckpt)

        dynamo_before = "torch._dynamo" in sys.modules
        loads = []
        for _ in range(2):
            started = time.perf_counter()
            model = sa3loader.load_diffusion_cond(
                config, ckpt, device="cpu", model_half=True,
                cache_dir=os.path.join(tmp, "cache"), model_factory=build,
            )  # fmt: skip
            loads.append((time.perf_counter() - started, sa3loader.last_load_info()))

        first, second = loads[0][1], loads[1][1]
        print(f"checkpoint: {ckpt} ({os.path.getsize(ckpt) / 1e6:.1f} MB fp32)")
        sibling_mb = os.path.getsize(first.sibling) / 1e6
        print(
            f"first load:  converted={first.converted}, sibling {sibling_mb:.1f} MB fp16, "
            f"{loads[0][0]:.3f}s (conversion {first.timings['convert_s']:.3f}s, "
            f"build {first.timings['build_s']:.3f}s)"
        )
        print(f"second load: cache_hit={second.cache_hit}, {loads[1][0]:.3f}s, {second.build} build")
        if not dynamo_before and "torch._dynamo" in sys.modules:  # once per process, not per load
            print("(the first build imported torch._dynamo: torch's weight_norm on meta needs it)")

        reference = build(config)
        reference.load_state_dict(load_file(ckpt), strict=False)
        reference.eval().requires_grad_(False).half()
        ref_state, our_state = reference.state_dict(), model.state_dict()
        same = all(
            ref_state[k].dtype == our_state[k].dtype
            and torch.equal(ref_state[k].view(torch.uint8), our_state[k].contiguous().view(torch.uint8))
            for k in ref_state
        )
        print(f"bit-for-bit equal to fp32-load-then-cast: {same}")
        if not (first.converted and second.cache_hit and same):
            raise SystemExit("quickstart: unexpected result")


if __name__ == "__main__":
    main()

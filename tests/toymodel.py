"""A small model with the shapes of trouble real SA3 checkpoints have.

Old-style weight_norm (``weight_g``/``weight_v`` in the state dict, ``weight``
a plain attribute), a persistent RoPE ``inv_freq`` buffer, a non-persistent
float buffer, a bf16 parameter, a zero-element parameter, an int buffer, and
an encoder kept outside the module tree (as SA3's T5Gemma conditioner does).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import weight_norm


class Rope(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, dim), persistent=False)


class OutsideEncoder(nn.Module):
    """Loaded the way transformers loads T5Gemma: built on meta, weights assigned."""

    def __init__(self) -> None:
        super().__init__()
        with torch.device("meta"):
            self.embed = nn.Linear(4, 8, dtype=torch.bfloat16)
        weights = {
            "embed.weight": torch.linspace(-1, 1, 32).reshape(8, 4).to(torch.bfloat16),
            "embed.bias": torch.linspace(0, 1, 8).to(torch.bfloat16),
        }
        self.load_state_dict(weights, assign=True)
        self.requires_grad_(False)


class Conditioner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj_out = nn.Linear(8, 16)
        self.padding_embedding = nn.Parameter(torch.randn(16) * 0.02)
        self.__dict__["encoder"] = OutsideEncoder()  # not a submodule, like T5Gemma


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim * 3)
        self.ff = nn.Linear(dim, dim)
        self.rope = Rope(dim)


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.mapping = weight_norm(nn.Conv1d(dim, dim, 3))
        self.half_part = nn.Linear(dim, 4).to(torch.bfloat16)
        self.noise_scaling_factor = nn.Parameter(torch.zeros(1, 0, 1))
        self.register_buffer("step", torch.tensor([3], dtype=torch.int64))
        self.conditioner = Conditioner()


def build(config: dict | None = None) -> ToyDiT:
    config = config or {}
    return ToyDiT(dim=config.get("dim", 32), depth=config.get("depth", 2))

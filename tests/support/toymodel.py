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


def encoder_weights() -> dict[str, torch.Tensor]:
    return {
        "embed.weight": torch.linspace(-1, 1, 32).reshape(8, 4).to(torch.bfloat16),
        "embed.bias": torch.linspace(0, 1, 8).to(torch.bfloat16),
    }


class OutsideEncoder(nn.Module):
    """A text encoder loaded by a nested loader, three ways (``style``):

    - "load_state_dict": built on meta, then ``load_state_dict(assign=True)``;
    - "assign": built on meta, each weight assigned with ``setattr`` by a plain
      function, as transformers 5 places what it loads;
    - "from_pretrained": built with real init inside a ``from_pretrained`` that
      copies the weights in place, as older loaders do.
    """

    def __init__(self, on_meta: bool = True) -> None:
        super().__init__()
        with torch.device("meta" if on_meta else "cpu"):
            self.embed = nn.Linear(4, 8, dtype=torch.bfloat16)

    @classmethod
    def from_pretrained(cls) -> OutsideEncoder:
        encoder = cls(on_meta=False)
        with torch.no_grad():
            for name, value in encoder_weights().items():
                encoder.get_parameter(name).copy_(value)
        return encoder


def place_weights(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, value in weights.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, nn.Parameter(value))


def load_encoder(style: str) -> OutsideEncoder:
    if style == "from_pretrained":
        encoder = OutsideEncoder.from_pretrained()
    elif style == "assign":
        encoder = OutsideEncoder()
        place_weights(encoder, encoder_weights())
    else:
        encoder = OutsideEncoder()
        encoder.load_state_dict(encoder_weights(), assign=True)
    return encoder.requires_grad_(False)


class Conditioner(nn.Module):
    def __init__(self, encoder_style: str = "load_state_dict") -> None:
        super().__init__()
        self.proj_out = nn.Linear(8, 16)
        self.padding_embedding = nn.Parameter(torch.randn(16) * 0.02)
        self.__dict__["encoder"] = load_encoder(encoder_style)  # not a submodule, like T5Gemma


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.Linear(dim, dim * 3)
        self.ff = nn.Linear(dim, dim)
        self.rope = Rope(dim)


class ToyDiT(nn.Module):
    def __init__(self, dim: int = 32, depth: int = 2, encoder_style: str = "load_state_dict") -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.mapping = weight_norm(nn.Conv1d(dim, dim, 3))
        self.half_part = nn.Linear(dim, 4).to(torch.bfloat16)
        self.noise_scaling_factor = nn.Parameter(torch.zeros(1, 0, 1))
        self.register_buffer("step", torch.tensor([3], dtype=torch.int64))
        self.conditioner = Conditioner(encoder_style)


def reference(path, half: bool = True, config: dict | None = None) -> nn.Module:
    """Upstream's recipe for the toy model, in plain torch: seeded build, load, eval, cast."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = build(config)
    model.load_state_dict(load_file(str(path)), strict=False)
    model.eval().requires_grad_(False)
    return model.half() if half else model


def build(config: dict | None = None) -> ToyDiT:
    config = config or {}
    return ToyDiT(
        dim=config.get("dim", 32),
        depth=config.get("depth", 2),
        encoder_style=config.get("encoder_style", "load_state_dict"),
    )

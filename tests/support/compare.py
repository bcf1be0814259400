"""Bitwise comparison of tensors and models: equal bits, not equal values (-0.0, NaN)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def writable(path) -> Path:
    """Give back the owner's write bit: siblings are published read-only, and the tests
    that corrupt one on purpose must also work as a user other than root."""
    path = Path(path)
    path.chmod(path.stat().st_mode | 0o200)
    return path


def bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bytes: equal bits, not equal values (-0.0, NaN)."""
    flat = t.detach().cpu().reshape(-1)  # a one-element tensor keeps odd strides through contiguous()
    return torch.empty_like(flat, memory_format=torch.contiguous_format).copy_(flat).view(torch.uint8)


def assert_same_tensor(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert type(a) is type(b), f"{what}: {type(a).__name__} vs {type(b).__name__}"
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} vs {b.dtype}"
    assert a.device == b.device, f"{what}: device {a.device} vs {b.device}"
    assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
    assert a.stride() == b.stride(), f"{what}: strides {a.stride()} vs {b.stride()}"
    assert a.requires_grad == b.requires_grad, f"{what}: requires_grad"
    assert torch.equal(bits(a), bits(b)), f"{what}: bit patterns differ"


def assert_same_model(ours: nn.Module, ref: nn.Module, *, plain_attr_values: bool = False) -> None:
    """Same module tree, attributes, training flags, and bit-identical params and buffers."""
    ours_mods, ref_mods = dict(ours.named_modules()), dict(ref.named_modules())
    assert list(ours_mods) == list(ref_mods)
    for name, mod in ref_mods.items():
        other = ours_mods[name]
        assert type(other) is type(mod), name
        assert other.training == mod.training, f"{name}: training"
        assert set(vars(other)) == set(vars(mod)), f"{name}: attributes differ"
        assert list(other._parameters) == list(mod._parameters), name
        assert list(other._buffers) == list(mod._buffers), name
        assert other._non_persistent_buffers_set == mod._non_persistent_buffers_set, name
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor):
                mine = vars(other)[attr]
                assert mine.dtype == value.dtype and mine.device == value.device, f"{name}.{attr}"
                assert mine.shape == value.shape and not mine.is_meta, f"{name}.{attr}"
                if plain_attr_values:
                    assert_same_tensor(mine, value, f"{name}.{attr}")
            elif isinstance(value, nn.Module) and attr not in mod._modules:
                assert_same_model(vars(other)[attr], value, plain_attr_values=True)
    ours_params = dict(ours.named_parameters(remove_duplicate=False))
    for key, value in ref.named_parameters(remove_duplicate=False):
        assert_same_tensor(ours_params[key], value, key)
    ours_buffers = dict(ours.named_buffers(remove_duplicate=False))
    for key, value in ref.named_buffers(remove_duplicate=False):
        assert_same_tensor(ours_buffers[key], value, key)
    assert list(ours.state_dict()) == list(ref.state_dict())

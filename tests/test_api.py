"""The public surface: imports without upstream, typed errors, SA3LOADER_DISABLE."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from checkpoints import random_like_state, save
from conftest import assert_same_model
from safetensors.torch import load_file
from toymodel import build

import sa3loader


def test_import_needs_no_upstream():
    code = "import sys, sa3loader; assert 'stable_audio_3' not in sys.modules; print(sa3loader.__all__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


def test_missing_upstream_without_factory_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_audio_3.factory", None)  # import now fails
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    with pytest.raises(ImportError) as err:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "cache")
    assert isinstance(err.value, sa3loader.UpstreamNotFoundError)
    assert "model_factory" in str(err.value)
    assert not (tmp_path / "model.fp16.safetensors").exists()


def test_disable_env_touches_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=build
    )
    assert sa3loader.last_load_info().build == "upstream"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    torch.manual_seed(0)
    ref = build()
    ref.load_state_dict(load_file(str(ckpt)), strict=False)
    assert_same_model(model, ref.eval().requires_grad_(False).half())


def test_load_into_module_reports_skipped_keys(tmp_path):
    torch.manual_seed(0)
    state = random_like_state(build(), seed=1)
    state["unknown.key"] = torch.ones(2)
    state["half_part.bias"] = torch.ones(7)  # wrong shape
    del state["blocks.0.ff.weight"]
    ckpt = save(state, tmp_path / "model.safetensors")
    module = build()
    before = module.blocks[0].ff.weight.detach().clone()
    result = sa3loader.load_into_module(module, ckpt)
    assert result.unexpected_keys == ["unknown.key"]
    assert result.mismatched_keys == ["half_part.bias"]
    assert set(result.missing_keys) == {"blocks.0.ff.weight", "half_part.bias"}
    assert torch.equal(module.blocks[0].ff.weight, before)

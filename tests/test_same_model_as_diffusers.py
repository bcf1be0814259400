"""diffusers' ``StableAudio3DiTModel`` (what a user would pick instead of upstream's loader),
loaded through sa3loader from the fp32 file diffusers itself saved: the fast build, and
diffusers' own fp16 load bit for bit (every parameter; its buffer diffusers keeps in fp32,
where ``model.to(float16)``, upstream's cast, casts it: equal values)."""

from __future__ import annotations

import json

import pytest
import torch
from support.compare import bits

import sa3loader

diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install -e '.[test]')")

SMALL = dict(
    io_channels=8,
    embed_dim=64,
    depth=2,
    num_heads=4,
    cond_token_dim=16,
    global_cond_dim=16,
    local_add_cond_dim=9,
    timestep_features_dim=16,
    num_memory_tokens=4,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.StableAudio3DiTModel(**SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every value other than the init
    out = tmp_path_factory.mktemp("dit")
    model.save_pretrained(out)
    return out


def test_diffusers_dit_through_sa3loader_is_fast_and_diffusers_fp16_model(saved, tmp_path):
    theirs = diffusers.StableAudio3DiTModel.from_pretrained(saved, torch_dtype=torch.float16)
    config = json.loads((saved / "config.json").read_text())
    for _ in range(2):  # the conversion, then the hit
        ours = sa3loader.load_diffusion_cond(
            config,
            saved / "diffusion_pytorch_model.safetensors",
            "cpu",
            True,
            cache_dir=tmp_path / "c",
            model_factory=diffusers.StableAudio3DiTModel.from_config,
        )
        info = sa3loader.last_load_info()
        assert (info.build, info.fallback) == ("fast", None)
        mine = dict(ours.named_parameters())
        for name, value in theirs.named_parameters():
            assert mine[name].dtype == value.dtype == torch.float16, name
            assert torch.equal(bits(mine[name]), bits(value)), name
        for name, value in theirs.named_buffers():
            mine_buffer = dict(ours.named_buffers())[name]
            assert mine_buffer.dtype == torch.float16
            assert torch.equal(bits(mine_buffer), bits(value.to(torch.float16))), name
    assert info.cache_hit


class MovesTheDiTItsOwnWay(diffusers.StableAudio3DiTModel):
    def to(self, *args, **kwargs):
        self.seen_dtype = next(self.parameters()).dtype  # upstream's finish shows it fp32 weights
        return super().to(*args, **kwargs)


def _to_of_another_body(self, *args, **kwargs):
    self.seen_dtype = next(self.parameters()).dtype
    return torch.nn.Module.to(self, *args, **kwargs)


@pytest.mark.parametrize("how", ["subclass", "mixin-body-changed"])
def test_a_to_other_than_diffusers_own_as_read_takes_upstreams_build(saved, tmp_path, monkeypatch, how):
    """ModelMixin's ``to`` is trusted by identity and the names its code uses (as read, it
    reads no weight); a subclass's own ``to``, or a ModelMixin whose ``to`` is another
    function, sees fp32 weights in upstream's finish: the faithful build."""
    factory = MovesTheDiTItsOwnWay.from_config
    if how == "mixin-body-changed":
        factory = diffusers.StableAudio3DiTModel.from_config
        monkeypatch.setattr(diffusers.ModelMixin, "to", _to_of_another_body)
    config = json.loads((saved / "config.json").read_text())
    ckpt = saved / "diffusion_pytorch_model.safetensors"
    model = sa3loader.load_diffusion_cond(
        config, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory
    )
    assert sa3loader.last_load_info().build == "faithful"
    assert model.seen_dtype == torch.float32  # upstream's finish: the cast is its last step

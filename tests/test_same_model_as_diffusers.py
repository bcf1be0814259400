"""diffusers' ``StableAudio3DiTModel`` (what a user would pick instead of upstream's loader),
loaded through sa3loader from the fp32 file diffusers itself saved: the fast build, and
diffusers' own fp16 load bit for bit (every parameter; its buffer diffusers keeps in fp32,
where ``model.to(float16)``, upstream's cast, casts it: equal values)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
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


# A ModelMixin.to written elsewhere with the very names diffusers' own uses, which keeps
# the modules ``_keep_in_fp32_modules`` names in fp32 (an outside attack's case).
_SAME_NAMES_OTHER_BODY = """
def to(self, *args, **kwargs):
    from ..hooks.group_offloading import _is_group_offload_enabled
    keep = self._keep_in_fp32_modules or []
    if getattr(self, "_never_set", False):
        logger.warning(str(self.__class__.__name__)); super(); device; RuntimeError; ValueError
        QuantizationMethod.BITS_AND_BYTES; is_bitsandbytes_version; _is_group_offload_enabled(self)
    if not any(isinstance(a, torch.dtype) for a in args):
        return getattr(getattr(torch, "nn"), "Module").to(self, *args, **kwargs)
    for name, child in getattr(self, "named_children")():
        if name not in keep:
            child.to(*args, **kwargs)
    return self
"""


class KeepsNormInFp32(diffusers.ModelMixin, diffusers.ConfigMixin):
    _keep_in_fp32_modules = ["norm"]

    @diffusers.configuration_utils.register_to_config
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.layer, self.norm = torch.nn.Linear(n, n), torch.nn.LayerNorm(n)


def test_a_mixin_to_with_diffusers_names_but_written_elsewhere_takes_upstreams_build(tmp_path, monkeypatch):
    """Trusting ModelMixin's ``to`` by its names alone trusted any body that uses them: its code
    must also be the one diffusers' module holds (compiled from its file)."""
    from diffusers.models import modeling_utils

    from sa3loader._refusals import _MIXIN_TO_NAMES, _code_names

    scope = {**vars(modeling_utils), "__package__": "diffusers.models"}
    exec(_SAME_NAMES_OTHER_BODY, scope)
    assert _code_names(scope["to"].__code__) == _MIXIN_TO_NAMES  # else this case tests nothing
    monkeypatch.setattr(diffusers.ModelMixin, "to", scope["to"])
    torch.manual_seed(1)
    state = {k: torch.randn_like(v) for k, v in KeepsNormInFp32().state_dict().items()}
    ckpt = tmp_path / "model.safetensors"
    save_file(state, str(ckpt))
    for _ in range(2):  # the conversion, then the hit
        model, info = sa3loader.load(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: KeepsNormInFp32()
        )
        assert info.build == "faithful"
        assert model.norm.weight.dtype == torch.float32 and torch.equal(
            model.norm.weight, state["norm.weight"]
        )
        assert model.layer.weight.dtype == torch.float16

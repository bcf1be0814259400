"""sa3loader returns upstream's model bit for bit (real upstream source, tiny SA3 config)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from support.checkpoints import first_key, random_like_state, save
from support.compare import assert_same_model, bits
from support.late_copies import LateCopies

import sa3loader
from sa3loader import _faults
from sa3loader._io import RING_BYTES

SEED = 1234


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


def upstream_model(upstream, config, path, half, device="cpu"):
    torch.manual_seed(SEED)
    return upstream.loading_utils.load_diffusion_cond(config, str(path), device=device, model_half=half)


def ours(upstream, config, path, half, cache_dir, device="cpu", io=None):
    torch.manual_seed(SEED)
    return sa3loader.load_diffusion_cond(
        config,
        path,
        device,
        half,
        cache_dir=cache_dir,
        io=io,
        model_factory=upstream.factory.create_diffusion_cond_from_config,
    )


def tricky_checkpoint(upstream, tmp_path: Path, *, complete: bool) -> Path:
    """Every float differs from init, plus bf16/fp16/f64 tensors, remapped and unknown keys."""
    torch.manual_seed(0)
    model = upstream.factory.create_diffusion_cond_from_config(upstream.tiny_config)
    state = random_like_state(model, seed=7)
    for part, dtype in [
        ("transformer.layers.0.", torch.bfloat16),
        ("transformer.layers.1.", torch.float16),
        ("to_timestep_embed", torch.float64),
    ]:
        k = first_key(state, contains=part)
        state[k] = state[k].to(dtype)
    # Needs the remap: an extra component that dropping restores.
    k = first_key(state, contains="transformer.layers.2.")
    state[k.replace("model.model.", "model.extra.model.", 1)] = state.pop(k)
    # Two checkpoint keys that land on one model key: the later in file order wins.
    k = first_key(state, contains="transformer.layers.3.")
    state[k.replace("model.model.", "model.zz.model.", 1)] = state[k] * 2
    # Quirk: the first component is never dropped, so this stays unknown.
    k = first_key(state, contains="conditioner.")
    state["_orig_mod." + k] = state[k].clone()
    state["totally.unknown.key"] = torch.ones(3)
    # A shape mismatch on a persistent buffer (skipped; the buffer keeps its value).
    k = first_key(state, contains="inv_freq")
    state[k] = torch.ones(state[k].numel() + 1)
    if not complete:
        del state[first_key(state, contains="transformer.layers.0.", min_numel=1)]
    return save(state, tmp_path / f"model-{'complete' if complete else 'partial'}.safetensors")


@pytest.mark.parametrize(
    ("device", "io"),
    [("cpu", "mmap"), ("cpu", "read"), pytest.param("cuda", None, marks=needs_cuda)],
    ids=["cpu-mmap", "cpu-read", "cuda"],
)
@pytest.mark.parametrize("half", [True, False], ids=["half", "fp32"])
@pytest.mark.parametrize("complete", [True, False], ids=["complete", "missing-key"])
def test_same_model_as_upstream(upstream, tmp_path, half, complete, device, io, caplog):
    path = tricky_checkpoint(upstream, tmp_path, complete=complete)
    ref = upstream_model(upstream, upstream.tiny_config, path, half, device)
    rng_after_upstream = torch.random.get_rng_state()
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        model = ours(upstream, upstream.tiny_config, path, half, tmp_path / "cache", device, io)
    info = sa3loader.last_load_info()
    assert info.build == ("fast" if complete else "faithful")
    if complete:
        expected_io = "stream" if device != "cpu" else io if half else "read"  # sources are never mapped
        assert (
            info.io == expected_io and (info.bytes_mapped if expected_io == "mmap" else info.bytes_read) > 0
        )
    assert_same_model(model, ref)
    assert "totally.unknown.key" in info.result.unexpected_keys
    assert any("inv_freq" in k for k in info.result.mismatched_keys)
    assert "Key totally.unknown.key not found in target state_dict" in caplog.text
    if half:
        assert info.converted and (info.sibling is not None) == complete  # faithful: the fp32 one read
        again = ours(upstream, upstream.tiny_config, path, half, tmp_path / "cache", device, io)
        assert sa3loader.last_load_info().cache_hit
        assert_same_model(again, ref)
    else:
        assert info.sibling is None
        assert [p.name for p in tmp_path.iterdir() if "fp16" in p.name] == []
    if not complete:  # the faithful path advances the RNG exactly as upstream does
        assert torch.equal(torch.random.get_rng_state(), rng_after_upstream)


def test_weight_norm_attribute_matches_when_checkpoint_is_init(upstream, tmp_path):
    """Old-style weight_norm's plain ``weight``: upstream leaves the value computed at init.

    When the checkpoint holds the init values, ours (computed from the loaded g and v)
    is bit-identical; it stays a plain fp32 CPU tensor as upstream leaves it.
    """
    torch.manual_seed(SEED)
    init = upstream.factory.create_diffusion_cond_from_config(upstream.tiny_config)
    path = save(dict(init.state_dict()), tmp_path / "init.safetensors")
    ref = upstream_model(upstream, upstream.tiny_config, path, True)
    model = ours(upstream, upstream.tiny_config, path, True, tmp_path / "cache")
    assert sa3loader.last_load_info().build == "fast"
    assert_same_model(model, ref, plain_attr_values=True)
    mapping = model.pretransform.model.encoder.layers[0].mapping
    assert type(mapping.weight) is torch.Tensor and mapping.weight.dtype == torch.float32


def test_cuda_without_cuda_raises_like_upstream_before_converting(upstream, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    path = tricky_checkpoint(upstream, tmp_path, complete=True)
    with pytest.raises(Exception) as theirs:
        upstream.loading_utils.load_diffusion_cond(upstream.tiny_config, str(path), "cuda", True)
    with pytest.raises(type(theirs.value)):
        ours_cuda = sa3loader.load_diffusion_cond
        ours_cuda(
            upstream.tiny_config,
            path,
            "cuda",
            True,
            cache_dir=tmp_path / "cache",
            model_factory=upstream.factory.create_diffusion_cond_from_config,
        )
    assert not any("fp16" in p.name for p in tmp_path.iterdir())
    assert not os.path.exists(tmp_path / "cache")


def test_default_factory_is_upstream(upstream, tmp_path):
    path = tricky_checkpoint(upstream, tmp_path, complete=True)
    ref = upstream_model(upstream, upstream.tiny_config, path, True)
    torch.manual_seed(SEED)
    model = sa3loader.load_diffusion_cond(
        upstream.tiny_config, str(path), "cpu", True, cache_dir=tmp_path / "c"
    )
    assert_same_model(model, ref)


@pytest.mark.parametrize("copies", ["in-order", "late"])
@pytest.mark.parametrize("half", [True, False], ids=["half", "fp32"])
def test_device_streaming_path_on_the_cpu(upstream, tmp_path, half, copies, monkeypatch):
    """The path every non-CPU device takes (staging ring, device casts, NaN recast), run
    on the CPU so that CI covers it: it must give upstream's model all the same. "late":
    small ring slots whose copies land later on another thread, as a GPU's do."""
    monkeypatch.setitem(_faults.facts, "streams_to", lambda device, real: True)
    if copies == "late":  # many refills per slot, whose copies land later on another thread
        monkeypatch.setitem(_faults.facts, "device_copies", lambda device, real: LateCopies())
        monkeypatch.setitem(_faults.tunings, "ring_slot_bytes", 1 << 18)
        monkeypatch.setitem(_faults.tunings, "ring_slots", 2)
    path = tricky_checkpoint(upstream, tmp_path, complete=True)
    ref = upstream_model(upstream, upstream.tiny_config, path, half)
    for _ in range(2 if half else 1):  # conversion, then cache hit
        model = ours(upstream, upstream.tiny_config, path, half, tmp_path / "cache")
        info = sa3loader.last_load_info()
        assert (info.build, info.io) == ("fast", "stream") and info.bytes_read > 0
        assert 0 < info.staging_bytes <= RING_BYTES <= 512 * 1024 * 1024  # the bound
        assert not info.staging_pinned  # nothing to pin for on a CPU
        assert_same_model(model, ref)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_a_short_generation_gives_upstreams_audio(upstream, tmp_path, half):
    """Not only the same tensors: the same samples out of upstream's own sampler (two steps,
    about a second of audio, fixed seed), first load and cache hit."""
    from stable_audio_3.model import StableAudioModel

    torch.manual_seed(0)  # weights of the scale a trained model has, unlike the loads' own init (SEED)
    trained = upstream.factory.create_diffusion_cond_from_config(upstream.tiny_config)
    path = save(dict(trained.state_dict()), tmp_path / "model.safetensors")

    def audio(model) -> torch.Tensor:
        sampler = StableAudioModel(model, upstream.tiny_config, "cpu", half)
        return sampler.generate(
            conditioning=[{"seconds_total": 1.0}],
            duration=1.0,
            steps=2,
            seed=123,
            sample_size=upstream.tiny_config["sample_rate"],
            duration_padding_sec=0.0,
        )

    expected = audio(upstream_model(upstream, upstream.tiny_config, path, half))
    assert expected.numel() > 0 and bool(expected.isfinite().all()) and bool(expected.abs().max() > 0)
    for _ in range(2 if half else 1):  # the conversion, then the cache hit
        got = audio(ours(upstream, upstream.tiny_config, path, half, tmp_path / "cache"))
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert torch.equal(bits(got), bits(expected))


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_device_none_and_meta_give_upstreams_model(upstream, tmp_path, half):
    """``device=None`` leaves upstream's model on the CPU; ``"meta"`` gives its shapes with no data:
    the fp32 file is read as upstream's load reads it, no sibling is made, and the random state
    ends where upstream's does."""
    path = tricky_checkpoint(upstream, tmp_path, complete=True)
    ref = upstream_model(upstream, upstream.tiny_config, path, half, device=None)
    assert_same_model(ours(upstream, upstream.tiny_config, path, half, tmp_path / "cache", device=None), ref)
    skipped = sa3loader.last_load_info().result
    assert skipped.unexpected_keys  # the tricky checkpoint's unknown keys

    ref = upstream_model(upstream, upstream.tiny_config, path, half, device="meta")
    rng_after_upstream = torch.random.get_rng_state()
    model = ours(upstream, upstream.tiny_config, path, half, tmp_path / "meta-cache", device="meta")
    assert torch.equal(torch.random.get_rng_state(), rng_after_upstream)
    info = sa3loader.last_load_info()
    assert info.reason == "meta device: upstream's build and load" and info.result == skipped
    assert (info.io, info.sibling) == ("read", None) and info.bytes_read > 0
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(FileNotFoundError):  # upstream's load_file opens the file first
        upstream_model(upstream, upstream.tiny_config, missing, half, device="meta")
    with pytest.raises(FileNotFoundError):
        ours(upstream, upstream.tiny_config, missing, half, tmp_path / "meta-cache", device="meta")
    assert not (tmp_path / "meta-cache").exists()
    theirs = dict(ref.state_dict(keep_vars=True))
    mine = dict(model.state_dict(keep_vars=True))
    assert list(mine) == list(theirs)
    for key, value in theirs.items():
        got = mine[key]
        assert (got.device, got.dtype, got.shape, got.requires_grad) == (
            value.device,
            value.dtype,
            value.shape,
            value.requires_grad,
        ), key
    assert [m.training for m in model.modules()] == [m.training for m in ref.modules()]

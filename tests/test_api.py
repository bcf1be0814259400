"""The public surface: imports without upstream, typed errors, SA3LOADER_DISABLE."""

from __future__ import annotations

import os
import sys

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model, bits
from support.toymodel import build, reference

import sa3loader
from sa3loader import _faults


def test_import_needs_no_upstream():
    code = "import sys, sa3loader; assert 'stable_audio_3' not in sys.modules; print(sa3loader.__all__)"
    from support.processes import torch_zygote  # a fresh process that has imported torch only

    assert torch_zygote().run("-c", code, env=dict(os.environ), timeout=120).returncode == 0


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
    assert_same_model(model, reference(ckpt))


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


def test_io_read_never_maps_a_file(tmp_path, monkeypatch):
    """Where mappings are unreliable (SIGBUS on truncation, Windows commit limits)."""
    import mmap

    def no_mmap(*args, **kwargs):
        raise AssertionError("io='read' mapped a file")

    monkeypatch.setattr(mmap, "mmap", no_mmap)
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    for expect_hit in (False, True):
        torch.manual_seed(0)
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=build, io="read"
        )
        info = sa3loader.last_load_info()
        assert (info.cache_hit, info.build, info.io) == (expect_hit, "fast", "read")
        assert_same_model(model, reference(ckpt))


def test_io_from_environment_and_bad_values(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_IO", "read")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    assert sa3loader.last_load_info().io == "read"
    monkeypatch.setenv("SA3LOADER_IO", "")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    assert sa3loader.last_load_info().io == "mmap"
    with pytest.raises(ValueError, match="io must be one of"):
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build, io="fast"
        )


def test_nan_tensors_are_cast_again_from_the_source(tmp_path):
    """CUDA casts NaN to the canonical NaN, the CPU keeps its payload: tensors with a NaN
    are recast on the device from fp32, the others keep the sibling's bytes."""
    from sa3loader._format import read_header
    from sa3loader._values import Values

    payload_nan = torch.tensor([1.0, 2.0], dtype=torch.float32)
    payload_nan.view(torch.int32)[1] = 0x7FC12345  # a NaN with payload bits
    src = save({"nan": payload_nan, "plain": torch.tensor([3.0, 4.0])}, tmp_path / "src.safetensors")
    values = Values(read_header(src), None, half=True, io="read")
    stale = [torch.zeros(2, dtype=torch.float16), torch.zeros(2, dtype=torch.float16)]
    stale[0].view(torch.int16)[1] = 0x7FFF  # a NaN, but not the bits a cast of this source gives
    values._recast_nans_on_device(["nan", "plain"], stale, torch.device("cpu"))
    assert torch.equal(bits(stale[0]), bits(payload_nan.to(torch.float16)))
    assert torch.equal(stale[1], torch.zeros(2, dtype=torch.float16))  # no NaN: untouched


@pytest.mark.parametrize("style", ["load_state_dict", "assign", "from_pretrained"])
def test_encoder_loaded_inside_the_factory_keeps_the_fast_build(tmp_path, style):
    """What a nested loader registers carries loaded values: never deferred, loaded once."""
    from support.toymodel import OutsideEncoder

    config = {"encoder_style": style}
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(config), seed=1), tmp_path / "model.safetensors")
    calls = []
    factory = lambda cfg: calls.append(cfg) or build(cfg)  # noqa: E731
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        config, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory
    )
    assert (sa3loader.last_load_info().build, sa3loader.last_load_info().fallback) == ("fast", None)
    assert len(calls) == 1
    encoder = model.conditioner.encoder
    assert isinstance(encoder, OutsideEncoder) and "encoder" not in model.conditioner._modules
    assert_same_model(model, reference(ckpt, config=config))
    assert encoder.embed.weight.dtype == torch.bfloat16 and not encoder.embed.weight.is_meta


def test_a_load_called_from_a_from_pretrained_still_defers(tmp_path):
    """Upstream's ``StableAudioModel.from_pretrained`` calls the loader: only loaders
    running inside the factory keep their parameters, the DiT's are still placed."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")

    def from_pretrained():
        return sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, model_factory=build)

    from_pretrained()
    info = sa3loader.last_load_info()
    parameters = dict(build().named_parameters())
    placed = sum(v.nbytes for k, v in load_file(str(ckpt)).items() if k in parameters)
    assert (info.build, info.bytes_read) == ("fast", placed)


def test_a_failing_factory_stops_the_early_prefetch(tmp_path, monkeypatch):
    """The sibling is faulted in while the factory runs; a factory error stops it where it is
    (the pieces not yet started are never touched) and propagates."""
    import threading
    import time

    torch.manual_seed(0)
    ckpt = save(random_like_state(build({"dim": 256}), seed=1), tmp_path / "model.safetensors")
    sa3loader.load_diffusion_cond(
        {"dim": 256}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build
    )
    touched = []
    started = threading.Event()

    def slow_touch(name, subject=None):  # a cold disk: every piece takes a while
        if name == "touch":
            touched.append(subject)
            started.set()
            time.sleep(0.05)

    monkeypatch.setitem(_faults.tunings, "prefetch_piece_bytes", 16 * 1024)
    monkeypatch.setattr(_faults, "hook", slow_touch)

    def broken(config):
        assert started.wait(10)  # the prefetch is under way
        raise RuntimeError("factory broke")

    with pytest.raises(RuntimeError, match="factory broke"):
        sa3loader.load_diffusion_cond(
            {"dim": 256}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=broken
        )
    assert not [t for t in threading.enumerate() if t.name == "sa3loader-prefetch"]
    pieces = (tmp_path / "model.fp16.safetensors").stat().st_size // (16 * 1024)
    assert 0 < len(touched) < pieces // 2, (len(touched), pieces)


def test_range_report_warns_only_about_overflow(tmp_path, caplog):
    """Flushing tiny values to zero is normal for fp16 (INFO); overflow to inf is worth one WARNING."""
    import logging

    torch.manual_seed(0)
    state = random_like_state(build(), seed=1)
    for key, value in state.items():
        if value.is_floating_point():
            state[key] = value.float().clamp(-60000, 60000).nan_to_num(0.0, 0.0, 0.0).to(value.dtype)
    flushed_only = save(state, tmp_path / "flushed.safetensors")  # holds 3e-6, -1e-9: flushed
    caplog.set_level(logging.INFO, logger="sa3loader")
    sa3loader.load_diffusion_cond(
        {}, flushed_only, "cpu", True, cache_dir=tmp_path / "c", model_factory=build
    )
    info = sa3loader.last_load_info()
    assert info.flushed_to_zero > 0 and info.overflow_to_inf == 0
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("flushed to zero" in r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    caplog.clear()
    overflowing = save(random_like_state(build(), seed=1), tmp_path / "overflow.safetensors")  # 70000.0
    sa3loader.load_diffusion_cond({}, overflowing, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "overflow" in warnings[0], warnings


def test_parameters_missing_from_the_checkpoint_get_one_warning(tmp_path, caplog):
    import logging

    torch.manual_seed(0)
    state = random_like_state(build({"depth": 3}), seed=1)
    shallow = {k: v for k, v in state.items() if not k.startswith("blocks.2.")}
    ckpt = save(shallow, tmp_path / "model.safetensors")
    caplog.set_level(logging.WARNING, logger="sa3loader")
    sa3loader.load_diffusion_cond(
        {"depth": 3}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build
    )
    warnings = [r.getMessage() for r in caplog.records if "random init" in r.getMessage()]
    missing_params = [k for k, _ in build({"depth": 3}).named_parameters() if k.startswith("blocks.2.")]
    assert len(warnings) == 1 and f"{len(missing_params)} parameters" in warnings[0]
    assert missing_params[0] in warnings[0]


def test_timings_split_the_upstream_import_from_the_sibling(tmp_path, monkeypatch):
    """The first load imports stable_audio_3 (seconds): that is import_s, not sibling_s."""
    offset = [0.0]
    monkeypatch.setitem(_faults.facts, "clock", lambda subject, real: real + offset[0])

    def slow_import(name, subject=None):
        if name == "import":
            offset[0] += 1000.0  # a fake clock: deterministic on any machine

    monkeypatch.setattr(_faults, "hook", slow_import)
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    timings = sa3loader.last_load_info().timings
    assert timings["import_s"] >= 1000 > timings["sibling_s"]


@pytest.mark.parametrize("kind", ["zip", "pickle", "text"])
def test_other_formats_are_named_before_any_header_arithmetic(tmp_path, kind):
    import pickle

    path = tmp_path / "model.ckpt"
    if kind == "zip":
        torch.save({"w": torch.ones(2)}, str(path))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    else:
        path.write_text("this is a README, not weights\n" * 50)
    with pytest.raises(sa3loader.HeaderError, match=r"model\.ckpt: not a safetensors file") as err:
        sa3loader.load_into_module(torch.nn.Linear(2, 2), path)
    assert {"zip": "zip archive", "pickle": "pickle", "text": "text"}[kind] in str(err.value)
    assert "claims" not in str(err.value)


@pytest.mark.parametrize(
    ("device", "from_sibling"), [("cpu", True), ("cuda", True), ("mps", False), ("xpu", False)]
)
def test_the_siblings_fp16_is_final_only_where_the_device_casts_as_the_cpu_does(
    tmp_path, device, from_sibling
):
    """On other devices upstream's own cast runs there (fp32 moved, then cast): nothing assumes
    their rounding of subnormals matches the CPU's."""
    from sa3loader._format import read_header
    from sa3loader._sibling import resolve_sibling
    from sa3loader._values import Values

    src = save({"w": torch.tensor([1.0, 3e-6]), "i": torch.arange(2)}, tmp_path / "model.safetensors")
    source = read_header(src)
    sibling = resolve_sibling(source, str(tmp_path / "c")).sibling
    values = Values(source, sibling, half=True)
    target = torch.device(device)
    assert (values._as_is("w", torch.float32, target) is sibling) == from_sibling
    assert values._as_is("i", torch.int64, target) is sibling  # other dtypes: the same bytes everywhere

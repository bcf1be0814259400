"""What a load reports is the whole truth: the fp16 range report counts every finite value of
the checkpoint that the returned model holds as inf (bf16 and f64 too), a hit reports what its
conversion counted, ``last_load_info()`` is the calling thread's own load, and every loader
reads the same settings."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import random_like_state, save
from support.loads import load_toy, make_ckpt
from support.toymodel import build
from torch import nn

import sa3loader
from sa3loader import _faults

# Finite in the checkpoint, inf once the model is cast to fp16 (f64 through fp32, as upstream).
WIDE = {
    "f32": torch.tensor([7e4, -1e5, 1.0, float("inf")], dtype=torch.float32),
    "bf16": torch.tensor([1e5, -7e4, 65504.0, 2.0], dtype=torch.bfloat16),
    "f64": torch.tensor([1e6, 1e300, -1e40, 3.0, float("-inf")], dtype=torch.float64),
}


class Wide(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for name, value in WIDE.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(value.shape)))


def became_inf(ckpt, model: nn.Module) -> int:
    """Finite checkpoint values that the returned model holds as inf, counted from both."""
    params = dict(model.named_parameters())
    return sum(
        int((value.isfinite() & params[name].isinf()).sum()) for name, value in load_file(str(ckpt)).items()
    )


def test_the_range_report_counts_every_value_the_model_holds_as_inf(tmp_path, caplog):
    ckpt = save(WIDE, tmp_path / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        model = sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: Wide()
        )
    assert sa3loader.wait_for_publishing(60)
    expected = became_inf(ckpt, model)
    assert expected == 2 + 3 + 3  # 7e4, -1e5; 1e5, -7e4, 65504 (rounds up in bf16); 1e6, 1e300, -1e40
    info = sa3loader.last_load_info()
    assert info.converted and info.overflow_to_inf == expected
    assert any(f"{expected} finite values overflow fp16" in r.getMessage() for r in caplog.records)

    sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=lambda c: Wide()
    )
    hit = sa3loader.last_load_info()
    assert hit.cache_hit and hit.overflow_to_inf == expected  # what the conversion recorded


def test_last_load_info_is_the_calling_threads_own_load(tmp_path):
    """Thread A loads, then thread B, then A asks: A's load. A thread that made none (the event
    loop asking about a load run in an executor) gets the last load in the process."""
    first = make_ckpt(tmp_path / "a" / "model.safetensors")
    second = make_ckpt(tmp_path / "b" / "model.safetensors", seed=4)
    a_loaded, b_loaded = threading.Event(), threading.Event()
    seen: dict[str, str] = {}

    def a() -> None:
        load_toy(first, tmp_path / "c", False)
        a_loaded.set()
        assert b_loaded.wait(60)
        seen["a"] = sa3loader.last_load_info().source

    def b() -> None:
        assert a_loaded.wait(60)
        load_toy(second, tmp_path / "c", False)
        seen["b"] = sa3loader.last_load_info().source
        b_loaded.set()

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert seen == {"a": str(first), "b": str(second)}

    asker = {}
    waiter = threading.Thread(target=lambda: asker.setdefault("source", sa3loader.last_load_info().source))
    waiter.start()
    waiter.join()
    assert asker["source"] == str(second)


def test_the_core_load_returns_each_loads_own_report_and_the_drop_in_wraps_it(tmp_path):
    """``sa3loader.load`` gives the model load_diffusion_cond gives, with that load's LoadInfo,
    in any thread or task; the thread's ``last_load_info()`` is its last load, made either way."""
    from support.compare import assert_same_model

    ckpt = make_ckpt(tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model, info = sa3loader.load({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    assert info.converted and info.source == str(ckpt) and info.timings["total_s"] > 0
    dropped_in = load_toy(ckpt, tmp_path / "c")
    assert_same_model(model, dropped_in)
    assert sa3loader.last_load_info() is not info  # made by load(), then the drop-in's
    hit = sa3loader.last_load_info()
    assert hit.cache_hit and hit is not info
    again = sa3loader.load({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build).info
    assert sa3loader.last_load_info() is again
    other = make_ckpt(tmp_path / "other" / "model.safetensors", seed=4)
    reports = {}

    def load_in_a_thread(path):
        torch.manual_seed(0)
        reports[path] = sa3loader.load({}, path, "cpu", False, model_factory=build).info

    threads = [threading.Thread(target=load_in_a_thread, args=(p,)) for p in (ckpt, other)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert {p: r.source for p, r in reports.items()} == {ckpt: str(ckpt), other: str(other)}
    assert sa3loader.last_load_info() is again  # loads of other threads are theirs


def test_load_autoencoder_reads_the_same_settings(tmp_path, monkeypatch):
    ckpt = save({"pretransform.model.weight": torch.randn(4, 4)}, tmp_path / "model.safetensors")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"model": {}, "sample_rate": 44100}))
    monkeypatch.setenv("SA3LOADER_PIN", "0")
    monkeypatch.setenv("SA3LOADER_IO", "read")
    model = sa3loader.load_autoencoder(
        config, ckpt, "cpu", model_factory=lambda c: nn.Linear(4, 4, bias=False)
    )
    info = sa3loader.last_load_info()
    assert info.settings is not None and not info.settings.pin and info.settings.io == "read"
    assert torch.equal(model.weight, load_file(str(ckpt))["pretransform.model.weight"])


@pytest.mark.parametrize("loader", ["diffusion", "autoencoder"])
def test_a_disabled_load_says_why_and_how_long(tmp_path, monkeypatch, loader):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    if loader == "diffusion":
        load_toy(ckpt, tmp_path / "c")
    else:
        config = tmp_path / "config.json"
        config.write_text("{}")
        sa3loader.load_autoencoder(config, ckpt, "cpu", model_factory=lambda c: nn.Linear(4, 4))
    info = sa3loader.last_load_info()
    assert info.build == "upstream" and "SA3LOADER_DISABLE=1" in info.reason
    assert info.timings["total_s"] > 0 and info.settings is not None and info.settings.disabled
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


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


class LoadsItsOwnWay(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.inner = build(config)

    def _load_from_state_dict(self, *args, **kwargs):  # the fast build is refused for it
        return super()._load_from_state_dict(*args, **kwargs)


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
@pytest.mark.parametrize("io", ["mmap", "read"])
def test_a_faithful_build_reports_the_checkpoint_read_not_the_sibling(tmp_path, half, io):
    """Upstream's build reads the fp32 checkpoint (the sibling found is not read): no sibling,
    plain reads, and the bytes of every tensor it read."""
    state = {f"inner.{k}": v for k, v in random_like_state(build({}), seed=3).items()}
    ckpt = save(state, tmp_path / "model.safetensors")
    for _ in range(2 if half else 1):  # the conversion, then the hit
        model, info = sa3loader.load(
            {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=LoadsItsOwnWay, io=io
        )
        assert info.build == "faithful" and info.cache_hit == (half and not info.converted)
        assert (info.sibling, info.io, info.bytes_mapped) == (None, "read", 0)
        assert info.bytes_read == sum(v.numel() * v.element_size() for v in load_file(str(ckpt)).values())


def test_each_loader_reports_the_timings_its_docstring_lists(tmp_path, monkeypatch):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    config = tmp_path / "model_config.json"
    config.write_text("{}")
    sa3loader.load_autoencoder(config, ckpt, "cpu", model_factory=build)
    assert set(sa3loader.last_load_info().timings) == {"build_s", "read_s", "total_s"}
    sa3loader.load_diffusion_cond({}, ckpt, "meta", True, cache_dir=tmp_path / "c", model_factory=build)
    assert set(sa3loader.last_load_info().timings) == {"import_s", "total_s"}
    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    assert set(sa3loader.last_load_info().timings) == {"total_s"}


class KeepsATransposedWeight(nn.Module):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.empty(64, 32).t())  # strides (1, 32): placed as a copy
        self.c = nn.Parameter(torch.empty(32, 64))
        self.register_buffer("steps", torch.zeros(8, dtype=torch.int64))
        if config.get("drawn"):
            self.register_buffer("noise", torch.randn(4))  # a kept draw: upstream's build


@pytest.mark.parametrize("io", ["mmap", "read"])
def test_bytes_read_and_mapped_say_where_each_placed_tensor_came_from(tmp_path, io):
    """A view of the sibling's mapping counts as mapped; a copy placed instead (another
    layout) as read; buffers count as parameters do; either build reads the same bytes."""
    state = {"t": torch.randn(32, 64), "c": torch.randn(32, 64), "steps": torch.arange(8)}
    ckpt = save(state, tmp_path / "model.safetensors")
    t_bytes, c_bytes, steps_bytes = 32 * 64 * 2, 32 * 64 * 2, 8 * 8
    for _ in range(2):  # the conversion, then the hit
        info = sa3loader.load(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=KeepsATransposedWeight, io=io
        ).info
        assert info.build == "fast"
        mapped = c_bytes if io == "mmap" else 0  # a buffer is copied into the one built: read
        assert (info.bytes_mapped, info.bytes_read) == (mapped, t_bytes + c_bytes + steps_bytes - mapped)
    fp32 = sa3loader.load({}, ckpt, "cpu", False, model_factory=KeepsATransposedWeight).info
    drawn = sa3loader.load({"drawn": 1}, ckpt, "cpu", False, model_factory=KeepsATransposedWeight).info
    assert (fp32.build, drawn.build) == ("fast", "faithful")
    assert fp32.bytes_read == drawn.bytes_read == sum(v.nbytes for v in state.values())


def test_a_load_that_fails_leaves_the_last_report_as_it_was(tmp_path):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "c")
    before = sa3loader.last_load_info()
    with pytest.raises(sa3loader.CheckpointNotFoundError):
        sa3loader.load_autoencoder(tmp_path / "missing.json", ckpt, "cpu", model_factory=build)
    with pytest.raises(sa3loader.CheckpointNotFoundError):
        sa3loader.load_diffusion_cond({}, tmp_path / "missing.safetensors", "cpu", True, model_factory=build)
    assert sa3loader.last_load_info() is before


def test_a_tied_parameter_saved_under_one_name_is_not_said_to_keep_its_random_init(tmp_path, caplog):
    """A head tied to the embedding, saved once (safetensors' ``save_model`` keeps one name): the
    other name is the same, loaded parameter, not one that keeps its random init (an attack)."""
    import logging

    from torch import nn

    def tied(config):
        model = nn.Module()
        model.emb, model.out = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        model.out.weight = model.emb.weight
        model.extra = nn.Parameter(torch.zeros(2))
        return model

    ckpt = save({"emb.weight": torch.ones(10, 4)}, tmp_path / "model.safetensors")
    caplog.set_level(logging.WARNING, logger="sa3loader")
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=tied
    )
    assert model.out.weight is model.emb.weight and bool((model.out.weight == 1).all())
    warnings = [r.getMessage() for r in caplog.records if "random init" in r.getMessage()]
    assert len(warnings) == 1 and "1 parameters" in warnings[0] and "(extra)" in warnings[0], warnings
    caplog.clear()  # neither name in the checkpoint: both said, one parameter counted
    ckpt = save({"extra": torch.ones(2)}, tmp_path / "neither.safetensors")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, cache_dir=tmp_path / "c", model_factory=tied)
    warnings = [r.getMessage() for r in caplog.records if "random init" in r.getMessage()]
    assert len(warnings) == 1 and "1 parameters" in warnings[0], warnings
    assert "(emb.weight, out.weight)" in warnings[0], warnings

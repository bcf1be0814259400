"""One load, one file: every read of a load goes through the descriptor whose header it parsed.

A checkpoint republished by path during a load (temp file + ``os.replace``, as
trainers publish) never mixes into it: the model is exactly the version that
was opened. A checkpoint rewritten in place during a load is a typed error.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load as safetensors_load
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model, bits
from support.faults import at, faked, injected
from support.loads import load_toy, make_ckpt
from support.memory import mapped_files
from support.toymodel import build, reference

import sa3loader
from sa3loader import _faults
from sa3loader._format import read_header

needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="no /proc/self/maps")


class WithHalfWeights(torch.nn.Module):
    """A parameter stored as F16 in the checkpoint: taken as is by a model_half=True hit."""

    def __init__(self) -> None:
        super().__init__()
        self.fp16 = torch.nn.Linear(64, 64).half()
        self.fp32 = torch.nn.Linear(64, 64)


def versions(tmp_path):
    """The checkpoint (v1, and a copy for the reference) and a v2 with other values and offsets."""
    torch.manual_seed(0)
    v1 = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    shutil.copyfile(v1, tmp_path / "v1-copy.safetensors")
    # Metadata makes v2's header longer: read at v1's offsets, every tensor would be garbage.
    v2 = save(random_like_state(build(), seed=4), tmp_path / "v2.safetensors", metadata={"pad": "x" * 999})
    return v1, v2, tmp_path / "v1-copy.safetensors"


def republish(new, path) -> None:
    """What a trainer does: write elsewhere, then rename over the published name."""
    staged = f"{path}.tmp"
    shutil.copyfile(new, staged)
    os.replace(staged, path)


@pytest.mark.parametrize("when", ["fp32", "first-load", "hit"])
def test_a_checkpoint_republished_during_a_load_gives_the_version_opened(tmp_path, when):
    v1, v2, v1_copy = versions(tmp_path)
    half = when != "fp32"
    if when == "hit":
        load_toy(v1, tmp_path / "cache", half)

    def republishing_factory(config):
        republish(v2, v1)
        return build(config)

    if when == "first-load":  # between the sibling's conversion and the buffers read from the source
        with injected(at("index", lambda: republish(v2, v1))):
            model = load_toy(v1, tmp_path / "cache", half)
        assert sa3loader.last_load_info().converted
    else:
        model = load_toy(v1, tmp_path / "cache", half, factory=republishing_factory)
    assert_same_model(model, reference(v1_copy, half))


def test_load_into_module_and_load_autoencoder_read_one_file(tmp_path, monkeypatch):
    v1, v2, v1_copy = versions(tmp_path)
    monkeypatch.setattr(_faults, "hook", at("planned", lambda: republish(v2, v1)))
    torch.manual_seed(0)
    model = build()
    sa3loader.load_into_module(model, v1)
    assert_same_model(model.eval().requires_grad_(False), reference(v1_copy, half=False))

    republish(v1_copy, v1)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({}))
    torch.manual_seed(0)
    autoencoder = sa3loader.load_autoencoder(config, v1, "cpu", model_factory=build)
    assert_same_model(autoencoder.eval().requires_grad_(False), reference(v1_copy, half=False))


@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_a_checkpoint_rewritten_in_place_during_a_load_is_a_typed_error(tmp_path, half):
    """``cp new old`` or ``open(old, "r+b")`` during a load: no version is whole, so it says so."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    same_layout = save(random_like_state(build(), seed=4), tmp_path / "same-layout.safetensors")
    assert os.path.getsize(same_layout) == os.path.getsize(ckpt)
    if half:
        load_toy(ckpt, tmp_path / "cache", half)

    def rewriting_factory(config):
        with open(ckpt, "r+b") as f:
            f.write(same_layout.read_bytes())
        return build(config)

    with pytest.raises(sa3loader.CheckpointChangedError, match="rewritten while it was being read") as err:
        load_toy(ckpt, tmp_path / "cache", half, factory=rewriting_factory)
    assert isinstance(err.value, OSError) and err.value.filename == str(ckpt)


@pytest.mark.parametrize("link", [None, "added", "one of two removed"])
def test_a_rewrite_that_sets_the_mtime_back_during_a_conversion_is_a_typed_error(tmp_path, link):
    """Only the ctime moves (size, mtime and header kept): the converted sibling may mix two
    versions while claiming the first's fingerprint, so the load fails and publishes nothing;
    back at the first version, the next load converts it whole. A hard link added or taken
    away meanwhile (the name kept) moves the ctime too: it hides nothing."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    first = ckpt.read_bytes()
    other = save(random_like_state(build(), seed=4), tmp_path / "other.safetensors").read_bytes()
    assert len(other) == len(first)
    backup = tmp_path / "backup.safetensors"
    if link == "one of two removed":
        os.link(ckpt, backup)
    stamp = ckpt.stat()

    def rewrite(content: bytes) -> None:
        with open(ckpt, "r+b") as f:
            f.write(content)
        os.utime(ckpt, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
        if link == "added" and not backup.exists():
            os.link(ckpt, backup)
        elif link == "one of two removed" and backup.exists():
            backup.unlink()

    with (
        # The rewrite runs in the converting thread: under the source's read lease its open would
        # wait for the lease-break time (test_source_lease.py holds the lease's own rules).
        faked(source_lease=lambda path, real: False),
        injected(at("data", lambda: rewrite(other))),
        pytest.raises(sa3loader.CheckpointChangedError, match="rewritten while it was being read"),
    ):
        load_toy(ckpt, tmp_path / "cache")
    rewrite(first)
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def test_mutating_a_loaded_parameter_leaves_the_sibling_unchanged(ckpt, tmp_path):
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    before = sibling.read_bytes()
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert sibling.read_bytes() == before


@needs_proc_maps
@pytest.mark.parametrize("how", ["fp32", "hit", "load_into_module"])
def test_a_rewrite_of_the_checkpoint_never_changes_a_loaded_model(tmp_path, how):
    """The user's checkpoint is read, never mapped: an in-place rewrite (cp over it, r+b) or a
    truncation after the load leaves the model as loaded (a mapping would change or SIGBUS)."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(WithHalfWeights(), seed=3), tmp_path / "model.safetensors")
    factory = lambda config: WithHalfWeights()  # noqa: E731
    half = how == "hit"
    if how == "load_into_module":
        model = WithHalfWeights()
        sa3loader.load_into_module(model, ckpt)
    else:
        for _ in range(2):  # conversion, then the hit
            model = sa3loader.load_diffusion_cond(
                {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=factory
            )
    expected = {k: v.half() if half else v for k, v in safetensors_load(ckpt.read_bytes()).items()}
    assert str(ckpt) not in mapped_files()
    with open(ckpt, "r+b") as f:  # what training jobs and `cp new old` do
        f.seek(read_header(ckpt).data_start)
        f.write(b"\x7f" * (os.path.getsize(ckpt) - read_header(ckpt).data_start))
    os.truncate(ckpt, 1000)
    for key, value in model.state_dict().items():
        assert torch.equal(bits(value), bits(expected[key])), key


@pytest.mark.parametrize("io", ["mmap", "read"])
def test_a_sibling_rewritten_in_place_by_root_changes_only_a_mapped_model(tmp_path, io):
    """docs/deploying.md: root writes the read-only sibling anyway (a ``cp -r`` of a new model
    over a served folder): a model that maps it sees the new weights; ``io="read"`` keeps its own."""
    torch.manual_seed(0)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "a" / "model.safetensors")
    other = save(random_like_state(build(), seed=4), tmp_path / "b" / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache")
    load_toy(other, tmp_path / "cache")
    model = load_toy(ckpt, tmp_path / "cache", io=io)
    assert sa3loader.last_load_info().cache_hit and sa3loader.last_load_info().io == io
    served, incoming = (p.parent / ".cache" / "sa3loader" / "model.fp16.safetensors" for p in (ckpt, other))
    assert os.path.getsize(served) == os.path.getsize(incoming)
    if os.geteuid() != 0:
        os.chmod(served, 0o600)  # what root's open ignores
    with open(served, "r+b") as f:  # cp's O_TRUNC-less case: same size, written over
        f.write(incoming.read_bytes())
    mine, theirs = reference(ckpt), reference(other)
    key = next(k for k, v in mine.state_dict().items() if v.is_floating_point() and v.numel() > 1)
    now = bits(model.state_dict()[key])
    assert torch.equal(now, bits((theirs if io == "mmap" else mine).state_dict()[key]))


@needs_proc_maps
def test_a_hit_maps_only_its_own_read_only_sibling(open_tmp):
    ckpt = make_ckpt(open_tmp / "model.safetensors")
    os.chmod(ckpt, 0o640)
    load_toy(ckpt, open_tmp / "cache")
    model = load_toy(ckpt, open_tmp / "cache")
    sibling = open_tmp / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert sa3loader.last_load_info().io == "mmap"
    assert str(sibling) in mapped_files() and str(ckpt) not in mapped_files()
    assert os.stat(sibling).st_mode & 0o777 == 0o440  # the source's mode minus every write bit
    del model


@needs_proc_maps
def test_one_kept_parameter_keeps_the_whole_sibling_mapped_and_a_clone_does_not(ckpt, tmp_path):
    """design.md: every mapped weight is a view of one mapping of the whole sibling."""
    import gc

    load_toy(ckpt, tmp_path / "cache")
    sibling = str(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors")
    model = load_toy(ckpt, tmp_path / "cache")
    kept = next(p for p in model.parameters() if p.numel() > 1)
    cloned = next(p for p in model.parameters() if p.numel() > 1).clone()
    del model
    gc.collect()
    assert sibling in mapped_files()  # the one parameter holds the whole mapping
    del kept
    gc.collect()
    assert sibling not in mapped_files() and cloned.numel() > 1


def test_a_rewrite_between_the_open_and_the_fingerprint_read_is_a_typed_error_on_a_hit(tmp_path):
    """The checkpoint at rest holds v1 where the row says v2 (rewritten in place, its mtime set
    back: only the ctime moved), so the hit reads the fingerprint again; a writer puts v2 back
    in place just before that read. The fingerprint then vouches for v2's sibling, though the
    load opened v1: the end check (the ctime moved) must fail the load. A skip of that check on
    hits that read only their sibling returned v2 without a word (30 of 60 races)."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(WithHalfWeights(), seed=4), tmp_path / "model.safetensors")
    v2 = ckpt.read_bytes()
    v1 = save(random_like_state(WithHalfWeights(), seed=3), tmp_path / "v1.safetensors").read_bytes()
    assert len(v1) == len(v2)
    hour_ago = ckpt.stat().st_mtime_ns - 3600 * 10**9
    os.utime(ckpt, ns=(hour_ago, hour_ago))  # out of the racy window

    def write(content: bytes) -> None:
        with open(ckpt, "r+b") as f:
            f.write(content)
        os.utime(ckpt, ns=(hour_ago, hour_ago))

    factory = lambda config: WithHalfWeights()  # noqa: E731
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory)
    write(v1)
    put_back = at("spots", lambda: write(v2))
    with injected(put_back), pytest.raises(sa3loader.CheckpointChangedError):
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=factory)

"""Hostile or odd checkpoints fail clearly, allocate nothing from the numbers they claim, and write
nothing.
"""

from __future__ import annotations

import pytest
from support.child import digest
from support.loads import load_toy, make_ckpt, reference_digest
from support.memory import rss_anon

import sa3loader


@pytest.mark.parametrize(
    "raw",
    [
        (2**64 - 1).to_bytes(8, "little") + b"{}",
        (50_000_000).to_bytes(8, "little") + b"{",
        b"",
        (2).to_bytes(8, "little") + b"{}" + b"\0" * 3,
    ],
    ids=["length-2^64", "length-past-eof", "empty", "data-without-tensors"],
)
def test_hostile_checkpoint_fails_clearly_and_writes_nothing(tmp_path, raw):
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(raw)
    before = rss_anon()
    with pytest.raises(sa3loader.HeaderError) as err:
        load_toy(ckpt, tmp_path / "cache")
    assert rss_anon() - before < 50 * 1024 * 1024
    assert str(ckpt) in str(err.value) and isinstance(err.value, ValueError)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("name", ["dir with spaces/model.safetensors", "müsik ☃/モデル.safetensors"])
def test_odd_paths_load_normally(tmp_path, name):
    ckpt = make_ckpt(tmp_path / name)
    for _ in range(2):
        model = load_toy(ckpt, tmp_path / "cache")
        assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().cache_hit


def test_missing_checkpoint_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_toy(tmp_path / "nope.safetensors", tmp_path / "cache")
    with pytest.raises(IsADirectoryError):
        load_toy(tmp_path, tmp_path / "cache")

"""The released pipeline, real parts: upstream's ``t5gemma`` conditioner loads a T5Gemma
encoder with transformers, from an offline hub cache, inside the factory.

Every load runs in a fresh process (``support/real_pipeline_child.py``), as a user's would,
and is described by the SHA-256 of every tensor's bytes, flags, the encoder kept
outside the module tree, the tokenizer's output and the prompt embeddings. Ours must
equal upstream's, take the fast build, and load the text encoder exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the real T5Gemma conditioner needs transformers (test extras)")

from support.hub_fixture import hf_env  # noqa: E402
from support.processes import TESTS  # noqa: E402

pytestmark = pytest.mark.slow


def run_child(hf_home: Path, *args: str) -> dict:
    env = {**os.environ, **hf_env(hf_home), "SA3LOADER_PROGRESS": "0", "PYTHONPATH": str(TESTS)}
    command = [sys.executable, "-m", "support.real_pipeline_child", *args]
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and (lines or args[0] == "setup"), proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


def hub(tmp_path_factory: pytest.TempPathFactory, upstream, size: str) -> Path:
    hf_home = tmp_path_factory.mktemp(f"hf-{size}")
    run_child(hf_home, "setup", str(hf_home), size)
    return hf_home


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory, upstream) -> Path:
    return hub(tmp_path_factory, upstream, "small")


def assert_same_description(ours: dict, ref: dict) -> None:
    """Equal descriptions; on a difference, name the first few tensors or modules that differ."""
    for part in ("model", "prompt"):
        if ours[part] == ref[part]:
            continue
        differing = []
        for section, ref_items in ref[part].items():
            mine = ours[part].get(section)
            if isinstance(ref_items, dict) and isinstance(mine, dict):
                differing += [f"{section}:{k}" for k in ref_items if mine.get(k) != ref_items[k]]
                differing += [f"{section}:{k} (extra)" for k in mine if k not in ref_items]
            elif mine != ref_items:
                differing.append(section)
        raise AssertionError(f"{part} differs from upstream at {differing[:8]}")


def assert_fast_and_encoder_once(result: dict, *, cache_hit: bool, half: bool) -> None:
    info = result["info"]
    assert (info["build"], info["fallback"]) == ("fast", None)
    assert info["bytes_read"] + info["bytes_mapped"] > 0, "the fast build placed no weight from the file"
    assert (info["cache_hit"], info["converted"]) == (cache_hit, half and not cache_hit)
    assert result["encoder_loads"] == 1


@pytest.mark.parametrize("half", [True, False], ids=["half", "fp32"])
def test_load_diffusion_cond_matches_upstream(small_hub, tmp_path, half):
    mode = "half" if half else "fp32"
    ref = run_child(small_hub, "upstream", mode, str(tmp_path / "unused"))
    assert ref["encoder_loads"] == 1
    assert ref["model"]["outside"], "the encoder must sit outside the module tree"
    for cache_hit in (False, True):  # first load (converts when half), then the cache hit
        ours = run_child(small_hub, "sa3loader", mode, str(tmp_path / "cache"))
        assert_fast_and_encoder_once(ours, cache_hit=cache_hit and half, half=half)
        assert_same_description(ours, ref)


def test_from_pretrained_with_install_matches_upstream(small_hub, tmp_path):
    """Without CUDA upstream's ``from_pretrained`` forces model_half=False: the fp32 path."""
    ref = run_child(small_hub, "upstream-pretrained", "half", str(tmp_path / "unused"))
    for _ in range(2):
        ours = run_child(small_hub, "sa3loader-pretrained", "half", str(tmp_path / "cache"))
        assert not ours["info"]["model_half"]
        assert_fast_and_encoder_once(ours, cache_hit=False, half=False)
        assert_same_description(ours, ref)


def test_released_encoder_size(tmp_path_factory, upstream, tmp_path):
    """The b-b encoder (hidden 768, 12 layers, vocab 256000): first load and cache hit, fp16."""
    hf_home = hub(tmp_path_factory, upstream, "b-b")
    ref = run_child(hf_home, "upstream", "half", str(tmp_path / "unused"))
    for cache_hit in (False, True):
        ours = run_child(hf_home, "sa3loader", "half", str(tmp_path / "cache"))
        assert_fast_and_encoder_once(ours, cache_hit=cache_hit, half=True)
        assert_same_description(ours, ref)

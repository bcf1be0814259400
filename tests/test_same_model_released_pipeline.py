"""The released pipeline, real parts: upstream's ``t5gemma`` conditioner loads a T5Gemma
encoder with transformers, from an offline hub cache, inside the factory.

Every load runs in a fresh process (``support/real_pipeline_child.py``, forked from a
zygote that has imported torch, transformers and upstream), as a user's would,
and is described by the SHA-256 of every tensor's bytes, flags, the encoder kept
outside the module tree, the tokenizer's output and the prompt embeddings. Ours must
equal upstream's, take the fast build, and load the text encoder exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the real T5Gemma conditioner needs transformers (test extras)")

from support.hub_fixture import hf_env  # noqa: E402
from support.processes import TESTS, Zygote  # noqa: E402

pytestmark = pytest.mark.slow


CHILD = "support.real_pipeline_child"
CHILD_TIMEOUT_S = 600


class Hub:
    """An offline hub cache, and a zygote to fork fresh processes that load from it."""

    def __init__(self, hf_home: Path, zygote: Zygote) -> None:
        self.hf_home, self.zygote = hf_home, zygote
        self.env = {**os.environ, **hf_env(hf_home), "SA3LOADER_PROGRESS": "0", "PYTHONPATH": str(TESTS)}

    def run(self, *args: str) -> dict:
        """One ``real_pipeline_child`` run in a fresh process; the RESULT it printed."""
        proc = self.zygote.run(CHILD, *args, env=self.env, timeout=CHILD_TIMEOUT_S)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        assert proc.returncode == 0 and (lines or args[0] == "setup"), proc.stderr[-4000:]
        return json.loads(lines[-1][len("RESULT ") :]) if lines else {}


@contextlib.contextmanager
def hub(tmp_path_factory: pytest.TempPathFactory, size: str) -> Iterator[Hub]:
    hf_home = tmp_path_factory.mktemp(f"hf-{size}")
    # huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported: the zygote imports under them.
    env = {**os.environ, **hf_env(hf_home), "PYTHONPATH": str(TESTS)}
    with Zygote([f"{CHILD}:preload"], env) as zygote:
        built = Hub(hf_home, zygote)
        built.run("setup", str(hf_home), size)
        yield built


@pytest.fixture(scope="module")
def small_hub(tmp_path_factory, upstream) -> Iterator[Hub]:
    with hub(tmp_path_factory, "small") as built:
        yield built


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
    ref = small_hub.run("upstream", mode, str(tmp_path / "unused"))
    assert ref["encoder_loads"] == 1
    assert ref["model"]["outside"], "the encoder must sit outside the module tree"
    for cache_hit in (False, True):  # first load (converts when half), then the cache hit
        ours = small_hub.run("sa3loader", mode, str(tmp_path / "cache"))
        assert_fast_and_encoder_once(ours, cache_hit=cache_hit and half, half=half)
        assert_same_description(ours, ref)


def test_from_pretrained_with_install_matches_upstream(small_hub, tmp_path):
    """Without CUDA upstream's ``from_pretrained`` forces model_half=False: the fp32 path."""
    ref = small_hub.run("upstream-pretrained", "half", str(tmp_path / "unused"))
    for _ in range(2):
        ours = small_hub.run("sa3loader-pretrained", "half", str(tmp_path / "cache"))
        assert not ours["info"]["model_half"]
        assert_fast_and_encoder_once(ours, cache_hit=False, half=False)
        assert_same_description(ours, ref)


def test_released_encoder_size(tmp_path_factory, upstream, tmp_path):
    """The b-b encoder (hidden 768, 12 layers, vocab 256000): first load and cache hit, fp16.
    Every tensor's bits and the tokenizer's output; the embeddings are checked at the small size."""
    with hub(tmp_path_factory, "b-b") as released:
        ref = released.run("upstream", "half", str(tmp_path / "unused"), "no-embeddings")
        for cache_hit in (False, True):
            ours = released.run("sa3loader", "half", str(tmp_path / "cache"), "no-embeddings")
            assert_fast_and_encoder_once(ours, cache_hit=cache_hit, half=True)
            assert_same_description(ours, ref)

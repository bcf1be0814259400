"""Shared fixtures: the upstream source, synthetic checkpoints, bitwise model comparison."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import tempfile
import types
from pathlib import Path

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.toymodel import build
from support.upstream_env import DEFAULT_UPSTREAM, UPSTREAM_ENV, find_upstream, import_upstream

import sa3loader


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raises KeyboardInterrupt here, as in a terminal, even where the suite was started
    in the background (a shell starts those with SIGINT ignored)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the warnings sa3loader gives once per process."""
    from sa3loader import _config

    _config.ONCE.forget()


@pytest.fixture
def conversions():
    """The destination of every real conversion, in order."""
    from support.faults import injected

    calls: list[str] = []
    with injected(lambda name, subject=None: calls.append(subject) if name == "convert" else None):
        yield calls


class Upstream(types.SimpleNamespace):
    root: Path
    loading_utils: types.ModuleType
    factory: types.ModuleType
    tiny_config: dict


@pytest.fixture(scope="session")
def upstream() -> Upstream:
    root = find_upstream()
    if root is None:
        pytest.skip(
            f"upstream stable_audio_3 source not found at {os.environ.get(UPSTREAM_ENV) or DEFAULT_UPSTREAM} "
            f"(set ${UPSTREAM_ENV} to the folder holding its stable-audio-3/ and configs/tiny_sa3.json)"
        )
    factory = import_upstream(root)
    loading_utils = importlib.import_module("stable_audio_3.loading_utils")
    tiny = json.loads((root / "configs" / "tiny_sa3.json").read_text())
    return Upstream(root=root, loading_utils=loading_utils, factory=factory, tiny_config=tiny)


@pytest.fixture(autouse=True)
def publications_finish():
    """A sibling a test's first load converted is published before the next test starts."""
    yield

    assert sa3loader.wait_for_publishing(60), "a sibling was still being published after 60 s"


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    return save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")


@pytest.fixture
def open_tmp():
    """A folder every user can traverse: pytest's ``tmp_path`` lies in a folder only its owner
    may enter, so a sibling made there is for that owner alone (``_trust.readers_bits``)."""
    root = Path(tempfile.mkdtemp(prefix="sa3loader-open-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)

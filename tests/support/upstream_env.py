"""Importing the upstream stable_audio_3 source offline (tests and benchmarks).

- ``find_upstream``: $SA3LOADER_UPSTREAM, else ``../shared/upstream`` beside the repo.
- ``install_torchaudio_standin``: PyPI has no torchaudio for torch 2.13 CPU, and
  building SA3 models never calls it; a clearly named stand-in fills the import.
- ``install_t5gemma_standin``: the real ``t5gemma`` conditioner downloads T5Gemma in
  its constructor. The stand-in builds only what the real one puts in the state
  dict (the ``Conditioner`` base: ``proj_out`` and, for ``padding_mode="learned"``,
  ``padding_embedding``), so the released medium config builds offline.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
UPSTREAM_ENV = "SA3LOADER_UPSTREAM"
DEFAULT_UPSTREAM = REPO_ROOT.parent / "shared" / "upstream"
T5GEMMA_DIM = 768


def find_upstream() -> Path | None:
    """The folder holding ``stable-audio-3/`` and ``configs/tiny_sa3.json`` (the tests' config:
    a folder without it is skipped, not an error); $SA3LOADER_UPSTREAM may name either."""
    candidate = Path(os.environ.get(UPSTREAM_ENV) or DEFAULT_UPSTREAM)
    for root in (candidate, candidate.parent):
        package = root / "stable-audio-3" / "stable_audio_3" / "loading_utils.py"
        if package.is_file() and (root / "configs" / "tiny_sa3.json").is_file():
            return root
    return None


def install_torchaudio_standin() -> None:
    try:
        importlib.import_module("torchaudio")
        return
    except Exception:
        pass

    class ResampleStandIn:
        def __init__(self, *args: object, **kwargs: object) -> None:
            raise RuntimeError("torchaudio stand-in (tests only): Resample is not available")

    module = types.ModuleType("torchaudio")
    transforms = types.ModuleType("torchaudio.transforms")
    # transformers asks importlib.util.find_spec, which needs a spec on a module in sys.modules.
    module.__spec__ = importlib.machinery.ModuleSpec("torchaudio", None)
    transforms.__spec__ = importlib.machinery.ModuleSpec("torchaudio.transforms", None)
    transforms.Resample = ResampleStandIn  # type: ignore[attr-defined]
    module.transforms = transforms  # type: ignore[attr-defined]
    sys.modules["torchaudio"] = module
    sys.modules["torchaudio.transforms"] = transforms


def import_upstream(root: Path) -> types.ModuleType:
    """Put the upstream source on sys.path and return ``stable_audio_3.factory``."""
    source = str(root / "stable-audio-3")
    if source not in sys.path:
        sys.path.insert(0, source)
    install_torchaudio_standin()
    return importlib.import_module("stable_audio_3.factory")


def install_t5gemma_standin(factory: types.ModuleType) -> None:
    from stable_audio_3.models.conditioners import Conditioner

    class T5GemmaStandIn(Conditioner):
        """Offline stand-in: the real conditioner's state-dict share, no encoder."""

        def __init__(
            self,
            output_dim,
            model_name="google/t5gemma-b-b-ul2",
            max_length=128,
            enable_grad=False,
            project_out=False,
            padding_mode="zero",
            model_path=None,
            repo_id=None,
            subfolder=None,
        ):
            super().__init__(T5GEMMA_DIM, output_dim, project_out=project_out, padding_mode=padding_mode)
            self.max_length = max_length
            self.enable_grad = enable_grad

    factory.T5GemmaConditioner = T5GemmaStandIn

"""An offline Hugging Face hub cache serving SA3 the way the released models are served.

``write_hub`` lays out ``HF_HOME/hub/models--<org>--<name>/{refs/main, snapshots/<rev>/…,
blobs/…}`` (snapshot files are symlinks to blobs, as huggingface_hub writes them) for
the small-music repo id that upstream's ``model_configs`` uses: the SA3 config and its
fp32 checkpoint at the top, and the T5Gemma text encoder in ``t5gemma-b-b-ul2/`` (an
encoder-decoder config, random bf16 weights, a small fast tokenizer built with
``tokenizers``), which the released configs point the ``t5gemma`` conditioner at. Run
the loads with ``HF_HOME`` set to that folder and ``HF_HUB_OFFLINE=1``: nothing is
downloaded.

Used by the equivalence tests (``tests/real_pipeline_child.py``) and the benchmark.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch

SA3_REPO = "stabilityai/stable-audio-3-small-music"  # model_configs.models["small-music"]
MODEL_NAME = "small-music"
ENCODER_SUBFOLDER = "t5gemma-b-b-ul2"
REVISION = "0123456789abcdef0123456789abcdef01234567"
# The released b-b encoder; "small" keeps the width the conditioner hard-codes (768).
ENCODER_SIZES = {
    "b-b": dict(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        intermediate_size=2048,
        vocab_size=256000,
    ),
    "small": dict(
        hidden_size=768,
        num_hidden_layers=2,
        num_attention_heads=12,
        num_key_value_heads=12,
        head_dim=64,
        intermediate_size=256,
        vocab_size=512,
    ),
}
WORDS = "the a an of and drum bass piano guitar synth ambient loud soft fast slow warm bright".split()
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PROMPTS = ["warm ambient piano", "a loud fast drum and bass loop with bright synth"]


def hf_env(hf_home: Path) -> dict[str, str]:
    """Environment for a process that must resolve everything from ``hf_home``, offline."""
    return {
        "HF_HOME": str(hf_home),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def with_t5gemma_prompt(config: dict, max_length: int = 256) -> dict:
    """``config`` with the released ``t5gemma`` prompt conditioner added (same repo and subfolder)."""
    config = copy.deepcopy(config)
    model = config["model"]
    model["conditioning"]["configs"].insert(
        0,
        {
            "id": "prompt",
            "type": "t5gemma",
            "config": {
                "max_length": max_length,
                "padding_mode": "learned",
                "repo_id": SA3_REPO,
                "subfolder": ENCODER_SUBFOLDER,
            },
        },
    )
    ids = model["diffusion"]["cross_attention_cond_ids"]
    if "prompt" not in ids:
        ids.insert(0, "prompt")
    return config


def t5gemma_config(size: str):
    from transformers import T5GemmaConfig, T5GemmaModuleConfig

    module = ENCODER_SIZES[size]
    return T5GemmaConfig(
        encoder=T5GemmaModuleConfig(**module),
        decoder=T5GemmaModuleConfig(**module),
        vocab_size=module["vocab_size"],
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
        dtype="bfloat16",
    )


def encoder_weights(size: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random bf16 values for every tensor of ``T5GemmaEncoderModel`` at ``size``."""
    from transformers import T5GemmaEncoderModel

    config = t5gemma_config(size)
    config.is_encoder_decoder = False
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in T5GemmaEncoderModel(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) * 0.02).to(torch.bfloat16) for k, s in shapes.items()}


def tokenizer_files(max_length: int = 256) -> dict[str, bytes]:
    """A small word-level fast tokenizer (``tokenizer.json``) and its config."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    special = dict(zip(("pad_token", "eos_token", "bos_token", "unk_token"), SPECIAL_TOKENS, strict=True))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length, **special}
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": json.dumps(config).encode(),
    }


def write_repo(hf_home: Path, repo_id: str, files: dict[str, bytes | Path]) -> Path:
    """One model repo in the hub cache layout; returns its snapshot folder."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    for name, content in files.items():
        blob_hash = hashlib.sha256()
        if isinstance(content, Path):
            with open(content, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    blob_hash.update(block)
        else:
            blob_hash.update(content)
        blob = repo / "blobs" / blob_hash.hexdigest()
        if not blob.exists():
            if isinstance(content, Path):
                os.replace(content, blob)
            else:
                blob.write_bytes(content)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def write_encoder(hf_home: Path, size: str = "small") -> Path:
    """The T5Gemma folder of the small-music repo: config, random bf16 weights, tokenizer."""
    from safetensors.torch import save_file

    hf_home.mkdir(parents=True, exist_ok=True)
    weights = hf_home / "encoder.safetensors"
    save_file(encoder_weights(size), str(weights), metadata={"format": "pt"})
    sub = ENCODER_SUBFOLDER
    files: dict[str, bytes | Path] = {
        f"{sub}/config.json": t5gemma_config(size).to_json_string().encode(),
        f"{sub}/model.safetensors": weights,
    }
    files.update({f"{sub}/{name}": data for name, data in tokenizer_files().items()})
    return write_repo(hf_home, SA3_REPO, files)


def write_model(hf_home: Path, sa3_config: dict, sa3_checkpoint: Path, repo_id: str = SA3_REPO) -> Path:
    """The SA3 config and fp32 checkpoint (moved into the cache) at the top of ``repo_id``."""
    files: dict[str, bytes | Path] = {
        "model_config.json": json.dumps(sa3_config, indent=1).encode(),
        "model.safetensors": sa3_checkpoint,
    }
    return write_repo(hf_home, repo_id, files)

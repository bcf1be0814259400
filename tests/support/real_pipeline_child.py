"""One SA3 load with the real T5Gemma conditioner, in a fresh process, described as JSON.

    python -m support.real_pipeline_child setup HF_HOME SIZE  -> writes the offline hub (hub_fixture)
    python -m support.real_pipeline_child LOADER HALF CACHE [no-embeddings]  -> prints "RESULT {json}"

(with ``PYTHONPATH=tests``).

LOADER is ``upstream`` or ``sa3loader`` (``load_diffusion_cond`` on the hub's files),
or ``upstream-pretrained`` or ``sa3loader-pretrained`` (``StableAudioModel.from_pretrained``,
the latter with ``sa3loader.install()``). Run with ``hub_fixture.hf_env(HF_HOME)``.
The description holds the SHA-256 of every tensor's bytes, so two descriptions are
equal only when the models are bit for bit the same.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch
from torch import nn

from support.hub_fixture import (
    MODEL_NAME,
    PROMPTS,
    SA3_REPO,
    with_t5gemma_prompt,
    write_encoder,
    write_model,
)
from support.upstream_env import find_upstream, import_upstream

SEED = 4321


def digest(t: torch.Tensor) -> str:
    raw = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(raw.view(torch.uint8).numpy().tobytes() if raw.numel() else b"").hexdigest()


def describe_tensor(t: torch.Tensor, *, values: bool = True) -> dict:
    out = {
        "type": type(t).__name__,
        "dtype": str(t.dtype),
        "device": str(t.device),
        "shape": list(t.shape),
        "requires_grad": t.requires_grad,
        "meta": t.is_meta,
    }
    if values:
        out["sha256"] = digest(t)
    return out


def describe(model: nn.Module, *, plain_attr_values: bool = False) -> dict:
    """Module tree, flags, every parameter and buffer with its bits; modules kept outside the tree too."""
    out: dict = {"modules": {}, "tensors": {}, "outside": {}}
    for name, module in model.named_modules():
        out["modules"][name] = {
            "type": type(module).__name__,
            "training": module.training,
            "parameters": list(module._parameters),
            "buffers": list(module._buffers),
            "non_persistent": sorted(module._non_persistent_buffers_set),
        }
        for attr, value in sorted(vars(module).items()):
            if isinstance(value, torch.Tensor):
                described = describe_tensor(value, values=plain_attr_values)
                out["tensors"][f"{name}.{attr} (attribute)"] = described
            elif isinstance(value, nn.Module) and attr not in module._modules:
                out["outside"][f"{name}.{attr}"] = describe(value, plain_attr_values=True)
    for key, value in model.named_parameters(remove_duplicate=False):
        out["tensors"][key] = describe_tensor(value)
    for key, value in model.named_buffers(remove_duplicate=False):
        out["tensors"][f"{key} (buffer)"] = describe_tensor(value)
    out["state_dict"] = list(model.state_dict())
    return out


def count_encoder_loads() -> list[int]:
    """Count ``T5GemmaEncoderModel.from_pretrained`` calls (upstream imports it by name, late)."""
    from transformers import T5GemmaEncoderModel

    calls = [0]
    original = T5GemmaEncoderModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls[0] += 1
        return original(cls, *args, **kwargs)

    T5GemmaEncoderModel.from_pretrained = classmethod(counting)
    return calls


def prompt_outputs(model: nn.Module, *, embed: bool = True) -> dict:
    """The tokenizer's output for ``PROMPTS``, and the conditioner's embeddings unless ``embed``
    is False (at the released size a forward pass costs 8 s here, and equal encoder bits give
    equal embeddings: the small size checks them)."""
    conditioner = model.conditioner.conditioners["prompt"]
    encoded = conditioner.tokenizer(
        PROMPTS, truncation=True, max_length=conditioner.max_length, padding="max_length", return_tensors="pt"
    )
    out = {"input_ids": encoded["input_ids"].tolist(), "attention_mask": encoded["attention_mask"].tolist()}
    if embed:
        embeddings, mask = conditioner(PROMPTS, "cpu")
        out.update(embeddings=describe_tensor(embeddings), mask=describe_tensor(mask))
    return out


def load(loader: str, half: bool, cache: str, embed: bool = True) -> dict:
    import os

    os.environ["SA3LOADER_CACHE_DIR"] = cache
    import_upstream(find_upstream())
    import stable_audio_3.loading_utils as lu
    import stable_audio_3.model as model_module
    from huggingface_hub import hf_hub_download

    import sa3loader

    calls = count_encoder_loads()
    torch.manual_seed(SEED)
    if loader.endswith("-pretrained"):
        if loader.startswith("sa3loader"):
            sa3loader.install()
        model = model_module.StableAudioModel.from_pretrained(MODEL_NAME, device="cpu", model_half=half).model
    else:
        config = json.loads(Path(hf_hub_download(SA3_REPO, "model_config.json")).read_text())
        ckpt = hf_hub_download(SA3_REPO, "model.safetensors")
        load_function = sa3loader.load_diffusion_cond if loader == "sa3loader" else lu.load_diffusion_cond
        model = load_function(config, ckpt, device="cpu", model_half=half)
    prompt = prompt_outputs(model, embed=embed)
    out: dict = {"encoder_loads": calls[0], "model": describe(model), "prompt": prompt}
    if loader.startswith("sa3loader"):
        info = sa3loader.last_load_info()
        out["info"] = {
            "build": info.build,
            "fallback": info.fallback,
            "cache_hit": info.cache_hit,
            "converted": info.converted,
            "model_half": info.model_half,
            "bytes_read": info.bytes_read,
            "bytes_mapped": info.bytes_mapped,
        }
    return out


def setup(hf_home: Path, size: str) -> None:
    """Encoder first: building the SA3 model for its layout loads the real encoder."""
    from support.checkpoints import random_like_state, save

    factory = import_upstream(find_upstream())
    config = with_t5gemma_prompt(json.loads((find_upstream() / "configs" / "tiny_sa3.json").read_text()))
    write_encoder(hf_home, size)
    torch.manual_seed(0)
    model = factory.create_diffusion_cond_from_config(config)
    write_model(hf_home, config, save(random_like_state(model, seed=17), hf_home / "sa3.safetensors"))


def preload() -> None:
    """What every load imports, imported once by the zygote the tests fork these children from."""
    import_upstream(find_upstream())
    import huggingface_hub  # noqa: F401
    import stable_audio_3.model  # noqa: F401
    import transformers.models.t5gemma.modeling_t5gemma  # noqa: F401

    import sa3loader  # noqa: F401
    from support.zygote import torch_lazy_imports

    torch_lazy_imports()


def main() -> None:
    if sys.argv[1] == "setup":
        setup(Path(sys.argv[2]), sys.argv[3])
        return
    loader, half, cache = sys.argv[1], sys.argv[2] == "half", sys.argv[3]
    embed = sys.argv[4:] != ["no-embeddings"]
    print("RESULT " + json.dumps(load(loader, half, cache, embed)), flush=True)


if __name__ == "__main__":
    main()

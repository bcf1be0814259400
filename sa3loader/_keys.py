"""Which checkpoint tensor goes to which model key: upstream's rules, quirks included.

Mirrors ``stable_audio_3.loading_utils.copy_state_dict`` and
``remap_state_dict_keys``: a key the model lacks is retried with one dotted
component dropped (never the first; dropping the last leaves a trailing dot
that never matches); when two checkpoint keys land on one model key the later
one, in the order ``load_file`` yields them (data-offset order), wins; unknown
keys and shape mismatches are skipped (the caller logs them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ._format import Header


@dataclass
class LoadResult:
    """Keys that were not loaded, as ``copy_state_dict`` would have skipped them."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    mismatched_keys: list[str] = field(default_factory=list)


def remap_key(key: str, model_keys: Mapping[str, object]) -> str:
    if key in model_keys:
        return key
    parts = key.split(".")
    for i in range(1, len(parts)):
        candidate = ".".join(parts[:i]) + "." + ".".join(parts[i + 1 :])
        if candidate in model_keys:
            return candidate
    return key


def plan_keys(source: Header, model_state: Mapping[str, torch.Tensor]) -> tuple[dict[str, str], LoadResult]:
    """Map model key -> checkpoint tensor name, in model state order, plus what was skipped."""
    remapped: dict[str, str] = {}
    for entry in source.entries:
        remapped[remap_key(entry.name, model_state)] = entry.name
    result = LoadResult()
    chosen: dict[str, str] = {}
    for key, name in remapped.items():
        target = model_state.get(key)
        if target is not None and tuple(target.shape) == source.by_name[name].torch_shape:
            chosen[key] = name
            continue
        (result.unexpected_keys if target is None else result.mismatched_keys).append(key)
    assign = {key: chosen[key] for key in model_state if key in chosen}
    result.missing_keys = [key for key in model_state if key not in chosen]
    return assign, result

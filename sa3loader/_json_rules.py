"""The JSON of a safetensors header as safetensors' parser (Rust's serde_json) reads it: what
it refuses, ``_format`` refuses too; what it accepts, so does ``_format`` (but a key given twice:
refused, stricter, where safetensors takes the last). Pure; no I/O."""

from __future__ import annotations

import json
import math
import sys
from typing import Any

# serde_json's recursion limit: an array or object nested deeper than this is refused.
MAX_NESTING = 127  # remaining_depth 128, refused when it reaches 0


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python's extension, not serde's


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number out of range: {text}")
    return value


def _minus_zero_a_float(text: str) -> float | int:
    return -0.0 if text == "-0" else int(text)  # serde reads -0 as a float, never as an integer


def loads(text: str) -> Any:
    """``json.loads`` refusing a key given twice, NaN and Infinity, and fractions out of f64's range
    (integers are checked where they are read: a Python call for each would slow every load)."""
    hooks: dict[str, Any] = {"object_pairs_hook": _no_duplicates, "parse_constant": _no_constant}
    if "-0" in text:  # rare (a name may hold it): a Python call per integer only then
        hooks["parse_int"] = _minus_zero_a_float
    return json.loads(text, parse_float=_finite, **hooks)


def encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode: JSON allows escaped lone surrogates, serde refuses them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def within_limits(value: Any, nesting: int) -> bool:
    """Whether ``value``, nested ``nesting`` deep, holds only valid strings (keys too) and no array
    or object past ``MAX_NESTING``: a field safetensors ignores is still parsed whole."""
    if isinstance(value, str):
        return encodable(value)
    if isinstance(value, int):  # serde reads an integer past 64 bits as an f64: past its range, refused
        return abs(value) <= sys.float_info.max
    if isinstance(value, (dict, list)):
        if nesting + 1 > MAX_NESTING:
            return False
        items = [*value, *value.values()] if isinstance(value, dict) else value
        return all(within_limits(v, nesting + 1) for v in items)
    return True

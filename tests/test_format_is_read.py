"""A file is refused only by the safetensors format's own rules: what its first bytes look
like (a pickle's magic, a zip's) may add words to the message of a refused file, never refuse
one. A sibling sa3loader wrote is never unreadable to it; if one somehow is, the load warns and
reads the source."""

from __future__ import annotations

import logging
import struct

import pytest
import torch
from safetensors.torch import load_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model
from support.faults import at, injected
from support.loads import load_toy, make_ckpt
from support.toymodel import build, reference

import sa3loader

# Header lengths (mod 65536) whose first two little-endian bytes are a pickle's magic, 0x80 0x02..0x05.
PICKLE_LOOKING = [0x0280, 0x0380, 0x0480, 0x0580]


def header_length(path) -> int:
    with open(path, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def padded_to(path, target: int, state: dict[str, torch.Tensor]) -> None:
    """Rewrite ``path`` with ``state`` and a metadata pad that makes its JSON header ``target`` bytes."""
    save(state, path, metadata={"pad": ""})
    pad = target - header_length(path)
    assert pad >= 0 and pad % 8 == 0
    save(state, path, metadata={"pad": "x" * pad})
    assert header_length(path) == target


@pytest.mark.parametrize("length", PICKLE_LOOKING, ids=hex)
@pytest.mark.parametrize("half", [False, True], ids=["fp32", "half"])
def test_a_checkpoint_whose_header_length_looks_like_pickle_magic_loads(tmp_path, length, half):
    torch.manual_seed(0)
    state = random_like_state(build(), seed=3)
    ckpt = tmp_path / "model.safetensors"
    padded_to(ckpt, 65536 + length, state)
    assert open(ckpt, "rb").read(2) == bytes([0x80, length >> 8])
    assert load_file(str(ckpt)).keys() == state.keys()  # safetensors reads it

    model = load_toy(ckpt, tmp_path / "cache", half)

    assert_same_model(model, reference(ckpt, half))


def test_a_sibling_whose_header_length_looks_like_pickle_magic_is_used(tmp_path):
    """The sibling's header length depends on the source's name and metadata: pad the source
    until the sibling's lands on a pickle-looking length, then load it twice (convert, hit)."""
    torch.manual_seed(0)
    state = random_like_state(build(), seed=3)
    ckpt = tmp_path / "model.safetensors"
    sibling = tmp_path / "model.fp16.safetensors"
    pad = 0
    for _ in range(3):  # the source's size, written in the sibling's metadata, may gain a digit
        save(state, ckpt, metadata={"pad": "x" * pad})
        load_toy(ckpt, tmp_path / "probe")
        pad += 65536 + PICKLE_LOOKING[2] - header_length(sibling)
    assert header_length(sibling) == 65536 + PICKLE_LOOKING[2]
    sibling.unlink()

    for _ in range(2):
        model = load_toy(ckpt, tmp_path / "cache")
        info = sa3loader.last_load_info()
        assert info.sibling == str(sibling), info.reason
        assert open(sibling, "rb").read(2) == bytes([0x80, 0x04])
        assert_same_model(model, reference(ckpt))
    assert info.cache_hit


@pytest.mark.parametrize("first", [b"\x80\x04", b"PK\x03\x04"], ids=["pickle", "zip"])
def test_the_guess_only_adds_words_to_a_refusal(tmp_path, first):
    """A file of those first bytes whose header is not valid JSON is refused by the JSON rule,
    and the message adds what its first bytes suggest."""
    path = tmp_path / "model.safetensors"
    length = int.from_bytes(first + b"\x00" * (8 - len(first)), "little")
    path.write_bytes(struct.pack("<Q", length) + b"\x01" * length)
    with pytest.raises(sa3loader.HeaderError, match="not valid JSON") as err:
        sa3loader.load_into_module(torch.nn.Linear(2, 2), path)
    assert ("pickle" if first.startswith(b"\x80") else "zip archive") in str(err.value)


def test_a_sibling_that_does_not_read_back_warns_and_reads_the_source(tmp_path, caplog):
    """Something writes into the temp file between the conversion and the load's read of it:
    the load warns, reads the fp32 source (a model upstream's), and publishes nothing."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")

    def scribble() -> None:
        (tmp,) = tmp_path.glob("*.incomplete-*")
        with open(tmp, "r+b") as f:
            f.write(b"\xff" * 8)

    with caplog.at_level(logging.WARNING, logger="sa3loader"), injected(at("written", scribble)):
        model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.sibling is None and "cannot be read back" in info.reason
    assert any("cannot be read back" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "model.fp16.safetensors").exists() and not list(tmp_path.glob("*.incomplete-*"))
    assert_same_model(model, reference(ckpt))

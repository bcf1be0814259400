"""The pure rules, tested without I/O: upstream's key rules, read plans, a source's identity, the
sibling's name and metadata. These are what mutation testing runs against (tests/README.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sa3loader import HeaderError, _build, _given_config, _identity, _places, _trust
from sa3loader._format import _guess_format, layout, parse_header
from sa3loader._io import MAX_GAP_BYTES, plan_chunks
from sa3loader._records import IndexRow, RangeReport, SiblingClaim, SourceIdentity

# ------------------------------------------------------------------ key rules


def upstream_remap(state_dict: dict, model_keys: dict) -> dict:
    """``stable_audio_3.loading_utils.remap_state_dict_keys``, as written upstream."""
    remapped = {}
    for key, value in state_dict.items():
        if key not in model_keys:
            parts = key.split(".")
            for i in range(1, len(parts)):
                candidate = ".".join(parts[:i]) + "." + ".".join(parts[i + 1 :])
                if candidate in model_keys:
                    key = candidate
                    break
        remapped[key] = value
    return remapped


KEY_PARTS = st.sampled_from(["model", "blocks", "0", "1", "weight", "bias", "extra", "_orig_mod", ""])
KEYS = st.lists(KEY_PARTS, min_size=1, max_size=5).map(".".join)


@given(st.lists(KEYS, max_size=8, unique=True), st.lists(KEYS, max_size=8, unique=True))
def test_remap_key_is_upstreams(checkpoint_keys, model_keys):
    model = dict.fromkeys(model_keys)
    expected = upstream_remap({k: k for k in checkpoint_keys}, model)
    ours = {_build.remap_key(k, model): k for k in checkpoint_keys}
    assert ours == expected


def test_remap_quirks():
    model = {"a.b": None, "x.y.z": None, "p": None}
    assert _build.remap_key("a.b", model) == "a.b"  # present: kept
    assert _build.remap_key("a.extra.b", model) == "a.b"  # one component dropped
    assert _build.remap_key("extra.a.b", model) == "extra.a.b"  # never the first
    assert _build.remap_key("p.q", model) == "p.q"  # dropping the last leaves "p.", not "p"
    assert _build.remap_key("x.y.extra.z", model) == "x.y.z"
    assert _build.remap_key("x.extra.extra.y.z", model) == "x.extra.extra.y.z"  # only one dropped


def header_of(tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None):
    """The parsed header of a file holding ``tensors`` (name: (dtype, shape)), without writing one."""
    prefix, _ = layout([(name, dtype, shape) for name, (dtype, shape) in tensors.items()], metadata or {})
    size = len(prefix) + sum(
        torch.empty(shape, dtype=torch.float32 if d == "F32" else torch.float16).nbytes
        for d, shape in tensors.values()
    )
    return parse_header(prefix[8:], path="model.safetensors", file_size=size)


def test_plan_keys_skips_what_upstream_skips_and_the_later_key_wins():
    header = header_of(
        {
            "blocks.0.weight": ("F32", (2, 2)),
            "blocks.extra.0.weight": ("F32", (2, 2)),  # lands on blocks.0.weight too
            "blocks.1.weight": ("F32", (3,)),  # shape mismatch
            "unknown.key": ("F32", (1,)),
            "bias": ("F16", (4,)),
        }
    )
    model = {
        "bias": torch.zeros(4),
        "blocks.0.weight": torch.zeros(2, 2),
        "blocks.1.weight": torch.zeros(2),
        "missing": torch.zeros(1),
    }
    assign, result = _build.plan_keys(header, model)
    later = max(("blocks.0.weight", "blocks.extra.0.weight"), key=lambda n: header.by_name[n].begin)
    assert assign == {"bias": "bias", "blocks.0.weight": later}
    assert list(assign) == [k for k in model if k in assign]  # model state order
    assert result.unexpected_keys == ["unknown.key"]
    assert result.mismatched_keys == ["blocks.1.weight"]
    assert result.missing_keys == ["blocks.1.weight", "missing"]


# ------------------------------------------------------------------ the config a second build gets

_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=3),
    st.sampled_from([torch.float32, torch.int8, os.sep, math.inf]),
)
_configs = st.recursive(
    _leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=2), st.integers()), inner, max_size=3),
        st.sets(st.integers(), max_size=3),
    ),
    max_leaves=12,
)


@given(_configs)
def test_a_config_just_taken_is_unchanged_and_put_back_changes_nothing(config):
    taken = _given_config.Snapshot()
    taken.take(config)
    assert not taken.changed()
    before = repr(config)
    taken.put_back()
    assert repr(config) == before and not taken.changed()


class _EasyDict(dict):
    def update(self, *args, **kwargs):  # converts what it is given, as EasyDict's does
        super().update(
            {k: _EasyDict(v) if isinstance(v, dict) else v for k, v in dict(*args, **kwargs).items()}
        )


class _Rows(list):
    pass


class _AttributeDict(dict):
    """Keys mirrored as attributes, as EasyDict keeps them."""

    def __init__(self, **items):
        super().__init__(items)
        self.__dict__.update(items)

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        self[name] = value

    def pop(self, key, *default):
        self.__dict__.pop(key, None)
        return super().pop(key, *default)


def _config() -> dict:
    import collections

    return {
        "dim": 4, "dtype": torch.float16, "ids": [1, (2, [3])], "flag": 1, "tags": {"a"},
        "easy": _EasyDict(x={"deep": 1}), "rows": _Rows([1, 2]), "ordered": collections.OrderedDict(a=1, b=2),
        "attrs": _AttributeDict(width=4),
    }  # fmt: skip


CHANGES = {
    "pop": lambda c: c.pop("dim"),
    "add": lambda c: c.setdefault("extra", 0),
    "reorder": lambda c: c.update(dim=c.pop("dim")),
    "equal, not the same": lambda c: c.update(flag=True),
    "nested": lambda c: c["ids"].append(4),
    "in a tuple": lambda c: c["ids"][1][1].append(4),
    "another leaf": lambda c: c.update(dtype=torch.float32),
    "in a dict subclass": lambda c: c["easy"].pop("x"),
    "in a list subclass": lambda c: c["rows"].pop(),
    "a set": lambda c: c["tags"].add("b"),
    "an attribute dict's key": lambda c: setattr(c["attrs"], "width", 8),
    "an attribute dict's pop": lambda c: c["attrs"].pop("width"),
    "an ordered dict's order": lambda c: c["ordered"].move_to_end("a"),
    "cleared": lambda c: c.clear(),
}


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
def test_every_change_to_a_container_is_seen_and_put_back_in_place(change):
    config = _config()
    ids, inner, tags = config["ids"], config["ids"][1][1], config["tags"]
    taken = _given_config.Snapshot()
    taken.take(config)
    change(config)
    assert taken.changed()
    taken.put_back()
    assert config == _config() and list(config) == list(_config()) and not taken.changed()
    assert config["ids"] is ids and config["ids"][1][1] is inner and config["tags"] is tags
    assert type(config["flag"]) is int and config["dtype"] is torch.float16
    assert type(config["easy"]["x"]) is dict  # put back by dict's own methods, not the subclass's
    assert list(config["ordered"]) == ["a", "b"]
    assert config["attrs"].width == 4 and config["attrs"]["width"] == 4  # its attributes too


def test_every_container_changed_at_once_is_put_back():
    config = _config()
    taken = _given_config.Snapshot()
    taken.take(config)
    for name in ("nested", "in a tuple", "a set", "in a dict subclass", "in a list subclass", "pop"):
        CHANGES[name](config)
    taken.put_back()
    assert config == _config() and not taken.changed()


def test_a_container_reached_twice_or_holding_itself_is_one_container_put_back_once():
    """An attack: a dict shared by two keys was copied twice, so a pop through one key no
    longer showed through the other; a dict holding itself, likewise."""
    shared = {"kind": "big"}
    config: dict = {"enc": shared, "dec": shared, "dim": 2}
    config["itself"] = config
    taken = _given_config.Snapshot()
    taken.take(config)
    assert not taken.changed()
    config["enc"].pop("kind")
    config["itself"].pop("dim")
    assert taken.changed()
    taken.put_back()
    assert config["dec"] is shared and shared == {"kind": "big"} and config["itself"] is config
    assert config["dim"] == 2


def test_any_depth_and_the_builtin_subclasses_that_change_in_place_are_followed():
    import collections

    deep: list = []
    config: dict = {"deep": deep, "counts": collections.defaultdict(int, a=1)}
    for _ in range(2000):  # past the interpreter's recursion limit
        deep.append([])
        deep = deep[0]
    pair = collections.namedtuple("pair", "a b")([1], 2)
    config["pair"] = pair
    taken = _given_config.Snapshot()
    taken.take(config)
    deep.append("bottom")
    config["counts"]["b"] += 1
    pair.a.append(2)
    assert taken.changed()
    taken.put_back()
    assert deep == [] and dict(config["counts"]) == {"a": 1} and pair.a == [1]
    assert config["counts"]["z"] == 0  # still a defaultdict


def test_a_shared_config_is_never_emptied_while_its_values_are_put_back():
    """An attack: two threads loading with one config; put back by clear() and update(), the
    other thread's factory met an empty dict. Keys as they were: values put back one by one
    (``clear`` is never called: the profiler sees every call of a builtin)."""
    import sys

    config = {"scale": 1, "dim": 4}
    taken = _given_config.Snapshot()
    taken.take(config)
    config["scale"] = 1.0

    def builtins_called() -> list[str]:
        called: list[str] = []
        sys.setprofile(lambda frame, event, arg: called.append(arg.__name__) if event == "c_call" else None)
        try:
            taken.put_back()
        finally:
            sys.setprofile(None)
        return called

    assert "clear" not in builtins_called()
    assert config == {"scale": 1, "dim": 4} and type(config["scale"]) is int
    config.pop("dim")  # keys changed: emptied and filled again, in order
    assert "clear" in builtins_called() and list(config.items()) == [("scale", 1), ("dim", 4)]


def test_a_change_inside_an_object_of_another_class_is_not_seen():
    import collections

    class Settings:
        dim = 4

    settings, queue = Settings(), collections.deque([1])
    config = {"settings": settings, "queue": queue}
    taken = _given_config.Snapshot()
    taken.take(config)
    settings.dim = 8
    queue.pop()
    assert not taken.changed()


# ------------------------------------------------------------------ read plans


@given(
    st.lists(st.tuples(st.integers(0, 5000), st.integers(0, 700)), max_size=12),
    st.integers(1, 2048),
)
def test_plan_chunks_covers_every_wanted_byte_once_within_limits(ranges, chunk_bytes):
    chunks = plan_chunks(ranges, chunk_bytes)
    got: dict[int, list[tuple[int, int]]] = {}
    for chunk in chunks:
        assert 0 < chunk.length <= chunk_bytes
        covered = 0
        for piece in chunk.pieces:
            assert 0 <= piece.chunk_offset and piece.chunk_offset + piece.length <= chunk.length
            got.setdefault(piece.index, []).append((piece.dest_offset, piece.length))
            covered += piece.length
            file_at = chunk.file_offset + piece.chunk_offset
            assert file_at == ranges[piece.index][0] + piece.dest_offset
        assert chunk.length - covered <= MAX_GAP_BYTES * len(chunk.pieces)
    for index, (_, nbytes) in enumerate(ranges):
        pieces = sorted(got.get(index, []))
        at = 0
        for offset, length in pieces:
            assert offset == at and length > 0
            at += length
        assert at == nbytes


def test_plan_chunks_gaps_and_refusals():
    far = MAX_GAP_BYTES + 1
    assert len(plan_chunks([(0, 10), (10 + MAX_GAP_BYTES, 10)], 1 << 30)) == 1  # gap read through
    assert len(plan_chunks([(0, 10), (10 + far, 10)], 1 << 30)) == 2  # a skipped tensor is not read
    assert plan_chunks([(0, 0), (5, 0)]) == []
    with pytest.raises(ValueError, match="chunk_bytes must be positive"):
        plan_chunks([(0, 1)], 0)


# ------------------------------------------------------------------ identity


IDENTITY = SourceIdentity(size=10, mtime_ns=20, header_sha256="h", inode=1, device=2, ctime_ns=3)


@pytest.mark.parametrize("field", ["size", "mtime_ns", "header_sha256"])
def test_hard_match_needs_every_hard_field(field):
    other = dataclasses.replace(IDENTITY, **{field: "other"})
    assert _identity.hard_match(IDENTITY, dataclasses.replace(IDENTITY))
    assert not _identity.hard_match(IDENTITY, other) and _identity.soft_match(IDENTITY, other)


@pytest.mark.parametrize("field", ["inode", "device", "ctime_ns"])
def test_soft_match_needs_every_soft_field(field):
    other = dataclasses.replace(IDENTITY, **{field: -1})
    assert _identity.soft_match(IDENTITY, dataclasses.replace(IDENTITY))
    assert not _identity.soft_match(IDENTITY, other) and _identity.hard_match(IDENTITY, other)


def test_a_fingerprint_of_another_version_is_not_current():
    version = _identity.FINGERPRINT_VERSION
    assert _identity.current_fingerprint(f"{version}:abc")
    assert not _identity.current_fingerprint(f"{version}abc")
    assert not _identity.current_fingerprint("v1:abc")
    assert not _identity.current_fingerprint(None)


def test_racy_checks():
    mtime, checked = 10_000_000_000, 10_000_000_000 + _identity.RACY_WINDOW_NS
    source = dataclasses.replace(IDENTITY, mtime_ns=mtime, ctime_ns=mtime - 1)
    assert not _identity.racy(source, checked)  # checked a full window after the mtime
    assert _identity.racy(source, checked - 1)
    assert _identity.racy(source, None)  # an older version's row: no check time
    assert _identity.racy(source, float(checked))  # type: ignore[arg-type]  # not an int: not ours
    # The ctime (which a rewrite cannot set back): a tick of the coarse clock, or of whole seconds.
    an_hour_before = mtime - 3600 * _identity.SECOND_NS
    fine = dataclasses.replace(IDENTITY, mtime_ns=an_hour_before, ctime_ns=mtime + 1)
    assert _identity.racy(fine, mtime + _identity.CTIME_TICK_NS)
    assert not _identity.racy(fine, mtime + 1 + _identity.CTIME_TICK_NS)
    seconds = dataclasses.replace(IDENTITY, mtime_ns=an_hour_before, ctime_ns=mtime)
    assert _identity.racy(seconds, mtime + _identity.RACY_WINDOW_NS - 1)
    assert not _identity.racy(seconds, mtime + _identity.RACY_WINDOW_NS)


def test_an_index_row_round_trips_through_json():
    row = dataclasses.replace(  # ROW (below) with every optional part filled
        ROW,
        source=dataclasses.replace(IDENTITY, blob="ab" * 32),
        real_path="/b/model.safetensors",
        created=1.5,
        range=RangeReport(1, 2),
    )
    assert IndexRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    assert IndexRow.from_json({**row.to_json(), "schema": 0}) is None
    assert IndexRow.from_json({**row.to_json(), "range": None}) == dataclasses.replace(row, range=None)


def entries_header(sizes: list[int]):
    return header_of({f"t{i}": ("F32", (n,)) for i, n in enumerate(sizes)})


def test_fingerprint_ranges_take_small_tensors_whole_and_spots_of_large_ones():
    whole = _identity.WHOLE_TENSOR_BYTES // 4
    header = entries_header([3, whole, whole + 1, 0])
    ranges = _identity.fingerprint_ranges(header)
    entries = sorted(header.entries, key=lambda e: e.begin)
    small, exact, large = (e for e in entries if e.nbytes)
    at = {e.name: header.data_start + e.begin for e in entries}
    assert (at[small.name], small.nbytes) in ranges and (at[exact.name], exact.nbytes) in ranges
    spots = [r for r in ranges if at[large.name] <= r[0] < at[large.name] + large.nbytes]
    assert len(spots) == _identity.SPOTS and all(n == _identity.SPOT_BYTES for _, n in spots)
    assert spots[0][0] == at[large.name]  # the first byte
    assert spots[-1][0] + _identity.SPOT_BYTES == at[large.name] + large.nbytes  # the last byte
    assert len(ranges) == 2 + _identity.SPOTS  # nothing for the empty tensor
    assert [r[0] for r in ranges] == sorted(r[0] for r in ranges)


def test_merged_reads_join_ranges_closer_than_the_gap():
    gap = _identity.MERGE_GAP_BYTES
    assert _identity._merged([(0, 10), (10 + gap, 5)]) == [(0, 15 + gap)]
    assert _identity._merged([(0, 10), (11 + gap, 5)]) == [(0, 10), (11 + gap, 5)]
    assert _identity._merged([(0, 10), (5, 3)]) == [(0, 10)]  # inside: no growth
    assert _identity._merged([]) == []


# ------------------------------------------------------------------ name and metadata


@pytest.mark.parametrize(
    ("source", "sibling"),
    [
        ("/m/model.safetensors", "model.fp16.safetensors"),
        ("/m/model", "model-fp16.safetensors"),
        ("/m/a.b.safetensors", "a.b.fp16.safetensors"),
        ("/m/model.SAFETENSORS", "model.SAFETENSORS-fp16.safetensors"),
    ],
)
def test_sibling_names(source, sibling):
    assert _places.sibling_name(source) == sibling
    assert _places.beside_path(source) == "/m/.cache/sa3loader/" + sibling
    assert _places.legacy_beside_path(source) == "/m/" + sibling


def test_cache_path_is_keyed_by_the_real_file():
    path = _places.cache_path("/c", "/snap/rev1/model.safetensors", "/blobs/abc")
    digest = hashlib.sha256(b"/blobs/abc").hexdigest()[:16]
    assert path == f"/c/siblings/{digest}/model.fp16.safetensors"
    assert _places.cache_path("/c", "/snap/rev2/model.safetensors", "/blobs/abc") == path


@pytest.mark.parametrize("kind", ["models", "datasets", "spaces"])
def test_hub_caches_of_every_repo_type(kind):
    assert _places.in_hf_hub_cache(f"/hf/hub/{kind}--org--name/snapshots/rev/model.safetensors")
    assert _places.in_hf_hub_cache(f"/hf/hub/{kind}--org--name/blobs/abc")
    assert not _places.in_hf_hub_cache(f"/hf/hub/{kind}--org--name/refs/main")
    assert not _places.in_hf_hub_cache(f"/data/{kind}/model.safetensors")


def test_sibling_metadata_says_what_it_was_made_from_and_keeps_the_users():
    header = header_of({"w": ("F32", (2,))})
    header.metadata["format"] = "pt"
    meta = _identity.sibling_metadata(header, IDENTITY, "v2:fp")
    assert meta["format"] == "pt" and meta[_identity.MARKER_KEY] == _identity.FORMAT_VERSION
    prefix = _identity.META_PREFIX
    assert (meta[prefix + "source_size"], meta[prefix + "source_mtime_ns"]) == ("10", "20")
    assert (meta[prefix + "source_header_sha256"], meta[prefix + "source_fingerprint"]) == ("h", "v2:fp")
    assert meta[prefix + "source_name"] == "model.safetensors"
    sibling = header_of({"w": ("F16", (2,))}, meta)
    # not a hub blob: which file it was is not recorded
    assert SiblingClaim.of(sibling.metadata) == SiblingClaim(10, 20, "h", "v2:fp")
    assert _identity.is_sa3loader_file(sibling) and not _identity.is_sa3loader_file(header)
    assert _identity.describes(sibling, header)
    unreadable = header_of({"w": ("F16", (2,))}, {**meta, prefix + "source_size": "ten"})
    assert SiblingClaim.of(unreadable.metadata) is None
    incomplete = header_of({"w": ("F16", (2,))}, {_identity.MARKER_KEY: "1"})
    assert SiblingClaim.of(incomplete.metadata) is None
    blob = "ab" * 32  # a hub blob's name only places the sibling: the metadata does not record it
    meta = _identity.sibling_metadata(header, dataclasses.replace(IDENTITY, blob=blob), "v2:fp")
    assert not any("blob" in key for key in meta)


def test_describes_needs_the_same_names_shapes_and_converted_dtypes():
    source = header_of({"w": ("F32", (2,)), "h": ("F16", (3,))})
    assert _identity.describes(header_of({"w": ("F16", (2,)), "h": ("F16", (3,))}), source)
    assert not _identity.describes(header_of({"w": ("F32", (2,)), "h": ("F16", (3,))}), source)  # not cast
    assert not _identity.describes(header_of({"w": ("F16", (3,)), "h": ("F16", (3,))}), source)  # shape
    assert not _identity.describes(header_of({"w": ("F16", (2,))}), source)  # missing one
    assert not _identity.describes(header_of({"x": ("F16", (2,)), "h": ("F16", (3,))}), source)  # name
    assert _identity.has_float32(source) and not _identity.has_float32(header_of({"h": ("F16", (3,))}))


# ------------------------------------------------------------------ header validation, word for word


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def bad(tensors: dict) -> bytes:
    return json.dumps(tensors).encode()


BEGIN_AFTER_END = "data_offsets must be two integers 0 <= begin <= end"
BAD_HEADERS = {
    "not-json": (b"{nope", 0, "header is not valid JSON"),
    "a-list": (b"[1]", 0, "header is a JSON list, not an object"),
    "metadata": (bad({"__metadata__": {"a": 1}}), 0, "__metadata__ must map strings to strings"),
    "surrogate": (b'{"__metadata__": {"a": "\\ud800"}}', 0, "header string '\\ud800' is not valid Unicode"),
    "duplicate": (b'{"a": {}, "a": {}}', 0, "(duplicate key 'a')"),
    "fields": (bad({"t": {"dtype": "F32"}}), 0, "entry must have dtype, shape and"),
    "dtype": (bad({"t": entry(dtype="F128")}), 8, "unsupported dtype 'F128'"),
    "shape": (bad({"t": entry(shape=(-1,))}), 8, "shape must be a list of integers 0 <= n < 2**63"),
    "begin-after-end": (bad({"t": entry(offsets=(8, 0))}), 8, BEGIN_AFTER_END),
    "f4-odd-bits": (bad({"t": entry("F4", (3,), (0, 1))}), 1, "F4 x [3] does not fill whole bytes"),
    "f4-odd-last": (bad({"t": entry("F4", (4, 1), (0, 2))}), 2, "F4 x [4, 1] does not fill whole bytes"),
    "f4-scalar": (bad({"t": entry("F4", (), (0, 1))}), 1, "F4 x [] does not fill whole bytes"),
    "size": (bad({"t": entry(shape=(3,))}), 8, "8 data bytes do not match F32 x [3] = 12 bytes"),
    "size-later": (bad({"t": entry(shape=(3,), offsets=(4, 12))}), 12, "8 data bytes do not match"),
    "gap": (bad({"t": entry(offsets=(4, 12))}), 12, "tensor 't' starts at 4, expected 0"),
    "short": (bad({"t": entry()}), 4, "tensors need 8 data bytes but the file holds 4"),
}


@pytest.mark.parametrize("case", sorted(BAD_HEADERS))
def test_each_bad_header_is_named_for_what_it_is(case):
    raw, data_size, message = BAD_HEADERS[case]
    with pytest.raises(HeaderError) as err:
        parse_header(raw, path="m.safetensors", file_size=8 + len(raw) + data_size)
    assert message in str(err.value) and str(err.value).startswith("m.safetensors: ")
    assert err.value.filename == "m.safetensors"


def test_a_parsed_header_keeps_the_file_size_and_the_hash_of_its_bytes():
    raw = json.dumps({"t": entry()}).encode()
    header = parse_header(raw, path="m", file_size=8 + len(raw) + 8)
    assert (header.file_size, header.header_size) == (8 + len(raw) + 8, len(raw))
    assert header.sha256 == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize(
    ("first", "guess"),
    [
        (b"{ \t\r\n~ab", " (it starts with text)"),
        (b"ab\x7fcdefg", ""),
        (b"ab\x1fcdefg", ""),
        (
            b"PK\x03\x04abcd",
            " (it is a zip archive: a PyTorch .pt/.ckpt checkpoint? Convert it to safetensors first)",
        ),
        (b"\x80\x02abcdef", " (it is a pickle: a PyTorch checkpoint? Convert it to safetensors first)"),
    ],
)
def test_what_a_file_that_is_not_safetensors_looks_like(first, guess):
    assert _guess_format(first) == guess


def test_contiguous_ranges_are_one_read():
    assert len(plan_chunks([(0, 10), (10, 10), (20, 5)], 1 << 20)) == 1


def test_remap_never_drops_the_first_component_even_into_a_key_with_a_leading_dot():
    assert _build.remap_key("a.b", {".b": None}) == "a.b"


def test_hub_cache_recognised_at_the_snapshots_dir_itself():
    assert _places.in_hf_hub_cache("/hf/hub/models--o--n/snapshots")


def test_cache_path_of_a_path_that_is_not_utf8():
    name = os.fsdecode(b"/data/caf\xe9/model.safetensors")  # latin-1 bytes: a surrogate escape
    path = _places.cache_path("/c", name, name)
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    assert path == f"/c/siblings/{digest}/model.fp16.safetensors"


@pytest.mark.parametrize("shape", [(2,), (1, 2), (2, 1, 4)])
def test_f4_tensors_with_an_even_last_dimension_are_valid(shape):
    nbytes = math.prod(shape) // 2
    raw = bad({"t": entry("F4", shape, (0, nbytes))})
    header = parse_header(raw, path="m", file_size=8 + len(raw) + nbytes)
    assert header.by_name["t"].torch_shape == (*shape[:-1], shape[-1] // 2)


@given(
    st.text(
        alphabet=st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",)),
        min_size=1,
        max_size=300,
    )
)
def test_a_sibling_name_and_every_name_derived_from_it_fit_name_max(stem):
    name = stem + ".safetensors"
    if len(os.fsencode(name)) > _places.NAME_MAX:
        return  # not a legal file name to begin with
    sibling = _places.sibling_name("/m/" + name)
    assert len(os.fsencode(sibling)) <= _places.MAX_SIBLING_NAME
    shortened = len(os.fsencode(stem + _places.SIBLING_SUFFIX)) > _places.MAX_SIBLING_NAME
    assert sibling.endswith(
        _places.SHORTENED_SUFFIXES[_places.SIBLING_SUFFIX] if shortened else _places.SIBLING_SUFFIX
    )
    longest = (
        os.path.basename(_places.incomplete_prefix("/m/" + sibling))
        + "written-"
        + "f" * 36
        + "-"
        + "9" * 12 * 2
        + "--4194304-abcdef01"
    )
    assert len(os.fsencode(longest)) <= _places.NAME_MAX
    if len(os.fsencode(name)) <= _places.MAX_SIBLING_NAME - 5:  # short names are kept as they are
        assert sibling == stem + _places.SIBLING_SUFFIX


def test_two_long_names_that_start_alike_get_different_siblings():
    a, b = "x" * 230 + "a.safetensors", "x" * 230 + "b.safetensors"
    assert _places.sibling_name(a) != _places.sibling_name(b)


@given(st.text(alphabet="x.-fp16hsafetnor", min_size=1, max_size=40), st.sampled_from(["", ".safetensors"]))
def test_no_legal_name_has_the_sibling_a_long_name_was_shortened_to(stem, suffix):
    """A shortened sibling name ends as no natural one can, so two checkpoints in one folder, a
    long name and one named like its short form, never share a sibling."""
    long_name = "run-" + "x" * 230 + suffix
    short = _places.sibling_name(long_name)
    shortened_suffix = _places.SHORTENED_SUFFIXES[_places.SIBLING_SUFFIX if suffix else "-fp16.safetensors"]
    assert short.endswith(shortened_suffix)
    named_like_it = short.removesuffix(shortened_suffix) + suffix  # a legal, shorter name
    assert _places.sibling_name(named_like_it) != short
    natural = _places.sibling_name(stem + suffix)
    assert not natural.endswith(tuple(_places.SHORTENED_SUFFIXES.values()))


# ------------------------------------------------------------------ edges mutation testing found untested


@pytest.mark.parametrize(
    ("path", "name"),
    [
        (
            "/hf/hub/models--org--name/snapshots/abcdef123456/model.safetensors",
            "org/name@abcdef12 model.safetensors",
        ),
        ("/models--org--name/snapshots/rev/m.safetensors", "org/name@rev m.safetensors"),
        ("/a/b/c/d/e/datasets--o--n--x/snapshots/r/sub/m.safetensors", "datasets/o/n--x@r sub/m.safetensors"),
        ("/hf/spaces--o--n/snapshots/r/m", "spaces/o/n@r m"),
        ("/data/foo/snapshots/rev/model.safetensors", None),  # no repo folder before snapshots
        ("/data/a--b/snapshots/rev/model.safetensors", None),  # a -- folder of no repo type
        ("/hf/models--org--name/blobs/abc/x", None),
        ("/hf/models--org--name/snapshots/rev", None),  # the revision dir itself: no file
    ],
)
def test_hub_name_is_what_hf_calls_the_file(path, name):
    assert _places.hub_name(path) == name


def test_a_name_exactly_at_the_limit_is_kept_and_one_over_is_shortened_to_the_limit():
    assert _places.fitted("a" * 10, ".x", 12) == "a" * 10 + ".x"
    digest = hashlib.sha256(b"a" * 40).hexdigest()[:16]
    assert _places.fitted("a" * 40, ".s", 30) == "a" * 11 + "-" + digest + ".s"
    assert len(_places.fitted("a" * 40, ".s", 30)) == 30
    stem = "m" * (_places.MAX_SIBLING_NAME - len(".fp16.safetensors"))
    assert _places.sibling_name(f"/d/{stem}.safetensors") == f"{stem}.fp16.safetensors"


def test_temp_files_are_named_from_the_whole_destination_name():
    assert _places.incomplete_prefix("/d/m.fp16.safetensors") == "/d/m.fp16.safetensors.incomplete-"


@pytest.mark.parametrize(
    ("path", "is_place"),
    [
        ("/c/siblings/key/m.fp16.safetensors", True),
        ("/c/siblings/key/m-fp16.safetensors", True),
        ("/x/.cache/sa3loader/m.fp16.safetensors", True),
        ("/c/siblings/key/m.safetensors", False),  # not a sibling's name
        ("/x/.cache/sa3loader/poetry.lock", False),
        ("/other/siblings/key/m.fp16.safetensors", False),  # another cache's siblings dir
        ("/c/key/m.fp16.safetensors", False),
        ("/x/m.fp16.safetensors", False),  # beside a checkpoint: an older version's, or the user's
    ],
)
def test_only_sibling_names_at_sibling_places_are_sa3loaders(path, is_place):
    assert _places.at_sibling_place(path, "/c") is is_place


def test_blob_names_need_a_repo_folder_a_blobs_dir_and_a_sha256():
    sha = "ab" * 32
    assert _places.blob_name(f"models--o--n/blobs/{sha}") == sha
    assert _places.blob_name(f"/hf/datasets--o--n/blobs/{sha}") == sha
    assert _places.blob_name(sha) is None
    assert _places.blob_name(f"blobs/{sha}") is None
    assert _places.blob_name(f"/hf/models--o--n/snapshots/{sha}") is None
    assert _places.blob_name(f"/hf/other/blobs/{sha}") is None
    assert _places.blob_name(f"/hf/models--o--n/blobs/{'ab' * 20}") is None  # a git blob's sha1


def test_in_hub_repo_sees_the_repo_folder_below_snapshots_too(tmp_path):
    assert _places.in_hub_repo(str(tmp_path / "models--o--n" / "refs"))
    assert not _places.in_hub_repo(str(tmp_path / "plain"))
    repo = tmp_path / "models--o--n"
    (repo / "refs").mkdir(parents=True)
    (tmp_path / "link").symlink_to(repo / "refs")
    assert _places.in_hub_repo(str(tmp_path / "link"))  # by where it really is
    (tmp_path / "plain").mkdir()
    (tmp_path / "datasets--o--n").symlink_to(tmp_path / "plain")
    assert _places.in_hub_repo(str(tmp_path / "datasets--o--n"))  # by the name it is given


def test_dir_writable_and_free_bytes_answer_for_the_path_asked(tmp_path):
    from support.faults import faked

    (tmp_path / "f").write_bytes(b"")
    (tmp_path / "f").chmod(0o700)
    assert _trust.dir_writable(str(tmp_path))
    assert not _trust.dir_writable(str(tmp_path / "f"))  # a file, however writable
    asked = []
    with faked(
        dir_writable=lambda p, real: asked.append(p) or False,
        free_bytes=lambda p, real: asked.append(p) or 7,
    ):
        assert not _trust.dir_writable(str(tmp_path))
        assert _places.free_bytes(str(tmp_path / "f")) == 7
    assert asked == [str(tmp_path), str(tmp_path / "f")]


def test_a_dir_is_writable_only_where_one_may_write_into_it_and_enter_it(tmp_path, monkeypatch):
    modes = []
    monkeypatch.setattr(os, "access", lambda path, mode: modes.append(mode) or not mode & os.W_OK)
    assert not _trust.dir_writable(str(tmp_path))  # one may look in, not write (root may always)
    assert modes == [os.W_OK | os.X_OK]


def test_temp_files_of_a_sibling_are_found_by_the_shape_of_their_names(tmp_path):
    dest = str(tmp_path / "model.fp16.safetensors")
    prefix = _places.incomplete_prefix(dest)
    temps = [prefix + "123-abcdef12", prefix + "9-00000000"]
    for path in [*temps, dest, prefix + "x", str(tmp_path / "other.fp16.safetensors.incomplete-1-a")]:
        open(path, "wb").close()
    assert _places.temp_files_of(dest) == sorted(temps)  # by sa3loader's shape only


def test_the_dirs_sa3loader_makes_are_private_and_the_cache_dir_tagged(tmp_path, monkeypatch):
    old = os.umask(0)
    try:
        _places.create_cache_dir(str(tmp_path / "cache" / "index"))
        folder = tmp_path / "ckpts"
        folder.mkdir(0o775)
        (folder / ".cache").mkdir(0o700)  # made earlier: kept, and the hidden folder made in it
        made = _places.make_beside_dirs(str(folder / ".cache" / "sa3loader"))
        (tmp_path / "shared").mkdir(0o750)
        also = _places.make_beside_dirs(str(tmp_path / "shared" / ".cache" / "sa3loader"))
    finally:
        os.umask(old)
    for d in (tmp_path / "cache", tmp_path / "cache" / "index"):
        assert d.stat().st_mode & 0o777 == 0o700
    tag = tmp_path / "cache" / "CACHEDIR.TAG"
    assert tag.read_text(encoding="ascii").startswith("Signature: 8a477f597d28d172789f06886806bc55\n")
    tag.write_text("Signature: 8a477f597d28d172789f06886806bc55\n# yours\n")
    _places.tag_cache_dir(str(tmp_path / "cache"))
    assert tag.read_text().endswith("# yours\n")  # an existing tag is left as it is
    assert made == [str(folder / ".cache" / "sa3loader")]
    assert (folder / ".cache" / "sa3loader").stat().st_mode & 0o777 == 0o755  # the folder's, never g+w
    assert also == [str(tmp_path / "shared" / ".cache"), str(tmp_path / "shared" / ".cache" / "sa3loader")]
    assert (tmp_path / "shared" / ".cache").stat().st_mode & 0o777 == 0o750
    monkeypatch.chdir(tmp_path)
    _places.make_private_dirs("relative")  # a relative path: no parent beyond it to make
    assert (tmp_path / "relative").is_dir()


def test_siblings_with_leftovers_are_found_by_their_lock_and_temp_names(tmp_path):
    place = tmp_path / "siblings" / "k"
    place.mkdir(parents=True)
    (place / "a.fp16.safetensors.lock").write_bytes(b"")
    (place / "b.fp16.safetensors.incomplete-1-abcdef12").write_bytes(b"")
    (place / "c.fp16.safetensors").write_bytes(b"")
    (place / "e.incomplete-x.fp16.safetensors.incomplete-2-abcdef12").write_bytes(b"")  # the last infix
    (place / "f.fp16.safetensors.incomplete-zz").write_bytes(b"")  # not sa3loader's shape
    (place / "1-abcdef12").write_bytes(b"")  # the shape's tail alone
    (tmp_path / "d.fp16.safetensors.lock").write_bytes(b"")  # not under siblings/
    found = _places.siblings_with_leftovers(str(tmp_path))
    assert found == {
        str(place / "a.fp16.safetensors"),
        str(place / "b.fp16.safetensors"),
        str(place / "e.incomplete-x.fp16.safetensors"),
    }


ROW = IndexRow(
    source=IDENTITY,
    source_path="/a/model.safetensors",
    real_path="/a/model.safetensors",
    fingerprint="v2:fp",
    checked_ns=5,
    sibling_path="/a/model.fp16.safetensors",
    sibling_size=7,
    sibling_header_sha256="s",
    created=1.0,
    range=None,
)


def test_a_rows_last_use_round_trips_and_is_its_creation_until_used():
    used = dataclasses.replace(ROW, last_used=3.5)
    assert IndexRow.from_json(json.loads(json.dumps(used.to_json()))) == used
    older = dataclasses.replace(ROW, converter_version="0.9")  # a row an older converter wrote
    assert IndexRow.from_json(json.loads(json.dumps(older.to_json()))) == older
    assert used.used() == 3.5
    assert ROW.used() == 1.0
    old = {k: v for k, v in ROW.to_json().items() if k != "last_used"}  # an older version's row
    assert IndexRow.from_json(old) == ROW


@pytest.mark.parametrize(
    ("field", "value", "valid"),
    [
        ("created", 0, True),
        ("created", 2**33 - 1, True),
        ("created", 2**33, False),
        ("created", -1, False),
        ("created", float("nan"), False),
        ("created", True, False),
        ("fingerprint", "v2:\x00", False),
        ("fingerprint", "\x00", False),
    ],
)
def test_rows_with_impossible_times_or_nul_names_are_not_rows(field, value, valid):
    row = IndexRow.from_json({**ROW.to_json(), field: value})
    assert (row is not None) is valid


def test_a_last_use_no_clock_can_hold_or_an_odd_check_time_is_dropped():
    for used in (0, 2**33 - 1):
        assert IndexRow.from_json({**ROW.to_json(), "last_used": used}).last_used == used
    for used in (2**33, -1, "1", float("inf")):
        assert IndexRow.from_json({**ROW.to_json(), "last_used": used}).last_used is None
    assert IndexRow.from_json({**ROW.to_json(), "checked_ns": "5"}).checked_ns is None


def test_a_claim_names_a_recorded_source_by_its_hard_fields_and_fingerprint():
    claim = SiblingClaim(IDENTITY.size, IDENTITY.mtime_ns, IDENTITY.header_sha256, "v2:f")
    assert _identity.claims_recorded(claim, IDENTITY, "v2:f")
    assert not _identity.claims_recorded(None, IDENTITY, "v2:f")
    assert not _identity.claims_recorded(claim, IDENTITY, "v2:g")  # another fingerprint
    assert not _identity.claims_recorded(dataclasses.replace(claim, size=11), IDENTITY, "v2:f")
    assert not _identity.claims_recorded(dataclasses.replace(claim, fingerprint="v2:g"), IDENTITY, "v2:f")

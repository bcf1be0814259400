"""The safetensors format: headers parsed and laid out as safetensors does, files refused only
by its rules (never by first bytes that look like a pickle or a zip), a sibling that does not
read back is never used, and other formats named in the message of a refused file."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import struct
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model
from support.faults import at, injected
from support.loads import load_toy, make_ckpt
from support.toymodel import build, reference

import sa3loader
from sa3loader import CheckpointPermissionError, HeaderError, Sa3LoaderError, _faults
from sa3loader._dtypes import TORCH_DTYPES
from sa3loader._format import MAX_HEADER_BYTES, layout, open_for_reading, parse_header, read_header

PICKLE_LOOKING = [0x0280, 0x0380, 0x0480, 0x0580]


DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def mixed_tensors() -> dict[str, torch.Tensor]:
    return {
        "b.f32": torch.randn(3, 5),
        "a.f32": torch.randn(7),
        "zero": torch.zeros(0, 4),
        "bf16": torch.randn(5).to(torch.bfloat16),
        "f16": torch.randn(3).to(torch.float16),
        "f64": torch.randn(2, dtype=torch.float64),
        "i64": torch.arange(3),
        "i8": torch.tensor([1, -2, 3], dtype=torch.int8),
        "bool": torch.tensor([True, False, True]),
        "u8": torch.tensor([1, 2, 3, 4, 5], dtype=torch.uint8),
    }


@pytest.mark.parametrize("metadata", [None, {"format": "pt", "b": "2", "ü": "ß"}])
def test_layout_matches_save_file(tmp_path, metadata):
    tensors = mixed_tensors()
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    raw = path.read_bytes()
    prefix, entries = layout(
        [(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in tensors.items()], metadata or {}
    )
    (n,) = struct.unpack("<Q", raw[:8])
    assert len(prefix) == 8 + n and prefix[:8] == raw[:8]
    assert json.loads(prefix[8:]) == json.loads(raw[8 : 8 + n])
    assert n % 8 == 0
    if metadata is None:  # with no metadata there is no key order left to differ
        assert prefix == raw[: 8 + n]
    header = read_header(path)
    assert [e.name for e in header.entries] == [e.name for e in entries]
    with safe_open(str(path), "pt") as f:
        assert set(f.keys()) == set(header.by_name)


def test_entries_are_in_load_file_order(tmp_path):
    from safetensors.torch import load_file

    path = tmp_path / "x.safetensors"
    save_file(mixed_tensors(), str(path))
    assert [e.name for e in read_header(path).entries] == list(load_file(str(path)))


def _file(tmp_path: Path, header: bytes | str, data: bytes = b"", length: int | None = None) -> Path:
    raw = header.encode() if isinstance(header, str) else header
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    "length-past-eof": dict(header="{}", length=1 << 20),
    "length-near-2^64": dict(header="{}", length=(1 << 64) - 8),
    "not-json": dict(header="{not json"),
    "not-utf8": dict(header=b"\xff\xfe{}"),
    "json-list": dict(header="[1, 2]"),
    "json-string": dict(header='"hello"'),
    "negative-offset": dict(header=json.dumps({"t": _entry(offsets=(-8, 0))}), data=b"\0" * 8),
    "overlap": dict(
        header=json.dumps({"a": _entry(offsets=(0, 8)), "b": _entry(offsets=(4, 12))}), data=b"\0" * 12
    ),
    "gap": dict(header=json.dumps({"a": _entry(offsets=(8, 16))}), data=b"\0" * 16),
    "out-of-file": dict(header=json.dumps({"a": _entry(offsets=(0, 8))}), data=b"\0" * 4),
    "size-mismatch": dict(header=json.dumps({"a": _entry(shape=(3,), offsets=(0, 8))}), data=b"\0" * 8),
    "unknown-dtype": dict(header=json.dumps({"a": _entry(dtype="F128")}), data=b"\0" * 8),
    "duplicate-key": dict(
        header=f'{{"a":{json.dumps(_entry())},"a":{json.dumps(_entry())}}}', data=b"\0" * 8
    ),
    "huge-shape": dict(
        header=json.dumps({"a": _entry(shape=(1 << 40, 1 << 40), offsets=(0, 8))}), data=b"\0" * 8
    ),
    "float-shape": dict(header=json.dumps({"a": _entry(shape=(2.0,))}), data=b"\0" * 8),
    "bool-offset": dict(header=json.dumps({"a": _entry(offsets=(False, 8))}), data=b"\0" * 8),
    "metadata-not-strings": dict(header=json.dumps({"__metadata__": {"a": 1}})),
    # safetensors' parser refuses any __metadata__ but an object or null, falsy ones too
    **{
        f"metadata-{name}": dict(header=json.dumps({"__metadata__": v}))
        for name, v in [("empty-list", []), ("empty-string", ""), ("zero", 0), ("false", False)]
    },
    "entry-field-twice": dict(
        header='{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    ),
    "truncated-data": dict(header=json.dumps({"a": _entry(shape=(4,), offsets=(0, 16))}), data=b"\0" * 9),
    "deep-nesting": dict(header="[" * 100000 + "]" * 100000),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_raise_header_error_naming_the_file(tmp_path, case):
    path = _file(tmp_path, **HOSTILE[case])
    with pytest.raises(HeaderError) as err:
        read_header(path)
    assert str(path) in str(err.value) and err.value.filename == str(path)
    assert isinstance(err.value, ValueError) and isinstance(err.value, Sa3LoaderError)


@pytest.mark.parametrize("extra", [1, {"note": [1, "x"]}, None])
def test_an_entry_with_a_field_safetensors_ignores_loads_as_load_file_reads_it(tmp_path, extra):
    """safetensors' parser ignores a tensor entry's other fields; a drop-in that refused them
    refused files upstream loads (an outside attack). A field given twice stays an error, as there."""
    from safetensors.torch import load_file

    import sa3loader

    values = torch.linspace(-3, 3, 8)
    header = json.dumps({"weight": {**_entry(shape=(2, 4), offsets=(0, 32)), "extra": extra}})
    path = _file(tmp_path, header, values.numpy().tobytes())
    assert read_header(path).by_name["weight"].shape == (2, 4)
    for half in (False, True):
        model = sa3loader.load_diffusion_cond(
            {},
            path,
            "cpu",
            half,
            cache_dir=tmp_path / "c",
            model_factory=lambda c: torch.nn.Linear(4, 2, bias=False),
        )
        expected = load_file(str(path))["weight"].to(torch.float16 if half else torch.float32)
        assert torch.equal(model.weight, expected)


EXTRA_FIELDS = {
    "NaN": "NaN",
    "Infinity": "-Infinity",
    "1e400": "1e400",
    "10**309": "1" + "0" * 309,
    "10**308": "1" + "0" * 308,
    "2**70": str(2**70),
    "1e-400": "1e-400",
    "lone surrogate": '"\\ud800"',
    "lone surrogate key": '{"\\ud800": 1}',
    "surrogate pair": '"\\ud83d\\ude00"',
    **{f"{n} arrays deep": "[" * n + "]" * n for n in (125, 126)},
    **{f"{n} objects deep": '{"a":' * n + "1" + "}" * n for n in (125, 126)},
}


_W = '{"w": {"dtype": "F32", "shape": [2], '
WHOLE_HEADERS = {  # serde reads -0 as a float: no size or offset
    "-0 offset": _W + '"data_offsets": [-0, 8]}}',
    "-0 dimension": '{"w": {"dtype": "F32", "shape": [2, -0], "data_offsets": [0, 0]}, "v": '
    + json.dumps(_entry())
    + "}",
    "-0 in a name": '{"w-0": ' + json.dumps(_entry()) + "}",
    "-0 ignored": _W + '"data_offsets": [0, 8], "x": -0}}',
    "lone surrogate field name": _W + '"data_offsets": [0, 8], "\\udc80": 1}}',
}


def assert_read_as_load_file_reads(path: Path) -> None:
    """sa3loader accepts the file exactly where safetensors' load_file (upstream's read) does."""
    from safetensors.torch import load_file

    try:
        loaded = load_file(str(path))
    except Exception:  # safetensors' own error types
        with pytest.raises(HeaderError):
            read_header(path)
    else:
        assert {e.name: e.shape for e in read_header(path).entries} == {
            k: tuple(v.shape) for k, v in loaded.items()
        }


@pytest.mark.parametrize("case", sorted(WHOLE_HEADERS))
def test_a_header_is_accepted_exactly_where_safetensors_accepts_it(tmp_path, case):
    """Differential, against load_file: -0 (serde's float) in a size or an offset, a lone
    surrogate in an ignored field's name (an outside attack: sa3loader loaded both)."""
    assert_read_as_load_file_reads(_file(tmp_path, WHOLE_HEADERS[case], b"\0" * 8))


@pytest.mark.parametrize("case", sorted(EXTRA_FIELDS))
def test_a_field_safetensors_ignores_is_read_as_its_parser_reads_it(tmp_path, case):
    """An entry's other field is parsed whole by safetensors' parser (serde_json), which refuses
    NaN, numbers past f64, lone surrogates and nesting past 127; sa3loader loaded such files
    (an outside attack) where upstream's load_file raises. Accepted exactly where load_file is."""
    header = '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + EXTRA_FIELDS[case] + "}}"
    assert_read_as_load_file_reads(_file(tmp_path, header, b"\0" * 8))


def test_a_key_given_twice_inside_an_ignored_field_is_refused_stricter_than_safetensors(tmp_path):
    """safetensors takes the last of a key given twice; sa3loader refuses any key given twice (a
    typed error, never another reading of the file than upstream's)."""
    from safetensors.torch import load_file

    path = _file(
        tmp_path,
        '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": {"a": 1, "a": 2}}}',
        b"\0" * 8,
    )
    assert list(load_file(str(path))) == ["w"]
    with pytest.raises(HeaderError, match="duplicate key"):
        read_header(path)


def test_a_header_above_the_limit_is_refused_before_it_is_read(tmp_path, monkeypatch):
    """The file holds the bytes, but safetensors would not read such a header: neither do we."""
    path = tmp_path / "big-header.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1))
        f.truncate(8 + MAX_HEADER_BYTES + 1 + 8)  # sparse: nothing of it is written
    read, real_preadv = [], os.preadv

    def counted(fd, buffers, offset):
        read.append(sum(len(b) for b in buffers))
        return real_preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", counted)
    with pytest.raises(HeaderError, match=f"above the {MAX_HEADER_BYTES}-byte limit") as err:
        read_header(path)
    assert str(path) in str(err.value)
    assert read == [8]  # the length field only


@pytest.mark.parametrize("size", [0, 3, 7])
def test_tiny_files(tmp_path, size):
    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"\0" * size)
    with pytest.raises(HeaderError):
        read_header(path)


@pytest.mark.parametrize(
    "make, follow, kind, errno_, words",
    [
        (lambda p: None, True, "CheckpointNotFoundError", errno.ENOENT, "no such checkpoint file"),
        (lambda p: p.mkdir(), True, "CheckpointIsADirectoryError", errno.EISDIR, "is a directory, not a"),
        (lambda p: os.mkfifo(p), True, "FileAccessError", errno.EINVAL, "not a regular file"),  # no hang
        (lambda p: p.symlink_to(p.with_name("x")), False, "FileAccessError", errno.ELOOP, "cannot open"),
    ],
    ids=["missing", "directory", "fifo", "symlink-refused"],
)
def test_every_failure_to_open_is_typed_and_names_the_file(tmp_path, make, follow, kind, errno_, words):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(Sa3LoaderError) as err:
        open_for_reading(str(path), follow_symlinks=follow)
    assert type(err.value).__name__ == kind and isinstance(err.value, OSError)
    assert (err.value.filename, err.value.errno) == (str(path), errno_)
    assert str(err.value).startswith(f"{path}: {words}")


def test_permission_denied_is_typed_and_names_the_file(tmp_path, monkeypatch):
    """As the OS says it (root may open anything, so the open itself is made to refuse)."""

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(CheckpointPermissionError) as err:
        open_for_reading(str(tmp_path / "m.safetensors"))
    assert (err.value.filename, err.value.errno) == (str(tmp_path / "m.safetensors"), errno.EACCES)
    assert str(err.value) == f"{tmp_path / 'm.safetensors'}: permission denied (Permission denied)"


def test_a_file_is_opened_read_only_and_non_blocking(tmp_path):
    path = save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    fd = open_for_reading(str(path))
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        assert flags & os.O_ACCMODE == os.O_RDONLY and flags & os.O_NONBLOCK
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(fd)
    with pytest.raises(IsADirectoryError):  # the builtin types still catch them
        read_header(tmp_path)


def test_file_with_no_tensors(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_file({}, str(path))
    assert read_header(path).entries == ()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=st.binary(max_size=300), extra=st.integers(min_value=0, max_value=64))
def test_fuzz_random_bytes_never_crash(raw, extra):
    try:
        parse_header(raw, path="fuzz", file_size=8 + len(raw) + extra)
    except HeaderError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=10,
)
entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "BOOL", "X"]),
        "shape": st.lists(st.integers(-2, 5), max_size=3),
        "data_offsets": st.lists(st.integers(-4, 64), min_size=1, max_size=3),
    }
)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(st.text(max_size=4), entries | json_values, max_size=4),
    data_size=st.integers(0, 64),
)
def test_fuzz_structured_headers(header, data_size):
    raw = json.dumps(header).encode()
    try:
        parsed = parse_header(raw, path="fuzz", file_size=8 + len(raw) + data_size)
    except HeaderError:
        return
    # Whatever is accepted is self-consistent: contiguous and inside the file.
    position = 0
    for entry in parsed.entries:
        assert entry.begin == position and entry.end >= entry.begin
        position = entry.end
    assert position == data_size


def every_dtype() -> dict[str, torch.Tensor]:
    """One tensor of each dtype safetensors stores and this torch has (F4 packs two per byte)."""
    gen = torch.Generator().manual_seed(5)
    out = {}
    for st_name, dtype in TORCH_DTYPES.items():
        high = 2 if dtype == torch.bool else 256  # any other byte is not a bool
        raw = torch.randint(0, high, (3, 4 * dtype.itemsize), dtype=torch.uint8, generator=gen)
        out[f"t.{st_name.lower()}"] = raw.view(dtype)
    return out


def test_every_dtype_is_laid_out_read_and_converted_like_safetensors(tmp_path):
    from safetensors.torch import load_file
    from support.siblings import resolve_sibling

    from sa3loader import load_into_module

    tensors = every_dtype()
    assert {"F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F4"} <= set(TORCH_DTYPES)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path))
    header = read_header(path)
    prefix, _ = layout([(e.name, e.dtype, e.shape) for e in header.entries], {})
    assert prefix == path.read_bytes()[: len(prefix)]  # save_file's order, F4 and E8M0 included
    module = torch.nn.Sequential()
    holder = torch.nn.Module()
    for name, value in tensors.items():
        holder.register_buffer(
            name.split(".")[1], torch.zeros_like(value.view(torch.uint8)).view(value.dtype)
        )
    module.add_module("t", holder)
    result = load_into_module(module, path)
    assert result.unexpected_keys == result.mismatched_keys == []
    expected = load_file(str(path))
    for name, value in module.state_dict().items():
        assert value.dtype == expected[name].dtype and value.shape == expected[name].shape, name
        assert torch.equal(value.view(torch.uint8), expected[name].view(torch.uint8)), name
    resolve_sibling(header, str(tmp_path / "cache"))  # nothing to convert: loaded as is
    tensors["w"] = torch.randn(4)
    save_file(tensors, str(path))
    outcome = resolve_sibling(read_header(path), str(tmp_path / "cache"))
    sibling = load_file(outcome.sibling.path)
    for name, value in tensors.items():
        want = value.half() if value.dtype == torch.float32 else value
        assert torch.equal(sibling[name].view(torch.uint8), want.view(torch.uint8)), name


@pytest.mark.parametrize(
    "bad",
    [
        {"caf\udce9": _entry()},
        {"__metadata__": {"k\udc80": "v"}, "a": _entry()},
        {"a": _entry("F4", (3,), (0, 1))},
        {"a": _entry("F6_E2M3", (4,), (0, 3))},
    ],
    ids=["lone-surrogate-name", "lone-surrogate-metadata", "odd-f4", "f6-torch-lacks"],
)
def test_headers_safetensors_refuses_are_refused(tmp_path, bad):
    path = _file(tmp_path, json.dumps(bad), b"\0" * 8)
    with pytest.raises(HeaderError, match="bad.safetensors"):
        read_header(path)


@pytest.mark.parametrize(
    ("shape", "read"),
    [
        ((0, 1 << 64), False),  # not a 64-bit number: safetensors refuses the header
        ((0, 1 << 63), False),  # torch's dimensions are int64: load_file fails in torch
        ((1 << 40, 1 << 40, 0), False),  # safetensors' count overflows before it reaches the 0
        ((1 << 32, 1 << 32, 0), False),  # ... reaches 2**64 exactly
        ((1 << 31, 1 << 32, 0), True),  # 2**63, then 0
        ((0, (1 << 63) - 1), True),
        ((0, 1 << 40, 1 << 40), True),  # 0 first: the count never grows
        ((3, 0), True),
    ],
)
def test_zero_element_shapes_are_read_where_safetensors_reads_them(tmp_path, shape, read):
    """A zero-element tensor has no bytes to check its shape against: the shape alone decides."""
    path = _file(tmp_path, json.dumps({"a": _entry(shape=shape, offsets=(0, 0))}))
    if read:
        assert load_file(str(path))["a"].shape == shape
        assert read_header(path).by_name["a"].shape == shape
        return
    with pytest.raises(Exception):  # noqa: B017 (safetensors' or torch's own error)
        load_file(str(path))
    with pytest.raises(HeaderError, match=r"bad.safetensors.*'a'.*(2\*\*63|overflows 64 bits)"):
        read_header(path)


@pytest.mark.parametrize("failure", ["symlink-loop", "permission", "read-error"])
def test_os_failures_are_typed_and_name_the_file(tmp_path, monkeypatch, failure):
    import errno
    import os

    import sa3loader

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4)}, str(path))
    if failure == "symlink-loop":
        path.unlink()
        path.symlink_to(tmp_path / "other.safetensors")
        (tmp_path / "other.safetensors").symlink_to(path)
        builtin = OSError
    elif failure == "permission":
        real_open = os.open

        def refuse(p, *args, **kwargs):
            if os.fspath(p) == str(path):
                raise PermissionError(errno.EACCES, "Permission denied")
            return real_open(p, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
        builtin = PermissionError
    else:
        monkeypatch.setattr(os, "preadv", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
        builtin = OSError
    with pytest.raises(sa3loader.Sa3LoaderError, match="model.safetensors") as err:
        sa3loader.load_into_module(torch.nn.Linear(2, 2), path)
    assert isinstance(err.value, builtin)


def test_a_sibling_header_over_the_limit_loads_fp32_and_leaves_nothing(ckpt, tmp_path, monkeypatch, caplog):
    """Near safetensors' 100 MB header limit, our metadata would push the sibling's header over."""
    source_header = read_header(ckpt).header_size
    monkeypatch.setitem(_faults.tunings, "max_header_bytes", source_header + 16)  # the source fits, ours not
    before = set(tmp_path.rglob("*"))
    for _ in range(2):
        model = load_toy(ckpt, tmp_path / "cache")
        info = sa3loader.last_load_info()
        assert info.sibling is None and not info.converted and "limit" in info.reason
        assert_same_model(model, reference(ckpt))
    infrastructure = {"index", "CACHEDIR.TAG"}  # the cache dir's own, made by any load
    created = {
        p for p in set(tmp_path.rglob("*")) - before if p.is_file() and not infrastructure & set(p.parts)
    }
    assert created == set(), created
    assert len([r for r in caplog.records if "limit" in r.getMessage()]) == 1


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
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
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
        (tmp,) = tmp_path.rglob("*.incomplete-*")
        with open(tmp, "r+b") as f:
            f.write(b"\xff" * 8)

    with caplog.at_level(logging.WARNING, logger="sa3loader"), injected(at("written", scribble)):
        model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.sibling is None and "cannot be read back" in info.reason
    assert any("cannot be read back" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists() and not list(
        tmp_path.rglob("*.incomplete-*")
    )
    assert_same_model(model, reference(ckpt))


@pytest.mark.parametrize("kind", ["zip", "pickle", "text"])
def test_other_formats_are_named_before_any_header_arithmetic(tmp_path, kind):
    import pickle

    path = tmp_path / "model.ckpt"
    if kind == "zip":
        torch.save({"w": torch.ones(2)}, str(path))
    elif kind == "pickle":
        path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    else:
        path.write_text("this is a README, not weights\n" * 50)
    with pytest.raises(sa3loader.HeaderError, match=r"model\.ckpt: not a safetensors file") as err:
        sa3loader.load_into_module(torch.nn.Linear(2, 2), path)
    assert {"zip": "zip archive", "pickle": "pickle", "text": "text"}[kind] in str(err.value)
    assert "claims" not in str(err.value)


def header_error(path: Path) -> HeaderError:
    with pytest.raises(HeaderError) as caught:
        read_header(path)
    assert caught.value.filename == str(path)  # every refusal names the file
    return caught.value


def test_each_refusal_of_a_file_names_it_and_says_what_is_wrong(tmp_path):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"\x05\x00")
    assert "2 bytes is too small" in str(header_error(path))
    path.write_bytes(bytes(8))  # a length field and nothing else: an empty header, not too small
    assert "too small" not in str(header_error(path))
    path.write_bytes(struct.pack("<Q", 12) + b"{}")  # says 12 header bytes, has 2: cut off
    assert "ends inside its 12-byte header" in str(header_error(path))
    path.write_bytes(struct.pack("<Q", 12) + b"[]")  # no header's first byte
    assert "not a safetensors file" in str(header_error(path))
    path.write_bytes(b"\x80\x02" + bytes(6) + bytes(640))  # a pickle's first bytes, as a length: 640
    assert "pickle" in str(header_error(path)).lower()


def test_the_header_limit_is_safetensors_own(tmp_path):
    path = tmp_path / "m.safetensors"
    for size, over in ((MAX_HEADER_BYTES, False), (MAX_HEADER_BYTES + 1, True)):
        with open(path, "wb") as f:  # sparse: the bytes are there, zeros
            f.write(struct.pack("<Q", size))
            f.truncate(8 + size + 8)
        assert ("above the" in str(header_error(path))) is over


def test_a_file_touched_since_it_was_opened_counts_as_changed(tmp_path):
    from sa3loader import CheckpointChangedError
    from sa3loader._format import check_unchanged, open_header

    path = save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with open_header(path) as header:
        check_unchanged(header)
        stat = os.stat(path)
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))  # same bytes, new mtime
        with pytest.raises(CheckpointChangedError, match="rewritten while it was being read") as caught:
            check_unchanged(header)
        assert caught.value.filename == str(path)
    with pytest.raises(ValueError, match="closed"):
        header.handle.fileno()  # the block closed its descriptor
    check_unchanged(read_header(path))  # nothing open: nothing to check


def test_a_republish_over_the_name_is_no_change_and_a_rewrite_that_keeps_the_mtime_is(tmp_path):
    """``FileHandle.changed``: a new file renamed over the name moves the old one's ctime and takes
    a link away (its bytes are intact); a ctime moved with the link count kept is a rewrite."""
    from sa3loader._format import FileHandle

    path = save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    with FileHandle(str(path)) as handle:
        time.sleep(0.02)
        os.replace(save({"w": torch.zeros(2)}, tmp_path / "new.safetensors"), path)
        assert not handle.changed()
    with FileHandle(str(path)) as handle:
        time.sleep(0.02)
        os.chmod(path, 0o600)  # the ctime moves, nothing else
        assert handle.changed()
    with FileHandle(str(path)) as handle:
        time.sleep(0.02)
        os.link(path, tmp_path / "kept.safetensors")  # it has a name still: a rewrite may hide
        assert handle.changed()
    with FileHandle(str(path)) as handle:
        time.sleep(0.02)
        os.replace(save({"w": torch.ones(2)}, tmp_path / "new.safetensors"), path)  # one of two names
        assert handle.changed()
    with FileHandle(str(tmp_path / "kept.safetensors")) as handle:
        time.sleep(0.02)
        os.unlink(tmp_path / "kept.safetensors")  # its last name
        assert not handle.changed()


def test_a_failed_read_is_typed_and_says_where(tmp_path, monkeypatch):
    from sa3loader._format import preadv_exact

    def fail(fd, buffers, offset):
        raise OSError(errno.EIO, "Input/output error")

    path = save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    monkeypatch.setattr(os, "preadv", fail)
    with pytest.raises(sa3loader.FileAccessError) as err, open(path, "rb") as f:
        preadv_exact(f.fileno(), [memoryview(bytearray(4))], 8, str(path))
    assert (err.value.filename, err.value.errno) == (str(path), errno.EIO)
    assert str(err.value) == f"{path}: read failed at byte 8 (Input/output error)"


def test_reads_go_on_from_where_a_short_read_ended_and_stop_at_the_end(tmp_path, monkeypatch):
    from sa3loader._format import TruncatedFileError, pieces_of, preadv_exact

    path = tmp_path / "f"
    path.write_bytes(bytes(range(100)))
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, offset: real(fd, [bufs[0][:3]], offset))
    with open(path, "rb") as f:
        views = [memoryview(bytearray(5)), memoryview(bytearray(4))]
        preadv_exact(f.fileno(), views, 10, str(path))
        assert bytes(views[0]) + bytes(views[1]) == bytes(range(10, 19))
        with pytest.raises(TruncatedFileError, match="truncated at byte 100") as err:
            preadv_exact(f.fileno(), [memoryview(bytearray(5))], 98, str(path))
        assert err.value.filename == str(path)
    assert list(pieces_of(10, 25, 10)) == [(10, 10), (20, 10), (30, 5)]


def test_a_symlink_is_refused_where_links_are_not_followed(tmp_path):
    path = save({"w": torch.ones(2)}, tmp_path / "m.safetensors")
    (tmp_path / "link.safetensors").symlink_to(path)
    assert read_header(tmp_path / "link.safetensors").entries == read_header(path).entries
    with pytest.raises(Sa3LoaderError):
        read_header(tmp_path / "link.safetensors", follow_symlinks=False)

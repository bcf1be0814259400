"""Cache behaviour on a toy SA3-shaped model (no upstream needed)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import load_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model, bits, writable
from support.faults import faked, mounted
from support.loads import load_toy
from support.toymodel import build, reference

import sa3loader
from sa3loader import _faults
from sa3loader._format import read_header
from sa3loader._index import Index


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    return save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")


@pytest.mark.parametrize("half", [True, False])
def test_toy_model_matches_plain_torch_recipe(ckpt, tmp_path, half):
    model = load_toy(ckpt, tmp_path / "cache", half)
    assert sa3loader.last_load_info().build == "fast"
    assert_same_model(model, reference(ckpt, half))
    assert model.blocks[0].rope.scale.dtype == (torch.float16 if half else torch.float32)  # non-persistent


def test_first_load_converts_second_does_not(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1 and sa3loader.last_load_info().converted
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1 and sa3loader.last_load_info().cache_hit
    rows = Index(str(tmp_path / "cache")).items()
    assert [key for key, _ in rows] == [os.path.realpath(ckpt)]
    row = rows[0][1]
    assert row["sibling"]["path"] == str(tmp_path / "model.fp16.safetensors")
    assert row["sibling"]["size"] == os.path.getsize(tmp_path / "model.fp16.safetensors")
    assert row["source"]["size"] == os.path.getsize(ckpt)


def test_fp32_load_never_creates_a_sibling(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache", half=False)
    assert conversions == []
    assert not (tmp_path / "model.fp16.safetensors").exists()


def rewrite_same_size(path, seed, keep_mtime):
    st = os.stat(path)
    torch.manual_seed(0)
    save(random_like_state(build(), seed=seed), path)
    assert os.path.getsize(path) == st.st_size
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    else:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new-mtime", "mtime-restored"])
def test_source_rewritten_in_place_is_reconverted(ckpt, tmp_path, conversions, keep_mtime):
    load_toy(ckpt, tmp_path / "cache")
    rewrite_same_size(ckpt, seed=99, keep_mtime=keep_mtime)
    model = load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 2
    assert_same_model(model, reference(ckpt))


@pytest.mark.parametrize("damage", ["delete", "truncate", "flip-header", "other-checkpoint"])
def test_damaged_sibling_is_reconverted(ckpt, tmp_path, conversions, damage):
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / "model.fp16.safetensors"
    if damage == "delete":
        sibling.unlink()
    elif damage == "truncate":
        os.truncate(writable(sibling), os.path.getsize(sibling) // 2)
    elif damage == "flip-header":
        raw = bytearray(sibling.read_bytes())
        raw[20] ^= 0x01
        writable(sibling).write_bytes(bytes(raw))
    else:  # another valid sa3loader sibling, of a different source
        other = tmp_path / "other" / "model.safetensors"
        other.parent.mkdir()
        torch.manual_seed(0)
        save(random_like_state(build(), seed=5), other)
        load_toy(other, tmp_path / "cache")
        shutil.copyfile(other.parent / "model.fp16.safetensors", writable(sibling))
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def test_copied_source_is_revalidated_not_reconverted(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache")
    st = os.stat(ckpt)
    copy = tmp_path / "copy.tmp"
    shutil.copyfile(ckpt, copy)
    os.replace(copy, ckpt)  # new inode and ctime, same bytes
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(ckpt).st_ino != st.st_ino
    load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert len(conversions) == 1 and info.cache_hit and "revalidated" in info.events
    row = Index(str(tmp_path / "cache")).get(os.path.realpath(ckpt))
    assert row["source"]["inode"] == os.stat(ckpt).st_ino


def test_lost_index_adopts_the_sibling(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "cache")
    shutil.rmtree(tmp_path / "cache")
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1 and "adopted" in sa3loader.last_load_info().events


def test_two_cache_dirs_keep_their_own_rows(ckpt, tmp_path, conversions):
    load_toy(ckpt, tmp_path / "a")
    assert Index(str(tmp_path / "b")).items() == []
    load_toy(ckpt, tmp_path / "b")  # adopts the shared sibling beside the source, writes its own row
    assert len(conversions) == 1
    assert len(Index(str(tmp_path / "a")).items()) == 1 and len(Index(str(tmp_path / "b")).items()) == 1


def test_read_only_source_dir_puts_sibling_in_each_cache(ckpt, tmp_path, conversions, monkeypatch):
    # Tests run as root, who can write anywhere: make the source dir read-only by decree.
    with faked(dir_writable=lambda d, real: d != str(tmp_path) and real):
        for name in ("a", "b"):
            model = load_toy(ckpt, tmp_path / name)
            assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / name))
            assert_same_model(model, reference(ckpt))
    assert len(conversions) == 2
    assert not (tmp_path / "model.fp16.safetensors").exists()


def test_foreign_fp16_file_is_never_touched(ckpt, tmp_path, conversions):
    foreign = tmp_path / "model.fp16.safetensors"
    foreign.write_bytes(b"diffusers-style fp16 weights, not ours")
    model = load_toy(ckpt, tmp_path / "cache")
    assert foreign.read_bytes() == b"diffusers-style fp16 weights, not ours"
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(tmp_path / "cache"))
    assert_same_model(model, reference(ckpt))
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1


def hub_snapshot(tmp_path, ckpt, revision):
    repo = tmp_path / "hub" / "models--org--sa3"
    blob = repo / "blobs" / "abc123"
    if not blob.exists():
        blob.parent.mkdir(parents=True)
        shutil.copyfile(ckpt, blob)
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(os.path.relpath(blob, snap))
    return snap / "model.safetensors"


def test_hub_cache_sibling_goes_to_cache_and_follows_the_blob(ckpt, tmp_path, conversions):
    first = hub_snapshot(tmp_path, ckpt, "rev1")
    second = hub_snapshot(tmp_path, ckpt, "rev2")
    model = load_toy(first, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(tmp_path / "cache"))
    assert not any("fp16" in p.name for p in (tmp_path / "hub").rglob("*"))
    assert_same_model(model, reference(ckpt))
    load_toy(second, tmp_path / "cache")
    assert len(conversions) == 1 and sa3loader.last_load_info().sibling == info.sibling


def test_mutating_a_loaded_parameter_leaves_the_sibling_unchanged(ckpt, tmp_path):
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / "model.fp16.safetensors"
    before = sibling.read_bytes()
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    assert sibling.read_bytes() == before


@pytest.mark.parametrize("asked", ["argument", "environment"])
def test_verify_catches_a_flipped_data_byte(ckpt, tmp_path, conversions, monkeypatch, asked):
    load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    raw[-5] ^= 0xFF
    writable(sibling).write_bytes(bytes(raw))
    if asked == "environment":
        monkeypatch.setenv("SA3LOADER_VERIFY", "1")
    model = load_toy(ckpt, tmp_path / "cache", **({"verify": True} if asked == "argument" else {}))
    assert len(conversions) == 2 and sa3loader.last_load_info().converted
    assert_same_model(model, reference(ckpt))


def test_factory_that_reads_parameters_falls_back_to_the_faithful_build(ckpt, tmp_path):
    def reading_factory(config):
        model = build(config)
        model.initial_norm = float(model.blocks[0].ff.weight.detach().norm())  # needs real values
        return model

    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=reading_factory
    )
    info = sa3loader.last_load_info()
    assert info.build == "faithful" and "needs real parameters" in info.fallback
    torch.manual_seed(0)
    ref = reading_factory({})
    ref.load_state_dict(load_file(str(ckpt)), strict=False)
    assert_same_model(model, ref.eval().requires_grad_(False).half())
    assert model.initial_norm == ref.initial_norm


def test_fingerprint_sees_a_change_in_any_tensor(tmp_path):
    """Small tensors are hashed whole; large ones at spots including their first and last byte."""
    from sa3loader._format import read_header
    from sa3loader._sibling import WHOLE_TENSOR_BYTES, fingerprint

    big = WHOLE_TENSOR_BYTES // 4 + 1000  # float32 elements: just over the whole-hash limit
    tensors = {
        "a.bias": torch.randn(7),
        "b.weight": torch.randn(big),
        "c.norm": torch.randn(300),
        "d.empty": torch.empty(0),
        "e.weight": torch.randn(WHOLE_TENSOR_BYTES // 4),
    }
    path = save(tensors, tmp_path / "model.safetensors")
    header = read_header(path)
    original = fingerprint(header)
    spots = []
    for entry in header.entries:
        start = header.data_start + entry.begin
        if entry.nbytes <= WHOLE_TENSOR_BYTES:
            spots += [(entry.name, start + k) for k in range(0, entry.nbytes, 997)]
        else:
            spots += [(entry.name, start), (entry.name, start + entry.nbytes - 1)]
    assert {name for name, _ in spots} == {"a.bias", "b.weight", "c.norm", "e.weight"}
    with open(path, "r+b") as f:
        for name, offset in spots:
            f.seek(offset)
            byte = f.read(1)[0]
            f.seek(offset)
            f.write(bytes([byte ^ 0x40]))  # one bit flipped
            f.flush()
            assert fingerprint(read_header(path)) != original, (
                f"a change in {name} at byte {offset} was missed"
            )
            f.seek(offset)
            f.write(bytes([byte]))
            f.flush()
    assert fingerprint(read_header(path)) == original


def test_copied_source_differing_in_one_small_tensor_is_reconverted(tmp_path, conversions):
    """Same size, header and mtime (cp -p of a rebuilt file): a change in one small tensor,
    outside where the old 64-window fingerprint looked, must not serve the old weights."""
    from sa3loader._format import read_header

    config = {"dim": 256, "depth": 8}
    torch.manual_seed(0)
    state = random_like_state(build(config), seed=3)
    ckpt = save(state, tmp_path / "model.safetensors")
    header = read_header(ckpt)
    span, window = header.file_size - 65536, 65536
    windows = [(span * i // 63, span * i // 63 + window) for i in range(64)]
    hidden = next(
        e
        for e in header.entries
        if e.nbytes >= 4
        and not any(a < header.data_start + e.end and header.data_start + e.begin < b for a, b in windows)
    )
    factory = lambda cfg: build(config)  # noqa: E731
    load_half = lambda: sa3loader.load_diffusion_cond(  # noqa: E731
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=factory
    )
    load_half()
    st = os.stat(ckpt)
    state[hidden.name] = state[hidden.name] + 1
    rebuilt = save(state, tmp_path / "rebuilt.safetensors")
    assert read_header(rebuilt).sha256 == header.sha256 and rebuilt.stat().st_size == st.st_size
    os.utime(rebuilt, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.replace(rebuilt, ckpt)  # a new inode, as cp -p or an image layer gives
    torch.manual_seed(0)
    model = load_half()
    info = sa3loader.last_load_info()
    assert len(conversions) == 2 and info.converted, (hidden.name, info.reason, info.events)
    assert_same_model(model, reference(ckpt, config=config))


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


needs_proc_maps = pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="no /proc/self/maps")


class WithHalfWeights(torch.nn.Module):
    """A parameter stored as F16 in the checkpoint: taken as is by a model_half=True hit."""

    def __init__(self) -> None:
        super().__init__()
        self.fp16 = torch.nn.Linear(64, 64).half()
        self.fp32 = torch.nn.Linear(64, 64)


@needs_proc_maps
@pytest.mark.parametrize("how", ["fp32", "hit", "load_into_module"])
def test_a_rewrite_of_the_checkpoint_never_changes_a_loaded_model(tmp_path, how):
    """The user's checkpoint is read, never mapped: an in-place rewrite (cp over it, r+b) or a
    truncation after the load leaves the model as loaded (a mapping would change or SIGBUS)."""
    torch.manual_seed(0)
    ckpt = save(random_like_state(WithHalfWeights(), seed=3), tmp_path / "model.safetensors")
    factory = lambda config: WithHalfWeights()  # noqa: E731
    half = how == "hit"
    if how == "load_into_module":
        model = WithHalfWeights()
        sa3loader.load_into_module(model, ckpt)
    else:
        for _ in range(2):  # conversion, then the hit
            model = sa3loader.load_diffusion_cond(
                {}, ckpt, "cpu", half, cache_dir=tmp_path / "c", model_factory=factory
            )
    expected = {k: v.half() if half else v for k, v in safetensors_load(ckpt.read_bytes()).items()}
    assert str(ckpt) not in mapped_files()
    with open(ckpt, "r+b") as f:  # what training jobs and `cp new old` do
        f.seek(read_header(ckpt).data_start)
        f.write(b"\x7f" * (os.path.getsize(ckpt) - read_header(ckpt).data_start))
    os.truncate(ckpt, 1000)
    for key, value in model.state_dict().items():
        assert torch.equal(bits(value), bits(expected[key])), key


@needs_proc_maps
def test_a_hit_maps_only_its_own_read_only_sibling(ckpt, tmp_path):
    os.chmod(ckpt, 0o640)
    load_toy(ckpt, tmp_path / "cache")
    model = load_toy(ckpt, tmp_path / "cache")
    sibling = tmp_path / "model.fp16.safetensors"
    assert sa3loader.last_load_info().io == "mmap"
    assert str(sibling) in mapped_files() and str(ckpt) not in mapped_files()
    assert os.stat(sibling).st_mode & 0o777 == 0o440  # the source's mode minus every write bit
    del model


def test_convert_outputs_keep_the_source_mode(ckpt, tmp_path):
    from sa3loader._convert_dir import convert_file

    os.chmod(ckpt, 0o640)
    convert_file(str(ckpt), str(tmp_path / "out.safetensors"))
    assert os.stat(tmp_path / "out.safetensors").st_mode & 0o777 == 0o640


@pytest.mark.parametrize("io", ["mmap", "read"])
@pytest.mark.parametrize("command", ["clear", "unlink"])
def test_cache_commands_during_a_load_never_break_it(ckpt, tmp_path, command, io):
    """The load holds the sibling open from validation on: deleting its name mid-build is harmless."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = tmp_path / "model.fp16.safetensors"

    def factory_that_races(config):
        if command == "clear":
            _cache_admin.clear(str(cache))
        else:
            sibling.unlink()
        assert not sibling.exists()
        return build()

    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=cache, model_factory=factory_that_races, io=io
    )
    info = sa3loader.last_load_info()
    assert info.cache_hit and info.build == "fast" and info.io == io
    assert_same_model(model, reference(ckpt))


def test_prune_keeps_a_sibling_that_a_repointed_symlink_reuses(tmp_path):
    from sa3loader import _cache_admin

    torch.manual_seed(0)
    a = save(random_like_state(build(), seed=3), tmp_path / "a.safetensors")
    b = save(random_like_state(build(), seed=4), tmp_path / "b.safetensors")
    link = tmp_path / "model.safetensors"
    link.symlink_to(a.name)
    cache = tmp_path / "cache"
    load_toy(link, cache)
    link.unlink()
    link.symlink_to(b.name)  # the same sibling name now belongs to b
    load_toy(link, cache)
    sibling = tmp_path / "model.fp16.safetensors"
    pruned = _cache_admin.prune(str(cache)).rows
    assert [e.status for e in pruned] == ["stale"] and sibling.exists()
    model = load_toy(link, cache)
    assert sa3loader.last_load_info().cache_hit
    assert_same_model(model, reference(b))


def test_model_and_model_safetensors_keep_their_own_siblings(tmp_path, conversions):
    torch.manual_seed(0)
    plain = save(random_like_state(build(), seed=3), tmp_path / "model")
    suffixed = save(random_like_state(build(), seed=4), tmp_path / "model.safetensors")
    for _ in range(2):
        for path in (plain, suffixed):
            assert_same_model(load_toy(path, tmp_path / "cache"), reference(path))
    assert len(conversions) == 2
    assert sorted(p.name for p in tmp_path.glob("*fp16*") if not p.name.endswith(".lock")) == [
        "model-fp16.safetensors",
        "model.fp16.safetensors",
    ]


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


@pytest.mark.parametrize("command", ["prune", "clear"])
def test_prune_and_clear_sweep_leftovers_but_not_a_running_conversion(tmp_path, command):
    """A SIGTERM mid-conversion leaves a temp file; locks and emptied dirs stay behind too."""
    import fcntl

    from sa3loader import _cache_admin

    torch.manual_seed(0)
    beside = save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")
    hub = tmp_path / "hub" / "models--o--n" / "snapshots" / "r" / "model.safetensors"
    hub.parent.mkdir(parents=True)
    save(random_like_state(build(), seed=4), hub)
    cache = tmp_path / "cache"
    load_toy(beside, cache)
    load_toy(hub, cache)
    killed = tmp_path / "model.fp16.safetensors.incomplete-999-deadbeef"
    killed.write_bytes(b"half a sibling")
    stray_dir = cache / "siblings" / "0123456789abcdef"
    stray_dir.mkdir()
    (stray_dir / "old.fp16.safetensors.incomplete-1-2").write_bytes(b"x")
    running_dir = cache / "siblings" / "fedcba9876543210"
    running_dir.mkdir()
    running = running_dir / "busy.fp16.safetensors.incomplete-5-6"
    running.write_bytes(b"being written")
    holder = os.open(running_dir / "busy.fp16.safetensors.lock", os.O_RDONLY | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)  # a conversion in progress
    try:
        if command == "prune":
            removals = _cache_admin.prune(str(cache)).removed
        else:
            removals = _cache_admin.clear(str(cache)).removed
        removed = [r.path for r in removals]
    finally:
        os.close(holder)
    assert not killed.exists() and not stray_dir.exists()
    assert str(killed) in removed and str(tmp_path / "model.fp16.safetensors.lock") in removed
    assert running.exists()  # its lock is held: never touched
    assert not list(tmp_path.glob("*.lock"))
    assert (tmp_path / "model.fp16.safetensors").exists() == (command == "prune")
    load_toy(beside, cache)  # and loading still works
    assert sa3loader.last_load_info().build == "fast"


@pytest.mark.parametrize(
    ("fstype", "io", "expected"),
    [
        ("nfs4", None, "read"),
        ("fuse.sshfs", None, "read"),
        ("cifs", "mmap", "mmap"),
        ("ext4", None, "mmap"),
    ],
)
def test_network_filesystems_are_read_not_mapped(ckpt, tmp_path, monkeypatch, fstype, io, expected):
    """mmap on NFS/SMB/FUSE is slow and dies with SIGBUS on a server hiccup: read there, unless asked."""
    from sa3loader._mounts import network_filesystem

    with mounted(tmp_path / "mountinfo", {tmp_path: fstype}):
        assert network_filesystem(str(ckpt)) == (None if fstype == "ext4" else fstype)
        for _ in range(2):  # conversion, then the hit
            model = load_toy(ckpt, tmp_path / "cache", io=io)
    assert sa3loader.last_load_info().cache_hit and sa3loader.last_load_info().io == expected
    assert (str(tmp_path / "model.fp16.safetensors") in mapped_files()) == (expected == "mmap")
    assert_same_model(model, reference(ckpt))


def test_the_cache_dir_carries_a_cachedir_tag(ckpt, tmp_path):
    load_toy(ckpt, tmp_path / "cache")
    tag = (tmp_path / "cache" / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55\n")


def test_cache_dir_variables_expand_tilde_and_vars(tmp_path, monkeypatch):
    from sa3loader._fsutil import resolve_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SA3LOADER_CACHE_DIR", "~/caches/$SA3_PART")
    monkeypatch.setenv("SA3_PART", "sa3")
    assert resolve_cache_dir() == str(tmp_path / "home" / "caches" / "sa3")
    monkeypatch.delenv("SA3LOADER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert resolve_cache_dir() == str(tmp_path / "home" / "xdg" / "sa3loader")

"""Environment faults: a full disk, read-only dirs, no home, no flock, a lock held too long, a cache
dir others control. The load still succeeds (with one warning) or fails with a typed error; nothing
is half-written.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.checkpoints import random_like_state, save
from support.child import digest
from support.compare import assert_same_model, writable
from support.loads import load_toy, make_ckpt, reference_digest
from support.siblings import resolve_sibling
from support.toymodel import build, reference

import sa3loader
from sa3loader import _cache_dir, _convert_dir, _faults
from sa3loader._format import read_header
from sa3loader._identity import is_sa3loader_file


def assert_fp32_fallback(ckpt: Path, cache: Path, caplog, expect: str) -> None:
    model = load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert info.sibling is None and not info.converted
    assert digest(model) == reference_digest(ckpt)
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and expect in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert not list(ckpt.parent.rglob("*.incomplete-*"))
    assert not (ckpt.with_name(".cache") / "sa3loader" / "model.fp16.safetensors").exists()


def test_enospc_during_write(tmp_path, monkeypatch, caplog):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    real_pwrite = os.pwrite
    written = {"n": 0}

    def full_disk(fd, data, offset):
        written["n"] += 1
        if written["n"] > 1:  # after the header: the data
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)  # the header's and every stripe's writer
    # Where the new file is written with pwrite: a mapped one's bytes are all taken before.
    monkeypatch.setitem(_faults.facts, "writes_in_place", lambda subject, real: False)
    assert_fp32_fallback(ckpt, tmp_path / "cache", caplog, "could not write")


@pytest.mark.parametrize("place", ["beside", "cache"])
def test_not_enough_free_space_up_front(tmp_path, monkeypatch, caplog, place):
    """fp32 is read, the message says why in plain words, and no folder is left for a sibling."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_PLACE", place)
    monkeypatch.setitem(_faults.facts, "free_bytes", lambda path, real: 1024)
    assert_fp32_fallback(ckpt, tmp_path / "cache", caplog, "not enough free space")
    reason = sa3loader.last_load_info().reason
    assert "checkpoint and 64 MiB to spare" in reason and "to spare need" not in reason
    assert not (tmp_path / ".cache").exists() and not list((tmp_path / "cache").glob("siblings/*"))


def test_read_only_source_and_unusable_cache_dir(tmp_path, monkeypatch, caplog):
    ckpt = make_ckpt(tmp_path / "src" / "model.safetensors")
    monkeypatch.setitem(_faults.facts, "dir_writable", lambda d, real: "src" not in d and real)
    not_a_dir = tmp_path / "cache-is-a-file"
    not_a_dir.write_text("x")
    assert_fp32_fallback(ckpt, not_a_dir, caplog, "cache-is-a-file is not a folder")


def test_no_home_falls_back_to_temp_with_a_warning(tmp_path, monkeypatch, caplog):
    for var in ("HOME", "XDG_CACHE_HOME", "SA3LOADER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    assert _cache_dir.resolve_cache_dir().startswith(str(tmp_path / "tmp"))
    assert "no usable home" in caplog.text


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP])
def test_flock_unsupported_still_loads(tmp_path, monkeypatch, caplog, code):
    ckpt = make_ckpt(tmp_path / "model.safetensors")

    def no_locks(fd, op):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted
    assert digest(model) == reference_digest(ckpt)
    assert len([r for r in caplog.records if "locking is not supported" in r.getMessage()]) == 1


def test_lock_timeout_raises_typed_error(tmp_path, monkeypatch):
    """flock locks belong to open file descriptions: one held here blocks the load's own."""
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "0.3")
    (tmp_path / ".cache" / "sa3loader").mkdir(parents=True)
    lock = os.open(
        str(ckpt.with_name(".cache") / "sa3loader" / "model.fp16.safetensors.lock"), os.O_RDWR | os.O_CREAT
    )
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with pytest.raises(sa3loader.LockTimeoutError) as err:
            load_toy(ckpt, tmp_path / "cache")
        assert isinstance(err.value, TimeoutError)
    finally:
        os.close(lock)


def no_home(monkeypatch, tmp_path) -> Path:
    for var in ("HOME", "XDG_CACHE_HOME", "SA3LOADER_CACHE_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os.path, "expanduser", lambda p: p)
    (tmp_path / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return tmp_path / "tmp" / f"sa3loader-{os.getuid()}"


def plant(fixed: Path, ckpt: Path) -> Path:
    """Another user's doing: a sibling with the victim's identity and other weights, in ``fixed``."""
    outcome = resolve_sibling(read_header(ckpt), str(fixed))
    planted = Path(outcome.sibling.path)
    assert str(planted).startswith(str(fixed))  # a hub-style source: the sibling went to the cache
    raw = bytearray(planted.read_bytes())
    raw[-64:] = b"\x11" * 64
    writable(planted).write_bytes(bytes(raw))
    return planted


PLANTED_BECAUSE = {
    "world-writable": "it is world-writable",
    "symlink": "it is a symlink",
    "other-owner": "it is owned by uid 65534",
    "a-file": "it cannot be created or written",
}


@pytest.mark.parametrize("how", sorted(PLANTED_BECAUSE))
def test_a_planted_fallback_cache_dir_is_never_used(tmp_path, monkeypatch, caplog, how):
    """Without a home the cache falls back to <tmp>/sa3loader-<uid>; someone else may have made it."""
    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    ckpt = make_ckpt(hub / "model.safetensors")  # in a hub cache: siblings go to the cache dir
    fixed = no_home(monkeypatch, tmp_path)
    if how == "a-file":
        fixed.write_bytes(b"not a dir")
    elif how == "symlink":
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        plant(elsewhere, ckpt)
        fixed.symlink_to(elsewhere)
    else:
        fixed.mkdir(mode=0o700)
        plant(fixed, ckpt)
        if how == "world-writable":
            fixed.chmod(0o777)
        elif os.getuid() == 0:
            os.chown(fixed, 65534, 65534)
        else:
            pytest.skip("only root can give a dir to another user")
    chosen = _cache_dir.resolve_cache_dir()
    assert chosen != str(fixed) and os.stat(chosen).st_mode & 0o777 == 0o700
    assert f"{fixed} is not usable ({PLANTED_BECAUSE[how]}); using {chosen}" in caplog.text
    model = load_toy(ckpt, Path(chosen))
    assert digest(model) == reference_digest(ckpt)
    assert not sa3loader.last_load_info().sibling.startswith(str(fixed) + os.sep)


def test_an_untrusted_cache_dir_is_ignored_unless_shared_on_purpose(tmp_path, monkeypatch, caplog):
    from sa3loader import cli

    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    ckpt = make_ckpt(hub / "model.safetensors")
    cache = tmp_path / "team-cache"
    cache.mkdir()
    planted = plant(cache, ckpt)
    cache.chmod(0o777)
    model = load_toy(ckpt, cache)
    assert digest(model) == reference_digest(ckpt)
    assert sa3loader.last_load_info().sibling is None  # nowhere trusted to write: fp32
    assert "ignoring the sa3loader cache dir" in caplog.text
    assert cli.main(["--cache-dir", str(cache), "cache", "clear"]) == 1
    assert planted.exists()
    monkeypatch.setenv("SA3LOADER_SHARED_CACHE", "1")  # a team cache, shared on purpose
    load_toy(ckpt, cache)
    assert sa3loader.last_load_info().sibling == str(planted)


def test_dirs_sa3loader_creates_are_private(tmp_path):
    hub = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc"
    ckpt = make_ckpt(hub / "model.safetensors")
    cache = tmp_path / "new" / "cache"
    load_toy(ckpt, cache)
    sibling = Path(sa3loader.last_load_info().sibling)
    for directory in (cache, cache / "index", sibling.parent, sibling.parent.parent):
        assert directory.stat().st_mode & 0o777 == 0o700, directory


def test_cache_dir_variables_expand_tilde_and_vars(tmp_path, monkeypatch):
    from sa3loader._cache_dir import resolve_cache_dir

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("SA3LOADER_CACHE_DIR", "~/caches/$SA3_PART")
    monkeypatch.setenv("SA3_PART", "sa3")
    assert resolve_cache_dir() == str(tmp_path / "home" / "caches" / "sa3")
    monkeypatch.delenv("SA3LOADER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "~/xdg")
    assert resolve_cache_dir() == str(tmp_path / "home" / "xdg" / "sa3loader")


def test_import_needs_no_upstream():
    code = "import sys, sa3loader; assert 'stable_audio_3' not in sys.modules; print(sa3loader.__all__)"
    from support.processes import torch_zygote  # a fresh process that has imported torch only

    assert torch_zygote().run("-c", code, env=dict(os.environ), timeout=120).returncode == 0


def test_missing_upstream_without_factory_is_a_clear_import_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_audio_3.factory", None)  # import now fails
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    with pytest.raises(ImportError) as err:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "cache")
    assert isinstance(err.value, sa3loader.UpstreamNotFoundError)
    assert "model_factory" in str(err.value)
    assert not (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


def test_disable_env_touches_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=build
    )
    assert sa3loader.last_load_info().build == "upstream"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert_same_model(model, reference(ckpt))


@pytest.mark.parametrize(
    "variable", ["SA3LOADER_CACHE_MAX=20 gallons", "SA3LOADER_PLACE=nowhere", "SA3LOADER_IO=direct"]
)
def test_disable_env_reads_no_other_setting(tmp_path, monkeypatch, variable):
    """Upstream's own loader uses none of them: a bad one fails the load without DISABLE only."""
    name, value = variable.split("=")
    monkeypatch.setenv(name, value)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    with pytest.raises(sa3loader.ConfigError):
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    torch.manual_seed(0)
    model = sa3loader.load_diffusion_cond(
        {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build
    )
    assert sa3loader.last_load_info().build == "upstream"
    assert_same_model(model, reference(ckpt))


def test_io_from_environment_and_bad_values(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_IO", "read")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    assert sa3loader.last_load_info().io == "read"
    monkeypatch.setenv("SA3LOADER_IO", "")
    sa3loader.load_diffusion_cond({}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build)
    assert sa3loader.last_load_info().io == "mmap"
    with pytest.raises(ValueError, match="io must be one of"):
        sa3loader.load_diffusion_cond(
            {}, ckpt, "cpu", True, cache_dir=tmp_path / "c", model_factory=build, io="fast"
        )


class Big(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(6000, 6000, bias=False)  # 144 MB of fp32: the sibling is 72 MB


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs of a chosen size")
def test_a_sibling_never_takes_the_space_the_next_checkpoint_needs(tmp_path, caplog):
    """A trainer saves a checkpoint every few minutes on a small volume; the eval job's first load
    must leave room for the next one: the sibling goes to the cache dir instead, and says so."""
    volume = tmp_path / "volume"
    volume.mkdir()
    source_mb, sibling_mb = 144, 72
    size_mb = source_mb + sibling_mb + 64 + source_mb // 2  # room for the sibling, not for both
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(volume)], capture_output=True
    )
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")
    try:
        ckpt = volume / "step_000011.safetensors"
        torch.manual_seed(0)
        save_file({"a.weight": torch.randn(6000, 6000)}, str(ckpt))
        with caplog.at_level(logging.INFO, logger="sa3loader"):
            sa3loader.load_diffusion_cond(
                {}, ckpt, "cpu", True, cache_dir=tmp_path / "cache", model_factory=lambda c: Big()
            )
            assert sa3loader.wait_for_publishing(60)
        info = sa3loader.last_load_info()
        assert info.converted and info.sibling.startswith(str(tmp_path / "cache"))
        assert any(
            "fp16 sibling at" in r.getMessage() and "not enough free space" in r.getMessage()
            for r in caplog.records
        )
        save_file({"a.weight": torch.randn(6000, 6000)}, str(volume / "step_000012.safetensors"))  # fits
    finally:
        subprocess.run(["umount", str(volume)], capture_output=True)


@pytest.mark.parametrize("length", [200, 248, 255])
@pytest.mark.parametrize("where", ["beside", "cache-dir"])
def test_a_checkpoint_with_the_longest_legal_name_gets_a_sibling(tmp_path, monkeypatch, length, where):
    """Every name sa3loader derives (sibling, lock, temp files) fits NAME_MAX, however long the
    checkpoint's name is (in bytes: ten 2-byte characters among them): a load converts, the
    next hits, and ``convert --in-place`` works."""
    folder = tmp_path / "ckpts"
    folder.mkdir()
    stem = "é" * 10 + "x" * (length - len(".safetensors") - 20)
    assert len(os.fsencode(stem + ".safetensors")) == length
    torch.manual_seed(0)
    ckpt = save(random_like_state(build(), seed=3), folder / (stem + ".safetensors"))
    if where == "cache-dir":
        monkeypatch.setitem(_faults.facts, "dir_writable", lambda d, real: d != str(folder) and real)
    load_toy(ckpt, tmp_path / "cache")
    first = sa3loader.last_load_info()
    assert first.converted and first.sibling is not None, first.reason
    assert (os.path.dirname(first.sibling) == str(folder / ".cache" / "sa3loader")) == (where == "beside")
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit
    assert_same_model(model, reference(ckpt))
    if where == "beside":
        _convert_dir.convert_file(str(ckpt), in_place=True)
        assert is_sa3loader_file(read_header(ckpt))


def test_a_checkpoint_whose_name_is_not_utf8_gets_a_sibling(tmp_path):
    """A file name is bytes on Linux: ``model-\\xff.safetensors`` converts, hits and gives the
    model a UTF-8 copy of it gives (safetensors' own load_file refuses the path)."""
    torch.manual_seed(0)
    plain = save(random_like_state(build(), seed=3), tmp_path / "plain.safetensors")
    odd = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/model-\xff.safetensors"))
    shutil.copyfile(plain, odd)
    load_toy(odd, tmp_path / "cache")
    assert sa3loader.last_load_info().converted, sa3loader.last_load_info().reason
    model = load_toy(odd, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit
    assert_same_model(model, reference(plain))


def test_place_cache_writes_nothing_beside_checkpoints(tmp_path, monkeypatch, caplog):
    """README: ``SA3LOADER_PLACE=cache`` puts every new sibling in the cache dir, says so at INFO,
    and still uses a sibling already beside a checkpoint; a bad value is a ConfigError."""
    folder = tmp_path / "ckpts"
    ckpt = make_ckpt(folder / "model.safetensors")
    other = make_ckpt(folder / "other.safetensors")
    load_toy(other, tmp_path / "cache")  # an older sibling, beside
    before = sorted(p.name for p in folder.iterdir())
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    with caplog.at_level(logging.INFO, logger="sa3loader"):
        model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(tmp_path / "cache"))
    assert "$SA3LOADER_PLACE=cache" in caplog.text
    assert sorted(p.name for p in folder.iterdir()) == before
    assert_same_model(model, reference(ckpt))
    load_toy(other, tmp_path / "cache")
    assert sa3loader.last_load_info().sibling == str(
        folder / ".cache" / "sa3loader" / "other.fp16.safetensors"
    )
    monkeypatch.setenv("SA3LOADER_PLACE", "elsewhere")
    with pytest.raises(sa3loader.ConfigError, match="SA3LOADER_PLACE"):
        load_toy(ckpt, tmp_path / "cache")


def test_nothing_sa3loader_writes_beside_checkpoints_shows_in_globs_or_newest_file_picks(tmp_path):
    """A trainer's folder after an eval load of each checkpoint: ``*`` and ``*.safetensors`` globs
    and "resume from the newest file" see only the user's checkpoints; the siblings and locks
    are in the hidden ``.cache/sa3loader/``, which convert DIR skips and cache scan finds."""
    import glob

    folder = tmp_path / "ckpts"
    steps = [make_ckpt(folder / f"step_{i:06d}.safetensors", seed=3 + i) for i in range(3)]
    for i, step in enumerate(steps):
        os.utime(step, (1_700_000_000 + i, 1_700_000_000 + i))  # saved in order, long ago
        load_toy(step, tmp_path / "cache")
        assert sa3loader.last_load_info().converted
    assert sorted(glob.glob(str(folder / "*"))) == [str(s) for s in steps]
    assert sorted(glob.glob(str(folder / "step_*.safetensors"))) == [str(s) for s in steps]
    newest = max((p for p in folder.iterdir() if p.is_file()), key=lambda p: p.stat().st_mtime)
    assert newest == steps[-1]
    hidden = folder / ".cache" / "sa3loader"
    assert sorted(p.name for p in hidden.iterdir()) == sorted(
        name for s in steps for name in (s.stem + ".fp16.safetensors", s.stem + ".fp16.safetensors.lock")
    )


def test_a_sibling_an_older_version_put_next_to_the_checkpoint_is_still_used(tmp_path, conversions):
    ckpt = make_ckpt(tmp_path / "model.safetensors")
    load_toy(ckpt, tmp_path / "cache")
    (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").rename(tmp_path / "model.fp16.safetensors")
    shutil.rmtree(tmp_path / ".cache")
    model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert (
        info.cache_hit and info.sibling == str(tmp_path / "model.fp16.safetensors") and len(conversions) == 1
    )
    assert_same_model(model, reference(ckpt))
    assert not (tmp_path / ".cache").exists()  # found, not moved or written


@pytest.mark.parametrize("folder_mode", [0o755, 0o750, 0o700])
def test_the_hidden_folder_is_as_readable_as_the_checkpoints_folder_and_no_wider(tmp_path, folder_mode):
    folder = tmp_path / "ckpts"
    ckpt = make_ckpt(folder / "model.safetensors")
    folder.chmod(folder_mode)
    old = os.umask(0o022)
    try:
        load_toy(ckpt, tmp_path / "cache")
    finally:
        os.umask(old)
    for hidden in (folder / ".cache", folder / ".cache" / "sa3loader"):
        assert hidden.stat().st_mode & 0o777 == folder_mode & 0o755


@pytest.mark.parametrize("planted", [".cache", ".cache/sa3loader"])
def test_a_symlink_at_the_hidden_folder_is_never_followed(tmp_path, planted):
    """In a shared folder, a link at ``.cache`` or ``.cache/sa3loader`` would send the sibling
    (and its lock) elsewhere: the load converts into the cache dir instead."""
    ckpt = make_ckpt(tmp_path / "ckpts" / "model.safetensors")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "ckpts" / planted
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(elsewhere, target_is_directory=True)
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / "cache"))
    assert list(elsewhere.rglob("*")) == []
    assert_same_model(model, reference(ckpt))


def test_commands_read_every_setting_with_disable_set(tmp_path, monkeypatch):
    """DISABLE switches loads to upstream's loader; a command (an image build's warm) still
    reads the others: the sibling goes where SA3LOADER_PLACE says."""
    from support.cli import run

    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    warmed = json.loads(run("--json", "warm", str(ckpt), cache=tmp_path / "c").stdout)
    assert warmed["sibling"].startswith(str(tmp_path / "c" / "siblings"))


def test_a_checkpoint_beside_the_cache_dir_puts_its_sibling_in_siblings_not_at_the_cache_dirs_top(tmp_path):
    """A checkpoint in ``~`` with the default cache dir ``~/.cache/sa3loader``: its hidden folder
    would be the cache dir itself, whose top holds only the index and ``siblings/`` (what
    ``warm --readable-by-all`` opens and checks). The sibling goes under ``siblings/``."""
    from sa3loader import cli

    home = tmp_path / "home"
    ckpt = make_ckpt(home / "model.safetensors")
    cache = home / ".cache" / "sa3loader"
    load_toy(ckpt, cache)
    sibling = Path(sa3loader.last_load_info().sibling)
    assert sa3loader.last_load_info().converted and sibling.parent.parent.parent == cache
    assert sorted(p.name for p in cache.iterdir()) == ["CACHEDIR.TAG", "index", "siblings"]
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all"]) == 0

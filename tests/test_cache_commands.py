"""Cache commands at any moment: ``cache clear`` or an unlink during a load never breaks it;
``prune`` keeps what a repointed symlink reuses; ``prune`` and ``clear`` sweep what killed
conversions left but never touch a running one; the cache dir carries a CACHEDIR.TAG."""

from __future__ import annotations

import os

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model
from support.loads import load_toy
from support.toymodel import build, reference

import sa3loader


@pytest.mark.parametrize("io", ["mmap", "read"])
@pytest.mark.parametrize("command", ["clear", "unlink"])
def test_cache_commands_during_a_load_never_break_it(ckpt, tmp_path, command, io):
    """The load holds the sibling open from validation on: deleting its name mid-build is harmless."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"

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
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    pruned = _cache_admin.prune(str(cache)).rows
    assert [e.status for e in pruned] == ["stale"] and sibling.exists()
    model = load_toy(link, cache)
    assert sa3loader.last_load_info().cache_hit
    assert_same_model(model, reference(b))


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
    killed = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.incomplete-999-deadbeef"
    killed.write_bytes(b"half a sibling")
    stray_dir = cache / "siblings" / "0123456789abcdef"
    stray_dir.mkdir()
    (stray_dir / "old.fp16.safetensors.incomplete-1-2a2a2a2a").write_bytes(b"x")
    running_dir = cache / "siblings" / "fedcba9876543210"
    running_dir.mkdir()
    running = running_dir / "busy.fp16.safetensors.incomplete-5-6b6b6b6b"
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
    assert (
        str(killed) in removed
        and str(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors.lock") in removed
    )
    assert running.exists()  # its lock is held: never touched
    assert not list(tmp_path.glob("*.lock"))
    assert (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists() == (command == "prune")
    load_toy(beside, cache)  # and loading still works
    assert sa3loader.last_load_info().build == "fast"


def test_the_cache_dir_carries_a_cachedir_tag(ckpt, tmp_path):
    load_toy(ckpt, tmp_path / "cache")
    tag = (tmp_path / "cache" / "CACHEDIR.TAG").read_text()
    assert tag.startswith("Signature: 8a477f597d28d172789f06886806bc55\n")


@pytest.mark.parametrize("command", ["load", "prune", "clear", "rm"])
def test_a_users_file_named_like_a_temp_file_is_never_removed(ckpt, tmp_path, command):
    """Only a name of exactly the shape sa3loader gives a temp file is taken for one: a user's
    ``<sibling>.incomplete-epoch3.safetensors`` (or one beside the checkpoint) is theirs."""
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    hidden = tmp_path / ".cache" / "sa3loader"
    hidden.mkdir(parents=True)
    users = [
        hidden / "model.fp16.safetensors.incomplete-epoch3.safetensors",
        hidden / "model.fp16.safetensors.incomplete-1-2",
        tmp_path / "model.safetensors.incomplete-keep",
    ]
    for path in users:
        path.write_bytes(b"mine")
    load_toy(ckpt, cache)  # converts, sweeping what earlier writers of the sibling left
    if command == "prune":
        _cache_admin.prune(str(cache))
    elif command == "clear":
        _cache_admin.clear(str(cache))
    elif command == "rm":
        _cache_admin.execute(str(cache), _cache_admin.plan_rm(str(cache), [str(ckpt)]), pruning=False)
    assert all(path.read_bytes() == b"mine" for path in users)

"""An image built by root and served by another user: the baked index and sibling are read,
nothing is written, and nothing above INFO is logged (docs/deploying.md).

Needs two users: CI runs as root and switches to ``nobody`` with ``setpriv``; elsewhere skipped.
The service's loads are fresh processes of ``nobody``, forked from a zygote started as
``nobody`` with the service's environment.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from support.checkpoints import toy_hub_checkpoint
from support.processes import TESTS, TOY_PRELOAD, Zygote, hidden_from_others

from sa3loader import cli

SERVICE_UID = 65534  # nobody
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs the service as a second user (nobody) with setpriv, which needs root (CI runs as root)",
)


@pytest.fixture
def image_root():
    """A folder every user can traverse (pytest's tmp_path is private to root)."""
    root = Path(tempfile.mkdtemp(prefix="sa3loader-image-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root)


def hub_checkpoint(root: Path) -> Path:
    ckpt = toy_hub_checkpoint(root / "hf", "stabilityai/stable-audio-3-small-music", "rev1")
    for path in (root / "hf", *(root / "hf").rglob("*")):  # what hf download leaves: readable by all
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() else 0o644)
    return ckpt


SERVICE_ENV = {"PATH": os.environ["PATH"], "HOME": "/nonexistent", "PYTHONPATH": str(TESTS)}


@pytest.fixture(scope="module")
def service():
    """A zygote running as the service user: its children are that user's fresh processes."""
    hidden = hidden_from_others(sys.executable, sys.prefix, cli.__file__, TESTS, torch.__file__)
    if hidden is not None:
        pytest.skip(
            f"the service user (nobody) cannot read {hidden}: clone and install where others can read"
        )
    uid = str(SERVICE_UID)
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    with Zygote(list(TOY_PRELOAD), SERVICE_ENV, as_user=as_user) as zygote:
        yield zygote


def as_service(service: Zygote, root: Path, ckpt: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {
        **SERVICE_ENV,
        "SA3LOADER_CACHE_DIR": str(cache),
        "SA3LOADER_PROGRESS": "0",
        "CHILD_LOG_LEVEL": "INFO",
    }
    return service.run("support.child", "load", str(ckpt), str(cache), env=env, cwd=root, timeout=120)


def test_a_private_cache_says_the_sibling_is_there_but_unreadable(service, image_root, capsys):
    """Baked without --readable-by-all, the cache dir is root's alone (0700): the service reads
    fp32 and says exactly why, not that it could not create something."""
    ckpt = hub_checkpoint(image_root)
    cache = image_root / "sa3loader-cache"
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--json"]) == 0
    sibling = json.loads(capsys.readouterr().out)["sibling"]
    served = as_service(service, image_root, ckpt, cache)
    assert served.returncode == 0, served.stderr
    assert not json.loads(served.stdout.strip().splitlines()[-1])["cache_hit"]
    assert f"{sibling} may be there but cannot be read by this user (Permission denied)" in served.stderr


def test_a_baked_cache_serves_another_user_read_only_and_quietly(service, image_root, capsys):
    ckpt = hub_checkpoint(image_root)
    cache = image_root / "sa3loader-cache"
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all", "--json"]) == 0
    warmed = json.loads(capsys.readouterr().out)
    assert warmed["converted"] and str(cache / "index") in warmed["opened_to_all"]
    sibling = Path(warmed["sibling"])
    assert sibling.stat().st_mode & 0o777 == 0o444  # the checkpoint's own read bits, not wider
    assert (cache / "index").stat().st_mode & 0o777 == 0o755  # traversable, writable by root only
    before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}

    served = as_service(service, image_root, ckpt, cache)
    assert served.returncode == 0, served.stderr
    report = json.loads(served.stdout.strip().splitlines()[-1])
    assert report["cache_hit"] and not report["converted"]
    levels = [
        line.split(" ", 1)[0] for line in served.stderr.splitlines() if line.startswith(("INFO", "WARN"))
    ]
    assert "WARNING" not in levels, served.stderr
    assert (
        f"sa3loader index at {cache / 'index'} is read-only: reading it, recording nothing" in served.stderr
    )
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == before  # nothing written


def test_a_checkpoint_baked_beside_its_sibling_under_umask_077_serves_another_user(
    service, image_root, capsys
):
    """A model folder copied into the image (0755, files 0644), warmed as root under umask 077:
    ``--readable-by-all`` opens the hidden ``.cache/sa3loader`` as far as the folder is open."""
    from support.loads import make_ckpt

    folder = image_root / "models"
    ckpt = make_ckpt(folder / "model.safetensors")
    folder.chmod(0o755)
    ckpt.chmod(0o644)
    cache = image_root / "sa3loader-cache"
    old = os.umask(0o077)
    try:
        assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all", "--json"]) == 0
    finally:
        os.umask(old)
    warmed = json.loads(capsys.readouterr().out)
    hidden = folder / ".cache" / "sa3loader"
    assert (
        warmed["sibling"] == str(hidden / "model.fp16.safetensors") and str(hidden) in warmed["opened_to_all"]
    )
    assert hidden.stat().st_mode & 0o777 == 0o755 and (folder / ".cache").stat().st_mode & 0o777 == 0o755
    served = as_service(service, image_root, ckpt, cache)
    assert served.returncode == 0, served.stderr
    assert json.loads(served.stdout.strip().splitlines()[-1])["cache_hit"], served.stderr


def baked_into_the_cache_dir(image_root: Path, folder: Path, *ckpts: Path) -> tuple[Path, dict[str, str]]:
    """``folder``'s checkpoints warmed by root into a cache dir every user may read; the cache
    dir, and the service's environment for it."""
    for path in (folder, *ckpts):
        path.chmod(0o755 if path.is_dir() else 0o644)
    cache = image_root / "sa3loader-cache"
    os.environ.update(SA3LOADER_PLACE="cache")
    try:
        assert cli.main(["warm", str(folder), "--cache-dir", str(cache), "--readable-by-all"]) == 0
    finally:
        del os.environ["SA3LOADER_PLACE"]
    return cache, {**SERVICE_ENV, "SA3LOADER_CACHE_DIR": str(cache), "SA3LOADER_PLACE": "cache"}


@pytest.mark.parametrize("command", [["cache", "rm", "A"], ["cache", "prune"], ["cache", "clear", "--yes"]])
def test_a_cache_command_on_a_baked_index_another_user_cannot_write_changes_nothing_and_says_so(
    service, image_root, capsys, command
):
    """A row it cannot delete is not reported deleted: exit 1, the read-only error, every row
    and file as baked."""
    from support.loads import make_ckpt

    folder = image_root / "models"
    kept, gone = make_ckpt(folder / "a.safetensors"), make_ckpt(folder / "b.safetensors", seed=4)
    cache, env = baked_into_the_cache_dir(image_root, folder, kept, gone)
    gone.unlink()  # its row is one prune drops
    capsys.readouterr()
    assert cli.main(["cache", "ls", "--cache-dir", str(cache), "--json"]) == 0
    rows_before = capsys.readouterr().out
    files_before = {p: p.stat().st_mtime_ns for p in cache.rglob("*")}

    args = [str(kept) if arg == "A" else arg for arg in command]
    ran = service.run("sa3loader", *args, "--json", env=env, cwd=image_root, timeout=120)
    assert ran.returncode == 1, (ran.stdout, ran.stderr)
    error = json.loads(ran.stdout)["error"]["message"]
    assert "the sa3loader index is read-only here" in error and "nothing was changed" in error
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("*")} == files_before
    assert cli.main(["cache", "ls", "--cache-dir", str(cache), "--json"]) == 0
    assert capsys.readouterr().out == rows_before


def test_a_cache_shared_on_purpose_is_written_by_the_first_user_and_read_by_the_others(
    service, image_root, capsys, monkeypatch
):
    """docs/deploying.md: a group-writable cache dir with $SA3LOADER_SHARED_CACHE=1. The first
    user to write it makes the index and the sibling's folder theirs alone: another member of
    the group reads fp32, and its `cache ls` says whose the index is (not that it is corrupt)."""
    ckpt = hub_checkpoint(image_root)
    cache = image_root / "team-cache"
    cache.mkdir()
    os.chown(cache, 0, SERVICE_UID)  # the team: root and the service user's group
    cache.chmod(0o2770)
    monkeypatch.setenv("SA3LOADER_SHARED_CACHE", "1")
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["converted"]
    env = {**SERVICE_ENV, "SA3LOADER_SHARED_CACHE": "1", "SA3LOADER_PROGRESS": "0"}
    served = service.run("support.child", "load", str(ckpt), str(cache), env=env, cwd=image_root, timeout=120)
    assert served.returncode == 0, served.stderr
    report = json.loads(served.stdout.strip().splitlines()[-1])
    assert not report["cache_hit"] and not report["converted"], served.stderr
    listed = service.run(
        "sa3loader", "--cache-dir", str(cache), "cache", "ls", env=env, cwd=image_root, timeout=120
    )
    assert listed.returncode == 1
    assert f"{cache / 'index'} is uid 0's, closed to this user (uid {SERVICE_UID})" in listed.stderr, (
        listed.stderr
    )


def test_cache_repair_calls_a_sound_baked_index_another_user_reads_sound(service, image_root):
    """Opened read-write, SQLite's check of a baked WAL index (no -shm file) failed as "attempt to
    write a readonly database" and repair would set the sound index aside (an outside attack)."""
    from support.loads import make_ckpt

    folder = image_root / "models"
    cache, env = baked_into_the_cache_dir(image_root, folder, make_ckpt(folder / "a.safetensors"))
    assert not (cache / "index" / "cache.db-shm").exists()
    ran = service.run(
        "sa3loader", "cache", "repair", "--dry-run", "--json", env=env, cwd=image_root, timeout=120
    )
    assert ran.returncode == 0 and not json.loads(ran.stdout)["repaired"], (ran.stdout, ran.stderr)

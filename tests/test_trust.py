"""Trust only what you own: files another user, a symlink or a FIFO puts at a name sa3loader uses.

A sibling beside the source is used only when it is a regular file of yours or
root's (or of the source's owner, in a directory no one else can write);
locks are files only you can open; no load blocks on a FIFO or writes through
a symlink; siblings never widen who can read the weights.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model, writable
from support.loads import load_toy
from support.processes import load_in_a_child
from support.toymodel import build, reference

import sa3loader
from sa3loader import UntrustedCacheDirError, _index, cli
from sa3loader import _trust as trust
from sa3loader._format import read_header

NEIGHBOUR = 65534  # another user (nobody); files are given to them with chown, which needs root
needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="making files owned by another user needs root (CI runs as root)"
)


def checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    return save(random_like_state(build(), seed=3), directory / "model.safetensors")


def in_an_open_folder(open_tmp: Path, mode: int, group: int | None = None) -> tuple[Path, Path]:
    """A checkpoint of ``mode`` (and ``group``) in a folder every user may enter, and the path
    where a load puts its sibling."""
    ckpt = checkpoint(open_tmp / "ckpt")
    (open_tmp / "ckpt").chmod(0o755)
    if group is not None:
        os.chown(ckpt, -1, group)
    ckpt.chmod(mode)
    return ckpt, open_tmp / "ckpt" / ".cache" / "sa3loader" / "model.fp16.safetensors"


@needs_root
def test_a_neighbours_sibling_in_a_shared_dir_is_never_adopted(tmp_path):
    """In a sticky world-writable dir (/tmp), another user makes a genuine sibling of your
    public checkpoint and swaps its data: your load converts its own instead."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    ckpt = checkpoint(shared)
    load_toy(ckpt, tmp_path / "neighbour-cache")  # the neighbour's genuine sibling, beside the source
    planted = writable(shared / ".cache" / "sa3loader" / "model.fp16.safetensors")
    header = read_header(planted)
    with open(planted, "r+b") as f:  # then the swap: one data byte
        f.seek(header.data_start + 100)
        f.write(b"\x55")
    os.chown(planted, NEIGHBOUR, NEIGHBOUR)
    planted_bytes = planted.read_bytes()

    model = load_toy(ckpt, tmp_path / "my-cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(tmp_path / "my-cache"))
    assert f"untrusted sibling {planted}" in info.events
    assert_same_model(model, reference(ckpt))
    assert planted.read_bytes() == planted_bytes  # never written over either


@needs_root
def test_cache_ls_calls_a_sibling_untrusted_where_a_load_will_not_use_it(tmp_path, monkeypatch):
    """A sibling another user owns: beside a checkpoint in a dir others can write, or in your
    cache dir, a load takes its own instead, and ``cache ls`` says why its row is not ok; in a
    team cache shared on purpose both use it."""
    from sa3loader import _cache_admin
    from sa3loader._records import OK, UNTRUSTED

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    ckpt, cache = checkpoint(shared), tmp_path / "cache"
    load_toy(ckpt, cache)
    beside = shared / ".cache" / "sa3loader" / "model.fp16.safetensors"
    os.chown(beside, NEIGHBOUR, NEIGHBOUR)
    assert [e.status for e in _cache_admin.entries(str(cache))] == [UNTRUSTED]
    assert cli.main(["--cache-dir", str(cache), "cache", "verify"]) == 3  # as the README says
    load_toy(ckpt, cache)
    assert f"untrusted sibling {beside}" in sa3loader.last_load_info().events

    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    other = checkpoint(tmp_path / "other")
    load_toy(other, cache)
    placed = Path(sa3loader.last_load_info().sibling)
    assert placed.is_relative_to(cache)
    os.chown(placed, NEIGHBOUR, NEIGHBOUR)
    statuses = {e.source: e.status for e in _cache_admin.entries(str(cache))}
    assert statuses[str(other)] == UNTRUSTED
    monkeypatch.setenv("SA3LOADER_SHARED_CACHE", "1")  # a team cache: anyone's siblings in it
    statuses = {e.source: e.status for e in _cache_admin.entries(str(cache))}
    assert statuses[str(other)] == OK
    load_toy(other, cache)
    assert sa3loader.last_load_info().cache_hit and sa3loader.last_load_info().sibling == str(placed)


@needs_root
def test_prunes_dry_run_says_a_sibling_whose_lock_is_another_users_stays(tmp_path):
    """A stale row's sibling whose lock file is another user's: the run cannot take that lock,
    so it keeps the sibling and what the lock guards (a killed conversion's temp file); the dry
    run, made on the same state, says the same, and the reason is what the lock file is."""
    from sa3loader import _cache_admin

    ckpt, cache = checkpoint(tmp_path / "m"), tmp_path / "cache"
    load_toy(ckpt, cache)
    sibling = tmp_path / "m" / ".cache" / "sa3loader" / "model.fp16.safetensors"
    os.chown(f"{sibling}.lock", NEIGHBOUR, NEIGHBOUR)
    temp = sibling.with_name(f"{sibling.name}.incomplete-12345-abcd1234")  # a killed conversion's
    temp.write_bytes(b"x")
    save(random_like_state(build(), seed=4), ckpt)  # the row is stale now
    planned = _cache_admin.plan_prune(str(cache))
    done = _cache_admin.prune(str(cache))

    def said(removals, kept):
        return [r.path for r in removals], [(r.path, why) for r, why in kept]

    assert said(planned.removals, planned.kept) == said(done.removed, done.kept)
    why = f"its lock file is not yours to take (it is owned by uid {NEIGHBOUR})"
    assert (str(sibling), why) in said(done.removed, done.kept)[1]
    assert sibling.exists() and temp.exists()
    assert [e.status for e in done.rows] == [] and len(_cache_admin.entries(str(cache))) == 1  # kept
    again = _cache_admin.plan_prune(str(cache))  # a later prune still finds it
    assert (str(sibling), why) in said(again.removals, again.kept)[1]
    os.chown(f"{sibling}.lock", os.getuid(), os.getgid())
    os.unlink(f"{sibling}.lock")
    os.symlink(tmp_path / "elsewhere", f"{sibling}.lock")  # yours, but a symlink: said as it is
    assert _cache_admin._lock_problem(str(sibling)) == "its lock file is not yours to take (it is a symlink)"


@needs_root
def test_an_empty_dir_of_another_user_in_the_cache_dir_is_never_removed(tmp_path):
    from sa3loader import _cache_admin

    cache = tmp_path / "cache"
    load_toy(checkpoint(tmp_path / "m"), cache)
    theirs = cache / "siblings" / "ffffffffffffffff"
    theirs.mkdir(parents=True)
    os.chown(theirs, NEIGHBOUR, NEIGHBOUR)
    for command in ("prune", "clear"):
        removed = getattr(_cache_admin, command)(str(cache)).removed
        assert str(theirs) + os.sep not in [r.path for r in removed]
    assert theirs.is_dir()


@needs_root
def test_a_sibling_of_the_sources_owner_in_their_own_dir_is_used(tmp_path):
    """The source's owner controls the source too: their sibling, in a dir only they can write, is fine."""
    theirs = tmp_path / "theirs"
    ckpt = checkpoint(theirs)
    load_toy(ckpt, tmp_path / "their-cache")
    for path in (theirs, ckpt, theirs / ".cache" / "sa3loader" / "model.fp16.safetensors"):
        os.chown(path, NEIGHBOUR, NEIGHBOUR)
    theirs.chmod(0o755)
    load_toy(ckpt, tmp_path / "my-cache")
    info = sa3loader.last_load_info()
    assert info.cache_hit and info.sibling == str(theirs / ".cache" / "sa3loader" / "model.fp16.safetensors")


@pytest.mark.parametrize("name", ["sibling", "lock"])
def test_a_fifo_at_a_name_sa3loader_uses_never_hangs_a_load(tmp_path, name):
    ckpt = checkpoint(tmp_path / "ckpt")
    hidden = tmp_path / "ckpt" / ".cache" / "sa3loader"
    hidden.mkdir(parents=True)
    fifo = hidden / ("model.fp16.safetensors" + (".lock" if name == "lock" else ""))
    os.mkfifo(fifo)
    load_in_a_child(ckpt, tmp_path / "cache")  # a blocking open would hang it past the timeout
    assert (tmp_path / "cache" / "siblings").is_dir()
    assert fifo.is_fifo()


def test_a_symlink_at_the_lock_name_is_never_followed(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "ckpt" / ".cache" / "sa3loader").mkdir(parents=True)
    (tmp_path / "ckpt" / ".cache" / "sa3loader" / "model.fp16.safetensors.lock").symlink_to(
        elsewhere / "created-through-the-link"
    )
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / "cache"))
    assert list(elsewhere.iterdir()) == []
    assert_same_model(model, reference(ckpt))


@needs_root
def test_a_lock_held_by_another_user_never_makes_a_load_wait(tmp_path, monkeypatch):
    """Lock files are yours alone (0600); another user's file at the lock's name, held, is
    passed over at once: the load converts into your cache dir instead of waiting."""
    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", "5")
    ckpt = checkpoint(tmp_path / "ckpt")
    (tmp_path / "ckpt").chmod(0o1777)
    lock = tmp_path / "ckpt" / ".cache" / "sa3loader" / "model.fp16.safetensors.lock"
    lock.parent.mkdir(parents=True)
    lock.touch(mode=0o644)
    os.chown(lock, NEIGHBOUR, NEIGHBOUR)
    with open(lock, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(tmp_path / "cache"))
    assert_same_model(model, reference(ckpt))


def test_lock_files_are_yours_alone(tmp_path):
    ckpt = checkpoint(tmp_path / "ckpt")
    old = tmp_path / "ckpt" / ".cache" / "sa3loader" / "model.fp16.safetensors.lock"
    old.parent.mkdir(parents=True)
    old.touch(mode=0o666)  # as an older sa3loader left it
    old.chmod(0o666)
    load_toy(ckpt, tmp_path / "cache")
    assert old.stat().st_mode & 0o777 == 0o600
    cache_locks = list((tmp_path / "cache").rglob("*.lock"))
    load_toy(tmp_path / "ckpt" / "model.safetensors", tmp_path / "cache")
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in cache_locks)


@needs_root
def test_a_sibling_keeps_the_sources_group(open_tmp):
    """A checkpoint readable by one group never gets a copy readable by another."""
    ckpt, sibling = in_an_open_folder(open_tmp, 0o640, NEIGHBOUR)
    load_toy(ckpt, open_tmp / "cache")
    assert (sibling.stat().st_gid, sibling.stat().st_mode & 0o777) == (NEIGHBOUR, 0o440)


@pytest.mark.parametrize("kind", ["models", "datasets", "spaces"])
def test_no_hub_repo_type_is_ever_written_into(tmp_path, kind):
    """huggingface_hub caches every repo type the same way; none is written into."""
    ckpt = checkpoint(tmp_path / "src")
    repo = tmp_path / "hub" / f"{kind}--org--name"
    blob = repo / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(ckpt.read_bytes())
    snapshot = repo / "snapshots" / "rev1"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    model = load_toy(snapshot / "model.safetensors", tmp_path / "cache")
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before
    assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / "cache"))
    assert_same_model(model, reference(ckpt))


@pytest.mark.parametrize("where", ["next-to-the-checkpoint", "in-the-hidden-folder"])
def test_foreign_fp16_file_is_never_touched(ckpt, tmp_path, conversions, where):
    """A diffusers-style ``model.fp16.safetensors`` of the user's, next to the checkpoint (where
    older versions put siblings) or at the sibling's own name: never read as ours, never written."""
    folder = tmp_path if where == "next-to-the-checkpoint" else tmp_path / ".cache" / "sa3loader"
    folder.mkdir(parents=True, exist_ok=True)
    foreign = folder / "model.fp16.safetensors"
    foreign.write_bytes(b"diffusers-style fp16 weights, not ours")
    model = load_toy(ckpt, tmp_path / "cache")
    assert foreign.read_bytes() == b"diffusers-style fp16 weights, not ours"
    info = sa3loader.last_load_info()
    elsewhere = tmp_path / ".cache" / "sa3loader" if where == "next-to-the-checkpoint" else tmp_path / "cache"
    assert info.converted and info.sibling.startswith(str(elsewhere))
    assert_same_model(model, reference(ckpt))
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1


def test_convert_outputs_keep_the_source_mode(open_tmp):
    from sa3loader._convert_dir import convert_file

    ckpt, _ = in_an_open_folder(open_tmp, 0o640)
    convert_file(str(ckpt), str(open_tmp / "out.safetensors"))
    assert os.stat(open_tmp / "out.safetensors").st_mode & 0o777 == 0o640


def test_a_lock_file_on_a_mount_that_gives_files_another_owner_is_not_left_behind(tmp_path, monkeypatch):
    """A drive mounted for another user (``uid=``, as desktops mount USB disks) gives every file
    that user as owner: the lock file a load creates there is refused, and must not stay."""
    ckpt = checkpoint(tmp_path / "usb")
    mount = str(tmp_path / "usb")
    real_fstat, real_stat, real_lstat = os.fstat, os.stat, os.lstat

    def as_mounted(st: os.stat_result, path: str) -> os.stat_result:
        if not path.startswith(mount):
            return st
        fields = list(st)
        fields[4] = fields[5] = NEIGHBOUR  # st_uid, st_gid
        return os.stat_result(
            fields, {n: getattr(st, n) for n in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns")}
        )

    def fstat(fd):
        return as_mounted(real_fstat(fd), os.readlink(f"/proc/self/fd/{fd}"))

    def stat_(path, *args, **kwargs):
        return as_mounted(real_stat(path, *args, **kwargs), os.path.abspath(os.fsdecode(path)))

    def lstat(path, *args, **kwargs):
        return as_mounted(real_lstat(path, *args, **kwargs), os.path.abspath(os.fsdecode(path)))

    monkeypatch.setattr(os, "fstat", fstat)
    monkeypatch.setattr(os, "stat", stat_)
    monkeypatch.setattr(os, "lstat", lstat)
    model = load_toy(ckpt, tmp_path / "cache")
    assert sorted(os.listdir(mount)) == ["model.safetensors"]
    assert sa3loader.last_load_info().sibling.startswith(str(tmp_path / "cache"))
    assert_same_model(model, reference(ckpt))


# ------------------------------------------------------------------ the rules, in a world of made-up owners

ME, MY_GROUP, TEAM = 4321, 4321, 5000


@pytest.fixture
def world(monkeypatch):
    """You are uid 4321 with your own private group 4321; group 5000 is a team. ``world[path] =
    (uid, gid, mode)`` says who owns a dir, as stat and lstat answer (other paths are real)."""
    import grp
    import pwd
    import stat as stat_module

    owners: dict[str, tuple[int, int, int]] = {}
    real_stat, real_lstat = os.stat, os.lstat

    def faked(real):
        def answer(path, *args, **kwargs):
            if os.fspath(path) in owners:
                uid, gid, mode = owners[os.fspath(path)]
                return os.stat_result((stat_module.S_IFDIR | mode, 1, 1, 2, uid, gid, 4096, 0, 0, 0))
            return real(path, *args, **kwargs)

        return answer

    monkeypatch.setattr(os, "stat", faked(real_stat))
    monkeypatch.setattr(os, "lstat", faked(real_lstat))
    monkeypatch.setattr(os, "getuid", lambda: ME)
    monkeypatch.setattr(os, "getgid", lambda: MY_GROUP)
    users = {ME: pwd.struct_passwd(("me", "x", ME, MY_GROUP, "", "/", "/"))}
    monkeypatch.setattr(pwd, "getpwuid", lambda uid: users[uid])  # KeyError for anyone else
    groups = {MY_GROUP: ("me", []), TEAM: ("team", ["me", "you"])}
    owners["groups"] = groups  # type: ignore[assignment]  # a test may add groups

    def getgrgid(gid):
        if gid not in groups:
            raise KeyError(gid)
        return grp.struct_group((groups[gid][0], "x", gid, groups[gid][1]))

    monkeypatch.setattr(grp, "getgrgid", getgrgid)
    return owners


@pytest.mark.parametrize(
    ("owner", "gid", "mode", "problem"),
    [
        (ME, TEAM, 0o755, None),
        (0, TEAM, 0o755, None),  # root's
        (ME, MY_GROUP, 0o775, None),  # group-writable by your own private group only
        (ME, TEAM, 0o775, "it is group-writable"),
        (ME, TEAM, 0o757, "it is world-writable"),
        (1234, TEAM, 0o755, "it is owned by uid 1234"),
    ],
)
def test_a_cache_dir_is_trusted_only_when_no_one_else_can_plant_files(world, owner, gid, mode, problem):
    world["/c"] = (owner, gid, mode)
    assert trust.cache_dir_trust("/c", shared=False) == problem
    assert trust.cache_dir_trust("/c", shared=True) is None  # a team cache, shared on purpose


def test_the_cache_commands_read_the_shared_cache_setting(world, monkeypatch):
    world["/c"] = (1234, TEAM, 0o777)
    monkeypatch.setenv("SA3LOADER_SHARED_CACHE", "1")
    _index.refuse_untrusted("/c")  # a team cache, shared on purpose
    assert trust.cache_dir_trust("/c", shared=False) == "it is owned by uid 1234"
    monkeypatch.delenv("SA3LOADER_SHARED_CACHE")
    with pytest.raises(UntrustedCacheDirError, match="owned by uid 1234"):
        _index.refuse_untrusted("/c")


def test_a_symlink_or_a_file_where_the_cache_dir_goes(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_bytes(b"")
    assert trust.cache_dir_trust(str(tmp_path / "link"), shared=False) == "it is a symlink"
    assert trust.owned_file_problem(str(tmp_path / "link")) == "it is a symlink"
    assert trust.cache_dir_trust(str(tmp_path / "file"), shared=False) is None  # making dirs in it fails
    assert trust.cache_dir_trust(str(tmp_path / "absent"), shared=False) is None


def test_a_refused_cache_dir_says_what_to_do_about_its_own_problem(tmp_path, monkeypatch, caplog):
    """A symlink: name its target (a shared team cache is not what a user's own link is, a new
    user's report); a dir others can write to: say it is shared on purpose."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.delenv("SA3LOADER_SHARED_CACHE", raising=False)
    with pytest.raises(UntrustedCacheDirError, match="symlink [(]name the directory it points to instead[)]"):
        _index.refuse_untrusted(str(tmp_path / "link"))
    (tmp_path / "open").mkdir(mode=0o777)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(UntrustedCacheDirError, match=r"world-writable [(]set \$SA3LOADER_SHARED_CACHE=1 for"):
        _index.refuse_untrusted(str(tmp_path / "open"))
    (tmp_path / "m").mkdir()
    ckpt = save(random_like_state(build(), seed=3), tmp_path / "m" / "model.safetensors")
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    caplog.set_level(logging.WARNING, logger="sa3loader")
    load_toy(ckpt, tmp_path / "link")
    warned = [r.getMessage() for r in caplog.records if "ignoring the sa3loader cache dir" in r.getMessage()]
    assert warned and warned[0].endswith("it is a symlink (name the directory it points to instead)")


@pytest.mark.parametrize(
    ("owner", "gid", "mode", "asked_for", "writable"),
    [
        (ME, TEAM, 0o755, None, False),
        (0, TEAM, 0o755, None, False),
        (ME, MY_GROUP, 0o775, None, False),  # only your private group
        (ME, TEAM, 0o775, None, True),
        (ME, TEAM, 0o757, None, True),
        (1234, TEAM, 0o755, None, True),
        (1234, TEAM, 0o755, 1234, False),  # asked for its owner
        (1234, MY_GROUP, 0o775, 1234, True),  # your private group is not theirs
        (ME, TEAM, 0o755, 1234, True),
    ],
)
def test_who_else_can_write_a_directory(world, owner, gid, mode, asked_for, writable):
    world["/d"] = (owner, gid, mode)
    assert trust.writable_by_others("/d", asked_for) is writable
    assert trust.writable_by_others("/absent-dir-for-sure", asked_for)  # nothing in it is vouched for


@pytest.mark.parametrize(
    ("sibling_owner", "source_owner", "dir_owner", "shared", "trusted"),
    [
        (ME, 1234, ME, False, True),
        (0, 1234, 1234, False, True),
        (1234, 999, ME, True, True),  # a team cache
        (1234, 1234, 1234, False, True),  # the source's owner, in their own dir
        (1234, 1234, ME, False, False),  # ... in a dir someone else (you) can write
        (1234, 999, 1234, False, False),
    ],
)
def test_whose_sibling_may_choose_a_loads_weights(
    world, sibling_owner, source_owner, dir_owner, shared, trusted
):
    world["/d"] = (dir_owner, TEAM, 0o755)
    sibling = os.stat_result((0o100644, 1, 1, 1, sibling_owner, TEAM, 10, 0, 0, 0))
    problem = trust.owner_problem("/d/m.fp16.safetensors", sibling, source_owner, shared=shared)
    assert (problem is None) is trusted
    if not trusted:
        assert problem == f"it is owned by uid {sibling_owner}, in a directory others can write to"


@pytest.mark.parametrize(
    ("primary", "name", "members", "private"),
    [
        (True, "me", [], True),
        (True, "me", ["me"], True),
        (True, "me", ["me", "you"], False),  # named after you, with another member
        (True, "staff", [], False),  # your primary group, not named after you
        (False, "me", [], False),  # named after you, not your primary group
    ],
)
def test_a_private_group_is_your_primary_one_named_after_you_with_no_other_member(
    world, monkeypatch, primary, name, members, private
):
    gid = MY_GROUP if primary else 6000
    world["groups"][gid] = (name, members)
    assert trust._private_group(gid) is private


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize(
    ("folder_mode", "expected"),
    [(0o755, 0o444), (0o750, 0o440), (0o700, 0o400), (0o711, 0o444), (0o701, 0o400)],
    ids=["open", "group", "private", "traversable", "others-not-its-group"],
)
def test_a_sibling_is_readable_only_by_those_who_can_read_its_checkpoint(open_tmp, folder_mode, expected):
    """The checkpoint 0644 in a folder that keeps some out: its sibling (beside a symlink in an
    open folder, where a load through the link puts it) keeps them out too."""
    private, public = open_tmp / "private", open_tmp / "public"
    ckpt = checkpoint(private)
    ckpt.chmod(0o644)
    private.chmod(folder_mode)
    public.mkdir(mode=0o755)
    (public / "model.safetensors").symlink_to(ckpt)
    load_toy(public / "model.safetensors", open_tmp / "cache")
    sibling = public / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert sibling.stat().st_mode & 0o777 == expected & ~_umask()


def test_a_hit_narrows_a_sibling_whose_checkpoint_was_closed_since(open_tmp):
    """chmod 600 on the checkpoint after its sibling was made 0444: the next load takes the
    sibling's other read bits away (it is the loader's), and the load after trusts it again."""
    ckpt, sibling = in_an_open_folder(open_tmp, 0o644)
    load_toy(ckpt, open_tmp / "cache")
    assert sibling.stat().st_mode & 0o444 == 0o444 & ~_umask()
    ckpt.chmod(0o600)
    model = load_toy(ckpt, open_tmp / "cache")
    assert sa3loader.last_load_info().cache_hit and sibling.stat().st_mode & 0o777 == 0o400
    assert_same_model(model, reference(ckpt))
    load_toy(ckpt, open_tmp / "cache")
    assert sa3loader.last_load_info().cache_hit


def test_warm_readable_by_all_never_opens_a_sibling_its_checkpoints_folder_keeps_private(
    open_tmp, monkeypatch
):
    """The checkpoint 0644 in a 0700 folder, its sibling in the cache dir: opening the cache dir
    to all gives the sibling no read bit the folder keeps from others."""
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    ckpt = checkpoint(open_tmp / "private")
    ckpt.chmod(0o644)
    (open_tmp / "private").chmod(0o700)
    cache = open_tmp / "cache"
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all"]) == 0
    (sibling,) = [p for p in cache.rglob("*.safetensors")]
    assert sibling.stat().st_mode & 0o077 == 0


@needs_root
def test_a_folder_only_another_group_may_enter_keeps_the_checkpoints_group_out(open_tmp):
    """The checkpoint 0640 of root's group in a folder 0750 of another group, loaded through a
    link in an open folder: root's group cannot reach it, so its sibling is the owner's alone."""
    folder, public = open_tmp / "theirs", open_tmp / "public"
    ckpt = checkpoint(folder)
    ckpt.chmod(0o640)
    os.chown(folder, -1, NEIGHBOUR)
    folder.chmod(0o750)
    public.mkdir(mode=0o755)
    (public / "model.safetensors").symlink_to(ckpt)
    load_toy(public / "model.safetensors", open_tmp / "cache")
    sibling = public / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert sibling.stat().st_mode & 0o777 == 0o400


@needs_root
def test_a_sibling_beside_its_checkpoint_in_a_team_folder_is_the_teams_to_read(open_tmp):
    """A folder root:team 0750 holding root's checkpoint 0644: the team reads it (through the
    folder's group), and reads its sibling beside it: the folder keeps the rest out of both."""
    folder = open_tmp / "team"
    ckpt = checkpoint(folder)
    ckpt.chmod(0o644)
    os.chown(folder, -1, NEIGHBOUR)
    folder.chmod(0o750)
    load_toy(ckpt, open_tmp / "cache")
    sibling = folder / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert sibling.stat().st_mode & 0o777 == 0o444 & ~_umask()
    assert (folder / ".cache").stat().st_gid == NEIGHBOUR


def test_a_checkpoint_no_one_may_read_gets_a_sibling_only_its_owner_reads(open_tmp):
    """Mode 0000 (root reads it anyway): never a sibling others may read."""
    ckpt, sibling = in_an_open_folder(open_tmp, 0)
    load_toy(ckpt, open_tmp / "cache")
    assert sibling.stat().st_mode & 0o777 == 0o400


@needs_root
def test_a_hit_takes_the_group_away_from_a_sibling_whose_checkpoint_changed_group(open_tmp):
    ckpt, sibling = in_an_open_folder(open_tmp, 0o640, NEIGHBOUR)
    load_toy(ckpt, open_tmp / "cache")
    assert sibling.stat().st_mode & 0o070 == 0o040
    os.chown(ckpt, -1, 0)  # chgrp: that group may not read it now
    load_toy(ckpt, open_tmp / "cache")
    assert sa3loader.last_load_info().cache_hit and sibling.stat().st_mode & 0o070 == 0


def test_a_checkpoint_with_an_acl_gets_a_sibling_only_its_owner_reads(open_tmp):
    """An ACL says who reads where the mode bits do not (``user:1000:---``): the sibling cannot
    follow it, so it is the owner's alone."""
    ckpt, sibling = in_an_open_folder(open_tmp, 0o644)
    set_acl(ckpt, "access", user=6, named=(1000, 0), group=4, other=4)  # user:1000:---
    load_toy(ckpt, open_tmp / "cache")
    assert sibling.stat().st_mode & 0o077 == 0


@needs_root
@pytest.mark.parametrize("whose", ["another user's", "writable by all"])
def test_a_hidden_folder_someone_else_made_beside_a_checkpoint_is_not_written_into(open_tmp, whose):
    """``.cache/sa3loader`` made in a shared folder by another user (or open to every user's
    writes): what went in could be taken away or swapped. The sibling goes to the cache dir."""
    folder = open_tmp / "shared"
    ckpt = checkpoint(folder)
    folder.chmod(0o777)
    hidden = folder / ".cache" / "sa3loader"
    hidden.mkdir(parents=True)
    if whose == "another user's":
        os.chown(hidden, NEIGHBOUR, NEIGHBOUR)
    hidden.chmod(0o777)
    model = load_toy(ckpt, open_tmp / "cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(open_tmp / "cache")), info.sibling
    assert list(hidden.iterdir()) == []
    assert_same_model(model, reference(ckpt))


@needs_root
def test_the_hidden_folder_made_beside_a_checkpoint_lets_the_folders_group_through(open_tmp):
    """A folder root:NEIGHBOUR 0750, the checkpoint 0640 of that group: its members read it,
    so they must reach its sibling (root's own group would keep them out)."""
    folder = open_tmp / "team"
    ckpt = checkpoint(folder)
    os.chown(folder, -1, NEIGHBOUR)
    os.chown(ckpt, -1, NEIGHBOUR)
    folder.chmod(0o750)
    ckpt.chmod(0o640)
    load_toy(ckpt, open_tmp / "cache")
    for made in (folder / ".cache", folder / ".cache" / "sa3loader"):
        assert (made.stat().st_gid, made.stat().st_mode & 0o050) == (NEIGHBOUR, 0o050), made
    sibling = folder / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert (sibling.stat().st_gid, sibling.stat().st_mode & 0o777) == (NEIGHBOUR, 0o440)


@needs_root
def test_convert_dir_copies_keep_their_sources_group(open_tmp):
    """A file convert DIR copies as it is (a config), readable by one group: the copy is
    that group's, never the group of whoever converts."""
    src = open_tmp / "ckpt"
    checkpoint(src)
    src.chmod(0o755)
    config = src / "model_config.json"
    config.write_text("{}")
    os.chown(config, -1, NEIGHBOUR)
    config.chmod(0o640)
    assert cli.main(["convert", str(src), "--cache-dir", str(open_tmp / "c")]) == 0
    copied = (open_tmp / "ckpt-fp16" / "model_config.json").stat()
    assert (copied.st_gid, copied.st_mode & 0o777) == (NEIGHBOUR, 0o640)


def set_acl(path: Path, kind: str, *, user: int, named: tuple[int, int], group: int, other: int) -> bytes:
    """A POSIX ACL (``kind``: access or default) with one named user, as the xattr holds it."""
    whoever = 0xFFFFFFFF
    entries = [(0x01, user, whoever), (0x02, named[1], named[0]), (0x04, group, whoever)]
    entries += [(0x10, group | named[1], whoever), (0x20, other, whoever)]
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, f"system.posix_acl_{kind}", acl)
    except OSError as exc:
        pytest.skip(f"no POSIX ACLs on this filesystem ({exc.strerror})")
    return os.getxattr(path, f"system.posix_acl_{kind}")


def test_a_folders_default_acl_never_reaches_a_sibling(open_tmp):
    """The checkpoint 0640 (no ACL of its own) in a folder whose default ACL names uid 65534:
    a sibling made there would inherit that user's read. It has no ACL, and the bits the
    README promises: the checkpoint's less write bits and the umask (it was its owner's
    alone: narrower than said, so the checkpoint's group converted its own; an outside attack)."""
    ckpt, sibling = in_an_open_folder(open_tmp, 0o640)
    set_acl(open_tmp / "ckpt", "default", user=7, named=(65534, 4), group=5, other=0)
    load_toy(ckpt, open_tmp / "cache")
    assert "system.posix_acl_access" not in os.listxattr(sibling)
    assert sibling.stat().st_mode & 0o777 == 0o440 & ~_umask()


@pytest.mark.parametrize("source", ["fp32 (converted)", "fp16 (copied)"])
def test_a_folders_default_acl_never_reaches_a_convert_out_file_not_even_while_written(
    open_tmp, monkeypatch, source
):
    """``convert --out`` into a folder whose default ACL names uid 65534, from a 0640 checkpoint
    it cannot read: the output has no ACL and the checkpoint's bits; and every file sa3loader creates
    is created its owner's alone (an outside attack: uid 65534 opened temp files in the moment
    between their creation with the final bits and the ACL's removal, and a copy kept the ACL)."""
    ckpt, _ = in_an_open_folder(open_tmp, 0o640)
    if source.startswith("fp16"):
        save_file({"w": torch.randn(8, 8).half()}, str(ckpt))
        ckpt.chmod(0o640)  # (save_file makes it 0600)
    out_dir = open_tmp / "out"
    out_dir.mkdir(mode=0o755)
    set_acl(out_dir, "default", user=7, named=(65534, 4), group=5, other=5)
    created: list[tuple[str, int]] = []
    real_open = os.open

    def open_and_look(path, flags, mode=0o777, *args, **kwargs):
        fd = real_open(path, flags, mode, *args, **kwargs)
        if flags & os.O_CREAT and ".incomplete-" in os.fsdecode(path):  # as another user would find it
            created.append((os.fsdecode(path), stat.S_IMODE(os.fstat(fd).st_mode)))
        return fd

    monkeypatch.setattr(os, "open", open_and_look)
    out = out_dir / "model.safetensors"
    assert cli.main(["convert", str(ckpt), "--out", str(out), "--cache-dir", str(open_tmp / "c")]) == 0
    assert created and all(mode & 0o077 == 0 for _, mode in created), created
    assert (
        "system.posix_acl_access" not in os.listxattr(out) and out.stat().st_mode & 0o777 == 0o640 & ~_umask()
    )


def test_convert_in_place_keeps_the_files_acl(open_tmp):
    ckpt, _ = in_an_open_folder(open_tmp, 0o640)
    acl = set_acl(ckpt, "access", user=6, named=(65534, 4), group=0, other=0)
    assert cli.main(["convert", str(ckpt.parent), "--in-place", "--cache-dir", str(open_tmp / "c")]) == 0
    assert os.getxattr(ckpt, "system.posix_acl_access") == acl
    assert "F32" not in {e.dtype for e in read_header(ckpt).entries}


@needs_root
def test_after_a_chgrp_the_checkpoints_new_group_reads_its_sibling_no_more_than_the_checkpoint(open_tmp):
    """0644 of group NEIGHBOUR, then chgrp root and chmod 0604 (root's group denied): the
    sibling keeps NEIGHBOUR's group, so root's group are others to it: others lose read too."""
    ckpt, sibling = in_an_open_folder(open_tmp, 0o644, NEIGHBOUR)
    load_toy(ckpt, open_tmp / "cache")
    assert sibling.stat().st_mode & 0o777 == 0o444 & ~_umask()
    os.chown(ckpt, -1, 0)
    ckpt.chmod(0o604)
    load_toy(ckpt, open_tmp / "cache")
    assert sa3loader.last_load_info().cache_hit and sibling.stat().st_mode & 0o077 == 0


@needs_root
@pytest.mark.parametrize("existing", ["the folder", ".cache", "root's hidden folder"])
def test_root_never_writes_beside_a_checkpoint_in_another_users_folder(open_tmp, existing):
    """root loading a user's checkpoint: a `.cache/sa3loader` root made in their folder would be
    one they cannot remove (nor its sibling, nor the folder above it). It goes to the cache dir,
    also where an older version left a hidden folder of root's there."""
    folder = open_tmp / "alice"
    ckpt = checkpoint(folder)
    if existing != "the folder":
        (folder / ".cache").mkdir()
        os.chown(folder / ".cache", NEIGHBOUR, -1)
    if existing == "root's hidden folder":
        (folder / ".cache").chmod(0o755)
        (folder / ".cache" / "sa3loader").mkdir(mode=0o755)
    for path in (folder, ckpt):
        os.chown(path, NEIGHBOUR, -1)
    before = sorted(p.name for p in folder.rglob("*"))
    load_toy(ckpt, open_tmp / "cache")
    info = sa3loader.last_load_info()
    assert info.converted and info.sibling.startswith(str(open_tmp / "cache"))
    assert sorted(p.name for p in folder.rglob("*")) == before


def test_a_link_swapped_after_the_open_never_lends_its_folders_to_the_file_read(open_tmp):
    """The mode of a copy comes from the file opened and the folders above it. A link in the
    source's path swapped between the open and that look (an outside attack: a thread flipping
    it made 728 of 3000 copies of a file in a 0700 folder readable by all) names another file's
    folders: the copy is then its owner's alone."""
    secret_dir, public_dir = open_tmp / "secret", open_tmp / "public"
    secret_dir.mkdir(mode=0o700)
    public_dir.mkdir(mode=0o755)
    (secret_dir / "w").write_bytes(b"secret")
    (public_dir / "w").write_bytes(b"decoy")
    for f in (secret_dir / "w", public_dir / "w"):
        f.chmod(0o644)
    link = open_tmp / "link"
    link.symlink_to(secret_dir / "w")
    opened = os.stat(link)  # the file the copy reads: the secret one
    link.unlink()
    link.symlink_to(public_dir / "w")  # swapped before its folders are looked at
    assert trust.readers_bits(str(link), opened, str(open_tmp / "copy")) & 0o077 == 0
    assert trust.readers_bits(str(secret_dir / "w"), opened, str(open_tmp / "copy")) & 0o077 == 0
    assert trust.readers_bits(str(public_dir / "w"), os.stat(public_dir / "w"), str(open_tmp / "c")) == 0o644


@needs_root
def test_a_copy_into_a_public_folder_mounted_inside_a_private_one_is_its_owners(open_tmp):
    """A 0700 folder holds the checkpoint and a mount of a public folder (a home with a volume
    mounted in it): a private folder above both kept no one from the copy, it was thought, so
    the copy kept 0644; yet the public folder is reached by its own path (an outside attack:
    another user read it there). Folders above a mount point guard nothing."""
    private, public = open_tmp / "private", open_tmp / "public"
    (private / "src").mkdir(parents=True)
    (private / "mnt").mkdir()
    public.mkdir(mode=0o755)
    private.chmod(0o700)
    ckpt = private / "src" / "model.safetensors"
    save_file({"w": torch.randn(8, 8)}, str(ckpt))
    ckpt.chmod(0o644)
    mounted = subprocess.run(["mount", "--bind", str(public), str(private / "mnt")], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here ({mounted.stderr.decode().strip()})")
    try:
        assert cli.main(["convert", str(ckpt), "--out", str(private / "mnt" / "out.safetensors")]) == 0
        assert (public / "out.safetensors").stat().st_mode & 0o077 == 0
        assert cli.main(["convert", str(ckpt), "--out", str(private / "src" / "out.safetensors")]) == 0
        assert (private / "src" / "out.safetensors").stat().st_mode & 0o777 == 0o644 & ~_umask()  # guarded
    finally:
        subprocess.run(["umount", str(private / "mnt")], check=True)


@pytest.mark.parametrize("at", ["siblings", "its key", "its key, another user's"])
def test_a_sibling_never_goes_through_a_link_or_into_a_folder_of_another_user_in_the_cache_dir(
    tmp_path, monkeypatch, at
):
    """A link at ``<cache>/siblings`` or at its key folder, or a key folder of another user's (a
    cache shared on purpose), sent the sibling elsewhere: a user's own file there was replaced
    (an outside attack). That place is refused (the load reads fp32, saying why), and cache
    commands never remove what is behind such a link."""
    if at.endswith("another user's") and os.geteuid() != 0:
        pytest.skip("making files owned by another user needs root (CI runs as root)")
    from sa3loader import _cache_admin, _config
    from sa3loader._places import cache_path

    monkeypatch.setenv(_config.PLACE_ENV, "cache")
    cache, theirs = tmp_path / "cache", tmp_path / "theirs"
    ckpt = checkpoint(tmp_path / "m")
    load_toy(ckpt, cache)
    sibling = Path(cache_path(str(cache), str(ckpt), os.path.realpath(ckpt)))
    _cache_admin.clear(str(cache))
    theirs.mkdir()
    mine = theirs / sibling.name
    mine.write_bytes(b"a file of the user's own")
    if at == "siblings":
        (cache / "siblings").rmdir() if (cache / "siblings").exists() else None
        (cache / "siblings").symlink_to(tmp_path)
        (tmp_path / sibling.parent.name).symlink_to(theirs)
    elif at == "its key":
        sibling.parent.parent.mkdir(parents=True, exist_ok=True)
        sibling.parent.symlink_to(theirs)
    else:
        sibling.parent.mkdir(parents=True, exist_ok=True)
        os.chown(sibling.parent, NEIGHBOUR, NEIGHBOUR)
    model = load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert info.sibling is None and "not in the cache dir" in info.reason, info.reason
    assert_same_model(model, reference(ckpt))
    assert mine.read_bytes() == b"a file of the user's own" and sorted(os.listdir(theirs)) == [mine.name]
    if at != "its key, another user's":
        os.link(mine, tmp_path / "keep")  # what a clear would remove through the link
        _cache_admin.clear(str(cache))
        assert mine.exists()


@pytest.mark.parametrize("when", ["as the source is fingerprinted", "at the room check"])
def test_a_cache_dir_removed_during_a_load_is_not_made_again_by_it(tmp_path, monkeypatch, when):
    """`rm -rf` of the cache dir during a load: the load made it again, an index and a sibling
    in it (an outside attack). Not made again: the load reads fp32."""
    import shutil

    from support.faults import at, faked, injected

    from sa3loader import _config

    monkeypatch.setenv(_config.PLACE_ENV, "cache")
    cache = tmp_path / "cache"
    ckpt = checkpoint(tmp_path / "m")
    load_toy(ckpt, cache)
    torch.manual_seed(1)
    save(random_like_state(build(), seed=4), ckpt)  # stale: the load converts
    once: list = []

    def remove() -> None:
        if not once:
            once.append(shutil.rmtree(cache))

    def free_bytes(path, real):
        if path.startswith(str(cache)) and when == "at the room check":
            remove()
        return real

    early = at("fingerprint", remove if when.startswith("as the source") else lambda: None)
    with faked(free_bytes=free_bytes), injected(early):
        model = load_toy(ckpt, cache)
    assert not cache.exists() and sa3loader.last_load_info().sibling is None
    assert_same_model(model, reference(ckpt))

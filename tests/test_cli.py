"""The command line says only what happened: measured figures, plans carried out as shown,
errors as errors, exit codes as the README says.

- ``convert DIR`` is all or nothing, never writes into a hub cache; ``convert FILE --verify``
  checks every sibling it reports and prints the measured largest difference;
- a locked or corrupt index makes cache commands fail (exit 1), never report an empty
  success; ``cache repair`` sets a corrupt one aside; ``prune`` deletes a sibling only if,
  under its lock, it is still not valid; ``--dry-run`` lists exactly what the real run deletes;
- with ``--json`` every outcome, errors, bad usage and ``--version`` included, is one JSON
  document on stdout; global options go before or after the command.

``cli.main`` runs in-process with captured output; ``python -m sa3loader`` runs in a fresh
process where logging set-up matters."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from support.cli import run, run_process
from support.compare import writable
from support.faults import at, injected
from support.processes import dead_pid, left_long_ago

import sa3loader
from sa3loader import __version__, _faults, cli
from sa3loader._cli_output import human_size
from sa3loader._format import read_header


@pytest.fixture
def ckpt_dir(tmp_path) -> Path:
    """The shape of a real SA3 checkpoint directory, plus things to skip."""
    root = tmp_path / "sa3"
    (root / "t5gemma-b-b-ul2").mkdir(parents=True)
    (root / ".cache" / "huggingface").mkdir(parents=True)
    save_file({"w": torch.randn(8, 8), "i": torch.arange(4)}, str(root / "model.safetensors"), {"k": "v"})
    (root / "model_config.json").write_text('{"model": {}}')
    save_file({"e": torch.randn(6).bfloat16()}, str(root / "t5gemma-b-b-ul2" / "model.safetensors"))
    (root / "t5gemma-b-b-ul2" / "tokenizer.json").write_text("{}")
    (root / ".cache" / "huggingface" / "junk.lock").write_text("x")
    (root / "README.md").write_text("readme")
    return root


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_convert_directory_copy(ckpt_dir, tmp_path):
    before = files(ckpt_dir)
    proc = run("convert", str(ckpt_dir), "--verify", cache=tmp_path / "c")
    assert "max abs diff of fp16(source) vs output = 0.0" in proc.stdout
    out = tmp_path / "sa3-fp16"
    got = files(out)
    assert set(got) == {
        "model.safetensors",
        "model_config.json",
        "README.md",
        "t5gemma-b-b-ul2/model.safetensors",
        "t5gemma-b-b-ul2/tokenizer.json",
    }
    for name in (
        "model_config.json",
        "README.md",
        "t5gemma-b-b-ul2/model.safetensors",
        "t5gemma-b-b-ul2/tokenizer.json",
    ):
        assert got[name] == before[name]
    converted = load_file(str(out / "model.safetensors"))
    source = load_file(str(ckpt_dir / "model.safetensors"))
    assert converted["w"].dtype == torch.float16
    assert torch.equal(converted["w"].view(torch.int16), source["w"].half().view(torch.int16))
    assert torch.equal(converted["i"], source["i"])
    assert read_header(out / "model.safetensors").metadata["k"] == "v"
    assert files(ckpt_dir) == before  # source untouched

    again = run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=1)
    assert "exists" in again.stderr and "--force" in again.stderr and "Traceback" not in again.stderr
    run("convert", str(ckpt_dir), "--force", cache=tmp_path / "c")


def test_force_without_an_output_to_replace_is_a_usage_error(ckpt_dir, tmp_path):
    """``convert FILE --force`` printed "unchanged" and replaced nothing (a new user's report):
    --force replaces an --out file or a directory's output; a sibling is the cache's to renew."""
    ckpt = ckpt_dir / "model.safetensors"
    refused = run("convert", str(ckpt), "--force", cache=tmp_path / "c", check_rc=2)
    assert "cache rm FILE" in refused.stderr and "Traceback" not in refused.stderr
    assert not list(tmp_path.rglob("*.fp16.safetensors"))  # nothing done
    run("convert", str(ckpt), "--out", str(tmp_path / "out.safetensors"), cache=tmp_path / "c")
    run("convert", str(ckpt), "--out", str(tmp_path / "out.safetensors"), "--force", cache=tmp_path / "c")


def test_convert_in_place_is_idempotent_and_skips_auto_siblings(ckpt_dir, tmp_path):
    run("warm", str(ckpt_dir / "model.safetensors"), cache=tmp_path / "c")
    assert (ckpt_dir / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()
    run("convert", str(ckpt_dir), "--in-place", cache=tmp_path / "c")
    once = files(ckpt_dir)
    assert {e.dtype for e in read_header(ckpt_dir / "model.safetensors").entries} == {"F16", "I64"}
    run("convert", str(ckpt_dir), "--in-place", cache=tmp_path / "c")
    assert files(ckpt_dir) == once
    copy = run("convert", str(ckpt_dir), "--out", str(tmp_path / "copy"), cache=tmp_path / "c")
    assert "model.fp16.safetensors" not in files(tmp_path / "copy"), copy.stdout


def test_foreign_fp16_file_is_copied_not_skipped(ckpt_dir, tmp_path):
    save_file({"x": torch.ones(2).half()}, str(ckpt_dir / "unet.fp16.safetensors"))
    run("convert", str(ckpt_dir), cache=tmp_path / "c")
    assert (tmp_path / "sa3-fp16" / "unet.fp16.safetensors").read_bytes() == (
        ckpt_dir / "unet.fp16.safetensors"
    ).read_bytes()


def test_in_place_refuses_hub_symlinks(tmp_path):
    blob = tmp_path / "hub" / "models--org--m" / "blobs" / "abc"
    blob.parent.mkdir(parents=True)
    save_file({"w": torch.randn(3)}, str(blob))
    snap = tmp_path / "hub" / "models--org--m" / "snapshots" / "r1"
    snap.mkdir(parents=True)
    (snap / "model.safetensors").symlink_to(blob)
    before = blob.read_bytes()
    proc = run("convert", str(snap / "model.safetensors"), "--in-place", cache=tmp_path / "c", check_rc=1)
    assert "hub" in proc.stderr and blob.read_bytes() == before and (snap / "model.safetensors").is_symlink()


def test_convert_dir_of_a_private_folder_makes_an_output_as_private(open_tmp):
    """A folder only its owner may enter (files 0644 in it, a 0700 sub-folder): the fp16 copy
    beside it, its weights and the files copied are for the owner alone too."""
    src = open_tmp / "private"
    (src / "sub").mkdir(parents=True)
    save_file({"w": torch.randn(4, 4)}, str(src / "model.safetensors"))
    save_file({"w": torch.randn(4, 4).half()}, str(src / "sub" / "vae.safetensors"))  # copied as is
    (src / "config.json").write_text("{}")
    for path in (src / "model.safetensors", src / "sub" / "vae.safetensors", src / "config.json"):
        path.chmod(0o644)
    (src / "sub").chmod(0o700)
    src.chmod(0o700)
    run("convert", str(src), cache=open_tmp / "c")
    out = open_tmp / "private-fp16"
    assert out.stat().st_mode & 0o077 == 0
    for path in (out / "model.safetensors", out / "sub" / "vae.safetensors", out / "config.json"):
        assert path.stat().st_mode & 0o077 == 0, path


@pytest.mark.parametrize("in_place", [False, True], ids=["to-dir-fp16", "in-place"])
def test_convert_of_a_folder_without_a_checkpoint_says_so_and_writes_nothing(tmp_path, in_place):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.md").write_text("no weights here")
    err = run(
        "--json", "convert", str(folder), *(["--in-place"] * in_place), cache=tmp_path / "c", check_rc=1
    )
    assert json.loads(err.stdout)["error"]["type"] == "ConfigError" and "nothing to convert" in err.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]


def test_convert_in_place_keeps_the_files_mode(open_tmp):
    """The user's own file, replaced by its fp16 version: the mode it had (group-writable, in a
    folder only they enter), not one the umask or the folder would narrow."""
    folder = open_tmp / "mine"
    folder.mkdir(mode=0o700)
    ckpt = folder / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(ckpt))
    ckpt.chmod(0o664)
    run("convert", str(folder), "--in-place", cache=open_tmp / "c")
    assert ckpt.stat().st_mode & 0o777 == 0o664 and {e.dtype for e in read_header(ckpt).entries} == {"F16"}


# The names a killed conversion's temp file can have: being written, written but not yet
# renamed (``--out``), written and being verified (``--verify``; an older version's name).
KILLED_TAILS = {
    "writing": "{pid}-deadbeef",
    "written": "written-0abc-0-0-{pid}-deadbeef",
    "verifying": "verify-{pid}",
    "writing to verify": "verify-{pid}.incomplete-{pid}-deadbeef",
}


@pytest.mark.parametrize("tail", sorted(KILLED_TAILS))
@pytest.mark.parametrize("how", ["in-place", "to-a-file"])
def test_a_killed_conversions_temp_file_goes_with_the_next_conversion(tmp_path, how, tail):
    """A conversion in place, or to a file, killed mid-write leaves a temp file beside its
    output (GBs): the next one removes it; one whose writer still runs stays, and so does one
    changed within ``WRITER_QUIET_S`` whatever its pid (a writer in another pid namespace, a
    container sharing the volume, whose pid means nothing here: an outside attack saw its
    live temp file removed)."""
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(src))
    dest = src if how == "in-place" else tmp_path / "out.safetensors"
    killed = Path(f"{dest}.incomplete-" + KILLED_TAILS[tail].format(pid=dead_pid()))  # no such process
    alive = Path(f"{dest}.incomplete-" + KILLED_TAILS[tail].format(pid=1))  # init's: still running
    elsewhere = Path(f"{dest}.incomplete-" + KILLED_TAILS[tail].format(pid=dead_pid() + 1_000_000))
    for path in (killed, alive, elsewhere):
        path.write_bytes(b"x" * 100)
    left_long_ago(killed), left_long_ago(alive)
    where = ["--in-place"] if how == "in-place" else ["--out", str(dest)]
    run("convert", str(src), *where, cache=tmp_path / "c")
    assert not killed.exists() and alive.exists() and elsewhere.exists()
    if how == "in-place":  # the folder's: what it removed is not listed as skipped
        save_file({"w": torch.randn(4, 4)}, str(src))  # fp32 again: converted again
        killed.write_bytes(b"x" * 100)
        left_long_ago(killed)
        out = run("convert", str(tmp_path), "--in-place", cache=tmp_path / "c").stdout
        assert str(killed) not in out and not killed.exists()


def test_warm_of_a_folder_without_a_checkpoint_says_so_and_exits_1(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run("warm", str(tmp_path / "empty"), cache=tmp_path / "c", check_rc=1)
    assert f"no .safetensors checkpoint in {tmp_path / 'empty'}" in proc.stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")
def test_root_converting_in_place_never_gives_away_a_file_a_link_swapped_in_points_to(tmp_path):
    """Root converts uid 1000's checkpoint in place; before its mode and owner are given back,
    uid 1000 (whose folder it is) puts a link to root's private file at its name. That file
    keeps its owner and mode."""
    folder = tmp_path / "theirs"
    folder.mkdir()
    ckpt = folder / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(ckpt))
    os.chown(ckpt, 1000, 1000)
    secret = tmp_path / "root-only"
    secret.write_text("root's")
    secret.chmod(0o600)

    def swap() -> None:
        os.replace(ckpt, folder / "converted.safetensors")
        ckpt.symlink_to(secret)

    with injected(at("give back", swap)):
        run("convert", str(folder), "--in-place", cache=tmp_path / "c")
    assert (secret.stat().st_uid, secret.stat().st_mode & 0o777) == (0, 0o600)


@pytest.mark.parametrize("how", ["mv", "rewritten"])
@pytest.mark.parametrize("verify", [False, True], ids=["plain", "verify"])
def test_convert_in_place_never_overwrites_a_checkpoint_saved_over_it_meanwhile(tmp_path, how, verify):
    """A trainer saves a new checkpoint at the name while the old one converts in place: the
    new one stays (exit 1, CheckpointChangedError), no fp16 of the old one, no temp file."""
    ckpt = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(ckpt))
    newer = {"w": torch.randn(64, 64)}

    def save_over() -> None:
        if how == "mv":
            save_file(newer, str(tmp_path / "new.tmp"))
            os.replace(tmp_path / "new.tmp", ckpt)
        else:
            os.utime(ckpt, ns=(0, 0))  # the same bytes, a changed file

    with injected(at("data", save_over)):
        err = run(
            "--json",
            "convert",
            str(ckpt),
            "--in-place",
            *(["--verify"] * verify),
            cache=tmp_path / "c",
            check_rc=1,
        )
    assert json.loads(err.stdout)["error"]["type"] == "CheckpointChangedError"
    assert read_header(ckpt).by_name["w"].dtype == "F32"
    if how == "mv":
        assert torch.equal(load_file(str(ckpt))["w"], newer["w"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


@pytest.mark.parametrize("in_place", [False, True], ids=["to-dir-fp16", "in-place"])
def test_convert_dir_takes_linked_and_empty_folders_and_says_what_it_left_out(tmp_path, in_place):
    """A copy follows a link to a folder (a shared encoder folder linked in is part of the
    model) and keeps empty folders; a link back into the tree, a link to nothing, and (in
    place) any linked folder are left out, each said; exit 0."""
    src, shared = tmp_path / "src", tmp_path / "shared" / "t5gemma"
    shared.mkdir(parents=True)
    (src / "empty").mkdir(parents=True)
    save_file({"w": torch.randn(8, 8)}, str(src / "model.safetensors"))
    save_file({"w": torch.randn(8, 8)}, str(shared / "enc.safetensors"))
    (shared / "tokenizer.json").write_text("{}")
    (src / "t5gemma").symlink_to("../shared/t5gemma")
    (src / "loop").symlink_to(".")
    (src / "README.md").symlink_to("gone")
    shared_before = (shared / "enc.safetensors").read_bytes()
    out = run("convert", str(src), *(["--in-place"] * in_place), cache=tmp_path / "c").stdout
    assert f"skipped   {src / 'README.md'} -> " in out and "(a link to a file that does not exist)" in out
    assert f"skipped   {src / 'loop'} -> {src / 'loop'}  (a link to a folder: " in out
    if in_place:
        assert (
            f"skipped   {src / 't5gemma'} -> {src / 't5gemma'}  (a link to a folder: not rewritten in place)"
            in out
        )
        assert (shared / "enc.safetensors").read_bytes() == shared_before
        return
    made = tmp_path / "src-fp16"
    assert sorted(str(p.relative_to(made)) for p in made.rglob("*")) == [
        "empty",
        "model.safetensors",
        "t5gemma",
        "t5gemma/enc.safetensors",
        "t5gemma/tokenizer.json",
    ]
    assert read_header(made / "t5gemma" / "enc.safetensors").by_name["w"].dtype == "F16"
    assert (shared / "enc.safetensors").read_bytes() == shared_before


def test_convert_dir_in_place_refuses_a_link_to_a_file_outside_it(tmp_path):
    """A symlink in the folder to a checkpoint elsewhere: converting the folder in place would
    replace that file, which was not named. Refused before anything is written."""
    folder, elsewhere = tmp_path / "u", tmp_path / "other"
    folder.mkdir()
    elsewhere.mkdir()
    save_file({"w": torch.randn(4, 4)}, str(folder / "a.safetensors"))
    save_file({"w": torch.randn(4, 4)}, str(elsewhere / "b.safetensors"))
    (folder / "b.safetensors").symlink_to(elsewhere / "b.safetensors")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")}
    err = run("--json", "convert", str(folder), "--in-place", cache=tmp_path / "c", check_rc=1)
    assert json.loads(err.stdout)["error"]["type"] == "ConfigError" and "outside" in err.stdout
    assert {p: p.read_bytes() for p in tmp_path.rglob("*.safetensors")} == before


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root (CI runs as root)")
def test_root_converting_another_users_file_in_place_leaves_it_theirs(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir()
    ckpt = folder / "model.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(ckpt))
    os.chown(ckpt, 1000, 1000)
    run("convert", str(folder), "--in-place", cache=tmp_path / "c")
    converted = ckpt.stat()
    assert (converted.st_uid, converted.st_gid) == (1000, 1000)
    assert {e.dtype for e in read_header(ckpt).entries} == {"F16"}


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs the CLI as a second user (nobody) with setpriv, which needs root (CI runs as root)",
)
def test_a_user_converting_a_folder_in_place_never_replaces_another_users_file(tmp_path):
    """A folder the user may write to, holding root's checkpoint: renaming over it would take
    root's file away. Refused before anything is written (exit 1)."""
    from support.processes import hidden_from_others

    if (hidden := hidden_from_others(sys.executable, sys.prefix, cli.__file__)) is not None:
        pytest.skip(f"{hidden} cannot be read by another user")
    shared = Path(tempfile.mkdtemp(prefix="sa3loader-shared-"))
    try:
        shared.chmod(0o777)
        save_file({"w": torch.randn(4, 4)}, str(shared / "model.safetensors"))
        (shared / "model.safetensors").chmod(0o644)
        before = (shared / "model.safetensors").read_bytes()
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        proc = subprocess.run(
            [
                *as_nobody,
                sys.executable,
                "-m",
                "sa3loader",
                "--json",
                "--cache-dir",
                str(shared / "c"),
                "convert",
                str(shared),
                "--in-place",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ["PATH"], "HOME": "/nonexistent"},
        )
        assert proc.returncode == 1, proc.stderr
        assert "another user's" in json.loads(proc.stdout)["error"]["message"]
        assert (shared / "model.safetensors").read_bytes() == before
    finally:
        shutil.rmtree(shared)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="runs the CLI as a second user (nobody) with setpriv, which needs root (CI runs as root)",
)
def test_a_sibling_that_cannot_take_its_checkpoints_group_lets_that_group_read_no_more(tmp_path):
    """root:1000 0604 (group 1000 denied, others allowed), converted by nobody, who cannot give
    the sibling group 1000: its members are others to the sibling, so others lose read too."""
    from support.processes import hidden_from_others

    if (hidden := hidden_from_others(sys.executable, sys.prefix, cli.__file__)) is not None:
        pytest.skip(f"{hidden} cannot be read by another user")
    shared = Path(tempfile.mkdtemp(prefix="sa3loader-shared-"))
    try:
        shared.chmod(0o777)
        ckpt = shared / "model.safetensors"
        save_file({"w": torch.randn(4, 4)}, str(ckpt))
        os.chown(ckpt, 0, 1000)
        ckpt.chmod(0o604)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        command = ["-m", "sa3loader", "--json", "--cache-dir", str(shared / "c"), "warm", str(ckpt)]
        env = {"PATH": os.environ["PATH"], "HOME": "/nonexistent"}
        proc = subprocess.run([*as_nobody, *command], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        sibling = Path(json.loads(proc.stdout)["sibling"])
        assert sibling.stat().st_mode & 0o077 == 0, oct(sibling.stat().st_mode)
    finally:
        shutil.rmtree(shared)


@pytest.mark.parametrize("where", ["snapshot", "blobs", "repo"])
@pytest.mark.parametrize("in_place", [False, True], ids=["to-dir-fp16", "in-place"])
def test_convert_dir_never_writes_into_a_hub_cache(tmp_path, where, in_place):
    """``convert <hub>/snapshots/<rev>/`` would write ``<rev>-fp16`` beside it, a revision that does
    not exist to huggingface_hub; in place, blobs would no longer hold what their names hash.
    Refused with a message that says to give --out, which then works."""
    from support.checkpoints import toy_hub_checkpoint

    ckpt = toy_hub_checkpoint(tmp_path / "hf", "org/m", "r1")
    repo = tmp_path / "hf" / "hub" / "models--org--m"
    target = {"snapshot": ckpt.parent, "blobs": repo / "blobs", "repo": repo}[where]
    before = {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()}
    listing = sorted(str(p) for p in (tmp_path / "hf").rglob("*"))
    proc = run(
        "convert", str(target), *(["--in-place"] if in_place else []), cache=tmp_path / "c", check_rc=1
    )
    assert "Hugging Face hub cache" in proc.stderr and "--out" in proc.stderr
    assert sorted(str(p) for p in (tmp_path / "hf").rglob("*")) == listing
    assert {p: p.read_bytes() for p in repo.rglob("*") if p.is_file()} == before
    err = run("--json", "convert", str(target), cache=tmp_path / "c", check_rc=1)
    assert json.loads(err.stdout)["error"]["type"] == "HubCacheError"
    if where == "blobs":  # they carry no .safetensors name: no checkpoint to convert anywhere
        err = run(
            "--json", "convert", str(target), "--out", str(tmp_path / "out"), cache=tmp_path / "c", check_rc=1
        )
        assert "nothing to convert" in err.stdout and not (tmp_path / "out").exists()
        return
    run("convert", str(target), "--out", str(tmp_path / "out"), cache=tmp_path / "c")
    assert list((tmp_path / "out").rglob("*.safetensors"))


@pytest.mark.parametrize("what", ["snapshot-dir", "file", "fp16 file (copied)"])
def test_convert_out_inside_a_hub_cache_is_refused(tmp_path, what):
    """``--out <repo>/snapshots/fp16`` would be listed by huggingface_hub as a revision. A file
    with no float32 is copied, not converted: refused the same (an outside attack: it was
    copied into the snapshot)."""
    from support.checkpoints import toy_hub_checkpoint

    ckpt = toy_hub_checkpoint(tmp_path / "hf", "org/m", "r1")
    if what.startswith("fp16"):
        ckpt = tmp_path / "half.safetensors"
        save_file({"w": torch.randn(4, 4).half()}, str(ckpt))
    snapshot = tmp_path / "hf" / "hub" / "models--org--m" / "snapshots" / "r1"
    listing = sorted(str(p) for p in (tmp_path / "hf").rglob("*"))
    src, out = (
        (ckpt.parent, ckpt.parent.parent / "fp16")
        if what == "snapshot-dir"
        else (ckpt, snapshot / "m16.safetensors")
    )
    err = run("--json", "convert", str(src), "--out", str(out), cache=tmp_path / "c", check_rc=1)
    assert json.loads(err.stdout)["error"]["type"] == "HubCacheError"
    assert sorted(str(p) for p in (tmp_path / "hf").rglob("*")) == listing


@pytest.mark.parametrize("target", ["hub-root", "file"])
def test_in_place_refuses_a_hub_that_stores_files_not_links(tmp_path, target):
    """huggingface_hub stores regular files where it cannot make links (Windows, some mounts):
    converting one in place, or a folder above the hub, would rewrite the download."""
    snap = tmp_path / "hub" / "models--org--y" / "snapshots" / "r1"
    snap.mkdir(parents=True)
    save_file({"w": torch.randn(4, 4)}, str(snap / "model.safetensors"))
    plain = tmp_path / "hub" / "a.safetensors"  # beside the hub: converted only if nothing is refused
    save_file({"w": torch.randn(4, 4)}, str(plain))
    before = {p: p.read_bytes() for p in (tmp_path / "hub").rglob("*") if p.is_file()}
    src = tmp_path / "hub" if target == "hub-root" else snap / "model.safetensors"
    err = run("--json", "convert", str(src), "--in-place", cache=tmp_path / "c", check_rc=1)
    assert json.loads(err.stdout)["error"]["type"] == "HubCacheError"
    assert {p: p.read_bytes() for p in (tmp_path / "hub").rglob("*") if p.is_file()} == before


def test_convert_single_file_is_recorded_so_loads_hit(ckpt_dir, tmp_path):
    src = ckpt_dir / "model.safetensors"
    run("convert", str(src), cache=tmp_path / "c")
    rows = json.loads(run("cache", "ls", "--json", cache=tmp_path / "c").stdout)
    assert [(r["source"], r["status"]) for r in rows] == [(str(src), "ok")]
    assert rows[0]["sibling"] == str(ckpt_dir / ".cache" / "sa3loader" / "model.fp16.safetensors")
    warm = json.loads(run("warm", str(src), "--json", cache=tmp_path / "c").stdout)
    assert warm["converted"] is False and warm["reason"] == "cache hit"


def test_a_checkpoint_rewritten_with_its_mtime_set_back_is_stale_to_every_command(ckpt_dir, tmp_path):
    """Same size, mtime and header, other weights: the commands judge it by a load's rule (the
    fingerprint, where the stat does not vouch), not by the hard fields alone."""
    cache = tmp_path / "c"
    src = ckpt_dir / "model.safetensors"
    run("warm", str(src), cache=cache)
    before = src.stat()
    with open(src, "r+b") as f:  # in place: other weights, the header untouched
        f.write(tensors_rewritten(src))
    os.utime(src, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert statuses(cache) == ["stale"]
    assert [c["check"] for c in json.loads(run("cache", "verify", "--json", cache=cache).stdout)] == ["stale"]
    assert "would prune 1 row(s)" in run("cache", "prune", "--dry-run", cache=cache).stdout
    assert json.loads(run("warm", str(src), "--json", cache=cache).stdout)["converted"] is True


def statuses(cache: Path) -> list[str]:
    """What ``cache ls`` says of each row."""
    return [r["status"] for r in json.loads(run("cache", "ls", "--json", cache=cache).stdout)]


def tensors_rewritten(path: Path) -> bytes:
    """The file's bytes with every tensor's data changed, its header and size kept."""
    raw = bytearray(path.read_bytes())
    start = read_header(path).data_start
    raw[start:] = bytes((b + 1) % 256 for b in raw[start:])
    return bytes(raw)


@pytest.mark.parametrize("damage", ["truncated", "length", "header", "symlink", "directory"])
def test_a_damaged_sibling_is_damaged_to_verify_not_stale(ckpt_dir, tmp_path, damage):
    """Exit 3 means a damaged or missing sibling: one cut short, with its header broken or edited,
    or replaced by a link or a directory is damaged (its checkpoint did not change)."""
    cache = tmp_path / "c"
    run("warm", str(ckpt_dir / "model.safetensors"), cache=cache)
    sibling = ckpt_dir / ".cache" / "sa3loader" / "model.fp16.safetensors"
    raw = sibling.read_bytes()
    writable(sibling)
    if damage == "truncated":
        sibling.write_bytes(raw[: len(raw) // 2])
    elif damage == "length":
        sibling.write_bytes(b"\xff" * 8 + raw[8:])
    elif damage == "header":  # same length, other JSON: the metadata's value edited
        sibling.write_bytes(raw.replace(b'"k":"v"', b'"k":"w"'))
    else:
        sibling.unlink()
        sibling.symlink_to(tmp_path) if damage == "symlink" else sibling.mkdir()
    checked = run("cache", "verify", "--json", cache=cache, check_rc=3)
    assert [c["check"] for c in json.loads(checked.stdout)] == ["damaged sibling"]
    assert statuses(cache) == ["damaged sibling"]


def test_a_checkpoint_replaced_by_a_directory_is_a_missing_source(ckpt_dir, tmp_path):
    cache = tmp_path / "c"
    src = ckpt_dir / "model.safetensors"
    run("warm", str(src), cache=cache)
    src.unlink()
    src.mkdir()
    assert statuses(cache) == ["missing source"]


def test_cache_verify_prune_clear(ckpt_dir, tmp_path):
    cache = tmp_path / "c"
    src = ckpt_dir / "model.safetensors"
    run("warm", str(src), cache=cache)
    assert json.loads(run("cache", "verify", "--json", cache=cache).stdout)[0]["check"] == "ok"
    sibling = ckpt_dir / ".cache" / "sa3loader" / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    raw[-2] ^= 0xFF
    writable(sibling).write_bytes(bytes(raw))
    run("cache", "verify", cache=cache, check_rc=3)

    save_file({"w": torch.randn(8, 8) * 3, "i": torch.arange(4)}, str(src))  # source changed
    rows = json.loads(run("cache", "ls", "--json", cache=cache).stdout)
    assert rows[0]["status"] == "stale"
    dry = run("cache", "prune", "--dry-run", cache=cache)
    assert "would prune" in dry.stdout and sibling.exists()
    pruned = run("cache", "prune", cache=cache)
    assert pruned.stdout.endswith("\npruned 1 row(s)\n"), pruned.stdout
    assert not sibling.exists()
    assert json.loads(run("cache", "ls", "--json", cache=cache).stdout) == []

    run("warm", str(src), cache=cache)
    foreign = ckpt_dir / "keep.safetensors"
    foreign.write_bytes(b"not ours")
    assert len(json.loads(run("cache", "clear", "--json", cache=cache).stdout)["rows"]) == 1
    assert not sibling.exists() and foreign.exists() and src.exists()


def test_info_and_errors(ckpt_dir, tmp_path):
    data = json.loads(run("info", str(ckpt_dir / "model.safetensors"), "--json", cache=tmp_path / "c").stdout)
    assert data["by_dtype"]["F32"] == {"tensors": 1, "bytes": 256}
    assert data["sibling"] is None  # the exact size it would have: test_info_says_what_a_sibling_costs_*
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    proc = run("info", str(bad), cache=tmp_path / "c", check_rc=1)
    assert proc.stderr.startswith("sa3loader: error:") and str(bad) in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "Traceback" in run("--debug", "info", str(bad), cache=tmp_path / "c", check_rc=None).stderr
    assert run("bogus", cache=tmp_path / "c", check_rc=2).returncode == 2


def test_help_reads_well(tmp_path):
    out = run("--help", cache=tmp_path).stdout
    for word in ("convert", "warm", "info", "cache", "Exit codes"):
        assert word in out
    smoke = run_process("--help", cache=tmp_path)
    assert smoke.returncode == 0 and smoke.stdout == out  # python -m sa3loader is the same CLI


def test_convert_says_each_thing_once_in_exact_words(tmp_path):
    """Converting again reports the stored range figures, not zeros."""
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.tensor([1.0, 70000.0, 1e-9, 3e-6]), "i": torch.arange(2)}, str(src))
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    report = "fp16 range: 1 values overflowed to inf, 1 nonzero values flushed to zero\n"
    first = run("convert", str(src), cache=tmp_path / "c")
    assert (first.stdout, first.stderr) == (f"converted {src} -> {sibling}\n{report}", "")
    again = run("convert", str(src), cache=tmp_path / "c")
    assert (again.stdout, again.stderr) == (f"unchanged {src} -> {sibling}\n{report}", "")
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    save_file(
        {"w": torch.tensor([1.0, 70000.0, 1e-9, 3e-6]), "i": torch.arange(2)}, str(fresh / "m.safetensors")
    )
    proc = run_process("convert", str(fresh / "m.safetensors"), cache=tmp_path / "c2")  # real logging set-up
    assert proc.returncode == 0 and (proc.stdout + proc.stderr).count("fp16 range") == 1, proc


def test_warm_verify_reports_a_mismatch_once(ckpt_dir, tmp_path, caplog):
    import logging

    src = ckpt_dir / "model.safetensors"
    run("warm", str(src), cache=tmp_path / "c")
    sibling = ckpt_dir / ".cache" / "sa3loader" / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    raw[-2] ^= 0xFF
    writable(sibling).write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="sa3loader")
    proc = run("warm", str(src), "--verify", cache=tmp_path / "c", check_rc=3)  # a damaged sibling replaced
    assert proc.stdout.startswith("converted: ")
    assert "checked every byte against fp16 of the source: max abs diff 0.0 over " in proc.stdout
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    hit = run("warm", str(src), "--verify", "--json", cache=tmp_path / "c")
    assert json.loads(hit.stdout)["max_abs_diff"] == 0.0 and json.loads(hit.stdout)["reason"] == "cache hit"


def test_warm_takes_a_directory_as_convert_does(ckpt_dir, tmp_path):
    """``warm DIR`` creates (or checks) the sibling of every checkpoint in it, as ``convert DIR``
    takes a directory; sa3loader's own siblings in it are not checkpoints."""
    run("warm", str(ckpt_dir), cache=tmp_path / "c")
    again = json.loads(run("warm", str(ckpt_dir), "--json", cache=tmp_path / "c").stdout)
    sources = sorted(str(p) for p in ckpt_dir.rglob("*.safetensors") if ".fp16." not in p.name)
    assert sorted(r["source"] for r in again) == sources
    assert all(r["sibling"] for r in again if r["reason"] != "no float32 tensors: loaded as is")


def test_convert_dir_is_all_or_nothing(ckpt_dir, tmp_path, monkeypatch):
    """A bad file in the middle, or Ctrl-C, leaves no output and no --force trap."""

    out = Path(str(ckpt_dir) + "-fp16")
    bad = ckpt_dir / "t5gemma-b-b-ul2" / "model.safetensors"
    good = bad.read_bytes()
    bad.write_bytes(b"\xff" * 64)  # a file that is not safetensors, after model.safetensors
    assert "not a safetensors file" in run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=1).stderr
    assert not out.exists() and not list(ckpt_dir.parent.glob("sa3-fp16*"))
    bad.write_bytes(good)

    def interrupted():  # README.md is already copied by then
        raise KeyboardInterrupt

    with injected(at("convert", interrupted)):
        assert run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=130).returncode == 130
    assert not out.exists() and not list(ckpt_dir.parent.glob("sa3-fp16*"))
    run("convert", str(ckpt_dir), cache=tmp_path / "c")  # no --force needed
    assert (out / "model.safetensors").exists() and (out / "t5gemma-b-b-ul2" / "tokenizer.json").exists()


def test_convert_dir_force_replaces_the_whole_output(ckpt_dir, tmp_path):
    out = Path(str(ckpt_dir) + "-fp16")
    run("convert", str(ckpt_dir), cache=tmp_path / "c")
    (out / "stale.txt").write_text("from an older conversion")
    run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=1)  # exists: needs --force
    run("convert", str(ckpt_dir), "--force", cache=tmp_path / "c")
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in ckpt_dir.parent.iterdir() if p.name.startswith("sa3-fp16")) == ["sa3-fp16"]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("where", ["the-parent", "the-source", "a-link-to-the-source"])
def test_convert_dir_refuses_an_output_that_holds_the_source_even_with_force(ckpt_dir, tmp_path, where):
    """--force replaces the whole output: the source, and for a parent all beside it, would go."""
    (ckpt_dir.parent / "notes.txt").write_text("the user's")
    outs = {"the-parent": ckpt_dir.parent, "the-source": ckpt_dir, "a-link-to-the-source": tmp_path / "link"}
    out = outs[where]
    if where == "a-link-to-the-source":
        out.symlink_to(ckpt_dir)
    before = tree_bytes(tmp_path)
    proc = run("convert", str(ckpt_dir), "--out", str(out), "--force", cache=tmp_path / "c", check_rc=1)
    assert "would delete the source" in proc.stderr
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("out", ["sub", "sub/deeper", "new", "link-to-sub"])
def test_convert_dir_refuses_an_output_inside_the_source_even_with_force(ckpt_dir, tmp_path, out):
    """An output folder inside the source: what a run finds there is the source's own (the walk
    leaves it out, --force replaces it): a subfolder of checkpoints, and a README, stay."""
    sub = ckpt_dir / "sub"
    sub.mkdir()
    save_file({"w": torch.ones(4)}, str(sub / "b.safetensors"))
    (sub / "README.txt").write_text("the user's")
    (sub / "deeper").mkdir()
    (ckpt_dir / "link-to-sub").symlink_to(sub)
    before = tree_bytes(tmp_path)
    proc = run(
        "convert", str(ckpt_dir), "--out", str(ckpt_dir / out), "--force", cache=tmp_path / "c", check_rc=1
    )
    assert "would delete the source" in proc.stderr
    assert tree_bytes(tmp_path) == before


def test_convert_file_refuses_an_output_that_is_the_source_even_with_force(ckpt_dir, tmp_path):
    source = ckpt_dir / "model.safetensors"
    (tmp_path / "link.safetensors").symlink_to(source)
    before = tree_bytes(tmp_path)
    for out in (source, tmp_path / "link.safetensors"):
        proc = run("convert", str(source), "--out", str(out), "--force", cache=tmp_path / "c", check_rc=1)
        assert "would delete the source" in proc.stderr
    assert tree_bytes(tmp_path) == before


@pytest.mark.parametrize("what", ["file", "fp16 file (copied)", "dir"])
@pytest.mark.parametrize("target", ["nothing", "a file"])
def test_a_link_at_out_is_kept_or_replaced_never_written_through(ckpt_dir, tmp_path, what, target):
    """``--out`` naming a link (to nothing, or to a file): without ``--force`` the link is the
    user's, kept, and the refusal is the one for any output there (exit 1, ``exists; pass
    --force``); with it, the link is replaced by the output, never written through: what it
    names stays as it was (absent, or the same bytes)."""
    src = ckpt_dir / "model.safetensors" if what != "dir" else ckpt_dir
    if what.startswith("fp16"):
        src = tmp_path / "half.safetensors"
        save_file({"w": torch.randn(4, 4).half()}, str(src))
    out, named = tmp_path / "out", tmp_path / "kept" / "x"
    if target == "a file":
        named.parent.mkdir()
        named.write_bytes(b"precious")
    out.symlink_to(named)
    proc = run("convert", str(src), "--out", str(out), cache=tmp_path / "c", check_rc=1)
    assert f"{out} exists; pass --force to replace it" in proc.stderr
    assert out.is_symlink() and os.readlink(out) == str(named)
    run("convert", str(src), "--out", str(out), "--force", cache=tmp_path / "c")
    assert not out.is_symlink() and (out.is_dir() if what == "dir" else out.is_file())
    assert (named.read_bytes() == b"precious") if target == "a file" else not named.parent.exists()
    assert not list(tmp_path.glob("out.*"))


def test_an_old_output_that_cannot_be_removed_is_named_not_left_unseen(
    ckpt_dir, tmp_path, monkeypatch, caplog
):
    """``convert DIR --force`` sets the old output aside, then removes it; where part of it is
    not the user's to delete, the set-aside folder (GBs) stays, and the warning names it."""
    out = Path(str(ckpt_dir) + "-fp16")
    run("convert", str(ckpt_dir), cache=tmp_path / "c")
    rmdir = os.rmdir

    def refused(path, *args, **kwargs):  # as a folder of another user's inside it would be
        if ".replaced-" in os.fsdecode(path):
            raise PermissionError(13, "Permission denied", path)
        return rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", refused)
    run("convert", str(ckpt_dir), "--force", cache=tmp_path / "c")
    (aside,) = tmp_path.glob(f"{out.name}.replaced-*")
    assert f"{aside} could not be removed" in caplog.text and out.is_dir()


def test_convert_dir_skips_what_is_not_a_regular_file(ckpt_dir, tmp_path):
    """A FIFO in the folder copied: reading it would wait for a writer for ever (an outside
    attack: the convert hung, its staging folder left). Skipped, saying why; the rest copied."""
    fifo = ckpt_dir / "pipe"
    os.mkfifo(fifo)
    proc = run("convert", str(ckpt_dir), "--out", str(tmp_path / "o"), cache=tmp_path / "c")
    assert f"skipped   {fifo} -> {tmp_path / 'o' / 'pipe'}  (not a regular file)" in proc.stdout
    assert (tmp_path / "o" / "model.safetensors").exists() and not (tmp_path / "o" / "pipe").exists()


def test_convert_file_to_a_folder_says_to_name_the_file(ckpt_dir, tmp_path):
    """``convert FILE --out FOLDER``: refused before anything is written, with or without
    --force (it was a raw IsADirectoryError for a copied file, a ConversionError otherwise)."""
    (tmp_path / "o").mkdir()
    half = tmp_path / "half.safetensors"
    save_file({"w": torch.randn(4, 4).half()}, str(half))
    for src in (ckpt_dir / "model.safetensors", half):
        for force in ([], ["--force"]):
            err = run(
                "--json",
                "convert",
                str(src),
                "--out",
                str(tmp_path / "o"),
                *force,
                cache=tmp_path / "c",
                check_rc=1,
            )
            error = json.loads(err.stdout)["error"]
            assert (
                error["type"] == "OutputExistsError"
                and "give --out the output file's name" in error["message"]
            )
    assert not list((tmp_path / "o").iterdir()) and not list(tmp_path.glob("o.*"))


def test_an_old_output_set_aside_is_kept_when_a_link_is_at_out(ckpt_dir, tmp_path, caplog):
    """A killed ``convert DIR`` left the old output aside; since, a link was put at ``--out``.
    The link is no output of convert's: the old output is neither renamed over it (a raw
    ENOTDIR on every run, from an outside attack) nor removed; the warning names it."""
    out = tmp_path / "o"
    aside = Path(f"{out}.replaced-{dead_pid()}-deadbeef")
    aside.mkdir()
    (aside / "old.safetensors").write_bytes(b"the old output")
    out.symlink_to(tmp_path / "nowhere")
    run("convert", str(ckpt_dir), "--out", str(out), "--force", cache=tmp_path / "c")
    assert (
        out.is_dir()
        and not out.is_symlink()
        and (aside / "old.safetensors").read_bytes() == b"the old output"
    )
    assert f"{aside} is an old output a killed convert set aside: left for you" in caplog.text


NOT_COUNTED_BECAUSE = "found without the row that kept it, or holding bf16/f64 a load casts"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
def test_convert_of_a_file_without_float32_counts_nothing_it_did_not_count(tmp_path, dtype):
    """No float32: nothing is converted, but a ``model_half`` load still casts bf16 and f64 to
    fp16 (1e10 overflows): their range is not counted, never 0 (an outside attack); an fp16
    file's is 0, truly (a load casts nothing)."""
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.full((4, 4), 1e10 if dtype != torch.float16 else 1.0, dtype=dtype)}, str(src))
    counted = (
        "fp16 range: 0 values"
        if dtype == torch.float16
        else f"fp16 range: not counted ({NOT_COUNTED_BECAUSE})"
    )
    for where in ([], ["--out", str(tmp_path / "copy.safetensors")]):
        assert counted in run("convert", str(src), *where, cache=tmp_path / "c").stdout


def test_convert_says_the_range_is_not_known_where_no_row_kept_it(tmp_path):
    """The index lost (removed, or set aside by ``cache repair``): the sibling is found and
    adopted, but what its conversion counted is gone. Said, never a 0 nothing counted."""
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.tensor([1.0, 70000.0, 1e-9, 3e-6])}, str(src))
    assert (
        "1 values overflowed to inf, 1 nonzero values flushed"
        in run("convert", str(src), cache=tmp_path / "c").stdout
    )
    shutil.rmtree(tmp_path / "c" / "index")
    again = run("convert", str(src), cache=tmp_path / "c")
    assert again.stdout.endswith(f"fp16 range: not counted ({NOT_COUNTED_BECAUSE})\n")
    data = json.loads(run("--json", "convert", str(src), cache=tmp_path / "c").stdout)
    assert [(a["action"], a["overflow_to_inf"], a["flushed_to_zero"]) for a in data] == [
        ("unchanged", None, None)
    ]


def test_convert_dir_heals_what_a_kill_left(ckpt_dir, tmp_path):
    """Killed between its two renames: the old output is aside, the new one complete but unplaced."""
    out = Path(str(ckpt_dir) + "-fp16")
    run("convert", str(ckpt_dir), cache=tmp_path / "c")
    pid = dead_pid()
    aside = Path(f"{out}.replaced-{pid}-abcd1234")
    staging = Path(f"{out}.incomplete-{pid}-abcd1234")
    out.rename(aside)
    staging.mkdir()
    (staging / "half.safetensors").write_bytes(b"partial")
    run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=1)  # the old output is back: --force
    assert (out / "model.safetensors").exists() and not aside.exists()
    assert staging.exists()  # changed just now: maybe a convert of another pid namespace, at work
    run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=1)
    left_long_ago(staging)
    run("convert", str(ckpt_dir), cache=tmp_path / "c", check_rc=1)
    assert not staging.exists()


@pytest.mark.parametrize("killed", [False, True])
def test_convert_dir_force_over_a_linked_output_replaces_the_link_and_leaves_nothing_aside(
    ckpt_dir, tmp_path, killed
):
    """An --out that is a link to a folder: --force puts the output where the link was and
    removes the link set aside (it was left as <out>.replaced-*), never what it names; a kill
    between the renames left the link aside: the next run removes it as well."""
    target, out = tmp_path / "elsewhere", tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("the user's")
    out.symlink_to(target)
    if killed:  # the new output was placed, the old one (the link) still aside
        run("convert", str(ckpt_dir), "--out", str(tmp_path / "new"), cache=tmp_path / "c")
        out.rename(f"{out}.replaced-{dead_pid()}-abcd1234")
        (tmp_path / "new").rename(out)
    run("convert", str(ckpt_dir), "--out", str(out), "--force", cache=tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == ["out"]
    assert not out.is_symlink() and (out / "model.safetensors").exists()
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize(
    "pid", ["beyond any kernel's", "this process's", "another user's", "another user's, planted"]
)
@pytest.mark.parametrize("infix", [".incomplete-", ".replaced-"])
def test_convert_dir_keeps_a_folder_that_only_looks_like_what_a_kill_left(ckpt_dir, tmp_path, pid, infix):
    """convert removes only what it made or set aside (an outside attack): a pid no kernel gives
    counted as gone (10**20 raised OverflowError: a traceback), this process's pid as a dead
    writer's (two converts in threads), and root's convert removed another user's folder. An
    output set aside by a killed ``--force`` is put back whoever owns it (a later attack: root's
    ``--force`` over another uid's output, killed, stranded it): renaming back removes nothing.
    Put back only where the folder holding it is that user's: one planted in a folder of
    someone else's (a sticky /tmp) is never made your output (a third attack: it was, or a
    raw PermissionError failed every run)."""
    from sa3loader import cli

    home = tmp_path / "home"  # the folder the output is in: the other user's, in their case
    home.mkdir()
    out = home / "out"
    number = {"beyond any kernel's": 99999999999, "this process's": os.getpid()}.get(pid, dead_pid())
    theirs = Path(f"{out}{infix}{number}-abcdef12")
    theirs.mkdir()
    (theirs / "precious.txt").write_text("mine")
    if pid.startswith("another user's"):
        if os.geteuid() != 0:
            pytest.skip("giving the folder to another user needs root (CI runs as root)")
        os.chown(theirs, 65534, 65534)
        if pid == "another user's":
            os.chown(home, 65534, 65534)
    rc = cli.main(["--cache-dir", str(tmp_path / "c"), "convert", str(ckpt_dir), "--out", str(out)])
    if infix == ".replaced-" and pid == "another user's":  # what root's killed --force left: put back
        assert rc == 1 and (out / "precious.txt").read_text() == "mine" and not theirs.exists()
        return
    assert (
        rc == 0 and (theirs / "precious.txt").read_text() == "mine" and (out / "model.safetensors").exists()
    )


def test_convert_dir_leaves_a_users_folder_named_like_its_staging(ckpt_dir, tmp_path):
    """Only <out>.incomplete-<pid>-<8 hex> and <out>.replaced-<pid>-<8 hex> are convert's own."""
    out = Path(str(ckpt_dir) + "-fp16")
    mine = [Path(f"{out}.incomplete-old"), Path(f"{out}.replaced-1"), Path(f"{out}.incomplete-1-2")]
    for folder in mine:
        folder.mkdir()
        (folder / "notes.txt").write_text("mine")
    run("convert", str(ckpt_dir), cache=tmp_path / "c")
    run("convert", str(ckpt_dir), "--force", cache=tmp_path / "c")
    assert all((folder / "notes.txt").read_text() == "mine" for folder in mine)


def test_clear_and_prune_list_every_file_with_its_size(tmp_path, monkeypatch):
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(src))
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    size = sibling.stat().st_size
    (sibling.parent / "model.fp16.safetensors.incomplete-1-deadbeef").write_bytes(b"x" * 10)
    listing = (
        f"would remove sibling {sibling} ({size / 1e3:.3g} kB)\n"
        f"would remove temp file {sibling}.incomplete-1-deadbeef (10 B)\n"
        f"would remove lock file {sibling}.lock (0 B)\n"
        f"would remove empty dir {sibling.parent}/ (0 B)\n"
        f"would remove empty dir {sibling.parent.parent}/ (0 B)\n"
        f"would remove 3 file(s) and 2 empty dir(s), {(size + 10) / 1e3:.3g} kB in all\n"
    )
    dry = run("cache", "clear", "--dry-run", cache=cache)
    assert dry.stdout == listing + f"would clear 1 row(s) from {cache}\n" and sibling.exists()
    listed = json.loads(run("cache", "clear", "--dry-run", "--json", cache=cache).stdout)
    assert [(r["kind"], r["bytes"]) for r in listed["removed"]] == [
        ("sibling", size),
        ("temp file", 10),
        ("lock file", 0),
        ("empty dir", 0),
        ("empty dir", 0),
    ]
    monkeypatch.setitem(_faults.facts, "interactive", lambda subject, real: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert "nothing deleted" in run("cache", "clear", cache=cache).stdout and sibling.exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    out = run("cache", "clear", cache=cache).stdout
    assert out.endswith(
        f"removed 3 file(s) and 2 empty dir(s), {(size + 10) / 1e3:.3g} kB in all\n"
        f"cleared 1 row(s) from {cache}\n"
    )
    assert not sibling.exists() and not (tmp_path / ".cache").exists()


def test_cli_names_its_arguments_for_people(capsys):
    assert cli.main(["cache"]) == 2
    err = capsys.readouterr().err
    assert "ACTION" in err and "cache_command" not in err
    assert "XDG_CACHE_HOME" in cli.build_parser().format_help()


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.linspace(-2, 2, 64).reshape(8, 8), "i": torch.arange(4)}, str(path))
    return path


def flip_last_value(sibling, to: float) -> float:
    """Set the last fp16 value of the sibling's float tensor; returns the difference made."""
    header = read_header(sibling)
    entry = header.by_name["w"]
    offset = header.data_start + entry.end - 2
    raw = bytearray(sibling.read_bytes())
    before = torch.frombuffer(raw[offset : offset + 2], dtype=torch.float16).item()
    raw[offset : offset + 2] = torch.tensor([to], dtype=torch.float16).view(torch.uint8).numpy().tobytes()
    writable(sibling).write_bytes(bytes(raw))
    return abs(to - before)


def test_convert_verify_checks_new_and_existing_siblings_with_measured_figures(src, tmp_path):
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    verdict = "verify: max abs diff of fp16(source) vs output = 0.0 over 1 float tensor(s) in 1 file(s)\n"
    first = run("convert", str(src), "--verify", cache=tmp_path / "c")
    assert first.stdout.startswith(f"converted {src} -> {sibling}\n{verdict}")
    again = json.loads(run("convert", str(src), "--verify", "--json", cache=tmp_path / "c").stdout)
    assert [(a["action"], a["max_abs_diff"], a["float_tensors"]) for a in again] == [("unchanged", 0.0, 1)]

    flip_last_value(sibling, 1000.0)
    damaged = run("convert", str(src), "--verify", cache=tmp_path / "c", check_rc=3)
    assert f"replaced  {sibling}: it failed the content check\n{verdict}" in damaged.stdout
    flip_last_value(sibling, 1000.0)  # without --verify: the spots a load checks see it too
    damaged = run("convert", str(src), cache=tmp_path / "c", check_rc=3)
    assert f"replaced  {sibling}: it failed the content check\n" in damaged.stdout


def test_convert_verify_that_fails_leaves_neither_output_nor_temp_file(src, tmp_path):
    """``convert --out --verify``: the written file is checked before it gets its name; one that
    differs (here: a value changed between its write and its check) is removed, a
    ``VerificationError``, and ``--out`` is left as it was: absent, or the old output."""
    from sa3loader._convert_dir import convert_file

    out = tmp_path / "out.safetensors"

    def damage() -> None:
        (temp,) = tmp_path.glob("out.safetensors.incomplete-*")
        flip_last_value(temp, 1000.0)

    for before in (None, b"the old output"):
        if before is not None:
            out.write_bytes(before)
        with injected(at("written", damage)), pytest.raises(sa3loader.VerificationError):
            convert_file(str(src), str(out), verify=True, force=True)
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("out")) == [
            "out.safetensors"
        ] * bool(before)
        assert before is None or out.read_bytes() == before


def test_cache_verify_prints_the_difference_it_measured(src, tmp_path):
    run("warm", str(src), cache=tmp_path / "c")
    made = flip_last_value(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors", 1000.0)
    checks = json.loads(run("cache", "verify", "--json", cache=tmp_path / "c", check_rc=3).stdout)
    assert checks[0]["check"].startswith("content mismatch: w differ")
    assert checks[0]["status"] == "damaged sibling"  # not the row's "ok", which skipped the spots
    assert checks[0]["max_abs_diff"] == pytest.approx(made) and made > 900


@pytest.mark.parametrize("command", [["ls"], ["clear", "--yes"], ["prune"], ["verify"]])
@pytest.mark.parametrize("damage", ["locked", "corrupt"])
def test_a_locked_or_corrupt_index_is_an_error_not_an_empty_cache(
    src, tmp_path, monkeypatch, command, damage
):
    monkeypatch.setitem(_faults.tunings, "index_timeout_s", 0.2)  # how long a locked index is waited for
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    db = cache / "index" / "cache.db"
    holder = None
    if damage == "corrupt":
        db.write_bytes(b"this is not a sqlite database" * 100)
    else:
        holder = sqlite3.connect(db, timeout=0)
        holder.execute("BEGIN EXCLUSIVE")
    try:
        proc = run("cache", *command, cache=cache, check_rc=1)
    finally:
        if holder is not None:
            holder.rollback()
            holder.close()
    assert proc.stdout == ""
    assert proc.stderr.startswith(f"sa3loader: error: {db}: the sa3loader index cannot ")
    assert (
        "sa3loader cache repair" in proc.stderr
        and (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()
    )


def test_cache_repair_sets_a_corrupt_index_aside_and_loads_adopt_again(src, tmp_path):
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    assert run("cache", "repair", cache=cache).stdout == f"the index in {cache} is sound: nothing to repair\n"
    (cache / "index" / "cache.db").write_bytes(b"garbage" * 100)
    out = json.loads(run("cache", "repair", "--json", cache=cache).stdout)
    assert out["repaired"] and os.path.isdir(out["set_aside"])
    assert json.loads(run("cache", "ls", "--json", cache=cache).stdout) == []
    warm = json.loads(run("warm", str(src), "--json", cache=cache).stdout)
    assert warm["reason"] == "cache hit" and not warm["converted"]


def test_prune_keeps_a_sibling_valid_for_the_current_source(src, tmp_path):
    """A row left stale by a change of source names a sibling that another cache dir's load
    has since republished for the new source: that sibling is the current one, and stays, with
    its lock."""
    run("warm", str(src), cache=tmp_path / "a")
    save_file({"w": torch.linspace(-3, 3, 64).reshape(8, 8), "i": torch.arange(4)}, str(src))
    run("warm", str(src), cache=tmp_path / "b")  # republished beside the source
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    republished = sibling.read_bytes()
    dry = json.loads(run("cache", "prune", "--dry-run", "--json", cache=tmp_path / "a").stdout)
    assert [r["status"] for r in dry["rows"]] == ["stale"]
    real = json.loads(run("cache", "prune", "--json", cache=tmp_path / "a").stdout)
    assert sibling.read_bytes() == republished
    kept = [(k["path"], k["why"]) for k in real["kept"]]
    assert kept == [(str(sibling), f"it is valid for the current {src}")]
    assert (dry["removed"], dry["kept"]) == (real["removed"], real["kept"])  # the dry run says what is done
    assert Path(f"{sibling}.lock").exists()  # a sibling that stays keeps its lock


def test_dry_run_lists_exactly_what_the_real_run_removes(tmp_path):
    """Siblings in the cache dir of sources that are gone, their locks, and the dirs they leave empty."""
    cache = tmp_path / "c"
    for name in ("a", "b"):
        hub = tmp_path / "hub" / "models--o--n" / "snapshots" / name / "model.safetensors"
        hub.parent.mkdir(parents=True)
        save_file({"w": torch.randn(8, 8) + ord(name)}, str(hub))
        run("warm", str(hub), cache=cache)
        hub.unlink()
    dry = json.loads(run("cache", "prune", "--dry-run", "--json", cache=cache).stdout)
    real = json.loads(run("cache", "prune", "--json", cache=cache).stdout)
    assert real["removed"] == dry["removed"] and real["kept"] == []
    assert (
        sorted(r["kind"] for r in real["removed"]) == ["empty dir"] * 2 + ["lock file"] * 2 + ["sibling"] * 2
    )
    assert list((cache / "siblings").iterdir()) == []


def test_json_errors_and_bad_usage_are_one_document_on_stdout(tmp_path):
    missing = tmp_path / "missing.safetensors"
    proc = run("info", str(missing), "--json", cache=tmp_path / "c", check_rc=1)
    assert proc.stderr == ""
    assert json.loads(proc.stdout) == {
        "error": {
            "type": "CheckpointNotFoundError",
            "message": f"{missing}: no such checkpoint file",
            "filename": str(missing),
        },
        "exit_code": 1,
    }
    usage = run("cache", "list", "--json", cache=tmp_path / "c", check_rc=2)
    assert json.loads(usage.stdout)["exit_code"] == 2 and usage.stderr == ""


def test_global_options_go_before_or_after_the_command_and_version(src, tmp_path, capsys):
    assert cli.main(["cache", "ls", "--json", "--cache-dir", str(tmp_path / "after")]) == 0
    assert json.loads(capsys.readouterr().out) == []
    assert cli.main(["--cache-dir", str(tmp_path / "before"), "warm", str(src)]) == 0
    assert (tmp_path / "before" / "index").is_dir()
    capsys.readouterr()
    assert cli.main(["--version"]) == 0 and capsys.readouterr().out == f"sa3loader {__version__}\n"


@pytest.mark.parametrize("argv", [["--json", "--version"], ["--version", "--json"]], ids=["before", "after"])
def test_json_version_is_one_json_document(argv, capsys):
    assert cli.main(argv) == 0
    assert json.loads(capsys.readouterr().out) == {"version": __version__}


@pytest.mark.parametrize(
    "argv", [["--json", "--help"], ["convert", "--help", "--json"], ["cache", "-h", "--json"]]
)
def test_help_with_json_is_one_document_too(tmp_path, argv):
    """README: with ``--json`` every outcome is one JSON document (``--help`` printed text)."""
    plain = run(*[a for a in argv if a != "--json"], cache=tmp_path / "c").stdout
    assert plain.startswith("usage: sa3loader")
    assert json.loads(run(*argv, cache=tmp_path / "c").stdout) == {"help": plain}


def test_options_are_not_abbreviated(tmp_path):
    """``--jso`` was taken for ``--json`` by the parser but not where main looks for "--json"
    (help, usage errors): some outcomes came out as JSON, others as text."""
    assert (
        "unrecognized arguments: --jso"
        in run("--jso", "cache", "ls", cache=tmp_path / "c", check_rc=2).stderr
    )


def test_a_usage_error_in_json_names_a_public_type(tmp_path):
    usage = run("cache", "lss", "--json", cache=tmp_path / "c", check_rc=2)
    assert json.loads(usage.stdout)["error"]["type"] == "UsageError"


@pytest.mark.parametrize(("key", "code"), [(EOFError, 1), (KeyboardInterrupt, 130)], ids=["ctrl-d", "ctrl-c"])
def test_ending_input_at_the_prompt_cancels_ctrl_c_with_exit_130(src, tmp_path, monkeypatch, key, code):
    """README: exit 130 for Ctrl-C (it was 1 at the prompt), 1 for an error (input ended)."""
    run("warm", str(src), cache=tmp_path / "c")
    monkeypatch.setitem(_faults.facts, "interactive", lambda subject, real: True)

    def no_answer(prompt):
        raise key

    monkeypatch.setattr("builtins.input", no_answer)
    proc = run("cache", "clear", cache=tmp_path / "c", check_rc=code)
    assert proc.stderr.endswith("[y/N] \nsa3loader: cancelled: nothing deleted\n")  # stdout is no terminal
    assert (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()
    out = json.loads(run("cache", "clear", "--json", cache=tmp_path / "c", check_rc=code).stdout)
    assert out["exit_code"] == code and out["error"]["message"] == "nothing deleted"
    assert (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").exists()


def test_clear_with_json_asks_at_a_terminal_too_on_stderr(src, tmp_path, monkeypatch, capsys):
    """`--yes`: "clear: do not ask on a terminal"; `--json` deleted without asking (a docs walk).
    Asked on stderr, so that stdout stays one JSON document; no: nothing deleted."""
    run("warm", str(src), cache=tmp_path / "c")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    monkeypatch.setitem(_faults.facts, "interactive", lambda subject, real: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    proc = run("cache", "clear", "--json", cache=tmp_path / "c")
    assert json.loads(proc.stdout)["removed"] == [] and sibling.exists()
    assert "delete these files? [y/N]" in proc.stderr and str(sibling) in proc.stderr
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    assert json.loads(run("cache", "clear", "--json", cache=tmp_path / "c").stdout)["removed"]
    assert not sibling.exists()


@given(st.integers(min_value=0, max_value=10**19))
def test_every_size_prints_in_three_digits_and_a_unit_never_an_exponent(n):
    """_cli_output: "three significant digits, decimal units"; 999,704 B printed "1e+03 kB"."""
    shown = human_size(n)
    number, unit = shown.split(" ")
    scale = {"B": 1, "kB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "PB": 1e15}[unit]
    assert "e" not in number and float(number) >= (1 if n else 0)
    assert float(number) < 1000 or unit == "PB"
    assert abs(float(number) * scale - n) <= max(0.005 * n, 0.5)


def test_cache_ls_names_hub_files_as_hf_does_with_one_size_format_and_a_total(tmp_path):
    repo = tmp_path / "hub" / "models--stabilityai--stable-audio-3-medium"
    blob = repo / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    save_file({"w": torch.ones(250_000)}, str(blob))
    snapshot = repo / "snapshots" / "9f3a1c27e0d4b5a6"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.relpath(blob, snapshot))
    cache = tmp_path / "c"
    run("warm", str(snapshot / "model.safetensors"), cache=cache)
    (entry,) = json.loads(run("cache", "ls", "--json", cache=cache).stdout)
    assert entry["hub"] == "stabilityai/stable-audio-3-medium@9f3a1c27 model.safetensors"
    lines = run("cache", "ls", cache=cache).stdout.splitlines()
    assert lines[0] == f"cache dir: {cache}"
    assert lines[1].startswith(
        "ok              stabilityai/stable-audio-3-medium@9f3a1c27 model.safetensors  "
    )
    assert "  1 MB -> 500 kB sibling, created " in lines[1]
    assert lines[2] == "1 row(s): 1 MB of checkpoints, 500 kB of siblings on disk"
    full = run("cache", "ls", "--paths", cache=cache).stdout.splitlines()[1]
    assert f" {snapshot / 'model.safetensors'} -> {entry['sibling']}  1 MB -> 500 kB sibling" in full


def test_info_says_what_a_sibling_costs_and_whether_one_exists(src, tmp_path):
    size = src.stat().st_size
    before = run("info", str(src), cache=tmp_path / "c").stdout.splitlines()
    run("warm", str(src), cache=tmp_path / "c")
    sibling_size = (
        (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").stat().st_size
    )  # predicted exactly
    assert before[-2:] == [
        f"fp16 sibling: {sibling_size} B more on disk; model_half=True loads take their weights "
        f"from it ({sibling_size} B) instead of from the checkpoint ({size} B)",
        "sibling: none yet (the first model_half=True load or `sa3loader warm` makes it)",
    ]
    after = json.loads(run("info", str(src), "--json", cache=tmp_path / "c").stdout)
    assert after["sibling"] == str(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors")
    assert (
        after["fp16_sibling_size"]
        == (tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors").stat().st_size
        == sibling_size
    )


def test_warm_on_a_convert_output_says_it_is_already_fp16(src, tmp_path):
    out = tmp_path / "out.safetensors"
    run("convert", str(src), "--out", str(out), cache=tmp_path / "c")
    warm = json.loads(run("warm", str(out), "--json", cache=tmp_path / "c").stdout)
    assert warm["reason"] == "already fp16 (an sa3loader output): loaded as is" and warm["sibling"] is None


def test_cache_verify_checks_each_row_against_the_file_it_was_made_from(tmp_path):
    """A hub row is keyed by its blob: once the snapshot link moves to a new revision, the old
    row still describes the old blob, which is intact. ``cache verify`` is about that file, not
    about whatever the link names now (it said "content mismatch" and exited 3)."""
    from support.checkpoints import toy_hub_checkpoint
    from support.loads import load_toy

    first = toy_hub_checkpoint(tmp_path / "hf", "org/m", "r1")
    load_toy(first, tmp_path / "c")
    second = toy_hub_checkpoint(tmp_path / "hf", "org/m", "r2", seed=4)
    load_toy(second, tmp_path / "c")
    first.unlink()
    first.symlink_to(os.readlink(second))  # r1's link now names r2's blob
    checked = run("cache", "verify", "--json", cache=tmp_path / "c")
    assert checked.returncode == 0, checked.stdout
    assert [c["check"] for c in json.loads(checked.stdout)] == ["ok", "ok"]


def test_cache_ls_totals_what_is_on_disk_and_verify_fails_only_for_a_sibling(tmp_path):
    """A sibling deleted by hand is not counted; a row whose checkpoint is gone is no problem
    with a sibling (``cache verify`` exit 0; ``prune`` tidies it), a missing sibling is (3)."""
    cache = tmp_path / "c"
    paths = []
    for name in ("a", "b"):
        src = tmp_path / name / "model.safetensors"
        src.parent.mkdir()
        save_file({"w": torch.ones(250_000)}, str(src))
        run("warm", str(src), cache=cache)
        paths.append(src)
    paths[0].unlink()  # a checkpoint deleted: its row's sibling stays, intact
    assert run("cache", "verify", cache=cache).returncode == 0
    deleted = tmp_path / "b" / ".cache" / "sa3loader" / "model.fp16.safetensors"
    deleted.unlink()  # a sibling deleted by hand
    total = run("cache", "ls", cache=cache).stdout.splitlines()[-1]
    assert total == "2 row(s): 1 MB of checkpoints, 500 kB of siblings on disk", total
    (tmp_path / "big").write_bytes(bytes(3_000_000))
    deleted.symlink_to(tmp_path / "big")  # a link at its name is no sibling: neither counted nor sized
    assert run("cache", "ls", cache=cache).stdout.splitlines()[-1] == total
    assert run("cache", "verify", cache=cache, check_rc=3).returncode == 3


@pytest.mark.parametrize(
    "command",
    [
        ("cache", "ls"),
        ("cache", "verify"),
        ("cache", "prune"),
        ("cache", "clear"),
        ("cache", "prune", "--dry-run"),
        ("info",),
    ],
)
def test_commands_that_only_read_the_cache_create_nothing(ckpt_dir, tmp_path, command):
    """Looking at a cache that was never made leaves no cache dir, index or tag behind."""
    args = (*command, str(ckpt_dir / "model.safetensors")) if command == ("info",) else command
    run(*args, cache=tmp_path / "never" / "made")
    assert not (tmp_path / "never").exists()


def test_cache_rm_removes_exactly_the_siblings_of_the_checkpoints_given(tmp_path):
    """Its row, its sibling, its lock, beside the checkpoint or in the cache dir; a checkpoint
    already deleted too; another checkpoint's sibling and lock stay."""
    cache = tmp_path / "c"
    kept, gone, hub_like = (tmp_path / f"{n}.safetensors" for n in ("kept", "gone", "other"))
    for path in (kept, gone):
        save_file({"w": torch.ones(1000)}, str(path))
        run("warm", str(path), cache=cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "gone.fp16.safetensors"
    size = sibling.stat().st_size
    gone.unlink()  # the user deleted the checkpoint first
    expected = (
        f"would remove sibling {sibling} ({size / 1e3:.3g} kB)\n"
        f"would remove lock file {sibling}.lock (0 B)\n"
        f"would remove 2 file(s), {size / 1e3:.3g} kB in all\n"
        "would remove 1 row(s)\n"
    )
    assert run("cache", "rm", str(gone), "--dry-run", cache=cache).stdout == expected and sibling.exists()
    assert run("cache", "rm", "--dry-run", str(gone), cache=cache).stdout == expected  # options first
    assert run("cache", "rm", "--dry-run", "--", str(gone), cache=cache).stdout == expected
    assert (
        "unrecognized arguments: --bogus"
        in run("cache", "rm", str(gone), "--bogus", cache=cache, check_rc=2).stderr
    )
    data = json.loads(run("--json", "cache", "rm", str(gone), cache=cache).stdout)
    assert [(r["kind"], r["path"], r["bytes"]) for r in data["removed"]] == [
        ("sibling", str(sibling), size),
        ("lock file", f"{sibling}.lock", 0),
    ]
    assert [r["source"] for r in data["rows"]] == [str(gone)] and data["kept"] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [".cache", "c", "kept.safetensors"]
    hidden = tmp_path / ".cache" / "sa3loader"
    assert sorted(p.name for p in hidden.iterdir()) == ["kept.fp16.safetensors", "kept.fp16.safetensors.lock"]
    rows = json.loads(run("cache", "ls", "--json", cache=cache).stdout)
    assert [r["source"] for r in rows] == [str(kept)]
    # A name with no file, row or sibling (a typo): said, and exit 1, not a silent success.
    missing = run("cache", "rm", str(hub_like), cache=cache, check_rc=1).stdout
    assert missing == f"nothing matches {hub_like}: no row of it, nor a sibling or its temp file\n"
    data = json.loads(
        run("--json", "cache", "rm", str(hub_like), "--dry-run", cache=cache, check_rc=1).stdout
    )
    assert data["unmatched"] == [str(hub_like)]


def test_cache_rm_says_what_it_removed_and_what_matched_nothing(tmp_path):
    """A checkpoint gone after a killed first conversion: its temp file is removed, and that is
    a match (exit 0). A sibling's own name or a folder's is no checkpoint's: nothing matches
    (exit 1), whatever is there."""
    from support.loads import make_ckpt

    folder = tmp_path / "m"
    hidden = folder / ".cache" / "sa3loader"
    hidden.mkdir(parents=True)
    killed = hidden / "gone.fp16.safetensors.incomplete-999-deadbeef"
    killed.write_bytes(b"x" * 100)
    cache = tmp_path / "c"
    out = run("cache", "rm", str(folder / "gone.safetensors"), cache=cache).stdout
    assert f"removed temp file {killed}" in out and "nothing matches" not in out and not killed.exists()
    ckpt = make_ckpt(folder / "model.safetensors")
    run("warm", str(ckpt), cache=cache)
    for name in (hidden / "model.fp16.safetensors", folder):
        out = run("cache", "rm", str(name), cache=cache, check_rc=1).stdout
        assert f"nothing matches {name}: no row of it, nor a sibling or its temp file" in out
    assert (hidden / "model.fp16.safetensors").exists()


def test_cache_rm_says_what_matched_nothing_first(tmp_path):
    """A new user's report: "removed 0 file(s)" came before the error. Now what matched nothing
    comes first, then what was removed; alone where nothing matched (exit 1 either way)."""
    from support.loads import make_ckpt

    ckpt, typo, cache = (
        make_ckpt(tmp_path / "m" / "model.safetensors"),
        tmp_path / "m" / "typo",
        tmp_path / "c",
    )
    run("warm", str(ckpt), cache=cache)
    lines = run("cache", "rm", str(typo), str(ckpt), cache=cache, check_rc=1).stdout.splitlines()
    assert lines[0] == f"nothing matches {typo}: no row of it, nor a sibling or its temp file"
    assert lines[1].startswith("removed sibling ") and lines[-1] == "removed 1 row(s)", lines


def test_cache_rm_removes_a_sibling_in_the_cache_dir_and_its_emptied_folder(tmp_path):
    """A hub file's sibling lives in the cache dir: rm removes it, its lock and the folder."""
    from support.checkpoints import toy_hub_checkpoint

    src = toy_hub_checkpoint(tmp_path / "hf", "org/m", "r1")
    cache = tmp_path / "c"
    warmed = json.loads(run("--json", "warm", str(src), cache=cache).stdout)
    sibling = (warmed[0] if isinstance(warmed, list) else warmed)["sibling"]
    assert sibling.startswith(str(cache))
    out = run("cache", "rm", str(src), cache=cache).stdout
    assert f"removed sibling {sibling}" in out and f"removed empty dir {os.path.dirname(sibling)}/" in out
    assert not os.path.exists(os.path.dirname(sibling)) and os.path.isdir(cache / "siblings")


def test_cache_rm_needs_checkpoints_and_the_others_take_none(tmp_path):
    assert (
        "cache rm and scan take one or more paths"
        in run("cache", "rm", cache=tmp_path / "c", check_rc=2).stderr
    )
    run("cache", "ls", str(tmp_path / "x.safetensors"), cache=tmp_path / "c", check_rc=2)


@pytest.mark.parametrize("action", [["ls"], ["verify"], ["scan", "."]])
def test_dry_run_on_an_action_that_plans_nothing_is_bad_usage_not_ignored(tmp_path, action):
    """``--dry-run`` shows the plan of prune, clear, rm and repair; elsewhere it was silently
    ignored (a README walk took it for an action's own dry run)."""
    err = run("cache", *action, "--dry-run", cache=tmp_path / "c", check_rc=2).stderr
    assert "--dry-run goes with cache prune, clear, rm, repair" in err


def test_an_empty_cache_dir_option_is_bad_usage(tmp_path, monkeypatch):
    """``--cache-dir "$UNSET"`` is not the current dir (a cache there would tag it for backups
    to skip)."""
    monkeypatch.chdir(tmp_path)
    for args in (
        ["--cache-dir", "", "cache", "ls"],
        ["warm", str(tmp_path / "m.safetensors"), "--cache-dir", " "],
    ):
        assert "argument --cache-dir: empty" in run(*args, cache=tmp_path / "c", check_rc=2).stderr
    assert not list(tmp_path.iterdir())


def test_cache_ls_of_a_cache_dir_others_can_write_says_it_is_refused_not_empty(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    err = run("cache", "ls", cache=shared, check_rc=1).stderr
    assert "refusing the cache dir" in err and "world-writable" in err


def test_cache_scan_finds_siblings_no_index_knows_and_says_whose_they_are(tmp_path):
    """After ``rm -rf`` of the cache dir, the siblings beside checkpoints are still listed, with
    their checkpoint (there, changed or gone) and size; a user's own fp16 file is not ours."""
    folder, cache = tmp_path / "ckpts", tmp_path / "c"
    folder.mkdir()
    for name in ("a", "b", "c"):
        save_file({"w": torch.ones(1000)}, str(folder / f"{name}.safetensors"))
        run("warm", str(folder / f"{name}.safetensors"), cache=cache)
    save_file({"w": torch.ones(10).half()}, str(folder / "unet.fp16.safetensors"))  # diffusers' variant
    (folder / "b.safetensors").unlink()
    save_file({"w": torch.zeros(1000)}, str(folder / "c.safetensors"))  # retrained: another file
    size = (folder / ".cache" / "sa3loader" / "a.fp16.safetensors").stat().st_size
    shutil.rmtree(cache)
    out = run("cache", "scan", str(folder), cache=cache).stdout
    kb, hidden = f"{size / 1e3:.3g} kB", folder / ".cache" / "sa3loader"
    assert out == (
        f"ok              {hidden}/a.fp16.safetensors  {kb}  source: {folder}/a.safetensors  (no row)\n"
        f"missing source  {hidden}/b.fp16.safetensors  {kb}  source: {folder}/b.safetensors (gone)"
        "  (no row)\n"
        f"stale           {hidden}/c.fp16.safetensors  {kb}  source: {folder}/c.safetensors  (no row)\n"
        f"3 sibling(s), {3 * size / 1e3:.3g} kB on disk; 1 whose checkpoint is gone "
        "(remove with `sa3loader cache rm CHECKPOINT`)\n"
    )
    data = json.loads(run("--json", "cache", "scan", str(folder), cache=cache).stdout)
    assert [(f["sibling"], f["bytes"], f["source"], f["status"], f["indexed"]) for f in data] == [
        (f"{folder}/.cache/sa3loader/a.fp16.safetensors", size, f"{folder}/a.safetensors", "ok", False),
        (
            f"{folder}/.cache/sa3loader/b.fp16.safetensors",
            size,
            f"{folder}/b.safetensors",
            "missing source",
            False,
        ),
        (f"{folder}/.cache/sa3loader/c.fp16.safetensors", size, f"{folder}/c.safetensors", "stale", False),
    ]
    run("cache", "rm", str(folder / "b.safetensors"), cache=cache)  # what the total line says to do
    assert not (folder / ".cache" / "sa3loader" / "b.fp16.safetensors").exists()


def test_cache_scan_counts_a_file_once_given_overlapping_dirs_or_a_hard_link(tmp_path):
    folder, cache = tmp_path / "ckpts", tmp_path / "c"
    folder.mkdir()
    save_file({"w": torch.ones(1000)}, str(folder / "a.safetensors"))
    run("warm", str(folder / "a.safetensors"), cache=cache)
    hidden = folder / ".cache" / "sa3loader"
    size = (hidden / "a.fp16.safetensors").stat().st_size
    total = f"1 sibling(s), {size / 1e3:.3g} kB on disk; "
    out = run("cache", "scan", str(folder), str(hidden), cache=cache).stdout.splitlines()
    assert len(out) == 2 and out[-1].startswith(total)
    (tmp_path / "link").symlink_to(folder)  # the folder again, through a link: listed once
    out = run("cache", "scan", str(folder), str(tmp_path / "link"), cache=cache).stdout.splitlines()
    assert len(out) == 2 and out[-1].startswith(total) and "(no row)" not in out[0]
    os.link(hidden / "a.fp16.safetensors", hidden / "backup.fp16.safetensors")
    out = run("cache", "scan", str(folder), cache=cache).stdout.splitlines()
    assert len(out) == 3 and out[-1].startswith(total)  # both names listed, one file counted


def test_cache_scan_finds_a_killed_conversions_temp_file_and_cache_rm_removes_it(tmp_path):
    """A conversion killed before it published leaves GBs beside the checkpoint; with the
    checkpoint deleted, no load comes to clean it: scan lists it (a temp file while the
    checkpoint is there, its checkpoint gone after), and the command it names removes it."""
    folder, cache = tmp_path / "ckpts", tmp_path / "c"
    folder.mkdir()
    ckpt = folder / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(ckpt))
    run("warm", str(ckpt), cache=cache)
    hidden = folder / ".cache" / "sa3loader"
    left = hidden / f"model.fp16.safetensors.incomplete-written-{'0' * 32}-0-0-1-abcd1234"
    (hidden / "model.fp16.safetensors").rename(left)
    shutil.rmtree(cache)
    rows = json.loads(run("--json", "cache", "scan", str(folder), cache=cache).stdout)
    assert [(r["sibling"], r["status"]) for r in rows] == [(str(left), "temp file")]
    assert "0 sibling(s) and 1 temp file(s), " in run("cache", "scan", str(folder), cache=cache).stdout
    ckpt.unlink()
    out = run("cache", "scan", str(folder), cache=cache).stdout
    assert f"missing source  {left}" in out and "1 whose checkpoint is gone" in out
    assert "0 sibling(s) and 1 temp file(s), " in out  # (a new user's walk: it was "1 sibling(s)")
    run("cache", "rm", str(ckpt), cache=cache)
    assert not left.exists()


def test_cache_scan_of_the_cache_dir_names_each_siblings_checkpoint_from_its_row(tmp_path):
    from support.checkpoints import toy_hub_checkpoint

    src = toy_hub_checkpoint(tmp_path / "hf", "org/m", "r1")
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    [found] = json.loads(run("--json", "cache", "scan", str(cache), cache=cache).stdout)
    assert (found["source"], found["status"], found["indexed"]) == (str(src), "ok", True)
    assert found["sibling"].startswith(str(cache / "siblings"))


def test_cache_rm_of_a_folders_last_sibling_removes_the_hidden_folder(tmp_path):
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(src))
    run("warm", str(src), cache=tmp_path / "c")
    out = run("cache", "rm", str(src), cache=tmp_path / "c").stdout
    assert f"removed empty dir {tmp_path}/.cache/sa3loader/" in out
    assert f"removed empty dir {tmp_path}/.cache/" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "model.safetensors"]
    save_file({"w": torch.ones(1000)}, str(src))
    run("warm", str(src), cache=tmp_path / "c")
    (tmp_path / ".cache" / "huggingface").mkdir()  # the user's (hf download --local-dir)
    run("cache", "rm", str(src), cache=tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / ".cache").iterdir()) == ["huggingface"]


def test_cache_rm_of_one_hub_copy_keeps_the_sibling_the_other_copys_row_uses(tmp_path):
    """Two copies of a hub cache (cp -a) share their blob's sibling in the cache dir."""
    from support.checkpoints import toy_hub_checkpoint

    src = toy_hub_checkpoint(tmp_path / "a", "org/m", "r1")
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    copy = tmp_path / "b" / src.relative_to(tmp_path / "a")
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    sibling = json.loads(run("--json", "warm", str(copy), cache=cache).stdout)["sibling"]
    dry = run("cache", "rm", str(src), "--dry-run", cache=cache).stdout
    assert dry == (
        "would remove 0 file(s), 0 B in all\n"
        f"would keep sibling {sibling}: another checkpoint's row uses it\n"
        "would remove 1 row(s)\n"
    )
    out = run("cache", "rm", str(src), cache=cache).stdout
    assert f"kept sibling {sibling}: another checkpoint's row uses it" in out
    [row] = json.loads(run("cache", "ls", "--json", cache=cache).stdout)
    assert (row["source"], row["status"]) == (str(copy), "ok") and os.path.exists(sibling)


def test_cache_rm_through_a_symlinked_folder_names_each_file_once(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    save_file({"w": torch.ones(1000)}, str(tmp_path / "real" / "a.safetensors"))
    cache = tmp_path / "c"
    run("warm", str(tmp_path / "real" / "a.safetensors"), cache=cache)
    size = (tmp_path / "real" / ".cache" / "sa3loader" / "a.fp16.safetensors").stat().st_size
    dry = run("cache", "rm", str(tmp_path / "link" / "a.safetensors"), "--dry-run", cache=cache).stdout
    assert f"would remove 2 file(s) and 2 empty dir(s), {size / 1e3:.3g} kB in all\n" in dry
    out = run("cache", "rm", str(tmp_path / "link" / "a.safetensors"), cache=cache).stdout
    assert "kept" not in out and f"removed sibling {tmp_path}/real/.cache/sa3loader/a.fp16.safetensors" in out
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["a.safetensors"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root (CI runs as root)")
def test_cache_rm_keeps_a_sibling_whose_lock_is_another_users_and_says_so_first(tmp_path):
    """Its lock cannot be taken: the dry run and the real run both keep the sibling and its row."""
    src = tmp_path / "d.safetensors"
    save_file({"w": torch.ones(1000)}, str(src))
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "d.fp16.safetensors"
    os.chown(f"{sibling}.lock", 65534, 65534)  # a teammate's load in a shared folder
    keep = f"keep sibling {sibling}: its lock file is not yours to take (it is owned by uid 65534)\n"
    assert run("cache", "rm", str(src), "--dry-run", cache=cache).stdout.endswith(
        f"would {keep}would remove 0 row(s)\n"
    )
    assert run("cache", "rm", str(src), cache=cache).stdout.endswith(f"kept {keep[5:]}removed 0 row(s)\n")
    [row] = json.loads(run("cache", "ls", "--json", cache=cache).stdout)
    assert row["source"] == str(src) and sibling.exists()


def test_repair_dry_run_moves_nothing(tmp_path):
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(src))
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    (cache / "index" / "cache.db").write_bytes(b"garbage" * 100)
    out = json.loads(run("cache", "repair", "--dry-run", "--json", cache=cache).stdout)
    assert out["dry_run"] and out["repaired"] and not os.path.exists(out["set_aside"])
    assert (cache / "index" / "cache.db").read_bytes() == b"garbage" * 100
    assert not list(cache.glob("index.corrupt-*"))


def test_after_repair_scan_and_clear_still_find_the_cache_dirs_siblings(tmp_path, monkeypatch):
    """A sibling in the cache dir that no row names: scan says its checkpoint is not recorded
    (never a guessed path it calls gone), and clear removes it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    save_file({"w": torch.ones(1000)}, "models/c.safetensors")
    cache = tmp_path / "c"
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    run("warm", "models/c.safetensors", cache=cache)
    [row] = json.loads(run("--json", "cache", "scan", "c", cache=cache).stdout)  # a relative DIR
    assert (row["status"], row["indexed"], row["source"]) == (
        "ok",
        True,
        str(tmp_path / "models/c.safetensors"),
    )
    (cache / "index" / "cache.db").write_bytes(b"garbage" * 100)
    run("cache", "repair", cache=cache)
    [orphan] = json.loads(run("--json", "cache", "scan", str(cache), cache=cache).stdout)
    assert (orphan["status"], orphan["source"], orphan["indexed"]) == ("unknown source", "", False)
    assert "source: not recorded  (no row)" in run("cache", "scan", str(cache), cache=cache).stdout
    out = run("cache", "clear", "--yes", cache=cache).stdout
    assert f"removed sibling {orphan['sibling']}" in out and not os.path.exists(orphan["sibling"])
    assert "no such directory" in run("cache", "scan", str(tmp_path / "nope"), cache=cache, check_rc=1).stderr


def test_warm_readable_by_all_refuses_a_cache_dir_that_holds_other_programs_files(tmp_path, capsys):
    """A cache dir given as ``~/.cache``: opening it (0700 -> 0755) would let every user into
    other programs' folders, whose files may count on it being private. Refused before any
    work (exit 1); every mode stays as it was; the next warm, into a folder of its own, opens."""
    from support.loads import make_ckpt

    cache = tmp_path / "dot-cache"
    token, notes = cache / "huggingface" / "token", cache / "other" / "private" / "notes.txt"
    for path in (token, notes):
        path.parent.mkdir(parents=True)
        path.write_text("secret")
        path.chmod(0o644)  # umask 022: only the 0700 cache dir above keeps them private
    for folder in (token.parent, notes.parent, notes.parent.parent):
        folder.chmod(0o755)
    cache.chmod(0o700)
    theirs = [cache, token, notes, token.parent, notes.parent, notes.parent.parent]
    before = {p: p.stat().st_mode for p in theirs}
    ckpt = make_ckpt(tmp_path / "model" / "model.safetensors")
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all"]) == 1
    assert "holds more than sa3loader's cache (huggingface, other)" in capsys.readouterr().err
    assert {p: p.stat().st_mode for p in theirs} == before and not (cache / "index").exists()
    own = tmp_path / "dot-cache" / "sa3loader"
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(own), "--readable-by-all"]) == 0
    assert (own / "index").stat().st_mode & 0o555 == 0o555 and {p: p.stat().st_mode for p in theirs} == before


def test_warm_readable_by_all_never_opens_a_dot_cache_beside_a_checkpoint_that_holds_others(tmp_path, capsys):
    """A checkpoint in a folder whose private ``.cache`` holds huggingface's token: opening
    ``.cache`` for the sibling beside it would let every user read the token. Refused (exit 1),
    nothing opened; a ``.cache`` that holds only sa3loader's folder is opened."""
    from support.loads import make_ckpt

    ckpt = make_ckpt(tmp_path / "home" / "model.safetensors")
    dot_cache = tmp_path / "home" / ".cache"
    token = dot_cache / "huggingface" / "token"
    token.parent.mkdir(parents=True)
    token.write_text("hf_secret")
    token.chmod(0o644)
    token.parent.chmod(0o755)
    dot_cache.chmod(0o700)
    (tmp_path / "home").chmod(0o755)
    ckpt.chmod(0o644)
    args = ["warm", str(ckpt), "--cache-dir", str(tmp_path / "cache"), "--readable-by-all"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"{dot_cache} holds other programs' files (huggingface, sa3loader)" in err
    assert "with SA3LOADER_PLACE=cache the sibling goes to the cache dir instead" in err
    assert dot_cache.stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o700  # nothing opened
    shutil.rmtree(token.parent)
    assert cli.main(args) == 0
    assert dot_cache.stat().st_mode & 0o777 == 0o755


def test_warm_readable_by_all_leaves_rows_a_load_trusts_without_reading_the_sibling(tmp_path):
    """Opening a sibling (0600 under umask 077 -> 0644) moves its ctime, which its row records:
    warm records the row again, so the next load (a baked image's, whose index it cannot write)
    does not take the sibling for another file."""
    from support.loads import load_toy, make_ckpt

    ckpt = make_ckpt(tmp_path / "model" / "model.safetensors")
    ckpt.chmod(0o644)
    cache = tmp_path / "cache"
    old = os.umask(0o077)
    try:
        assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all"]) == 0
    finally:
        os.umask(old)
    load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert info.cache_hit and not [e for e in info.events if "changed since it was indexed" in e], info.events


def test_an_fp32_checkpoint_carrying_sa3loaders_marker_is_converted_not_reported_unchanged(tmp_path):
    """Fine-tuned from a sibling and saved with its metadata: float32 again, so it is converted
    (as a load converts it), never reported as already fp16."""
    from sa3loader._records import MARKER_KEY

    src = tmp_path / "ckpt" / "model.safetensors"
    src.parent.mkdir()
    save_file({"w": torch.randn(8, 8)}, str(src), {MARKER_KEY: "1", "k": "v"})
    out, out_dir = tmp_path / "out.safetensors", tmp_path / "dir-fp16"
    for target, args in ((src, ()), (src, ("--out", str(out))), (src.parent, ("--out", str(out_dir)))):
        proc = run("convert", str(target), *args, cache=tmp_path / "c")
        assert proc.stdout.startswith("converted"), proc.stdout
    for written in (out, out_dir / "model.safetensors"):
        assert read_header(str(written)).by_name["w"].dtype == "F16"


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="a bind mount needs root and mount(8) (CI runs as root)",
)
def test_convert_refuses_an_output_that_reaches_the_source_through_a_bind_mount(ckpt_dir, tmp_path):
    """Another path to the same folder, that no comparison of path strings sees."""
    alias = tmp_path / "alias"
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(ckpt_dir.parent), str(alias)], capture_output=True).returncode:
        pytest.skip("mount --bind refused here")
    try:
        before = tree_bytes(ckpt_dir)
        source = ckpt_dir / "model.safetensors"
        for target, out in ((ckpt_dir, alias / ckpt_dir.name), (source, alias / ckpt_dir.name / source.name)):
            proc = run("convert", str(target), "--out", str(out), "--force", cache=tmp_path / "c", check_rc=1)
            assert "would delete the source" in proc.stderr
        assert tree_bytes(ckpt_dir) == before
    finally:
        subprocess.run(["umount", str(alias)], check=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("mount") is None,
    reason="a bind mount needs root and mount(8) (CI runs as root)",
)
@pytest.mark.parametrize("bound", [".cache", "t5gemma-b-b-ul2"])
def test_convert_refuses_an_output_inside_the_source_reached_through_a_bind_mount_of_a_subfolder(
    ckpt_dir, tmp_path, bound
):
    """A folder of the source bound elsewhere: no walk up from the output meets the source,
    yet the output is inside it (the user's notes there would go with --force)."""
    (ckpt_dir / bound / "out").mkdir(parents=True)
    (ckpt_dir / bound / "out" / "notes.txt").write_text("the user's")
    alias = tmp_path / "alias"
    alias.mkdir()
    if subprocess.run(["mount", "--bind", str(ckpt_dir / bound), str(alias)], capture_output=True).returncode:
        pytest.skip("mount --bind refused here")
    try:
        before = tree_bytes(ckpt_dir)
        proc = run(
            "convert", str(ckpt_dir), "--out", str(alias / "out"), "--force", cache=tmp_path / "c", check_rc=1
        )
        assert "would delete the source" in proc.stderr
        assert tree_bytes(ckpt_dir) == before
    finally:
        subprocess.run(["umount", str(alias)], check=True)


def test_cache_scan_says_which_folders_it_could_not_read_and_exits_1(tmp_path, monkeypatch):
    """Another user's folder under the one scanned (root reads all: the refusal is played):
    what is under it is not counted, and the scan says so rather than reporting a clean 0."""
    from support.loads import load_toy, make_ckpt

    ckpt = make_ckpt(tmp_path / "models" / "theirs" / "model.safetensors")
    load_toy(ckpt, tmp_path / "c")
    real_scandir, closed = os.scandir, str(tmp_path / "models" / "theirs")

    def refusing(path="."):
        if os.fspath(path) == closed:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    out = run("cache", "scan", str(tmp_path / "models"), cache=tmp_path / "c", check_rc=1).stdout
    assert "0 sibling(s)" in out and f"cannot read {closed} (Permission denied)" in out


@pytest.mark.parametrize(
    "args", [("cache", "ls"), ("--json", "cache", "ls"), ("--help",), ("cache", "--help"), ("--version",)]
)
def test_a_reader_that_goes_away_gets_no_traceback_and_exit_1(tmp_path, args):
    """``sa3loader cache ls | head -c 0``: the output cannot be written (an error, 1), and
    nothing but that: no traceback, no second error at exit's flush."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "sa3loader", "--cache-dir", str(tmp_path / "c"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before the command writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1 and err == "", err


@pytest.mark.parametrize("linked", [False, True])
def test_cache_clear_counts_only_the_bytes_it_frees(tmp_path, linked):
    """A sibling another name links (a backup made with ln): removing it frees nothing, and the
    command says so; alone, its size."""
    src = tmp_path / "a" / "model.safetensors"
    src.parent.mkdir()
    save_file({"w": torch.ones(250_000)}, str(src))
    cache = tmp_path / "c"
    sibling = json.loads(run("--json", "warm", str(src), cache=cache).stdout)["sibling"]
    size = os.path.getsize(sibling)
    if linked:
        os.link(sibling, tmp_path / "backup.safetensors")
    removed = json.loads(run("--json", "cache", "clear", cache=cache).stdout)["removed"]
    assert [r["bytes"] for r in removed if r["kind"] == "sibling"] == [0 if linked else size]
    assert (tmp_path / "backup.safetensors").exists() == linked


def test_warm_readable_by_all_says_which_folder_above_keeps_others_out(tmp_path, capsys):
    """The cache dir opened, but under a folder others cannot pass: the line says so (they
    could not reach it). Under folders all pass, it does not. A corrupt index set aside by
    `cache repair` (sa3loader's own) does not stop it."""
    import tempfile

    from support.loads import make_ckpt

    ckpt = make_ckpt(tmp_path / "model" / "model.safetensors")
    closed = tmp_path / "private"
    closed.mkdir(mode=0o700)
    assert cli.main(["warm", str(ckpt), "--cache-dir", str(closed / "cache"), "--readable-by-all"]) == 0
    assert f"but {closed} keeps them out of it" in capsys.readouterr().out
    open_root = Path(tempfile.mkdtemp())
    try:
        open_root.chmod(0o755)
        cache = open_root / "cache"
        assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache)]) == 0
        (cache / "index" / "cache.db").write_bytes(b"not a database" * 100)
        assert cli.main(["--cache-dir", str(cache), "cache", "repair"]) == 0
        capsys.readouterr()
        assert cli.main(["warm", str(ckpt), "--cache-dir", str(cache), "--readable-by-all"]) == 0
        assert "keeps them out" not in capsys.readouterr().out
    finally:
        shutil.rmtree(open_root)


def test_convert_dir_with_a_link_loop_in_it_still_converts(ckpt_dir, tmp_path):
    """Links that loop (a -> b -> a, a link to itself) are no folders to look into: the check
    that the output is not inside the source skips them, as the copy's walk does."""
    (ckpt_dir / "loop1").symlink_to("loop2")
    (ckpt_dir / "loop2").symlink_to("loop1")
    (ckpt_dir / "t5gemma-b-b-ul2" / "self").symlink_to("self")
    out = tmp_path / "out"
    proc = run("convert", str(ckpt_dir), "--out", str(out), cache=tmp_path / "c")
    assert (out / "model.safetensors").exists(), proc.stdout + proc.stderr


def test_convert_dir_refuses_an_output_inside_a_folder_the_source_links_in(ckpt_dir, tmp_path):
    """A folder linked into the source (a shared encoder) is part of what the copy walks: an
    output inside it is inside the source, and --force would replace what is there."""
    shared = tmp_path / "shared-encoder"
    (shared / "out").mkdir(parents=True)
    (shared / "out" / "notes.txt").write_text("the user's")
    (ckpt_dir / "encoder").symlink_to(shared)
    before = tree_bytes(shared)
    proc = run(
        "convert", str(ckpt_dir), "--out", str(shared / "out"), "--force", cache=tmp_path / "c", check_rc=1
    )
    assert "would delete the source" in proc.stderr and tree_bytes(shared) == before


@pytest.mark.parametrize("command", [["cache", "ls"], ["cache", "clear", "--dry-run"]])
def test_a_name_that_is_not_utf8_is_printed_escaped_where_the_output_is_strict(
    tmp_path, monkeypatch, command
):
    """``PYTHONIOENCODING=utf-8`` (or a UTF-8 locale but C.UTF-8) makes stdout strict: printing a
    checkpoint name that is not UTF-8 raised UnicodeEncodeError, exit 1 (an outside attack). It is
    written escaped, as Python writes it on stderr."""
    import io

    from support.loads import load_toy, make_ckpt

    ckpt = make_ckpt(tmp_path / os.fsdecode(b"\xff.safetensors"))
    load_toy(ckpt, tmp_path / "c")
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    assert cli.main(["--cache-dir", str(tmp_path / "c"), *command]) == 0
    out.flush()
    assert "\\udcff." in out.buffer.getvalue().decode("utf-8")


def test_the_clear_prompt_names_a_cache_dir_that_is_not_utf8_escaped(src, tmp_path, monkeypatch):
    """The interactive `cache clear` question names the cache dir: under a strict stdout it
    raised UnicodeEncodeError, exit 1 (an outside attack). It is asked escaped."""
    import io

    cache = tmp_path / os.fsdecode(b"c\xff")
    run("warm", str(src), cache=cache)

    class Terminal(io.TextIOWrapper):  # the question goes to stdout at a terminal
        def isatty(self) -> bool:
            return True

    out = Terminal(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setitem(_faults.facts, "interactive", lambda subject, real: True)

    def answer(prompt: str) -> str:  # as input() does: the prompt on stdout
        sys.stdout.write(prompt)
        return "n"

    monkeypatch.setattr("builtins.input", answer)
    assert cli.main(["--cache-dir", str(cache), "cache", "clear"]) == 0
    out.flush()
    assert "c\\udcff" in out.buffer.getvalue().decode("utf-8")


def test_clearing_every_name_of_a_hard_linked_sibling_counts_its_bytes_once(src, tmp_path):
    """A folder copied with `cp -al` (its .cache/sa3loader too) shares one sibling under two
    names; removing both frees it, which `cache clear` reported as 0 B (an outside attack)."""
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    copy = tmp_path / "copy"
    for name in ("model.safetensors", ".cache/sa3loader/model.fp16.safetensors"):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        os.link(tmp_path / name, copy / name)
    run("warm", str(copy / "model.safetensors"), cache=cache)  # adopts the linked sibling
    size = (copy / ".cache" / "sa3loader" / "model.fp16.safetensors").stat().st_size
    for args in (["--dry-run"], ["--yes"]):
        removed = json.loads(run("cache", "clear", "--json", *args, cache=cache).stdout)["removed"]
        siblings = [r for r in removed if r["kind"] == "sibling"]
        assert len(siblings) == 2 and sum(r["bytes"] for r in removed) == size
    assert not (tmp_path / ".cache").exists() and not (copy / ".cache").exists()


@pytest.mark.parametrize("how", [[], ["--out", "OUT"]])
def test_the_range_line_says_bf16_and_f64_are_counted_as_a_load_casts_them(tmp_path, how):
    """Only float32 changes in the file; its bf16 and f64 overflow or flush only when a
    model_half load casts them. The line counted both without saying so (a docs walk)."""
    src = tmp_path / "model.safetensors"
    big, tiny = [1.0, 70000.0, 1e-9], [1.0, 1e30, 1e-30]
    tensors = {"f": torch.tensor(big), "b": torch.tensor(tiny).bfloat16(), "d": torch.tensor(tiny).double()}
    save_file(tensors, str(src))
    args = [a.replace("OUT", str(tmp_path / "out.safetensors")) for a in how]
    line = run("convert", str(src), *args, cache=tmp_path / "c").stdout.splitlines()[-1]
    inf = sum(int(torch.isinf(t.half()).sum()) for t in tensors.values())
    zero = sum(int(((t.half() == 0) & (t != 0)).sum()) for t in tensors.values())
    assert (inf, zero) == (3, 3)  # one each of float32's, bf16's and f64's
    assert line == (
        f"fp16 range: {inf} values overflowed to inf, {zero} nonzero values flushed to zero "
        "(bf16/f64 tensors are kept as they are: counted as a model_half load casts them)"
    )
    save_file({"f": torch.tensor(big)}, str(src))  # float32 alone: the count is the file's own
    plain = run("convert", str(src), *args, "--force" if how else "--verify", cache=tmp_path / "c")
    assert (
        plain.stdout.splitlines()[-1]
        == "fp16 range: 1 values overflowed to inf, 1 nonzero values flushed to zero"
    )


def test_cache_scan_reads_a_siblings_data_as_ls_does_and_says_damaged(tmp_path):
    """scan said "ok" for a sibling whose data was edited in place, which `cache ls` (and a
    load) calls damaged: its header still claims the source (a docs walk). It reads the data at
    the fingerprint's spots too."""
    src, cache = tmp_path / "model.safetensors", tmp_path / "c"
    save_file({"w": torch.linspace(-1, 1, 4096)}, str(src))
    run("warm", str(src), cache=cache)
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert run("cache", "scan", str(tmp_path), cache=cache).stdout.startswith("ok ")
    data_start = 8 + int.from_bytes(sibling.read_bytes()[:8], "little")
    with open(writable(sibling), "r+b") as f:
        f.seek(data_start)
        f.write(b"\x55" * (sibling.stat().st_size - data_start))  # every value, the header kept
    assert run("cache", "ls", cache=cache).stdout.splitlines()[1].startswith("damaged sibling ")
    assert run("cache", "scan", str(tmp_path), cache=cache).stdout.startswith("damaged sibling ")


def test_clear_piped_to_a_file_still_asks_the_person_at_the_terminal(src, tmp_path, monkeypatch):
    """`cache clear | tee log` at a terminal deleted without asking: only stdout was looked at
    (an outside attack). A person is there when stdin and stderr are terminals: asked on stderr."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    run("warm", str(src), cache=tmp_path / "c")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    out, err = io.StringIO(), Terminal()  # stdout into a pipe, stderr on the terminal
    monkeypatch.setattr(sys, "stdin", Terminal("n\n"))
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    assert cli.main(["--cache-dir", str(tmp_path / "c"), "cache", "clear"]) == 0
    assert sibling.exists() and "delete these files? [y/N]" in err.getvalue()
    assert out.getvalue() == "nothing deleted\n"


def test_clear_of_a_cache_dir_its_rows_reach_through_a_link_counts_each_file_once(src, tmp_path, monkeypatch):
    """Loads named the cache dir through a linked folder above it; `cache clear` of its real path
    planned the sibling twice (the row's spelling and the scan's): twice the bytes, a lock file
    removed twice (made again to take its lock) and a false "kept" (an outside attack)."""
    monkeypatch.setenv("SA3LOADER_PLACE", "cache")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run("warm", str(src), cache=tmp_path / "link" / "cache")
    (sibling,) = (tmp_path / "real" / "cache" / "siblings").glob("*/*.safetensors")
    size = sibling.stat().st_size
    for args in (["--dry-run"], ["--yes"]):
        out = json.loads(run("cache", "clear", "--json", *args, cache=tmp_path / "real" / "cache").stdout)
        assert sorted(r["kind"] for r in out["removed"]) == ["empty dir", "lock file", "sibling"]
        assert sum(r["bytes"] for r in out["removed"]) == size and out["kept"] == []
    assert not sibling.exists() and list((tmp_path / "real" / "cache" / "siblings").iterdir()) == []


@pytest.mark.parametrize("json_out", [True, False], ids=["--json", "text"])
def test_clear_with_stderr_redirected_still_asks_on_the_terminal(src, tmp_path, monkeypatch, json_out):
    """`sa3loader --json cache clear 2>log` at a terminal deleted without asking (the question
    went to stderr, a file); in text, input() put the question in the log (an outside attack).
    Asked where the person is: stdout, the terminal."""
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    run("warm", str(src), cache=tmp_path / "c")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    out, log = Terminal(), io.StringIO()  # stdout on the terminal, stderr into a file

    def answer(prompt: str) -> str:
        sys.stderr.write(prompt)  # as input() may, without readline
        return "n"

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", answer)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", log)
    args = ["--json"] * json_out + ["--cache-dir", str(tmp_path / "c"), "cache", "clear"]
    assert cli.main(args) == 0
    assert sibling.exists() and "delete these files? [y/N]" in out.getvalue() and log.getvalue() == ""


def test_info_says_a_file_at_the_siblings_place_is_there_but_not_usable(src, tmp_path):
    """`info` said "none yet" with a damaged sibling at its place (an outside attack): the file
    is there, and no load uses it as it is."""
    run("warm", str(src), cache=tmp_path / "c")
    sibling = tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors"
    assert (
        f"sibling: {sibling} (made for this checkpoint)" in run("info", str(src), cache=tmp_path / "c").stdout
    )
    writable(sibling).write_bytes(sibling.read_bytes()[:100])  # cut short: damaged
    out = run("info", str(src), cache=tmp_path / "c").stdout
    assert (
        f"sibling: none usable ({sibling} is there, but it is not this checkpoint's fp16 as it is now)" in out
    )
    sibling.unlink()
    assert "sibling: none yet" in run("info", str(src), cache=tmp_path / "c").stdout

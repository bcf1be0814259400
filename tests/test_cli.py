"""The CLI on synthetic checkpoint directories: ``cli.main`` in-process with captured output,
plus fresh-process runs of ``python -m sa3loader`` where logging set-up matters."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from support.cli import run, run_process
from support.compare import writable
from support.faults import at, injected

from sa3loader import _faults, cli
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


def test_convert_in_place_is_idempotent_and_skips_auto_siblings(ckpt_dir, tmp_path):
    run("warm", str(ckpt_dir / "model.safetensors"), cache=tmp_path / "c")
    assert (ckpt_dir / "model.fp16.safetensors").exists()
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
    run("convert", str(target), "--out", str(tmp_path / "out"), cache=tmp_path / "c")
    assert list((tmp_path / "out").rglob("*"))  # blobs carry no .safetensors name: copied as they are


def test_convert_single_file_is_recorded_so_loads_hit(ckpt_dir, tmp_path):
    src = ckpt_dir / "model.safetensors"
    run("convert", str(src), cache=tmp_path / "c")
    rows = json.loads(run("cache", "ls", "--json", cache=tmp_path / "c").stdout)
    assert [(r["source"], r["status"]) for r in rows] == [(str(src), "ok")]
    assert rows[0]["sibling"] == str(ckpt_dir / "model.fp16.safetensors")
    warm = json.loads(run("warm", str(src), "--json", cache=tmp_path / "c").stdout)
    assert warm["converted"] is False and warm["reason"] == "cache hit"


def test_cache_verify_prune_clear(ckpt_dir, tmp_path):
    cache = tmp_path / "c"
    src = ckpt_dir / "model.safetensors"
    run("warm", str(src), cache=cache)
    assert json.loads(run("cache", "verify", "--json", cache=cache).stdout)[0]["check"] == "ok"
    sibling = ckpt_dir / "model.fp16.safetensors"
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
    assert data["sibling"] is None  # the exact size it would have: test_cli_truth.py
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
    sibling = tmp_path / "model.fp16.safetensors"
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
    sibling = ckpt_dir / "model.fp16.safetensors"
    raw = bytearray(sibling.read_bytes())
    raw[-2] ^= 0xFF
    writable(sibling).write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING, logger="sa3loader")
    proc = run("warm", str(src), "--verify", cache=tmp_path / "c")
    assert proc.stdout.startswith("converted: ")
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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
    assert (out / "model.safetensors").exists() and not aside.exists() and not staging.exists()


def test_clear_and_prune_list_every_file_with_its_size(tmp_path, monkeypatch):
    src = tmp_path / "model.safetensors"
    save_file({"w": torch.ones(1000)}, str(src))
    cache = tmp_path / "c"
    run("warm", str(src), cache=cache)
    sibling = tmp_path / "model.fp16.safetensors"
    size = sibling.stat().st_size
    (tmp_path / "model.fp16.safetensors.incomplete-1-dead").write_bytes(b"x" * 10)
    listing = (
        f"would remove sibling {sibling} ({size / 1e3:.3g} kB)\n"
        f"would remove temp file {tmp_path}/model.fp16.safetensors.incomplete-1-dead (10 B)\n"
        f"would remove lock file {sibling}.lock (0 B)\n"
        f"would remove 3 file(s), {(size + 10) / 1e3:.3g} kB in all\n"
    )
    dry = run("cache", "clear", "--dry-run", cache=cache)
    assert dry.stdout == listing + f"would clear 1 row(s) from {cache}\n" and sibling.exists()
    listed = json.loads(run("cache", "clear", "--dry-run", "--json", cache=cache).stdout)
    assert [(r["kind"], r["bytes"]) for r in listed["removed"]] == [
        ("sibling", size),
        ("temp file", 10),
        ("lock file", 0),
    ]
    monkeypatch.setitem(_faults.facts, "interactive", lambda subject, real: True)
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert "nothing deleted" in run("cache", "clear", cache=cache).stdout and sibling.exists()
    monkeypatch.setattr("builtins.input", lambda prompt: "y")
    out = run("cache", "clear", cache=cache).stdout
    assert out.endswith(
        f"removed 3 file(s), {(size + 10) / 1e3:.3g} kB in all\ncleared 1 row(s) from {cache}\n"
    )
    assert not sibling.exists() and not list(tmp_path.glob("*.incomplete-*"))


def test_cli_names_its_arguments_for_people(capsys):
    assert cli.main(["cache"]) == 2
    err = capsys.readouterr().err
    assert "ACTION" in err and "cache_command" not in err
    assert "XDG_CACHE_HOME" in cli.build_parser().format_help()

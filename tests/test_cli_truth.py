"""Commands say only what happened: measured figures, plans carried out as shown, errors as errors.

- ``convert FILE --verify`` checks every sibling it reports, new or old, and prints the
  measured largest difference; a damaged sibling it replaced exits 3 and says so;
- a locked or corrupt index makes cache commands fail (exit 1, the index path, what to
  do), never report an empty success; ``cache repair`` sets a corrupt one aside;
- ``prune`` deletes a sibling only if, under its lock, it is still not valid for the
  current source; ``--dry-run`` lists exactly what the real run then deletes;
- with ``--json`` every outcome, errors and bad usage included, is one JSON document on stdout;
- ``--version``; global options after the command; Ctrl-D at a prompt cancels with exit 1.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
import torch
from safetensors.torch import save_file
from support.cli import run
from support.compare import writable

from sa3loader import __version__, _faults, cli
from sa3loader._format import read_header


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
    sibling = tmp_path / "model.fp16.safetensors"
    verdict = "verify: max abs diff of fp16(source) vs output = 0.0 over 1 float tensor(s) in 1 file(s)\n"
    first = run("convert", str(src), "--verify", cache=tmp_path / "c")
    assert first.stdout.startswith(f"converted {src} -> {sibling}\n{verdict}")
    again = json.loads(run("convert", str(src), "--verify", "--json", cache=tmp_path / "c").stdout)
    assert [(a["action"], a["max_abs_diff"], a["float_tensors"]) for a in again] == [("unchanged", 0.0, 1)]

    flip_last_value(sibling, 1000.0)
    damaged = run("convert", str(src), "--verify", cache=tmp_path / "c", check_rc=3)
    assert f"replaced  {sibling}: it failed the content check\n{verdict}" in damaged.stdout


def test_cache_verify_prints_the_difference_it_measured(src, tmp_path):
    run("warm", str(src), cache=tmp_path / "c")
    made = flip_last_value(tmp_path / "model.fp16.safetensors", 1000.0)
    checks = json.loads(run("cache", "verify", "--json", cache=tmp_path / "c", check_rc=3).stdout)
    assert checks[0]["check"].startswith("content mismatch: w differ")
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
    assert "sa3loader cache repair" in proc.stderr and (tmp_path / "model.fp16.safetensors").exists()


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
    has since republished for the new source: that sibling is the current one, and stays."""
    run("warm", str(src), cache=tmp_path / "a")
    save_file({"w": torch.linspace(-3, 3, 64).reshape(8, 8), "i": torch.arange(4)}, str(src))
    run("warm", str(src), cache=tmp_path / "b")  # republished beside the source
    sibling = tmp_path / "model.fp16.safetensors"
    republished = sibling.read_bytes()
    dry = json.loads(run("cache", "prune", "--dry-run", "--json", cache=tmp_path / "a").stdout)
    assert [r["status"] for r in dry["rows"]] == ["stale"]
    real = json.loads(run("cache", "prune", "--json", cache=tmp_path / "a").stdout)
    assert sibling.read_bytes() == republished
    assert [(k["path"], k["why"]) for k in real["kept"]] == [
        (str(sibling), f"it is valid for the current {src}")
    ]


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


def test_a_usage_error_in_json_names_a_public_type(tmp_path):
    usage = run("cache", "lss", "--json", cache=tmp_path / "c", check_rc=2)
    assert json.loads(usage.stdout)["error"]["type"] == "UsageError"


@pytest.mark.parametrize("key", [EOFError, KeyboardInterrupt], ids=["ctrl-d", "ctrl-c"])
def test_ending_input_at_the_prompt_cancels_with_exit_1(src, tmp_path, monkeypatch, key):
    run("warm", str(src), cache=tmp_path / "c")
    monkeypatch.setitem(_faults.facts, "interactive", lambda subject, real: True)

    def no_answer(prompt):
        raise key

    monkeypatch.setattr("builtins.input", no_answer)
    proc = run("cache", "clear", cache=tmp_path / "c", check_rc=1)
    assert proc.stderr == "sa3loader: cancelled: nothing deleted\n"
    assert (tmp_path / "model.fp16.safetensors").exists()


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
    assert lines[2] == "1 row(s): 1 MB of checkpoints, 500 kB of siblings"
    full = run("cache", "ls", "--paths", cache=cache).stdout.splitlines()[1]
    assert f" {snapshot / 'model.safetensors'} -> {entry['sibling']}  1 MB -> 500 kB sibling" in full


def test_info_says_what_a_sibling_costs_and_whether_one_exists(src, tmp_path):
    size = src.stat().st_size
    before = run("info", str(src), cache=tmp_path / "c").stdout.splitlines()
    run("warm", str(src), cache=tmp_path / "c")
    sibling_size = (tmp_path / "model.fp16.safetensors").stat().st_size  # predicted exactly
    assert before[-2:] == [
        f"fp16 sibling: {sibling_size} B more on disk; model_half=True loads take their weights "
        f"from it ({sibling_size} B) instead of from the checkpoint ({size} B)",
        "sibling: none yet (the first model_half=True load or `sa3loader warm` makes it)",
    ]
    after = json.loads(run("info", str(src), "--json", cache=tmp_path / "c").stdout)
    assert after["sibling"] == str(tmp_path / "model.fp16.safetensors")
    assert after["fp16_sibling_size"] == (tmp_path / "model.fp16.safetensors").stat().st_size == sibling_size


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

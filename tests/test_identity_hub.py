"""A hub blob's name decides where its sibling is, never alone what it holds.

In a Hugging Face cache a snapshot's file links to ``blobs/<sha256 of the content>``.
Every copy of a blob shares one sibling, and a re-downloaded or copied blob (another
mtime) keeps it without a conversion once its fingerprint is read and matches; a new
revision is a new blob. The name never stands for the content without that read: a
copied cache's blob may be rewritten in place (``cp finetuned.safetensors`` through its
snapshot link), with or without its mtime restored.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from support.checkpoints import toy_hub_checkpoint
from support.compare import assert_same_model
from support.faults import injected
from support.loads import load_toy
from support.toymodel import reference

import sa3loader
from sa3loader import _identity, _places
from sa3loader._format import read_header

REPO = "org/model"


@pytest.fixture
def fingerprint_reads():
    """The source fingerprints read, by path."""
    reads: list[str | None] = []
    with injected(lambda name, subject=None: reads.append(subject) if name == "fingerprint" else None):
        yield reads


def redownload(ckpt: Path) -> None:
    """As huggingface_hub writes a blob: a new file renamed over the old one, with another mtime
    (set back an hour, out of the window in which a row is checked again for a same-tick write)."""
    blob = ckpt.resolve()
    incoming = blob.with_name(blob.name + ".incomplete")
    incoming.write_bytes(blob.read_bytes())
    other = blob.stat().st_mtime_ns - 3600 * 10**9
    os.utime(incoming, ns=(other, other))
    os.replace(incoming, blob)


def assert_hit_by_blob(ckpt: Path, cache: Path, fingerprint_reads: list, conversions: list) -> None:
    fingerprint_reads.clear()
    converted_before = len(conversions)
    model = load_toy(ckpt, cache)
    info = sa3loader.last_load_info()
    assert (info.cache_hit, info.converted) == (True, False)
    assert len(conversions) == converted_before and fingerprint_reads == [str(ckpt)]
    assert f"recognised by its hub blob {ckpt.resolve().name}" in info.events
    assert_same_model(model, reference(ckpt))


def test_a_redownloaded_blob_keeps_its_sibling_once_its_fingerprint_matches(
    tmp_path, fingerprint_reads, conversions
):
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    assert len(conversions) == 1
    redownload(ckpt)
    assert_hit_by_blob(ckpt, tmp_path / "cache", fingerprint_reads, conversions)
    load_toy(ckpt, tmp_path / "cache")  # and the row now vouches for the new file
    assert sa3loader.last_load_info().events == [] and len(conversions) == 1


def test_the_same_blob_in_another_hub_cache_shares_the_sibling(tmp_path, fingerprint_reads, conversions):
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    # A copy that keeps the links but not the times: another HF_HOME, another image layer.
    shutil.copytree(tmp_path / "hf", tmp_path / "hf-copy", symlinks=True, copy_function=shutil.copy)
    copy = tmp_path / "hf-copy" / ckpt.relative_to(tmp_path / "hf")
    assert copy.resolve() != ckpt.resolve() and copy.stat().st_mtime_ns != ckpt.stat().st_mtime_ns
    assert_hit_by_blob(copy, tmp_path / "cache", fingerprint_reads, conversions)


def test_a_new_revision_is_a_new_identity(tmp_path, conversions):
    first = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(first, tmp_path / "cache")
    second = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev2", seed=4)
    assert first.stat().st_size == second.stat().st_size  # same layout, other weights
    model = load_toy(second, tmp_path / "cache")
    assert sa3loader.last_load_info().converted and len(conversions) == 2
    assert_same_model(model, reference(second))
    # The rev1 link repointed at rev2's blob: same path, new content, never the old sibling.
    first.unlink()
    first.symlink_to(os.readlink(second))
    model = load_toy(first, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit and len(conversions) == 2
    assert_same_model(model, reference(second))


@pytest.mark.parametrize("index", ["kept", "lost"])
def test_a_blob_rewritten_in_place_is_converted_again(tmp_path, conversions, index):
    """Same blob name, same size and header, other bytes, same inode: the stat check decides."""
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    other = toy_hub_checkpoint(tmp_path / "other", REPO, "rev1", seed=4)
    inode = ckpt.stat().st_ino
    with open(ckpt, "r+b") as f:  # through the snapshot link, into the blob
        f.write(other.read_bytes())
    assert ckpt.stat().st_ino == inode and read_header(ckpt).sha256 == read_header(other).sha256
    if index == "lost":
        shutil.rmtree(tmp_path / "cache" / "index")
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted and len(conversions) == 2
    assert_same_model(model, reference(other))


def test_in_a_blobs_dir_others_can_write_to_the_fingerprint_decides(tmp_path, fingerprint_reads, conversions):
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    blobs = ckpt.resolve().parent
    blobs.chmod(0o777)
    redownload(ckpt)
    fingerprint_reads.clear()
    model = load_toy(ckpt, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.cache_hit and len(conversions) == 1 and fingerprint_reads == [str(ckpt)]
    assert f"recognised by its hub blob {ckpt.resolve().name}" in info.events
    assert_same_model(model, reference(ckpt))


def test_hub_blob_names_only_the_file_opened(tmp_path):
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    blob = ckpt.resolve()
    assert _identity.hub_blob(str(ckpt), os.stat(ckpt)) == hashlib.sha256(blob.read_bytes()).hexdigest()
    assert _identity.hub_blob(str(ckpt), os.stat(tmp_path / "hf" / "hub")) is None  # repointed since
    short = toy_hub_checkpoint(tmp_path / "hf2", REPO, "rev1", blob="0123abcd")  # a git (non-LFS) blob
    assert _identity.hub_blob(str(short), os.stat(short)) is None
    outside = tmp_path / "blobs" / blob.name  # a sha-like name outside any hub repo folder
    outside.parent.mkdir()
    shutil.copy(blob, outside)
    assert _identity.hub_blob(str(outside), os.stat(outside)) is None


def test_one_cache_place_per_blob():
    blob = "ab" * 32
    one = _places.cache_path("/c", "/a/snapshots/r1/model.safetensors", f"/a/blobs/{blob}", blob)
    other = _places.cache_path("/c", "/b/snapshots/r2/model.safetensors", f"/b/blobs/{blob}", blob)
    assert one == other != _places.cache_path("/c", "/a/snapshots/r1/model.safetensors", f"/a/blobs/{blob}")


def test_a_sibling_keyed_by_path_by_an_earlier_version_is_still_found(tmp_path, monkeypatch, conversions):
    """Before blobs were identities the cache dir keyed a hub file's sibling by its real path."""
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    real = str(ckpt.resolve())
    by_blob = Path(_places.cache_path(str(tmp_path / "cache"), str(ckpt), real, ckpt.resolve().name))
    by_path = Path(_places.cache_path(str(tmp_path / "cache"), str(ckpt), real))
    by_path.parent.mkdir(parents=True)
    by_blob.rename(by_path)  # where that version put it
    shutil.rmtree(tmp_path / "cache" / "index")
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit and len(conversions) == 1
    assert_same_model(model, reference(ckpt))


def test_cache_ls_calls_a_redownloaded_blob_current(tmp_path, capsys):
    from sa3loader import cli

    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    redownload(ckpt)
    assert cli.main(["cache", "ls", "--cache-dir", str(tmp_path / "cache"), "--json"]) == 0
    assert '"status": "ok"' in capsys.readouterr().out


def test_a_copied_cache_whose_snapshot_file_is_overwritten_gives_the_new_weights(tmp_path, conversions):
    """``cp -a`` of a hub cache, then ``cp finetuned.safetensors <copy>/snapshots/<rev>/model.safetensors``,
    which follows the link and rewrites the copied blob in place (same size and header): the
    copy is the fine-tune, the original stays the original, and neither converts in turn."""
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    shutil.copytree(tmp_path / "hf", tmp_path / "hf-copy", symlinks=True)  # copy2: times kept
    copy = tmp_path / "hf-copy" / ckpt.relative_to(tmp_path / "hf")
    load_toy(copy, tmp_path / "cache")
    assert sa3loader.last_load_info().cache_hit and len(conversions) == 1
    finetuned = toy_hub_checkpoint(tmp_path / "other", REPO, "rev1", seed=4)
    shutil.copyfile(finetuned, copy)  # through the snapshot link, into the copied blob
    assert read_header(copy).sha256 == read_header(ckpt).sha256 and copy.resolve().name == ckpt.resolve().name

    for _ in range(2):
        model = load_toy(copy, tmp_path / "cache")
        assert_same_model(model, reference(finetuned))
        model = load_toy(ckpt, tmp_path / "cache")
        assert_same_model(model, reference(ckpt))
    assert len(conversions) == 2  # the copy's own sibling, once


@pytest.mark.parametrize("index", ["kept", "lost"])
def test_a_blob_rewritten_in_place_with_its_mtime_restored_is_converted_again(tmp_path, conversions, index):
    """Same blob name, size, header, inode and mtime; other bytes: the changed ctime decides."""
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    other = toy_hub_checkpoint(tmp_path / "other", REPO, "rev1", seed=4)
    before = ckpt.stat()
    with open(ckpt, "r+b") as f:
        f.write(other.read_bytes())
    os.utime(ckpt, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert ckpt.stat().st_mtime_ns == before.st_mtime_ns and ckpt.stat().st_ino == before.st_ino
    if index == "lost":
        shutil.rmtree(tmp_path / "cache" / "index")
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted and len(conversions) == 2
    assert_same_model(model, reference(other))

"""A hub blob's name decides where its sibling is, never what it holds.

In a Hugging Face cache a snapshot's file links to ``blobs/<sha256 of the content>``. Every
copy of a blob shares one sibling place, and a copy that keeps the times (``cp -a``, an image
layer) keeps the sibling once its fingerprint is read and matches; a new revision is a new
blob. The name never stands for the content: a copied cache's blob may be rewritten through
its snapshot link (``cp finetuned.safetensors``), with or without its mtime restored, even in
a part of a large tensor the fingerprint does not sample, and a re-downloaded blob (another
mtime) is converted again, as any file is.
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


def test_a_redownloaded_blob_is_converted_again_as_any_file_is(tmp_path, conversions):
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    load_toy(ckpt, tmp_path / "cache")
    redownload(ckpt)
    model = load_toy(ckpt, tmp_path / "cache")
    assert sa3loader.last_load_info().converted and len(conversions) == 2
    assert_same_model(model, reference(ckpt))


def test_the_same_blob_copied_with_its_times_shares_the_sibling(tmp_path, fingerprint_reads, conversions):
    ckpt = toy_hub_checkpoint(tmp_path / "hf", REPO, "rev1")
    old = ckpt.resolve().stat().st_mtime_ns - 3600 * 10**9  # out of the racy window
    os.utime(ckpt.resolve(), ns=(old, old))
    load_toy(ckpt, tmp_path / "cache")
    shared = sa3loader.last_load_info().sibling
    # cp -a: another HF_HOME, another image layer; the times kept, the inode and ctime new.
    shutil.copytree(tmp_path / "hf", tmp_path / "hf-copy", symlinks=True)
    copy = tmp_path / "hf-copy" / ckpt.relative_to(tmp_path / "hf")
    fingerprint_reads.clear()
    model = load_toy(copy, tmp_path / "cache")
    info = sa3loader.last_load_info()
    assert info.cache_hit and len(conversions) == 1 and fingerprint_reads == [str(copy)]
    assert info.sibling == shared
    assert_same_model(model, reference(ckpt))


def test_a_large_tensor_edited_inside_through_a_copied_link_gives_the_new_weights(tmp_path, conversions):
    """One row of a 2 MiB embedding retrained (its spots unchanged), then ``cp`` through the copy's
    snapshot link: a new mtime, so the copy is converted again, whatever the fingerprint says."""
    import torch
    from safetensors.torch import save_file

    repo = tmp_path / "hf" / "hub" / "models--org--emb"
    (repo / "blobs").mkdir(parents=True)
    weights = {"weight": torch.randn(1024, 512)}  # 2 MiB: sampled at five spots
    save_file(weights, str(repo / "blobs" / "incoming"))
    blob = repo / "blobs" / hashlib.sha256((repo / "blobs" / "incoming").read_bytes()).hexdigest()
    (repo / "blobs" / "incoming").rename(blob)
    (repo / "snapshots" / "r1").mkdir(parents=True)
    ckpt = repo / "snapshots" / "r1" / "model.safetensors"
    ckpt.symlink_to(os.path.relpath(blob, ckpt.parent))
    factory = lambda config: torch.nn.Embedding(1024, 512)  # noqa: E731

    def load(path):
        return sa3loader.load_diffusion_cond(
            {}, path, "cpu", True, cache_dir=tmp_path / "cache", model_factory=factory
        )

    load(ckpt)
    assert sa3loader.wait_for_publishing(60)
    shutil.copytree(tmp_path / "hf", tmp_path / "hf-copy", symlinks=True)
    copy = tmp_path / "hf-copy" / ckpt.relative_to(tmp_path / "hf")
    edited = {"weight": weights["weight"].clone()}
    edited["weight"][300] += 1.0  # an interior row, away from every sampled spot
    save_file(edited, str(tmp_path / "edited.safetensors"))
    shutil.copyfile(tmp_path / "edited.safetensors", copy)  # through the link, into the copied blob
    model = load(copy)
    assert sa3loader.wait_for_publishing(60)
    assert torch.equal(model.weight, edited["weight"].half())
    assert torch.equal(load(ckpt).weight, weights["weight"].half())  # the original is still the original


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

"""install()/uninstall() and load_autoencoder against the real upstream source."""

from __future__ import annotations

import importlib
import json
import sys
import types

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model

import sa3loader

SEED = 99


@pytest.fixture
def tiny_files(upstream, tmp_path):
    torch.manual_seed(0)
    model = upstream.factory.create_diffusion_cond_from_config(upstream.tiny_config)
    ckpt = save(random_like_state(model, seed=11), tmp_path / "model.safetensors")
    config = tmp_path / "model_config.json"
    config.write_text(json.dumps(upstream.tiny_config))
    return config, ckpt


@pytest.fixture
def upstream_model_module(upstream, tiny_files, monkeypatch):
    model_mod = importlib.import_module("stable_audio_3.model")

    class LocalFiles:
        def resolve(self):
            return tuple(map(str, tiny_files))

    monkeypatch.setattr(model_mod, "all_models", {"tiny": LocalFiles()})
    yield model_mod
    sa3loader.uninstall()


def from_pretrained(model_mod):
    torch.manual_seed(SEED)
    return model_mod.StableAudioModel.from_pretrained("tiny", device="cpu").model


def test_install_routes_from_pretrained_through_sa3loader(upstream_model_module, tmp_path, monkeypatch):
    monkeypatch.setenv("SA3LOADER_CACHE_DIR", str(tmp_path / "cache"))
    lu = importlib.import_module("stable_audio_3.loading_utils")
    original = lu.load_diffusion_cond
    reference = from_pretrained(upstream_model_module)

    sa3loader.install()
    assert lu.load_diffusion_cond is sa3loader.load_diffusion_cond
    assert upstream_model_module.load_diffusion_cond is sa3loader.load_diffusion_cond
    assert sa3loader._upstream.original_load_diffusion_cond() is original
    ours = from_pretrained(upstream_model_module)
    info = sa3loader.last_load_info()
    assert info.source.endswith("model.safetensors") and info.build == "fast"
    assert not info.model_half  # upstream forces model_half=False without CUDA
    assert_same_model(ours, reference)

    monkeypatch.setenv("SA3LOADER_DISABLE", "1")  # calls the saved original: no recursion
    disabled = from_pretrained(upstream_model_module)
    assert sa3loader.last_load_info().build == "upstream"
    assert_same_model(disabled, reference)

    sa3loader.uninstall()
    assert lu.load_diffusion_cond is original and upstream_model_module.load_diffusion_cond is original


def test_installed_context_manager_restores(upstream_model_module):
    lu = importlib.import_module("stable_audio_3.loading_utils")
    original = lu.load_diffusion_cond
    with sa3loader.installed():
        assert upstream_model_module.load_diffusion_cond is sa3loader.load_diffusion_cond
    assert upstream_model_module.load_diffusion_cond is original and lu.load_diffusion_cond is original


def _patched(*modules) -> list[bool]:
    return [m.load_diffusion_cond is sa3loader.load_diffusion_cond for m in modules]


def test_installed_blocks_nested_in_threads_or_after_install_keep_the_patch_until_the_last_ends(
    upstream_model_module,
):
    """The patch stays while anyone holds it: an install(), or an installed() block open in
    this thread or another."""
    import threading

    lu, model = importlib.import_module("stable_audio_3.loading_utils"), upstream_model_module
    original = lu.load_diffusion_cond
    with sa3loader.installed():
        with sa3loader.installed():
            pass
        assert _patched(lu, model) == [True, True]  # the outer block still holds it
    assert _patched(lu, model) == [False, False]
    sa3loader.install()
    with sa3loader.installed():
        pass
    assert _patched(lu, model) == [True, True]  # install() holds it until uninstall()
    with sa3loader.installed():
        sa3loader.uninstall()
        assert _patched(lu, model) == [True, True]  # the open block still holds it
    assert _patched(lu, model) == [False, False]

    entered, left, seen = threading.Event(), threading.Event(), []

    def other_thread():
        with sa3loader.installed():
            entered.set()
            left.wait(10)
            seen.append(_patched(lu, model))

    with sa3loader.installed():
        worker = threading.Thread(target=other_thread)
        worker.start()
        assert entered.wait(10)
    left.set()  # this thread's block has ended; the other's is still open
    worker.join(10)
    assert seen == [[True, True]] and lu.load_diffusion_cond is original


def test_install_leaves_others_patches_and_reaches_from_pretrained_past_a_wrapper(upstream_model_module):
    """A wrapper someone set in loading_utils before install(): ``model``'s binding (what
    from_pretrained looks up) is patched too; one set after install() survives uninstall()."""
    lu, model = importlib.import_module("stable_audio_3.loading_utils"), upstream_model_module
    original = lu.load_diffusion_cond

    def wrapper(*args, **kwargs):
        return original(*args, **kwargs)

    lu.load_diffusion_cond = wrapper
    try:
        sa3loader.install()
        assert _patched(lu, model) == [True, True]
        sa3loader.uninstall()
        assert (lu.load_diffusion_cond, model.load_diffusion_cond) == (wrapper, original)
        lu.load_diffusion_cond = original
        sa3loader.install()
        lu.load_diffusion_cond = wrapper  # someone else's patch, over ours
        sa3loader.uninstall()
        assert (lu.load_diffusion_cond, model.load_diffusion_cond) == (wrapper, original)
    finally:
        lu.load_diffusion_cond = original


class RaisesOnAnyMissingName(types.ModuleType):
    """A lazy module whose ``__getattr__`` fails for any name it does not have."""

    def __getattr__(self, name):
        raise RuntimeError(f"lazy import of {name} failed")


class NoNamespace:
    __slots__ = ()  # an object in sys.modules with no __dict__


def test_install_reads_each_modules_own_bindings_and_runs_no_lazy_getattr(upstream_model_module, monkeypatch):
    """A module's binding is in its namespace: a lazy module's ``__getattr__`` (which may raise, or
    import) is not run, an entry that is not a module is skipped, and every binding is patched,
    under any name."""
    lu, model = importlib.import_module("stable_audio_3.loading_utils"), upstream_model_module
    original = lu.load_diffusion_cond
    user = types.ModuleType("zzz_user_module")
    user.load_diffusion_cond = original
    user.sa3_load = original  # from stable_audio_3.loading_utils import load_diffusion_cond as sa3_load
    monkeypatch.setitem(sys.modules, "zz_lazy_module", RaisesOnAnyMissingName("zz_lazy_module"))
    monkeypatch.setitem(sys.modules, "zz_no_namespace", NoNamespace())
    monkeypatch.setitem(sys.modules, "zzz_user_module", user)
    sa3loader.install()
    assert _patched(lu, model) == [True, True]
    assert user.load_diffusion_cond is user.sa3_load is lu.load_diffusion_cond
    sa3loader.uninstall()
    assert (lu.load_diffusion_cond, model.load_diffusion_cond, user.load_diffusion_cond) == (original,) * 3
    assert user.sa3_load is original


class RefusesWrites(dict):
    def __setitem__(self, key, value):
        raise TypeError("read-only namespace")


class OddNamespace:
    """Something in sys.modules whose namespace is a dict of its own kind (it may refuse a write),
    and which notes, when read, whether upstream's modules bind sa3loader's by then."""

    def __init__(self, binding, loading_utils) -> None:
        object.__setattr__(self, "_ns", RefusesWrites(load_diffusion_cond=binding))
        object.__setattr__(self, "_lu", loading_utils)
        object.__setattr__(self, "seen", [])

    @property
    def __dict__(self):
        self.seen.append(self._lu.load_diffusion_cond)
        return self._ns


def test_install_rebinds_upstreams_modules_first_and_leaves_other_kinds_of_namespace(
    upstream_model_module, monkeypatch
):
    """Upstream's modules are rebound before any other is looked at (a module imported meanwhile
    binds sa3loader's); a namespace that is not a plain dict (which may refuse a write, leaving
    the patch half made) is left as it is."""
    lu = importlib.import_module("stable_audio_3.loading_utils")
    original = lu.load_diffusion_cond
    odd = OddNamespace(original, lu)
    modules = dict(sys.modules)
    sys.modules.clear()  # the odd one first in sys.modules' order, before upstream's
    sys.modules.update({"aaa_odd_namespace": odd, **modules})
    try:
        with sa3loader.installed():
            assert odd.seen and all(seen is not original for seen in odd.seen)
            assert odd._ns["load_diffusion_cond"] is original and lu.load_diffusion_cond is not original
    finally:
        sys.modules.clear()
        sys.modules.update(modules)
    assert lu.load_diffusion_cond is original


def test_disable_with_sa3loaders_function_set_by_hand_is_a_typed_error_not_a_recursion(
    upstream, tiny_files, monkeypatch
):
    config, ckpt = tiny_files
    lu = importlib.import_module("stable_audio_3.loading_utils")
    monkeypatch.setattr(lu, "load_diffusion_cond", sa3loader.load_diffusion_cond)
    monkeypatch.setenv("SA3LOADER_DISABLE", "1")
    with pytest.raises(sa3loader.UpstreamNotFoundError, match="has sa3loader's there"):
        sa3loader.load_diffusion_cond(json.loads(config.read_text()), ckpt, "cpu")


def test_import_has_no_side_effects(upstream):
    lu = importlib.import_module("stable_audio_3.loading_utils")
    importlib.reload(sa3loader)
    assert lu.load_diffusion_cond is not sa3loader.load_diffusion_cond


@pytest.mark.parametrize("bare", [False, True], ids=["combined", "bare-ae"])
def test_load_autoencoder_matches_upstream(upstream, tiny_files, tmp_path, bare):
    config, ckpt = tiny_files
    if bare:
        from safetensors.torch import load_file

        prefix = "pretransform.model."
        tensors = {k[len(prefix) :]: v for k, v in load_file(str(ckpt)).items() if k.startswith(prefix)}
        ckpt = save(tensors, tmp_path / "ae.safetensors")
    torch.manual_seed(SEED)
    ref = upstream.loading_utils.load_autoencoder(str(config), str(ckpt), device="cpu")
    torch.manual_seed(SEED)
    ours = sa3loader.load_autoencoder(config, ckpt, "cpu")
    assert sa3loader.last_load_info().build == "fast"
    assert ours.training and ref.training
    assert_same_model(ours, ref)

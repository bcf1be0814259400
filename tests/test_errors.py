"""Every exception sa3loader raises is a ``Sa3LoaderError`` and the builtin a caller would catch,
with the file in ``.filename``; values in the environment that cannot be used warn and fall back.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys

import pytest
import torch
from support.checkpoints import random_like_state, save
from support.compare import assert_same_model
from support.loads import load_toy
from support.toymodel import build, reference

import sa3loader
from sa3loader._cache_dir import resolve_cache_dir


@pytest.fixture
def ckpt(tmp_path):
    torch.manual_seed(0)
    return save(random_like_state(build(), seed=3), tmp_path / "model.safetensors")


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_a_bad_io_value_is_a_config_error(ckpt, tmp_path, monkeypatch, how):
    if how == "environment":
        monkeypatch.setenv("SA3LOADER_IO", "fast")
    with pytest.raises(sa3loader.Sa3LoaderError, match="io must be one of mmap, read, not 'fast'") as err:
        load_toy(ckpt, tmp_path / "c", **({"io": "fast"} if how == "argument" else {}))
    assert type(err.value).__name__ == "ConfigError" and isinstance(err.value, ValueError)
    assert err.value.filename is None


def test_too_many_open_files_after_the_first_open_still_loads(ckpt, tmp_path, monkeypatch, caplog):
    """EMFILE once the checkpoint and the temp file are open: the load reads through the
    descriptors it has (fingerprint, conversion), and where it cannot get one for the new
    sibling it says so and reads fp32."""
    real_open = os.open
    opened = []

    def open_once(path, flags, *args, **kwargs):
        if ".safetensors" in os.fspath(path):
            opened.append(path)
            if len(opened) > 2:
                raise OSError(errno.EMFILE, os.strerror(errno.EMFILE), path)
        return real_open(path, flags, *args, **kwargs)

    def no_more_descriptors(fd):
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(os, "open", open_once)
    monkeypatch.setattr(os, "dup", no_more_descriptors)
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        model = load_toy(ckpt, tmp_path / "c")
    monkeypatch.setattr(os, "open", real_open)
    monkeypatch.undo()
    assert_same_model(model, reference(ckpt))
    assert "Too many open files" in sa3loader.last_load_info().reason
    assert not list(tmp_path.rglob("*.incomplete-*"))


def test_a_mapping_refused_by_an_address_space_limit_names_the_file(ckpt, tmp_path, monkeypatch):
    load_toy(ckpt, tmp_path / "c")

    def no_address_space(*args, **kwargs):
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))

    monkeypatch.setattr(mmap, "mmap", no_address_space)
    sibling = str(tmp_path / ".cache" / "sa3loader" / "model.fp16.safetensors")
    with pytest.raises(sa3loader.FileAccessError, match="SA3LOADER_IO=read") as err:
        load_toy(ckpt, tmp_path / "c")
    assert (err.value.errno, err.value.filename) == (errno.ENOMEM, sibling) and sibling in str(err.value)


def test_install_without_upstream_is_upstream_not_found(monkeypatch):
    monkeypatch.setitem(sys.modules, "stable_audio_3", None)  # import fails as if absent
    monkeypatch.setitem(sys.modules, "stable_audio_3.loading_utils", None)
    with pytest.raises(sa3loader.UpstreamNotFoundError) as err:
        sa3loader.install()
    assert isinstance(err.value, ImportError)


def test_errors_name_their_file(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    for path, kind in [
        (garbage, sa3loader.HeaderError),
        (tmp_path / "nope", sa3loader.CheckpointNotFoundError),
    ]:
        with pytest.raises(kind) as err:
            sa3loader.load_into_module(build(), path)
        assert err.value.filename == str(path) and str(path) in str(err.value)


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "soon"])
def test_a_lock_timeout_that_is_not_a_number_of_seconds_warns_and_uses_the_default(
    monkeypatch, caplog, value
):
    from sa3loader import _config

    monkeypatch.setenv("SA3LOADER_LOCK_TIMEOUT", value)
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        assert _config.lock_timeout() == _config.DEFAULT_LOCK_TIMEOUT_S
    assert [r.getMessage() for r in caplog.records] == [
        f"$SA3LOADER_LOCK_TIMEOUT={value!r} is not a number of seconds >= 0; using 3600"
    ]


@pytest.mark.parametrize(("name", "read"), [("SA3LOADER_PIN", "pin"), ("SA3LOADER_PROGRESS", "progress")])
@pytest.mark.parametrize(
    ("value", "on"),
    [("false", False), ("No", False), ("0", False), ("yes", True), ("", True), ("maybe", True)],
)
def test_a_flag_that_is_on_by_default_reads_every_word_and_warns_of_others(
    monkeypatch, caplog, name, read, value, on
):
    """$SA3LOADER_PROGRESS took only 0 (false and no were on, silently); $SA3LOADER_PIN took
    =maybe silently (a README walk). Both read the words every flag reads; another value
    keeps the default, with one warning."""
    from sa3loader import _config

    monkeypatch.setenv(name, value)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        assert getattr(_config, read)() is on
        assert getattr(_config, read)() is on
    warned = (
        [f"ignoring ${name}='maybe': not one of 1/true/yes/on, or 0/false/no/off"] if value == "maybe" else []
    )
    assert [r.getMessage() for r in caplog.records] == warned


@pytest.mark.parametrize("name", ["SA3LOADER_DISABLE", "SA3LOADER_VERIFY", "SA3LOADER_SHARED_CACHE"])
@pytest.mark.parametrize(
    ("value", "on"), [("2", False), ("ture", False), ("On", True), ("off", False), ("", False)]
)
def test_a_flag_not_on_or_off_warns_once_and_is_off(monkeypatch, caplog, name, value, on):
    """``=2`` or a typo was taken for off without a word (a README walk)."""
    from sa3loader import _config

    monkeypatch.setenv(name, value)
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        assert _config.is_true(name) is on
        assert _config.is_true(name) is on
    warned = (
        []
        if value.lower() in ("on", "off", "")
        else [f"ignoring ${name}={value.lower()!r}: not one of 1/true/yes/on, or 0/false/no/off"]
    )
    assert [r.getMessage() for r in caplog.records] == warned


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("$SA3_UNSET_FOR_TEST/x", "$SA3_UNSET_FOR_TEST is not set"),
        ("~no-such-user-here/x", "~no-such-user-here is not a user"),
        ("relative/dir", "it is a relative path"),
    ],
)
def test_a_cache_dir_variable_that_is_no_path_warns_and_is_ignored(
    tmp_path, monkeypatch, caplog, value, problem
):
    monkeypatch.delenv("SA3_UNSET_FOR_TEST", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SA3LOADER_CACHE_DIR", value)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with caplog.at_level(logging.WARNING, logger="sa3loader"):
        assert resolve_cache_dir() == str(tmp_path / "xdg" / "sa3loader")
    assert [r.getMessage() for r in caplog.records] == [f"ignoring $SA3LOADER_CACHE_DIR={value!r}: {problem}"]
    assert list(tmp_path.iterdir()) == []  # nothing made under the working directory


@pytest.mark.parametrize("how", ["missing", "a directory", "not JSON", "not UTF-8"])
def test_load_autoencoders_config_file_errors_are_typed_and_name_the_file(tmp_path, how):
    ckpt = save(random_like_state(build(), seed=1), tmp_path / "model.safetensors")
    config = tmp_path / "model_config.json"
    expected: type[Exception] = sa3loader.ConfigError
    if how == "missing":
        expected = sa3loader.CheckpointNotFoundError
    elif how == "a directory":
        config.mkdir()
        expected = sa3loader.CheckpointIsADirectoryError
    else:
        config.write_bytes(b"{model: 1}" if how == "not JSON" else b'{"a": "\xff\xfe"}')
    with pytest.raises(expected) as err:
        sa3loader.load_autoencoder(config, ckpt, "cpu", model_factory=lambda c: build())
    assert err.value.filename == str(config) and str(config) in str(err.value)


@pytest.mark.parametrize("cut", [1, 100])
def test_a_checkpoint_cut_short_raises_truncated_file_error_one_padded_a_header_error(tmp_path, cut):
    """errors.py: ``TruncatedFileError``, a file that ended before the bytes its header promised
    (an ``EOFError`` too, as documented); bytes past the last tensor are no truncation."""
    ckpt = save({"w": torch.arange(64.0)}, tmp_path / "model.safetensors")
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[:-cut])
    with pytest.raises(sa3loader.TruncatedFileError, match="truncated file") as raised:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, model_factory=lambda c: torch.nn.Linear(8, 8))
    assert isinstance(raised.value, EOFError) and raised.value.filename == str(ckpt)
    ckpt.write_bytes(whole + b"\0" * cut)
    with pytest.raises(sa3loader.HeaderError, match="padded file") as raised:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, model_factory=lambda c: torch.nn.Linear(8, 8))
    assert not isinstance(raised.value, EOFError)


def test_a_checkpoint_cut_off_inside_its_header_is_a_truncated_file_error(tmp_path):
    """Cut inside its header, a checkpoint said "not a safetensors file" (an outside attack): it
    is one, cut short (``TruncatedFileError``, an ``EOFError``). A file that is no safetensors
    file at all (a pickle, text) still says what it looks like."""
    ckpt = save({"w": torch.arange(64.0)}, tmp_path / "model.safetensors")
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[:20])
    with pytest.raises(sa3loader.TruncatedFileError, match="ends inside its .*-byte header") as raised:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, model_factory=lambda c: torch.nn.Linear(8, 8))
    assert isinstance(raised.value, EOFError) and raised.value.filename == str(ckpt)
    ckpt.write_bytes(b"\x80\x04" + b"\0" * 30)  # a pickle's first bytes
    with pytest.raises(sa3loader.HeaderError, match="not a safetensors file") as raised:
        sa3loader.load_diffusion_cond({}, ckpt, "cpu", False, model_factory=lambda c: torch.nn.Linear(8, 8))
    assert not isinstance(raised.value, EOFError)

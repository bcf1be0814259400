"""The cache dir: where it is, and opening one to every user for a baked image (the dirs
sa3loader creates, private and tagged, are made in ``_places``).

A cache dir is used only when no one else can plant files in it (``_trust.cache_dir_trust``):
siblings and index rows found there decide which weights a load returns. Dirs sa3loader
creates are private (0700).
"""

from __future__ import annotations

import os
import stat
import tempfile

from . import _config
from ._config import warn_once
from ._places import (
    BESIDE_SUBDIR,
    CACHEDIR_TAG,
    INDEX_SUBDIR,
    LOCK_SUFFIX,
    SIBLINGS_SUBDIR,
    at_sibling_place,
    is_temp_name,
    make_private_dirs,
)
from ._trust import cache_dir_trust, readers_bits
from .errors import ConfigError

CACHE_APP_NAME = "sa3loader"


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> str:
    """``cache_dir``, else $SA3LOADER_CACHE_DIR, else $XDG_CACHE_HOME/sa3loader, else ~/.cache/sa3loader.

    Falls back to a per-user temp dir (with a warning) when there is no usable home;
    when someone else controls that fixed name, to a fresh private one instead.
    """
    if cache_dir is not None:
        if not os.fspath(cache_dir).strip():  # not the current dir: an unset variable, likely
            raise ConfigError(
                f"cache_dir is empty ({cache_dir!r}): give a directory, or None for the default"
            )
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    from_env = _config.env_path(_config.CACHE_DIR_ENV)
    if from_env is not None:
        return from_env
    xdg = _config.env_path(_config.XDG_CACHE_HOME_ENV)
    if xdg is not None:
        return os.path.join(xdg, CACHE_APP_NAME)
    home = os.path.expanduser("~")
    candidate = os.path.join(home, ".cache", CACHE_APP_NAME)
    if home != "~" and _can_create(candidate):
        return candidate
    fallback = os.path.join(tempfile.gettempdir(), f"{CACHE_APP_NAME}-{os.getuid()}")
    unusable: str | None = "it cannot be created or written"
    if _can_create(fallback):
        unusable = cache_dir_trust(fallback, shared=_config.shared_cache())
    if unusable is None:
        warn_once("no-home", "no usable home directory for the sa3loader cache; using %s", fallback)
        return fallback
    fresh = tempfile.mkdtemp(prefix=f"{CACHE_APP_NAME}-{os.getuid()}-")
    warn_once(
        "no-home",
        "no usable home directory for the sa3loader cache, and %s is not usable (%s); using %s",
        fallback,
        unusable,
        fresh,
    )
    return fresh


def _can_create(path: str) -> bool:
    try:
        make_private_dirs(path)
    except OSError:
        return False
    return os.access(path, os.W_OK | os.X_OK)


SHARED_DIR_BITS = 0o555  # r-x for all: anyone may list and traverse, no one else may write

SHARED_FILE_BITS = 0o444


def _add_bits(targets: list[tuple[str, int]]) -> list[str]:
    """Add ``bits`` to each path's mode where it is yours and no symlink; the paths changed."""
    changed = []
    for path, bits in targets:
        st = os.lstat(path)
        if st.st_uid == os.getuid() and not stat.S_ISLNK(st.st_mode) and st.st_mode & bits != bits:
            os.chmod(path, stat.S_IMODE(st.st_mode) | bits)
            changed.append(path)
    return changed


def refuse_to_open_others(cache_dir: str) -> None:
    """``ConfigError`` where ``cache_dir`` holds more than sa3loader's own entries (a cache dir
    given as ``~/.cache``): opening it to every user would let them into other programs'
    folders, whose files may rely on it being private."""
    try:
        names = set(os.listdir(cache_dir)) - {INDEX_SUBDIR, SIBLINGS_SUBDIR, CACHEDIR_TAG}
        others = sorted(n for n in names if not n.startswith(INDEX_SUBDIR + ".corrupt-"))  # repair's
    except FileNotFoundError:  # made by this warm: sa3loader's alone
        return
    if others:
        raise ConfigError(
            f"{cache_dir} holds more than sa3loader's cache ({', '.join(others[:3])}): "
            "--readable-by-all would open it to every user. Give --cache-dir a folder of its own.",
            filename=cache_dir,
        )


def open_cache_dir_to_all(cache_dir: str) -> list[str]:
    """Let every user read a cache dir you built (an image built as root, served as another user).

    Dirs get r-x for all and the index's files r-- for all; write bits are not
    touched, so the dir stays trusted (no one else can plant files in it).
    Siblings keep their own mode, the source's read bits: never wider than the
    checkpoint. Only what sa3loader keeps there is opened (a cache dir given as
    ``~/.cache`` holds other programs' files: they keep their modes). Returns the
    paths changed; ``refuse_to_open_others`` first.
    """
    refuse_to_open_others(cache_dir)
    changed = _add_bits([(cache_dir, SHARED_DIR_BITS)])
    tag = os.path.join(cache_dir, CACHEDIR_TAG)
    if os.path.isfile(tag):
        changed += _add_bits([(tag, SHARED_FILE_BITS)])
    for directory, _, files in (
        walked
        for subdir in (INDEX_SUBDIR, SIBLINGS_SUBDIR)
        for walked in os.walk(os.path.join(cache_dir, subdir))
    ):
        targets = [(directory, SHARED_DIR_BITS)]
        targets += [
            (os.path.join(directory, name), SHARED_FILE_BITS)
            for name in files
            if not name.endswith((".safetensors", LOCK_SUFFIX)) and not is_temp_name(name)
        ]
        changed += _add_bits(targets)
    return changed


def siblings_in(cache_dir: str) -> list[str]:
    """Every sibling at ``<cache>/siblings/<key>/``, named by a row or not (no link at ``siblings``)."""
    root = os.path.join(cache_dir, SIBLINGS_SUBDIR)
    names = [os.path.join(d, n) for d, _, ns in os.walk(root) if not os.path.islink(root) for n in sorted(ns)]
    return [name for name in names if at_sibling_place(name, cache_dir)]


def closed_above(path: str) -> str | None:
    """The first folder above ``path`` that other users cannot pass (no x bit for them): what
    ``--readable-by-all`` opened beneath it they cannot reach. None when every one lets them."""
    folder = os.path.dirname(os.path.abspath(path))
    while os.stat(folder).st_mode & stat.S_IXOTH:
        if os.path.dirname(folder) == folder:
            return None
        folder = os.path.dirname(folder)
    return folder


def open_siblings_to_all(warmed: list[tuple[str, str]]) -> list[str]:
    """For each (checkpoint, sibling) warmed: the sibling gets the checkpoint's read bits (made
    under a umask like 077, it had fewer), and a hidden ``.cache/sa3loader`` holding it the
    checkpoint folder's r-x bits: never wider than the checkpoint, never writable by others.
    Returns the paths changed; ``ConfigError``, before any change, where a ``.cache`` holds
    more than sa3loader's folder (``.cache/huggingface``: opened, its token would be read)."""
    for _, sibling in warmed:
        hidden = os.path.dirname(sibling)
        others = os.listdir(os.path.dirname(hidden)) if hidden.endswith(os.sep + BESIDE_SUBDIR) else []
        if set(others) - {os.path.basename(hidden)}:
            raise ConfigError(
                f"{os.path.dirname(hidden)} holds other programs' files ({', '.join(sorted(others)[:3])}): "
                "--readable-by-all would open it to every user. Nothing was opened; with "
                "SA3LOADER_PLACE=cache the sibling goes to the cache dir instead.",
                filename=os.path.dirname(hidden),
            )
    changed = []
    for checkpoint, sibling in warmed:
        hidden = os.path.dirname(sibling)
        targets = [(sibling, readers_bits(checkpoint, os.stat(checkpoint), sibling) & 0o444)]
        if hidden.endswith(os.sep + BESIDE_SUBDIR):
            folder_bits = stat.S_IMODE(os.stat(os.path.dirname(os.path.dirname(hidden))).st_mode)
            targets += [(d, folder_bits & SHARED_DIR_BITS) for d in (os.path.dirname(hidden), hidden)]
        changed += _add_bits(targets)
    return changed

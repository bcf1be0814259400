"""Every ``SA3LOADER_*`` environment variable: its name, default and parser, read at call time
(``SA3LOADER_VERBOSITY`` at import, as huggingface_hub reads its own).

A value that cannot be used is never a silent surprise: a bad ``io`` is a
``ConfigError``; a bad timeout or path gets one warning and the default.
``warn_once`` keeps a misconfiguration from flooding a log.
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Literal

from .errors import ConfigError

logger = logging.getLogger(__name__)

CACHE_DIR_ENV = "SA3LOADER_CACHE_DIR"
SHARED_CACHE_ENV = "SA3LOADER_SHARED_CACHE"
DISABLE_ENV = "SA3LOADER_DISABLE"
VERIFY_ENV = "SA3LOADER_VERIFY"
IO_ENV = "SA3LOADER_IO"
LOCK_TIMEOUT_ENV = "SA3LOADER_LOCK_TIMEOUT"
PROGRESS_ENV = "SA3LOADER_PROGRESS"
PIN_ENV = "SA3LOADER_PIN"
VERBOSITY_ENV = "SA3LOADER_VERBOSITY"
PLACE_ENV = "SA3LOADER_PLACE"
PLACES = ("beside", "cache")
CACHE_MAX_ENV = "SA3LOADER_CACHE_MAX"
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12} | {
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
LOGGER_NAME = "sa3loader"
VERBOSITY_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
XDG_CACHE_HOME_ENV = "XDG_CACHE_HOME"

DEFAULT_LOCK_TIMEOUT_S = 3600.0
IoMode = Literal["mmap", "read"]  # how CPU weights are read: mapped, or read into fresh memory
IO_MODES: tuple[IoMode, ...] = ("mmap", "read")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class Once:
    """The messages this process has logged already (``warn_once``, ``info_once``): a
    misconfigured cache must not flood the log with the same line on every load."""

    def __init__(self) -> None:
        self._keys: set[str] = set()
        self._guard = threading.Lock()

    def first(self, key: str) -> bool:
        """True the first time ``key`` is seen in this process."""
        with self._guard:
            if key in self._keys:
                return False
            self._keys.add(key)
            return True

    def forget(self) -> None:
        """Say everything again (a test that checks each message)."""
        with self._guard:
            self._keys.clear()

    def unlock_in_child(self) -> None:
        """A child forked while another thread held the guard would wait on it for ever."""
        self._guard = threading.Lock()


ONCE = Once()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=ONCE.unlock_in_child)


def warn_once(key: str, message: str, *args: object) -> None:
    """Log a warning once per process: a misconfigured cache must not flood the log."""
    if ONCE.first("warning:" + key):
        logger.warning(message, *args)


def info_once(key: str, message: str, *args: object) -> None:
    """Log at INFO once per process: a state that is fine (a read-only baked index) but worth knowing."""
    if ONCE.first("info:" + key):
        logger.info(message, *args)


def verbosity() -> int | None:
    """$SA3LOADER_VERBOSITY as a logging level (debug, info, warning, error, critical); None when unset."""
    raw = os.environ.get(VERBOSITY_ENV, "").strip().lower()
    if not raw:
        return None
    if raw not in VERBOSITY_LEVELS:
        warn_once(
            f"env:{VERBOSITY_ENV}",
            "ignoring $%s=%r: not one of %s",
            VERBOSITY_ENV,
            raw,
            ", ".join(VERBOSITY_LEVELS),
        )
        return None
    return VERBOSITY_LEVELS[raw]


def apply_verbosity() -> None:
    """As huggingface_hub does with $HF_HUB_VERBOSITY: when set, the ``sa3loader`` logger gets that
    level and its own handler on stderr, so the messages show even where logging is not configured."""
    level = verbosity()
    if level is None:
        return
    library = logging.getLogger(LOGGER_NAME)
    library.setLevel(level)
    if not library.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("sa3loader: %(levelname)s: %(message)s"))
        library.addHandler(handler)
        library.propagate = False


def is_true(name: str) -> bool:
    """A flag variable that is off by default (``flag``)."""
    return flag(name, default=False)


def flag(name: str, *, default: bool) -> bool:
    """A flag variable: 1, true, yes or on (any case) sets it, 0, false, no or off clears it;
    unset or empty is ``default``, and so is anything else, with one warning (``=2`` is not
    taken for on, nor ``=maybe`` for either)."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in _TRUE or raw in _FALSE[1:]:
        return raw in _TRUE
    if raw:
        warn_once(
            f"env:{name}",
            "ignoring $%s=%r: not one of %s, or %s",
            name,
            raw,
            "/".join(_TRUE),
            "/".join(_FALSE[1:]),
        )
    return default


def shared_cache() -> bool:
    """$SA3LOADER_SHARED_CACHE=1: a group- or world-writable cache dir is trusted on purpose."""
    return is_true(SHARED_CACHE_ENV)


def disabled() -> bool:
    """$SA3LOADER_DISABLE=1: every load is upstream's own."""
    return is_true(DISABLE_ENV)


def verify_asked(argument: bool | None) -> bool:
    """The ``verify`` argument, else $SA3LOADER_VERIFY."""
    return is_true(VERIFY_ENV) if argument is None else bool(argument)


def io_mode(argument: str | None) -> IoMode | None:
    """The ``io`` argument, else $SA3LOADER_IO; None when neither is set. A bad value is a ``ConfigError``."""
    if argument is not None:
        chosen, where = argument, "io"
    else:
        chosen, where = os.environ.get(IO_ENV, "").strip().lower(), f"${IO_ENV}"
        if not chosen:
            return None
    if chosen not in IO_MODES:
        raise ConfigError(f"io must be one of {', '.join(IO_MODES)}, not {chosen!r} ({where})")
    return chosen


def place() -> str:
    """$SA3LOADER_PLACE: ``beside`` (default: beside the checkpoint where allowed) or ``cache``
    (every new sibling in the cache dir). A bad value is a ``ConfigError``."""
    chosen = os.environ.get(PLACE_ENV, "").strip().lower() or PLACES[0]
    if chosen not in PLACES:
        raise ConfigError(f"${PLACE_ENV} must be one of {', '.join(PLACES)}, not {chosen!r}")
    return chosen


def parse_size(text: str) -> int:
    """Bytes from ``20GB``, ``500MiB``, ``1.5TB`` or ``1000000``; ``ValueError`` for anything else
    (``20G`` too: decimal or binary is the user's to say)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    value = float(match.group(1)) * SIZE_UNITS.get(unit, 0) if match else math.nan
    if match is None or unit not in SIZE_UNITS or not value < 2**63:  # no disk is larger (nor is inf)
        raise ValueError(f"{text!r} is not a size (like 20GB, 500MiB or a number of bytes)")
    return int(value)


def cache_max() -> int | None:
    """$SA3LOADER_CACHE_MAX as bytes: the most the siblings an index names may take on disk;
    None when unset. A bad value is a ``ConfigError``."""
    raw = os.environ.get(CACHE_MAX_ENV, "").strip()
    if not raw:
        return None
    try:
        return parse_size(raw)
    except ValueError as exc:
        raise ConfigError(f"${CACHE_MAX_ENV}: {exc}") from None


def lock_timeout() -> float:
    """$SA3LOADER_LOCK_TIMEOUT seconds; not a finite number >= 0: one warning and the default."""
    raw = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not raw:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        warn_once(
            f"env:{LOCK_TIMEOUT_ENV}",
            "$%s=%r is not a number of seconds >= 0; using %.0f",
            LOCK_TIMEOUT_ENV,
            raw,
            DEFAULT_LOCK_TIMEOUT_S,
        )
        return DEFAULT_LOCK_TIMEOUT_S
    return value


RING_ENV = "SA3LOADER_RING"


def ring() -> tuple[int, int] | None:
    """$SA3LOADER_RING=SLOTSxMB (``4x64``): the staging ring's shape for transfers to a device,
    for tuning on unusual hardware; None: the shape this machine's cores call for. Not two
    positive numbers: one warning and the default."""
    raw = os.environ.get(RING_ENV, "").strip().lower()
    if not raw:
        return None
    slots, _, mb = raw.partition("x")
    if slots.isdigit() and mb.isdigit() and int(slots) > 0 and int(mb) > 0:
        return int(slots), int(mb) << 20
    warn_once(f"env:{RING_ENV}", "$%s=%r is not SLOTSxMB (like 4x64); using the default ring", RING_ENV, raw)
    return None


def pin() -> bool:
    """False when $SA3LOADER_PIN=0 (or false, no, off): stage in pageable memory, as where
    pinning is slow or limited (WSL, containers with a small memlock limit)."""
    return flag(PIN_ENV, default=True)


def progress() -> bool:
    """False when $SA3LOADER_PROGRESS=0 (or false, no, off) or $TQDM_DISABLE is set (bars show
    only on a terminal anyway)."""
    return flag(PROGRESS_ENV, default=True) and not os.environ.get("TQDM_DISABLE")


@dataclass(frozen=True)
class Settings:
    """Every setting one load uses, read once when it starts (arguments win over the environment)."""

    disabled: bool  # $SA3LOADER_DISABLE: upstream's own loader
    verify: bool  # full content check of the sibling before use
    io: IoMode | None  # when asked for; None: the default for the file
    lock_timeout: float  # seconds to wait for another process's conversion
    progress: bool  # bars allowed (still only on a terminal)
    shared_cache: bool  # a group- or world-writable cache dir is trusted on purpose
    pin: bool  # stage transfers to a device in pinned host memory
    ring: tuple[int, int] | None = None  # the staging ring's (slots, bytes per slot); None: the default
    place: str = PLACES[0]  # $SA3LOADER_PLACE: where new siblings go ("beside" where allowed, or "cache")
    cache_max: int | None = None  # $SA3LOADER_CACHE_MAX in bytes: the siblings' cap; None: no cap


def settings(*, io: str | None = None, verify: bool | None = None) -> Settings:
    """The settings now: the arguments given, else the environment, else the defaults."""
    return Settings(
        disabled=disabled(),
        verify=verify_asked(verify),
        io=io_mode(io),
        lock_timeout=lock_timeout(),
        progress=progress(),
        shared_cache=shared_cache(),
        pin=pin(),
        ring=ring(),
        place=place(),
        cache_max=cache_max(),
    )


def load_settings(*, io: str | None = None, verify: bool | None = None) -> Settings:
    """A load's settings: with $SA3LOADER_DISABLE=1 upstream's own loader uses none of the
    others, so none is read (a bad one cannot fail it); commands read them all (``settings``)."""
    if disabled():
        return Settings(
            disabled=True,
            verify=False,
            io=None,
            lock_timeout=DEFAULT_LOCK_TIMEOUT_S,
            progress=True,
            shared_cache=False,
            pin=True,
        )
    return settings(io=io, verify=verify)


_UNEXPANDED = re.compile(r"\$(\w+|\{[^}]*\})")


def env_path(name: str) -> str | None:
    """An absolute path from variable ``name``, ``~`` and ``$VARS`` expanded as shells do.

    None when unset or empty, and, with one warning, when it cannot be a path the
    user meant: a ``$VAR`` that is not set, a ``~user`` that does not exist, or
    a relative path (the XDG rule: relative paths are ignored).
    """
    raw = os.environ.get(name, "")
    if not raw.strip():
        return None
    value = os.path.expandvars(os.path.expanduser(raw))
    problem = None
    unexpanded = _UNEXPANDED.search(value)
    if unexpanded is not None:
        problem = f"{unexpanded.group(0)} is not set"
    elif value.startswith("~"):
        problem = f"{value.split(os.sep, 1)[0]} is not a user"
    elif not os.path.isabs(value):
        problem = "it is a relative path"
    if problem is not None:
        warn_once(f"env:{name}", "ignoring $%s=%r: %s", name, raw, problem)
        return None
    return os.path.normpath(value)

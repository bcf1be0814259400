"""Room for a sibling on the user's disk: the free-space rule, the cap ($SA3LOADER_CACHE_MAX),
and making room by removing the least recently used siblings (``Eviction``'s plans).

The disk is the user's: a sibling is a cache and never takes the space a job needs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from . import _config
from ._cli_output import human_size
from ._config import warn_once
from ._places import FREE_SPACE_MARGIN_BYTES, free_bytes, make_private_dirs, temp_files_of
from ._publication import wait_for_publishing
from ._records import LAST_USE_STEP_S, IndexRow, Plan
from ._trust import dir_writable, owned_file_problem
from .errors import Sa3LoaderError

if TYPE_CHECKING:  # the loader and the CLI hand them in: both are above this module
    from ._cache_admin import Eviction
    from ._sibling import SiblingFinder

logger = logging.getLogger(__name__)


def stray_incomplete(sibling_path: str) -> list[str]:
    """Temp files of earlier writers of ``sibling_path`` that are yours (another user's are not
    ours to judge). Call only while holding the lock: then no one is writing them."""
    return [path for path in temp_files_of(sibling_path) if owned_file_problem(path) is None]


def room_problem(
    path: str, needed: int, source_bytes: int, *, size: int | None = None, create_under: str | None = None
) -> str | None:
    """None when a sibling of ``size`` bytes (``needed`` of them new on disk: leftovers it
    replaces count as free) may be written at ``path``, else why not. Its folder is made where
    missing only under ``create_under`` while that is there (the cache dir); beside a checkpoint
    the caller makes it: never a folder the user removed.

    The disk is the user's: a sibling is a cache and never takes the space a job needs.
    Written only where, after it, another file as large as its source (the trainer's next
    checkpoint) still fits, with a margin.
    """
    directory = os.path.dirname(path)
    made = not os.path.isdir(directory)
    if made and (create_under is None or not os.path.isdir(create_under)):
        return f"{directory} is not there"
    try:
        make_private_dirs(directory)
    except OSError as exc:
        return f"cannot create {directory} ({exc.strerror})"
    if not dir_writable(directory):
        return f"{directory} is not writable"
    free = free_bytes(directory)
    if _shortfall(directory, needed, source_bytes) > 0:
        if made:  # no sibling comes: no empty folder left for it
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        sibling = human_size(needed if size is None else size)
        return (
            f"not enough free space in {directory} ({human_size(free)} free): a {sibling} sibling "
            f"would leave less than another {human_size(source_bytes)} checkpoint and "
            f"{FREE_SPACE_MARGIN_BYTES >> 20} MiB to spare"
        )
    return None


def _shortfall(directory: str, needed: int, source_bytes: int) -> int:
    """How many bytes more ``directory``'s filesystem needs free for the room rule to hold."""
    return needed + source_bytes + FREE_SPACE_MARGIN_BYTES - free_bytes(directory)


def keep_under_cap(f: SiblingFinder, evict: Eviction, size: int, targets: frozenset[str]) -> str | None:
    """Under $SA3LOADER_CACHE_MAX, remove the least recently used siblings so the new one
    fits; None when it does (or there is no cap), else why the load reads fp32."""
    cap = f.settings.cache_max
    if cap is None or not f.cache_trusted:  # an untrusted cache dir's index is not read at all
        return None
    over = f"${_config.CACHE_MAX_ENV} ({human_size(cap)})"
    new = f"the {human_size(size)} fp16 sibling"
    if size > cap:
        return f"{new} is larger than {over}"
    wait_for_publishing()  # what this process converted counts once its row is there
    try:
        plan = evict.over_cap(cap, adding=size, keep=targets)
    except (Sa3LoaderError, OSError) as exc:  # not counted, the cap would not hold: no new sibling
        return f"{over} cannot be applied ({exc}); `sa3loader cache repair` if the index is damaged"
    if plan is None:
        return f"{new} does not fit under {over}, even with older siblings removed"
    if plan.removals and f.index.read_only:
        return f"{new} does not fit under {over}, and the index is read-only"
    _evict(f, evict, lambda: plan, f"to stay under {human_size(cap)}")
    return None


def _evict(f: SiblingFinder, evict: Eviction, plan: Callable[[], Plan | None], why: str) -> bool:
    """Carry out an eviction plan of this cache dir (never one of a read-only or untrusted
    index); True when it removed something."""
    if not f.cache_trusted or f.index.read_only:
        return False
    try:
        planned = plan()
        done = evict.carry_out(planned) if planned is not None else None
    except (Sa3LoaderError, OSError) as exc:
        warn_once("evict:" + f.cache_dir, "sa3loader cannot remove old siblings %s: %s", why, exc)
        return False
    if done is None:
        return False
    for step in done.removed:
        if step.kind == "sibling":
            logger.info(
                "removed the least recently used sibling %s (%s) %s", step.path, human_size(step.bytes), why
            )
    return any(step.kind == "sibling" for step in done.removed)


def room_for(
    f: SiblingFinder,
    evict: Eviction,
    target: str,
    size: int,
    keep: frozenset[str],
    *,
    create_under: str | None,
) -> str | None:
    """``room_problem`` at ``target``, after removing the least recently used siblings on its
    filesystem where short of space (before any fallback). Earlier writers' leftovers of ``target``
    count as free: under the lock they go (or are published for this load) before a byte is written."""
    new = size - sum(_disk_bytes(path) for path in stray_incomplete(target))
    room = functools.partial(
        room_problem, target, new, f.source.file_size, size=size, create_under=create_under
    )
    problem = room()
    directory = os.path.dirname(target)
    if problem is None or not os.path.isdir(directory):
        return problem
    needed = _shortfall(directory, new, f.source.file_size)
    plan = functools.partial(evict.for_room, directory, needed, keep, time.time() - LAST_USE_STEP_S)
    if needed > 0 and _evict(f, evict, plan, "to make room"):
        return room()
    return problem


def _disk_bytes(path: str) -> int:
    """What removing ``path`` frees: nothing while another name links it (no fallocate to check)."""
    with contextlib.suppress(OSError):
        return st.st_blocks * 512 if (st := os.lstat(path)).st_nlink == 1 else 0
    return 0


def room_left(directory: str, source_bytes: int) -> str | None:
    """The room rule again once the new sibling's bytes are taken (``room_problem`` before)."""
    if _shortfall(directory, 0, source_bytes) <= 0:
        return None
    return (
        f"not enough free space in {directory} once its bytes were taken ({human_size(free_bytes(directory))}"
        f" free; another load converting there?): less than another {human_size(source_bytes)} checkpoint"
        f" and {FREE_SPACE_MARGIN_BYTES >> 20} MiB to spare would be left"
    )


def cap_again(f: SiblingFinder, evict: Eviction, row: IndexRow) -> None:
    """Under $SA3LOADER_CACHE_MAX once ``row`` is in: loads converting at once each made room
    for their own sibling alone, so together they may be over it; the least recently used
    others go (never this one)."""
    cap = f.settings.cache_max
    if cap is None or not f.cache_trusted:
        return
    try:
        plan = evict.over_cap(cap, adding=row.sibling_size, keep=frozenset({row.sibling_path}))
        done = evict.carry_out(plan) if plan is not None and plan.removals else None
    except (Sa3LoaderError, OSError) as exc:
        warn_once("cap:" + f.cache_dir, "sa3loader cannot apply $%s: %s", _config.CACHE_MAX_ENV, exc)
        return
    for step in done.removed if done is not None else ():
        if step.kind == "sibling":
            logger.info("removed the least recently used sibling %s to stay under the cap", step.path)

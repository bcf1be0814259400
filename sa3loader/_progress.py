"""Progress bars for long work: in bytes, only on a terminal, only when the settings allow one."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def progress_enabled(allowed: bool) -> bool:
    """A bar only on a terminal, and only when the settings allow it."""
    return allowed and sys.stderr.isatty()


class NoBar:
    """What a hidden bar is: tqdm, even disabled, starts its monitor thread (and warns where no
    thread can be had: a pids limit)."""

    def __enter__(self) -> NoBar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        pass


def byte_bar(desc: str, total: int, enabled: bool) -> tqdm[Any] | NoBar:
    """A progress bar in bytes, shown only when enabled and for work long enough to watch."""
    if not enabled or total < PROGRESS_MIN_BYTES:
        return NoBar()
    return tqdm(total=total, unit="B", unit_scale=True, desc=desc)

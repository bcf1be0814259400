"""Progress bars for long work: in bytes, only on a terminal, only when the settings allow one."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm

PROGRESS_MIN_BYTES = 256 * 1024 * 1024


def progress_enabled(allowed: bool) -> bool:
    """A bar only on a terminal, and only when the settings allow it."""
    return allowed and sys.stderr.isatty()


def byte_bar(desc: str, total: int, enabled: bool) -> tqdm[Any]:
    """A progress bar in bytes, shown only when enabled and for work long enough to watch."""
    return tqdm(
        total=total, unit="B", unit_scale=True, desc=desc, disable=not enabled or total < PROGRESS_MIN_BYTES
    )

"""The sibling a load would read, found or made now, wired as the loader wires it."""

from __future__ import annotations

from sa3loader import _config
from sa3loader._cache_admin import Eviction
from sa3loader._format import Header
from sa3loader._resolver import resolve_sibling as _resolve_sibling
from sa3loader._sibling import SiblingFinder, SiblingOutcome


def resolve_sibling(header: Header, cache_dir: str, *, verify: bool = False) -> SiblingOutcome:
    finder = SiblingFinder(header, cache_dir, _config.settings(verify=verify))
    return _resolve_sibling(finder, Eviction(cache_dir))

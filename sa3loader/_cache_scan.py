"""Find sa3loader siblings on disk whether or not an index knows them (``cache scan``): after
``rm -rf`` of the cache dir, the siblings beside checkpoints are still found, each with the
checkpoint it belongs to and whether it still matches it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ._format import open_header
from ._identity import holds_fp16_of, marked_by_sa3loader, sibling_matches_source
from ._places import (
    BESIDE_SUBDIR,
    INCOMPLETE_INFIX,
    SAFETENSORS_SUFFIX,
    SHORTENED_SUFFIXES,
    SIBLING_SUFFIX,
    SIBLING_SUFFIXES,
    SIBLINGS_SUBDIR,
    UNSUFFIXED_SIBLING_SUFFIX,
    canonical_path,
    is_temp_name,
    sibling_name,
)
from ._records import DAMAGED, MISSING_SOURCE, OK, STALE
from .errors import CheckpointNotFoundError, Sa3LoaderError

UNKNOWN_SOURCE = "unknown source"  # a sibling in a cache dir no row names: `cache clear` removes it
TEMP_FILE = "temp file"  # a conversion's, being written or left by a killed one; its checkpoint there


@dataclass
class Found:
    """A sibling ``scan`` found on disk, whether or not an index knows it."""

    sibling: str
    bytes: int
    source: str  # the checkpoint beside it it was made from, or a row's, or the one its name says
    status: str  # OK: made from the source as it is now, its data too at the spots; DAMAGED; STALE; ...
    indexed: bool  # a row of this cache dir names it


def scan(directories: list[str], rows: dict[str, str], unreadable: list[OSError]) -> list[Found]:
    """Every sa3loader sibling under ``directories`` (its name a sibling's, its marker in its
    header), with the checkpoint it belongs to: the file beside it whose sibling it is named
    as, else the one ``rows`` (an index's sibling -> source) names, else the one its name says.
    Each folder that could not be read is added to ``unreadable`` (what is under it is not seen).
    A file found twice (overlapping directories, a link to one) is listed once."""
    found: list[Found] = []
    listed: set[str] = set()
    for directory in map(os.path.abspath, directories):  # rows name absolute paths
        if not os.path.isdir(directory):
            raise CheckpointNotFoundError(f"no such directory: {directory}", filename=directory)
        for root, dirs, files in os.walk(directory, onerror=unreadable.append):
            dirs.sort()
            # In a checkpoint folder's hidden .cache/sa3loader, the checkpoints are two levels up.
            hidden = root.endswith(os.sep + BESIDE_SUBDIR)
            folder = os.path.dirname(os.path.dirname(root)) if hidden else root
            names = set(os.listdir(folder)) if hidden else set(files)
            for name in sorted(files):
                path = os.path.join(root, name)
                temp = is_temp_name(name)  # found too: GBs a killed conversion may leave
                sibling = name.rpartition(INCOMPLETE_INFIX)[0] if temp else name
                seen = canonical_path(path)  # a dir given twice, or through a link to it: once
                if not sibling.endswith(SIBLING_SUFFIXES) or seen in listed or not marked_by_sa3loader(path):
                    continue
                listed.add(seen)
                row = None if temp else rows.get(path)
                source = _source_beside(folder, sibling, names) or row
                if source is None and os.path.basename(os.path.dirname(root)) == SIBLINGS_SUBDIR:
                    # In a cache dir, with no row: its name says nothing of its checkpoint's folder.
                    found.append(Found(path, _size(path), "", UNKNOWN_SOURCE, False))
                    continue
                source = source or _named_source(folder, sibling)
                status = (
                    _scanned_status(path, source) if not temp or not os.path.exists(source) else TEMP_FILE
                )
                found.append(Found(path, _size(path), source, status, row is not None))
    return found


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except OSError:
        return 0  # removed while the scan ran


def _source_beside(directory: str, sibling: str, names: set[str]) -> str | None:
    for name in sorted(names):
        if name != sibling and sibling_name(name) == sibling:
            return os.path.join(directory, name)
    return None


def _named_source(directory: str, sibling: str) -> str:
    """The checkpoint a sibling's name says it was made from (``cache rm`` of it finds the
    sibling); of a shortened name only the start is known: ``<start>…``."""
    for shortened in SHORTENED_SUFFIXES.values():
        if sibling.endswith(shortened):
            return os.path.join(directory, sibling[: -len(shortened)].rpartition("-")[0] + "…")
    if sibling.endswith(SIBLING_SUFFIX):
        return os.path.join(directory, sibling[: -len(SIBLING_SUFFIX)] + SAFETENSORS_SUFFIX)
    return os.path.join(directory, sibling[: -len(UNSUFFIXED_SIBLING_SUFFIX)])


def _scanned_status(sibling: str, source: str) -> str:
    if not os.path.exists(source):
        return MISSING_SOURCE
    try:
        with open_header(source) as current, open_header(sibling, follow_symlinks=False) as made:
            if not sibling_matches_source(made, current):
                return STALE
            # Its header says it is; its data at the fingerprint's spots, as a load reads it
            # where no row vouches, says whether it still holds fp16 of the source.
            return OK if holds_fp16_of(made, current) else DAMAGED
    except (Sa3LoaderError, OSError):
        return STALE

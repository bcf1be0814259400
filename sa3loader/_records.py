"""The records sa3loader keeps and compares, one definition each: who a source is
(``SourceIdentity``), what a sibling says about its source (``SiblingClaim``), an index row
(``IndexRow``), read and written as JSON only and checked against its shape before any field
is used, what a conversion wrote (``ConversionResult``), and what the cache commands list,
plan and did (``Entry``, ``Removal``, ``Plan``, ``Outcome``). Pure: no I/O.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass, field
from typing import Any, cast

# How far apart two records of a sibling's last use are: a cap needs hours, not seconds.
LAST_USE_STEP_S = 3600.0
MAX_TIME = 2**33  # seconds: the year 2242
# What a row (or a sibling found on disk) says of its files now, as the cache commands report it.
OK, STALE, MISSING_SOURCE, MISSING_SIBLING = "ok", "stale", "missing source", "missing sibling"
DAMAGED = "damaged sibling"  # unreadable, not the file indexed, or not fp16 of its source at a spot
CONTENT_CHECK_FAILED = "content check failed for"  # a load's event: a sibling replaced
UNTRUSTED = "untrusted sibling"  # another user's, where a load may not take its weights (``_trust``)
UNREADABLE_SOURCE = "unreadable source"  # there, not readable by you now: neither gone nor changed

SCHEMA_VERSION = 1
FORMAT_VERSION = "1"
META_PREFIX = "sa3loader."
MARKER_KEY = META_PREFIX + "format_version"


@dataclass(frozen=True)
class SourceIdentity:
    """The file behind a header, as its stat and header said when it was opened."""

    size: int
    mtime_ns: int
    header_sha256: str
    inode: int
    device: int
    ctime_ns: int
    blob: str | None = None  # the hub blob's content hash, when the file is one

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> SourceIdentity:
        """From an index row's ``source`` (its shape checked by the index)."""
        return cls(
            obj["size"],
            obj["mtime_ns"],
            obj["header_sha256"],
            obj["inode"],
            obj["device"],
            obj["ctime_ns"],
            obj.get("blob"),
        )


@dataclass(frozen=True)
class SiblingClaim:
    """What a sibling's metadata says about the source it was made from."""

    size: int
    mtime_ns: int
    header_sha256: str
    fingerprint: str

    @classmethod
    def of(cls, meta: dict[str, str]) -> SiblingClaim | None:
        """From a sibling's ``__metadata__``; None when it does not say all of it."""
        try:
            return cls(
                int(meta[META_PREFIX + "source_size"]),
                int(meta[META_PREFIX + "source_mtime_ns"]),
                meta[META_PREFIX + "source_header_sha256"],
                meta[META_PREFIX + "source_fingerprint"],
            )
        except (KeyError, ValueError):
            return None


_INT = "int"
_COUNT = "count"  # a size, a number of values: never below zero
_NUMBER = "number"
_OPTIONAL = "optional"
_IDENTITY_SHAPE = {
    "size": _COUNT,
    "mtime_ns": _INT,
    "header_sha256": str,
    "inode": _INT,
    "device": _INT,
    "ctime_ns": _INT,
}
# What every use of a row reads; extra keys are allowed (newer writers).
ROW_SHAPE: dict[str, Any] = {
    "schema": _INT,
    "source": {**_IDENTITY_SHAPE, "path": str, "real_path": str},
    "fingerprint": str,
    "sibling": {"path": str, "size": _COUNT, "header_sha256": str},
    "converter_version": str,
    "created": _NUMBER,
    "range": (_OPTIONAL, {"overflow_to_inf": _COUNT, "flushed_to_zero": _COUNT}),
}


def _matches(value: Any, shape: Any) -> bool:
    if isinstance(shape, tuple):  # (_OPTIONAL, shape)
        return value is None or _matches(value, shape[1])
    if isinstance(shape, dict):
        return isinstance(value, dict) and all(k in value and _matches(value[k], v) for k, v in shape.items())
    if shape == _INT:  # any 64-bit field, signed or not (st_ino: overlayfs sets bit 63; st_mtime_ns
        return type(value) is int and -(1 << 64) < value < 1 << 64  # past 2262), never 10**400
    if shape == _COUNT:
        return type(value) is int and 0 <= value < 1 << 64
    if shape == _NUMBER:
        return _a_time(value)
    if shape is str:  # no file name holds a NUL, or a character the OS cannot be given
        return type(value) is str and "\x00" not in value and _encodable(value)
    return type(value) is shape


def _encodable(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeError:  # a lone surrogate: os.open and print raised UnicodeEncodeError
        return False
    return True


def _a_time(value: Any) -> bool:
    """A timestamp any clock and ``time.localtime`` can hold (a planted 1e300 or NaN is not)."""
    return type(value) in (int, float) and 0 <= value < MAX_TIME


def valid_row(row: Any) -> bool:
    """Whether ``row`` has every field sa3loader reads, with the right types and schema."""
    return _matches(row, ROW_SHAPE) and row["schema"] == SCHEMA_VERSION


@dataclass(frozen=True)
class ConversionResult:
    """What writing a sibling did: its name, size and header, and the range report's counts."""

    path: str
    size: int
    header_sha256: str
    overflow_to_inf: int
    flushed_to_zero: int
    seconds: float


INVALID = "invalid"  # a row of the wrong shape: treated as absent by loads


@dataclass
class Entry:
    source: str
    sibling: str
    source_size: int
    sibling_size: int
    created: float
    status: str
    key: str = field(default="", repr=False)  # the index key (the source's real path)
    last_used: float = 0.0  # when a load last used the sibling (to the hour), or made it


@dataclass
class Removal:
    """A file or empty dir a cache command removes (or, in a dry run, would remove)."""

    path: str
    bytes: int
    kind: str  # "sibling", "temp file", "lock file", "empty dir"
    # The sibling whose conversion lock guards this step ("" for dirs).
    guard: str = field(default="", repr=False)
    # A sibling's (device, inode, size, mtime) when planned: another file there since is kept.
    identity: tuple[int, int, int, int] | None = field(default=None, repr=False)


@dataclass
class Plan:
    """What ``prune`` or ``clear`` will do: rows to drop, then files and dirs to remove, in order."""

    rows: list[Entry]
    removals: list[Removal]
    kept: list[tuple[Removal, str]] = field(default_factory=list)  # not removed, with why
    unmatched: list[str] = field(default_factory=list)  # names with no row, sibling or its temp file


@dataclass
class Outcome:
    """What executing a plan did: every step done, and every step kept with why."""

    rows: list[Entry]
    removed: list[Removal]
    kept: list[tuple[Removal, str]]


@dataclass(frozen=True)
class RangeReport:
    """What a conversion counted: finite values fp16 made inf, nonzero values it made 0."""

    overflow_to_inf: int
    flushed_to_zero: int


def _range_of(counted: dict[str, Any] | None) -> RangeReport | None:
    """The row's ``range``, its keys sa3loader reads alone (a newer writer's more are allowed)."""
    if counted is None:
        return None
    return RangeReport(overflow_to_inf=counted["overflow_to_inf"], flushed_to_zero=counted["flushed_to_zero"])


@dataclass(frozen=True)
class IndexRow:
    """One index row, keyed by the source's real path: the source as it was when it was last
    checked, and the sibling made from it. One definition, read and written as JSON only."""

    source: SourceIdentity
    source_path: str  # as the load was given it
    real_path: str
    fingerprint: str
    checked_ns: int | None  # when the source's identity was taken (``_identity.racy``)
    sibling_path: str
    sibling_size: int
    sibling_header_sha256: str
    created: float
    range: RangeReport | None
    converter_version: str = FORMAT_VERSION
    last_used: float | None = None  # when a load last used the sibling (hours apart); None: never since made
    # The sibling file indexed (``sibling_file``): another is not vouched for (None: an older row).
    sibling_file: SiblingFile | None = None

    def used(self) -> float:
        """When the sibling was last used, as far as the row knows (made counts as a use)."""
        return self.last_used if self.last_used is not None else self.created

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA_VERSION,
            "source": {**self.source.to_json(), "path": self.source_path, "real_path": self.real_path},
            "fingerprint": self.fingerprint,
            "checked_ns": self.checked_ns,
            "sibling": {
                "path": self.sibling_path,
                "size": self.sibling_size,
                "header_sha256": self.sibling_header_sha256,
                **dict(zip(SIBLING_FILE_FIELDS, self.sibling_file or (), strict=False)),
            },
            "converter_version": self.converter_version,
            "created": self.created,
            "range": dataclasses.asdict(self.range) if self.range is not None else None,
            "last_used": self.last_used,
        }

    @classmethod
    def from_json(cls, obj: Any) -> IndexRow | None:
        """The row ``obj`` holds, or None when it is not a valid row (of another shape or schema)."""
        if not valid_row(obj):
            return None
        source, sibling, checked = obj["source"], obj["sibling"], obj.get("checked_ns")
        used = obj.get("last_used")  # absent from rows older versions wrote
        return cls(
            source=SourceIdentity.from_json(source),
            source_path=source["path"],
            real_path=source["real_path"],
            fingerprint=obj["fingerprint"],
            checked_ns=checked if type(checked) is int else None,
            sibling_path=sibling["path"],
            sibling_size=sibling["size"],
            sibling_header_sha256=sibling["header_sha256"],
            created=obj["created"],
            range=_range_of(obj["range"]),
            converter_version=obj["converter_version"],
            last_used=float(used) if _a_time(used) else None,
            sibling_file=_sibling_file_of(sibling),
        )


SIBLING_FILE_FIELDS = ("device", "inode", "mtime_ns", "ctime_ns")
SiblingFile = tuple[int, int, int, int]


def sibling_file(stat: os.stat_result) -> SiblingFile:
    """What tells the sibling file indexed from another put at its name, or edited in place:
    its device, inode, mtime and ctime (an edit with its mtime put back moves the ctime, which
    no one sets; so do a chmod and the rename that publishes it: rows are written after both)."""
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)


def _sibling_file_of(sibling: dict[str, Any]) -> SiblingFile | None:
    fields = tuple(sibling.get(name) for name in SIBLING_FILE_FIELDS)  # absent from older rows
    if all(type(field) is int for field in fields):
        return cast("SiblingFile", fields)
    return None

"""The safetensors file: open it once, read and validate its header, lay out a new one.

One descriptor per file, opened once (never through a symlink where asked, never blocking on
a FIFO, every failure a typed error naming the file), its stat taken then, and positioned
reads of exactly the bytes asked for (``preadv_exact``, which header, tensor and conversion
reads share). Never a mapping of the user's checkpoint: a file truncated under one kills the
reader with SIGBUS. No torch here: parsing is pure Python over bytes. Every check that
safetensors itself makes is made here too, so that a hostile header fails with a
:class:`HeaderError` naming the file before anything is allocated from the numbers it claims.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import itertools
import json
import math
import operator
import os
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from . import _faults, _json_rules
from .errors import (
    CheckpointChangedError,
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    FileAccessError,
    HeaderError,
    TruncatedFileError,
)

HEADER_LENGTH_BYTES = 8
# safetensors refuses headers above 100 MB; so do we, before reading them.
MAX_HEADER_BYTES = 100_000_000
# save_file pads the JSON header with spaces to this alignment.
HEADER_ALIGNMENT = 8
METADATA_KEY = "__metadata__"

# Bits per element of every safetensors dtype that torch can hold (F6_* has no torch dtype).
DTYPE_BITS: dict[str, int] = {
    "F4": 4,
    **dict.fromkeys("BOOL U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ".split(), 8),
    **dict.fromkeys("I16 U16 F16 BF16".split(), 16),
    **dict.fromkeys("I32 U32 F32".split(), 32),
    **dict.fromkeys("C64 F64 I64 U64".split(), 64),
}
# torch packs F4 two to a byte (float4_e2m1fn_x2): its last dimension is half the header's.
PACKED_PAIRS = {"F4"}


# preadv takes at most this many buffers per call.
_IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024


def open_for_reading(path: str, *, follow_symlinks: bool = True, kind: str = "checkpoint") -> int:
    """A read-only descriptor of the regular file at ``path``; every failure is a typed error.

    Opened non-blocking, so a FIFO planted at the name never hangs the caller
    (it is refused as not a regular file). ``follow_symlinks=False`` refuses a
    symlink at the name: for files sa3loader names itself (siblings), never the user's.
    ``kind`` names the file in messages (a checkpoint, a model config).
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow_symlinks else os.O_NOFOLLOW)
    directory = f"{path}: is a directory, not a {'.safetensors' if kind == 'checkpoint' else kind} file"
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(
            f"{path}: no such {kind} file", filename=path, errno=errno.ENOENT
        ) from exc
    except IsADirectoryError as exc:
        raise CheckpointIsADirectoryError(directory, filename=path, errno=errno.EISDIR) from exc
    except PermissionError as exc:
        raise CheckpointPermissionError(
            f"{path}: permission denied ({exc.strerror})", filename=path, errno=exc.errno
        ) from exc
    except OSError as exc:
        raise FileAccessError(
            f"{path}: cannot open ({exc.strerror})", filename=path, errno=exc.errno
        ) from exc
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise CheckpointIsADirectoryError(directory, filename=path, errno=errno.EISDIR)
        if not stat.S_ISREG(mode):
            raise FileAccessError(
                f"{path}: not a regular file (a FIFO, socket or device)", filename=path, errno=errno.EINVAL
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class FileHandle:
    """One open descriptor of a file, and what ``fstat`` said when it was opened.

    Every read of a load goes through the descriptor whose header was parsed,
    so a checkpoint replaced by path meanwhile (``os.replace``, ``cp`` to a new
    inode) is never mixed into the load; ``changed()`` tells whether the file
    itself was rewritten in place since.
    """

    def __init__(self, path: str, *, follow_symlinks: bool = True, fd: int | None = None) -> None:
        """``fd``: a descriptor already open (of a regular file), which the handle then owns."""
        self.path = path
        # Taken before the open: a write after it is seen as a change (see ``racy``).
        self.opened_ns = time.time_ns()
        self._fd: int | None = open_for_reading(path, follow_symlinks=follow_symlinks) if fd is None else fd
        self.stat = os.fstat(self._fd)

    def fileno(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: the file was closed")
        return self._fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def changed(self) -> bool:
        """Whether the file may have been written since it was opened: its size or mtime moved, or
        its ctime did (a rewrite that sets the mtime back), unless it has no name left: a new file
        renamed over its only name (a republish) or its removal moves the ctime too, and what
        nothing can open anew is written by no one who did not have it open already. A link
        added or one of two taken away moves it as well, and may hide a rewrite: a change."""
        now = os.fstat(self.fileno())
        if (now.st_size, now.st_mtime_ns) != (self.stat.st_size, self.stat.st_mtime_ns):
            return True
        return now.st_ctime_ns != self.stat.st_ctime_ns and not now.st_nlink < 1 <= self.stat.st_nlink


def read_exact(fd: int, offset: int, length: int, path: str) -> bytearray:
    """Exactly ``length`` bytes at ``offset``, or ``TruncatedFileError``."""
    data = bytearray(length)
    preadv_exact(fd, [memoryview(data)], offset, path)
    return data


def preadv_exact(fd: int, views: list[memoryview], offset: int, path: str) -> None:
    """Fill every view from ``offset`` on, across short reads and the iovec limit.

    A file that ends first raises ``TruncatedFileError`` (a ``HeaderError`` and an ``EOFError``).
    """
    views = [v for v in views if len(v)]
    while views:
        batch = views[: _faults.tuned("iov_max", _IOV_MAX)]
        try:
            if hasattr(os, "preadv"):
                got = os.preadv(fd, batch, offset)
            else:  # Python builds for macOS before 11 have pread but not preadv
                got = _pread_into(fd, batch[0], offset)
        except OSError as exc:
            raise FileAccessError(
                f"{path}: read failed at byte {offset} ({exc.strerror})", filename=path, errno=exc.errno
            ) from exc
        if got == 0:
            raise TruncatedFileError(f"{path}: file ends early (truncated at byte {offset})", filename=path)
        offset += got
        while got:
            if got >= len(views[0]):
                got -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][got:]
                got = 0


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    data = os.pread(fd, len(view), offset)
    view[: len(data)] = data
    return len(data)


def pieces_of(offset: int, nbytes: int, piece_bytes: int) -> Iterator[tuple[int, int]]:
    """(file offset, bytes) of the pieces of ``nbytes`` at ``offset``, at most ``piece_bytes`` each."""
    end = offset + nbytes
    while offset < end:
        yield offset, min(piece_bytes, end - offset)
        offset += piece_bytes


def data_bytes(dtype: str, shape: tuple[int, ...] | list[int]) -> int:
    return math.prod(shape) * DTYPE_BITS[dtype] // 8


# safetensors' Rust ``Dtype`` enum order: ``save_file`` sorts tensors by it, largest first, then by name.
DTYPE_RANK: dict[str, int] = {
    name: rank
    for rank, name in enumerate(
        "BOOL F4 F6_E2M3 F6_E3M2 U8 I8 F8_E5M2 F8_E4M3 F8_E8M0 F8_E4M3FNUZ F8_E5M2FNUZ "
        "I16 U16 F16 BF16 I32 U32 F32 C64 F64 I64 U64".split()
    )
}


@dataclass(frozen=True, slots=True)  # no per-entry __dict__: headers can hold millions
class TensorEntry:
    """One tensor of a header; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        """Elements of the torch tensor (``torch_shape``)."""
        return math.prod(self.torch_shape)

    @property
    def torch_shape(self) -> tuple[int, ...]:
        if self.dtype in PACKED_PAIRS:
            return (*self.shape[:-1], self.shape[-1] // 2)
        return self.shape


@dataclass(frozen=True)
class Header:
    """A validated safetensors header.

    ``entries`` are in data-offset order, which is the order in which
    ``safetensors.torch.load_file`` returns tensors (and so the order in which
    upstream's ``remap_state_dict_keys`` sees them).
    """

    path: str
    file_size: int
    header_size: int
    entries: tuple[TensorEntry, ...]
    metadata: dict[str, str]
    sha256: str
    by_name: dict[str, TensorEntry] = field(repr=False, compare=False)
    # The open file the header was parsed from (``open_header``); None once only the numbers matter.
    handle: FileHandle | None = field(default=None, repr=False, compare=False)

    def __enter__(self) -> Header:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()

    @property
    def data_start(self) -> int:
        return HEADER_LENGTH_BYTES + self.header_size

    def subset(self, prefix: str) -> Header:
        """The tensors under ``prefix``, renamed without it (same file, same offsets)."""
        entries = tuple(
            dataclasses.replace(e, name=e.name[len(prefix) :])
            for e in self.entries
            if e.name.startswith(prefix)
        )
        return dataclasses.replace(self, entries=entries, by_name={e.name: e for e in entries})


_ZIP_MAGIC = b"PK\x03\x04"
_PICKLE_MAGIC = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))


def _guess_format(first: bytes) -> str:
    """What the first bytes say a file that is not safetensors is, for the error message.

    Only words: a file is refused by the format's own rules (``_parse_file``), never by
    these bytes. A valid header of 640, 896, 1152 or 1408 bytes (mod 65536) starts
    with a pickle's magic too.
    """
    if first.startswith(_ZIP_MAGIC):
        return " (it is a zip archive: a PyTorch .pt/.ckpt checkpoint? Convert it to safetensors first)"
    if first.startswith(_PICKLE_MAGIC):
        return " (it is a pickle: a PyTorch checkpoint? Convert it to safetensors first)"
    if all(32 <= b < 127 or b in b"\t\r\n" for b in first):
        return " (it starts with text)"
    return ""


def open_header(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Header:
    """Open the safetensors file at ``path`` and parse its header; the header owns the descriptor.

    Use it as a context manager (``with open_header(p) as header:``): the
    descriptor closes at the end, and every read of ``header``'s tensors until
    then goes through it (``reading``).
    """
    handle = FileHandle(os.fspath(path), follow_symlinks=follow_symlinks)
    try:
        return header_of(handle)
    except BaseException:
        handle.close()
        raise


def header_of(handle: FileHandle) -> Header:
    """Parse the header of ``handle``'s file; the header owns the handle (the caller closes it on error)."""
    header = _parse_file(handle.fileno(), handle.path, handle.stat.st_size)
    return dataclasses.replace(header, handle=handle)


def read_header(path: str | os.PathLike[str], *, follow_symlinks: bool = True) -> Header:
    """Parse the header of the file at ``path``; nothing stays open (for inspection, not loads)."""
    with open_header(path, follow_symlinks=follow_symlinks) as header:
        return dataclasses.replace(header, handle=None)


def check_unchanged(header: Header) -> None:
    """``CheckpointChangedError`` when ``header``'s open file was rewritten in place since it was
    opened: its size or mtime moved, or its header bytes differ. Reads through it may mix versions."""
    handle = header.handle
    if handle is None:
        return
    prefix = read_exact(handle.fileno(), 0, header.data_start, header.path) if not handle.changed() else None
    if prefix is not None and hashlib.sha256(prefix[HEADER_LENGTH_BYTES:]).hexdigest() == header.sha256:
        return
    raise CheckpointChangedError(
        f"{header.path}: the checkpoint was rewritten while it was being read; "
        "load it again once it is written",
        filename=header.path,
    )


@contextlib.contextmanager
def reading(header: Header) -> Iterator[int]:
    """A descriptor of ``header``'s file: the one it was parsed from when it is open, else opened now."""
    if header.handle is not None:
        yield header.handle.fileno()
        return
    fd = open_for_reading(header.path)
    try:
        yield fd
    finally:
        os.close(fd)


def _parse_file(fd: int, path: str, file_size: int) -> Header:
    if file_size < HEADER_LENGTH_BYTES:
        raise HeaderError(f"{path}: {file_size} bytes is too small to be a safetensors file", filename=path)
    length_field = read_exact(fd, 0, HEADER_LENGTH_BYTES, path)
    (header_size,) = struct.unpack("<Q", length_field)
    guess = _guess_format(bytes(length_field))
    if header_size > file_size - HEADER_LENGTH_BYTES:
        # A header's first byte, and a length safetensors would read: cut off inside its header.
        # (The words and the type only: refused either way, a TruncatedFileError is a HeaderError.)
        cut = file_size > HEADER_LENGTH_BYTES and header_size <= MAX_HEADER_BYTES
        if cut and read_exact(fd, HEADER_LENGTH_BYTES, 1, path) == b"{":
            raise TruncatedFileError(f"{path}: file ends inside its {header_size}-byte header", filename=path)
        raise HeaderError(f"{path}: not a safetensors file{guess}", filename=path)
    if header_size > MAX_HEADER_BYTES:  # the file has the bytes; safetensors would not read them
        raise HeaderError(
            f"{path}: header of {header_size} bytes is above the {MAX_HEADER_BYTES}-byte limit "
            "safetensors reads",
            filename=path,
        )
    raw = read_exact(fd, HEADER_LENGTH_BYTES, header_size, path)
    try:
        return parse_header(raw, path=path, file_size=file_size)
    except HeaderError as exc:
        if not guess:
            raise
        raise HeaderError(f"{exc}{guess}", filename=path) from None


def parse_header(raw: bytes | bytearray, *, path: str, file_size: int) -> Header:
    """Validate header bytes against the file size; pure, no I/O."""
    try:
        obj = _json_rules.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError(f"{path}: header is not valid JSON ({exc})", filename=path) from None
    if not isinstance(obj, dict):
        raise HeaderError(f"{path}: header is a JSON {type(obj).__name__}, not an object", filename=path)
    metadata = obj.pop(METADATA_KEY, None)
    metadata = {} if metadata is None else metadata  # null, as safetensors takes it; [] or "" not
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise HeaderError(f"{path}: __metadata__ must map strings to strings", filename=path)
    # JSON allows escaped lone surrogates; safetensors' parser (serde) refuses them.
    for text in [*obj, *metadata, *metadata.values()]:
        if not _json_rules.encodable(text):
            raise HeaderError(f"{path}: header string {text!r} is not valid Unicode", filename=path)

    entries = []
    while obj:  # popped one by one, so each parsed JSON entry is freed as its TensorEntry is made
        name, info = obj.popitem()
        entries.append(_parse_entry(name, info, path))
    entries.sort(key=lambda e: (e.begin, e.end, e.name))
    data_size = file_size - HEADER_LENGTH_BYTES - len(raw)
    position = 0
    for entry in entries:
        if entry.begin != position:
            raise HeaderError(
                f"{path}: tensor {entry.name!r} starts at {entry.begin}, expected {position} "
                "(offsets overlap or leave a gap)",
                filename=path,
            )
        position = entry.end
    if position != data_size:  # short: cut off (an EOFError too); long: bytes no tensor holds
        error = TruncatedFileError if position > data_size else HeaderError
        what = "truncated" if position > data_size else "padded"
        message = f"{path}: tensors need {position} data bytes but the file holds {data_size} ({what} file)"
        raise error(message, filename=path)
    return Header(
        path=path,
        file_size=file_size,
        header_size=len(raw),
        entries=tuple(entries),
        metadata=metadata,
        sha256=hashlib.sha256(raw).hexdigest(),
        by_name={e.name: e for e in entries},
    )


DIM_LIMIT, COUNT_LIMIT = 1 << 63, 1 << 64  # torch's int64 dimension; safetensors' 64-bit count
ENTRY_FIELDS = frozenset({"dtype", "shape", "data_offsets"})


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(name: str, info: Any, path: str) -> TensorEntry:
    """One tensor's entry, checked as safetensors does (a load parses two headers of ~1,000 each)."""
    # Other fields are ignored, as safetensors' parser ignores them (upstream loads such a file),
    # once read as it reads them: the root and the entry are 2 levels of nesting.
    if not isinstance(info, dict) or not info.keys() >= ENTRY_FIELDS:
        raise _entry_error(path, name, "entry must have dtype, shape and data_offsets")
    extra = [(k, v) for k, v in info.items() if k not in ENTRY_FIELDS]
    if not all(_json_rules.encodable(k) and _json_rules.within_limits(v, 2) for k, v in extra):
        raise _entry_error(path, name, "a field holds what safetensors' parser refuses")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in DTYPE_BITS:
        raise _entry_error(path, name, f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < DIM_LIMIT for d in shape):
        raise _entry_error(path, name, "shape must be a list of integers 0 <= n < 2**63")
    # Its product, left to right, must not overflow even before a 0 makes it 0 (safetensors').
    if not all(count < COUNT_LIMIT for count in itertools.accumulate(shape, operator.mul)):
        raise _entry_error(path, name, f"shape {shape} overflows 64 bits")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _entry_error(path, name, "data_offsets must be two integers 0 <= begin <= end")
    if (math.prod(shape) * DTYPE_BITS[dtype]) % 8 or (dtype in PACKED_PAIRS and (not shape or shape[-1] % 2)):
        raise _entry_error(path, name, f"{dtype} x {shape} does not fill whole bytes")
    if (got := offsets[1] - offsets[0]) != (expected := data_bytes(dtype, shape)):
        raise _entry_error(path, name, f"{got} data bytes do not match {dtype} x {shape} = {expected} bytes")
    return TensorEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _entry_error(path: str, name: str, problem: str) -> HeaderError:
    return HeaderError(f"{path}: tensor {name!r}: {problem}", filename=path)


def layout(
    tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str]
) -> tuple[bytes, list[TensorEntry]]:
    """Header bytes and entries, in file order, exactly as ``save_file`` lays them out.

    ``tensors`` holds (name, dtype, shape). Returns the full prefix to write
    (length field + padded JSON) and the entries with their new offsets.
    """
    ordered = sorted(tensors, key=lambda t: (-DTYPE_RANK[t[1]], t[0]))
    entries = []
    position = 0
    for name, dtype, shape in ordered:
        nbytes = data_bytes(dtype, shape)
        entries.append(TensorEntry(name, dtype, tuple(shape), position, position + nbytes))
        position += nbytes
    obj: dict[str, Any] = {}
    if metadata:
        obj[METADATA_KEY] = metadata
    for e in entries:
        obj[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [e.begin, e.end]}
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % HEADER_ALIGNMENT)
    return struct.pack("<Q", len(text)) + text, entries

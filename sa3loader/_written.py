"""A sibling written to its temp file and not yet published: publish it (fsync, then rename),
discard it, or read it back.

And what a process that ended before publishing (an ``exec``, a kill) left: a temp file is
renamed ``<sibling>.incomplete-written-<boot>-<overflow>-<flushed>-<pid>-<random>`` once its
last byte is written, from a source unchanged meanwhile, and a later load of this boot may
publish it as it is (``unpublished_sibling``): the page cache keeps what a dead process wrote;
a restart may not.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from . import _faults
from ._format import FileHandle, Header, header_of
from ._host import boot_id
from ._places import INCOMPLETE_INFIX, incomplete_prefix
from .errors import ConversionError, HeaderError, Sa3LoaderError


@dataclass(frozen=True)
class ConversionResult:
    path: str
    size: int
    header_sha256: str
    overflow_to_inf: int
    flushed_to_zero: int
    seconds: float


@dataclass
class WrittenSibling:
    """A sibling whose bytes are all in its temp file, not yet durable or at its name.

    ``publish`` fsyncs it and renames it to ``dest``; ``discard`` removes it.
    Until one of them, the temp file is the writer's, under the conversion lock.
    """

    tmp: str
    dest: str
    fd: int  # the temp file, open for reading and writing
    result: ConversionResult

    def open_header(self) -> Header:
        """The file just written, through a descriptor of its own, under ``dest``'s name.

        Not opened by name: it is the inode written, whatever is at the temp name now.
        A file that does not read back as the header written (it cannot happen, unless
        something wrote into it) is a ``ConversionError``: the load reads the source.
        """
        _faults.point("written")
        handle = FileHandle(self.dest, fd=os.dup(self.fd))
        try:
            header = header_of(handle)
            if header.sha256 != self.result.header_sha256 or header.file_size != self.result.size:
                raise HeaderError(f"{self.tmp}: not the header that was written", filename=self.tmp)
            return header
        except HeaderError as exc:
            handle.close()
            raise ConversionError(
                f"the fp16 sibling just written cannot be read back ({exc})", filename=self.dest
            ) from exc
        except BaseException:
            handle.close()
            raise

    def publish(self, before_rename: Callable[[], None] | None = None) -> None:
        """fsync, then ``os.replace`` to ``dest``: a reader never finds it half-written.

        ``before_rename`` may raise to leave ``dest`` alone (the temp file is removed).
        """
        try:
            _faults.point("fsync")
            os.fsync(self.fd)
            self._close()
            _faults.point("rename")
            if before_rename is not None:
                before_rename()
            os.replace(self.tmp, self.dest)
            _fsync_dir(os.path.dirname(self.dest) or ".")
        except BaseException as exc:
            self.discard()
            raise _as_conversion_error(exc, self.dest) from exc

    def discard(self) -> None:
        self._close()
        _unlink_quietly(self.tmp)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _as_conversion_error(exc: BaseException, dest: str) -> BaseException:
    """An ``OSError`` while writing, as a ``ConversionError``; any other error as it is."""
    if isinstance(exc, OSError) and not isinstance(exc, Sa3LoaderError):
        return ConversionError(
            f"cannot write fp16 sibling {dest}: {exc.strerror or exc}", filename=dest, errno=exc.errno
        )
    return exc


WRITTEN_TAG = "written-"


def mark_written(tmp: str, dest: str, counts: dict[str, int]) -> str:
    boot = boot_id()
    if boot is None:
        return tmp  # nothing can prove it complete after this process: it is converted again
    prefix = incomplete_prefix(dest)
    unique = tmp[len(prefix) :]  # <pid>-<random>
    written = f"{prefix}{WRITTEN_TAG}{boot}-{counts['inf']}-{counts['zero']}-{unique}"
    os.rename(tmp, written)
    return written


def unpublished_sibling(path: str, dest: str, prefix: bytes, total: int) -> WrittenSibling | None:
    """The temp file at ``path`` as a ``WrittenSibling`` to publish, when it provably holds every
    byte of the sibling whose header bytes are ``prefix`` and size ``total`` (the current source's:
    ``_convert.output_prefix``), written by a process that ended before it published it; else None.

    The proof: its name says it was complete (renamed after its last byte, from a source
    unchanged meanwhile) in this boot, so the page cache holds what was written, and its
    header and size are exactly those of the sibling of the source as it is now. Publishing
    fsyncs it first, as for any conversion.
    """
    tag = os.path.basename(path).split(INCOMPLETE_INFIX, 1)[-1]
    fields = tag[len(WRITTEN_TAG) :].split("-") if tag.startswith(WRITTEN_TAG) else []
    if len(fields) != 5 or fields[0] != boot_id() or not all(f.isdigit() for f in fields[1:3]):
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        first = os.pread(fd, len(prefix), 0) if stat.S_ISREG(st.st_mode) and st.st_size == total else b""
    except OSError:
        first = b""
    if first != prefix:
        os.close(fd)
        return None
    result = ConversionResult(
        dest, total, hashlib.sha256(prefix[8:]).hexdigest(), int(fields[1]), int(fields[2]), 0.0
    )
    return WrittenSibling(path, dest, fd, result)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass

"""Every exception type sa3loader raises.

Each one also subclasses the builtin a caller would naturally catch, so code
written for plain safetensors/torch errors keeps working. Each names the file
it is about in its message and in ``.filename`` (None only where no file is
involved, as for a bad argument).
"""

from __future__ import annotations

import os


class Sa3LoaderError(Exception):
    """Base class of every error raised by sa3loader."""

    def __init__(
        self, message: str, *, filename: str | os.PathLike[str] | None = None, errno: int | None = None
    ) -> None:
        super().__init__(message)
        self.filename = os.fspath(filename) if filename is not None else None
        if errno is not None:  # the OSError subclasses' errno (set by name: OSError types it)
            setattr(self, "errno", errno)  # noqa: B010

    def __str__(self) -> str:
        # OSError would print "[Errno N] strerror: filename"; the message already says it better.
        return str(self.args[0]) if self.args else ""


class HeaderError(Sa3LoaderError, ValueError):
    """A safetensors header is malformed, truncated or hostile."""


class TruncatedFileError(HeaderError, EOFError):
    """A file ended before the bytes its header promised (truncated, or shrunk while read)."""


class CheckpointNotFoundError(Sa3LoaderError, FileNotFoundError):
    """The checkpoint path does not exist."""


class CheckpointIsADirectoryError(Sa3LoaderError, IsADirectoryError):
    """The checkpoint path is a directory, not a safetensors file."""


class CheckpointPermissionError(Sa3LoaderError, PermissionError):
    """The checkpoint (or a file sa3loader needs) may not be read by this user."""


class FileAccessError(Sa3LoaderError, OSError):
    """A file sa3loader reads could not be opened, read or mapped (a symlink loop, an I/O
    error, too many open files, no address space left, ...)."""


class CheckpointChangedError(Sa3LoaderError, OSError):
    """The checkpoint was rewritten in place while it was being loaded: the load would mix two versions."""


class ConversionError(Sa3LoaderError, OSError):
    """The fp16 sibling could not be written."""


class LockTimeoutError(Sa3LoaderError, TimeoutError):
    """Another process held the conversion lock for longer than allowed."""


class UnusableLockError(Sa3LoaderError, PermissionError):
    """A lock file sa3loader cannot use safely: another user's, a symlink or a FIFO in its place."""


class UpstreamNotFoundError(Sa3LoaderError, ImportError):
    """stable_audio_3 is not importable and no model factory was given."""


class VerificationError(Sa3LoaderError, ValueError):
    """A sibling's content does not match fp16 of its source."""


class OutputExistsError(Sa3LoaderError, FileExistsError):
    """The output already exists and ``force`` was not given."""


class HubSymlinkError(Sa3LoaderError, ValueError):
    """In-place conversion would replace a Hugging Face hub cache symlink."""


class HubCacheError(Sa3LoaderError, ValueError):
    """``convert DIR`` would write into a Hugging Face hub cache (give ``--out``)."""


class UntrustedCacheDirError(Sa3LoaderError, PermissionError):
    """The cache dir is one that others can plant files in (see $SA3LOADER_SHARED_CACHE)."""


class CacheIndexError(Sa3LoaderError, OSError):
    """A cache command could not read or write the index (locked by another process, or corrupt)."""


class FactoryRebuildError(Sa3LoaderError, RuntimeError):
    """After a refused fast build, the factory's second run reused part of the first run's model
    (a module cache of its own), which holds no values: set $SA3LOADER_DISABLE=1."""


class ConfigError(Sa3LoaderError, ValueError):
    """An argument or an ``SA3LOADER_*`` environment variable has a value sa3loader cannot use."""

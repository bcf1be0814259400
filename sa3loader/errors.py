"""Every exception type sa3loader raises.

Each one also subclasses the builtin a caller would naturally catch, so code
written for plain safetensors/torch errors keeps working.
"""

from __future__ import annotations


class Sa3LoaderError(Exception):
    """Base class of every error raised by sa3loader."""


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
    """A file sa3loader reads could not be opened or read (a symlink loop, an I/O error, ...)."""


class ConversionError(Sa3LoaderError, OSError):
    """The fp16 sibling could not be written."""


class LockTimeoutError(Sa3LoaderError, TimeoutError):
    """Another process held the conversion lock for longer than allowed."""


class UpstreamNotFoundError(Sa3LoaderError, ImportError):
    """stable_audio_3 is not importable and no model factory was given."""


class VerificationError(Sa3LoaderError, ValueError):
    """A sibling's content does not match fp16 of its source."""


class OutputExistsError(Sa3LoaderError, FileExistsError):
    """The output already exists and ``force`` was not given."""


class HubSymlinkError(Sa3LoaderError, ValueError):
    """In-place conversion would replace a Hugging Face hub cache symlink."""


class UntrustedCacheDirError(Sa3LoaderError, PermissionError):
    """The cache dir is one that others can plant files in (see $SA3LOADER_SHARED_CACHE)."""

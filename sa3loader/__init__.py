"""sa3loader: load Stable Audio 3 from an automatic fp16 sibling checkpoint.

``from sa3loader import load_diffusion_cond`` is a drop-in replacement for
``stable_audio_3.loading_utils.load_diffusion_cond``.
"""

from . import _config
from ._build import LoadResult
from ._publication import wait_for_publishing
from ._version import __version__ as __version__
from .errors import (
    CacheIndexError,
    CheckpointChangedError,
    CheckpointIsADirectoryError,
    CheckpointNotFoundError,
    CheckpointPermissionError,
    ConfigError,
    ConversionError,
    FactoryRebuildError,
    FileAccessError,
    HeaderError,
    HubCacheError,
    HubSymlinkError,
    LockTimeoutError,
    OutputExistsError,
    Sa3LoaderError,
    TruncatedFileError,
    UntrustedCacheDirError,
    UnusableLockError,
    UpstreamNotFoundError,
    VerificationError,
)
from .loader import (
    Loaded,
    LoadInfo,
    install,
    installed,
    last_load_info,
    load,
    load_autoencoder,
    load_diffusion_cond,
    load_into_module,
    uninstall,
)

_config.apply_verbosity()

__all__ = [
    "CacheIndexError",
    "CheckpointChangedError",
    "CheckpointIsADirectoryError",
    "CheckpointNotFoundError",
    "CheckpointPermissionError",
    "ConfigError",
    "ConversionError",
    "FactoryRebuildError",
    "FileAccessError",
    "HeaderError",
    "HubCacheError",
    "HubSymlinkError",
    "LoadInfo",
    "Loaded",
    "LoadResult",
    "LockTimeoutError",
    "OutputExistsError",
    "Sa3LoaderError",
    "TruncatedFileError",
    "UnusableLockError",
    "UntrustedCacheDirError",
    "UpstreamNotFoundError",
    "VerificationError",
    "install",
    "installed",
    "last_load_info",
    "load",
    "load_autoencoder",
    "load_diffusion_cond",
    "load_into_module",
    "uninstall",
    "wait_for_publishing",
]

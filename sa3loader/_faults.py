"""The one seam through which tests reach inside a load: named fault points, and the
OS facts a test may need to fake.

Production code calls ``point(name)`` where a test may need to stop, slow or
fail it, and a test sets ``hook`` (``tests/support/faults.py``). Names:

- ``header``, ``data``, ``written``: a conversion writing its temp file (``written``:
  every byte is in it, before the load reads it back);
- ``fsync``, ``rename``, ``index``: a sibling being published;
- ``locked``: a conversion lock just taken.

``hook`` is None in production: a point costs one global read.
"""

from __future__ import annotations

from collections.abc import Callable

hook: Callable[[str], None] | None = None

# Where the mount table is read (``_mounts``): a test points it at a table of its own to
# put a directory on NFS, FAT or squashfs without mounting one.
MOUNT_TABLE = "/proc/self/mountinfo"


def point(name: str) -> None:
    if hook is not None:
        hook(name)

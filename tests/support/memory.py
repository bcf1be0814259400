"""Memory as the kernel counts it for this process."""

from __future__ import annotations

import ctypes
import mmap
import os


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_anon() -> int:
    """Anonymous resident bytes (``RssAnon``): what a load allocates, not the mapped file pages
    that ``ru_maxrss`` also counts."""
    return _status_bytes("RssAnon")


def rss_file() -> int:
    """Resident pages of mapped files (``RssFile``): page cache this process maps, which other
    processes mapping the same file share."""
    return _status_bytes("RssFile")


def mapped_files() -> set[str]:
    """The files this process maps now (``/proc/self/maps``)."""
    with open("/proc/self/maps") as f:
        return {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}


def pages_in_page_cache(path: str | os.PathLike[str], offsets: list[int]) -> list[bool]:
    """Whether the page of each offset of a file of ours is in the page cache, asked with
    ``mincore`` (which, unlike a read, brings nothing in)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as mapped:
        base = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        try:
            seen = []
            for offset in offsets:
                page = ctypes.create_string_buffer(1)
                at = offset // mmap.PAGESIZE * mmap.PAGESIZE
                if libc.mincore(ctypes.c_void_p(base + at), mmap.PAGESIZE, page) != 0:
                    raise OSError(ctypes.get_errno(), "mincore")
                seen.append(bool(page.raw[0] & 1))
            return seen
        finally:
            del base

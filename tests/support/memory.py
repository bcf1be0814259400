"""Memory as the kernel counts it for this process."""

from __future__ import annotations


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

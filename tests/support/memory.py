"""Memory as the kernel counts it for this process."""

from __future__ import annotations


def rss_anon() -> int:
    """Anonymous resident bytes (``RssAnon``): what a load allocates, not the mapped file pages
    that ``ru_maxrss`` also counts."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status")

"""How much memory this machine has, and how much it can still hand out."""

from __future__ import annotations

import os
from typing import NamedTuple


class HostMemory(NamedTuple):
    total: int  # bytes
    available: int  # bytes it can still hand out (MemAvailable on Linux)


def host_memory() -> HostMemory:
    """This machine's memory, from /proc/meminfo, else sysconf (available taken as half)."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/meminfo", encoding="ascii"))
        kib = lambda key: int(info[key].strip().split()[0]) * 1024  # noqa: E731
        return HostMemory(kib("MemTotal"), kib("MemAvailable"))
    except (OSError, KeyError, ValueError):
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            total = 0
        return HostMemory(total, total // 2)

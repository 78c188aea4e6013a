"""What this host's CPU can run, read from /proc/cpuinfo (no model code is loaded to find out)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


@lru_cache(maxsize=1)
def host_flags() -> frozenset[str]:
    """The CPU flags of this host (the `flags` line of /proc/cpuinfo)."""
    try:
        text = CPUINFO.read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def host_model_name() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return "unknown CPU"


def missing_features(required) -> list[str]:
    """The required flags this host lacks, in the order given."""
    flags = host_flags()
    return [f for f in required if f not in flags]

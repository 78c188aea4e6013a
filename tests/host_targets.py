"""The x86 targets whose code these tests run on this host (others are compiled and read, not run)."""

import pytest

from targets import missing_features, resolve_target


def runnable(*names: str) -> list:
    """`names` as pytest params; one this host's CPU lacks features for (znver3's SSE4A on an Intel host)
    is skipped with the missing features named, since running it would be an illegal instruction."""
    params = []
    for name in names:
        missing = missing_features(resolve_target(name).required_features)
        marks = pytest.mark.skip(reason=f"this host lacks {' '.join(missing)} for {name}") if missing else ()
        params.append(pytest.param(name, marks=marks))
    return params


HOST_TARGETS = runnable("avx2", "znver3", "native")


# Each current x86 CPU lacks one of these: cascadelake needs AVX-512 VNNI, sapphirerapids AMX, znver3 AMD's
# SSE4A (which no Intel CPU has).
FOREIGN_CANDIDATES = ("cascadelake", "sapphirerapids", "znver3")


def foreign_target() -> tuple[str, list]:
    """A target whose code this host cannot run, and the CPU features it lacks for it: what refusal is tested on."""
    for name in FOREIGN_CANDIDATES:
        missing = missing_features(resolve_target(name).required_features)
        if missing:
            return name, missing
    raise AssertionError(f"this host has every feature of {', '.join(FOREIGN_CANDIDATES)}: add a target it lacks "
                         "to FOREIGN_CANDIDATES")

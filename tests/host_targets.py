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

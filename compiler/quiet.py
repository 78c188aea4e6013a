"""Silence one known line of noise from the TVM 0.27 runtime.

Its VM executable logs `Warning: Scope Saving:` / `Scope Loaded:` from C++ for every constant on each
export and load, unconditionally. Those lines are dropped; anything else written to stderr meanwhile is kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

NOISE = re.compile(rb"executable\.cc:\d+: Warning: Scope (Saving|Loaded):")


@contextlib.contextmanager
def tvm_scope_warnings_silenced():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [line for line in capture.read().splitlines(keepends=True) if not NOISE.search(line)]
            if kept:
                os.write(2, b"".join(kept))

"""Silence known lines of noise that TVM 0.27 writes from C++, which no caller of quantvm can act on.

- Its VM executable logs `Warning: Scope Saving:` / `Scope Loaded:` for every constant on each export and load.
- Legalizing a Gather logs `Fast mode segfaults when there are out-of-bounds indices` for each one, on every
  compile of a text model (quantvm checks the indices its inputs carry: compiler/index_bounds.py).

Those lines are dropped; anything else written to stderr meanwhile is kept.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading

NOISE = re.compile(rb"executable\.cc:\d+: Warning: Scope (Saving|Loaded):"
                   rb"|transform\.h:\d+: Warning: Fast mode segfaults when there are out-of-bounds indices")


class _Redirect:
    """fd 2 into a temporary file while any thread is inside tvm_noise_silenced(): the first in redirects it,
    the last out restores it (threads that each swapped it would restore one another's file)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.depth = 0
        self.saved = self.capture = None

    def enter(self):
        with self.lock:
            if self.depth == 0:
                sys.stderr.flush()
                self.saved, self.capture = os.dup(2), tempfile.TemporaryFile()  # noqa: SIM115 (closed in exit())
                os.dup2(self.capture.fileno(), 2)
            self.depth += 1

    def exit(self):
        with self.lock:
            self.depth -= 1
            if self.depth:
                return
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.capture.seek(0)
            kept = [line for line in self.capture.read().splitlines(keepends=True) if not NOISE.search(line)]
            self.capture.close()
            if kept:
                os.write(2, b"".join(kept))


_REDIRECT = _Redirect()


@contextlib.contextmanager
def tvm_noise_silenced():
    _REDIRECT.enter()
    try:
        yield
    finally:
        _REDIRECT.exit()

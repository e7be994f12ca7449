"""The C allocator's knobs (glibc malloc, through ctypes): what a worker sets at start so that
freed memory goes back to the system, and the call that returns it.

Why fixed thresholds (:func:`tune`). glibc adapts two thresholds to the program: after a
block over the mmap threshold (128 KiB at first) is freed, blocks of that size are served from
the heap instead (the threshold rises up to 32 MiB), and the **trim threshold** becomes twice
that. A heap keeps the free space at its top until it exceeds the trim threshold, and
``malloc_trim`` does not touch that space in the arenas of other threads than the main one
(it returns only the free chunks inside each heap). So one 20 MB ``POST /notify`` body raised
the trim threshold to 40 MB, and every request thread's arena could keep up to 40 MB resident
after everything in it was freed: 30,000 rooms x 20 KB of history, expired, left the worker
34 MB above where it started on a busy host (tests/e2e/test_brokers.py; docs/design.md,
"Brokers"). Fixed at glibc's defaults, a block over 128 KiB (a big request body, its parsed
copy) is its own mapping, unmapped when freed, and a heap gives back its free top past 128 KiB.
Nothing on a hot path allocates that much at once (socket reads are 64 KiB, TLS writes are
joined to 64 KiB, plain writes are gathered).

A deployment that sets the allocator itself (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``GLIBC_TUNABLES`` with ``glibc.malloc.``) is left as it is.
Elsewhere than glibc (musl, macOS) there is nothing to set and nothing to trim.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "trim", "tune"]

# glibc's static defaults (malloc/malloc.c: DEFAULT_MMAP_THRESHOLD_MIN, DEFAULT_TRIM_THRESHOLD)
MMAP_THRESHOLD = 128 * 1024
TRIM_THRESHOLD = 128 * 1024
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# environment variables through which a deployment tunes glibc's malloc itself
_OWN_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def _load_libc() -> Any:
    """glibc, when it has ``mallopt`` and ``malloc_trim``; else None."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _load_libc()


def tune(environ: dict[str, str] | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds (see the module docstring); once per process,
    early (a worker's ``post_fork``). False when there is no glibc or the environment
    ``environ`` (``os.environ``) already tunes malloc."""
    env = os.environ if environ is None else environ
    if _LIBC is None or any(name in env for name in _OWN_SETTINGS):
        return False
    if "glibc.malloc." in env.get("GLIBC_TUNABLES", ""):
        return False
    # setting either one also stops glibc from moving both
    done = _LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    done &= _LIBC.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(done)


def trim() -> None:
    """Return every malloc arena's free pages to the system (``malloc_trim(0)``): a few
    milliseconds, worth it after a large amount was freed."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)

"""wsserver.allocator: glibc's thresholds fixed unless the deployment tunes malloc itself."""

from __future__ import annotations

import pytest

from wsserver import allocator

glibc = pytest.mark.skipif(allocator._LIBC is None, reason="no glibc malloc here")


@glibc
def test_tune_fixes_the_thresholds_on_glibc():
    assert allocator.tune({}) is True
    allocator.trim()  # callable, returns nothing


@pytest.mark.parametrize("env", [
    {"MALLOC_MMAP_THRESHOLD_": "65536"},
    {"MALLOC_TRIM_THRESHOLD_": "0"},
    {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
])
def test_tune_leaves_a_deployments_own_malloc_settings(env):
    assert allocator.tune(env) is False


def test_other_tunables_do_not_count_as_malloc_settings():
    on_glibc = allocator._LIBC is not None
    assert allocator.tune({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is on_glibc

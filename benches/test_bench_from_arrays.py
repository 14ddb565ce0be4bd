"""Simulation.from_arrays of one written process (1 GiB; 64 GiB with
PTEBATCH_BENCH_FROM_ARRAYS_BYTES=64G) against a numpy copy of the same PTE bytes (the one copy
from_arrays must make), and against the pure-Python reference (on FORK_REF_BYTES, scaled per
PTE). The machine is the process's size plus 1/8: from_arrays also sets up the memory
arrays, rebuilds every counter and runs check()."""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
from conftest import FORK_REF_BYTES, record

import ptebatch as pb
from ptebatch.simulation import parse_size

BYTES = parse_size(os.environ.get("PTEBATCH_BENCH_FROM_ARRAYS_BYTES", "1G"))
SIZES = ("4K", "64K", "2M")
KERNEL = "7.0"


@functools.lru_cache(maxsize=8)
def _arrays(n: int, size: str, backend: str = "rust") -> dict:
    """to_arrays() of a simulation whose one process wrote ``n`` bytes in folios of ``size``."""
    sim = pb.Simulation("x86-64", KERNEL, n + n // 8 + (8 << 20), backend=backend)
    p = sim.spawn()
    v = p.mmap(n, mthp=[] if size == "4K" else [size])
    p.touch(v.start, v.length, write=True)
    return sim.to_arrays()


def _label(size: str) -> str:
    return f"from_arrays {pb.format_size(BYTES)} {size}"


@pytest.mark.parametrize("size", SIZES)
def test_from_arrays(benchmark, size):
    arrays = _arrays(BYTES, size)
    sim = benchmark.pedantic(lambda: pb.Simulation.from_arrays(**arrays), rounds=3, iterations=1)
    assert sim.process(1).rss()["anon"] == BYTES // 4096
    record(benchmark, _label(size), "rust", BYTES // 4096)


@pytest.mark.parametrize("size", SIZES)
def test_from_arrays_numpy_copy(benchmark, size):
    ptes = _arrays(BYTES, size)["processes"][0]["vmas"][0]["ptes"]
    dst = np.empty_like(ptes)
    benchmark(np.copyto, dst, ptes)
    record(benchmark, _label(size), "numpy_copy", len(ptes))


@pytest.mark.parametrize("size", SIZES)
def test_from_arrays_reference(benchmark, size):
    arrays = _arrays(FORK_REF_BYTES, size, "reference")
    benchmark.pedantic(lambda: pb.Simulation.from_arrays(**arrays), rounds=2, iterations=1)
    record(benchmark, _label(size), "reference", FORK_REF_BYTES // 4096)

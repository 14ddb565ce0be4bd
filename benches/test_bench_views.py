"""The cost of looking at the state: a zero-copy view against a numpy copy of the same bytes.

``sim.memory.<array>`` and ``p.ptes(addr)`` are views (O(1)); the baseline is ``np.copy`` of
the very array, which is what obtaining them cost before they were views. Sizes:
``PTEBATCH_BENCH_VIEW_BYTES`` of simulated memory, all of it mapped and written (default
1 GiB; ``scripts/views_at_scale.py`` measures 1 TiB).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

import ptebatch as pb

from conftest import record

VIEW_BYTES = int(os.environ.get("PTEBATCH_BENCH_VIEW_BYTES", 1 << 30))


@pytest.fixture(scope="module")
def world():
    sim = pb.Simulation("x86-64", kernel="6.18", memory=VIEW_BYTES + (64 << 20))
    p = sim.spawn()
    v = p.mmap(VIEW_BYTES, mthp=["2M"])
    p.touch(v.start, v.length, write=True)
    return sim, p, v


@pytest.mark.parametrize("name", ["mapcount", "refcount", "order"])
def test_memory_view(benchmark, world, name):
    sim = world[0]
    benchmark.group = f"view memory.{name}"
    a = benchmark(lambda: getattr(sim.memory, name))
    assert np.shares_memory(a, getattr(sim.memory, name))
    record(benchmark, benchmark.group, "rust", len(a))


@pytest.mark.parametrize("name", ["mapcount", "refcount", "order"])
def test_memory_copy_baseline(benchmark, world, name):
    a = getattr(world[0].memory, name)
    benchmark.group = f"view memory.{name}"
    c = benchmark(np.copy, a)
    assert np.array_equal(c, a)
    record(benchmark, benchmark.group, "numpy_copy", len(a))


def test_ptes_view(benchmark, world):
    _, p, v = world
    benchmark.group = "view ptes"
    t = benchmark(p.ptes, v)
    assert len(t) == v.length // 4096
    record(benchmark, benchmark.group, "rust", len(t))


def test_ptes_copy_baseline(benchmark, world):
    _, p, v = world
    t = p.ptes(v)
    benchmark.group = "view ptes"
    c = benchmark(np.copy, t)
    assert np.array_equal(c, t)
    record(benchmark, benchmark.group, "numpy_copy", len(t))

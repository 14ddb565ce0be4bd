"""The simulated fork() of written anonymous memory, per folio size and kernel, against a numpy
copy of as many uint64 as the parent has PTEs (the least any fork must do: the child's table is as
large), measured from DRAM (at least 16 Mi entries, 128 MiB, beyond the cache) and scaled per PTE, and
against the pure-Python reference simulation (run on ``FORK_REF_BYTES`` and scaled per PTE).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FORK_BYTES, FORK_REF_BYTES, record

import ptebatch as pb

CASES = [(size, kernel) for size in ("4K", "64K", "2M") for kernel in ("6.8", "7.0")]


def _written(n: int, size: str, kernel: str, backend: str = "rust") -> tuple[pb.Simulation, pb.Process]:
    sim = pb.Simulation("x86-64", kernel, n + n // 4 + (8 << 20), backend=backend)
    p = sim.spawn()
    v = p.mmap(n, mthp=[] if size == "4K" else [size])
    p.touch(v.start, v.length, write=True)
    return sim, p


@pytest.mark.parametrize("size,kernel", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_fork(benchmark, size, kernel):
    def setup():
        sim, p = _written(FORK_BYTES, size, kernel)
        return (p,), {}

    benchmark.pedantic(lambda p: p.fork(), setup=setup, rounds=5, iterations=1)
    record(benchmark, f"fork {size} {kernel}", "rust", FORK_BYTES // 4096)


@pytest.mark.parametrize("size,kernel", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_fork_numpy_copy(benchmark, size, kernel):
    ptes = np.arange(max(FORK_BYTES // 4096, 1 << 24), dtype=np.uint64)
    dst = np.empty_like(ptes)
    benchmark(np.copyto, dst, ptes)
    record(benchmark, f"fork {size} {kernel}", "numpy_copy", len(ptes))
    if kernel == "7.0":
        record(benchmark, f"fork after exit {size}", "numpy_copy", len(ptes))


@pytest.mark.parametrize("size", ("4K", "64K", "2M"))
def test_fork_after_exit(benchmark, size):
    """Forks of one parent, each after the last child exited: the child's page tables come from
    memory the host has just taken back, as in a loop of fork() and exit()."""
    sim, p = _written(FORK_BYTES, size, "7.0")
    children = []

    def setup():
        while children:
            children.pop().exit()
        return (), {}

    benchmark.pedantic(lambda: children.append(p.fork()), setup=setup, rounds=5, iterations=1)
    record(benchmark, f"fork after exit {size}", "rust", FORK_BYTES // 4096)


@pytest.mark.parametrize("size,kernel", CASES, ids=[f"{s}-{k}" for s, k in CASES])
def test_fork_reference(benchmark, size, kernel):
    def setup():
        sim, p = _written(FORK_REF_BYTES, size, kernel, backend="reference")
        return (p,), {}

    benchmark.pedantic(lambda p: p.fork(), setup=setup, rounds=3, iterations=1)
    record(benchmark, f"fork {size} {kernel}", "reference", FORK_REF_BYTES // 4096)

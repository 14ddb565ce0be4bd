"""``ptebatch bench``'s cases under pytest-benchmark: per operation (the whole-table cut, fork,
exit, munmap, write faults) and folio size, the Rust core, the pure-Python reference (smaller,
scaled per PTE), the numpy-vectorised cut, and the baseline of the same run: a numpy copy of as
many uint64 as the case has PTEs, from an array much larger than the cache.

Sizes: ``PTEBATCH_BENCH_PTES`` / ``PTEBATCH_BENCH_REF_PTES`` (default here 4096) for the cut,
``PTEBATCH_BENCH_FORK_BYTES`` / ``PTEBATCH_BENCH_FORK_REF_BYTES`` for the region (conftest.py).
The kernel's own numbers come from a calibration file: ``ptebatch bench`` shows them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import FORK_BYTES, FORK_REF_BYTES, N_PTES, record

import ptebatch as pb
from ptebatch import reference as ref
from ptebatch.bench import COPY_SOURCE, LAYOUT
from ptebatch.tables import uniform_table
from ptebatch.vectorised import batch_lengths_numpy

KERNEL = pb.NEWEST_KERNEL
SIZES = ("4K", "64K", "2M")
SIM_OPERATIONS = ("fork", "exit", "munmap", "faults")
PAGE = 4096
#: The reference's cut runs at ~50 us a PTE: 4096 PTEs (ptebatch bench's default) unless set.
N_REF = int(os.environ.get("PTEBATCH_BENCH_REF_PTES", min(N_PTES, 4096)))


def _region(nbytes: int) -> int:
    """At least one 2M folio, whole folios of every size."""
    return max(nbytes, 2 << 20) // (2 << 20) * (2 << 20)


@pytest.fixture(scope="module")
def source():
    return np.arange(max(COPY_SOURCE, N_PTES), dtype=np.uint64)


def _copy(source: np.ndarray, n: int):
    """np.copyto of n uint64, each call from the next part of the source (not in the cache)."""
    dst = np.zeros(n, dtype=np.uint64)
    offset = [0]

    def copy() -> None:
        if offset[0] + n > len(source):
            offset[0] = 0
        np.copyto(dst, source[offset[0]:offset[0] + n])
        offset[0] += n
    return copy


@pytest.fixture(scope="module", params=SIZES)
def cut_table(request):
    L = pb.layout(LAYOUT)
    pages = pb.parse_size(request.param) // PAGE
    return f"cut {request.param}", L, uniform_table(L, N_PTES, pages), uniform_table(L, N_REF, pages)


def test_cut_copy(benchmark, cut_table, source):
    group, _, t, _ = cut_table
    benchmark(_copy(source, len(t.ptes)))
    record(benchmark, group, "numpy_copy", len(t.ptes))


def test_cut_rust(benchmark, cut_table):
    group, L, t, _ = cut_table
    out = benchmark(pb.batch_lengths, t.ptes, layout=L, kernel=KERNEL, folio_start=t.folio_start,
                    folio_nr_pages=t.folio_nr_pages)
    assert int(out.sum()) == len(t.ptes)
    record(benchmark, group, "rust", len(t.ptes))


def test_cut_numpy(benchmark, cut_table):
    group, L, t, _ = cut_table
    out = benchmark(batch_lengths_numpy, t.ptes, L, KERNEL, t.folio_start, t.folio_nr_pages)
    want = pb.batch_lengths(t.ptes, layout=L, kernel=KERNEL, folio_start=t.folio_start,
                            folio_nr_pages=t.folio_nr_pages)
    assert np.array_equal(out, want)
    record(benchmark, group, "numpy", len(t.ptes))


def test_cut_reference(benchmark, cut_table):
    group, L, _, small = cut_table
    values, starts, sizes = small.ptes.tolist(), small.folio_start.tolist(), small.folio_nr_pages.tolist()
    out = benchmark.pedantic(ref.batch_lengths, args=(values, ref.layout(LAYOUT), KERNEL, starts, sizes),
                             rounds=3, iterations=1)
    assert sum(out) == len(values)
    record(benchmark, group, "reference", len(values))


def _state(op: str, size: str, nbytes: int, backend: str):
    """The simulated machine just before ``op`` (calibrate's exit round: faults, fork, the
    child's exit, the parent's munmap), and the call that does it."""
    sim = pb.Simulation(LAYOUT, KERNEL, nbytes + nbytes // 4 + (8 << 20), backend=backend)
    p = sim.spawn()
    if size == "2M-pmd":
        v = p.mmap(nbytes, pmd=True)
    else:
        v = p.mmap(nbytes, mthp=[] if size == "4K" else [size])
    if op == "faults":
        return lambda: p.touch(v.start, v.length, write=True)
    p.touch(v.start, v.length, write=True)
    if op == "fork":
        return p.fork
    child = p.fork()
    if op == "exit":
        return child.exit
    child.exit()
    return lambda: p.munmap(v.start, v.length)


CASES = [(op, size) for op in SIM_OPERATIONS for size in (*SIZES, "2M-pmd")]


@pytest.mark.parametrize("op,size", CASES, ids=[f"{o}-{s}" for o, s in CASES])
@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_simulated(benchmark, op, size, backend):
    nbytes = _region(FORK_BYTES if backend == "rust" else FORK_REF_BYTES)
    benchmark.pedantic(lambda call: call(), setup=lambda: ((_state(op, size, nbytes, backend),), {}),
                       rounds=5 if backend == "rust" else 3, iterations=1)
    record(benchmark, f"{op} {size}", backend, nbytes // PAGE)


@pytest.mark.parametrize("op,size", CASES, ids=[f"{o}-{s}" for o, s in CASES])
def test_simulated_copy(benchmark, op, size, source):
    n = _region(FORK_BYTES) // PAGE
    benchmark(_copy(source, n))
    record(benchmark, f"{op} {size}", "numpy_copy", n)

"""ptebatch.helpers over large arrays against a same-run DRAM baseline: ``np.copyto`` of the same
bytes between two arrays larger than the cache.

Sizes: ``PTEBATCH_BENCH_HELPER_PTES`` entries (default 4 Mi, a CI smoke size; the issue's figure
is 10**8: ``PTEBATCH_BENCH_HELPER_PTES=100000000``). ``copy_pte_range`` forks a table of 2M
folios (512 pages each) whose pages are all distinct, so its count arrays have one entry per
PTE (38 bytes each: about 3.8 GB at 10**8). Its row has two baselines: the copy of as many
uint64 as PTEs, and (row "13 B/PTE") a copy of the bytes it reads per PTE: the entry, the
page's mapcount and its flags (it also writes the child's entry).

    PTEBATCH_BENCH_HELPER_PTES=100000000 .venv/bin/python -m pytest -q benches/test_bench_helpers.py \
        --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import record

import ptebatch as pb
from ptebatch import helpers as H

N = int(os.environ.get("PTEBATCH_BENCH_HELPER_PTES", 4 << 20))
LAYOUTS = ("x86-64", "arm64-4k")
KERNEL = "6.18"


def _table(layout: str, n: int) -> np.ndarray:
    """``n`` writable, dirty, young PTEs mapping pfns 0 .. n-1."""
    l = pb.layout(layout)
    ptes = np.full(n, l.none_value, np.uint64)
    H.set_ptes(ptes, 0, l.mk_pte(0, write=True, dirty=True, young=True), n, layout=layout, kernel=KERNEL)
    return ptes


@pytest.fixture(scope="module")
def copy_arrays():
    return np.arange(N, dtype=np.uint64), np.empty(N, np.uint64)


def test_numpy_copy(benchmark, copy_arrays):
    src, dst = copy_arrays
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=5, iterations=1)
    for layout in LAYOUTS:
        for what in ("set_ptes", "wrprotect_ptes", "clear_full_ptes", "get_and_clear_full_ptes"):
            record(benchmark, f"{what} {layout}", "numpy_copy", N)
    record(benchmark, "copy_pte_range 2M", "numpy_copy", N)


def test_numpy_copy_fork_bytes(benchmark):
    """The bytes ``copy_pte_range`` of 2M folios reads per PTE, copied: the parent's entry
    (8 bytes), the page's mapcount (4) and its flags (1); the second baseline of its row."""
    arrays = [(np.arange(N, dtype=d), np.empty(N, d)) for d in (np.uint64, np.int32, np.uint8)]

    def copy():
        for src, dst in arrays:
            np.copyto(dst, src)

    benchmark.pedantic(copy, rounds=5, iterations=1)
    record(benchmark, "copy_pte_range 2M, 13 B/PTE", "numpy_copy", N)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_set_ptes(benchmark, layout):
    ptes = np.empty(N, np.uint64)
    pte = pb.layout(layout).mk_pte(0, write=True, dirty=True, young=True)
    benchmark.pedantic(lambda: H.set_ptes(ptes, 0, pte, N, layout=layout, kernel=KERNEL), rounds=5, iterations=1)
    record(benchmark, f"set_ptes {layout}", "rust", N)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("what", ("wrprotect_ptes", "clear_full_ptes", "get_and_clear_full_ptes"))
def test_pte_helper(benchmark, layout, what):
    fn = getattr(H, what)

    def setup():
        return (_table(layout, N),), {}

    benchmark.pedantic(lambda t: fn(t, 0, N, layout=layout, kernel=KERNEL), setup=setup, rounds=3, iterations=1)
    record(benchmark, f"{what} {layout}", "rust", N)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ptep_get(benchmark, layout):
    """One call on a contpte block (arm64) or a plain entry: the cost per call, not per entry."""
    t = _table(layout, 1 << 10)
    benchmark(H.ptep_get, t, 512, layout=layout, kernel=KERNEL)
    record(benchmark, f"ptep_get {layout} (per call)", "rust", 1)


def _fork_inputs(n: int) -> tuple[np.ndarray, H.FolioCounts]:
    """A parent table of ``n`` entries over 2M anonymous folios, exclusive to the parent."""
    layout = "x86-64"
    src = _table(layout, n)
    c = H.FolioCounts.empty(n)
    order = 9
    heads = np.arange(0, n - n % 512, 512)
    c.order[:len(heads) * 512] = order
    c.order[len(heads) * 512:] = 0
    c.flags[:] = H.PG_ANON_EXCLUSIVE
    c.flags[heads] |= H.PG_ANON | H.PG_SWAPBACKED
    tail = np.arange(len(heads) * 512, n)
    c.flags[tail] |= H.PG_ANON | H.PG_SWAPBACKED
    c.mapcount[:] = 1
    c.refcount[heads] = 512
    c.refcount[tail] = 1
    c.large_mapcount[heads] = 511
    c.nr_pages_mapped[heads] = 512
    c.mm_id[heads, 0] = 1
    c.mm_id_mapcount[heads, 0] = 511
    return src, c


def test_copy_pte_range_2m(benchmark):
    src, counts = _fork_inputs(N)
    dst = np.empty_like(src)
    pristine = src.copy()

    def setup():
        np.copyto(src, pristine)  # the parent's table writable again (COW wrprotects it)
        return (), {}

    benchmark.pedantic(lambda: H.copy_pte_range(src, dst, counts, layout="x86-64", kernel=KERNEL, dst_mm_id=2),
                       setup=setup, rounds=3, iterations=1)
    record(benchmark, "copy_pte_range 2M", "rust", N)
    record(benchmark, "copy_pte_range 2M, 13 B/PTE", "rust", N)

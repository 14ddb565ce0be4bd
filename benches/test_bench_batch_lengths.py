"""batch_lengths over large tables, against a numpy copy of the same bytes and the reference.

Run: ``.venv/bin/pytest benches --benchmark-only`` (see README). The summary at the end gives
ns/PTE, the ratio to ``np.copyto`` of the same array, and the speedup over the pure-Python
reference (run on ``N_REF`` PTEs and scaled per PTE).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import N_PTES, N_REF, record

import ptebatch as pb
from ptebatch import reference as ref
from ptebatch.tables import uniform_table

CASES = [("x86-64", 1), ("x86-64", 16), ("x86-64", 512), ("arm64-4k", 16), ("arm64-4k", 512)]
KERNEL = "6.18"


def _name(layout: str, pages: int) -> str:
    size = pages * 4
    return f"{layout} {size // 1024}M" if size >= 1024 else f"{layout} {size}K"


@pytest.fixture(scope="module", params=CASES, ids=[_name(*c) for c in CASES])
def table(request):
    layout, pages = request.param
    L = pb.layout(layout)
    return _name(layout, pages), L, uniform_table(L, N_PTES, pages)


def test_numpy_copy(benchmark, table):
    name, _, t = table
    dst = np.empty_like(t.ptes)
    benchmark(np.copyto, dst, t.ptes)
    record(benchmark, name, "numpy_copy", len(t.ptes))


def test_batch_lengths(benchmark, table):
    name, L, t = table
    out = benchmark(pb.batch_lengths, t.ptes, layout=L, kernel=KERNEL, folio_start=t.folio_start,
                    folio_nr_pages=t.folio_nr_pages)
    assert int(out.sum()) == len(t.ptes)
    record(benchmark, name, "rust", len(t.ptes))


def test_reference(benchmark, table):
    name, L, _ = table
    t = uniform_table(L, N_REF, int(name.split()[1][:-1]) // 4 if name.endswith("K")
                      else 512)
    R = ref.layout(L.name)
    values = t.ptes.tolist()
    starts, sizes = t.folio_start.tolist(), t.folio_nr_pages.tolist()
    out = benchmark.pedantic(ref.batch_lengths, args=(values,),
                             kwargs=dict(layout=R, kernel=KERNEL, folio_start=starts,
                                         folio_nr_pages=sizes), rounds=3, iterations=1)
    assert sum(out) == N_REF
    record(benchmark, name, "reference", N_REF)

"""The numpy-vectorised cut (ptebatch.vectorised) equals pb.batch_lengths (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_agreement import KERNELS, U64, _fix_folios, _random_flags, tables

import ptebatch as pb
from ptebatch import vectorised as vec
from ptebatch.tables import mixed_table, uniform_table

def _not_vectorised(name: str) -> bool:
    """The case batch_lengths_numpy documents as NotImplementedError."""
    return name not in vec.SUPPORTED_LAYOUTS


def _check(ptes, L, kernel, starts, sizes, **kw):
    want = pb.batch_lengths(ptes, layout=L, kernel=kernel, folio_start=starts, folio_nr_pages=sizes, **kw)
    if _not_vectorised(L.name):
        with pytest.raises(NotImplementedError):
            vec.batch_lengths_numpy(ptes, L, kernel, starts, sizes, **kw)
        return False
    got = vec.batch_lengths_numpy(ptes, L, kernel, starts, sizes, **kw)
    assert got.dtype == np.int64
    assert got.tolist() == want.tolist()
    return True


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=tables(), kernel=st.sampled_from(KERNELS), shared=st.booleans(), data=st.data())
def test_equals_batch_lengths_on_crafted_tables(t, kernel, shared, data):
    name, ballooned, ptes, starts, sizes, first_vpn = t
    L = pb.layout(name, ballooned_pfns=ballooned) if ballooned is not None else pb.layout(name)
    starts, sizes = _fix_folios(starts, sizes)
    kw = dict(first_vpn=first_vpn, shared=shared,
              soft_dirty_tracking=L.has_soft_dirty and data.draw(st.booleans()))
    if kernel != "6.8" and data.draw(st.integers(0, 3)) == 0:
        kw["flags"] = _random_flags(data, kernel)
    _check(ptes, L, kernel, starts, sizes, **kw)


@pytest.mark.parametrize("name", vec.SUPPORTED_LAYOUTS)
@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 2**16), kernel=st.sampled_from(KERNELS), shared=st.booleans(),
       first_vpn=st.integers(0, 1 << 20))
def test_equals_batch_lengths_on_mixed_tables(name, seed, kernel, shared, first_vpn):
    """mTHP tables as tables.mixed_table generates them (the demo's and the bench's)."""
    L = pb.layout(name)
    pmd_order = L.ptrs_per_pte.bit_length() - 1
    t = mixed_table(L, 3000, seed=seed, folio_orders=(0, 2, 4, min(9, pmd_order)), first_vpn=first_vpn)
    _check(t.ptes, L, kernel, t.folio_start, t.folio_nr_pages, first_vpn=first_vpn, shared=shared)


@pytest.mark.parametrize("name", vec.SUPPORTED_LAYOUTS)
def test_vectorised_where_the_bench_runs_it(name):
    """Uniform tables (the bench's) for every folio size, with and without contpte blocks."""
    L = pb.layout(name)
    for pages in (1, 4, 16, L.ptrs_per_pte):
        for kernel in ("seed", "6.9", "6.12", "6.15", pb.NEWEST_KERNEL):
            for contpte in (False, True):
                t = uniform_table(L, 3 * L.ptrs_per_pte + 5, pages, contpte=contpte, first_vpn=7,
                                  dirty=contpte)
                assert _check(t.ptes, L, kernel, t.folio_start, t.folio_nr_pages, first_vpn=7)


@settings(max_examples=100, deadline=None)
@given(name=st.sampled_from(vec.SUPPORTED_LAYOUTS), values=st.lists(U64, min_size=1, max_size=16))
def test_accessors_equal_the_cores(name, values):
    """Each array accessor of the contender equals the Rust core's on arbitrary bits."""
    L, a = pb.layout(name), vec._ARCHES[name]()
    v = np.array(values, dtype=np.uint64)
    for ours, theirs in (("mkclean", "pte_mkclean"), ("wrprotect", "pte_wrprotect"), ("mkold", "pte_mkold"),
                         ("clear_soft_dirty", "pte_clear_soft_dirty"), ("pfn", "pte_pfn"),
                         ("none", "pte_none"), ("present", "pte_present"), ("is_special", "pte_special")):
        assert getattr(a, ours)(v).tolist() == getattr(L, theirs)(v).tolist(), ours
    assert a.next_pfn(v).tolist() == L.pte_advance_pfn(v, 1).tolist()


def test_refusals():
    L = pb.layout("x86-64")
    t = uniform_table(L, 64, 16)
    with pytest.raises(NotImplementedError, match="x86-64-xenpv"):
        vec.batch_lengths_numpy(t.ptes, pb.layout("x86-64-xenpv", ballooned_pfns=[]), "7.0",
                                t.folio_start, t.folio_nr_pages)
    with pytest.raises(TypeError, match="ptes"):
        vec.batch_lengths_numpy(t.ptes.tolist(), L, "7.0", t.folio_start, t.folio_nr_pages)
    with pytest.raises(TypeError, match="layout"):
        vec.batch_lengths_numpy(t.ptes, "x86-64", "7.0", t.folio_start, t.folio_nr_pages)
    with pytest.raises(ValueError, match="kernel"):
        vec.batch_lengths_numpy(t.ptes, L, "5.0", t.folio_start, t.folio_nr_pages)
    with pytest.raises(ValueError, match="folio_start"):
        vec.batch_lengths_numpy(t.ptes, L, "7.0", t.folio_start[:-1], t.folio_nr_pages)
    with pytest.raises(ValueError, match="flags"):
        vec.batch_lengths_numpy(t.ptes, L, "7.0", t.folio_start, t.folio_nr_pages,
                                flags=pb.FPB_IGNORE_DIRTY)
    assert vec.batch_lengths_numpy(t.ptes[:0], L, "7.0", t.folio_start, t.folio_nr_pages).tolist() == []


@pytest.mark.parametrize("name", ["arm64-4k", "arm64-64k"])
@pytest.mark.parametrize("kernel", ["seed", "6.9", "6.12", "6.15", pb.NEWEST_KERNEL])
def test_contpte_blocks_read_as_the_kernel_reads_them(name, kernel):
    """Inside a contpte block only the entry read counts, with the block's dirty state gathered
    (contpte_ptep_get): one dirty entry in the middle of a clean block, and one entry that
    differs but is skipped by the batch hint."""
    L = pb.layout(name)
    c = L.cont_ptes
    t = uniform_table(L, 8 * c, 4 * c, dirty=False, contpte=True, first_vpn=3 * c)
    ptes = t.ptes.copy()
    ptes[2 * c + 3] = L.pte_mkdirty(int(ptes[2 * c + 3]))
    ptes[5 * c + 1] ^= np.uint64(1 << 54)  # UXN: a difference the normalisation keeps
    for shared in (False, True):
        assert _check(ptes, L, kernel, t.folio_start, t.folio_nr_pages, first_vpn=3 * c, shared=shared)
    cuts = np.cumsum(pb.batch_lengths(ptes, layout=L, kernel=kernel, folio_start=t.folio_start,
                                      folio_nr_pages=t.folio_nr_pages, first_vpn=3 * c)).tolist()
    # The seed series reads every entry; from 6.9 the hint skips the middle of a block.
    assert (5 * c + 1 in cuts) == (kernel == "seed"), cuts

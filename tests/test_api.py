"""The public Python API: shapes, dtypes, scalars, flags, and clear errors for bad input."""

from __future__ import annotations

import numpy as np
import pytest

import ptebatch as pb

U = np.uint64


def arr(values):
    return np.array(values, dtype=np.uint64)


def test_every_layout_has_the_issue_geometry():
    expect = {
        "x86-64": (12, 512, 1, 12), "arm64-4k": (12, 512, 16, None),
        "arm64-16k": (14, 2048, 128, None), "arm64-64k": (16, 8192, 32, None),
        "riscv64": (12, 512, 1, 10), "ppc64-4k": (12, 512, 1, 12), "ppc64-64k": (16, 32, 1, 16),
        "s390x": (12, 256, 1, 12), "loongarch64": (14, 2048, 1, 14),
    }
    for name, (shift, ptrs, cont, pfn_shift) in expect.items():
        L = pb.layout(name)
        assert (L.page_shift, L.ptrs_per_pte, L.cont_ptes, L.pfn_pte_shift) == (shift, ptrs, cont, pfn_shift)
        assert L.page_size == 1 << shift
        assert L == pb.layout(name) and hash(L) == hash(pb.layout(name))


def test_vectorised_accessors_keep_shape_and_scalars_stay_scalars():
    L = pb.layout("x86-64")
    pfns = np.arange(12, dtype=np.uint64).reshape(3, 4)
    ptes = L.mk_pte(pfns, write=True, dirty=np.eye(3, 4, dtype=bool))
    assert ptes.shape == (3, 4) and ptes.dtype == np.uint64
    assert L.pte_pfn(ptes).tolist() == pfns.tolist()
    assert L.pte_dirty(ptes).tolist() == np.eye(3, 4, dtype=bool).tolist()
    assert L.pte_write(ptes).dtype == np.bool_
    one = L.mk_pte(5, write=True)
    assert isinstance(one, int) and L.pte_pfn(one) == 5 and L.pte_write(one) is True
    # Strided input is read in place, not rejected.
    assert L.pte_pfn(ptes[:, ::2]).tolist() == pfns[:, ::2].tolist()
    assert L.pte_advance_pfn(ptes, 3).tolist() == L.mk_pte(pfns + U(3), write=True,
                                                            dirty=np.eye(3, 4, dtype=bool)).tolist()


def test_bad_layout_and_kernel_names():
    with pytest.raises(ValueError, match="unknown layout"):
        pb.layout("sparc64")
    with pytest.raises(TypeError):
        pb.layout(64)
    with pytest.raises(TypeError, match="ballooned_pfns"):
        pb.layout("x86-64", ballooned_pfns=[1])
    L = pb.layout("x86-64")
    t = L.mk_pte(np.arange(4, dtype=np.uint64))
    for bad in ("5.15", "6.18.44", "7.9", "latest"):
        with pytest.raises(ValueError, match="kernel"):
            pb.folio_pte_batch(t, folio_pfn=0, folio_nr_pages=4, layout=L, kernel=bad)
    with pytest.raises(ValueError, match="6.9"):
        pb.folio_pte_batch(t, folio_pfn=0, folio_nr_pages=4, layout=L, kernel="6.8")
    with pytest.raises(TypeError):
        pb.folio_pte_batch(t, folio_pfn=0, folio_nr_pages=4, layout=L, kernel=6.9)
    assert pb.kernel_from_release("6.18.44-fc-v657") == "6.18"
    with pytest.raises(ValueError):
        pb.kernel_from_release("4.19.0")


@pytest.mark.parametrize("bad, exc", [
    (np.arange(4, dtype=np.int64), TypeError),
    (np.arange(4, dtype=np.float64), TypeError),
    (np.zeros((2, 2), dtype=np.uint64), ValueError),
    (np.arange(8, dtype=np.uint64)[::2], ValueError),
    ("ptes", TypeError),
    ([-1, 2], ValueError),
])
def test_bad_tables_are_rejected(bad, exc):
    with pytest.raises(exc):
        pb.folio_pte_batch(bad, folio_pfn=0, folio_nr_pages=4, layout="x86-64", kernel="6.18")
    with pytest.raises(exc):
        pb.batch_lengths(bad, layout="x86-64", kernel="6.18", folio_start=arr([0]),
                         folio_nr_pages=arr([4]))


def test_lists_are_converted_and_read_only_arrays_are_fine():
    L = pb.layout("x86-64")
    t = L.mk_pte(np.arange(8, dtype=np.uint64))
    t.setflags(write=False)
    assert pb.folio_pte_batch(t, folio_pfn=0, folio_nr_pages=8, layout=L, kernel="6.18").nr == 8
    assert pb.folio_pte_batch(t.tolist(), folio_pfn=0, folio_nr_pages=8, layout=L,
                              kernel="6.18").nr == 8


@pytest.mark.parametrize("kw, match", [
    (dict(start=4), "start"),
    (dict(start=-1), "start"),
    (dict(max_nr=0), "max_nr"),
    (dict(max_nr=5), "max_nr"),
    (dict(start=1), "not present"),
    (dict(folio_pfn=12), "outside the folio"),
    (dict(folio_pfn=9), "naturally aligned"),
    (dict(folio_nr_pages=3), "power of two"),
    (dict(folio_nr_pages=1), "large folio"),
    (dict(folio_pfn=2**64 - 4), "overflow"),
])
def test_folio_pte_batch_preconditions(kw, match):
    L = pb.layout("x86-64")
    t = arr([L.mk_pte(8), 0, L.mk_pte(10), L.mk_pte(11)])
    args = dict(folio_pfn=8, folio_nr_pages=4, layout=L, kernel="6.18") | kw
    with pytest.raises(ValueError, match=match):
        pb.folio_pte_batch(t, **args)


def test_flags_are_typed_by_kernel_family():
    L = pb.layout("x86-64")
    t = L.mk_pte(np.arange(4, dtype=np.uint64))
    call = lambda k, f: pb.folio_pte_batch(t, folio_pfn=0, folio_nr_pages=4, layout=L, kernel=k, flags=f)
    assert call("6.18", pb.FPB_RESPECT_DIRTY | pb.FPB_MERGE_WRITE).nr == 4
    assert call("6.12", pb.FPB_IGNORE_DIRTY).nr == 4
    assert call("6.12", 0).nr == 4
    with pytest.raises(ValueError, match="6.12"):
        call("6.12", pb.FPB_RESPECT_DIRTY)
    with pytest.raises(ValueError, match="6.18"):
        call("6.18", pb.FPB_IGNORE_DIRTY)
    with pytest.raises(TypeError, match="plain int"):
        call("6.18", 1)
    with pytest.raises(TypeError):
        pb.FPB_IGNORE_DIRTY | pb.FPB_RESPECT_DIRTY
    assert repr(pb.FPB_RESPECT_DIRTY | pb.FPB_MERGE_WRITE) == "FPB_RESPECT_DIRTY|FPB_MERGE_WRITE"
    assert pb.FPB_MERGE_WRITE in pb.fork_flags("6.18")
    assert pb.fork_flags("6.9") == pb.FPB_IGNORE_SOFT_DIRTY
    assert pb.fork_flags("6.9", shared=True) == pb.FPB_IGNORE_DIRTY | pb.FPB_IGNORE_SOFT_DIRTY
    with pytest.raises(ValueError):
        pb.fork_flags("6.8")


def test_result_reports_what_the_version_reports():
    L = pb.layout("x86-64")
    t = L.mk_pte(np.arange(4, dtype=np.uint64), write=np.array([False, True, False, False]))
    b = {k: pb.folio_pte_batch(t, folio_pfn=0, folio_nr_pages=4, layout=L, kernel=k,
                               flags=pb.fork_flags(k)) for k in ("seed", "6.9", "6.12", "6.15", "6.18")}
    assert [b[k].nr for k in b] == [4] * 5
    assert (b["6.9"].any_writable, b["6.9"].any_young) == (True, None)
    assert (b["6.12"].any_writable, b["6.12"].any_young, b["6.12"].any_dirty) == (True, False, False)
    assert b["6.18"].any_writable is None
    assert b["6.18"].pte == L.pte_mkwrite(int(t[0])), "FPB_MERGE_WRITE"
    assert b["6.9"].pte == int(t[0])
    assert "nr=4" in repr(b["6.18"])


def test_batch_lengths_validates_folios_and_soft_dirty():
    L = pb.layout("arm64-4k")
    t = L.mk_pte(np.arange(8, dtype=np.uint64))
    ok = dict(layout=L, kernel="6.18", folio_start=arr([0]), folio_nr_pages=arr([8]))
    assert pb.batch_lengths(t, **ok).tolist() == [8]
    assert pb.batch_lengths(t, **ok).dtype == np.uint32
    with pytest.raises(ValueError, match="soft-dirty"):
        pb.batch_lengths(t, soft_dirty_tracking=True, **ok)
    with pytest.raises(ValueError, match="overlap"):
        pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=arr([0, 2]), folio_nr_pages=arr([4, 4]))
    with pytest.raises(ValueError, match="entries"):
        pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=arr([0, 8]), folio_nr_pages=arr([8]))
    with pytest.raises(TypeError):
        pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=np.array([0]), folio_nr_pages=arr([8]))
    with pytest.raises(ValueError, match="pfn_to_folio"):
        pb.batch_lengths(t, pfn_to_folio=np.array([1, 0, 0, 0], dtype=np.int64), **ok)
    with pytest.raises(TypeError):
        pb.batch_lengths(t, pfn_to_folio=np.zeros(4, dtype=np.int32), **ok)


def test_mk_pte_rejects_bits_the_arch_lacks_and_bad_flag_shapes():
    with pytest.raises(ValueError, match="soft-dirty"):
        pb.layout("arm64-4k").mk_pte(1, soft_dirty=True)
    with pytest.raises(ValueError, match="uffd-wp"):
        pb.layout("s390x").mk_pte(1, uffd_wp=True)
    with pytest.raises(ValueError, match="PFN field"):
        pb.layout("x86-64").mk_pte(1 << 40)
    with pytest.raises(ValueError, match="prot_none"):
        pb.layout("x86-64").mk_pte(1, prot_none=True, write=True)
    with pytest.raises(ValueError, match="shape"):
        pb.layout("x86-64").mk_pte(np.arange(4, dtype=np.uint64), write=np.array([True, False]))
    with pytest.raises(TypeError):
        pb.layout("x86-64").mk_pte(np.arange(4, dtype=np.uint64), write=np.arange(4))
    with pytest.raises(ValueError, match=r"pfns\[2\]"):
        pb.layout("x86-64").mk_pte(np.array([1, 2, 1 << 41], dtype=np.uint64))
    with pytest.raises(ValueError):
        pb.layout("x86-64").pte_pfn(-1)
    with pytest.raises(TypeError):
        pb.layout("x86-64").pte_pfn(1.5)
    with pytest.raises(TypeError):
        pb.layout("x86-64").pte_pfn(np.arange(3, dtype=np.int64))


def test_errors_form_a_hierarchy():
    for e in (pb.InvariantError, pb.SnapshotError, pb.CaptureError):
        assert issubclass(e, pb.PtebatchError) and issubclass(e, Exception)

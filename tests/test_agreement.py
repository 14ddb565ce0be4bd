"""The Rust core agrees with the pure-Python reference, value for value (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch import _flags
from ptebatch import reference as ref

LAYOUTS = list(pb.LAYOUT_NAMES)
KERNELS = list(pb.KERNEL_VERSIONS)
BATCH_KERNELS = [k for k in KERNELS if k != "6.8"]
U64 = st.integers(min_value=0, max_value=2**64 - 1)

UNARY = [
    "pte_pfn", "pte_none", "pte_present", "pte_protnone", "pte_write", "pte_dirty", "pte_young",
    "pte_soft_dirty", "pte_uffd_wp", "pte_special", "pte_exec", "pte_cont", "pte_wrprotect",
    "pte_mkwrite", "pte_mkold", "pte_mkyoung", "pte_mkclean", "pte_mkdirty",
    "pte_clear_soft_dirty", "pte_mksoft_dirty",
]
FLAG_NAMES = ("write", "dirty", "young", "soft_dirty", "uffd_wp", "exec", "special", "prot_none",
              "cont")


def both(name: str, ballooned: list[int] | None = None):
    if name == "x86-64-xenpv":
        return pb.layout(name, ballooned_pfns=ballooned or []), ref.layout(name, ballooned_pfns=ballooned or [])
    return pb.layout(name), ref.layout(name)


def test_layout_attributes_agree():
    for name in LAYOUTS:
        fast, slow = both(name)
        for attr in ("name", "page_shift", "page_size", "ptrs_per_pte", "cont_ptes",
                     "pfn_pte_shift", "max_pfn", "none_value", "has_soft_dirty", "has_uffd_wp",
                     "has_contpte"):
            assert getattr(fast, attr) == getattr(slow, attr), (name, attr)


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(LAYOUTS), values=st.lists(U64, min_size=1, max_size=16),
       nr=st.integers(0, 2**20), index=U64)
def test_accessors_agree_on_arbitrary_bits(name, values, nr, index):
    """Every accessor on arbitrary 64-bit patterns, scalar and vectorised."""
    fast, slow = both(name, ballooned=[v >> 12 & 0xFFFF for v in values[:3]])
    arr = np.array(values, dtype=np.uint64)
    for fn in UNARY:
        want = [getattr(slow, fn)(v) for v in values]
        got = getattr(fast, fn)(arr)
        assert [int(x) if not isinstance(w, bool) else bool(x) for x, w in zip(got, want)] == want, fn
        assert getattr(fast, fn)(values[0]) == want[0], fn
    assert fast.pte_advance_pfn(arr, nr).tolist() == [slow.pte_advance_pfn(v, nr) for v in values]
    assert fast.pte_batch_hint(index, arr).tolist() == [slow.pte_batch_hint(index, v) for v in values]


@st.composite
def pte_flags(draw, layout):
    flags = {f: draw(st.booleans()) for f in FLAG_NAMES}
    flags["present"] = draw(st.booleans()) or draw(st.booleans())
    if flags["prot_none"]:
        flags["write"] = flags["exec"] = False
    if not layout.has_soft_dirty:
        flags["soft_dirty"] = False
    if not layout.has_uffd_wp:
        flags["uffd_wp"] = False
    if not layout.has_contpte:
        flags["cont"] = False
    return flags


@settings(max_examples=200, deadline=None)
@given(name=st.sampled_from(LAYOUTS), data=st.data())
def test_mk_pte_agrees(name, data):
    fast, slow = both(name)
    pfns = data.draw(st.lists(st.integers(0, fast.max_pfn), min_size=1, max_size=8))
    flags = [data.draw(pte_flags(fast)) for _ in pfns]
    want = [slow.mk_pte(p, **f) for p, f in zip(pfns, flags)]
    assert [fast.mk_pte(p, **f) for p, f in zip(pfns, flags)] == want
    columns = {k: np.array([f[k] for f in flags]) for k in flags[0]}
    assert fast.mk_pte(np.array(pfns, dtype=np.uint64), **columns).tolist() == want


@st.composite
def tables(draw, name=None):
    """A page table of folios of random orders and placements, with holes, mixed bits, PROT_NONE
    entries, crafted contpte blocks, and physically adjacent folios."""
    name = name or draw(st.sampled_from(LAYOUTS))
    probe = pb.layout("x86-64" if name == "x86-64-xenpv" else name)
    first_vpn = draw(st.integers(0, 3 * probe.ptrs_per_pte))
    n_runs = draw(st.integers(1, 10))
    pfn = draw(st.integers(1, 1 << 16)) * 512
    entries: list[tuple[int | None, dict]] = []
    starts, sizes = [], []
    uniform = draw(st.booleans())  # most real tables: one set of bits per folio
    base_flags = draw(pte_flags(probe))
    base_flags.update(present=True, cont=False, special=False)
    for _ in range(n_runs):
        order = draw(st.integers(0, 6))
        nr = 1 << order
        pfn = -(-pfn // nr) * nr  # folios are naturally aligned (physically adjacent when no gap)
        starts.append(pfn)
        sizes.append(nr)
        lo = draw(st.integers(0, nr - 1)) if draw(st.integers(0, 3)) == 0 else 0
        hi = nr if draw(st.integers(0, 3)) else draw(st.integers(lo + 1, nr))
        for p in range(pfn + lo, pfn + hi):
            f = dict(base_flags) if uniform and draw(st.integers(0, 7)) else draw(pte_flags(probe))
            f["cont"] = False
            f["present"] = f.get("present", True)
            entries.append((p, f))
        for _ in range(draw(st.integers(0, 2))):
            entries.append((None, {"present": False}))
        pfn += nr + draw(st.sampled_from([0, 0, 0, 1, nr]))
    ptes_ref = []
    fast = pb.layout("x86-64" if name == "x86-64-xenpv" else name)
    for p, f in entries:
        ptes_ref.append(fast.mk_pte(p or 0, **f) if p is not None else fast.none_value)
    ptes = np.array(ptes_ref, dtype=np.uint64)
    if probe.has_contpte and len(ptes) >= probe.cont_ptes:
        # Mark some aligned blocks PTE_CONT, valid or not (the kernel reads what is there).
        n = probe.cont_ptes
        for b in range(-(first_vpn % n) % n, len(ptes) - n + 1, n):
            if draw(st.integers(0, 2)) == 0:
                ptes[b:b + n] |= np.uint64(1 << 52)
    ballooned = sorted({s + z for s, z in zip(starts, sizes)} - set(starts))
    if name == "x86-64-xenpv":
        ballooned = draw(st.lists(st.sampled_from(ballooned), unique=True)) if ballooned else []
    else:
        ballooned = None
    return name, ballooned, ptes, np.array(starts, dtype=np.uint64), np.array(sizes, dtype=np.uint64), first_vpn


def _fix_folios(starts, sizes):
    """Sorted, non-overlapping folio lists (drop any that would overlap)."""
    order = np.argsort(starts, kind="stable")
    keep_s, keep_n, end = [], [], -1
    for s, n in zip(starts[order].tolist(), sizes[order].tolist()):
        if s >= end:
            keep_s.append(s)
            keep_n.append(n)
            end = s + n
    return np.array(keep_s, dtype=np.uint64), np.array(keep_n, dtype=np.uint64)


def _random_flags(data, kernel):
    if data.draw(st.booleans()):
        return None
    family = _flags.family_of(pb.fpb_form(kernel))
    names = _flags._NAMES[family]
    bits = 0
    for b in names:
        if data.draw(st.booleans()):
            bits |= b
    return _flags.FpbFlags(family, bits)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=tables(), kernel=st.sampled_from(BATCH_KERNELS), data=st.data())
def test_folio_pte_batch_agrees(t, kernel, data):
    name, ballooned, ptes, starts, sizes, first_vpn = t
    fast, slow = both(name, ballooned)
    starts, sizes = _fix_folios(starts, sizes)
    present = [i for i, v in enumerate(ptes.tolist()) if fast.pte_present(v)]
    assume(present)
    start = data.draw(st.sampled_from(present))
    pfn = fast.pte_pfn(int(ptes[start]))
    # The folio the PTE maps, or a made-up large folio around it.
    k = int(np.searchsorted(starts, pfn, side="right")) - 1
    if k >= 0 and starts[k] <= pfn < starts[k] + sizes[k] and sizes[k] > 1:
        folio = (int(starts[k]), int(sizes[k]))
    else:
        nr = data.draw(st.sampled_from([2, 4, 16, 512]))
        folio = (pfn - pfn % nr, nr)
    assume(folio[0] <= pfn < folio[0] + folio[1])
    max_nr = data.draw(st.integers(1, len(ptes) - start))
    flags = _random_flags(data, kernel)
    kw = dict(start=start, max_nr=max_nr, folio_pfn=folio[0], folio_nr_pages=folio[1],
              kernel=kernel, flags=flags, first_vpn=first_vpn)
    want = ref.folio_pte_batch(ptes, layout=slow, **kw)
    got = pb.folio_pte_batch(ptes, layout=fast, **kw)
    assert (got.nr, got.pte, got.any_writable, got.any_young, got.any_dirty) == (
        want.nr, want.pte, want.any_writable, want.any_young, want.any_dirty)
    assert 1 <= got.nr <= max_nr


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(t=tables(), kernel=st.sampled_from(KERNELS), shared=st.booleans(), data=st.data())
def test_batch_lengths_agree(t, kernel, shared, data):
    name, ballooned, ptes, starts, sizes, first_vpn = t
    fast, slow = both(name, ballooned)
    starts, sizes = _fix_folios(starts, sizes)
    sdt = fast.has_soft_dirty and data.draw(st.booleans())
    kw = dict(kernel=kernel, folio_start=starts, folio_nr_pages=sizes, first_vpn=first_vpn,
              shared=shared, soft_dirty_tracking=sdt)
    if kernel != "6.8" and data.draw(st.integers(0, 3)) == 0:
        kw["flags"] = _random_flags(data, kernel)
    want = ref.batch_lengths(ptes, layout=slow, **kw)
    got = pb.batch_lengths(ptes, layout=fast, **kw)
    assert got.tolist() == list(want)
    assert int(got.sum()) == len(ptes)
    if data.draw(st.booleans()) and len(starts):
        top = int(starts[-1] + sizes[-1])
        pmap = np.full(top + 1, -1, dtype=np.int64)
        for i, (s, n) in enumerate(zip(starts.tolist(), sizes.tolist())):
            pmap[s:s + n] = i
        got2 = pb.batch_lengths(ptes, layout=fast, pfn_to_folio=pmap, **kw)
        assert got2.tolist() == list(want)


@pytest.mark.parametrize("kernel", ["seed", "6.9", "6.12", "6.15", "6.18"])
def test_fork_flags_agree(kernel):
    for shared in (False, True):
        for sdt in (False, True):
            assert pb.fork_flags(kernel, shared, sdt) == ref.fork_flags(kernel, shared, sdt)

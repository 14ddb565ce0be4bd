"""copy_pte_range over arrays checks ``src`` in the same pass that finds the batches the copy
then takes: a bad entry anywhere (inside what would be a batch, after one, between tables) gives
the error of the first bad entry, the one the separate check zap_pte_range makes gives, and
changes nothing."""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch import helpers as H

LAYOUT = "x86-64"
#  Not present and not none: a swap entry, which the array forms do not model.
SWAP = 1 << 10


@functools.cache
def scene(kernel: str, mthp: tuple[str, ...]):
    sim = pb.Simulation(LAYOUT, kernel, "16M")
    p = sim.spawn()
    m = p.mmap("4M", mthp=list(mthp))
    p.touch(m.start, "4M", write=True)
    return sim, np.array(p.ptes(m)), m.start >> 12, H.FolioCounts.from_state(sim.state())


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kernel=st.sampled_from(["6.8", "6.12", "6.18"]), mthp=st.sampled_from([(), ("64K",), ("2M",)]),
       batched=st.booleans(), data=st.data())
def test_a_bad_entry_anywhere_raises_for_the_first_and_writes_nothing(kernel, mthp, batched, data) -> None:
    sim, src, first_vpn, counts = scene(kernel, mthp)
    src, counts = src.copy(), counts.copy()
    free_pfn = int(np.flatnonzero(counts.order == 255)[0])
    l = pb.layout(LAYOUT)
    bad = {"swap": SWAP, "beyond": l.mk_pte(sim.nr_pages + 5), "free": l.mk_pte(free_pfn)}
    at = data.draw(st.lists(st.tuples(st.integers(0, len(src) - 1), st.sampled_from(sorted(bad))),
                            min_size=1, max_size=3, unique_by=lambda t: t[0]))
    for k, kind in at:
        src[k] = bad[kind]
    first = min(k for k, _ in at)
    dst = np.full_like(src, 7)
    kw = dict(layout=LAYOUT, kernel=kernel, batched=batched, dst_mm_id=9, first_vpn=first_vpn,
              zero_pfn=sim.zero_pfn)
    before = (src.copy(), dst.copy(), counts.copy())
    with pytest.raises(ValueError, match=rf"src\[{first}\]") as got:
        H.copy_pte_range(src, dst, counts, **kw)
    zkw = {k: v for k, v in kw.items() if k != "dst_mm_id"}
    with pytest.raises(ValueError) as want:
        H.zap_pte_range(src.copy(), counts.copy(), mm_id=1, **zkw)
    assert str(got.value) == str(want.value).replace(f"ptes[{first}]", f"src[{first}]")
    np.testing.assert_array_equal(src, before[0])
    np.testing.assert_array_equal(dst, before[1])
    assert counts.equal(before[2])


@pytest.mark.parametrize("layout", ["x86-64", "arm64-4k"])
def test_a_folio_whose_pages_disagree_on_its_order_is_refused(layout) -> None:
    """Entries inside a folio already checked are not checked again, so the check must find
    every page of a folio carrying its order: here pages 4-5 say order 1 and 6-7 order 2
    inside an order-3 folio, which once made the copy spin (x86-64) or index out of range
    (arm64's contpte path) on entry 1, and must instead refuse the arrays unchanged."""
    l = pb.layout(layout)
    counts = H.FolioCounts.empty(16)
    counts.order[:] = 255
    counts.order[:8] = 3
    counts.order[4:6] = 1
    counts.order[6:8] = 2
    counts.flags[0] = H.PG_ANON | H.PG_SWAPBACKED
    counts.refcount[0] = 2
    counts.mapcount[[0, 6]] = 1
    counts.large_mapcount[0] = 1
    counts.nr_pages_mapped[0] = 2
    src = np.full(4, l.none_value, np.uint64)
    src[0], src[1] = l.mk_pte(0, write=True), l.mk_pte(6, write=True)
    dst = np.full_like(src, 7)
    before = (src.copy(), dst.copy(), counts.copy())
    for kernel in ("6.8", "6.18"):
        with pytest.raises(ValueError, match=r"src\[0\].*order\[4\]=1"):
            H.copy_pte_range(src, dst, counts, layout=layout, kernel=kernel, dst_mm_id=2)
        with pytest.raises(ValueError, match=r"ptes\[0\].*order\[4\]=1"):
            H.zap_pte_range(src, counts, layout=layout, kernel=kernel, mm_id=1)
    np.testing.assert_array_equal(src, before[0])
    np.testing.assert_array_equal(dst, before[1])
    assert counts.equal(before[2])

"""The batched helpers over arrays (``ptebatch.helpers``; rust/src/pgtable.rs, rmap.rs, fork.rs,
zap.rs) in plain Python, reusing the reference simulation's own code: its ``Cont`` for arm64
contpte, its ``Rmap`` for the counts and its fork/zap loops for whole tables. Slow, written for
reading and for the property tests that hold the Rust helpers to it.

Each function takes and updates the same arrays as its ``ptebatch.helpers`` twin (numpy
arrays; ``counts`` a ``ptebatch.helpers.FolioCounts``) and checks nothing: give it what the
Rust helper accepts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .layouts import layout as ref_layout
from .sim import contpte, fork, zap
from .sim.kernel import KernelProfile
from .sim.memory import FREE, GUP_PIN_COUNTING_BIAS, MM_ID_DUMMY, PG_ANON_EXCLUSIVE
from .sim.mm import Mm, Prot, Vma
from .sim.rmap import Rmap
from .sim.state import State
from .sim.stats import Stats
from .sim.batching import fork_flags


def _layout(name: str) -> Any:
    """The reference layout (its accessors live on the per-architecture classes)."""
    return ref_layout(name)


def _profile(kernel: str, batched: bool = True) -> KernelProfile:
    p = KernelProfile.parse(kernel)
    return p if batched else p.unbatched()


def _cont(l, p: KernelProfile) -> int | None:
    return contpte.cont_ptes(l, p)


class _Large:
    """A large folio's record, read from and written to the count lists at its first pfn."""

    def __init__(self, m: ArrayMemory, head: int) -> None:
        self._m, self._h = m, head
        self.mm_id = m.mm_id[head]  # two-element lists, shared
        self.mm_id_mapcount = m.mm_id_mapcount[head]

    large_mapcount = property(lambda s: s._m.large_mapcount[s._h],
                              lambda s, v: s._m.large_mapcount.__setitem__(s._h, v))
    nr_pages_mapped = property(lambda s: s._m.nr_pages_mapped[s._h],
                               lambda s, v: s._m.nr_pages_mapped.__setitem__(s._h, v))
    pincount = property(lambda s: s._m.pincount[s._h], lambda s, v: s._m.pincount.__setitem__(s._h, v))
    #: User arrays hold no PMD mappings (as FolioArrays' entire_mapcount_of in rust/src/rmap.rs).
    entire_mapcount = -1


class ArrayMemory:
    """A ``FolioCounts`` as Python lists, with the interface the reference ``Rmap`` and
    contpte code ask of the simulation's memory (``FolioArrays`` in rust/src/rmap.rs)."""

    def __init__(self, counts: Any) -> None:
        self.order = [int(x) for x in counts.order]
        self.flags = [int(x) for x in counts.flags]
        self.mapcount = [int(x) for x in counts.mapcount]
        self.refcount = [int(x) for x in counts.refcount]
        self.large_mapcount = [int(x) for x in counts.large_mapcount]
        self.nr_pages_mapped = [int(x) for x in counts.nr_pages_mapped]
        self.pincount = [int(x) for x in counts.pincount]
        self.mm_id = [[int(a), int(b)] for a, b in counts.mm_id]
        self.mm_id_mapcount = [[int(a), int(b)] for a, b in counts.mm_id_mapcount]
        self.token = [0] * len(self.order)

    def write_back(self, counts: Any) -> None:
        """Stores the lists into the arrays of ``counts``."""
        counts.order[:] = self.order
        counts.flags[:] = self.flags
        counts.mapcount[:] = self.mapcount
        counts.refcount[:] = self.refcount
        counts.large_mapcount[:] = self.large_mapcount
        counts.nr_pages_mapped[:] = self.nr_pages_mapped
        counts.pincount[:] = self.pincount
        counts.mm_id[:] = np.asarray(self.mm_id, dtype=np.uint32).reshape(-1, 2)
        counts.mm_id_mapcount[:] = np.asarray(self.mm_id_mapcount, dtype=np.int32).reshape(-1, 2)

    def nr_pages(self) -> int:
        return len(self.order)

    def is_free(self, pfn: int) -> bool:
        return self.order[pfn] == FREE

    def folio_order(self, head: int) -> int:
        return self.order[head]

    def folio_head(self, pfn: int) -> int:
        o = self.order[pfn]
        return pfn if o == FREE else pfn & ~((1 << o) - 1)

    def test(self, pfn: int, flag: int) -> bool:
        return self.flags[pfn] & flag != 0

    def set(self, pfn: int, flag: int) -> None:
        self.flags[pfn] |= flag

    def clear(self, pfn: int, flag: int) -> None:
        self.flags[pfn] &= ~flag

    def lf(self, head: int) -> _Large:
        return _Large(self, head)

    def folio_maybe_dma_pinned(self, head: int) -> bool:
        """folio_maybe_dma_pinned() — include/linux/mm.h"""
        if self.order[head] > 0:
            return self.pincount[head] > 0
        return self.refcount[head] >= GUP_PIN_COUNTING_BIAS

    def free(self, head: int) -> None:
        """The last reference went: the pages become free, the record fields empty."""
        o = self.order[head]
        nr = 1 if o == FREE else 1 << o
        for p in range(head, head + nr):
            self.order[p] = FREE
            self.flags[p] = 0
            self.mapcount[p] = 0
            self.refcount[p] = 0
        if o != FREE and o > 0:
            self.large_mapcount[head] = -1
            self.nr_pages_mapped[head] = 0
            self.pincount[head] = 0
            self.mm_id[head][:] = [MM_ID_DUMMY, MM_ID_DUMMY]
            self.mm_id_mapcount[head][:] = [-1, -1]


def _stats_dict(st: Stats) -> dict[str, Any]:
    return {k: getattr(st, k) for k in vars(st) if not k.startswith("_")}


# ---- PTE helpers ---------------------------------------------------------------------------

def ptep_get(ptes: np.ndarray, index: int, *, layout: str, kernel: str, first_vpn: int = 0) -> int:
    """ptep_get(): with the arm64 contpte gather of young and dirty."""
    l, p = _layout(layout), _profile(kernel)
    return contpte._table_ptep_get(l, _cont(l, p) is not None, [int(x) for x in ptes], first_vpn, index)


def _run(ptes: np.ndarray, fn) -> Any:
    t = [int(x) for x in ptes]
    out = fn(t)
    ptes[:] = t
    return out


def _unfold_partial(l, n: int | None, t: list[int], first_vpn: int, i: int, nr: int, st: Stats) -> None:
    """contpte_try_unfold_partial(); one entry: contpte_try_unfold()."""
    if n is None:
        return
    c = contpte.Cont(t, first_vpn, n)
    if nr == 1:
        c.unfold(l, i, st)
    else:
        c.unfold_partial(l, i, nr, st)


def set_ptes(ptes: np.ndarray, index: int, pte: int, nr: int, *, layout: str, kernel: str,
             first_vpn: int = 0, order: np.ndarray | None = None) -> dict[str, Any]:
    """set_ptes() — include/linux/pgtable.h; arm64: set_pte_at() folds, contpte_set_ptes()."""
    l, p = _layout(layout), _profile(kernel)
    n = _cont(l, p)
    st = Stats()
    orders = None if order is None else [int(x) for x in order]

    def folio_of(pfn: int):
        if orders is None or pfn >= len(orders) or orders[pfn] == FREE:
            return None
        o = orders[pfn]
        return pfn & ~((1 << o) - 1), 1 << o

    def go(t: list[int]) -> None:
        st.pte_writes += nr
        if n is None:
            for k in range(nr):
                t[index + k] = l.pte_advance_pfn(pte, k)
        elif nr == 1:
            contpte.Cont(t, first_vpn, n).set_pte(l, index, pte, folio_of, st)
        else:
            contpte.Cont(t, first_vpn, n).set_ptes(l, index, pte, nr)

    _run(ptes, go)
    return _stats_dict(st)


def wrprotect_ptes(ptes: np.ndarray, index: int, nr: int, *, layout: str, kernel: str,
                   first_vpn: int = 0) -> dict[str, Any]:
    """wrprotect_ptes() — include/linux/pgtable.h; arm64 contpte_wrprotect_ptes()."""
    l, p = _layout(layout), _profile(kernel)
    st = Stats()

    def go(t: list[int]) -> None:
        _unfold_partial(l, _cont(l, p), t, first_vpn, index, nr, st)
        for k in range(index, index + nr):
            t[k] = l.pte_wrprotect(t[k])
        st.pte_writes += nr

    _run(ptes, go)
    return _stats_dict(st)


def get_and_clear_full_ptes(ptes: np.ndarray, index: int, nr: int, *, layout: str, kernel: str,
                            full: bool = False, first_vpn: int = 0) -> int:
    """get_and_clear_full_ptes() — include/linux/pgtable.h: the first entry with the run's
    dirty and young bits; arm64 unfolds partly covered blocks unless the whole mm goes."""
    l, p = _layout(layout), _profile(kernel)
    st = Stats()

    def go(t: list[int]) -> int:
        if not full:
            _unfold_partial(l, _cont(l, p), t, first_vpn, index, nr, st)
        out = t[index]
        for e in t[index + 1:index + nr]:
            if l.pte_dirty(e):
                out = l.pte_mkdirty(out)
            if l.pte_young(e):
                out = l.pte_mkyoung(out)
        t[index:index + nr] = [l.none_value] * nr
        return out

    return _run(ptes, go)


def clear_full_ptes(ptes: np.ndarray, index: int, nr: int, *, layout: str, kernel: str,
                    full: bool = False, first_vpn: int = 0) -> dict[str, Any]:
    """clear_full_ptes() — include/linux/pgtable.h; arm64 contpte_clear_full_ptes()."""
    l, p = _layout(layout), _profile(kernel)
    st = Stats()

    def go(t: list[int]) -> None:
        if not full:
            _unfold_partial(l, _cont(l, p), t, first_vpn, index, nr, st)
        t[index:index + nr] = [l.none_value] * nr
        st.pte_writes += nr

    _run(ptes, go)
    return _stats_dict(st)


# ---- Folio reference and rmap helpers ------------------------------------------------------

def _rmap_call(counts: Any, kernel: str, fn) -> tuple[Any, Stats]:
    mem = ArrayMemory(counts)
    st = Stats()
    out = fn(Rmap(mem, st, _profile(kernel)), mem)  # type: ignore[arg-type]
    mem.write_back(counts)
    return out, st


def folio_ref_add(counts: Any, head: int, nr: int, *, kernel: str) -> dict[str, Any]:
    return _stats_dict(_rmap_call(counts, kernel, lambda r, m: r.ref_add(head, nr))[1])


def folio_put_refs(counts: Any, head: int, nr: int, *, kernel: str) -> bool:
    _, st = _rmap_call(counts, kernel, lambda r, m: r.put_refs(head, nr))
    return st.folios_freed > 0


def folio_add_anon_rmap_ptes(counts: Any, page: int, nr: int, *, kernel: str, mm_id: int,
                             exclusive: bool = False) -> dict[str, Any]:
    """folio_add_anon_rmap_ptes() — mm/rmap.c: __folio_add_rmap() at PTE level, then
    PageAnonExclusive on each page with RMAP_EXCLUSIVE."""
    def go(r: Rmap, m: ArrayMemory) -> None:
        r.add_file_ptes(m.folio_head(page), page, nr, mm_id)  # the same __folio_add_rmap()
        if exclusive:
            for q in range(page, page + nr):
                m.set(q, PG_ANON_EXCLUSIVE)
    return _stats_dict(_rmap_call(counts, kernel, go)[1])


def folio_try_dup_anon_rmap_ptes(counts: Any, page: int, nr: int, *, kernel: str, dst_mm_id: int,
                                 src_has_pinned: bool = False) -> bool:
    return _rmap_call(counts, kernel, lambda r, m: r.try_dup_anon_ptes(
        m.folio_head(page), page, nr, dst_mm_id, src_has_pinned))[0]


def folio_dup_file_rmap_ptes(counts: Any, page: int, nr: int, *, kernel: str, dst_mm_id: int) -> dict[str, Any]:
    return _stats_dict(_rmap_call(counts, kernel, lambda r, m: r.dup_file_ptes(
        m.folio_head(page), page, nr, dst_mm_id))[1])


def folio_remove_rmap_ptes(counts: Any, page: int, nr: int, *, kernel: str, mm_id: int) -> dict[str, Any]:
    return _stats_dict(_rmap_call(counts, kernel, lambda r, m: r.remove_ptes(
        m.folio_head(page), page, nr, mm_id))[1])


# ---- Whole page tables ---------------------------------------------------------------------

def _state(l, mem: ArrayMemory, zero_pfn: int | None, mm_id: int, start: int, ptes: list[int]) -> State:
    """A reference simulation state holding one mm with one VMA over ``ptes``."""
    st = State(mem, -1 if zero_pfn is None else zero_pfn, l.page_shift, l.ptrs_per_pte, 0)  # type: ignore[arg-type]
    vma = Vma(start=start, ptes=ptes, prot=Prot(True, True, False), shared=False, file=None, pgoff=0,
              vm_softdirty=False, uffd_wp=False, uffd_event_fork=False, dontfork=False, wipeonfork=False,
              anon_vma=1, mthp=0)
    st.mms.append(Mm(pid=mm_id, mm_id=mm_id, vmas=[vma], rss=[0, 0, 0], has_pinned=False, exited=False,
                     next_vpn=0))
    return st


def copy_pte_range(src: np.ndarray, dst: np.ndarray, counts: Any, *, layout: str, kernel: str,
                   dst_mm_id: int, batched: bool = True, first_vpn: int = 0, shared: bool = False,
                   cow: bool | None = None, soft_dirty_tracking: bool = False, dst_uffd_wp: bool = False,
                   zero_pfn: int | None = None) -> dict[str, Any]:
    """copy_page_range() of one VMA's table: the reference simulation's fork loop
    (reference/sim/fork.py) over the arrays."""
    l, p = _layout(layout), _profile(kernel, batched)
    mem = ArrayMemory(counts)
    st = _state(l, mem, zero_pfn, 1, first_vpn, [int(x) for x in src])  # the parent's MM-ID is not read
    child = [l.none_value] * len(src)
    ctx = fork.CopyCtx(
        k=0, vi=0, start=first_vpn, is_cow=(not shared) if cow is None else cow, shared=shared,
        dst_uffd_wp=dst_uffd_wp, dst_prot=Prot(True, True, False),
        flags=None if p.fpb is None else fork_flags(p.fpb, shared, soft_dirty_tracking),
        has_pinned=False, dst_mm_id=dst_mm_id,
    )
    rss = [0, 0, 0]
    fork.copy_page_range(st, l, p, ctx, child, rss)
    src[:] = st.mms[0].vmas[0].ptes
    dst[:] = child
    mem.write_back(counts)
    out = _stats_dict(st.op)
    out["rss"] = dict(zip(("file", "anon", "shmem"), rss))
    return out


def zap_pte_range(ptes: np.ndarray, counts: Any, *, layout: str, kernel: str, mm_id: int,
                  batched: bool = True, first_vpn: int = 0, full: bool = False,
                  zero_pfn: int | None = None) -> dict[str, Any]:
    """unmap_page_range() of one table: the reference simulation's zap loop
    (reference/sim/zap.py) over the arrays, then the gather finished."""
    l, p = _layout(layout), _profile(kernel, batched)
    mem = ArrayMemory(counts)
    st = _state(l, mem, zero_pfn, mm_id, first_vpn, [int(x) for x in ptes])
    gather: zap.Gather = []
    zap.zap_vma_range(st, l, p, 0, 0, 0, len(ptes), full, gather)
    zap.tlb_finish(st, p, gather)
    ptes[:] = st.mms[0].vmas[0].ptes
    mem.write_back(counts)
    out = _stats_dict(st.op)
    out["rss"] = dict(zip(("file", "anon", "shmem"), st.mms[0].rss))
    return out

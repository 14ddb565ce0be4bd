"""Unmapping: zap_pte_range() → zap_present_ptes() → zap_present_folio_ptes() for munmap, exit and
MADV_DONTNEED (rust/src/zap.rs; mm/memory.c). Page references go only after the TLB flush,
when the mmu_gather finishes."""

from __future__ import annotations

from . import contpte, huge_memory
from .batching import folio_pte_batch, fpb_flags
from .kernel import KernelProfile
from .memory import PG_ANON, PG_DIRTY
from .mm import mm_counter
from .state import State

#: An mmu_gather's page references: (folio head, count), dropped at tlb_finish_mmu().
Gather = list


def zap_vma_range(st: State, l, p: KernelProfile, k: int, v: int, a: int, b: int,
                  fullmm: bool, gather: Gather) -> None:
    """unmap_page_range() — mm/memory.c: entries [a, b) of a VMA, one page table at a time"""
    start = st.mms[k].vmas[v].start
    ptrs = st.ptrs_per_pte
    s = a
    while s < b:
        e = min(b, s + ptrs - ((start + s) & (ptrs - 1)))
        if not huge_memory.zap_huge_pmd_range(st, l, p, k, v, s, e, gather):
            zap_pte_range(st, l, p, k, v, s, e, fullmm, gather)
        s = e


def zap_pte_range(st: State, l, p: KernelProfile, k: int, v: int, a: int, e: int,
                  fullmm: bool, gather: Gather) -> None:
    """zap_pte_range() — mm/memory.c: entries [a, e) of one page table"""
    mm_id = st.mms[k].mm_id
    vma = st.mms[k].vmas[v]
    rss = [0, 0, 0]
    cleared = False
    i = a
    while i < e:
        pte = vma.ptes[i]
        st.op.pte_reads += 1
        if l.pte_none(pte):
            i += 1
            continue
        cleared = True
        page = st.vm_normal_page(l, pte)
        if page is None:  # the zero page: clear the one entry
            if not fullmm:
                contpte.unfold(st, l, p, vma, i)
            vma.ptes[i] = l.none_value
            st.op.pte_writes += 1
            st.op.tlb_flush_pages += 1
            i += 1
            continue
        nr = zap_present_ptes(st, l, p, vma, i, e, page, mm_id, rss, fullmm, gather)
        i += nr
    mm = st.mms[k]
    for c in range(3):
        mm.rss[c] += rss[c]
    if cleared:
        st.op.tlb_flush_ranges += 1


def zap_present_ptes(st: State, l, p: KernelProfile, vma, i: int, e: int, page: int, mm_id: int,
                     rss: list[int], fullmm: bool, gather: Gather) -> int:
    """zap_present_ptes() — mm/memory.c: the run of one folio at ``i``; returns its length"""
    head = st.mem.folio_head(page)
    order = st.mem.folio_order(head)
    nr = 1
    if order > 0 and e - i != 1 and p.fpb is not None and p.zap_batched:
        # Dirty, soft-dirty, write and young never end a zap batch.
        flags = fpb_flags(p.fpb)
        nr = folio_pte_batch(l, p.fpb, vma.ptes, vma.start, i, e - i, head, 1 << order, flags).nr
        st.op.folio_pte_batch_calls += 1
        st.op.pte_reads += nr
    st.op.batch(nr)
    zap_present_folio_ptes(st, l, p, vma, i, nr, head, page, mm_id, rss, fullmm, gather)
    return nr


def zap_present_folio_ptes(st: State, l, p: KernelProfile, vma, i: int, nr: int, head: int,
                           page: int, mm_id: int, rss: list[int], fullmm: bool,
                           gather: Gather) -> None:
    """zap_present_folio_ptes() — mm/memory.c: clear the run, file folios take its dirty bit"""
    anon = st.mem.test(head, PG_ANON)
    # clear_full_ptes(): contpte blocks the run covers in part are unfolded first (not when the
    # whole mm goes, where arm64 skips it).
    if not fullmm:
        contpte.unfold_partial(st, l, p, vma, i, nr)
    dirty = not anon and any(l.pte_dirty(x) for x in vma.ptes[i:i + nr])  # get_and_clear_full_ptes()
    vma.ptes[i:i + nr] = [l.none_value] * nr
    st.op.pte_writes += nr
    st.op.tlb_flush_pages += nr
    if dirty:
        st.mem.set(head, PG_DIRTY)
    rss[mm_counter(st.mem, head)] -= nr
    st.rmap(p).remove_ptes(head, page, nr, mm_id)
    gather.append((head, nr))


def tlb_finish(st: State, p: KernelProfile, gather: Gather) -> None:
    """tlb_finish_mmu() — mm/mmu_gather.c: the TLB is flushed, now the references go"""
    r = st.rmap(p)
    for head, nr in gather:
        r.put_refs(head, nr)


def munmap(st: State, l, p: KernelProfile, k: int, a: int, b: int) -> None:
    """do_vmi_munmap() — mm/vma.c: VMAs split at the ends, zapped and removed"""
    huge_memory.split_huge_pmd_at(st, l, p, k, a)
    huge_memory.split_huge_pmd_at(st, l, p, k, b)
    contpte.unfold_at_split(st, l, p, k, a)
    contpte.unfold_at_split(st, l, p, k, b)
    r = st.mms[k].isolate(a, b)
    gather: Gather = []
    for v in r:
        zap_vma_range(st, l, p, k, v, 0, len(st.mms[k].vmas[v].ptes), False, gather)
    del st.mms[k].vmas[r.start:r.stop]
    tlb_finish(st, p, gather)


def exit_mm(st: State, l, p: KernelProfile, k: int) -> None:
    """exit_mmap() — mm/mmap.c: every VMA zapped (full-mm gather), the mm marked exited"""
    gather: Gather = []
    for v in range(len(st.mms[k].vmas)):
        zap_vma_range(st, l, p, k, v, 0, len(st.mms[k].vmas[v].ptes), True, gather)
    st.mms[k].vmas.clear()
    st.mms[k].exited = True
    tlb_finish(st, p, gather)


def madv_dontneed(st: State, l, p: KernelProfile, k: int, a: int, b: int) -> None:
    """madvise_dontneed_single_vma() — mm/madvise.c: zap without touching the VMAs"""
    gather: Gather = []
    for v, vma in enumerate(st.mms[k].vmas):
        s, e = max(vma.start, a), min(vma.end(), b)
        if s < e:
            zap_vma_range(st, l, p, k, v, s - vma.start, e - vma.start, False, gather)
    tlb_finish(st, p, gather)

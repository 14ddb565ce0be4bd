"""PMD-mapped THP (rust/src/huge_memory.rs; mm/huge_memory.c, mm/rmap.c, include/linux/rmap.h,
v6.8 – v7.0): the huge PMD fault and the huge zero page, the write fault on a huge PMD,
copy_huge_pmd() at fork, zap_huge_pmd(), change_huge_pmd() and __split_huge_pmd() into PTEs of
the same folio.

A VMA keeps its huge PMDs in ``Vma.pmds``: the first vpn of a PMD-aligned range → the PMD entry,
encoded as a PTE of the layout (so the PTE accessors read it). The PTEs of that range stay none.
The huge zero page is a PMD of the zero pfn, special and read-only, tracked by no counter.
"""

from __future__ import annotations

from . import contpte
from .kernel import KernelProfile
from .memory import PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_PARTIALLY_MAPPED, PG_SWAPBACKED
from .mm import MM_ANONPAGES, mm_counter
from .state import State

HEAD, PER_PAGE, FOLIO = "head", "per-page", "folio"


def _at_least(p: KernelProfile, major: int, minor: int) -> bool:
    return p.version is not None and p.version >= (major, minor)


def huge_zero_wp_allocates(p: KernelProfile) -> bool:
    """do_huge_zero_wp_pmd() (v6.13): a write to the huge zero PMD maps a new PMD THP."""
    return _at_least(p, 6, 13)


def pmd_pagemap_exclusive(p: KernelProfile) -> str:
    """How pagemap_pmd_range() — fs/proc/task_mmu.c decides PM_MMAP_EXCLUSIVE: the head page's
    (precise) mapcount up to v6.10 and again from v6.15, each page's in v6.11 – v6.14,
    folio_maybe_mapped_shared() in the newest tree."""
    if p.pagemap_exclusive_by_folio:
        return FOLIO
    if _at_least(p, 6, 15) or not _at_least(p, 6, 11):
        return HEAD
    return PER_PAGE


# ---- PMD-level rmap (mm/rmap.c, include/linux/rmap.h) ------------------------------------------

def add_new_anon_pmd(r, head: int, mm_id: int) -> None:
    """folio_add_new_anon_rmap(RMAP_EXCLUSIVE) of a PMD-mappable folio: entire mapcount 0, large
    mapcount 1 (slot 0), no PTE-mapped page, PageAnonExclusive on the head only."""
    r.stats.rmap_calls += 1
    r.mem.set(head, PG_ANON | PG_SWAPBACKED | PG_ANON_EXCLUSIVE)
    lf = r.mem.lf(head)
    lf.entire_mapcount = 0
    lf.large_mapcount = 0
    lf.nr_pages_mapped = 0
    if r.profile.mm_id:
        lf.mm_id[0] = mm_id
        lf.mm_id_mapcount[0] = 0
    r.stats.mapcount_updates += 2


def try_dup_anon_pmd(r, head: int, dst_mm: int, src_has_pinned: bool) -> bool:
    """folio_try_dup_anon_rmap_pmd(): -EBUSY when the head is exclusive and maybe pinned."""
    r.stats.rmap_calls += 1
    if r.mem.test(head, PG_ANON_EXCLUSIVE):
        if src_has_pinned and r.mem.folio_maybe_dma_pinned(head):
            return False
        r.mem.clear(head, PG_ANON_EXCLUSIVE)
    r.mem.lf(head).entire_mapcount += 1
    r.stats.mapcount_updates += 1
    r.add_large_mapcount(head, 1, dst_mm)
    return True


def add_anon_ptes(r, head: int, page: int, nr: int, mm_id: int, exclusive: bool) -> None:
    """folio_add_anon_rmap_ptes(): PTE mappings of pages of a folio already mapped."""
    r.stats.rmap_calls += 1
    first = 0
    for p in range(page, page + nr):
        if r.mem.mapcount[p] == 0:
            first += 1
        r.mem.mapcount[p] += 1
        if exclusive:
            r.mem.set(p, PG_ANON_EXCLUSIVE)
    r.stats.mapcount_updates += nr
    r.mem.lf(head).nr_pages_mapped += first
    r.add_large_mapcount(head, nr, mm_id)


def remove_pmd(r, head: int, mm_id: int) -> None:
    """folio_remove_rmap_pmd(): deferred split when the last entire mapping goes and some, not
    all, pages stay PTE-mapped."""
    r.stats.rmap_calls += 1
    r.sub_large_mapcount(head, 1, mm_id)
    r.stats.mapcount_updates += 1
    nr_pages = 1 << r.mem.folio_order(head)
    lf = r.mem.lf(head)
    lf.entire_mapcount -= 1
    if lf.entire_mapcount >= 0:
        return
    nr = nr_pages - lf.nr_pages_mapped  # pages not also PTE-mapped
    if 0 < nr < nr_pages and r.mem.test(head, PG_ANON) and not r.mem.test(head, PG_PARTIALLY_MAPPED):
        r.mem.set(head, PG_PARTIALLY_MAPPED)
        r.stats.deferred_splits += 1


# ---- the page-table side ------------------------------------------------------------------------

def pmd_base(st: State, vpn: int) -> int:
    return vpn & ~(st.ptrs_per_pte - 1)


def huge_pmd(st: State, vma, vpn: int) -> tuple[int, int] | None:
    """(first vpn, PMD entry) of the huge PMD mapping ``vpn``, if any."""
    if not vma.pmds:
        return None
    base = pmd_base(st, vpn)
    e = vma.pmds.get(base)
    return None if e is None else (base, e)


def huge_pmd_page(st: State, l, vma, vpn: int):
    """The page a huge PMD maps at ``vpn``: (True, None) for the huge zero page, (True, pfn), or
    (False, None) when no huge PMD maps it."""
    hit = huge_pmd(st, vma, vpn)
    if hit is None:
        return False, None
    base, e = hit
    pfn = l.pte_pfn(e)
    return True, (None if pfn == st.zero_pfn else pfn + (vpn - base))


def fault_pmd(l, vma, head: int) -> int:
    """mk_huge_pmd(page, vm_page_prot), then maybe_pmd_mkwrite(pmd_mkdirty()) — map_anon_folio_pmd()"""
    e = l.pte_mkdirty(l.pfn_pte_template(head, vma.prot.exec, vma.prot.none()))
    return l.pte_mkwrite(e) if vma.prot.write else e


def alloc_pmd_folio(st: State) -> int | None:
    """vma_alloc_anon_folio_pmd(): a PMD-sized folio, or None (memory or simulated fragmentation)."""
    order = st.pmd_order
    if st.mem.fragmented(order):
        return None
    head = st.mem.alloc(order)
    if head is None:
        return None
    st.op.allocated(order)
    return head


def do_huge_pmd_anonymous_page(st: State, l, p: KernelProfile, k: int, v: int, vpn: int,
                               write: bool) -> bool:
    """do_huge_pmd_anonymous_page() — mm/huge_memory.c: one PMD for the aligned range holding
    ``vpn`` when it lies in the VMA and its page table is empty: the huge zero page on a read
    fault, else a new PMD-sized folio. False is VM_FAULT_FALLBACK (the PTE path goes on)."""
    from .fault import ensure_anon_vma

    n = st.ptrs_per_pte
    base = pmd_base(st, vpn)
    vma = st.mms[k].vmas[v]
    if (not vma.is_anon() or vma.uffd_wp or base < vma.start or base + n > vma.end()
            or base in vma.pmds):
        return False
    s = base - vma.start
    if not all(l.pte_none(e) for e in vma.ptes[s:s + n]):
        return False
    ensure_anon_vma(st, k, v)
    if not write:
        # mm_get_huge_zero_folio(), set_huge_zero_folio(): special, read-only.
        vma.pmds[base] = l.pte_mkspecial(l.pfn_pte_template(st.zero_pfn, vma.prot.exec, vma.prot.none()))
        return True
    head = alloc_pmd_folio(st)
    if head is None:
        return False
    add_new_anon_pmd(st.rmap(p), head, st.mms[k].mm_id)
    st.mms[k].rss[MM_ANONPAGES] += n
    vma.pmds[base] = fault_pmd(l, vma, head)
    return True


def huge_pmd_access(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, write: bool) -> bool:
    """An access under a huge PMD: do_huge_pmd_wp_page() for a write to a read-only PMD, then the
    MMU's accessed/dirty update and, for a write, a new token. False where no huge PMD maps it."""
    vma = st.mms[k].vmas[v]
    hit = huge_pmd(st, vma, vpn)
    if hit is None:
        return False
    base, e = hit
    st.op.pte_reads += 1
    if write and not l.pte_write(e) and not do_huge_pmd_wp_page(st, l, p, k, v, base, False):
        return False
    e = vma.pmds[base]
    if not l.pte_young(e):
        e = l.pte_mkyoung(e)
    if write and not l.pte_dirty(e):
        e = l.pte_mkdirty(e)
    vma.pmds[base] = e
    if write:
        st.mem.token[l.pte_pfn(e) + (vpn - base)] = st.new_token()
    return True


def do_huge_pmd_wp_page(st: State, l, p: KernelProfile, k: int, v: int, base: int,
                        unshare: bool) -> bool:
    """do_huge_pmd_wp_page() — mm/huge_memory.c: the huge zero page gets a new THP (v6.13+);
    an exclusive head, or a folio whose only reference is this PMD, is reused; else the PMD is
    split and the fault falls back to the PTEs (False)."""
    st.op.faults += 1
    vma = st.mms[k].vmas[v]
    e = vma.pmds[base]
    pfn = l.pte_pfn(e)
    if pfn == st.zero_pfn:
        if huge_zero_wp_allocates(p):
            head = alloc_pmd_folio(st)
            if head is not None:
                add_new_anon_pmd(st.rmap(p), head, st.mms[k].mm_id)
                st.mms[k].rss[MM_ANONPAGES] += st.ptrs_per_pte
                st.op.tlb_flush_ranges += 1  # pmdp_huge_clear_flush() of the zero PMD
                vma.pmds[base] = fault_pmd(l, vma, head)
                return True
        split_huge_pmd(st, l, p, k, v, base)
        return False
    head = pfn
    if st.mem.test(head, PG_ANON_EXCLUSIVE) or st.mem.refcount[head] == 1:
        st.mem.set(head, PG_ANON_EXCLUSIVE)
        st.op.cow_reuses += 1
        if unshare:
            return True
        n = l.pte_mkdirty(l.pte_mkyoung(e))
        vma.pmds[base] = l.pte_mkwrite(n) if vma.prot.write else n
        return True
    split_huge_pmd(st, l, p, k, v, base)
    return False


def split_huge_pmd(st: State, l, p: KernelProfile, k: int, v: int, base: int) -> None:
    """__split_huge_pmd_locked() — mm/huge_memory.c: the same folio mapped by PTEs with the PMD's
    write, young, dirty, soft-dirty and uffd-wp bits; a reference per PTE; the head's
    exclusivity on every page (RMAP_EXCLUSIVE); then the entire mapping removed. A huge zero PMD
    becomes zero-page PTEs (__split_huge_zero_page_pmd())."""
    nr = st.ptrs_per_pte
    vma = st.mms[k].vmas[v]
    e = vma.pmds.pop(base)
    st.op.pmd_splits += 1
    st.op.tlb_flush_ranges += 1  # pmdp_invalidate()
    i = base - vma.start
    prot = vma.prot
    pfn = l.pte_pfn(e)
    if pfn == st.zero_pfn:
        z = l.pte_mkspecial(l.pfn_pte_template(st.zero_pfn, prot.exec, prot.none()))
        if l.pte_uffd_wp(e):
            z = l.set_uffd_wp_bit(z)
        for j in range(nr):
            contpte.set_pte(st, l, p, vma, i + j, z)
        return
    head = pfn
    if l.pte_dirty(e):
        st.mem.set(head, PG_DIRTY)
    exclusive = st.mem.test(head, PG_ANON_EXCLUSIVE)
    mm_id = st.mms[k].mm_id
    r = st.rmap(p)
    r.ref_add(head, nr - 1)
    add_anon_ptes(r, head, head, nr, mm_id, exclusive)
    t = l.pfn_pte_template(head, prot.exec, prot.none())  # mk_pte(page + i, vm_page_prot)
    if l.pte_write(e):
        t = l.pte_mkwrite(t)
    if not l.pte_young(e):
        t = l.pte_mkold(t)
    if l.pte_dirty(e):
        t = l.pte_mkdirty(t)
    if l.pte_soft_dirty(e):
        t = l.pte_mksoft_dirty(t)
    if l.pte_uffd_wp(e):
        t = l.set_uffd_wp_bit(t)
    contpte.set_ptes(st, l, p, vma, i, t, nr)
    remove_pmd(st.rmap(p), head, mm_id)


def split_huge_pmd_at(st: State, l, p: KernelProfile, k: int, vpn: int) -> None:
    """split_huge_pmd_address() from vma_adjust_trans_huge(): a VMA split at a vpn that is not
    PMD-aligned splits the huge PMD straddling it first."""
    base = pmd_base(st, vpn)
    if base == vpn:
        return
    v = st.mms[k].find_vma(vpn)
    if v is not None and base in st.mms[k].vmas[v].pmds:
        split_huge_pmd(st, l, p, k, v, base)


def copy_huge_pmds(st: State, l, p: KernelProfile, k: int, vi: int, dst_mm_id: int,
                   has_pinned: bool, dst, rss: list[int]) -> None:
    """copy_huge_pmd() — mm/huge_memory.c for each huge PMD of the parent's VMA: the child's PMD
    made old and read-only (uffd-wp only if the child VMA keeps it), the parent's write-
    protected; a maybe-pinned exclusive folio splits the parent's PMD and its PTEs are copied
    by copy_pte_range() afterwards (-EAGAIN in the kernel)."""
    src = st.mms[k].vmas[vi]
    nr = st.ptrs_per_pte
    for base in sorted(src.pmds):
        e = src.pmds[base]
        pfn = l.pte_pfn(e)
        if pfn != st.zero_pfn:
            r = st.rmap(p)
            r.ref_add(pfn, 1)
            if not try_dup_anon_pmd(r, pfn, dst_mm_id, has_pinned):
                r.put_refs(pfn, 1)
                split_huge_pmd(st, l, p, k, vi, base)
                continue
            rss[mm_counter(st.mem, pfn)] += nr
        st.op.pmd_copies += 1
        src.pmds[base] = l.pte_wrprotect(e)  # pmdp_set_wrprotect()
        c = e if dst.uffd_wp else l.clear_uffd_wp_bit(e)
        dst.pmds[base] = l.pte_mkold(l.pte_wrprotect(c))


def zap_huge_pmd_range(st: State, l, p: KernelProfile, k: int, v: int, s: int, e: int,
                       gather: list) -> bool:
    """zap_pmd_range() — mm/memory.c for entries [s, e): a huge PMD covered whole is zapped
    (zap_huge_pmd(), True); one covered in part is split and the PTE zap goes on (False)."""
    vma = st.mms[k].vmas[v]
    vpn = vma.start + s
    hit = huge_pmd(st, vma, vpn)
    if hit is None:
        return False
    base, pmd = hit
    nr = st.ptrs_per_pte
    if vpn != base or e - s != nr:
        split_huge_pmd(st, l, p, k, v, base)
        return False
    del vma.pmds[base]
    st.op.pmd_zaps += 1
    st.op.tlb_flush_ranges += 1
    st.op.tlb_flush_pages += nr
    pfn = l.pte_pfn(pmd)
    if pfn == st.zero_pfn:
        return True
    remove_pmd(st.rmap(p), pfn, st.mms[k].mm_id)
    st.mms[k].rss[mm_counter(st.mem, pfn)] -= nr
    gather.append((pfn, 1))  # tlb_remove_page_size(): the PMD's one reference
    return True


def change_huge_pmd_range(st: State, l, p: KernelProfile, vma, s: int, e: int,
                          uffd: bool | None) -> bool:
    """change_pmd_range() — mm/mprotect.c for entries [s, e): a huge PMD covered whole takes the
    new protection (change_huge_pmd(), True); one covered in part is split (False)."""
    from .mprotect import can_change_pte_writable, pte_modify

    vpn = vma.start + s
    hit = huge_pmd(st, vma, vpn)
    if hit is None:
        return False
    base, old = hit
    if vpn != base or e - s != st.ptrs_per_pte:
        k = next(i for i, mm in enumerate(st.mms) if any(x is vma for x in mm.vmas))
        v = next(i for i, x in enumerate(st.mms[k].vmas) if x is vma)
        split_huge_pmd(st, l, p, k, v, base)
        return False
    page_prot_write = st.page_prot_write(l, vma)
    try_writable = uffd is not True and (
        st.wants_writenotify(l, vma) if vma.shared else vma.prot.write)
    n = pte_modify(l, old, vma.prot, page_prot_write)  # pmd_modify()
    if uffd is True:
        n = l.set_uffd_wp_bit(l.pte_wrprotect(n))
    elif uffd is False:
        n = l.clear_uffd_wp_bit(n)
    if try_writable and not l.pte_write(n):
        page = l.pte_pfn(n)
        # can_change_pmd_writable(): as for PTEs, with the head page's exclusivity.
        if can_change_pte_writable(st, l, vma, n, None if page == st.zero_pfn else page):
            n = l.pte_mkwrite(n)
    vma.pmds[base] = n
    st.op.tlb_flush_ranges += 1
    return True


def clear_soft_dirty_pmds(st: State, l, k: int) -> None:
    """clear_soft_dirty_pmd() — fs/proc/task_mmu.c: write-protected, soft-dirty cleared."""
    writes = 0
    for vma in st.mms[k].vmas:
        for base in vma.pmds:
            vma.pmds[base] = l.pte_clear_soft_dirty(l.pte_wrprotect(vma.pmds[base]))
            writes += 1
    st.op.pte_writes += writes


def gup_huge_pmd(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, write: bool,
                 longterm: bool) -> int | None:
    """GUP on a huge PMD (follow_huge_pmd() — mm/gup.c): a FOLL_WRITE pin of a read-only PMD
    breaks COW, a R/O pin gup_must_unshare() asks for (on the head page) unshares; the pfn
    pinned, or None where no huge PMD maps ``vpn`` (any more)."""
    vma = st.mms[k].vmas[v]
    hit = huge_pmd(st, vma, vpn)
    if hit is None:
        return None
    base, e = hit
    pfn = l.pte_pfn(e)
    if write and not l.pte_write(e):
        if not do_huge_pmd_wp_page(st, l, p, k, v, base, False):
            return None
    elif not write and not l.pte_write(e):
        if pfn == st.zero_pfn:
            must_unshare = longterm and vma.is_cow()
        else:
            must_unshare = not st.mem.test(pfn, PG_ANON_EXCLUSIVE)
        if must_unshare and not do_huge_pmd_wp_page(st, l, p, k, v, base, True):
            return None
    pfn = l.pte_pfn(vma.pmds[base])
    return pfn if pfn == st.zero_pfn else pfn + (vpn - base)  # one zero pfn for the huge zero page

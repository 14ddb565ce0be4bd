"""What /proc shows: /proc/<pid>/pagemap entries (huge PMDs included), /proc/kpagecount,
/proc/kpageflags and smaps' AnonHugePages (rust/src/procfs.rs; fs/proc/task_mmu.c,
fs/proc/page.c)."""

from __future__ import annotations

from . import huge_memory
from .errors import value_error
from .kernel import KernelProfile
from .memory import PG_ANON, PG_MAYBE_SHARED
from .state import State

PM_PFRAME_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_PRESENT = 1 << 63

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_MMAP = 1 << 11
KPF_ANON = 1 << 12
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24


def precise_page_mapcount(st: State, pfn: int) -> int:
    """folio_precise_page_mapcount() (page_mapcount() before v6.12): the page's PTE mappings plus
    the folio's entire (PMD) mappings."""
    lf = st.mem.large.get(st.mem.folio_head(pfn))
    return st.mem.mapcount[pfn] + (lf.entire_mapcount + 1 if lf is not None else 0)


def folio_maybe_mapped_shared(st: State, head: int) -> bool:
    """folio_maybe_mapped_shared() — include/linux/mm.h (v6.15+)"""
    mapcount = st.mem.folio_mapcount(head)
    if st.mem.folio_order(head) == 0:
        return mapcount > 1
    return mapcount > 1 and st.mem.test(head, PG_MAYBE_SHARED)


def pagemap(st: State, l, p: KernelProfile, k: int, a: int, b: int) -> list[int]:
    """pagemap_read() of [a, b) — fs/proc/task_mmu.c, as root (PFNs shown)"""
    mm = st.mms[k]
    out = []
    for vpn in range(a, b):
        v = mm.find_vma(vpn)
        if v is None:
            out.append(0)
            continue
        vma = mm.vmas[v]
        hit = huge_memory.huge_pmd(st, vma, vpn)
        if hit is not None:
            out.append(pmd_pagemap_entry(st, l, p, vma, hit[0], hit[1], vpn))
        else:
            out.append(pte_to_pagemap_entry(st, l, p, vma, vpn))
    return out


def pmd_pagemap_entry(st: State, l, p: KernelProfile, vma, base: int, e: int, vpn: int) -> int:
    """pagemap_pmd_range() — fs/proc/task_mmu.c: the entry of ``vpn`` under a huge PMD"""
    flags = PM_SOFT_DIRTY if l.has_soft_dirty and vma.vm_softdirty else 0
    flags |= PM_PRESENT
    if l.pte_soft_dirty(e):
        flags |= PM_SOFT_DIRTY
    if l.pte_uffd_wp(e):
        flags |= PM_UFFD_WP
    head = l.pte_pfn(e)
    rule = huge_memory.pmd_pagemap_exclusive(p)
    if head == st.zero_pfn:
        # The huge zero folio: not anonymous, never rmap-mapped; shown as the one zero pfn.
        if rule == huge_memory.FOLIO:
            flags |= PM_MMAP_EXCLUSIVE
        return (head & PM_PFRAME_MASK) | flags | PM_FILE
    frame = head + (vpn - base)
    if rule == huge_memory.HEAD:
        exclusive = precise_page_mapcount(st, head) == 1
    elif rule == huge_memory.PER_PAGE:
        exclusive = precise_page_mapcount(st, frame) == 1
    else:
        exclusive = not folio_maybe_mapped_shared(st, head)
    if exclusive:
        flags |= PM_MMAP_EXCLUSIVE
    return (frame & PM_PFRAME_MASK) | flags


def pte_to_pagemap_entry(st: State, l, p: KernelProfile, vma, vpn: int) -> int:
    """pte_to_pagemap_entry() — fs/proc/task_mmu.c"""
    flags = 0
    if l.has_soft_dirty and vma.vm_softdirty:
        flags |= PM_SOFT_DIRTY  # VM_SOFTDIRTY reports every page soft-dirty
    pte = vma.ptes[vpn - vma.start]
    if l.pte_none(pte):
        return flags
    flags |= PM_PRESENT
    if l.pte_soft_dirty(pte):
        flags |= PM_SOFT_DIRTY
    if l.pte_uffd_wp(pte):
        flags |= PM_UFFD_WP
    page = st.vm_normal_page(l, pte)
    if page is not None:
        head = st.mem.folio_head(page)
        if not st.mem.test(head, PG_ANON):
            flags |= PM_FILE
        if p.pagemap_exclusive_by_folio:
            exclusive = not folio_maybe_mapped_shared(st, head)
        else:
            exclusive = precise_page_mapcount(st, page) == 1  # CONFIG_PAGE_MAPCOUNT
        if exclusive:
            flags |= PM_MMAP_EXCLUSIVE
    return (l.pte_pfn(pte) & PM_PFRAME_MASK) | flags


def kpagecount(st: State, pfn: int) -> int:
    """kpagecount_read() — fs/proc/page.c: the page's mapcount; 0 for free pages and the zero page"""
    if pfn == st.zero_pfn:
        return 0
    if pfn >= st.mem.nr_pages():
        raise value_error(f"pfn {pfn:#x} is beyond the {st.mem.nr_pages()} pages of memory")
    return 0 if st.mem.is_free(pfn) else precise_page_mapcount(st, pfn)


def kpageflags(st: State, pfn: int) -> int:
    """stable_page_flags() — fs/proc/page.c, the bits the model knows: KPF_ANON, KPF_MMAP,
    KPF_COMPOUND_HEAD/TAIL and KPF_THP for large folios (any order), KPF_ZERO_PAGE."""
    if pfn == st.zero_pfn:
        return KPF_ZERO_PAGE
    if pfn >= st.mem.nr_pages():
        raise value_error(f"pfn {pfn:#x} is beyond the {st.mem.nr_pages()} pages of memory")
    if st.mem.is_free(pfn):
        return 0
    head = st.mem.folio_head(pfn)
    f = KPF_ANON if st.mem.test(head, PG_ANON) else 0
    if st.mem.folio_mapcount(head) > 0:
        f |= KPF_MMAP
    if st.mem.folio_order(head) > 0:
        f |= KPF_THP | (KPF_COMPOUND_HEAD if pfn == head else KPF_COMPOUND_TAIL)
    return f


def anon_huge_pages(st: State, l, vma) -> int:
    """smaps' AnonHugePages of a VMA in pages (smaps_pmd_entry(); the huge zero page does not count)."""
    return sum(1 for e in vma.pmds.values() if l.pte_pfn(e) != st.zero_pfn) * st.ptrs_per_pte

"""What /proc shows: /proc/<pid>/pagemap entries and /proc/kpagecount (rust/src/procfs.rs;
fs/proc/task_mmu.c, fs/proc/page.c)."""

from __future__ import annotations

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
        out.append(pte_to_pagemap_entry(st, l, p, mm.vmas[v], vpn))
    return out


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
            exclusive = st.mem.mapcount[page] == 1  # CONFIG_PAGE_MAPCOUNT
        if exclusive:
            flags |= PM_MMAP_EXCLUSIVE
    return (l.pte_pfn(pte) & PM_PFRAME_MASK) | flags


def kpagecount(st: State, pfn: int) -> int:
    """kpagecount_read() — fs/proc/page.c: the page's mapcount; 0 for free pages and the zero page"""
    if pfn == st.zero_pfn:
        return 0
    if pfn >= st.mem.nr_pages():
        raise value_error(f"pfn {pfn:#x} is beyond the {st.mem.nr_pages()} pages of memory")
    return 0 if st.mem.is_free(pfn) else st.mem.mapcount[pfn]

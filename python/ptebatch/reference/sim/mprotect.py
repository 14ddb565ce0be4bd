"""mprotect(): change_protection() → change_pte_range() (rust/src/mprotect.rs; mm/mprotect.c).
Per PTE up to v6.16; from v6.17 runs of one large folio at once, whose young and dirty bits
are read into one value (modify_prot_start_ptes())."""

from __future__ import annotations

from . import contpte, huge_memory
from .batching import folio_pte_batch, fpb_flags
from .kernel import KernelProfile
from .memory import PG_ANON, PG_ANON_EXCLUSIVE
from .mm import Prot, Vma
from .state import State


def pte_modify(l, old: int, prot: Prot, page_prot_write: bool) -> int:
    """pte_modify(pte, newprot): new permissions; pfn, dirty, young, soft-dirty, uffd-wp, special kept"""
    n = l.pfn_pte_template(l.pte_pfn(old), prot.exec, prot.none())
    if page_prot_write and not prot.none():
        n = l.pte_mkwrite(n)
    if l.pte_dirty(old):
        n = l.pte_mkdirty(n)
    n = l.pte_mkyoung(n) if l.pte_young(old) else l.pte_mkold(n)
    n = l.pte_mksoft_dirty(n) if l.pte_soft_dirty(old) else l.pte_clear_soft_dirty(n)
    if l.pte_uffd_wp(old):
        n = l.set_uffd_wp_bit(n)
    if l.pte_special(old):
        n = l.pte_mkspecial(n)
    return n


def mprotect(st: State, l, p: KernelProfile, k: int, a: int, b: int, prot: Prot) -> None:
    """mprotect_fixup() — mm/mprotect.c: split and merge the VMAs of [a, b) first, then
    change_protection() the range"""
    huge_memory.split_huge_pmd_at(st, l, p, k, a)
    huge_memory.split_huge_pmd_at(st, l, p, k, b)
    contpte.unfold_at_split(st, l, p, k, a)
    contpte.unfold_at_split(st, l, p, k, b)
    st.mms[k].modify(p, a, b, lambda v: setattr(v, "prot", prot))
    change_range(st, l, p, k, a, b, None)


def change_range(st: State, l, p: KernelProfile, k: int, a: int, b: int,
                 uffd: bool | None) -> None:
    """change_protection() over [a, b) (vpns) across the VMAs there."""
    for vma in st.mms[k].vmas:
        s, e = max(vma.start, a), min(vma.end(), b)
        if s < e:
            change_protection(st, l, p, vma, s - vma.start, e - vma.start, uffd)


def uffd_writeprotect(st: State, l, p: KernelProfile, k: int, a: int, b: int, enable: bool) -> None:
    """mwriteprotect_range() — mm/userfaultfd.c: change_protection() with MM_CP_UFFD_WP(_RESOLVE)"""
    change_range(st, l, p, k, a, b, enable)


def can_change_pte_writable(st: State, l, vma: Vma, pte: int, page: int | None) -> bool:
    """can_change_pte_writable() — mm/mprotect.c"""
    if not vma.prot.write or l.pte_protnone(pte):
        return False
    if vma.soft_dirty_tracking(l) and not l.pte_soft_dirty(pte):
        return False
    if vma.uffd_wp and l.pte_uffd_wp(pte):
        return False
    if not vma.shared:
        return page is not None and (st.mem.test(st.mem.folio_head(page), PG_ANON)
                                     and st.mem.test(page, PG_ANON_EXCLUSIVE))
    return l.pte_dirty(pte)


def change_protection(st: State, l, p: KernelProfile, vma: Vma, lo: int, hi: int,
                      uffd: bool | None) -> None:
    """change_protection() — mm/mprotect.c: change_pte_range() per page table over entries [lo, hi).

    ``uffd``: True for MM_CP_UFFD_WP, False for MM_CP_UFFD_WP_RESOLVE, None for mprotect.
    """
    ptrs = st.ptrs_per_pte
    s = lo
    while s < hi:
        e = min(hi, s + ptrs - ((vma.start + s) & (ptrs - 1)))
        if not huge_memory.change_huge_pmd_range(st, l, p, vma, s, e, uffd):
            change_pte_range(st, l, p, vma, s, e, uffd)
        s = e


def change_pte_range(st: State, l, p: KernelProfile, vma: Vma, s: int, e: int,
                     uffd: bool | None) -> None:
    """change_pte_range() — mm/mprotect.c: entries [s, e) of one page table"""
    page_prot_write = st.page_prot_write(l, vma)
    # vma_wants_manual_pte_write_upgrade(); UFFDIO_WRITEPROTECT asks only when resolving.
    try_writable = uffd is not True and (
        st.wants_writenotify(l, vma) if vma.shared else vma.prot.write)
    changed = False
    i = s
    while i < e:
        old = vma.ptes[i]
        st.op.pte_reads += 1
        if l.pte_none(old):
            i += 1
            continue
        changed = True
        page = st.vm_normal_page(l, old)
        nr = 1
        if page is not None and e - i > 1 and p.fpb is not None and p.mprotect_batched:
            head = st.mem.folio_head(page)
            order = st.mem.folio_order(head)
            if order > 0:
                flags = fpb_flags(p.fpb, respect_soft_dirty=True, respect_write=True)
                nr = folio_pte_batch(l, p.fpb, vma.ptes, vma.start, i, e - i, head, 1 << order,
                                     flags).nr
                st.op.folio_pte_batch_calls += 1
                st.op.pte_reads += nr
        st.op.batch(nr)
        # modify_prot_start_ptes() clears the run; on arm64 (get_and_clear_ptes) that first
        # unfolds the contpte blocks the run covers in part, repainting them.
        contpte.unfold_partial(st, l, p, vma, i, nr)
        ptent = pte_modify(l, modify_prot_start_ptes(l, vma.ptes[i:i + nr]), vma.prot,
                           page_prot_write)
        if uffd is True:
            ptent = l.set_uffd_wp_bit(l.pte_wrprotect(ptent))
        elif uffd is False:
            ptent = l.clear_uffd_wp_bit(ptent)
        out = []
        # commit_anon_folio_batch() commits private anonymous runs in sub-batches of equal
        # PageAnonExclusive when it may make them writable.
        split = not vma.shared and try_writable and not l.pte_write(ptent) and page is not None
        for j in range(nr):
            x = l.pte_advance_pfn(ptent, j)
            if try_writable and not l.pte_write(x):
                # One decision per run for shared mappings, per page for private ones
                # (commit_anon_folio_batch() splits by exclusivity).
                if vma.shared:
                    writable = can_change_pte_writable(st, l, vma, ptent, page)
                else:
                    writable = can_change_pte_writable(st, l, vma, x,
                                                       None if page is None else page + j)
                if writable:
                    x = l.pte_mkwrite(x)
            out.append(x)
        # modify_prot_commit_ptes(): set_ptes() of each sub-batch (on arm64 that folds whole
        # aligned blocks, and a one-entry commit may fold a completed block).
        def excl(j: int) -> bool:
            return page is not None and st.mem.test(page + j, PG_ANON_EXCLUSIVE)

        j = 0
        while j < nr:
            end = j + 1
            while end < nr and (not split or excl(end) == excl(j)):
                end += 1
            contpte.set_ptes(st, l, p, vma, i + j, out[j], end - j)
            j = end
        i += nr
    if changed:
        st.op.tlb_flush_ranges += 1


def modify_prot_start_ptes(l, run: list[int]) -> int:
    """modify_prot_start_ptes() — mm/mprotect.c: the first PTE with the run's young and dirty OR-ed in"""
    merged = l.clear_cont_bit(run[0])
    for x in run[1:]:
        if l.pte_dirty(x):
            merged = l.pte_mkdirty(merged)
        if l.pte_young(x):
            merged = l.pte_mkyoung(merged)
    return merged

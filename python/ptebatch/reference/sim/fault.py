"""Page faults and accesses, GUP pins and the soft-dirty reset (rust/src/fault.rs; mm/memory.c,
mm/gup.c, fs/proc/task_mmu.c). File faults are in filemap.py."""

from __future__ import annotations

from .errors import fault, out_of_memory
from .kernel import MM_ID, REFCOUNT_ONE, KernelProfile
from .memory import PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_FILE, PG_MAYBE_SHARED, PG_SWAPBACKED
from .mm import MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, NOT_CACHED, Pin, mm_counter, user_pte
from . import contpte, filemap, huge_memory, policy
from .state import State

READ, WRITE = "read", "write"


def check_access(st: State, l, k: int, a: int, b: int, access: str) -> None:
    """The SIGSEGV / userfault checks of [a, b), made before anything changes (AccessFault)."""
    mm = st.mms[k]
    at = a
    while at < b:
        vma = mm.vmas[mm.find_vma(at)]
        ok = (vma.prot.read or vma.prot.write) if access == READ else vma.prot.write
        if not ok:
            raise fault(f"{access} of {at << st.page_shift:#x} in a {vma.prot.as_string()} "
                        "mapping: SIGSEGV")
        stop = min(vma.end(), b)
        if access == WRITE and vma.uffd_wp:
            for vpn in range(at, stop):
                pte = vma.ptes[vpn - vma.start]
                if not l.pte_none(pte) and l.pte_uffd_wp(pte):
                    raise fault(f"write to {vpn << st.page_shift:#x} hits a uffd-wp protected "
                                "PTE: the process would wait for the userfaultfd monitor")
        at = stop


def access(st: State, l, p: KernelProfile, k: int, vpn: int, acc: str) -> None:
    """handle_mm_fault() as needed, then the MMU's accessed/dirty update; a write stores a token."""
    write = acc == WRITE
    v, i = st.locate(k, vpn)
    if huge_memory.huge_pmd_access(st, l, p, k, v, vpn, write):
        return
    st.op.pte_reads += 1
    pte = st.mms[k].vmas[v].ptes[i]
    if l.pte_none(pte):
        fault_none(st, l, p, k, v, vpn, write)
        if huge_memory.huge_pmd_access(st, l, p, k, v, vpn, write):  # the fault mapped a PMD
            return
    elif write and not l.pte_write(pte):
        do_wp_page(st, l, p, k, v, i, unshare=False)
    ptes = st.mms[k].vmas[v].ptes
    pte = ptes[i]
    if not l.pte_young(pte):
        pte = l.pte_mkyoung(pte)
    if write and not l.pte_dirty(pte):
        pte = l.pte_mkdirty(pte)
    ptes[i] = pte
    if write:
        page = st.vm_normal_page(l, pte)
        assert page is not None, "a written page is never the zero page"
        st.mem.token[page] = st.new_token()


def fault_none(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, write: bool) -> None:
    """do_pte_missing() — mm/memory.c: anonymous or file fault on a none PTE."""
    st.op.faults += 1
    if st.mms[k].vmas[v].is_anon():
        do_anonymous_page(st, l, p, k, v, vpn, write)
    else:
        filemap.do_file_fault(st, l, p, k, v, vpn, write)


def ensure_anon_vma(st: State, k: int, v: int) -> None:
    """anon_vma_prepare() — mm/rmap.c"""
    if st.mms[k].vmas[v].anon_vma == 0:
        st.mms[k].vmas[v].anon_vma = st.new_anon_vma()


def do_anonymous_page(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, write: bool) -> None:
    """do_anonymous_page() with alloc_anon_folio() — mm/memory.c: a read maps the zero page; a
    write the largest folio the THP policy allows whose aligned range is in the VMA and all
    none, falling back to smaller orders. The PMD order comes first (__handle_mm_fault() calls
    create_huge_pmd() before the PTE path, which considers only orders below PMD_ORDER)."""
    vma = st.mms[k].vmas[v]
    # alloc_anon_folio(): a userfaultfd-armed VMA gets single pages (the model also keeps it
    # from the PMD order).
    allowed = 0 if vma.uffd_wp else policy.thp_vma_suitable_orders(vma, vpn, policy.thp_vma_allowable_orders(st, k, v))
    pmd_bit = 1 << st.pmd_order
    # __handle_mm_fault(): create_huge_pmd() first where the policy allows the PMD order (read
    # faults too: the huge zero page); pmd=True mappings always try it. An explicit size list
    # with the PMD size keeps the model's PTE-mapped PMD-sized folio.
    pmd_by_policy = vma.mthp == 0 and bool(allowed & pmd_bit)
    if (vma.thp_pmd or pmd_by_policy) and huge_memory.do_huge_pmd_anonymous_page(st, l, p, k, v, vpn, write):
        return
    vma = st.mms[k].vmas[v]
    i = vpn - vma.start
    if not write:
        zero = l.pfn_pte_template(st.zero_pfn, vma.prot.exec, False)
        contpte.set_pte(st, l, p, vma, i, l.pte_mkspecial(l.pte_mkyoung(zero)))
        return
    if not pmd_by_policy and allowed & pmd_bit and pmd_order_fault(st, l, p, k, v, vpn):
        return
    # alloc_anon_folio(): the highest order whose aligned range is all none.
    candidates: list[int] = []
    for o in range(st.pmd_order - 1, 0, -1):
        if not allowed & (1 << o):
            continue
        if not candidates:
            n = 1 << o
            s = (vpn & ~(n - 1)) - vma.start
            st.op.pte_reads += n
            if not all(l.pte_none(e) for e in vma.ptes[s:s + n]):
                continue
        candidates.append(o)
    chosen = None
    for o in candidates:
        if st.mem.fragmented(o):
            continue
        head = st.mem.alloc(o)
        if head is not None:
            chosen = (head, o)
            break
    if chosen is None:
        head = st.mem.alloc(0)
        if head is None:
            raise out_of_memory()
        chosen = (head, 0)
    map_new_anon_folio(st, l, p, k, v, vpn, *chosen)


def pmd_order_fault(st: State, l, p: KernelProfile, k: int, v: int, vpn: int) -> bool:
    """create_huge_pmd() → do_huge_pmd_anonymous_page() — mm/huge_memory.c, for a write the
    policy allows at the PMD order. Stand-in until PMD mappings are modelled: when the range is
    all none ("the PMD is none") a PMD-sized folio is mapped with PTEs. False is the kernel's
    VM_FAULT_FALLBACK (range in use, or no PMD-order memory)."""
    order = st.pmd_order
    n = 1 << order
    vma = st.mms[k].vmas[v]
    s = (vpn & ~(n - 1)) - vma.start
    st.op.pte_reads += n
    if not all(l.pte_none(e) for e in vma.ptes[s:s + n]) or st.mem.fragmented(order):
        return False
    head = st.mem.alloc(order)
    if head is None:
        return False
    map_new_anon_folio(st, l, p, k, v, vpn, head, order)
    return True


def map_new_anon_folio(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, head: int, order: int) -> None:
    """folio_add_new_anon_rmap() and set_ptes() of a new anonymous folio over its aligned range."""
    st.op.allocated(order)
    nr = 1 << order
    mm_id = st.mms[k].mm_id
    r = st.rmap(p)
    if nr > 1:
        r.ref_add(head, nr - 1)
    r.add_new_anon(head, mm_id)
    ensure_anon_vma(st, k, v)
    mm = st.mms[k]
    mm.rss[MM_ANONPAGES] += nr
    vma = mm.vmas[v]
    pte = user_pte(l, head, vma.prot, vma.prot.write, vma.prot.write)
    base = (vpn & ~(nr - 1)) - vma.start
    contpte.set_ptes(st, l, p, vma, base, pte, nr)


def wp_can_reuse_anon_folio(st: State, p: KernelProfile, head: int) -> bool:
    """wp_can_reuse_anon_folio() — mm/memory.c, per kernel version"""
    refs = st.mem.refcount[head]
    large = st.mem.folio_order(head) > 0
    if not large or p.large_cow_reuse == REFCOUNT_ONE:
        return refs == 1  # no LRU batches or swap cache in the model
    if p.large_cow_reuse != MM_ID:
        return False
    mapcount = st.mem.folio_mapcount(head)
    if mapcount <= 1 or st.mem.test(head, PG_MAYBE_SHARED):
        return False
    return mapcount == refs


def do_wp_page(st: State, l, p: KernelProfile, k: int, v: int, i: int, unshare: bool) -> None:
    """do_wp_page() — mm/memory.c: a write (or GUP unshare) on a present, non-writable PTE"""
    st.op.faults += 1
    vma = st.mms[k].vmas[v]
    pte = contpte.ptep_get(st, l, p, vma, i)
    if not vma.uffd_wp and l.pte_uffd_wp(pte):
        pte = l.clear_uffd_wp_bit(pte)  # a stale uffd-wp bit on an unregistered VMA
        contpte.set_pte(st, l, p, vma, i, pte)
        pte = contpte.ptep_get(st, l, p, vma, i)
    page = st.vm_normal_page(l, pte)
    if vma.shared:
        if unshare:
            return
        # wp_page_shared()
        set_access_flags(st, l, p, vma, i, l.pte_mkwrite(l.pte_mkdirty(l.pte_mkyoung(pte))))
        if page is not None:
            st.mem.set(st.mem.folio_head(page), PG_DIRTY)
        return
    if page is not None:
        head = st.mem.folio_head(page)
        if st.mem.test(head, PG_ANON) and (
                st.mem.test(page, PG_ANON_EXCLUSIVE) or wp_can_reuse_anon_folio(st, p, head)):
            st.mem.set(page, PG_ANON_EXCLUSIVE)
            st.op.cow_reuses += 1
            if unshare:
                return
            wp_page_reuse(st, l, p, vma, i, pte)
            return
    wp_page_copy(st, l, p, k, v, i, pte, page, unshare)


def wp_page_reuse(st: State, l, p: KernelProfile, vma, i: int, pte: int) -> None:
    """wp_page_reuse() — mm/memory.c: young, dirty and (if the VMA is writable) writable in place"""
    n = l.pte_mkdirty(l.pte_mkyoung(pte))
    if vma.prot.write:
        n = l.pte_mkwrite(n)
    set_access_flags(st, l, p, vma, i, n)


def set_access_flags(st: State, l, p: KernelProfile, vma, i: int, pte: int) -> None:
    """ptep_set_access_flags() for a write fault: on a contpte block the change of write
    permission unfolds the block first (arm64); then the one entry is written."""
    contpte.unfold(st, l, p, vma, i)
    vma.ptes[i] = l.clear_cont_bit(pte)
    st.op.pte_writes += 1


def wp_page_copy(st: State, l, p: KernelProfile, k: int, v: int, i: int, old: int,
                 page: int | None, unshare: bool) -> None:
    """wp_page_copy() — mm/memory.c: a new order-0 anonymous page replaces the mapped one"""
    new = st.mem.alloc(0)
    if new is None:
        raise out_of_memory()
    st.op.allocated(0)
    st.op.cow_copies += 1
    mm_id = st.mms[k].mm_id
    old_head = None if page is None else st.mem.folio_head(page)
    if page is not None:
        st.rmap(p).ref_add(old_head, 1)  # do_wp_page() holds a reference across the copy
        st.mem.token[new] = st.mem.token[page]
        st.op.pages_copied += 1
    old_counter = None
    if old_head is not None and not st.mem.test(old_head, PG_ANON):
        old_counter = mm_counter(st.mem, old_head)
    ensure_anon_vma(st, k, v)
    mm = st.mms[k]
    if page is None:
        mm.rss[MM_ANONPAGES] += 1
    elif old_counter is not None:
        mm.rss[old_counter] -= 1
        mm.rss[MM_ANONPAGES] += 1
    vma = mm.vmas[v]
    if unshare:
        n = user_pte(l, new, vma.prot, False, False)
        if l.pte_soft_dirty(old):
            n = l.pte_mksoft_dirty(n)
        if l.pte_uffd_wp(old):
            n = l.set_uffd_wp_bit(n)
    else:
        n = user_pte(l, new, vma.prot, vma.prot.write, True)
    contpte.unfold(st, l, p, st.mms[k].vmas[v], i)
    st.op.tlb_flush_ranges += 1  # ptep_clear_flush() of the old entry
    st.op.tlb_flush_pages += 1
    st.rmap(p).add_new_anon(new, mm_id)
    contpte.set_pte(st, l, p, st.mms[k].vmas[v], i, n)
    if page is not None:
        r = st.rmap(p)
        r.remove_ptes(old_head, page, 1, mm_id)
        r.put_refs(old_head, 1)  # the old PTE's reference
        r.put_refs(old_head, 1)  # do_wp_page()'s own


def pin_user_pages(st: State, l, p: KernelProfile, k: int, a: int, b: int, write: bool,
                   longterm: bool) -> int:
    """pin_user_pages() — mm/gup.c: fault in (breaking COW or unsharing), pin, set MMF_HAS_PINNED"""
    pfns = []
    for vpn in range(a, b):
        v, i = st.locate(k, vpn)
        pfn = huge_memory.gup_huge_pmd(st, l, p, k, v, vpn, write, longterm)
        if pfn is not None:
            pfns.append(pfn)
            continue
        st.op.pte_reads += 1
        if l.pte_none(st.mms[k].vmas[v].ptes[i]):
            fault_none(st, l, p, k, v, vpn, write)
            pfn = huge_memory.gup_huge_pmd(st, l, p, k, v, vpn, write, longterm)
            if pfn is not None:
                pfns.append(pfn)
                continue
        pte = contpte.ptep_get(st, l, p, st.mms[k].vmas[v], i)
        if write and not l.pte_write(pte):
            do_wp_page(st, l, p, k, v, i, unshare=False)
        elif not write and gup_must_unshare(st, l, k, v, pte, longterm):
            do_wp_page(st, l, p, k, v, i, unshare=True)
        pfns.append(l.pte_pfn(st.mms[k].vmas[v].ptes[i]))
    for pfn in pfns:
        if pfn != st.zero_pfn:
            st.rmap(p).pin(st.mem.folio_head(pfn))
    st.mms[k].has_pinned = True
    st.pins.append(Pin(pfns=pfns, write=write, longterm=longterm, active=True))
    return len(st.pins) - 1


def gup_must_unshare(st: State, l, k: int, v: int, pte: int, longterm: bool) -> bool:
    """gup_must_unshare() for a read-only FOLL_PIN — mm/internal.h"""
    vma = st.mms[k].vmas[v]
    page = st.vm_normal_page(l, pte)
    if page is not None and st.mem.test(st.mem.folio_head(page), PG_ANON):
        return not st.mem.test(page, PG_ANON_EXCLUSIVE)
    # The zero page and page-cache pages in a private mapping: only long-term pins copy.
    return longterm and vma.is_cow()


def clear_soft_dirty(st: State, l, k: int) -> None:
    """clear_refs_write() with CLEAR_REFS_SOFT_DIRTY — fs/proc/task_mmu.c"""
    writes = 0
    for vma in st.mms[k].vmas:
        vma.vm_softdirty = False
        for j, e in enumerate(vma.ptes):
            if not l.pte_none(e):
                vma.ptes[j] = l.pte_clear_soft_dirty(l.pte_wrprotect(e))
                writes += 1
    st.op.pte_writes += writes
    huge_memory.clear_soft_dirty_pmds(st, l, k)
    st.op.tlb_flush_ranges += 1

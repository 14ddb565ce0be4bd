"""Page-cache faults: do_read_fault() with fault-around (do_fault_around() -> filemap_map_pages()
-> filemap_map_folio_range() / set_pte_range()), do_shared_fault(), do_cow_fault() and
finish_fault() mapping a whole page-cache folio where the kernel version does
(rust/src/filemap.rs; mm/memory.c, mm/filemap.c).

Every cached page is uptodate and unlocked here, so fault-around maps every cached page of
its window whose PTE is none."""

from __future__ import annotations

from . import contpte, policy, shmem
from .errors import out_of_memory
from .kernel import FF_ANON_SHMEM, FF_ANY_FILE, FF_SHMEM, KernelProfile
from .memory import PG_DIRTY, PG_FILE, PG_SWAPBACKED
from .mm import ANON, FIXED, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, NOT_CACHED, user_pte
from .state import State


def file_counter(st: State, f: int) -> int:
    """mm_counter_file()"""
    return MM_SHMEMPAGES if st.files[f].shmem else MM_FILEPAGES


def filemap_get(st: State, l, p: KernelProfile, k: int, v: int, f: int, idx: int) -> int:
    """filemap_fault() / shmem_fault(): the cached page of file page ``idx``, read in if absent;
    a shmem object under a shmem policy chooses the order as mm/shmem.c does (shmem.py)."""
    file = st.files[f]
    cached = file.cache[idx]
    if cached != NOT_CACHED:
        return cached
    if file.kind == FIXED:
        order = file.folio_order
        got = None
        if order > 0:
            n = 1 << order
            base = idx & ~(n - 1)
            free = all(c == NOT_CACHED for c in file.cache[base:base + n])
            if free and not st.mem.fragmented(order):
                head = st.mem.alloc(order)
                if head is not None:
                    got = (head, order, base)
        if got is None:
            head = st.mem.alloc(0)
            if head is None:
                raise out_of_memory()
            got = (head, 0, idx)
    else:
        vma = st.mms[k].vmas[v]
        fault = shmem.ShmemFault(index=idx, i_size=file.nr_pages, kind=file.kind, huge=file.huge,
                                 vm_hugepage=vma.hugepage,
                                 vm_nohugepage=policy.vma_thp_disabled(vma, st.mms[k].thp_disable),
                                 vma_start=vma.start, vma_end=vma.end(), vma_pgoff=vma.pgoff,
                                 vpn=vma.start + (idx - vma.pgoff))
        got = shmem.shmem_alloc_folio(st, p, f, fault)
    head, order, base = got
    st.op.allocated(order)
    nr = 1 << order
    st.mem.refcount[head] = nr  # __filemap_add_folio(): one reference per page
    st.op.refcount_atomics += 1
    st.mem.set(head, PG_FILE | (PG_SWAPBACKED if file.shmem else 0))
    for j in range(nr):
        file.cache[base + j] = head + j
    return head + (idx - base)


def do_file_fault(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, write: bool) -> None:
    """do_fault() for a file VMA: do_read_fault(), do_cow_fault() or do_shared_fault()."""
    vma = st.mms[k].vmas[v]
    f = vma.file
    assert f is not None, "a file VMA"
    idx = vma.pgoff + (vpn - vma.start)
    if write and not vma.shared:
        do_cow_fault(st, l, p, k, v, vpn, f, idx)
        return
    # should_fault_around(): every object has ->map_pages; uffd-wp registration disables it.
    if not write and not vma.uffd_wp and st.fault_around_pages > 1 and do_fault_around(st, l, p, k, v, vpn):
        return
    page = filemap_get(st, l, p, k, v, f, idx)
    if write:
        st.mem.set(st.mem.folio_head(page), PG_DIRTY)
    finish_fault(st, l, p, k, v, vpn, page, write)


def do_cow_fault(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, f: int, idx: int) -> None:
    """do_cow_fault() — mm/memory.c: the private copy is allocated before the file page is read."""
    from .fault import ensure_anon_vma

    new = st.mem.alloc(0)
    if new is None:
        raise out_of_memory()
    st.op.allocated(0)
    try:
        page = filemap_get(st, l, p, k, v, f, idx)
    except Exception:
        st.mem.free(new)
        st.op.folios_freed += 1
        raise
    st.mem.token[new] = st.mem.token[page]
    st.op.pages_copied += 1
    st.op.cow_copies += 1
    st.rmap(p).add_new_anon(new, st.mms[k].mm_id)
    ensure_anon_vma(st, k, v)
    mm = st.mms[k]
    mm.rss[MM_ANONPAGES] += 1
    vma = mm.vmas[v]
    contpte.set_pte(st, l, p, vma, vpn - vma.start, user_pte(l, new, vma.prot, vma.prot.write, True))


def do_fault_around(st: State, l, p: KernelProfile, k: int, v: int, vpn: int) -> bool:
    """do_fault_around() — mm/memory.c: the window of fault_around_pages around ``vpn``, aligned
    in the page table and clamped to the VMA and the page table; True if ``vpn`` got mapped."""
    nr = st.fault_around_pages
    vma = st.mms[k].vmas[v]
    pte_off = vpn & (st.ptrs_per_pte - 1)
    vma_off = vpn - vma.start
    from_pte = max(pte_off & ~(nr - 1), pte_off - min(pte_off, vma_off))
    to_pte = min(from_pte + nr, st.ptrs_per_pte, pte_off + len(vma.ptes) - vma_off) - 1
    idx = vma.pgoff + vma_off
    return filemap_map_pages(st, l, p, k, v, vpn, idx + from_pte - pte_off, idx + to_pte - pte_off)


def filemap_map_pages(st: State, l, p: KernelProfile, k: int, v: int, fault_vpn: int, start: int,
                      end: int) -> bool:
    """filemap_map_pages() — mm/filemap.c: maps the cached pages of file pages [start, end] whose
    PTEs are none, a folio's run at once; True if ``fault_vpn`` got mapped."""
    vma = st.mms[k].vmas[v]
    f = vma.file
    assert f is not None, "a file VMA"
    rss = 0
    hit = False
    idx = start
    while idx <= end:
        c = st.files[f].cache[idx]
        if c == NOT_CACHED:
            idx += 1
            continue
        head = st.mem.folio_head(c)
        n = 1 << st.mem.folio_order(head)
        folio_index = idx - (c - head)
        folio_last = folio_index + n - 1
        nr_pages = min(folio_last, end) - idx + 1
        if n == st.ptrs_per_pte and map_file_folio_pmd(st, head):  # filemap_map_pmd()
            return True
        mapped, got = filemap_map_folio_range(st, l, p, k, v, fault_vpn, head, idx - folio_index,
                                              vma.start + (idx - vma.pgoff), nr_pages)
        rss += mapped
        hit = hit or got
        idx = folio_last + 1
    st.mms[k].rss[file_counter(st, f)] += rss
    return hit


def filemap_map_folio_range(st: State, l, p: KernelProfile, k: int, v: int, fault_vpn: int, head: int,
                            start: int, vpn: int, nr_pages: int) -> tuple[int, bool]:
    """filemap_map_folio_range() / filemap_map_order0_folio() — mm/filemap.c: runs between PTEs
    that are not none; from v6.18 the whole folio where it lies in the VMA and one page table."""
    vma = st.mms[k].vmas[v]
    n = 1 << st.mem.folio_order(head)
    first, page, count = vpn, head + start, nr_pages
    if p.fault_around_whole_folio and n > 1:
        vpn0 = vpn - start
        pmd = st.ptrs_per_pte
        if vpn0 >= vma.start and vpn0 + n <= vma.end() and vpn0 // pmd == (vpn0 + n - 1) // pmd:
            first, page, count = vpn0, head, n
    mapped, hit, run = 0, False, 0
    st.op.pte_reads += count
    for j in range(count + 1):
        if j < count and l.pte_none(vma.ptes[first + j - vma.start]):
            run += 1
            continue
        if run:
            rv, rp = first + j - run, page + j - run
            set_pte_range(st, l, p, k, v, head, rp, rv, run, False)
            st.rmap(p).ref_add(head, run)
            mapped += run
            hit = hit or rv <= fault_vpn < rv + run
            run = 0
    return mapped, hit


def set_pte_range(st: State, l, p: KernelProfile, k: int, v: int, head: int, page: int, vpn: int,
                  nr: int, write: bool) -> None:
    """set_pte_range() — mm/memory.c; prefaulted PTEs are young too (arch_wants_old_prefaulted_pte()
    is false on x86 and on arm64 with hardware access flags)."""
    vma = st.mms[k].vmas[v]
    pw = st.page_prot_write(l, vma)
    dirty = write or (p.set_pte_dirty_folio and pw and st.mem.test(head, PG_DIRTY))
    pte = user_pte(l, page, vma.prot, pw or (write and vma.prot.write), dirty)
    st.rmap(p).add_file_ptes(head, page, nr, st.mms[k].mm_id)
    contpte.set_ptes(st, l, p, vma, vpn - vma.start, pte, nr)


def finish_fault(st: State, l, p: KernelProfile, k: int, v: int, vpn: int, page: int, write: bool) -> None:
    """finish_fault() — mm/memory.c: one PTE, or (v6.11+) the whole folio where the version maps
    it, it lies in the VMA and one page table, the VMA has no userfaultfd and its PTEs are none."""
    head = st.mem.folio_head(page)
    n = 1 << st.mem.folio_order(head)
    if n == st.ptrs_per_pte and map_file_folio_pmd(st, head):  # do_set_pmd()
        return
    vma = st.mms[k].vmas[v]
    f = vma.file
    assert f is not None, "a file VMA"
    file = st.files[f]
    whole = (p.finish_fault_folio == FF_ANY_FILE
             or p.finish_fault_folio == FF_SHMEM and file.shmem
             or p.finish_fault_folio == FF_ANON_SHMEM and file.kind == ANON)
    first, frm, nr = vpn, page, 1
    if whole and n > 1 and not vma.uffd_wp:
        idx = page - head
        vma_off = vpn - vma.start
        pte_off = vpn & (st.ptrs_per_pte - 1)
        if (vma_off >= idx and vma_off + (n - idx) <= len(vma.ptes)
                and pte_off >= idx and pte_off + (n - idx) <= st.ptrs_per_pte):
            s = vpn - idx - vma.start
            st.op.pte_reads += n
            # Not all none: one PTE (the v6.14 fallback; v6.11 - v6.13 retried forever).
            if all(l.pte_none(e) for e in vma.ptes[s:s + n]):
                first, frm, nr = vpn - idx, head, n
    r = st.rmap(p)
    r.ref_add(head, 1)  # the fault's reference, from filemap_fault()
    if nr > 1:
        r.ref_add(head, nr - 1)
    set_pte_range(st, l, p, k, v, head, frm, first, nr, write)
    st.mms[k].rss[file_counter(st, f)] += nr


def map_file_folio_pmd(st: State, head: int) -> bool:
    """do_set_pmd() for a PMD-sized page-cache folio: not built in this model (PTE-mapped, as
    when the kernel falls back); the PMD-mapped THP support hooks in here."""
    return False

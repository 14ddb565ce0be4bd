"""fork(): dup_mmap() → copy_page_range() → copy_pte_range() → copy_present_ptes() →
__copy_present_ptes() (rust/src/fork.rs; mm/memory.c, kernel/fork.c)."""

from __future__ import annotations

import dataclasses

from ..._flags import FpbFlags
from . import contpte, huge_memory
from .batching import folio_pte_batch, fork_flags
from .errors import out_of_memory
from .kernel import KernelProfile
from .memory import PG_ANON
from .mm import MM_ANONPAGES, Mm, Prot, mm_counter
from .state import State


class Again(Exception):
    """copy_present_ptes() returned -EAGAIN: it needs a preallocated page."""


@dataclasses.dataclass
class CopyCtx:
    """What one VMA's copy needs to know about source and destination."""

    k: int  # the parent mm
    vi: int  # the source VMA
    start: int
    is_cow: bool
    shared: bool
    dst_uffd_wp: bool
    dst_prot: Prot
    flags: FpbFlags | None
    has_pinned: bool
    dst_mm_id: int
    prealloc: int | None = None  # copy_pte_range()'s preallocated page


def fork(st: State, l, p: KernelProfile, k: int) -> int:
    """dup_mmap() — kernel/fork.c: a child with every VMA not MADV_DONTFORK; returns its pid"""
    pid = len(st.mms) + 1
    c = len(st.mms)
    st.mms.append(Mm(pid=pid, mm_id=pid, vmas=[], rss=[0, 0, 0], has_pinned=False, exited=False,
                     next_vpn=st.mms[k].next_vpn, thp_disable=st.mms[k].thp_disable))
    rss = [0, 0, 0]
    for vi in range(len(st.mms[k].vmas)):
        src = st.mms[k].vmas[vi]
        if src.dontfork:
            continue
        dst = src.clone_without_ptes()
        dst.ptes = [l.none_value] * len(src.ptes)
        # dup_userfaultfd(): without UFFD_FEATURE_EVENT_FORK the child is unregistered.
        dst.uffd_wp = src.uffd_wp and src.uffd_event_fork
        dst.uffd_event_fork = dst.uffd_wp
        ctx = CopyCtx(
            k=k, vi=vi, start=src.start, is_cow=src.is_cow(), shared=src.shared,
            dst_uffd_wp=dst.uffd_wp, dst_prot=dst.prot,
            flags=None if p.fpb is None else fork_flags(p.fpb, src.shared, src.soft_dirty_tracking(l)),
            has_pinned=st.mms[k].has_pinned, dst_mm_id=pid,
        )
        dst.anon_vma = st.new_anon_vma() if src.anon_vma != 0 and not src.wipeonfork else 0
        # vma_needs_copy(): uffd-wp in the child, or anonymous pages in the parent.
        if not src.wipeonfork and (dst.uffd_wp or src.anon_vma != 0):
            huge_memory.copy_huge_pmds(st, l, p, k, vi, pid, st.mms[k].has_pinned, dst, rss)
            copy_page_range(st, l, p, ctx, dst.ptes, rss)
        st.mms[c].vmas.append(dst)
    st.mms[c].rss = rss
    st.op.tlb_flush_ranges += 1  # flush_tlb_mm() of the parent after write-protecting
    return pid


def copy_page_range(st: State, l, p: KernelProfile, ctx: CopyCtx, dst: list[int],
                    rss: list[int]) -> None:
    """copy_page_range() — mm/memory.c: one copy_pte_range() per page table"""
    ptrs = st.ptrs_per_pte
    a = 0
    while a < len(dst):
        e = min(len(dst), a + ptrs - ((ctx.start + a) & (ptrs - 1)))
        if ctx.start + a not in st.mms[ctx.k].vmas[ctx.vi].pmds:  # a copied huge PMD has no table
            copy_pte_range(st, l, p, ctx, dst, a, e, rss)
        a = e


def copy_pte_range(st: State, l, p: KernelProfile, ctx: CopyCtx, dst: list[int], a: int, e: int,
                   rss: list[int]) -> None:
    """copy_pte_range() — mm/memory.c: entries [a, e) of one table, with the -EAGAIN retry"""
    ctx.prealloc = None
    i = a
    while True:
        again = False
        while i < e:
            pte = contpte.ptep_get(st, l, p, st.mms[ctx.k].vmas[ctx.vi], i)
            st.op.pte_reads += 1
            if l.pte_none(pte):
                i += 1
                continue
            try:
                nr = copy_present_ptes(st, l, p, ctx, dst, i, pte, e - i, rss)
            except Again:
                again = True
                break
            if ctx.prealloc is not None:
                # A preallocated page is never kept for another address.
                st.rmap(p).put_refs(ctx.prealloc, 1)
                ctx.prealloc = None
            i += nr
        if not again:
            break
        st.op.fork_eagain_retries += 1
        pf = st.mem.alloc(0)
        if pf is None:
            raise out_of_memory("fork: out of memory preallocating a page for a pinned page")
        st.op.allocated(0)
        ctx.prealloc = pf
    if ctx.prealloc is not None:
        st.rmap(p).put_refs(ctx.prealloc, 1)
        ctx.prealloc = None


def copy_present_ptes(st: State, l, p: KernelProfile, ctx: CopyCtx, dst: list[int], i: int,
                      pte: int, max_nr: int, rss: list[int]) -> int:
    """copy_present_ptes() — mm/memory.c: a run of one large folio at once, else one PTE"""
    page = st.vm_normal_page(l, pte)
    if page is None:
        st.op.batch(1)
        copy_ptes_tail(st, l, p, ctx, dst, i, pte, 1)
        return 1
    head = st.mem.folio_head(page)
    order = st.mem.folio_order(head)
    anon = st.mem.test(head, PG_ANON)
    file_counter = mm_counter(st.mem, head)
    if ctx.prealloc is None and order > 0 and max_nr != 1 and p.fpb is not None and p.fork_batched:
        src_ptes = st.mms[ctx.k].vmas[ctx.vi].ptes
        b = folio_pte_batch(l, p.fpb, src_ptes, ctx.start, i, max_nr, head, 1 << order, ctx.flags)
        st.op.folio_pte_batch_calls += 1
        st.op.pte_reads += b.nr
        r = st.rmap(p)
        r.ref_add(head, b.nr)
        if anon:
            if not r.try_dup_anon_ptes(head, page, b.nr, ctx.dst_mm_id, ctx.has_pinned):
                r.put_refs(head, b.nr)
                raise Again
            rss[MM_ANONPAGES] += b.nr
        else:
            r.dup_file_ptes(head, page, b.nr, ctx.dst_mm_id)
            rss[file_counter] += b.nr
        tpl = b.pte
        if b.any_writable:  # v6.9 - v6.16 (None in v6.17, which merged it into b.pte)
            tpl = l.pte_mkwrite(tpl)
        st.op.batch(b.nr)
        copy_ptes_tail(st, l, p, ctx, dst, i, tpl, b.nr)
        return b.nr
    r = st.rmap(p)
    r.ref_add(head, 1)
    if anon:
        if not r.try_dup_anon_ptes(head, page, 1, ctx.dst_mm_id, ctx.has_pinned):
            r.put_refs(head, 1)
            return copy_present_page(st, l, p, ctx, dst, i, pte, page, rss)
        rss[MM_ANONPAGES] += 1
    else:
        r.dup_file_ptes(head, page, 1, ctx.dst_mm_id)
        rss[file_counter] += 1
    st.op.batch(1)
    copy_ptes_tail(st, l, p, ctx, dst, i, pte, 1)
    return 1


def copy_present_page(st: State, l, p: KernelProfile, ctx: CopyCtx, dst: list[int], i: int,
                      pte: int, page: int, rss: list[int]) -> int:
    """copy_present_page() — mm/memory.c: the child gets its own copy of a maybe-pinned page"""
    if ctx.prealloc is None:
        raise Again
    new, ctx.prealloc = ctx.prealloc, None
    st.mem.token[new] = st.mem.token[page]
    st.op.pages_copied += 1
    st.rmap(p).add_new_anon(new, ctx.dst_mm_id)
    rss[MM_ANONPAGES] += 1
    # mk_pte(new, vm_page_prot) without pte_sw_mkyoung(), then maybe_mkwrite(pte_mkdirty())
    n = l.pte_mkdirty(l.pfn_pte_template(new, ctx.dst_prot.exec, ctx.dst_prot.none()))
    if ctx.dst_prot.write:
        n = l.pte_mkwrite(n)
    if ctx.dst_uffd_wp and l.pte_uffd_wp(pte):
        n = l.set_uffd_wp_bit(n)
    child_set_ptes(st, l, p, ctx, dst, i, n, 1)
    st.op.batch(1)
    return 1


def copy_ptes_tail(st: State, l, p: KernelProfile, ctx: CopyCtx, dst: list[int], i: int,
                   tpl: int, nr: int) -> None:
    """__copy_present_ptes() — mm/memory.c: wrprotect the parent's run if COW, set_ptes() the child's"""
    t = tpl
    if ctx.is_cow and l.pte_write(t):
        # wrprotect_ptes(): blocks covered in part are unfolded, whole ones keep PTE_CONT.
        contpte.unfold_partial(st, l, p, st.mms[ctx.k].vmas[ctx.vi], i, nr)
        src = st.mms[ctx.k].vmas[ctx.vi].ptes
        for j in range(i, i + nr):
            src[j] = l.pte_wrprotect(src[j])  # wrprotect_ptes()
        st.op.pte_writes += nr
        t = l.pte_wrprotect(t)
    if ctx.shared:
        t = l.pte_mkclean(t)
    t = l.pte_mkold(t)
    if not ctx.dst_uffd_wp:
        t = l.clear_uffd_wp_bit(t)
    child_set_ptes(st, l, p, ctx, dst, i, t, nr)


def child_set_ptes(st: State, l, p: KernelProfile, ctx: CopyCtx, dst: list[int], i: int,
                   pte: int, nr: int) -> None:
    """set_ptes() into the child's table (not yet part of the child mm)."""
    st.op.pte_writes += nr
    n = contpte.cont_ptes(l, p)
    if n is None:
        for j in range(nr):
            dst[i + j] = l.pte_advance_pfn(pte, j)
        return
    c = contpte.Cont(dst, ctx.start, n)
    if nr == 1:
        mem = st.mem
        c.set_pte(l, i, pte, lambda pfn: contpte.folio_of(mem, pfn), st.op)
    else:
        c.set_ptes(l, i, pte, nr)

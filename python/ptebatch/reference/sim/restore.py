"""Rebuilding a simulation from captured page tables (rust/src/restore.rs): folios placed at
their captured pfns, PTEs written as captured, then every counter recomputed from the page
tables. Not a kernel path: the model's replay of /proc snapshots."""

from __future__ import annotations

from .errors import value_error
from .kernel import KernelProfile
from .memory import (
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_FILE,
    PG_MAYBE_SHARED,
    PG_SWAPBACKED,
    LargeFolio,
    MM_ID_DUMMY,
)
from .mm import NOT_CACHED, mm_counter
from .state import State


def place_folio(st: State, head: int, order: int, file: tuple[int, int] | None, dirty: bool) -> None:
    """A folio of ``order`` at free pfn ``head``: anonymous, or in ``file`` = (file id, first index)."""
    if order > st.pmd_order:
        raise value_error(f"folio order {order} is above the PMD order {st.pmd_order}")
    n = 1 << order
    if head % n != 0 or head + n > st.mem.nr_pages():
        raise value_error(f"folio {head:#x} of order {order} is unaligned or beyond memory")
    if file is not None:
        fid, index = file
        if fid >= len(st.files):
            raise value_error(f"no file {fid}")
        f = st.files[fid]
        if index + n > f.nr_pages or any(c != NOT_CACHED for c in f.cache[index:index + n]):
            raise value_error(f"file {fid} pages {index}..{index + n} are beyond the file or cached")
    if not st.mem.alloc_at(head, order):
        raise value_error(f"pfns {head:#x}..{head + n:#x} are not free")
    if file is None:
        st.mem.set(head, PG_ANON | PG_SWAPBACKED)
    else:
        fid, index = file
        f = st.files[fid]
        st.mem.set(head, PG_FILE | (PG_SWAPBACKED if f.shmem else 0))
        for j in range(n):
            f.cache[index + j] = head + j
    if dirty:
        st.mem.set(head, PG_DIRTY)


def place_pte(st: State, l, k: int, v: int, vpn: int, pfn: int, write: bool, dirty: bool,
              young: bool, soft_dirty: bool, uffd_wp: bool) -> None:
    """Writes one captured PTE; ``pfn`` is a placed folio's page or the zero page."""
    zero = pfn == st.zero_pfn
    if not zero and (pfn >= st.mem.nr_pages() or st.mem.is_free(pfn)):
        raise value_error(f"pfn {pfn:#x} is not a placed folio's page")
    vma = st.mms[k].vmas[v]
    if vma.pmds and (vpn & ~(st.ptrs_per_pte - 1)) in vma.pmds:
        raise value_error(f"{vpn << st.page_shift:#x} is mapped by a huge PMD")
    prot_none = vma.prot.none()
    pte = l.mk_pte(pfn, present=True, write=write and not zero and not prot_none,
                   dirty=dirty and not zero, young=young,
                   soft_dirty=soft_dirty and l.has_soft_dirty, uffd_wp=uffd_wp and l.has_uffd_wp,
                   exec=vma.prot.exec and not prot_none, special=zero, prot_none=prot_none)
    vma.ptes[vpn - vma.start] = pte


def place_pmd(st: State, l, k: int, v: int, base: int, pfn: int, write: bool, dirty: bool,
              young: bool, soft_dirty: bool, uffd_wp: bool) -> None:
    """Writes one captured huge PMD at the PMD-aligned ``base``: ``pfn`` is the first page of a
    placed PMD-sized anonymous folio, or the zero pfn (the huge zero page)."""
    zero = pfn == st.zero_pfn
    vma = st.mms[k].vmas[v]
    prot_none = vma.prot.none()
    e = l.mk_pte(pfn, present=True, write=write and not zero and not prot_none,
                 dirty=dirty and not zero, young=young,
                 soft_dirty=soft_dirty and l.has_soft_dirty, uffd_wp=uffd_wp and l.has_uffd_wp,
                 exec=vma.prot.exec and not prot_none, special=zero, prot_none=prot_none)
    n = st.ptrs_per_pte
    if base % n or base < vma.start or base + n > vma.end():
        raise value_error(f"a huge PMD at {base << st.page_shift:#x} must be PMD-aligned and lie "
                          "whole in a mapping")
    if not vma.is_anon():
        raise value_error("huge PMDs are modelled in private anonymous mappings only")
    s = base - vma.start
    if base in vma.pmds or not all(l.pte_none(x) for x in vma.ptes[s:s + n]):
        raise value_error(f"the PMD range at {base << st.page_shift:#x} is already mapped")
    if not zero:
        ok = (pfn < st.mem.nr_pages() and not st.mem.is_free(pfn) and st.mem.folio_head(pfn) == pfn
              and st.mem.folio_order(pfn) == st.pmd_order and st.mem.test(pfn, PG_ANON))
        if not ok:
            raise value_error(f"pfn {pfn:#x} is not the first page of a placed PMD-sized "
                              "anonymous folio")
    vma.pmds[base] = e


def _reset_counts(st: State) -> list[int]:
    """Every allocated folio's counts cleared; returns the folio heads."""
    heads = []
    pfn = 0
    while pfn < st.mem.nr_pages():
        if st.mem.is_free(pfn):
            pfn += 1
            continue
        o = st.mem.folio_order(pfn)
        heads.append(pfn)
        for p in range(pfn, pfn + (1 << o)):
            st.mem.mapcount[p] = 0
            st.mem.clear(p, PG_ANON_EXCLUSIVE)
        st.mem.clear(pfn, PG_MAYBE_SHARED)
        st.mem.refcount[pfn] = 0
        if o > 0:
            st.mem.large[pfn] = LargeFolio()
        pfn += 1 << o
    return heads


def _count_mappings(st: State, l, p: KernelProfile) -> None:
    """Mapcounts, references, large-folio records, MM-ID slots and rss from the page tables."""
    for mm in st.mms:
        rss = [0, 0, 0]
        for vma in mm.vmas:
            any_anon = bool(vma.pmds)
            for e in vma.pmds.values():
                head = l.pte_pfn(e)
                if head == st.zero_pfn:
                    continue
                st.mem.refcount[head] += 1
                rss[mm_counter(st.mem, head)] += st.ptrs_per_pte
                lf = st.mem.lf(head)
                lf.entire_mapcount += 1
                lf.large_mapcount += 1
                if p.mm_id:
                    slot = next((s for s in (0, 1) if lf.mm_id[s] == mm.mm_id),
                                next((s for s in (0, 1) if lf.mm_id[s] == MM_ID_DUMMY), None))
                    if slot is not None:
                        lf.mm_id[slot] = mm.mm_id
                        lf.mm_id_mapcount[slot] += 1
            for e in vma.ptes:
                if l.pte_none(e) or l.pte_pfn(e) == st.zero_pfn:
                    continue
                pfn = l.pte_pfn(e)
                head = st.mem.folio_head(pfn)
                st.mem.mapcount[pfn] += 1
                st.mem.refcount[head] += 1
                any_anon |= st.mem.test(head, PG_ANON)
                rss[mm_counter(st.mem, head)] += 1
                if st.mem.folio_order(head) > 0:
                    lf = st.mem.lf(head)
                    lf.large_mapcount += 1
                    if st.mem.mapcount[pfn] == 1:
                        lf.nr_pages_mapped += 1
                    if p.mm_id:
                        slot = next((s for s in (0, 1) if lf.mm_id[s] == mm.mm_id),
                                    next((s for s in (0, 1) if lf.mm_id[s] == MM_ID_DUMMY), None))
                        if slot is not None:
                            lf.mm_id[slot] = mm.mm_id
                            lf.mm_id_mapcount[slot] += 1
            if any_anon and vma.anon_vma == 0:
                vma.anon_vma = st.new_anon_vma()
        mm.rss = rss


def rebuild_accounting(st: State, l, p: KernelProfile) -> None:
    """Every counter recomputed from the page tables; unmapped, uncached placed folios freed."""
    heads = _reset_counts(st)
    for f in st.files:
        for c in f.cache:
            if c != NOT_CACHED and st.mem.folio_head(c) == c:
                st.mem.refcount[c] += 1 << st.mem.folio_order(c)
    _count_mappings(st, l, p)
    for head in heads:
        o = st.mem.folio_order(head)
        if st.mem.refcount[head] == 0:
            st.mem.free(head)
            continue
        anon = st.mem.test(head, PG_ANON)
        lf = st.mem.large.get(head)
        entire = lf.entire_mapcount + 1 if lf is not None else 0
        for pg in range(head, head + (1 << o)):
            ptes = st.mem.mapcount[pg]
            # Inferred: an anonymous page mapped once; under a huge PMD mapped once, the head
            # only, as a PMD fault leaves it.
            if anon and ((ptes == 1 and entire == 0) or (ptes == 0 and entire == 1 and pg == head)):
                st.mem.set(pg, PG_ANON_EXCLUSIVE)
        if o > 0 and p.mm_id:
            lf = st.mem.large[head]
            if lf.large_mapcount >= 0 and lf.large_mapcount not in lf.mm_id_mapcount:
                st.mem.set(head, PG_MAYBE_SHARED)
    # A writable PTE on a page that turned out not to be exclusive cannot exist.
    for mm in st.mms:
        for vma in mm.vmas:
            if not vma.is_cow():
                continue
            for base, e in vma.pmds.items():
                if l.pte_write(e) and not st.mem.test(l.pte_pfn(e), PG_ANON_EXCLUSIVE):
                    vma.pmds[base] = l.pte_wrprotect(e)
            for i, e in enumerate(vma.ptes):
                if not l.pte_none(e) and l.pte_write(e):
                    pfn = l.pte_pfn(e)
                    if pfn == st.zero_pfn or not st.mem.test(pfn, PG_ANON_EXCLUSIVE):
                        vma.ptes[i] = l.pte_wrprotect(e)

"""Invariants: the kernel's accounting recomputed from scratch by rescanning every page table,
and compared with the stored counters (rust/src/check.rs). The first broken rule is raised as
an InvariantError "rule: message" with ``.rule`` set."""

from __future__ import annotations

from .contpte import cont_ptes
from .errors import broken
from .kernel import KernelProfile
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    MM_ID_DUMMY,
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_FILE,
    PG_MAYBE_SHARED,
)
from .mm import NOT_CACHED, RSS_NAMES, mm_counter
from .state import State

MANY = (1 << 32) - 1  # owner[pfn] of a page mapped by more than one mm


def where_mapped(st: State, l, pfn: int) -> str:
    """Where ``pfn`` is mapped (pid and address), for messages."""
    for mm in st.mms:
        for vma in mm.vmas:
            for base, e in vma.pmds.items():
                head = l.pte_pfn(e)
                if head <= pfn < head + st.ptrs_per_pte:
                    return f"; mapped by pid {mm.pid} at {(base + pfn - head) << st.page_shift:#x} (huge PMD)"
            for i, e in enumerate(vma.ptes):
                if not l.pte_none(e) and l.pte_pfn(e) == pfn:
                    return f"; mapped by pid {mm.pid} at {(vma.start + i) << st.page_shift:#x}"
    return "; not mapped by any page table"


class _Scan:
    """What the page tables say: per-page mappings, owners, writable mappings, per-(folio, mm) maps."""

    def __init__(self, n: int) -> None:
        self.count = [0] * n
        self.owner = [0] * n
        self.writable = [0] * n
        self.per_mm: dict[tuple[int, int], int] = {}
        self.entire: dict[int, int] = {}  # huge PMD mappings per folio head


def check(st: State, l, p: KernelProfile) -> None:
    """Checks every invariant; raises InvariantError for the first one broken."""
    n = st.mem.nr_pages()
    scan = _Scan(n)
    for mm in st.mms:
        check_mm(st, l, p, mm, scan)
    pins = [0] * n
    for pin in st.pins:
        if not pin.active:
            continue
        for pfn in pin.pfns:
            if pfn != st.zero_pfn:
                if pfn >= n or st.mem.is_free(pfn):
                    raise broken("pin-of-free-page", f"a pin holds pfn {pfn:#x}, which is free")
                pins[pfn] += 1
    cached = [False] * n
    for f in st.files:
        for pfn in f.cache:
            if pfn != NOT_CACHED:
                cached[pfn] = True
    free = 0
    pfn = 0
    while pfn < n:
        if st.mem.is_free(pfn):
            if st.mem.refcount[pfn] != 0 or st.mem.mapcount[pfn] != 0:
                raise broken("free-page-state", f"free pfn {pfn:#x} has refcount "
                             f"{st.mem.refcount[pfn]} mapcount {st.mem.mapcount[pfn]}")
            free += 1
            pfn += 1
            continue
        check_folio(st, l, p, pfn, scan, pins, cached)
        pfn += 1 << st.mem.folio_order(pfn)
    if free != st.mem.free_pages:
        raise broken("free-pages", f"the allocator counts {st.mem.free_pages} free pages, "
                     f"{free} pages are free")


def check_contpte(st: State, l, p: KernelProfile, pid: int, vma) -> None:
    """arm64 contpte blocks: PTE_CONT only where the kernel folds (v6.9+), and then on whole,
    naturally aligned blocks of valid entries mapping consecutive, aligned pfns with the same
    attributes but for young/dirty. PTE_CONT left on invalid (PROT_NONE) entries, which
    contpte_set_ptes() writes for a whole PROT_NONE block, is inert and allowed."""
    n = cont_ptes(l, p)
    ptes = vma.ptes
    i = 0
    while i < len(ptes):
        e = ptes[i]
        if l.pte_none(e) or not l.pte_cont(e):
            i += 1
            continue
        at = f"pid {pid} address {(vma.start + i) << st.page_shift:#x}"
        if n is None:
            raise broken("contpte-block", f"{at}: PTE_CONT where this kernel never folds")
        if not l.pte_valid(e):
            i += 1
            continue
        off = (vma.start + i) % n
        ok = off == 0 and i + n <= len(ptes)
        if ok:
            def norm(x: int) -> int:
                return l.pte_mkold(l.pte_mkclean(x))

            base = norm(ptes[i])
            ok = l.pte_pfn(base) % n == 0 and all(
                l.pte_valid(ptes[i + k]) and l.pte_cont(ptes[i + k])
                and norm(ptes[i + k]) == l.pte_advance_pfn(base, k) for k in range(n))
        if not ok:
            raise broken("contpte-block",
                         f"{at}: a PTE_CONT block that is not {n} aligned, uniform entries")
        i += n


def check_mm(st: State, l, p: KernelProfile, mm, scan: _Scan) -> None:
    """The page tables of one mm: PTE rules, and the rss counters."""
    if mm.exited and mm.vmas:
        raise broken("exited-mm", f"pid {mm.pid} has exited but still has VMAs")
    n = st.mem.nr_pages()
    rss = [0, 0, 0]
    for vi, vma in enumerate(mm.vmas):
        if vi > 0 and mm.vmas[vi - 1].end() > vma.start:
            raise broken("vma-order", f"pid {mm.pid}: VMAs overlap at {vma.start << st.page_shift:#x}")
        check_contpte(st, l, p, mm.pid, vma)
        for base, e in sorted(vma.pmds.items()):
            check_pmd(st, l, mm, vma, base, e, scan, rss)
        for i, e in enumerate(vma.ptes):
            if l.pte_none(e):
                continue
            at = f"pid {mm.pid} address {(vma.start + i) << st.page_shift:#x} (PTE {e:#x})"
            pfn = l.pte_pfn(e)
            if pfn == st.zero_pfn:
                if l.pte_write(e) or not l.pte_special(e):
                    raise broken("zero-page-pte",
                                 f"{at}: the zero page must be mapped special and read-only")
                continue
            if pfn >= n or st.mem.is_free(pfn):
                raise broken("pte-maps-free-page", f"{at} maps pfn {pfn:#x}, which is not allocated")
            head = st.mem.folio_head(pfn)
            anon = st.mem.test(head, PG_ANON)
            if vma.is_anon() and not anon:
                raise broken("anon-vma-maps-file-page",
                             f"{at} maps page-cache pfn {pfn:#x} in a private anonymous mapping")
            scan.count[pfn] += 1
            if scan.owner[pfn] == 0:
                scan.owner[pfn] = mm.pid
            elif scan.owner[pfn] != mm.pid:
                scan.owner[pfn] = MANY
            if l.pte_write(e):
                scan.writable[pfn] += 1
                if vma.is_cow() and not (anon and st.mem.test(pfn, PG_ANON_EXCLUSIVE)):
                    raise broken("writable-cow-not-exclusive",
                                 f"{at} is writable in a private mapping but pfn {pfn:#x} is not "
                                 "an exclusive anonymous page")
            if st.mem.folio_order(head) > 0:
                scan.per_mm[(head, mm.mm_id)] = scan.per_mm.get((head, mm.mm_id), 0) + 1
            rss[mm_counter(st.mem, head)] += 1
    for c in range(3):
        if rss[c] != mm.rss[c]:
            raise broken("rss", f"pid {mm.pid}: {RSS_NAMES[c]} rss counter is {mm.rss[c]}, "
                         f"page tables map {rss[c]} such pages")


def check_pmd(st: State, l, mm, vma, base: int, e: int, scan: _Scan, rss: list[int]) -> None:
    """One huge PMD: aligned, inside a private anonymous VMA over none PTEs, mapping a PMD-sized
    anonymous folio's first page (or the huge zero page, special and read-only)."""
    at = f"pid {mm.pid} address {base << st.page_shift:#x} (PMD {e:#x})"
    nr = st.ptrs_per_pte
    if base % nr or base < vma.start or base + nr > vma.end() or not vma.is_anon():
        raise broken("pmd-leaf", f"{at}: a huge PMD must be aligned, inside its mapping, in a "
                     "private anonymous mapping")
    s = base - vma.start
    if not all(l.pte_none(x) for x in vma.ptes[s:s + nr]):
        raise broken("pmd-leaf", f"{at}: PTEs under a huge PMD")
    head = l.pte_pfn(e)
    if head == st.zero_pfn:
        if l.pte_write(e) or not l.pte_special(e):
            raise broken("zero-page-pte", f"{at}: the huge zero page must be mapped special and read-only")
        return
    ok = (head < st.mem.nr_pages() and not st.mem.is_free(head) and st.mem.folio_head(head) == head
          and st.mem.folio_order(head) == st.pmd_order and st.mem.test(head, PG_ANON))
    if not ok:
        raise broken("pmd-leaf", f"{at}: pfn {head:#x} is not the first page of a PMD-sized anonymous folio")
    if l.pte_write(e) and not st.mem.test(head, PG_ANON_EXCLUSIVE):
        raise broken("writable-cow-not-exclusive",
                     f"{at}: a writable huge PMD whose head pfn {head:#x} is not exclusive")
    scan.entire[head] = scan.entire.get(head, 0) + 1
    for pu in range(head, head + nr):
        if scan.owner[pu] == 0:
            scan.owner[pu] = mm.pid
        elif scan.owner[pu] != mm.pid:
            scan.owner[pu] = MANY
        if l.pte_write(e):
            scan.writable[pu] += 1
    scan.per_mm[(head, mm.mm_id)] = scan.per_mm.get((head, mm.mm_id), 0) + 1
    rss[mm_counter(st.mem, head)] += nr


def check_folio(st: State, l, p: KernelProfile, head: int, scan: _Scan, pins: list[int],
                cached: list[bool]) -> None:
    """One allocated folio: mapcounts, exclusivity, refcount, page-cache flag, large-folio record."""
    order = st.mem.folio_order(head)
    nr = 1 << order

    def what(pg: int) -> str:
        return f"pfn {pg:#x} (folio {head:#x}, order {order})"

    maps = mapped_pages = pin_refs = 0
    for pg in range(head, head + nr):
        if st.mem.mapcount[pg] != scan.count[pg]:
            raise broken("page-mapcount", f"{what(pg)}: stored mapcount {st.mem.mapcount[pg]}, "
                         f"page tables map it {scan.count[pg]} time(s){where_mapped(st, l, pg)}")
        if st.mem.test(pg, PG_ANON_EXCLUSIVE) and scan.owner[pg] == MANY:
            raise broken("anon-exclusive-shared", f"{what(pg)} is PageAnonExclusive but mapped "
                         f"by several processes{where_mapped(st, l, pg)}")
        if scan.writable[pg] > 0 and scan.owner[pg] == MANY and st.mem.test(head, PG_ANON):
            raise broken("writable-shared-anon", f"{what(pg)} is an anonymous page mapped writable "
                         f"while mapped by several processes{where_mapped(st, l, pg)}")
        maps += scan.count[pg]
        mapped_pages += scan.count[pg] > 0
        pin_refs += pins[pg]
    refs = st.mem.refcount[head]
    bias = 1 if order > 0 else GUP_PIN_COUNTING_BIAS
    cache_refs = nr if cached[head] else 0
    if cached[head] != st.mem.test(head, PG_FILE):
        raise broken("page-cache-flag", f"{what(head)}: PG_FILE does not match page-cache membership")
    pmd_maps = scan.entire.get(head, 0)  # a huge PMD maps the folio once, with one reference
    expect = maps + pmd_maps + pin_refs * bias + cache_refs
    if refs != expect:
        raise broken("refcount", f"{what(head)}: refcount {refs}, expected {expect} = {maps} PTE "
                     f"mapping(s) + {pmd_maps} PMD mapping(s) + {pin_refs} pin(s) + {cache_refs} "
                     f"page-cache reference(s){where_mapped(st, l, head)}")
    if refs <= 0:
        raise broken("refcount", f"{what(head)}: an allocated folio with refcount {refs}")
    if order > 0:
        check_large_folio(st, l, p, head, what(head), maps, pmd_maps, mapped_pages, pin_refs, scan)


def check_large_folio(st: State, l, p: KernelProfile, head: int, what: str, maps: int,
                      pmd_maps: int, mapped_pages: int, pin_refs: int, scan: _Scan) -> None:
    """A large folio's record: large/entire mapcount, nr_pages_mapped, pincount, MM-ID slots."""
    lf = st.mem.large.get(head)
    if lf is None:
        raise broken("large-folio-record", f"{what} has no large-folio record")
    if lf.large_mapcount + 1 != maps + pmd_maps:
        raise broken("large-mapcount", f"{what}: large mapcount {lf.large_mapcount + 1}, page "
                     f"tables map it {maps + pmd_maps} time(s){where_mapped(st, l, head)}")
    if lf.entire_mapcount + 1 != pmd_maps:
        raise broken("entire-mapcount", f"{what}: entire mapcount {lf.entire_mapcount + 1}, "
                     f"{pmd_maps} huge PMD mapping(s){where_mapped(st, l, head)}")
    if lf.nr_pages_mapped != mapped_pages:
        raise broken("nr-pages-mapped",
                     f"{what}: nr_pages_mapped {lf.nr_pages_mapped}, {mapped_pages} page(s) are mapped")
    if lf.pincount != pin_refs:
        raise broken("pincount", f"{what}: pincount {lf.pincount}, {pin_refs} pin(s)")
    if not p.mm_id:
        return
    total = maps + pmd_maps - 1
    for s in (0, 1):
        mm_id, c = lf.mm_id[s], lf.mm_id_mapcount[s]
        if mm_id == MM_ID_DUMMY:
            if c != -1:
                raise broken("mm-id-slot", f"{what}: free MM-ID slot {s} has mapcount {c + 1}")
            continue
        have = scan.per_mm.get((head, mm_id), 0)
        if c < 0 or c + 1 > have:
            raise broken("mm-id-slot", f"{what}: MM-ID slot {s} says mm {mm_id} maps it {c + 1} "
                         f"time(s), it maps it {have}{where_mapped(st, l, head)}")
    if not st.mem.test(head, PG_MAYBE_SHARED) and total >= 0:
        owned = any(lf.mm_id[s] != MM_ID_DUMMY and lf.mm_id_mapcount[s] == total for s in (0, 1))
        mms = sum(1 for (h, _) in scan.per_mm if h == head)
        if not owned or mms > 1:
            raise broken("mm-id-shared-bit", f"{what}: \"maybe mapped shared\" is clear but "
                         f"{mms} mm(s) map it{where_mapped(st, l, head)}")

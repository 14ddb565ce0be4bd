"""Reference counts and reverse-map accounting (rust/src/rmap.rs; include/linux/rmap.h, mm/rmap.c).

Before v6.10 the kernel had no ``_large_mapcount`` and summed page mapcounts; the model keeps
the sum in ``large_mapcount`` in every version, which reads the same.
"""

from __future__ import annotations

from .kernel import KernelProfile
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    MM_ID_DUMMY,
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_MAYBE_SHARED,
    PG_PARTIALLY_MAPPED,
    PG_SWAPBACKED,
    Memory,
)
from .stats import Stats


class Rmap:
    """The rmap context: memory, the operation's counters and the kernel's rules."""

    def __init__(self, mem: Memory, stats: Stats, profile: KernelProfile) -> None:
        self.mem = mem
        self.stats = stats
        self.profile = profile

    def ref_add(self, head: int, nr: int) -> None:
        """folio_ref_add() — include/linux/page_ref.h"""
        self.mem.refcount[head] += nr
        self.stats.refcount_atomics += 1

    def put_refs(self, head: int, nr: int) -> None:
        """folio_put_refs() — include/linux/mm.h; frees the folio at zero."""
        self.stats.refcount_atomics += 1
        self.mem.refcount[head] -= nr
        if self.mem.refcount[head] == 0:
            self.mem.free(head)
            self.stats.folios_freed += 1

    def add_large_mapcount(self, head: int, diff: int, mm_id: int) -> None:
        """folio_add_return_large_mapcount() — include/linux/rmap.h (MM-ID slots from v6.15)"""
        self.stats.mapcount_updates += 1
        lf = self.mem.lf(head)
        new = lf.large_mapcount + diff
        lf.large_mapcount = new
        if not self.profile.mm_id:
            return
        set_shared = False
        if lf.mm_id[0] == mm_id:
            lf.mm_id_mapcount[0] += diff
        elif lf.mm_id[1] == mm_id:
            lf.mm_id_mapcount[1] += diff
        elif lf.mm_id[0] == MM_ID_DUMMY:
            lf.mm_id[0] = mm_id
            lf.mm_id_mapcount[0] = diff - 1
            set_shared = new != diff - 1  # other mms may already map it
        elif lf.mm_id[1] == MM_ID_DUMMY:
            lf.mm_id[1] = mm_id
            lf.mm_id_mapcount[1] = diff - 1
            set_shared = True  # slot 0 has mappings too
        if set_shared:
            self.mem.set(head, PG_MAYBE_SHARED)

    def sub_large_mapcount(self, head: int, diff: int, mm_id: int) -> None:
        """folio_sub_return_large_mapcount() — include/linux/rmap.h; the shared bit clears lazily"""
        self.stats.mapcount_updates += 1
        lf = self.mem.lf(head)
        new = lf.large_mapcount - diff
        lf.large_mapcount = new
        if not self.profile.mm_id:
            return
        for s in (0, 1):
            if lf.mm_id[s] == mm_id:
                lf.mm_id_mapcount[s] -= diff
                if lf.mm_id_mapcount[s] >= 0:
                    return
                # Some of this mm's mappings were added while it had no slot.
                lf.mm_id_mapcount[s] = -1
                lf.mm_id[s] = MM_ID_DUMMY
                break
        if lf.mm_id_mapcount[0] == new or lf.mm_id_mapcount[1] == new:
            self.mem.clear(head, PG_MAYBE_SHARED)

    def add_new_anon(self, head: int, mm_id: int) -> None:
        """folio_add_new_anon_rmap(RMAP_EXCLUSIVE), PTE-mapped — mm/rmap.c"""
        self.stats.rmap_calls += 1
        order = self.mem.folio_order(head)
        nr = 1 << order
        self.mem.set(head, PG_ANON | PG_SWAPBACKED)
        for p in range(head, head + nr):
            self.mem.mapcount[p] = 1
            self.mem.set(p, PG_ANON_EXCLUSIVE)
        self.stats.mapcount_updates += nr
        if order > 0:
            lf = self.mem.lf(head)
            lf.large_mapcount = nr - 1  # folio_set_large_mapcount(): slot 0 takes it all
            lf.nr_pages_mapped = nr
            if self.profile.mm_id:
                lf.mm_id[0] = mm_id
                lf.mm_id_mapcount[0] = nr - 1
            self.stats.mapcount_updates += 1

    def add_file_ptes(self, head: int, page: int, nr: int, mm_id: int) -> None:
        """folio_add_file_rmap_ptes() → __folio_add_rmap() — mm/rmap.c"""
        self.stats.rmap_calls += 1
        first = 0
        for p in range(page, page + nr):
            if self.mem.mapcount[p] == 0:
                first += 1
            self.mem.mapcount[p] += 1
        self.stats.mapcount_updates += nr
        if self.mem.folio_order(head) > 0:
            self.mem.lf(head).nr_pages_mapped += first
            self.add_large_mapcount(head, nr, mm_id)

    def try_dup_anon_ptes(self, head: int, page: int, nr: int, dst_mm: int,
                          src_has_pinned: bool) -> bool:
        """folio_try_dup_anon_rmap_ptes() — include/linux/rmap.h; all or nothing"""
        self.stats.rmap_calls += 1
        maybe_pinned = src_has_pinned and self.mem.folio_maybe_dma_pinned(head)  # folio_needs_cow_for_dma()
        if maybe_pinned and any(self.mem.test(p, PG_ANON_EXCLUSIVE) for p in range(page, page + nr)):
            return False
        for p in range(page, page + nr):
            self.mem.clear(p, PG_ANON_EXCLUSIVE)
            self.mem.mapcount[p] += 1
        self.stats.mapcount_updates += nr
        if self.mem.folio_order(head) > 0:
            self.add_large_mapcount(head, nr, dst_mm)
        return True

    def dup_file_ptes(self, head: int, page: int, nr: int, dst_mm: int) -> None:
        """folio_dup_file_rmap_ptes() — include/linux/rmap.h"""
        self.stats.rmap_calls += 1
        for p in range(page, page + nr):
            self.mem.mapcount[p] += 1
        self.stats.mapcount_updates += nr
        if self.mem.folio_order(head) > 0:
            self.add_large_mapcount(head, nr, dst_mm)

    def remove_ptes(self, head: int, page: int, nr: int, mm_id: int) -> None:
        """folio_remove_rmap_ptes() → __folio_remove_rmap() — mm/rmap.c; may queue deferred split"""
        self.stats.rmap_calls += 1
        last = 0
        for p in range(page, page + nr):
            self.mem.mapcount[p] -= 1
            if self.mem.mapcount[p] == 0:
                last += 1
        self.stats.mapcount_updates += nr
        if self.mem.folio_order(head) == 0:
            return
        self.sub_large_mapcount(head, nr, mm_id)
        lf = self.mem.lf(head)
        partially_mapped = False
        if last > 0:
            lf.nr_pages_mapped -= last
            # While a PMD maps the folio (ENTIRELY_MAPPED) no page is unmapped.
            partially_mapped = lf.nr_pages_mapped != 0 and lf.entire_mapcount < 0
        if (partially_mapped and self.mem.test(head, PG_ANON)
                and not self.mem.test(head, PG_PARTIALLY_MAPPED)):
            self.mem.set(head, PG_PARTIALLY_MAPPED)  # deferred_split_folio(folio, true)
            self.stats.deferred_splits += 1

    def pin(self, head: int) -> None:
        """try_grab_folio(folio, 1, FOLL_PIN) — mm/gup.c"""
        self.stats.pins += 1
        if self.mem.folio_order(head) > 0:
            self.ref_add(head, 1)
            self.mem.lf(head).pincount += 1
        else:
            self.ref_add(head, GUP_PIN_COUNTING_BIAS)

    def unpin(self, head: int) -> None:
        """unpin_user_page() — mm/gup.c"""
        if self.mem.folio_order(head) > 0:
            self.mem.lf(head).pincount -= 1
            self.put_refs(head, 1)
        else:
            self.put_refs(head, GUP_PIN_COUNTING_BIAS)

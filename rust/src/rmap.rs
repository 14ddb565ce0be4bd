//! Reference counts and reverse-map accounting: refcount, per-page and large mapcounts,
//! `_nr_pages_mapped`, PageAnonExclusive, MM-ID slots, deferred split.
//!
//! Follows include/linux/rmap.h and mm/rmap.c (v6.8 – v6.18; MM-ID from v6.15, folio_add_large_mapcount();
//! docs/simulation.md). Before v6.10 the kernel had no `_large_mapcount` and summed page mapcounts; the model
//! keeps the sum in `large_mapcount` in every version, which reads the same.

use crate::kernel::KernelProfile;
use crate::memory::{
    Memory, GUP_PIN_COUNTING_BIAS, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_MAYBE_SHARED,
    PG_PARTIALLY_MAPPED, PG_SWAPBACKED,
};
use crate::stats::Stats;

/// The rmap context: memory, counters and the kernel's rules.
pub struct Rmap<'a> {
    pub mem: &'a mut Memory,
    pub stats: &'a mut Stats,
    pub profile: &'a KernelProfile,
}

impl Rmap<'_> {
    /// `folio_ref_add()`.
    #[inline]
    pub fn ref_add(&mut self, head: u64, nr: i32) {
        self.mem.refcount[head as usize] += nr;
        self.stats.refcount_atomics += 1;
    }

    /// `folio_ref_sub()` / `folio_put_refs()`: frees the folio when the count reaches zero.
    pub fn put_refs(&mut self, head: u64, nr: i32) {
        self.stats.refcount_atomics += 1;
        let r = &mut self.mem.refcount[head as usize];
        *r -= nr;
        if *r == 0 {
            self.mem.free(head);
            self.stats.folios_freed += 1;
        }
    }

    /// `folio_add_return_large_mapcount()` (include/linux/rmap.h, CONFIG_MM_ID from v6.15).
    pub(crate) fn add_large_mapcount(&mut self, head: u64, diff: i32, mm_id: u32) {
        self.stats.mapcount_updates += 1;
        let track = self.profile.mm_id;
        let lf = self.mem.lf(head);
        let new = lf.large_mapcount + diff;
        lf.large_mapcount = new;
        if !track {
            return;
        }
        let mut set_shared = false;
        if lf.mm_id[0] == mm_id {
            lf.mm_id_mapcount[0] += diff;
        } else if lf.mm_id[1] == mm_id {
            lf.mm_id_mapcount[1] += diff;
        } else if lf.mm_id[0] == MM_ID_DUMMY {
            lf.mm_id[0] = mm_id;
            lf.mm_id_mapcount[0] = diff - 1;
            // Other mms may already map it.
            set_shared = new != diff - 1;
        } else if lf.mm_id[1] == MM_ID_DUMMY {
            lf.mm_id[1] = mm_id;
            lf.mm_id_mapcount[1] = diff - 1;
            // Slot 0 has mappings too.
            set_shared = true;
        }
        if set_shared {
            self.mem.set(head, PG_MAYBE_SHARED);
        }
    }

    /// `folio_sub_return_large_mapcount()`: the shared bit clears lazily, when one slot turns
    /// out to hold every remaining mapping.
    pub(crate) fn sub_large_mapcount(&mut self, head: u64, diff: i32, mm_id: u32) {
        self.stats.mapcount_updates += 1;
        let track = self.profile.mm_id;
        let lf = self.mem.lf(head);
        let new = lf.large_mapcount - diff;
        lf.large_mapcount = new;
        if !track {
            return;
        }
        for s in 0..2 {
            if lf.mm_id[s] == mm_id {
                lf.mm_id_mapcount[s] -= diff;
                if lf.mm_id_mapcount[s] >= 0 {
                    return;
                }
                // Some of this mm's mappings were added while it had no slot.
                lf.mm_id_mapcount[s] = -1;
                lf.mm_id[s] = MM_ID_DUMMY;
                break;
            }
        }
        if lf.mm_id_mapcount[0] == new || lf.mm_id_mapcount[1] == new {
            self.mem.clear(head, PG_MAYBE_SHARED);
        }
    }

    /// `folio_add_new_anon_rmap(folio, vma, addr, RMAP_EXCLUSIVE)` for a folio mapped by PTEs
    /// (mm/rmap.c). A PMD-sized folio is handled like an mTHP: its end state equals a PMD
    /// mapping split into PTEs at once (see docs/simulation.md).
    pub fn add_new_anon(&mut self, head: u64, mm_id: u32) {
        self.stats.rmap_calls += 1;
        let order = self.mem.folio_order(head);
        let nr = 1u64 << order;
        self.mem.set(head, PG_ANON | PG_SWAPBACKED);
        for p in head..head + nr {
            self.mem.mapcount[p as usize] = 1;
            self.mem.set(p, PG_ANON_EXCLUSIVE);
        }
        self.stats.mapcount_updates += nr;
        if order > 0 {
            let track = self.profile.mm_id;
            let lf = self.mem.lf(head);
            // folio_set_large_mapcount(): slot 0 takes the whole count.
            lf.large_mapcount = nr as i32 - 1;
            lf.nr_pages_mapped = nr as i32;
            if track {
                lf.mm_id[0] = mm_id;
                lf.mm_id_mapcount[0] = nr as i32 - 1;
            }
            self.stats.mapcount_updates += 1;
        }
    }

    /// `folio_add_file_rmap_ptes()` → `__folio_add_rmap()` at PTE level.
    pub fn add_file_ptes(&mut self, head: u64, page: u64, nr: u64, mm_id: u32) {
        self.stats.rmap_calls += 1;
        let mut first = 0;
        for p in page..page + nr {
            let m = &mut self.mem.mapcount[p as usize];
            if *m == 0 {
                first += 1;
            }
            *m += 1;
        }
        self.stats.mapcount_updates += nr;
        if self.mem.folio_order(head) > 0 {
            self.mem.lf(head).nr_pages_mapped += first;
            self.add_large_mapcount(head, nr as i32, mm_id);
        }
    }

    /// `folio_try_dup_anon_rmap_ptes()` (include/linux/rmap.h): all-or-nothing; fails when the
    /// source mm may have pinned the folio and any page of the range is exclusive.
    pub fn try_dup_anon_ptes(
        &mut self,
        head: u64,
        page: u64,
        nr: u64,
        dst_mm: u32,
        src_has_pinned: bool,
    ) -> bool {
        self.stats.rmap_calls += 1;
        // folio_needs_cow_for_dma(): MMF_HAS_PINNED and folio_maybe_dma_pinned().
        let maybe_pinned = src_has_pinned && self.mem.folio_maybe_dma_pinned(head);
        if maybe_pinned && (page..page + nr).any(|p| self.mem.test(p, PG_ANON_EXCLUSIVE)) {
            return false;
        }
        for p in page..page + nr {
            self.mem.clear(p, PG_ANON_EXCLUSIVE);
            self.mem.mapcount[p as usize] += 1;
        }
        self.stats.mapcount_updates += nr;
        if self.mem.folio_order(head) > 0 {
            self.add_large_mapcount(head, nr as i32, dst_mm);
        }
        true
    }

    /// `folio_dup_file_rmap_ptes()`: one more mapping of pages already mapped in the parent
    /// (`_nr_pages_mapped` does not move).
    pub fn dup_file_ptes(&mut self, head: u64, page: u64, nr: u64, dst_mm: u32) {
        self.stats.rmap_calls += 1;
        for p in page..page + nr {
            self.mem.mapcount[p as usize] += 1;
        }
        self.stats.mapcount_updates += nr;
        if self.mem.folio_order(head) > 0 {
            self.add_large_mapcount(head, nr as i32, dst_mm);
        }
    }

    /// `folio_remove_rmap_ptes()` → `__folio_remove_rmap()`: queues an anonymous folio for
    /// deferred split when some of its pages lost their last mapping while others stay mapped.
    pub fn remove_ptes(&mut self, head: u64, page: u64, nr: u64, mm_id: u32) {
        self.stats.rmap_calls += 1;
        let mut last = 0;
        for p in page..page + nr {
            let m = &mut self.mem.mapcount[p as usize];
            *m -= 1;
            if *m == 0 {
                last += 1;
            }
        }
        self.stats.mapcount_updates += nr;
        if self.mem.folio_order(head) == 0 {
            return;
        }
        self.sub_large_mapcount(head, nr as i32, mm_id);
        let lf = self.mem.lf(head);
        let mut partially_mapped = false;
        if last > 0 {
            lf.nr_pages_mapped -= last;
            // While a PMD maps the folio (ENTIRELY_MAPPED in _nr_pages_mapped) no page is unmapped.
            partially_mapped = lf.nr_pages_mapped != 0 && lf.entire_mapcount < 0;
        }
        if partially_mapped
            && self.mem.test(head, PG_ANON)
            && !self.mem.test(head, PG_PARTIALLY_MAPPED)
        {
            // deferred_split_folio(folio, true)
            self.mem.set(head, PG_PARTIALLY_MAPPED);
            self.stats.deferred_splits += 1;
        }
    }

    /// `try_grab_folio(folio, 1, FOLL_PIN)` (mm/gup.c).
    pub fn pin(&mut self, head: u64) {
        self.stats.pins += 1;
        if self.mem.folio_order(head) > 0 {
            self.ref_add(head, 1);
            self.mem.lf(head).pincount += 1;
        } else {
            self.ref_add(head, GUP_PIN_COUNTING_BIAS);
        }
    }

    /// `unpin_user_page()`.
    pub fn unpin(&mut self, head: u64) {
        if self.mem.folio_order(head) > 0 {
            self.mem.lf(head).pincount -= 1;
            self.put_refs(head, 1);
        } else {
            self.put_refs(head, GUP_PIN_COUNTING_BIAS);
        }
    }
}

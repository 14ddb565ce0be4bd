//! Reference counts and reverse-map accounting: refcount, per-page and large mapcounts,
//! `_nr_pages_mapped`, PageAnonExclusive, MM-ID slots, deferred split.
//!
//! Follows include/linux/rmap.h and mm/rmap.c (v6.8 – v6.18; MM-ID from v6.15, folio_add_large_mapcount();
//! docs/simulation.md). Before v6.10 the kernel had no `_large_mapcount` and summed page mapcounts; the model
//! keeps the sum in `large_mapcount` in every version, which reads the same.
//!
//! The helpers are written once, over [`FolioCounts`]: the simulation's [`Memory`] and the
//! arrays a user owns ([`FolioArrays`], docs/helpers.md) run the same code.

use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::memory::{
    prefetch, Memory, FREE, GUP_PIN_COUNTING_BIAS, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_MAYBE_SHARED,
    PG_PARTIALLY_MAPPED, PG_SWAPBACKED,
};
use crate::stats::Stats;

/// The per-page and per-folio counts the rmap helpers read and write: `struct page` /
/// `struct folio` fields, found by pfn (per page) or by the folio's first pfn (per folio).
/// Large-folio fields are only asked for folios of order > 0.
pub trait FolioCounts {
    /// Pages of memory (the length of the per-page arrays).
    fn nr_pages(&self) -> u64;
    /// The folio order stored on page `pfn` ([`FREE`] for a free page).
    fn order_of(&self, pfn: u64) -> u8;
    fn flags_mut(&mut self, pfn: u64) -> &mut u8;
    fn flags_of(&self, pfn: u64) -> u8;
    /// Mappings of page `pfn` (the kernel's `_mapcount + 1`).
    fn mapcount_mut(&mut self, pfn: u64) -> &mut i32;
    /// The mappings of pages `[page, page + nr)`, for the per-page loops.
    fn mapcounts_mut(&mut self, page: u64, nr: u64) -> &mut [i32];
    /// The flags of pages `[page, page + nr)`.
    fn flags_range_mut(&mut self, page: u64, nr: u64) -> &mut [u8];
    /// `folio->_refcount`.
    fn refcount_mut(&mut self, head: u64) -> &mut i32;
    /// The refcounts stored at pfns `[head, head + nr)`: of `nr` order-0 folios in a row.
    fn refcounts_mut(&mut self, head: u64, nr: u64) -> &mut [i32];
    /// The orders stored on pages `[page, page + nr)`.
    fn orders(&self, page: u64, nr: u64) -> &[u8];
    fn refcount_of(&self, head: u64) -> i32;
    /// `folio->_large_mapcount` (−1 = none).
    fn large_mapcount_mut(&mut self, head: u64) -> &mut i32;
    /// `folio->_nr_pages_mapped`.
    fn nr_pages_mapped_mut(&mut self, head: u64) -> &mut i32;
    /// `folio->_pincount`.
    fn pincount_mut(&mut self, head: u64) -> &mut i32;
    fn pincount_of(&self, head: u64) -> i32;
    /// `folio->_entire_mapcount` (−1 = no PMD mapping); user arrays hold no PMD mappings.
    fn entire_mapcount_of(&self, _head: u64) -> i32 {
        -1
    }
    /// `folio->_mm_id[2]` and `folio->_mm_id_mapcount[2]` (−1 = none), v6.15+.
    fn mm_id_slots(&mut self, head: u64) -> (&mut [u32; 2], &mut [i32; 2]);
    /// [`FolioCounts::large_mapcount_mut`] and [`FolioCounts::mm_id_slots`] found at once.
    fn large_mapcount_and_slots(&mut self, head: u64) -> (&mut i32, &mut [u32; 2], &mut [i32; 2]);
    /// The counts `__folio_remove_rmap()` updates in the large folio at `head`, at once.
    fn large_counts_mut(&mut self, head: u64) -> LargeCountsMut<'_>;
    /// The folio's last reference went: it returns to the allocator.
    fn free_folio(&mut self, head: u64);
    /// [`FolioCounts::free_folio`] of each of the `n` order-0 folios from `first`, in order.
    fn free_order0_run(&mut self, first: u64, n: u64) {
        for head in first..first + n {
            self.free_folio(head);
        }
    }
    /// [`FolioCounts::free_folio`] of each folio of pages `[first, end)`, which hold whole
    /// allocated folios, in pfn order.
    fn free_folio_run(&mut self, first: u64, end: u64) {
        let mut head = first;
        while head < end {
            let nr = folio_nr_pages(self.order_of(head));
            self.free_folio(head);
            head += nr;
        }
    }
    /// The copy of a page's contents `copy_present_page()` makes (the simulation's token).
    fn copy_contents(&mut self, _dst: u64, _src: u64) {}
    /// A hint that a zap reads and writes page `pfn`'s order, flags, mapcount and refcount
    /// soon (no effect on any count).
    #[inline(always)]
    fn prefetch_counts(&self, _pfn: u64) {}

    #[inline]
    fn folio_order(&self, head: u64) -> u32 {
        self.order_of(head) as u32
    }
    /// The first pfn of the folio holding allocated page `pfn` (a free page is its own).
    #[inline]
    fn folio_head(&self, pfn: u64) -> u64 {
        match self.order_of(pfn) {
            FREE => pfn,
            o => pfn & !((1u64 << o) - 1),
        }
    }
    #[inline]
    fn test(&self, pfn: u64, flag: u8) -> bool {
        self.flags_of(pfn) & flag != 0
    }
    #[inline]
    fn set(&mut self, pfn: u64, flag: u8) {
        *self.flags_mut(pfn) |= flag;
    }
    #[inline]
    fn clear(&mut self, pfn: u64, flag: u8) {
        *self.flags_mut(pfn) &= !flag;
    }
    /// `folio_maybe_dma_pinned()`: pincount for large folios, the refcount bias heuristic
    /// for small ones.
    fn folio_maybe_dma_pinned(&self, head: u64) -> bool {
        if self.folio_order(head) > 0 {
            self.pincount_of(head) > 0
        } else {
            self.refcount_of(head) >= GUP_PIN_COUNTING_BIAS
        }
    }
}

/// A large folio's counts as an unmap updates them: its first page's flags and its
/// record's fields, borrowed together so that a zap finds the record once per batch.
pub struct LargeCountsMut<'a> {
    pub flags: &'a mut u8,
    pub large_mapcount: &'a mut i32,
    pub nr_pages_mapped: &'a mut i32,
    /// `_entire_mapcount` (−1 = no PMD mapping).
    pub entire_mapcount: i32,
    pub mm_id: &'a mut [u32; 2],
    pub mm_id_mapcount: &'a mut [i32; 2],
}

impl FolioCounts for Memory {
    #[inline]
    fn nr_pages(&self) -> u64 {
        self.order.len() as u64
    }
    #[inline]
    fn order_of(&self, pfn: u64) -> u8 {
        self.order[pfn as usize]
    }
    #[inline]
    fn flags_mut(&mut self, pfn: u64) -> &mut u8 {
        &mut self.flags[pfn as usize]
    }
    #[inline]
    fn flags_of(&self, pfn: u64) -> u8 {
        self.flags[pfn as usize]
    }
    #[inline]
    fn mapcount_mut(&mut self, pfn: u64) -> &mut i32 {
        &mut self.mapcount[pfn as usize]
    }
    #[inline]
    fn mapcounts_mut(&mut self, page: u64, nr: u64) -> &mut [i32] {
        &mut self.mapcount[page as usize..(page + nr) as usize]
    }
    #[inline]
    fn flags_range_mut(&mut self, page: u64, nr: u64) -> &mut [u8] {
        &mut self.flags[page as usize..(page + nr) as usize]
    }
    #[inline]
    fn refcount_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.refcount[head as usize]
    }
    #[inline]
    fn refcount_of(&self, head: u64) -> i32 {
        self.refcount[head as usize]
    }
    #[inline]
    fn refcounts_mut(&mut self, head: u64, nr: u64) -> &mut [i32] {
        &mut self.refcount[head as usize..(head + nr) as usize]
    }
    #[inline]
    fn orders(&self, page: u64, nr: u64) -> &[u8] {
        &self.order[page as usize..(page + nr) as usize]
    }
    #[inline]
    fn large_mapcount_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.lf(head).large_mapcount
    }
    #[inline]
    fn nr_pages_mapped_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.lf(head).nr_pages_mapped
    }
    #[inline]
    fn pincount_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.lf(head).pincount
    }
    fn pincount_of(&self, head: u64) -> i32 {
        self.large_folio(head).map_or(0, |lf| lf.pincount)
    }
    fn entire_mapcount_of(&self, head: u64) -> i32 {
        self.large_folio(head).map_or(-1, |lf| lf.entire_mapcount)
    }
    #[inline]
    fn mm_id_slots(&mut self, head: u64) -> (&mut [u32; 2], &mut [i32; 2]) {
        let lf = self.lf(head);
        (&mut lf.mm_id, &mut lf.mm_id_mapcount)
    }
    #[inline]
    fn large_mapcount_and_slots(&mut self, head: u64) -> (&mut i32, &mut [u32; 2], &mut [i32; 2]) {
        let lf = self.lf(head);
        (&mut lf.large_mapcount, &mut lf.mm_id, &mut lf.mm_id_mapcount)
    }
    #[inline(always)]
    fn large_counts_mut(&mut self, head: u64) -> LargeCountsMut<'_> {
        let (lf, flags) = self.lf_and_flags(head);
        LargeCountsMut {
            flags,
            large_mapcount: &mut lf.large_mapcount,
            nr_pages_mapped: &mut lf.nr_pages_mapped,
            entire_mapcount: lf.entire_mapcount,
            mm_id: &mut lf.mm_id,
            mm_id_mapcount: &mut lf.mm_id_mapcount,
        }
    }
    fn free_folio(&mut self, head: u64) {
        self.free(head);
    }
    fn free_order0_run(&mut self, first: u64, n: u64) {
        Memory::free_order0_run(self, first, n);
    }
    fn free_folio_run(&mut self, first: u64, end: u64) {
        Memory::free_folio_run(self, first, end);
    }
    fn copy_contents(&mut self, dst: u64, src: u64) {
        self.token[dst as usize] = self.token[src as usize];
    }
    #[inline(always)]
    fn prefetch_counts(&self, pfn: u64) {
        let i = pfn as usize;
        prefetch(&self.order, i);
        prefetch(&self.flags, i);
        prefetch(&self.mapcount, i);
        prefetch(&self.refcount, i);
    }
}

/// The counts as arrays a user owns (docs/helpers.md, "Array layouts"). Every array has one
/// entry per pfn; per-folio fields are read and written at the folio's first pfn (the
/// entries of tail pages are left alone), the MM-ID arrays hold two entries per pfn.
pub struct FolioArrays<'a> {
    /// Folio order on every page of an allocated folio, [`FREE`] (255) on a free page.
    pub order: &'a mut [u8],
    /// `PG_*` bits as [`crate::memory`] numbers them.
    pub flags: &'a mut [u8],
    pub mapcount: &'a mut [i32],
    pub refcount: &'a mut [i32],
    pub large_mapcount: &'a mut [i32],
    pub nr_pages_mapped: &'a mut [i32],
    pub pincount: &'a mut [i32],
    /// `2 * nr_pages` entries: slot `s` of the folio at `head` is `[2 * head + s]`.
    pub mm_id: &'a mut [u32],
    pub mm_id_mapcount: &'a mut [i32],
}

impl<'a> FolioArrays<'a> {
    /// Checks that the arrays have matching lengths; [`check_folio`] and
    /// [`crate::pgtable::check_table`] check the folio map where a helper will read it.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        order: &'a mut [u8],
        flags: &'a mut [u8],
        mapcount: &'a mut [i32],
        refcount: &'a mut [i32],
        large_mapcount: &'a mut [i32],
        nr_pages_mapped: &'a mut [i32],
        pincount: &'a mut [i32],
        mm_id: &'a mut [u32],
        mm_id_mapcount: &'a mut [i32],
    ) -> Result<FolioArrays<'a>> {
        let n = order.len();
        let lens = [
            ("flags", flags.len()),
            ("mapcount", mapcount.len()),
            ("refcount", refcount.len()),
            ("large_mapcount", large_mapcount.len()),
            ("nr_pages_mapped", nr_pages_mapped.len()),
            ("pincount", pincount.len()),
        ];
        for (name, len) in lens {
            if len != n {
                return Err(Error::value(format!("{name} has {len} entries but order has {n}: one per pfn")));
            }
        }
        for (name, len) in [("mm_id", mm_id.len()), ("mm_id_mapcount", mm_id_mapcount.len())] {
            if len != 2 * n {
                return Err(Error::value(format!("{name} has {len} entries; it needs two per pfn ({})", 2 * n)));
            }
        }
        Ok(FolioArrays { order, flags, mapcount, refcount, large_mapcount, nr_pages_mapped, pincount, mm_id, mm_id_mapcount })
    }

}

/// The folio at `head` in a folio map: allocated, naturally aligned, inside the map, each of
/// its pages carrying its order. Returns the order.
pub fn check_folio(order: &[u8], head: u64, what: &str) -> Result<u32> {
    let n = order.len() as u64;
    let o = match order.get(head as usize) {
        None => return Err(Error::value(format!("{what}={head} is beyond the {n} pages of the count arrays"))),
        Some(&FREE) => return Err(Error::value(format!("{what}={head} is a free page (order 255), not a folio"))),
        Some(&o) if o >= 32 => return Err(Error::value(format!("order[{head}]={o}: an order is below 32, or 255 for a free page"))),
        Some(&o) => o as u32,
    };
    let nr = 1u64 << o;
    if head % nr != 0 {
        return Err(Error::value(format!("{what}={head} is not the first page of its folio of order {o}")));
    }
    if head + nr > n {
        return Err(Error::value(format!("the folio of order {o} at pfn {head} runs past the {n} pages of order")));
    }
    if let Some(k) = (head..head + nr).find(|&p| order[p as usize] as u32 != o) {
        return Err(Error::value(format!(
            "order[{k}]={} inside the folio of order {o} at pfn {head}: every page of a folio carries its order",
            order[k as usize]
        )));
    }
    Ok(o)
}

impl FolioCounts for FolioArrays<'_> {
    #[inline]
    fn nr_pages(&self) -> u64 {
        self.order.len() as u64
    }
    #[inline]
    fn order_of(&self, pfn: u64) -> u8 {
        self.order[pfn as usize]
    }
    #[inline]
    fn flags_mut(&mut self, pfn: u64) -> &mut u8 {
        &mut self.flags[pfn as usize]
    }
    #[inline]
    fn flags_of(&self, pfn: u64) -> u8 {
        self.flags[pfn as usize]
    }
    #[inline]
    fn mapcount_mut(&mut self, pfn: u64) -> &mut i32 {
        &mut self.mapcount[pfn as usize]
    }
    #[inline]
    fn mapcounts_mut(&mut self, page: u64, nr: u64) -> &mut [i32] {
        &mut self.mapcount[page as usize..(page + nr) as usize]
    }
    #[inline]
    fn flags_range_mut(&mut self, page: u64, nr: u64) -> &mut [u8] {
        &mut self.flags[page as usize..(page + nr) as usize]
    }
    #[inline]
    fn refcount_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.refcount[head as usize]
    }
    #[inline]
    fn refcount_of(&self, head: u64) -> i32 {
        self.refcount[head as usize]
    }
    #[inline]
    fn refcounts_mut(&mut self, head: u64, nr: u64) -> &mut [i32] {
        &mut self.refcount[head as usize..(head + nr) as usize]
    }
    #[inline]
    fn orders(&self, page: u64, nr: u64) -> &[u8] {
        &self.order[page as usize..(page + nr) as usize]
    }
    #[inline]
    fn large_mapcount_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.large_mapcount[head as usize]
    }
    #[inline]
    fn nr_pages_mapped_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.nr_pages_mapped[head as usize]
    }
    #[inline]
    fn pincount_mut(&mut self, head: u64) -> &mut i32 {
        &mut self.pincount[head as usize]
    }
    #[inline]
    fn pincount_of(&self, head: u64) -> i32 {
        self.pincount[head as usize]
    }
    #[inline]
    fn mm_id_slots(&mut self, head: u64) -> (&mut [u32; 2], &mut [i32; 2]) {
        let h = 2 * head as usize;
        let ids: &mut [u32; 2] = (&mut self.mm_id[h..h + 2]).try_into().expect("two slots");
        let counts: &mut [i32; 2] = (&mut self.mm_id_mapcount[h..h + 2]).try_into().expect("two slots");
        (ids, counts)
    }
    #[inline]
    fn large_mapcount_and_slots(&mut self, head: u64) -> (&mut i32, &mut [u32; 2], &mut [i32; 2]) {
        let h = 2 * head as usize;
        let ids: &mut [u32; 2] = (&mut self.mm_id[h..h + 2]).try_into().expect("two slots");
        let counts: &mut [i32; 2] = (&mut self.mm_id_mapcount[h..h + 2]).try_into().expect("two slots");
        (&mut self.large_mapcount[head as usize], ids, counts)
    }
    #[inline(always)]
    fn large_counts_mut(&mut self, head: u64) -> LargeCountsMut<'_> {
        let h = head as usize;
        LargeCountsMut {
            flags: &mut self.flags[h],
            large_mapcount: &mut self.large_mapcount[h],
            nr_pages_mapped: &mut self.nr_pages_mapped[h],
            entire_mapcount: -1,
            mm_id: (&mut self.mm_id[2 * h..2 * h + 2]).try_into().expect("two slots"),
            mm_id_mapcount: (&mut self.mm_id_mapcount[2 * h..2 * h + 2]).try_into().expect("two slots"),
        }
    }
    /// The pages become free (order 255, counts and flags zero) and the folio's record
    /// fields return to their empty values, as a new folio would have them.
    fn free_folio(&mut self, head: u64) {
        let h = head as usize;
        let o = self.order[h];
        let nr = if o == FREE { 1 } else { 1usize << o };
        self.order[h..h + nr].fill(FREE);
        self.flags[h..h + nr].fill(0);
        self.mapcount[h..h + nr].fill(0);
        self.refcount[h..h + nr].fill(0);
        if o != FREE && o > 0 {
            self.large_mapcount[h] = -1;
            self.nr_pages_mapped[h] = 0;
            self.pincount[h] = 0;
            self.mm_id[2 * h..2 * h + 2].fill(MM_ID_DUMMY);
            self.mm_id_mapcount[2 * h..2 * h + 2].fill(-1);
        }
    }
}

/// Pages of a folio of the order stored on its head; a free page ([`FREE`]) counts as one.
#[inline(always)]
pub(crate) fn folio_nr_pages(order: u8) -> u64 {
    if order == FREE {
        1
    } else {
        1 << order
    }
}

/// `folio_put_refs()` on the counts alone: frees the folio when its count reaches zero and
/// says so. Callers count one refcount atomic per call.
#[inline(always)]
pub(crate) fn folio_put_refs<M: FolioCounts>(mem: &mut M, head: u64, nr: i32) -> bool {
    let r = mem.refcount_mut(head);
    *r -= nr;
    let freed = *r == 0;
    if freed {
        mem.free_folio(head);
    }
    freed
}

/// `times` calls of [`folio_put_refs`] on one folio, in closed form: the count reaches zero
/// (and the folio is freed) at most once, after which the later calls take it below zero, as
/// they would one at a time. Returns whether the folio was freed.
#[inline]
pub(crate) fn folio_put_refs_times<M: FolioCounts>(mem: &mut M, head: u64, nr: i32, times: u32) -> bool {
    let r = mem.refcount_mut(head);
    let r0 = *r as i64;
    let (nr, times) = (nr as i64, times as i64);
    if nr > 0 && r0 > 0 && r0 % nr == 0 && r0 / nr <= times {
        mem.free_folio(head);
        *mem.refcount_mut(head) = (-(times - r0 / nr) * nr) as i32;
        true
    } else {
        *r = (r0 - times * nr) as i32;
        false
    }
}

/// `folio_add_return_large_mapcount()` (include/linux/rmap.h, CONFIG_MM_ID from v6.15) on the
/// counts alone (callers count the update): a slot for `mm_id` if there is none and one is
/// free, and the shared bit when another mm may map the folio too. `track`: the kernel has
/// MM-ID slots (v6.15+).
#[inline(always)]
pub(crate) fn add_large_mapcount<M: FolioCounts>(mem: &mut M, track: bool, head: u64, diff: i32, mm_id: u32) {
    let (c, ids, counts) = mem.large_mapcount_and_slots(head);
    *c += diff;
    let new = *c;
    if !track {
        return;
    }
    let mut set_shared = false;
    if ids[0] == mm_id {
        counts[0] += diff;
    } else if ids[1] == mm_id {
        counts[1] += diff;
    } else if ids[0] == MM_ID_DUMMY {
        ids[0] = mm_id;
        counts[0] = diff - 1;
        // Other mms may already map it.
        set_shared = new != diff - 1;
    } else if ids[1] == MM_ID_DUMMY {
        ids[1] = mm_id;
        counts[1] = diff - 1;
        // Slot 0 has mappings too.
        set_shared = true;
    }
    if set_shared {
        mem.set(head, PG_MAYBE_SHARED);
    }
}

/// The mappings `folio_try_dup_anon_rmap_ptes()` (once it may go ahead: the pages are no
/// longer exclusive) or `folio_dup_file_rmap_ptes()` (include/linux/rmap.h) add for pages
/// `[page, page + nr)` of the folio of `order` at `head`, on the counts alone: callers count
/// one rmap call, `nr` mapcount updates and, for a large folio, one of the large mapcount.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) fn folio_dup_ptes<M: FolioCounts>(mem: &mut M, track: bool, head: u64, order: u32, page: u64, nr: u64, mm_id: u32, anon: bool) {
    if anon {
        for f in mem.flags_range_mut(page, nr) {
            *f &= !PG_ANON_EXCLUSIVE;
        }
    }
    for m in mem.mapcounts_mut(page, nr) {
        *m += 1;
    }
    if order > 0 {
        add_large_mapcount(mem, track, head, nr as i32, mm_id);
    }
}

/// `folio_sub_return_large_mapcount()` (include/linux/rmap.h) on the counts alone (callers
/// count the update): the shared bit clears lazily, when one slot turns out to hold every
/// remaining mapping. `track`: the kernel has MM-ID slots (v6.15+).
#[inline(always)]
pub(crate) fn sub_large_mapcount<M: FolioCounts>(mem: &mut M, track: bool, head: u64, diff: i32, mm_id: u32) {
    sub_large_counts(&mut mem.large_counts_mut(head), track, diff, mm_id);
}

/// [`sub_large_mapcount`] on counts already found.
#[inline(always)]
fn sub_large_counts(c: &mut LargeCountsMut<'_>, track: bool, diff: i32, mm_id: u32) {
    *c.large_mapcount -= diff;
    let new = *c.large_mapcount;
    if !track {
        return;
    }
    let (ids, counts) = (&mut *c.mm_id, &mut *c.mm_id_mapcount);
    for s in 0..2 {
        if ids[s] == mm_id {
            counts[s] -= diff;
            if counts[s] >= 0 {
                return;
            }
            // Some of this mm's mappings were added while it had no slot.
            counts[s] = -1;
            ids[s] = MM_ID_DUMMY;
            break;
        }
    }
    if counts[0] == new || counts[1] == new {
        *c.flags &= !PG_MAYBE_SHARED;
    }
}

/// `__folio_remove_rmap(.., RMAP_LEVEL_PTE)` (mm/rmap.c) of pages `[page, page + nr)` of the
/// folio of `order` at `head`, on the counts alone: returns whether the folio was queued for
/// deferred split (an anonymous folio some of whose pages lost their last mapping while
/// others stay mapped). Callers count one rmap call and `nr` mapcount updates, plus one for
/// the large mapcount of a large folio ([`Rmap::remove_ptes`]; the zap loop counts in bulk).
#[inline(always)]
pub(crate) fn folio_remove_ptes<M: FolioCounts>(mem: &mut M, track: bool, head: u64, order: u32, page: u64, nr: u64, mm_id: u32) -> bool {
    let last = if nr == 1 {
        let m = mem.mapcount_mut(page);
        *m -= 1;
        (*m == 0) as i32
    } else {
        let mut last = 0;
        for m in mem.mapcounts_mut(page, nr) {
            *m -= 1;
            last += (*m == 0) as i32;
        }
        last
    };
    if order == 0 {
        return false;
    }
    let mut c = mem.large_counts_mut(head);
    sub_large_counts(&mut c, track, nr as i32, mm_id);
    let mut partially_mapped = false;
    if last > 0 {
        *c.nr_pages_mapped -= last;
        // While a PMD maps the folio (ENTIRELY_MAPPED in _nr_pages_mapped) no page is unmapped.
        partially_mapped = *c.nr_pages_mapped != 0 && c.entire_mapcount < 0;
    }
    if partially_mapped && *c.flags & (PG_ANON | PG_PARTIALLY_MAPPED) == PG_ANON {
        // deferred_split_folio(folio, true)
        *c.flags |= PG_PARTIALLY_MAPPED;
        return true;
    }
    false
}

/// `n` calls of `__folio_remove_rmap(.., RMAP_LEVEL_PTE)` with one page each on the large
/// folio at `head` (a zap one PTE at a time, v6.8), after the caller lowered the pages'
/// mapcounts, `last` of which reached zero. Each call lowers the large mapcount by one (one
/// slot update each with MM-ID slots, v6.15+) and, for a page that lost its last mapping,
/// `_nr_pages_mapped`, checking what is left: the folio is queued for deferred split when
/// some check sees pages still mapped. Returns whether it was queued.
#[inline(always)]
pub(crate) fn folio_remove_ptes_one_by_one<M: FolioCounts>(mem: &mut M, track: bool, head: u64, n: u64, last: i32, mm_id: u32) -> bool {
    let mut c = mem.large_counts_mut(head);
    if track {
        for _ in 0..n {
            sub_large_counts(&mut c, true, 1, mm_id);
        }
    } else {
        sub_large_counts(&mut c, false, n as i32, mm_id);
    }
    if last == 0 {
        return false;
    }
    let before = *c.nr_pages_mapped;
    *c.nr_pages_mapped -= last;
    // The checks see before − 1, before − 2, …: one of them is not zero unless the only one is.
    let some_left = last >= 2 || before != 1;
    // While a PMD maps the folio (ENTIRELY_MAPPED in _nr_pages_mapped) no page is unmapped.
    if some_left && c.entire_mapcount < 0 && *c.flags & (PG_ANON | PG_PARTIALLY_MAPPED) == PG_ANON {
        // deferred_split_folio(folio, true)
        *c.flags |= PG_PARTIALLY_MAPPED;
        return true;
    }
    false
}

/// The rmap context: memory, counters and the kernel's rules.
pub struct Rmap<'a, M: FolioCounts = Memory> {
    pub mem: &'a mut M,
    pub stats: &'a mut Stats,
    pub profile: &'a KernelProfile,
}

impl<M: FolioCounts> Rmap<'_, M> {
    /// `folio_ref_add()`.
    #[inline]
    pub fn ref_add(&mut self, head: u64, nr: i32) {
        *self.mem.refcount_mut(head) += nr;
        self.stats.refcount_atomics += 1;
    }

    /// `folio_ref_sub()` / `folio_put_refs()`: frees the folio when the count reaches zero.
    #[inline]
    pub fn put_refs(&mut self, head: u64, nr: i32) {
        self.stats.refcount_atomics += 1;
        self.stats.folios_freed += folio_put_refs(self.mem, head, nr) as u64;
    }

    /// `folio_add_return_large_mapcount()`; see [`add_large_mapcount`].
    #[inline]
    pub(crate) fn add_large_mapcount(&mut self, head: u64, diff: i32, mm_id: u32) {
        self.stats.mapcount_updates += 1;
        add_large_mapcount(self.mem, self.profile.mm_id, head, diff, mm_id);
    }

    /// `folio_sub_return_large_mapcount()`; see [`sub_large_mapcount`].
    #[inline]
    pub(crate) fn sub_large_mapcount(&mut self, head: u64, diff: i32, mm_id: u32) {
        self.stats.mapcount_updates += 1;
        sub_large_mapcount(self.mem, self.profile.mm_id, head, diff, mm_id);
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
            *self.mem.mapcount_mut(p) = 1;
            self.mem.set(p, PG_ANON_EXCLUSIVE);
        }
        self.stats.mapcount_updates += nr;
        if order > 0 {
            let track = self.profile.mm_id;
            // folio_set_large_mapcount(): slot 0 takes the whole count.
            *self.mem.large_mapcount_mut(head) = nr as i32 - 1;
            *self.mem.nr_pages_mapped_mut(head) = nr as i32;
            if track {
                let (ids, counts) = self.mem.mm_id_slots(head);
                ids[0] = mm_id;
                counts[0] = nr as i32 - 1;
            }
            self.stats.mapcount_updates += 1;
        }
    }

    /// `folio_add_anon_rmap_ptes()` → `__folio_add_anon_rmap()` (mm/rmap.c) for pages of an
    /// anonymous folio already in the rmap (a swap-in or a page moved back): the pages become
    /// exclusive when `exclusive` (RMAP_EXCLUSIVE), and `_nr_pages_mapped` counts the first
    /// mappings, as for a file folio.
    pub fn add_anon_ptes(&mut self, head: u64, page: u64, nr: u64, mm_id: u32, exclusive: bool) {
        self.add_ptes(head, page, nr, mm_id);
        if exclusive {
            for f in self.mem.flags_range_mut(page, nr) {
                *f |= PG_ANON_EXCLUSIVE;
            }
        }
    }

    /// `folio_add_file_rmap_ptes()` → `__folio_add_rmap()` at PTE level.
    pub fn add_file_ptes(&mut self, head: u64, page: u64, nr: u64, mm_id: u32) {
        self.add_ptes(head, page, nr, mm_id);
    }

    /// `__folio_add_rmap(.., RMAP_LEVEL_PTE)`: per-page mapcounts, `_nr_pages_mapped` for
    /// pages mapped for the first time, the large mapcount.
    fn add_ptes(&mut self, head: u64, page: u64, nr: u64, mm_id: u32) {
        self.stats.rmap_calls += 1;
        let mut first = 0;
        for m in self.mem.mapcounts_mut(page, nr) {
            first += (*m == 0) as i32;
            *m += 1;
        }
        self.stats.mapcount_updates += nr;
        if self.mem.folio_order(head) > 0 {
            *self.mem.nr_pages_mapped_mut(head) += first;
            self.add_large_mapcount(head, nr as i32, mm_id);
        }
    }

    /// `folio_try_dup_anon_rmap_ptes()` (include/linux/rmap.h): all-or-nothing; fails when the
    /// source mm may have pinned the folio and any page of the range is exclusive.
    #[inline]
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
        if maybe_pinned && self.mem.flags_range_mut(page, nr).iter().any(|&f| f & PG_ANON_EXCLUSIVE != 0) {
            return false;
        }
        self.dup_ptes(head, page, nr, dst_mm, true);
        true
    }

    /// `folio_dup_file_rmap_ptes()`: one more mapping of pages already mapped in the parent
    /// (`_nr_pages_mapped` does not move).
    #[inline]
    pub fn dup_file_ptes(&mut self, head: u64, page: u64, nr: u64, dst_mm: u32) {
        self.stats.rmap_calls += 1;
        self.dup_ptes(head, page, nr, dst_mm, false);
    }

    /// [`folio_dup_ptes`] with its counters (the caller counted the rmap call).
    #[inline(always)]
    fn dup_ptes(&mut self, head: u64, page: u64, nr: u64, dst_mm: u32, anon: bool) {
        let order = self.mem.folio_order(head);
        self.stats.mapcount_updates += nr + (order > 0) as u64;
        folio_dup_ptes(self.mem, self.profile.mm_id, head, order, page, nr, dst_mm, anon);
    }

    /// `folio_remove_rmap_ptes()` → `__folio_remove_rmap()`: one rmap call, a mapcount update
    /// per page and one of the large mapcount; see [`folio_remove_ptes`].
    #[inline]
    pub fn remove_ptes(&mut self, head: u64, page: u64, nr: u64, mm_id: u32) {
        let order = self.mem.folio_order(head);
        self.stats.rmap_calls += 1;
        self.stats.mapcount_updates += nr + (order > 0) as u64;
        self.stats.deferred_splits += folio_remove_ptes(self.mem, self.profile.mm_id, head, order, page, nr, mm_id) as u64;
    }

    /// `try_grab_folio(folio, 1, FOLL_PIN)` (mm/gup.c).
    pub fn pin(&mut self, head: u64) {
        self.stats.pins += 1;
        if self.mem.folio_order(head) > 0 {
            self.ref_add(head, 1);
            *self.mem.pincount_mut(head) += 1;
        } else {
            self.ref_add(head, GUP_PIN_COUNTING_BIAS);
        }
    }

    /// `unpin_user_page()`.
    pub fn unpin(&mut self, head: u64) {
        if self.mem.folio_order(head) > 0 {
            *self.mem.pincount_mut(head) -= 1;
            self.put_refs(head, 1);
        } else {
            self.put_refs(head, GUP_PIN_COUNTING_BIAS);
        }
    }
}

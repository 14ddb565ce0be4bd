//! Physical memory: pages and folios as structure-of-arrays, and a buddy allocator.
//!
//! Per page (indexed by pfn): the folio order (or [`FREE`]), page flags, the mapcount (stored
//! as the number of mappings, i.e. the kernel's `_mapcount + 1`), the refcount (meaningful on
//! a folio's first page, as `folio->_refcount`) and a content token for COW-isolation checks.
//! Fields that the kernel keeps in a large folio's tail pages (`_large_mapcount`,
//! `_entire_mapcount`, `_nr_pages_mapped`, `_pincount`, the MM-ID slots) live in
//! [`LargeFolio`] records, found through a side table indexed by `pfn / 2` (a large folio's
//! first pfn is even), so that every per-page array reads as the kernel's `struct page`
//! fields do: a tail page's refcount is 0. The records use the kernel's
//! "minus one" encoding where the algorithms (include/linux/rmap.h, folio_add_large_mapcount(), v6.15)
//! depend on it.
//!
//! 16 bytes per page (14 in the per-page arrays, 2 in the record index) plus one 32-byte
//! record per large folio.

use std::collections::BTreeSet;

use crate::error::{Error, Result};

/// `order[pfn]` of a free page.
pub const FREE: u8 = 0xff;

/// Page flag: PG_anon_exclusive (per page).
pub const PG_ANON_EXCLUSIVE: u8 = 1 << 0;
/// Folio flags, kept on the folio's first page.
pub const PG_ANON: u8 = 1 << 1;
pub const PG_SWAPBACKED: u8 = 1 << 2;
/// The folio is in a file's (or shmem object's) page cache.
pub const PG_FILE: u8 = 1 << 3;
pub const PG_DIRTY: u8 = 1 << 4;
/// Queued for deferred split because it became partially mapped (`folio_test_partially_mapped`,
/// or before v6.12 "on the deferred list").
pub const PG_PARTIALLY_MAPPED: u8 = 1 << 5;
/// `FOLIO_MM_IDS_SHARED_BIT`: "maybe mapped shared" (CONFIG_MM_ID, v6.15).
pub const PG_MAYBE_SHARED: u8 = 1 << 6;

/// `GUP_PIN_COUNTING_BIAS`: a FOLL_PIN on a small folio adds this to the refcount.
pub const GUP_PIN_COUNTING_BIAS: i32 = 1024;

/// `MM_ID_DUMMY`: a free MM-ID slot.
pub const MM_ID_DUMMY: u32 = 0;

/// What the kernel keeps in a large folio's tail pages. Counts use the kernel's encoding
/// (−1 = none) except `nr_pages_mapped` and `pincount`, which are plain counts as there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LargeFolio {
    pub large_mapcount: i32,
    pub entire_mapcount: i32,
    pub nr_pages_mapped: i32,
    pub pincount: i32,
    pub mm_id: [u32; 2],
    pub mm_id_mapcount: [i32; 2],
}

impl LargeFolio {
    fn new() -> LargeFolio {
        LargeFolio {
            large_mapcount: -1,
            entire_mapcount: -1,
            nr_pages_mapped: 0,
            pincount: 0,
            mm_id: [MM_ID_DUMMY; 2],
            mm_id_mapcount: [-1; 2],
        }
    }
}

/// splitmix64: the deterministic generator behind simulated fragmentation (the Python
/// reference uses the same one, so both make the same choices).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A uniform double in [0, 1) from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Physical memory of `nr_pages` pages.
#[derive(Clone, Debug)]
pub struct Memory {
    pub order: Vec<u8>,
    pub flags: Vec<u8>,
    pub mapcount: Vec<i32>,
    pub refcount: Vec<i32>,
    pub token: Vec<u32>,
    /// Large-folio records; `large_idx[head / 2]` is the index of a large folio's record.
    large: Vec<LargeFolio>,
    large_idx: Vec<u32>,
    large_free: Vec<u32>,
    /// Free blocks per order, by first pfn (buddy allocator).
    free_lists: Vec<BTreeSet<u64>>,
    pub free_pages: u64,
    pub max_order: u32,
    /// Probability, per order, that an allocation of that order fails as if memory were
    /// too fragmented (so the fault falls back to a smaller folio).
    pub fallback: Vec<f64>,
    pub rng: SplitMix64,
    /// Numpy views of the per-page arrays held by Python (shared with copies made for a
    /// step, so that a step on a copy knows; see `crate::ptes`).
    pub exports: crate::ptes::Exports,
}

impl Memory {
    /// `nr_pages` pages, carved into naturally aligned blocks of at most `max_order`.
    pub fn new(nr_pages: u64, max_order: u32, seed: u64) -> Result<Memory> {
        if nr_pages == 0 {
            return Err(Error::value("memory must hold at least one page"));
        }
        if nr_pages > u32::MAX as u64 {
            return Err(Error::value(format!(
                "{nr_pages} pages is more than the model's 2^32 page frames"
            )));
        }
        let n = nr_pages as usize;
        // The five per-page arrays together, all written below.
        crate::alloc::ensure_host_room(nr_pages as u128 * 16, "the page arrays of the simulated memory")?;
        use crate::alloc::try_filled;
        let mut m = Memory {
            order: try_filled(n, FREE, "the page-order array")?,
            flags: try_filled(n, 0, "the page-flag array")?,
            mapcount: try_filled(n, 0, "the mapcount array")?,
            refcount: try_filled(n, 0, "the refcount array")?,
            token: try_filled(n, 0, "the token array")?,
            large: Vec::new(),
            large_idx: try_filled(n.div_ceil(2), 0, "the large-folio index")?,
            large_free: Vec::new(),
            free_lists: vec![BTreeSet::new(); max_order as usize + 1],
            free_pages: 0,
            max_order,
            fallback: vec![0.0; max_order as usize + 1],
            rng: SplitMix64(seed),
            exports: Default::default(),
        };
        let mut pfn = 0u64;
        while pfn < nr_pages {
            let mut o = max_order;
            while o > 0 && (pfn & ((1 << o) - 1) != 0 || pfn + (1 << o) > nr_pages) {
                o -= 1;
            }
            m.free_lists[o as usize].insert(pfn);
            m.free_pages += 1 << o;
            pfn += 1 << o;
        }
        Ok(m)
    }

    /// A copy, or a host out-of-memory error (or a stop from `t`). `share`: the copy counts
    /// this memory's views (a step's copy, see `State::adopt_exported`); else it has none.
    pub fn try_clone(&self, t: &crate::watch::Ticker, share: bool) -> Result<Memory> {
        use crate::alloc::try_copy;
        Ok(Memory {
            order: try_copy(&self.order, "the page-order array", t)?,
            flags: try_copy(&self.flags, "the page-flag array", t)?,
            mapcount: try_copy(&self.mapcount, "the mapcount array", t)?,
            refcount: try_copy(&self.refcount, "the refcount array", t)?,
            token: try_copy(&self.token, "the token array", t)?,
            large: try_copy(&self.large, "the large-folio records", t)?,
            large_idx: try_copy(&self.large_idx, "the large-folio index", t)?,
            large_free: try_copy(&self.large_free, "the free large-folio records", t)?,
            free_lists: self.free_lists.clone(),
            free_pages: self.free_pages,
            max_order: self.max_order,
            fallback: self.fallback.clone(),
            rng: self.rng.clone(),
            exports: if share { self.exports.share() } else { Default::default() },
        })
    }

    /// Before this memory (a copy a step ran on) replaces `old`: if numpy views `old`'s
    /// per-page arrays, they get this memory's contents and are used again.
    pub fn adopt_exported(&mut self, old: &mut Memory) {
        if !old.exports.exported() {
            return;
        }
        fn adopt<T: Copy>(new: &mut Vec<T>, old: &mut Vec<T>) {
            old.copy_from_slice(new);
            std::mem::swap(new, old);
        }
        adopt(&mut self.order, &mut old.order);
        adopt(&mut self.flags, &mut old.flags);
        adopt(&mut self.mapcount, &mut old.mapcount);
        adopt(&mut self.refcount, &mut old.refcount);
        adopt(&mut self.token, &mut old.token);
    }

    pub fn nr_pages(&self) -> u64 {
        self.order.len() as u64
    }

    /// The first pfn of the folio holding allocated page `pfn`.
    #[inline]
    pub fn folio_head(&self, pfn: u64) -> u64 {
        let o = self.order[pfn as usize] as u32;
        pfn & !((1u64 << o) - 1)
    }

    #[inline]
    pub fn folio_order(&self, head: u64) -> u32 {
        self.order[head as usize] as u32
    }

    #[inline]
    pub fn is_free(&self, pfn: u64) -> bool {
        self.order[pfn as usize] == FREE
    }

    #[inline]
    pub fn test(&self, pfn: u64, flag: u8) -> bool {
        self.flags[pfn as usize] & flag != 0
    }

    #[inline]
    pub fn set(&mut self, pfn: u64, flag: u8) {
        self.flags[pfn as usize] |= flag;
    }

    #[inline]
    pub fn clear(&mut self, pfn: u64, flag: u8) {
        self.flags[pfn as usize] &= !flag;
    }

    /// Whether an allocation of `order` can succeed at all (ignoring simulated fragmentation).
    pub fn can_alloc(&self, order: u32) -> bool {
        (order..=self.max_order).any(|o| !self.free_lists[o as usize].is_empty())
    }

    /// Draws the simulated-fragmentation coin for an allocation of `order`: true means
    /// "fail as if fragmented". Order 0 never fails this way, and an order with probability 0
    /// draws nothing (so the random stream only moves where fragmentation is asked for).
    pub fn fragmented(&mut self, order: u32) -> bool {
        let p = self.fallback.get(order as usize).copied().unwrap_or(0.0);
        order > 0 && p > 0.0 && self.rng.next_f64() < p
    }

    /// Allocates a naturally aligned block of `2^order` pages: the lowest-addressed free block
    /// of the smallest sufficient order, split as the buddy allocator does. Returns its first
    /// pfn with refcount 1, or `None` when no block is free.
    pub fn alloc(&mut self, order: u32) -> Option<u64> {
        let from = (order..=self.max_order).find(|&o| !self.free_lists[o as usize].is_empty())?;
        let pfn = self.free_lists[from as usize].pop_first()?;
        for o in (order..from).rev() {
            self.free_lists[o as usize].insert(pfn + (1 << o));
        }
        self.init_folio(pfn, order);
        self.refcount[pfn as usize] = 1;
        Some(pfn)
    }

    /// Takes a free block as a new folio: pages cleared, refcount 0, a fresh large-folio
    /// record for order > 0.
    fn init_folio(&mut self, pfn: u64, order: u32) {
        let n = 1u64 << order;
        self.free_pages -= n;
        for p in pfn..pfn + n {
            let i = p as usize;
            self.order[i] = order as u8;
            self.flags[i] = 0;
            self.mapcount[i] = 0;
            self.refcount[i] = 0;
            self.token[i] = 0;
        }
        if order > 0 {
            let idx = match self.large_free.pop() {
                Some(i) => {
                    self.large[i as usize] = LargeFolio::new();
                    i
                }
                None => {
                    self.large.push(LargeFolio::new());
                    self.large.len() as u32 - 1
                }
            };
            self.large_idx[pfn as usize / 2] = idx;
        }
    }

    /// Allocates the block of `2^order` pages at `pfn` (naturally aligned) if it is free,
    /// splitting the free block that holds it; for rebuilding captured memory.
    pub fn alloc_at(&mut self, pfn: u64, order: u32) -> bool {
        let Some(from) = (order..=self.max_order).find(|&o| self.free_lists[o as usize].contains(&(pfn & !((1u64 << o) - 1)))) else {
            return false;
        };
        let mut block = pfn & !((1u64 << from) - 1);
        self.free_lists[from as usize].remove(&block);
        for o in (order..from).rev() {
            // Keep the half holding pfn, free the other.
            let half = 1u64 << o;
            if pfn >= block + half {
                self.free_lists[o as usize].insert(block);
                block += half;
            } else {
                self.free_lists[o as usize].insert(block + half);
            }
        }
        self.init_folio(pfn, order);
        true
    }

    /// Returns a folio to the allocator, merging free buddies.
    pub fn free(&mut self, head: u64) {
        let order = self.folio_order(head);
        let n = 1u64 << order;
        if order > 0 {
            self.large_free.push(self.large_idx[head as usize / 2]);
        }
        for p in head..head + n {
            let i = p as usize;
            self.order[i] = FREE;
            self.flags[i] = 0;
            self.mapcount[i] = 0;
            self.refcount[i] = 0;
            self.token[i] = 0;
        }
        self.free_pages += n;
        let (mut pfn, mut o) = (head, order);
        while o < self.max_order {
            let buddy = pfn ^ (1 << o);
            if buddy + (1 << o) > self.nr_pages() || !self.free_lists[o as usize].remove(&buddy) {
                break;
            }
            pfn = pfn.min(buddy);
            o += 1;
        }
        self.free_lists[o as usize].insert(pfn);
    }

    /// Free blocks as (first pfn, order), in ascending pfn order; for state comparison.
    pub fn free_blocks(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> = self
            .free_lists
            .iter()
            .enumerate()
            .flat_map(|(o, s)| s.iter().map(move |&p| (p, o as u32)))
            .collect();
        v.sort_unstable();
        v
    }

    /// The record of the large folio starting at `head`, if it is one.
    pub fn large_folio(&self, head: u64) -> Option<&LargeFolio> {
        let o = *self.order.get(head as usize)?;
        if o == FREE || o == 0 || self.folio_head(head) != head {
            return None;
        }
        self.large.get(self.large_idx[head as usize / 2] as usize)
    }

    /// The record of an allocated large folio; callers only ask for folios they found
    /// allocated with order > 0, which always have one.
    pub fn lf(&mut self, head: u64) -> &mut LargeFolio {
        let idx = self.large_idx[head as usize / 2] as usize;
        &mut self.large[idx]
    }

    /// Every large folio's first pfn and record, in pfn order.
    pub fn large_folios(&self) -> Vec<(u64, LargeFolio)> {
        self.large_folio_iter().map(|(h, lf)| (h, *lf)).collect()
    }

    /// Every large folio's first pfn and record, in pfn order, without collecting them.
    pub fn large_folio_iter(&self) -> impl Iterator<Item = (u64, &LargeFolio)> + '_ {
        let mut pfn = 0u64;
        std::iter::from_fn(move || {
            while pfn < self.nr_pages() {
                let (at, o) = (pfn, self.order[pfn as usize]);
                pfn += if o == FREE { 1 } else { 1 << o };
                if o != FREE && o > 0 {
                    return Some((at, &self.large[self.large_idx[at as usize / 2] as usize]));
                }
            }
            None
        })
    }

    /// Large folios there are (a pass over the page orders).
    pub fn nr_large_folios(&self) -> usize {
        self.large_folio_iter().count()
    }

    /// Bytes of memory state: the per-page arrays and the large-folio records.
    pub fn state_bytes(&self) -> usize {
        self.order.len() * 14 + self.large_idx.len() * 4 + self.large.capacity() * std::mem::size_of::<LargeFolio>()
    }

    /// `folio_mapcount()`: mappings of all pages of the folio.
    pub fn folio_mapcount(&self, head: u64) -> i64 {
        match self.large_folio(head) {
            Some(lf) => lf.large_mapcount as i64 + 1,
            None => self.mapcount[head as usize] as i64,
        }
    }

    /// `folio_maybe_dma_pinned()`: pincount for large folios, the refcount bias heuristic
    /// for small ones.
    pub fn folio_maybe_dma_pinned(&self, head: u64) -> bool {
        match self.large_folio(head) {
            Some(lf) => lf.pincount > 0,
            None => self.refcount[head as usize] >= GUP_PIN_COUNTING_BIAS,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_allocates_lowest_aligned_and_merges_back() {
        let mut m = Memory::new(1024, 9, 1).unwrap();
        assert_eq!(m.free_blocks(), vec![(0, 9), (512, 9)]);
        let a = m.alloc(0).unwrap();
        let b = m.alloc(4).unwrap();
        let c = m.alloc(0).unwrap();
        assert_eq!((a, b, c), (0, 16, 1));
        assert_eq!(m.free_pages, 1024 - 18);
        m.free(b);
        m.free(a);
        m.free(c);
        assert_eq!(m.free_blocks(), vec![(0, 9), (512, 9)]);
        assert_eq!(m.free_pages, 1024);
    }

    #[test]
    fn odd_sizes_and_exhaustion() {
        let mut m = Memory::new(5, 9, 1).unwrap();
        assert_eq!(m.free_blocks(), vec![(0, 2), (4, 0)]);
        assert_eq!(m.alloc(3), None);
        assert_eq!(m.alloc(2), Some(0));
        assert_eq!(m.alloc(0), Some(4));
        assert_eq!(m.alloc(0), None);
        assert!(!m.can_alloc(0));
    }

    #[test]
    fn splitmix_matches_reference_vector() {
        // First outputs of splitmix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }
}

//! Physical memory: pages and folios as structure-of-arrays, and a buddy allocator.
//!
//! Per page (indexed by pfn): the folio order (or [`FREE`]), page flags, the mapcount (stored
//! as the number of mappings, i.e. the kernel's `_mapcount + 1`), the refcount (meaningful on
//! a folio's first page, as `folio->_refcount`) and a content token for COW-isolation checks.
//! Fields that the kernel keeps in a large folio's tail pages (`_large_mapcount`,
//! `_entire_mapcount`, `_nr_pages_mapped`, `_pincount`, the MM-ID slots) live in
//! [`LargeFolio`] records, found through a side table indexed by `pfn / 4` (a folio of order 2
//! or more starts at a multiple of 4; an order-1 folio starting at 2 mod 4 shares its slot
//! with the one before it, so its record index sits in a small map instead), so that every per-page array reads as the kernel's `struct page`
//! fields do: a tail page's refcount is 0. The records use the kernel's
//! "minus one" encoding where the algorithms (include/linux/rmap.h, folio_add_large_mapcount(), v6.15)
//! depend on it.
//!
//! 15 bytes per page (14 in the per-page arrays, 1 in the record index) plus one 32-byte
//! record per large folio; the buddy allocator's free areas add about 0.26 byte per page.

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

/// A new folio's record: no mappings, pins or MM-IDs.
impl Default for LargeFolio {
    fn default() -> LargeFolio {
        LargeFolio::new()
    }
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

/// Most levels a free area has: 2^32 blocks need six.
const MAX_LEVELS: usize = 6;

/// Where one order's levels lie in [`FreeAreas::bits`].
#[derive(Clone, Copy, Debug)]
struct Levels {
    /// First word of each level (level 0, one bit per block, first; the last is one word).
    off: [usize; MAX_LEVELS],
    /// Words of each level.
    words: [usize; MAX_LEVELS],
    n: usize,
}

/// The buddy allocator's free blocks, as the kernel's `free_area[order]` lists hold them, but
/// kept as one bitmap per order (bit `pfn >> order`) with summary levels above it, and the
/// lowest free block of each order at hand. A summary bit (bit `j` of level `i + 1`) is set
/// whenever word `j` of level `i` has a set bit, and may stay set after that word empties
/// until a search finds it empty and clears it; so taking a block or freeing one writes one
/// word (and a few more the first time under a summary bit), and finding the next lowest
/// climbs only as far as the next set bit. About two bits per page, all orders together.
#[derive(Clone, Debug)]
struct FreeAreas {
    /// Every level of every order.
    bits: Vec<u64>,
    levels: Vec<Levels>,
    /// Free blocks per order (`free_area.nr_free`).
    nr_free: Vec<u64>,
    /// The lowest free block per order (meaningless while the order has none).
    lowest: Vec<u64>,
    /// Bit `o` is set when order `o` has a free block.
    nonempty: u64,
}

impl FreeAreas {
    /// No free block, for the orders up to `max_order` of `nr_pages` pages.
    fn new(nr_pages: u64, max_order: u32) -> Result<FreeAreas> {
        let mut levels = Vec::with_capacity(max_order as usize + 1);
        let mut total = 0usize;
        for o in 0..=max_order {
            let mut l = Levels { off: [0; MAX_LEVELS], words: [0; MAX_LEVELS], n: 0 };
            let mut words = (((nr_pages - 1) >> o) + 1).div_ceil(64) as usize;
            loop {
                (l.off[l.n], l.words[l.n]) = (total, words);
                l.n += 1;
                total += words;
                if words == 1 {
                    break;
                }
                words = words.div_ceil(64);
            }
            levels.push(l);
        }
        let orders = max_order as usize + 1;
        Ok(FreeAreas {
            bits: crate::alloc::try_filled(total, 0u64, "the buddy allocator's free bitmaps")?,
            levels,
            nr_free: vec![0; orders],
            lowest: vec![0; orders],
            nonempty: 0,
        })
    }

    fn try_clone(&self, t: &crate::watch::Ticker) -> Result<FreeAreas> {
        Ok(FreeAreas {
            bits: crate::alloc::try_copy(&self.bits, "the buddy allocator's free bitmaps", t)?,
            levels: self.levels.clone(),
            nr_free: self.nr_free.clone(),
            lowest: self.lowest.clone(),
            nonempty: self.nonempty,
        })
    }

    /// The smallest order from `order` up with a free block.
    #[inline]
    fn lowest_order_from(&self, order: u32) -> Option<u32> {
        let m = self.nonempty.checked_shr(order).unwrap_or(0);
        (m != 0).then(|| order + m.trailing_zeros())
    }

    /// The lowest free block of order `o`.
    #[inline]
    fn first(&self, o: u32) -> Option<u64> {
        (self.nonempty & (1 << o) != 0).then(|| self.lowest[o as usize])
    }

    #[inline]
    fn contains(&self, o: u32, b: u64) -> bool {
        let l = &self.levels[o as usize];
        let w = (b / 64) as usize;
        w < l.words[0] && self.bits[l.off[0] + w] & (1 << (b % 64)) != 0
    }

    #[inline(always)]
    fn insert(&mut self, o: u32, b: u64) {
        let o = o as usize;
        if self.nonempty & (1 << o) == 0 || b < self.lowest[o] {
            self.lowest[o] = b;
        }
        self.nr_free[o] += 1;
        self.nonempty |= 1 << o;
        // Up to the first level where the bit is set already (so are the ones above it).
        let l = &self.levels[o];
        let mut i = b as usize;
        for &base in &l.off[..l.n] {
            let (w, bit) = (&mut self.bits[base + i / 64], 1u64 << (i % 64));
            if *w & bit != 0 {
                break;
            }
            *w |= bit;
            i /= 64;
        }
    }

    /// Removes block `b` of order `o`; false if it was not free. The summary bits stay.
    #[inline(always)]
    fn remove(&mut self, o: u32, b: u64) -> bool {
        if !self.contains(o, b) {
            return false;
        }
        let o = o as usize;
        let l = &self.levels[o];
        self.bits[l.off[0] + (b / 64) as usize] &= !(1 << (b % 64));
        self.nr_free[o] -= 1;
        if self.nr_free[o] == 0 {
            self.nonempty &= !(1 << o);
        } else if self.lowest[o] == b {
            self.lowest[o] = self.next_from(o, b + 1);
        }
        true
    }

    /// The lowest free block of order `o` from `b` on (there is one): up the levels to the
    /// first word with a set bit at or after the position, then down its lowest bits,
    /// clearing the summary bits found to stand over empty words.
    fn next_from(&mut self, o: usize, b: u64) -> u64 {
        let FreeAreas { bits, levels, .. } = self;
        let l = &levels[o];
        let (mut i, mut lv) = (b as usize, 0);
        loop {
            // Climb from bit `i` of level `lv` to a set bit at or after it.
            loop {
                assert!(lv < l.n && i / 64 < l.words[lv], "a free block is left past the lowest");
                let w = bits[l.off[lv] + i / 64] & (!0u64 << (i % 64));
                if w != 0 {
                    i = i / 64 * 64 + w.trailing_zeros() as usize;
                    break;
                }
                // The next word of this level is the next bit of the one above.
                (i, lv) = (i / 64 + 1, lv + 1);
            }
            // Down the lowest set bits; a summary bit over an empty word is cleared and the
            // climb goes on after it.
            loop {
                if lv == 0 {
                    return i as u64;
                }
                let below = bits[l.off[lv - 1] + i];
                if below == 0 {
                    bits[l.off[lv] + i / 64] &= !(1 << (i % 64));
                    i += 1;
                    break;
                }
                (i, lv) = (i * 64 + below.trailing_zeros() as usize, lv - 1);
            }
        }
    }

    /// The free blocks of order `o`, ascending.
    fn iter(&self, o: u32) -> impl Iterator<Item = u64> + '_ {
        let l = &self.levels[o as usize];
        self.bits[l.off[0]..l.off[0] + l.words[0]].iter().enumerate().flat_map(|(j, &w)| {
            let mut w = w;
            std::iter::from_fn(move || {
                (w != 0).then(|| {
                    let b = w.trailing_zeros() as u64;
                    w &= w - 1;
                    j as u64 * 64 + b
                })
            })
        })
    }

    fn bytes(&self) -> usize {
        self.bits.len() * 8
    }
}

/// Asks the CPU to bring `s[i]`'s cache line in (a hint: no effect on any value, nothing
/// past the slice's end). Sequential host prefetchers stop at 4 KiB page boundaries and
/// lose track across the several arrays a zap reads in step.
#[inline(always)]
pub(crate) fn prefetch<T>(s: &[T], i: usize) {
    #[cfg(target_arch = "x86_64")]
    if i < s.len() {
        // SAFETY: the address lies inside the slice; a prefetch reads nothing architecturally.
        #[allow(unused_unsafe)]
        unsafe {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().add(i) as *const i8);
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (s, i);
}

/// Physical memory of `nr_pages` pages.
#[derive(Clone, Debug)]
pub struct Memory {
    pub order: Vec<u8>,
    pub flags: Vec<u8>,
    pub mapcount: Vec<i32>,
    pub refcount: Vec<i32>,
    pub token: Vec<u32>,
    /// Large-folio records; `large_idx[head / 4]` is the index of a large folio's record, or
    /// for an order-1 folio whose head is 2 mod 4, `large_idx_odd[head]`.
    large: Vec<LargeFolio>,
    large_idx: Vec<u32>,
    large_idx_odd: std::collections::HashMap<u64, u32>,
    large_free: Vec<u32>,
    /// Free blocks per order (buddy allocator).
    free: FreeAreas,
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
        crate::alloc::ensure_host_room(nr_pages as u128 * 15, "the page arrays of the simulated memory")?;
        use crate::alloc::try_filled;
        let mut m = Memory {
            order: try_filled(n, FREE, "the page-order array")?,
            flags: try_filled(n, 0, "the page-flag array")?,
            mapcount: try_filled(n, 0, "the mapcount array")?,
            refcount: try_filled(n, 0, "the refcount array")?,
            token: try_filled(n, 0, "the token array")?,
            large: Vec::new(),
            large_idx: try_filled(n.div_ceil(4), 0, "the large-folio index")?,
            large_idx_odd: Default::default(),
            large_free: Vec::new(),
            free: FreeAreas::new(nr_pages, max_order)?,
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
            m.free.insert(o, pfn >> o);
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
            large_idx_odd: self.large_idx_odd.clone(),
            large_free: try_copy(&self.large_free, "the free large-folio records", t)?,
            free: self.free.try_clone(t)?,
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
        self.free.lowest_order_from(order).is_some()
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
        let from = self.free.lowest_order_from(order)?;
        let pfn = self.free.first(from)? << from;
        self.free.remove(from, pfn >> from);
        for o in (order..from).rev() {
            self.free.insert(o, (pfn >> o) + 1);
        }
        self.init_folio(pfn, order);
        self.refcount[pfn as usize] = 1;
        Some(pfn)
    }

    /// How many [`Memory::alloc`]`(order)` calls in a row would succeed: each takes `2^order`
    /// pages from a free block of `order` or more and leaves the rest of it in such blocks.
    pub fn free_folios(&self, order: u32) -> u64 {
        (order..=self.max_order).map(|o| self.free.nr_free[o as usize] << (o - order)).sum()
    }

    /// Up to `max` folios of `order` that as many [`Memory::alloc`]`(order)` calls in a row
    /// would return, taken at once: `(first pfn, n)`, the folios consecutive from `first`,
    /// each large one with the record `rec` (as its faults leave it). While no block from
    /// `order` below `f` is free, such allocations split the lowest block of order `f` and
    /// take its folios in address order, leaving the rest of it free in its aligned buddy
    /// blocks; so a run ends with the block. The pages get their order; their flags, counts
    /// and tokens are the caller's to write, every page of the run, before anything reads them.
    pub fn alloc_run(&mut self, order: u32, max: u64, rec: LargeFolio) -> Option<(u64, u64)> {
        let from = self.free.lowest_order_from(order)?;
        let block = self.free.first(from)? << from;
        let n = max.clamp(1, 1 << (from - order));
        let pages = n << order;
        self.free.remove(from, block >> from);
        // The rest of the block goes back as the splits of n single allocations leave it
        // (its buddies are within the block, taken: nothing merges).
        self.free_range(block + pages, block + (1u64 << from));
        self.free_pages -= pages;
        self.order[block as usize..(block + pages) as usize].fill(order as u8);
        if order > 0 {
            for j in 0..n {
                self.new_large_record(block + (j << order), rec);
            }
        }
        Some((block, n))
    }

    /// Takes a free block as a new folio: pages cleared, refcount 0, a fresh large-folio
    /// record for order > 0.
    fn init_folio(&mut self, pfn: u64, order: u32) {
        let n = 1u64 << order;
        self.free_pages -= n;
        self.fill_pages(pfn, n, order as u8);
        if order > 0 {
            self.new_large_record(pfn, LargeFolio::new());
        }
    }

    /// The large folio at `pfn` gets a record holding `rec`.
    #[inline]
    fn new_large_record(&mut self, pfn: u64, rec: LargeFolio) {
        let idx = match self.large_free.pop() {
            Some(i) => {
                self.large[i as usize] = rec;
                i
            }
            None => {
                self.large.push(rec);
                self.large.len() as u32 - 1
            }
        };
        self.set_large_idx(pfn, idx);
    }

    /// Pages `[pfn, pfn + n)` get order `order` and nothing else: no flags, counts or token.
    #[inline(always)]
    fn fill_pages(&mut self, pfn: u64, n: u64, order: u8) {
        let (i, n) = (pfn as usize, n as usize);
        if n == 1 {
            // One page (most folios): plain stores, no memset calls.
            self.order[i] = order;
            self.flags[i] = 0;
            self.mapcount[i] = 0;
            self.refcount[i] = 0;
            self.token[i] = 0;
            return;
        }
        self.order[i..i + n].fill(order);
        self.flags[i..i + n].fill(0);
        self.mapcount[i..i + n].fill(0);
        self.refcount[i..i + n].fill(0);
        self.token[i..i + n].fill(0);
    }

    /// Allocates the block of `2^order` pages at `pfn` (naturally aligned) if it is free,
    /// splitting the free block that holds it; for rebuilding captured memory.
    pub fn alloc_at(&mut self, pfn: u64, order: u32) -> bool {
        let Some(from) = (order..=self.max_order).find(|&o| self.free.contains(o, pfn >> o)) else {
            return false;
        };
        let mut block = pfn & !((1u64 << from) - 1);
        self.free.remove(from, block >> from);
        for o in (order..from).rev() {
            // Keep the half holding pfn, free the other.
            let half = 1u64 << o;
            if pfn >= block + half {
                self.free.insert(o, block >> o);
                block += half;
            } else {
                self.free.insert(o, (block >> o) + 1);
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
            self.free_large_record(head);
        }
        self.fill_pages(head, n, FREE);
        self.free_pages += n;
        self.free_block(head, order);
    }

    /// Block `pfn` of `order` joins the free areas, merged with its free buddies.
    fn free_block(&mut self, mut pfn: u64, mut o: u32) {
        while o < self.max_order {
            let buddy = pfn ^ (1 << o);
            if buddy + (1 << o) > self.nr_pages() || !self.free.remove(o, buddy >> o) {
                break;
            }
            pfn = pfn.min(buddy);
            o += 1;
        }
        self.free.insert(o, pfn >> o);
    }

    /// Pages `[at, end)` join the free areas as the largest aligned blocks they hold, from
    /// the left, each merged with its free buddies ([`Memory::free_block`]).
    fn free_range(&mut self, mut at: u64, end: u64) {
        while at < end {
            let mut o = at.trailing_zeros().min(self.max_order);
            while at + (1u64 << o) > end {
                o -= 1;
            }
            self.free_block(at, o);
            at += 1 << o;
        }
    }

    /// [`Memory::free`] of each folio of pages `[first, end)`, which hold whole folios, in
    /// pfn order: the records of the large ones go back in that order, and the pages as the
    /// largest aligned blocks the run holds, each merged with free buddies as a freed block
    /// is. The free blocks end as one free at a time leaves them: with every fully free
    /// aligned block merged (the buddy invariant), they are a function of the free pages.
    pub fn free_folio_run(&mut self, first: u64, end: u64) {
        let mut head = first;
        while head < end {
            match self.order[head as usize] {
                0 | FREE => head += 1,
                o => {
                    self.free_large_record(head);
                    head += 1 << o;
                }
            }
        }
        self.free_order0_run(first, end - first);
    }

    /// [`Memory::free_folio_run`] of `n` order-0 folios from `first`, with no record to return.
    pub fn free_order0_run(&mut self, first: u64, n: u64) {
        self.fill_pages(first, n, FREE);
        self.free_pages += n;
        self.free_range(first, first + n);
    }

    /// The record of the large folio at `head` goes back to be reused.
    #[inline]
    fn free_large_record(&mut self, head: u64) {
        let idx = self.large_idx_of(head);
        if head & 2 != 0 {
            self.large_idx_odd.remove(&head);
        }
        self.large_free.push(idx);
    }

    /// Free blocks as (first pfn, order), in ascending pfn order; for state comparison.
    pub fn free_blocks(&self) -> Vec<(u64, u32)> {
        let mut v: Vec<(u64, u32)> =
            (0..=self.max_order).flat_map(|o| self.free.iter(o).map(move |b| (b << o, o))).collect();
        v.sort_unstable();
        v
    }

    /// The record of the large folio starting at `head`, if it is one.
    pub fn large_folio(&self, head: u64) -> Option<&LargeFolio> {
        let o = *self.order.get(head as usize)?;
        if o == FREE || o == 0 || self.folio_head(head) != head {
            return None;
        }
        self.large.get(self.large_idx_of(head) as usize)
    }

    /// The record index of the large folio at `head` (a folio of order 1 or more).
    #[inline(always)]
    fn large_idx_of(&self, head: u64) -> u32 {
        if head & 2 == 0 {
            self.large_idx[head as usize / 4]
        } else {
            self.large_idx_odd_of(head)
        }
    }

    /// Only an order-1 folio starts at 2 mod 4; init_folio put its index here. Out of line:
    /// the hash lookup would swell every inlined accessor.
    #[cold]
    #[inline(never)]
    fn large_idx_odd_of(&self, head: u64) -> u32 {
        self.large_idx_odd.get(&head).copied().unwrap_or(u32::MAX)
    }

    #[inline(always)]
    fn set_large_idx(&mut self, head: u64, idx: u32) {
        if head & 2 == 0 {
            self.large_idx[head as usize / 4] = idx;
        } else {
            self.large_idx_odd.insert(head, idx);
        }
    }

    /// The record of an allocated large folio; callers only ask for folios they found
    /// allocated with order > 0, which always have one.
    #[inline(always)]
    pub fn lf(&mut self, head: u64) -> &mut LargeFolio {
        let idx = self.large_idx_of(head) as usize;
        &mut self.large[idx]
    }

    /// The record of an allocated large folio and its first page's flags, borrowed at once.
    #[inline(always)]
    pub(crate) fn lf_and_flags(&mut self, head: u64) -> (&mut LargeFolio, &mut u8) {
        let idx = self.large_idx_of(head) as usize;
        (&mut self.large[idx], &mut self.flags[head as usize])
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
                    return Some((at, &self.large[self.large_idx_of(at) as usize]));
                }
            }
            None
        })
    }

    /// Large folios there are (a pass over the page orders).
    pub fn nr_large_folios(&self) -> usize {
        self.large_folio_iter().count()
    }

    /// Bytes of memory state: the per-page arrays, the large-folio records and the free areas.
    pub fn state_bytes(&self) -> usize {
        self.order.len() * 14
            + self.large_idx.len() * 4
            + self.large_idx_odd.capacity() * 16
            + self.large.capacity() * std::mem::size_of::<LargeFolio>()
            + self.free.bytes()
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

    /// Order-1 folios at 0 and 2 mod 4 share one slot of the record index: each keeps its
    /// own record, through frees and reuse, beside larger folios.
    #[test]
    fn order1_records_beside_each_other() {
        let mut m = Memory::new(64, 4, 1).unwrap();
        let (a, b) = (m.alloc(1).unwrap(), m.alloc(1).unwrap());
        assert_eq!((a, b), (0, 2));
        let c = m.alloc(2).unwrap();
        m.lf(a).pincount = 1;
        m.lf(b).pincount = 2;
        m.lf(c).pincount = 3;
        assert_eq!([a, b, c].map(|h| m.large_folio(h).unwrap().pincount), [1, 2, 3]);
        assert_eq!(m.large_folios().iter().map(|(h, lf)| (*h, lf.pincount)).collect::<Vec<_>>(), vec![(0, 1), (2, 2), (4, 3)]);
        m.free(b);
        assert!(m.large_folio(b).is_none() && m.large_idx_odd.is_empty());
        assert_eq!(m.large_folio(a).unwrap().pincount, 1);
        // The freed record is reused, fresh, by the next large folio.
        let d = m.alloc(1).unwrap();
        assert_eq!(d, 2);
        assert_eq!(m.large_folio(d).unwrap().pincount, 0);
        assert_eq!(m.large_folio(a).unwrap().pincount, 1);
        assert_eq!(m.large_folio(c).unwrap().pincount, 3);
    }

    /// The allocator as the reference keeps it (python/ptebatch/reference/sim/memory.py):
    /// a sorted set of free blocks per order.
    struct Model {
        free: Vec<std::collections::BTreeSet<u64>>,
        nr_pages: u64,
    }

    impl Model {
        fn new(nr_pages: u64, max_order: u32) -> Model {
            let mut m = Model { free: vec![Default::default(); max_order as usize + 1], nr_pages };
            let mut pfn = 0;
            while pfn < nr_pages {
                let mut o = max_order;
                while o > 0 && (pfn & ((1 << o) - 1) != 0 || pfn + (1 << o) > nr_pages) {
                    o -= 1;
                }
                m.free[o as usize].insert(pfn);
                pfn += 1 << o;
            }
            m
        }

        fn alloc(&mut self, order: u32) -> Option<u64> {
            let from = (order as usize..self.free.len()).find(|&o| !self.free[o].is_empty())?;
            let pfn = self.free[from].pop_first()?;
            for o in (order as usize..from).rev() {
                self.free[o].insert(pfn + (1 << o));
            }
            Some(pfn)
        }

        fn alloc_at(&mut self, pfn: u64, order: u32) -> bool {
            let Some(from) = (order as usize..self.free.len()).find(|&o| self.free[o].contains(&(pfn & !((1 << o) - 1)))) else {
                return false;
            };
            let mut block = pfn & !((1 << from) - 1);
            self.free[from].remove(&block);
            for o in (order as usize..from).rev() {
                if pfn >= block + (1 << o) {
                    self.free[o].insert(block);
                    block += 1 << o;
                } else {
                    self.free[o].insert(block + (1 << o));
                }
            }
            true
        }

        fn free(&mut self, head: u64, order: u32) {
            let (mut pfn, mut o) = (head, order as usize);
            while o + 1 < self.free.len() {
                let buddy = pfn ^ (1 << o);
                if buddy + (1 << o) > self.nr_pages || !self.free[o].remove(&buddy) {
                    break;
                }
                pfn = pfn.min(buddy);
                o += 1;
            }
            self.free[o].insert(pfn);
        }

        fn blocks(&self) -> Vec<(u64, u32)> {
            let mut v: Vec<(u64, u32)> =
                self.free.iter().enumerate().flat_map(|(o, s)| s.iter().map(move |&p| (p, o as u32))).collect();
            v.sort_unstable();
            v
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// The bitmaps choose, split and merge as sorted sets do, through summary levels
        /// (up to 2^14 blocks: three levels at order 0) and stale summary bits.
        #[test]
        fn free_areas_agree_with_sorted_sets(
            nr_pages in 1u64..20_000,
            max_order in 0u32..11,
            ops in proptest::collection::vec((0u8..4, 0u32..11, 0u64..20_000), 1..400),
        ) {
            let mut m = Memory::new(nr_pages, max_order, 1).unwrap();
            let mut model = Model::new(nr_pages, max_order);
            let mut live: Vec<(u64, u32)> = Vec::new();
            for (op, order, x) in ops {
                let order = order % (max_order + 1);
                match op {
                    0 | 1 => {
                        let got = m.alloc(order);
                        proptest::prop_assert_eq!(got, model.alloc(order));
                        live.extend(got.map(|h| (h, order)));
                    }
                    2 => {
                        let pfn = (x % nr_pages) & !((1 << order) - 1);
                        let got = m.alloc_at(pfn, order);
                        proptest::prop_assert_eq!(got, model.alloc_at(pfn, order));
                        if got {
                            live.push((pfn, order));
                        }
                    }
                    _ => {
                        if !live.is_empty() {
                            let (h, o) = live.swap_remove(x as usize % live.len());
                            m.free(h);
                            model.free(h, o);
                        }
                    }
                }
                proptest::prop_assert_eq!(m.free_blocks(), model.blocks());
                for o in 0..=max_order {
                    proptest::prop_assert_eq!(m.can_alloc(o), model.free[o as usize..].iter().any(|s| !s.is_empty()));
                }
            }
        }
    }

    /// Memory after `ops`: (0|1, order, _) allocates a folio, (2, _, x) frees a live one.
    fn mixed_memory(nr_pages: u64, max_order: u32, ops: &[(u8, u32, u64)]) -> (Memory, Vec<u64>) {
        let mut m = Memory::new(nr_pages, max_order, 1).unwrap();
        let mut live: Vec<u64> = Vec::new();
        for &(op, order, x) in ops {
            match op {
                0 | 1 => live.extend(m.alloc(order % (max_order + 1))),
                _ => {
                    if !live.is_empty() {
                        m.free(live.swap_remove(x as usize % live.len()));
                    }
                }
            }
        }
        (m, live)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A run of folios taken at once leaves memory exactly as the same number of single
        /// allocations of their order, from any mix of earlier allocations and frees; and
        /// `free_folios()` counts the single allocations that succeed.
        #[test]
        fn runs_are_single_allocations_in_a_row(
            nr_pages in 1u64..5_000,
            max_order in 0u32..10,
            ops in proptest::collection::vec((0u8..3, 0u32..10, 0u64..5_000), 0..100),
            runs in proptest::collection::vec((0u32..10, 1u64..700), 1..8),
        ) {
            let (mut m, _) = mixed_memory(nr_pages, max_order, &ops);
            let mut one = m.clone();
            for (order, max) in runs {
                let order = order % (max_order + 1);
                let mut count = one.clone();
                let mut can = 0u64;
                while count.alloc(order).is_some() {
                    can += 1;
                }
                proptest::prop_assert_eq!(m.free_folios(order), can);
                let Some((first, n)) = m.alloc_run(order, max, LargeFolio::new()) else {
                    proptest::prop_assert_eq!(one.alloc(order), None);
                    break;
                };
                proptest::prop_assert!(n >= 1 && n <= max);
                for k in 0..n {
                    let head = first + (k << order);
                    proptest::prop_assert_eq!(one.alloc(order), Some(head));
                    // What the caller writes: alloc()'s reference, on a page that was free.
                    m.refcount[head as usize] = 1;
                }
                proptest::prop_assert_eq!(m.free_blocks(), one.free_blocks());
                proptest::prop_assert_eq!(m.free_pages, one.free_pages);
                proptest::prop_assert_eq!(m.large_folios(), one.large_folios());
                proptest::prop_assert_eq!(&m.order, &one.order);
                proptest::prop_assert_eq!(&m.flags, &one.flags);
                proptest::prop_assert_eq!(&m.mapcount, &one.mapcount);
                proptest::prop_assert_eq!(&m.refcount, &one.refcount);
                proptest::prop_assert_eq!(&m.token, &one.token);
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Freeing a run of order-0 folios at once leaves memory as freeing them one by one.
        #[test]
        fn order0_run_frees_are_single_frees(
            nr_pages in 1u64..5_000,
            max_order in 0u32..10,
            ops in proptest::collection::vec((0u8..3, 0u32..10, 0u64..5_000), 0..100),
            run in (0u64..5_000, 1u64..1_500),
        ) {
            let (mut m, mut live) = mixed_memory(nr_pages, max_order, &ops);
            // Fill memory with order-0 pages, then free some pages and folios again, so that
            // the run has free neighbours of every order.
            while let Some(p) = m.alloc(0) {
                live.push(p);
            }
            for k in 0..live.len() / 3 {
                let i = (run.0 as usize * 7 + k * 13) % live.len();
                m.free(live.swap_remove(i));
            }
            let (a, len) = (run.0 % nr_pages, run.1);
            let pages: Vec<u64> = (a..(a + len).min(nr_pages)).take_while(|&p| m.order[p as usize] == 0).collect();
            proptest::prop_assume!(!pages.is_empty());
            let mut one = m.clone();
            for &p in &pages {
                one.free(p);
            }
            m.free_order0_run(pages[0], pages.len() as u64);
            proptest::prop_assert_eq!(m.free_blocks(), one.free_blocks());
            proptest::prop_assert_eq!(m.free_pages, one.free_pages);
            proptest::prop_assert_eq!(&m.order, &one.order);
            proptest::prop_assert_eq!(&m.refcount, &one.refcount);
            for o in 0..=max_order {
                proptest::prop_assert_eq!(m.can_alloc(o), one.can_alloc(o));
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// Freeing a run of adjacent folios of mixed orders at once leaves memory as freeing
        /// them one by one, in pfn order: the same free blocks, pages and record reuse order.
        #[test]
        fn folio_run_frees_are_single_frees(
            nr_pages in 1u64..5_000,
            max_order in 0u32..10,
            ops in proptest::collection::vec((0u8..3, 0u32..10, 0u64..5_000), 0..100),
            orders in proptest::collection::vec(0u32..10, 1..40),
            pick in (0usize..5_000, 1usize..300, 0u64..4),
        ) {
            let (mut m, mut live) = mixed_memory(nr_pages, max_order, &ops);
            // Fill memory with folios of the given orders in turn, then free some again, so
            // that the run has free neighbours of every order.
            let mut k = 0;
            while let Some(h) = m.alloc(orders[k % orders.len()] % (max_order + 1)).or_else(|| m.alloc(0)) {
                live.push(h);
                k += 1;
            }
            for j in (0..live.len()).rev().filter(|j| (j + pick.2 as usize) % 4 == 0) {
                m.free(live.swap_remove(j));
            }
            live.sort_unstable();
            proptest::prop_assume!(!live.is_empty());
            for &h in &live {
                let n = 1usize << m.order[h as usize];
                m.flags[h as usize..h as usize + n].fill(PG_ANON_EXCLUSIVE);
                m.token[h as usize] = h as u32 + 1;
                m.mapcount[h as usize] = 1;
            }
            let a = pick.0 % live.len();
            let mut run = vec![live[a]];
            for &h in &live[a + 1..] {
                let last = *run.last().unwrap();
                if run.len() == pick.1 || h != last + (1 << m.order[last as usize]) {
                    break;
                }
                run.push(h);
            }
            let last = *run.last().unwrap();
            let end = last + (1 << m.order[last as usize]);
            let mut one = m.clone();
            for &h in &run {
                one.free(h);
            }
            m.free_folio_run(run[0], end);
            proptest::prop_assert_eq!(m.free_blocks(), one.free_blocks());
            proptest::prop_assert_eq!(m.free_pages, one.free_pages);
            proptest::prop_assert_eq!(&m.large_free, &one.large_free);
            proptest::prop_assert_eq!(m.large_folios(), one.large_folios());
            proptest::prop_assert_eq!(&m.order, &one.order);
            proptest::prop_assert_eq!(&m.flags, &one.flags);
            proptest::prop_assert_eq!(&m.mapcount, &one.mapcount);
            proptest::prop_assert_eq!(&m.refcount, &one.refcount);
            proptest::prop_assert_eq!(&m.token, &one.token);
            for o in 0..=max_order {
                proptest::prop_assert_eq!(m.can_alloc(o), one.can_alloc(o));
            }
        }
    }

    #[test]
    fn free_areas_take_about_a_quarter_byte_per_page() {
        let pages = 1u64 << 24;
        let m = FreeAreas::new(pages, 10).unwrap();
        assert!(m.bytes() as u64 * 4 <= pages + pages / 32, "{} bytes", m.bytes());
    }

    #[test]
    fn splitmix_matches_reference_vector() {
        // First outputs of splitmix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64(0);
        assert_eq!(r.next_u64(), 0xe220_a839_7b1d_cdaf);
        assert_eq!(r.next_u64(), 0x6e78_9e6a_a1b9_65f4);
    }
}

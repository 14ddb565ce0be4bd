//! Unmapping: `zap_pte_range()` → `zap_present_ptes()` → `zap_present_folio_ptes()` for
//! munmap, exit and MADV_DONTNEED (mm/memory.c; v6.8 per PTE, v6.9+ batched;
//! docs/simulation.md, "zap"). Page references are dropped only after the TLB
//! flush, when the mmu_gather is finished.
//!
//! [`zap_pte_range`] is the per-page-table loop, written once over a table and any
//! [`FolioCounts`]: the simulation runs it over its own storage, and [`zap_pte_range_arrays`]
//! over arrays a user owns (docs/helpers.md).

use crate::arch::PteLayout;
use crate::error::Result;
use crate::batch::{folio_pte_batch_unchecked, Folio, FpbFlags, Table};
use crate::kernel::KernelProfile;
use crate::memory::{prefetch, PG_ANON, PG_DIRTY};
use crate::mm::{mm_counter_of, MM_ANONPAGES};
use crate::pgtable;
use crate::rmap::{folio_nr_pages, folio_put_refs_times, folio_remove_ptes, folio_remove_ptes_one_by_one, FolioCounts, Rmap};
use crate::sim::State;
use crate::stats::Stats;

/// Page references an mmu_gather holds until the TLB is flushed.
///
/// Like the kernel's batch of pages (`__tlb_remove_folio_pages()` forcing a flush when the
/// batch is full), it is bounded: when it holds [`GATHER_MAX`] runs the references are dropped
/// early. The end state is the same as dropping them all at the end (freeing merges buddies
/// into the same blocks whatever the order, and a page still mapped is never freed), so only
/// the host memory an unmap of a huge range needs changes: never more than the room reserved
/// by [`new_gather`].
///
/// References are queued as runs, each standing for the sequence of `folio_put_refs()` calls
/// it replaces, in order: the folios at `head, head + 1, …` (consecutive small folios), or
/// one folio `count` times (a large folio zapped one PTE at a time, as v6.8 does).
#[derive(Debug)]
pub struct Gather {
    runs: Vec<GatherRun>,
}

#[derive(Clone, Copy, Debug)]
struct GatherRun {
    head: u64,
    /// References dropped by each call.
    nr: u32,
    /// Calls, with [`SAME_FOLIO`] set when they all drop references of `head`.
    count: u32,
}

const SAME_FOLIO: u32 = 1 << 31;

/// Runs an mmu_gather holds before its references are dropped (16 bytes each).
pub const GATHER_MAX: usize = 1 << 16;

/// Entries the simulation zaps before it finishes its gather (a page table of 4K pages).
pub const FINISH_ENTRIES: usize = 1 << 9;

/// An empty gather with its whole room reserved up front, so that no zap allocates.
pub fn new_gather() -> crate::error::Result<Gather> {
    Ok(Gather { runs: crate::alloc::try_with_capacity(GATHER_MAX, "an mmu_gather")? })
}

impl Gather {
    /// Runs held (callers finish the gather when this reaches [`GATHER_MAX`]).
    #[inline]
    pub fn len(&self) -> usize {
        self.runs.len()
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    /// Queues `folio_put_refs(head, nr)`.
    #[inline]
    pub fn push(&mut self, (head, nr): (u64, u32)) {
        self.push_run(head, nr, 1);
    }

    /// Queues `folio_put_refs(head + k, nr)` for `k` in `0..count`.
    #[inline]
    fn push_run(&mut self, head: u64, nr: u32, count: u32) {
        if let Some(last) = self.runs.last_mut() {
            let n = last.count & !SAME_FOLIO;
            if last.nr == nr && n < SAME_FOLIO / 2 && count < SAME_FOLIO / 2 {
                if last.count & SAME_FOLIO == 0 && head == last.head + n as u64 {
                    last.count += count;
                    return;
                }
                if count == 1 && head == last.head && (n == 1 || last.count & SAME_FOLIO != 0) {
                    last.count = (n + 1) | SAME_FOLIO;
                    return;
                }
            }
        }
        self.runs.push(GatherRun { head, nr, count });
    }

    /// Queues `folio_put_refs(head, nr)` `count` times (at least once).
    #[inline]
    fn push_same(&mut self, head: u64, nr: u32, count: u32) {
        if count == 1 {
            return self.push_run(head, nr, 1);
        }
        if let Some(last) = self.runs.last_mut() {
            let n = last.count & !SAME_FOLIO;
            if last.nr == nr && head == last.head && (n == 1 || last.count & SAME_FOLIO != 0) && n < SAME_FOLIO / 2 && count < SAME_FOLIO / 2 {
                last.count = (n + count) | SAME_FOLIO;
                return;
            }
        }
        self.runs.push(GatherRun { head, nr, count: count | SAME_FOLIO });
    }
}

/// What one zap needs to know besides the table.
#[derive(Clone, Copy, Debug)]
pub struct ZapCtx {
    /// Virtual page number of entry 0 of the table.
    pub start: u64,
    /// The whole mm goes (`tlb->fullmm`, exit): arm64 does not unfold contpte blocks.
    pub fullmm: bool,
    /// The mm's MM-ID (v6.15+ slots).
    pub mm_id: u32,
    /// The shared zero page's pfn (`vm_normal_page()` gives no page for it).
    pub zero_pfn: u64,
}

/// The table and counts one `zap_pte_range()` works on.
pub struct ZapEnv<'a, M: FolioCounts> {
    pub ptes: &'a mut [u64],
    pub mem: &'a mut M,
    pub stats: &'a mut Stats,
    /// The mm's rss counters (file, anon, shmem), lowered by what is unmapped.
    pub rss: &'a mut [i64; 3],
    pub gather: &'a mut Gather,
}

/// The counters one [`zap_pte_range`] adds up as it goes, kept out of [`Stats`] so that the
/// loop works in registers; added to the step's counters once per page table.
#[derive(Default)]
struct Tally {
    pte_reads: u64,
    pte_writes: u64,
    tlb_flush_pages: u64,
    folio_pte_batch_calls: u64,
    /// Runs of one PTE (batches of length 1); longer ones go to [`Stats::batch`] at once.
    singles: u64,
    rmap_calls: u64,
    mapcount_updates: u64,
    deferred_splits: u64,
    /// PTEs of small folios zapped on the fast path: each one PTE written, one page flushed,
    /// a batch of one, one rmap call and one mapcount update.
    small: u64,
    /// Batches of `batch_nr` entries not yet in [`Stats::batch_histogram`] (runs of folios
    /// of one size batch alike).
    batch_nr: usize,
    batch_runs: u64,
    rss: [i64; 3],
    /// Some entry was cleared: the table's range is flushed.
    cleared: bool,
}

impl Tally {
    /// [`Stats::batch`]`(nr)`, for `nr` > 1.
    #[inline(always)]
    fn batch(&mut self, st: &mut Stats, nr: usize) {
        if nr != self.batch_nr {
            self.flush_batches(st);
            self.batch_nr = nr;
        }
        self.batch_runs += 1;
    }

    fn flush_batches(&mut self, st: &mut Stats) {
        if self.batch_runs > 0 {
            st.batches += self.batch_runs;
            if st.batch_histogram.len() <= self.batch_nr {
                st.batch_histogram.resize(self.batch_nr + 1, 0);
            }
            st.batch_histogram[self.batch_nr] += self.batch_runs;
            self.batch_runs = 0;
        }
    }

    fn add_to(&mut self, st: &mut Stats, rss: &mut [i64; 3]) {
        self.flush_batches(st);
        st.pte_reads += self.pte_reads;
        st.pte_writes += self.pte_writes + self.small;
        st.tlb_flush_pages += self.tlb_flush_pages + self.small;
        st.folio_pte_batch_calls += self.folio_pte_batch_calls;
        st.rmap_calls += self.rmap_calls + self.small;
        st.mapcount_updates += self.mapcount_updates + self.small;
        st.deferred_splits += self.deferred_splits;
        let singles = self.singles + self.small;
        if singles > 0 {
            st.batches += singles;
            if st.batch_histogram.len() < 2 {
                st.batch_histogram.resize(2, 0);
            }
            st.batch_histogram[1] += singles;
        }
        for (total, d) in rss.iter_mut().zip(self.rss) {
            *total += d;
        }
        if self.cleared {
            st.tlb_flush_ranges += 1;
        }
    }
}

/// Entries [`zap_small_folios`] takes at once where they map small folios in a row.
const SMALL_CHUNK: usize = 8;

/// Entries ahead of the one at hand whose cache lines the zap asks for.
const PREFETCH_AHEAD: usize = 64;

/// The most folios one [`SmallRun`] holds.
const SMALL_RUN_MAX: u32 = u32::MAX / 4;

/// References to consecutive small folios, queued in the gather as one run when it ends.
#[derive(Default)]
struct SmallRun {
    head: u64,
    count: u32,
}

impl SmallRun {
    #[inline(always)]
    fn add<M: FolioCounts>(&mut self, p: &KernelProfile, env: &mut ZapEnv<'_, M>, page: u64) {
        if self.count != 0 && page == self.head + self.count as u64 && self.count < SMALL_RUN_MAX {
            self.count += 1;
        } else {
            self.queue(p, env);
            *self = SmallRun { head: page, count: 1 };
        }
    }

    #[inline(always)]
    fn queue<M: FolioCounts>(&mut self, p: &KernelProfile, env: &mut ZapEnv<'_, M>) {
        if self.count != 0 {
            gather_push(p, env, self.head, 1, self.count);
            self.count = 0;
        }
    }
}

/// Queues references in the gather, finishing it first when it is full.
#[inline(always)]
fn gather_push<M: FolioCounts>(p: &KernelProfile, env: &mut ZapEnv<'_, M>, head: u64, nr: u32, count: u32) {
    if env.gather.len() == GATHER_MAX {
        tlb_finish(&mut Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p }, env.gather);
    }
    env.gather.push_run(head, nr, count);
}

/// Queues `count` times `folio_put_refs(head, nr)`, finishing the gather first when it is full.
#[inline(always)]
fn gather_push_same<M: FolioCounts>(p: &KernelProfile, env: &mut ZapEnv<'_, M>, head: u64, nr: u32, count: u32) {
    if env.gather.len() == GATHER_MAX {
        tlb_finish(&mut Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p }, env.gather);
    }
    env.gather.push_same(head, nr, count);
}

/// `zap_pte_range()` over entries `[i, e)` of one page table: each run of one folio
/// (`zap_present_ptes()`, batched by `folio_pte_batch()` where the kernel does) is cleared,
/// its rmap removed and its references queued in the gather.
pub fn zap_pte_range<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, i: usize, e: usize) {
    zap_pte_range_paths(l, p, ctx, env, i, e, true);
}

/// [`zap_pte_range`], with or without the fused path for large folios (the tests hold it to
/// the general one).
fn zap_pte_range_paths<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, mut i: usize, e: usize, fused: bool) {
    let cont = pgtable::cont_ptes(l, p);
    let form = p.fpb.filter(|_| p.zap_batched);
    // Only arm64 contpte blocks cut by a partial unmap need repainting before a clear.
    let repaint = cont.is_some() && !ctx.fullmm;
    // Batches of single steps, with no contpte block to read or step over.
    let plain_batches = fused && !repaint && form.is_some_and(|f| !(f.uses_hint() && l.caps().contpte));
    let mut t = Tally::default();
    let mut run = SmallRun::default();
    // Each path counts the reads of the entries it takes, this one's included.
    while i < e {
        let pte = env.ptes[i];
        if l.pte_none(pte) {
            t.pte_reads += 1;
            i += 1;
            continue;
        }
        t.cleared = true;
        let page = l.pte_pfn(pte);
        if l.pte_special(pte) || page == ctx.zero_pfn {
            // No page (the zero page): clear the one entry.
            t.pte_reads += 1;
            clear_ptes(l, cont, ctx, env, &mut t, i, 1);
            t.tlb_flush_pages += 1;
            i += 1;
            continue;
        }
        let head = env.mem.folio_head(page);
        let order = env.mem.folio_order(head);
        if order == 0 && !repaint {
            i = zap_small_folios(l, p, ctx, env, &mut t, &mut run, i, e, fused);
            continue;
        }
        if form.is_none() && !repaint {
            i = zap_folio_pte_by_pte(l, p, ctx, env, &mut t, &mut run, i, e, head, order);
            continue;
        }
        if order > 0 && plain_batches {
            i = zap_large_folios(l, p, ctx, env, &mut t, &mut run, i, e);
            continue;
        }
        t.pte_reads += 1;
        let mut nr = 1usize;
        if let (true, true, Some(form)) = (order > 0, e - i != 1, form) {
            // Dirty, soft-dirty, write and young never end a zap batch.
            let table = Table { ptes: env.ptes, first_vpn: ctx.start };
            let folio = Folio { pfn: head, nr_pages: 1 << order };
            nr = folio_pte_batch_unchecked(l, form, table, i, e - i, folio, FpbFlags::default()).nr;
            t.folio_pte_batch_calls += 1;
            t.pte_reads += nr as u64;
        }
        if nr == 1 {
            t.singles += 1;
        } else {
            env.stats.batch(nr);
        }
        run.queue(p, env);
        zap_present_folio_ptes(l, p, cont, ctx, env, &mut t, i, nr, head, order, page);
        i += nr;
    }
    run.queue(p, env);
    t.add_to(env.stats, env.rss);
}

/// The fast path of [`zap_pte_range`]: from entry `i`, every entry that is none or maps a
/// small folio, as `zap_present_folio_ptes()` zaps one (one PTE cleared, a file folio
/// dirtied by a dirty PTE, one mapcount down, no large counts, the reference queued).
/// Returns the first entry it leaves to the general path. Not for arm64 contpte blocks a
/// partial unmap cuts, which need repainting.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn zap_small_folios<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, t: &mut Tally, run: &mut SmallRun, mut i: usize, e: usize, fused: bool) -> usize {
    let none = l.geometry().none_value;
    let (mut reads, mut small, mut rss) = (0u64, 0u64, [0i64; 3]);
    let mut r = std::mem::take(run);
    let nr_pages = env.mem.nr_pages();
    while i < e {
        // Eight entries mapping eight anonymous small folios in a row, extending the run:
        // what eight steps below do, in one pass with no branch per entry.
        if fused && i + SMALL_CHUNK <= e {
            // The entries and counts a few chunks on, where pages in a row would be.
            prefetch(env.ptes, i + PREFETCH_AHEAD);
            env.mem.prefetch_counts(l.pte_pfn(env.ptes[i]).wrapping_add(PREFETCH_AHEAD as u64));
            let chunk: &mut [u64; SMALL_CHUNK] = (&mut env.ptes[i..i + SMALL_CHUNK]).try_into().expect("a chunk");
            let (first, page) = (chunk[0], l.pte_pfn(chunk[0]));
            // Entries equal to the first advanced one page at a time map pages in a row.
            let mut ok = false;
            if let Some(step) = l.linear_advance(first, SMALL_CHUNK as u64) {
                let (mut diff, mut odd) = (0u64, false);
                for (k, &v) in chunk.iter().enumerate() {
                    diff |= v ^ first.wrapping_add(step.wrapping_mul(k as u64));
                    odd |= l.pte_none(v) | l.pte_special(v);
                }
                ok = diff == 0 && !odd;
            }
            let extends = r.count == 0 || page != r.head + r.count as u64 || r.count as u64 + (SMALL_CHUNK as u64) <= SMALL_RUN_MAX as u64;
            if ok && extends && ctx.zero_pfn.wrapping_sub(page) >= SMALL_CHUNK as u64 && page.saturating_add(SMALL_CHUNK as u64) <= nr_pages {
                let orders = env.mem.orders(page, SMALL_CHUNK as u64);
                let order0 = orders.iter().fold(0u8, |a, &o| a | o) == 0;
                let flags = env.mem.flags_range_mut(page, SMALL_CHUNK as u64);
                let anon = flags.iter().fold(PG_ANON, |a, &f| a & f) != 0;
                if order0 && anon {
                    chunk.fill(none);
                    for m in env.mem.mapcounts_mut(page, SMALL_CHUNK as u64) {
                        *m -= 1;
                    }
                    rss[MM_ANONPAGES] -= SMALL_CHUNK as i64;
                    if r.count != 0 && page == r.head + r.count as u64 {
                        r.count += SMALL_CHUNK as u32;
                    } else {
                        r.queue(p, env);
                        r = SmallRun { head: page, count: SMALL_CHUNK as u32 };
                    }
                    small += SMALL_CHUNK as u64;
                    i += SMALL_CHUNK;
                    continue;
                }
            }
        }
        let pte = env.ptes[i];
        if l.pte_none(pte) {
            reads += 1;
            i += 1;
            continue;
        }
        let page = l.pte_pfn(pte);
        if l.pte_special(pte) || page == ctx.zero_pfn || env.mem.order_of(page) != 0 {
            break;
        }
        let flags = env.mem.flags_of(page);
        if flags & PG_ANON == 0 && l.pte_dirty(pte) {
            env.mem.set(page, PG_DIRTY);
        }
        env.ptes[i] = none;
        rss[mm_counter_of(flags)] -= 1;
        *env.mem.mapcount_mut(page) -= 1;
        r.add(p, env, page);
        small += 1;
        i += 1;
    }
    *run = r;
    t.pte_reads += reads + small;
    t.small += small;
    t.cleared |= small > 0;
    for (a, b) in t.rss.iter_mut().zip(rss) {
        *a += b;
    }
    i
}

/// Entries compared at once by [`zap_large_folios`].
const RUN: usize = 8;

/// The path of [`zap_pte_range`] for large folios where the kernel batches (v6.9+) and no
/// contpte block is involved: from entry `i`, each run of entries mapping consecutive pages
/// of one large folio, as `folio_pte_batch()` finds it (every step of one page, so the batch
/// is the entries that match the first, advanced, up to the folio's end or `e`), is zapped by
/// `zap_present_folio_ptes()`: cleared, a file folio dirtied by a dirty entry, its rmap
/// removed and its references queued. The scan, the clear and the counts go in one pass per
/// folio with no call per batch. Returns the first entry it leaves to the general path.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn zap_large_folios<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, t: &mut Tally, run: &mut SmallRun, mut i: usize, e: usize) -> usize {
    run.queue(p, env);
    let none = l.geometry().none_value;
    // folio_pte_batch() with no FPB_RESPECT_* flag: dirty, soft-dirty, write and young ignored.
    let normalise = |v: u64| l.pte_mkold(l.pte_wrprotect(l.pte_clear_soft_dirty(l.pte_mkclean(v))));
    while i < e {
        let pte = env.ptes[i];
        let page = l.pte_pfn(pte);
        if l.pte_none(pte) || l.pte_special(pte) || page == ctx.zero_pfn {
            break;
        }
        // The entries and counts a few folios on, where pages in a row would be.
        prefetch(env.ptes, i + PREFETCH_AHEAD);
        prefetch(env.ptes, i + PREFETCH_AHEAD + RUN);
        env.mem.prefetch_counts(page.wrapping_add(PREFETCH_AHEAD as u64));
        let head = env.mem.folio_head(page);
        let order = env.mem.folio_order(head);
        if order == 0 || order == crate::memory::FREE as u32 {
            break;
        }
        let flags = env.mem.flags_of(head);
        let anon = flags & PG_ANON != 0;
        // The batch: entries that equal the first advanced one page at a time, up to the
        // folio's end and the range's.
        let stop = i + (e - i).min((head + (1u64 << order) - page) as usize);
        // Compared from the first entry (which matches itself), so that a folio of 2^k
        // pages is 2^k / RUN whole chunks.
        let mut expected = normalise(pte);
        let mut dirty = false;
        let mut j = i;
        while j + RUN <= stop {
            let Some(step) = l.linear_advance(expected, RUN as u64) else { break };
            let chunk: &[u64; RUN] = env.ptes[j..j + RUN].try_into().expect("RUN entries");
            let (mut diff, mut d) = (0u64, false);
            for (k, &v) in chunk.iter().enumerate() {
                diff |= normalise(v) ^ expected.wrapping_add(step.wrapping_mul(k as u64));
                d |= l.pte_dirty(v);
            }
            if diff != 0 {
                break;
            }
            dirty |= d;
            expected = expected.wrapping_add(step.wrapping_mul(RUN as u64));
            j += RUN;
        }
        while j < stop {
            let v = env.ptes[j];
            if normalise(v) != expected {
                break;
            }
            dirty |= l.pte_dirty(v);
            expected = l.pte_advance_pfn(expected, 1);
            j += 1;
        }
        let nr = j - i;
        // One read before the batch; folio_pte_batch() is called when more than one entry
        // is left, and reads the batch.
        t.pte_reads += 1;
        if e - i != 1 {
            t.folio_pte_batch_calls += 1;
            t.pte_reads += nr as u64;
        }
        if nr == 1 {
            t.singles += 1;
        } else {
            t.batch(env.stats, nr);
        }
        for v in &mut env.ptes[i..j] {
            *v = none;
        }
        if !anon && dirty {
            env.mem.set(head, PG_DIRTY);
        }
        t.cleared = true;
        t.pte_writes += nr as u64;
        t.tlb_flush_pages += nr as u64;
        t.rss[mm_counter_of(flags)] -= nr as i64;
        t.rmap_calls += 1;
        t.mapcount_updates += nr as u64 + 1;
        t.deferred_splits += folio_remove_ptes(&mut *env.mem, p.mm_id, head, order, page, nr as u64, ctx.mm_id) as u64;
        gather_push(p, env, head, nr as u32, 1);
        i = j;
    }
    i
}

/// `clear_full_ptes()` of `[i, i + nr)`: only arm64 contpte blocks cut by a partial unmap
/// need repainting first ([`pgtable::clear_full_ptes`]); otherwise the run is just cleared.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn clear_ptes<L: PteLayout, M: FolioCounts>(l: &L, cont: Option<usize>, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, t: &mut Tally, i: usize, nr: usize) {
    if cont.is_some() && !ctx.fullmm {
        pgtable::clear_full_ptes(l, cont, env.ptes, ctx.start, i, nr, false, env.stats);
    } else {
        fill_none(l, &mut env.ptes[i..i + nr]);
        t.pte_writes += nr as u64;
    }
}

/// The path of [`zap_pte_range`] for a large folio where the kernel zaps one PTE at a time
/// (v6.8, or batching off): from entry `i`, which maps a page of the folio of `order` at
/// `head`, each following entry that maps a page of the same folio is zapped alone, as
/// `zap_present_ptes()` does with a batch of one (one rmap call, its page's mapcount and the
/// large mapcount, the partially-mapped check, one reference). Returns the first entry it
/// leaves to the general path. Not for arm64 contpte blocks a partial unmap cuts.
#[allow(clippy::too_many_arguments)]
#[inline(never)]
fn zap_folio_pte_by_pte<L: PteLayout, M: FolioCounts>(
    l: &L,
    p: &KernelProfile,
    ctx: &ZapCtx,
    env: &mut ZapEnv<'_, M>,
    t: &mut Tally,
    run: &mut SmallRun,
    mut i: usize,
    e: usize,
    head: u64,
    order: u32,
) -> usize {
    run.queue(p, env);
    let none = l.geometry().none_value;
    let end = head + (1u64 << order);
    debug_assert!(order > 0);
    let flags = env.mem.flags_of(head);
    let anon = flags & PG_ANON != 0;
    let (mut n, mut last, mut dirty) = (0u64, 0i32, false);
    while i < e {
        let pte = env.ptes[i];
        let page = l.pte_pfn(pte);
        if l.pte_none(pte) || l.pte_special(pte) || page < head || page >= end || page == ctx.zero_pfn {
            break;
        }
        dirty |= !anon && l.pte_dirty(pte);
        env.ptes[i] = none;
        let m = env.mem.mapcount_mut(page);
        *m -= 1;
        last += (*m == 0) as i32;
        n += 1;
        i += 1;
    }
    if dirty {
        env.mem.set(head, PG_DIRTY);
    }
    let deferred = folio_remove_ptes_one_by_one(&mut *env.mem, p.mm_id, head, n, last, ctx.mm_id) as u64;
    t.pte_reads += n;
    t.singles += n;
    t.pte_writes += n;
    t.tlb_flush_pages += n;
    t.rss[mm_counter_of(flags)] -= n as i64;
    t.rmap_calls += n;
    t.mapcount_updates += 2 * n;
    t.deferred_splits += deferred;
    t.cleared |= n > 0;
    gather_push_same(p, env, head, 1, n as u32);
    i
}

/// The entries become none (a run of one without a call to `memset`).
#[inline(always)]
fn fill_none<L: PteLayout>(l: &L, run: &mut [u64]) {
    let none = l.geometry().none_value;
    match run {
        [v] => *v = none,
        _ => run.fill(none),
    }
}

/// `zap_present_folio_ptes()`: file folios take the dirty bit of the cleared run
/// (`get_and_clear_full_ptes()`); anonymous ones do not need it (`clear_full_ptes()`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn zap_present_folio_ptes<L: PteLayout, M: FolioCounts>(
    l: &L,
    p: &KernelProfile,
    cont: Option<usize>,
    ctx: &ZapCtx,
    env: &mut ZapEnv<'_, M>,
    t: &mut Tally,
    i: usize,
    nr: usize,
    head: u64,
    order: u32,
    page: u64,
) {
    let flags = env.mem.flags_of(head);
    if flags & PG_ANON != 0 {
        clear_ptes(l, cont, ctx, env, t, i, nr);
    } else {
        let dirty = if cont.is_some() && !ctx.fullmm {
            let pte = pgtable::get_and_clear_full_ptes(l, cont, env.ptes, ctx.start, i, nr, false, env.stats);
            l.pte_dirty(pte)
        } else {
            let run = &mut env.ptes[i..i + nr];
            let dirty = run.iter().any(|&v| l.pte_dirty(v));
            fill_none(l, run);
            t.pte_writes += nr as u64;
            dirty
        };
        if dirty {
            env.mem.set(head, PG_DIRTY);
        }
    }
    t.tlb_flush_pages += nr as u64;
    t.rss[mm_counter_of(flags)] -= nr as i64;
    // folio_remove_rmap_ptes()
    t.rmap_calls += 1;
    t.mapcount_updates += nr as u64 + (order > 0) as u64;
    t.deferred_splits += folio_remove_ptes(&mut *env.mem, p.mm_id, head, order, page, nr as u64, ctx.mm_id) as u64;
    gather_push(p, env, head, nr as u32, 1);
}

/// `tlb_finish_mmu()`: the TLB is flushed, now the references go (one refcount atomic per
/// `folio_put_refs()`).
///
/// Folios freed one after another that lie next to each other go back to the allocator as
/// one run ([`FolioCounts::free_folio_run`]): the free blocks depend only on which pages are
/// free, so the memory ends as one free at a time would leave it. Only the folio just past
/// the pending run is touched while it waits; anything else returns the run first.
pub fn tlb_finish<M: FolioCounts>(r: &mut Rmap<'_, M>, gather: &mut Gather) {
    let (mut puts, mut freed) = (0u64, 0u64);
    // Pages [first, end) of folios freed and not yet returned; `large` if any is.
    let (mut first, mut end, mut large) = (0u64, 0u64, false);
    for g in gather.runs.drain(..) {
        let n = g.count & !SAME_FOLIO;
        puts += n as u64;
        if g.count & SAME_FOLIO != 0 {
            free_pending(&mut *r.mem, first, end, large);
            (first, end, large) = (g.head, g.head, false);
            freed += folio_put_refs_times(&mut *r.mem, g.head, g.nr as i32, n) as u64;
            continue;
        }
        // Consecutive heads: all but maybe the last are order-0 folios, so no head of the
        // run lies in what the run before it leaves pending.
        if g.head != end {
            free_pending(&mut *r.mem, first, end, large);
            (first, end, large) = (g.head, g.head, false);
        }
        let (mut head, stop) = (g.head, g.head + n as u64);
        while head < stop {
            // The references, up to a freed folio the pending run does not reach (no call
            // in this loop, so that its counts stay in registers).
            let mut run_freed = 0u64;
            let mut gap = false;
            while head < stop {
                // Eight small folios' counts at once, when none reaches zero or all do
                // and extend the pending run: what eight steps below do.
                if head + SMALL_CHUNK as u64 <= stop {
                    let nr = g.nr as i32;
                    let c: &mut [i32; SMALL_CHUNK] = r.mem.refcounts_mut(head, SMALL_CHUNK as u64).try_into().expect("a chunk");
                    let zeros = c.iter().fold(0u32, |a, &x| a + (x == nr) as u32);
                    if zeros == 0 {
                        for x in c.iter_mut() {
                            *x -= nr;
                        }
                        head += SMALL_CHUNK as u64;
                        continue;
                    }
                    if zeros == SMALL_CHUNK as u32 && head == end && r.mem.orders(head, SMALL_CHUNK as u64).iter().all(|&o| o == 0) {
                        let c: &mut [i32; SMALL_CHUNK] = r.mem.refcounts_mut(head, SMALL_CHUNK as u64).try_into().expect("a chunk");
                        c.fill(0);
                        run_freed += SMALL_CHUNK as u64;
                        head += SMALL_CHUNK as u64;
                        end = head;
                        continue;
                    }
                }
                let c = r.mem.refcount_mut(head);
                *c -= g.nr as i32;
                if *c == 0 {
                    if head != end {
                        gap = true;
                        break;
                    }
                    run_freed += 1;
                    end = match r.mem.order_of(head) {
                        0 => head + 1,
                        o => {
                            large = true;
                            head + folio_nr_pages(o)
                        }
                    };
                }
                head += 1;
            }
            freed += run_freed;
            if gap {
                debug_assert!(first == end || head > end, "a head inside the pending run");
                free_pending(&mut *r.mem, first, end, large);
                let o = r.mem.order_of(head);
                (first, end, large) = (head, head + folio_nr_pages(o), o != 0);
                freed += 1;
                head += 1;
            }
        }
    }
    free_pending(&mut *r.mem, first, end, large);
    r.stats.refcount_atomics += puts;
    r.stats.folios_freed += freed;
}

/// Returns the folios of pages `[first, end)` to the allocator; `large` if any is large.
#[inline(always)]
fn free_pending<M: FolioCounts>(mem: &mut M, first: u64, end: u64, large: bool) {
    if first < end {
        if large {
            mem.free_folio_run(first, end);
        } else {
            mem.free_order0_run(first, end - first);
        }
    }
}

/// `unmap_page_range()` of one table over arrays a user owns: cut into page tables at PMD
/// boundaries, one [`zap_pte_range`] each, then the gather finished. The caller has checked
/// the table ([`pgtable::check_table`]).
pub fn zap_pte_range_arrays<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>) {
    let len = env.ptes.len();
    let ptrs = l.geometry().ptrs_per_pte as usize;
    let mut a = 0usize;
    while a < len {
        let e = len.min(a + ptrs - ((ctx.start as usize + a) & (ptrs - 1)));
        zap_pte_range(l, p, ctx, env, a, e);
        a = e;
    }
    tlb_finish(&mut Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p }, env.gather);
}

impl State {
    /// Zaps entries `[a, b)` of VMA `v` of process `k`, one page table at a time.
    ///
    /// The gather is finished every [`FINISH_ENTRIES`] entries, while the pages it frees are
    /// still in the host's cache: the end state is the same (a folio's references go only
    /// when no entry maps it, so nothing later in the zap finds it freed).
    #[allow(clippy::too_many_arguments)]
    pub fn zap_vma_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, a: usize, b: usize, fullmm: bool, gather: &mut Gather) -> Result<()> {
        let start = self.mms[k].vmas[v].start;
        let ptrs = self.ptrs_per_pte as usize;
        let (mut s, mut since) = (a, 0usize);
        while s < b {
            let to_pmd = ptrs - ((start as usize + s) & (ptrs - 1));
            let e = b.min(s + to_pmd);
            if !self.zap_huge_pmd_range(l, p, k, v, s, e, gather) {
                self.zap_pte_range(l, p, k, v, s, e, fullmm, gather);
            }
            since += e - s;
            if since >= FINISH_ENTRIES {
                self.tlb_finish(l, p, gather);
                since = 0;
            }
            self.ticker.tick((e - s) as u64)?;
            s = e;
        }
        Ok(())
    }

    /// [`zap_pte_range`] over `[a, e)` of one page table of VMA `v`.
    #[allow(clippy::too_many_arguments)]
    fn zap_pte_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, a: usize, e: usize, fullmm: bool, gather: &mut Gather) {
        let State { mem, mms, op, zero_pfn, .. } = self;
        let mm = &mut mms[k];
        let ctx = ZapCtx { start: mm.vmas[v].start, fullmm, mm_id: mm.mm_id, zero_pfn: *zero_pfn };
        let mut rss = [0i64; 3];
        let mut env = ZapEnv { ptes: &mut mm.vmas[v].ptes[..], mem, stats: op, rss: &mut rss, gather };
        zap_pte_range(l, p, &ctx, &mut env, a, e);
        for (total, d) in mm.rss.iter_mut().zip(rss) {
            *total += d;
        }
    }

    /// `tlb_finish_mmu()`: the TLB is flushed, now the references go.
    pub fn tlb_finish<L: PteLayout>(&mut self, _l: &L, p: &KernelProfile, gather: &mut Gather) {
        tlb_finish(&mut self.rmap(p), gather);
    }

    /// `munmap()` of `[a, b)` (vpns): VMAs split at the ends, zapped and removed.
    pub fn munmap<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64) -> Result<()> {
        let mut gather = new_gather()?;
        self.split_huge_pmd_at(l, p, k, a);
        self.split_huge_pmd_at(l, p, k, b);
        self.unfold_at_split(l, p, k, a);
        self.unfold_at_split(l, p, k, b);
        let r = self.mms[k].isolate(a, b);
        for v in r.clone() {
            let n = self.mms[k].vmas[v].ptes.len();
            self.zap_vma_range(l, p, k, v, 0, n, false, &mut gather)?;
        }
        self.mms[k].vmas.drain(r);
        self.tlb_finish(l, p, &mut gather);
        Ok(())
    }

    /// `exit_mmap()`: every VMA zapped (a full-mm gather), the mm marked exited.
    pub fn exit_mm<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize) -> Result<()> {
        let mut gather = new_gather()?;
        for v in 0..self.mms[k].vmas.len() {
            let n = self.mms[k].vmas[v].ptes.len();
            self.zap_vma_range(l, p, k, v, 0, n, true, &mut gather)?;
        }
        self.mms[k].vmas.clear();
        self.mms[k].exited = true;
        self.tlb_finish(l, p, &mut gather);
        Ok(())
    }

    /// `madvise(MADV_DONTNEED)`: zap without touching the VMAs.
    pub fn madv_dontneed<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64) -> Result<()> {
        let mut gather = new_gather()?;
        for v in 0..self.mms[k].vmas.len() {
            let vma = &self.mms[k].vmas[v];
            let (s, e) = (vma.start.max(a), vma.end().min(b));
            if s < e {
                let (ia, ib) = ((s - vma.start) as usize, (e - vma.start) as usize);
                self.zap_vma_range(l, p, k, v, ia, ib, false, &mut gather)?;
            }
        }
        self.tlb_finish(l, p, &mut gather);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{PteBits, X86_64};
    use crate::memory::{SplitMix64, FREE, PG_SWAPBACKED};
    use crate::rmap::FolioArrays;

    /// Per-page arrays of `n` pages, all order-0 anonymous folios mapped once, refcount 1.
    #[derive(Clone)]
    struct Arrays {
        order: Vec<u8>,
        flags: Vec<u8>,
        mapcount: Vec<i32>,
        refcount: Vec<i32>,
        large_mapcount: Vec<i32>,
        nr_pages_mapped: Vec<i32>,
        pincount: Vec<i32>,
        mm_id: Vec<u32>,
        mm_id_mapcount: Vec<i32>,
    }

    impl Arrays {
        /// The counts the mappings in `ptes` make (not of `zero_pfn`), plus one more reference
        /// for every fourth of `folios` (head, pages), so that some folios outlive the zap.
        fn count_mappings<L: PteLayout>(&mut self, l: &L, ptes: &[u64], zero_pfn: u64, folios: &[(u64, u64)]) {
            for &v in ptes {
                let page = l.pte_pfn(v);
                if v == 0 || page == zero_pfn {
                    continue;
                }
                let o = self.order[page as usize];
                let head = page & !((1u64 << o) - 1);
                self.mapcount[page as usize] += 1;
                self.refcount[head as usize] += 1;
                if o > 0 {
                    if self.mapcount[page as usize] == 1 {
                        self.nr_pages_mapped[head as usize] += 1;
                    }
                    self.large_mapcount[head as usize] += 1;
                    self.mm_id_mapcount[2 * head as usize] += 1;
                }
            }
            for (k, &(h, _)) in folios.iter().enumerate() {
                self.refcount[h as usize] += (k % 4 == 3) as i32;
            }
        }

        fn small(n: usize) -> Arrays {
            Arrays {
                order: vec![0; n],
                flags: vec![PG_ANON | PG_SWAPBACKED; n],
                mapcount: vec![1; n],
                refcount: vec![1; n],
                large_mapcount: vec![-1; n],
                nr_pages_mapped: vec![0; n],
                pincount: vec![0; n],
                mm_id: vec![0; 2 * n],
                mm_id_mapcount: vec![-1; 2 * n],
            }
        }

        fn counts(&mut self) -> FolioArrays<'_> {
            FolioArrays::new(
                &mut self.order,
                &mut self.flags,
                &mut self.mapcount,
                &mut self.refcount,
                &mut self.large_mapcount,
                &mut self.nr_pages_mapped,
                &mut self.pincount,
                &mut self.mm_id,
                &mut self.mm_id_mapcount,
            )
            .unwrap()
        }
    }

    #[test]
    fn gather_runs_drop_the_references_one_call_at_a_time() {
        // Pushes that merge into runs (consecutive folios, one folio again and again) and
        // pushes that do not, against the same folio_put_refs() calls made one by one.
        let p = KernelProfile::parse("6.18").unwrap();
        let mut rng = SplitMix64(3);
        // (head, nr, times): `times` calls on the same folio queued at once (push_same).
        let mut pushes = Vec::new();
        for _ in 0..2000 {
            let head = rng.next_u64() % 64;
            let nr = 1 + (rng.next_u64() % 2) as u32;
            match rng.next_u64() % 4 {
                0 => pushes.extend((0..1 + rng.next_u64() % 5).map(|k| ((head + k) % 64, nr, 1))),
                1 => pushes.extend((0..1 + rng.next_u64() % 5).map(|_| (head, nr, 1))),
                2 => pushes.push((head, nr, 1 + rng.next_u64() as u32 % 4)),
                _ => pushes.push((head, nr, 1)),
            }
        }
        let (mut a, mut b) = (Arrays::small(64), Arrays::small(64));
        // Each folio's count reaches zero exactly, half-way through its calls (it is freed,
        // and the later calls take it below zero), or is never reached (odd heads, 1 more).
        let calls: Vec<(u64, u32)> = pushes.iter().flat_map(|&(h, nr, times)| (0..times).map(move |_| (h, nr))).collect();
        for h in 0..64u64 {
            let mine: Vec<i32> = calls.iter().filter(|c| c.0 == h).map(|c| c.1 as i32).collect();
            let count = mine[..mine.len() / 2].iter().sum::<i32>() + (h % 2) as i32 * 1000;
            a.refcount[h as usize] = count;
            b.refcount[h as usize] = count;
        }
        let (mut sa, mut sb) = (Stats::default(), Stats::default());
        let mut gather = new_gather().unwrap();
        {
            let mut ca = a.counts();
            let mut r = Rmap { mem: &mut ca, stats: &mut sa, profile: &p };
            for &(head, nr, times) in &pushes {
                gather.push_same(head, nr, times);
            }
            assert!(gather.len() < pushes.len());
            tlb_finish(&mut r, &mut gather);
            assert!(gather.is_empty());
        }
        {
            let mut cb = b.counts();
            let mut r = Rmap { mem: &mut cb, stats: &mut sb, profile: &p };
            for &(head, nr, times) in &pushes {
                for _ in 0..times {
                    r.put_refs(head, nr as i32);
                }
            }
        }
        assert_eq!(sa, sb);
        assert!(sa.folios_freed > 0, "some folio went to zero and was freed");
        assert_eq!((a.refcount, a.order, a.flags), (b.refcount, b.order, b.flags));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A gather of references to the simulation's folios of mixed orders, many of them
        /// freed next to each other, finished at once against one folio_put_refs() at a time.
        #[test]
        fn gather_frees_runs_of_folios_as_single_puts(
            orders in proptest::collection::vec(0u32..5, 1..60),
            holes in proptest::collection::vec(0usize..60, 0..8),
            pushes in proptest::collection::vec((0usize..60, 1u32..3, 1u32..4, proptest::bool::ANY), 1..150),
        ) {
            let p = KernelProfile::parse("6.18").unwrap();
            let mut a = crate::memory::Memory::new(2048, 6, 1).unwrap();
            let mut heads: Vec<u64> = orders.iter().filter_map(|&o| a.alloc(o)).collect();
            for &h in &holes {
                if h < heads.len() {
                    a.free(heads.remove(h));
                }
            }
            proptest::prop_assume!(!heads.is_empty());
            for &h in &heads {
                a.token[h as usize] = h as u32 + 1;
                a.flags[h as usize] = PG_ANON;
            }
            // (head, nr, times): consecutive heads from one (push), or one head again (push_same).
            let mut calls = Vec::new();
            for &(k, nr, times, same) in &pushes {
                let k = k % heads.len();
                if same {
                    calls.push((heads[k], nr, times));
                } else {
                    calls.extend(heads[k..(k + times as usize).min(heads.len())].iter().map(|&h| (h, nr, 1)));
                }
            }
            // Each folio's count reaches zero exactly half-way through its calls, or never.
            for (j, &h) in heads.iter().enumerate() {
                let mine: Vec<i32> = calls.iter().filter(|c| c.0 == h).flat_map(|c| (0..c.2).map(move |_| c.1 as i32)).collect();
                a.refcount[h as usize] = mine[..mine.len().div_ceil(2)].iter().sum::<i32>() + (j % 3 == 2) as i32;
            }
            let mut b = a.clone();
            let (mut sa, mut sb) = (Stats::default(), Stats::default());
            let mut gather = new_gather().unwrap();
            for &(head, nr, times) in &calls {
                gather.push_same(head, nr, times);
            }
            tlb_finish(&mut Rmap { mem: &mut a, stats: &mut sa, profile: &p }, &mut gather);
            {
                let mut r = Rmap { mem: &mut b, stats: &mut sb, profile: &p };
                for &(head, nr, times) in &calls {
                    for _ in 0..times {
                        r.put_refs(head, nr as i32);
                    }
                }
            }
            proptest::prop_assert_eq!(&sa, &sb);
            proptest::prop_assert_eq!(a.free_blocks(), b.free_blocks());
            proptest::prop_assert_eq!(a.free_pages, b.free_pages);
            proptest::prop_assert_eq!(a.large_folios(), b.large_folios());
            proptest::prop_assert_eq!((&a.order, &a.flags, &a.mapcount), (&b.order, &b.flags, &b.mapcount));
            proptest::prop_assert_eq!((&a.refcount, &a.token), (&b.refcount, &b.token));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// The fused zap of large folios against the general path (folio_pte_batch() and
        /// zap_present_folio_ptes() per batch): tables of folios of orders 0 to 4, anonymous
        /// or file, mapped whole, in part, out of order, with holes and any dirty, young,
        /// write and soft-dirty bits, on every kernel with batched zaps.
        #[test]
        fn fused_large_folio_zap_is_the_general_one(
            orders in proptest::collection::vec(0u32..5, 1..24),
            entries in proptest::collection::vec((0u8..8, 0u8..16, 0u64..64), 1..120),
            kernel in 0usize..4,
            fullmm in proptest::bool::ANY,
            split in 0usize..120,
        ) {
            use crate::memory::PG_FILE;
            let l = X86_64;
            let p = KernelProfile::parse(["6.9", "6.12", "6.16", "6.18"][kernel]).unwrap();
            let n = 512usize;
            let mut a = Arrays::small(n);
            a.order.fill(FREE);
            a.mapcount.fill(0);
            a.refcount.fill(0);
            // Folios laid out from pfn 0, each naturally aligned.
            let mut folios = Vec::new();
            let mut at = 0u64;
            for (k, &o) in orders.iter().enumerate() {
                let nr = 1u64 << o;
                at = at.next_multiple_of(nr);
                if at + nr > n as u64 {
                    break;
                }
                a.order[at as usize..(at + nr) as usize].fill(o as u8);
                a.flags[at as usize] = if k % 3 == 2 { PG_FILE } else { PG_ANON | PG_SWAPBACKED };
                if o > 0 {
                    a.large_mapcount[at as usize] = -1;
                    a.mm_id[2 * at as usize] = 1;
                }
                folios.push((at, nr));
                at += nr;
            }
            // Entries: mostly the next page of the current folio, sometimes a hole, another
            // folio's page, a repeat or a skipped page; any bits.
            let mut ptes = Vec::new();
            let (mut f, mut off) = (0usize, 0u64);
            for &(kind, bits, x) in &entries {
                let pte_bits = PteBits { present: true, write: bits & 1 != 0, dirty: bits & 2 != 0, young: bits & 4 != 0,
                    soft_dirty: bits & 8 != 0, ..Default::default() };
                let pfn = match kind {
                    0 => { ptes.push(0); continue; }
                    1 => { f = x as usize % folios.len(); off = x % folios[f].1; folios[f].0 + off }
                    2 => folios[f].0 + off,
                    3 => { off = (off + 2) % folios[f].1; folios[f].0 + off }
                    _ => {
                        off += 1;
                        if off == folios[f].1 {
                            (f, off) = ((f + 1) % folios.len(), 0);
                        }
                        folios[f].0 + off
                    }
                };
                ptes.push(l.mk_pte(pfn, pte_bits).unwrap());
            }
            // Counts as the mappings make them, plus one more reference for some folios.
            a.count_mappings(&l, &ptes, u64::MAX, &folios);
            let mut b = a.clone();
            let mut out = Vec::new();
            for (arrays, fused) in [(&mut a, true), (&mut b, false)] {
                let mut table = ptes.clone();
                let (mut st, mut rss) = (Stats::default(), [0i64; 3]);
                let mut gather = new_gather().unwrap();
                let ctx = ZapCtx { start: 0, fullmm, mm_id: 1, zero_pfn: u64::MAX };
                let mut counts = arrays.counts();
                let mut env = ZapEnv { ptes: &mut table, mem: &mut counts, stats: &mut st, rss: &mut rss, gather: &mut gather };
                // Two ranges, as two zaps of one table would take them.
                let s = split % (ptes.len() + 1);
                zap_pte_range_paths(&l, &p, &ctx, &mut env, 0, s, fused);
                zap_pte_range_paths(&l, &p, &ctx, &mut env, s, ptes.len(), fused);
                tlb_finish(&mut Rmap { mem: &mut counts, stats: &mut st, profile: &p }, &mut gather);
                out.push((table, st, rss));
            }
            proptest::prop_assert_eq!(&out[0], &out[1]);
            proptest::prop_assert_eq!((&a.order, &a.flags, &a.mapcount, &a.refcount), (&b.order, &b.flags, &b.mapcount, &b.refcount));
            proptest::prop_assert_eq!((&a.large_mapcount, &a.nr_pages_mapped), (&b.large_mapcount, &b.nr_pages_mapped));
            proptest::prop_assert_eq!((&a.mm_id, &a.mm_id_mapcount), (&b.mm_id, &b.mm_id_mapcount));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

        /// The chunked zap of small folios (eight entries at once) against the one-entry
        /// path: tables of mostly order-0 folios, anonymous, shmem or file, mapped in long
        /// runs of pages in a row with runs of equal bits, broken by holes, other folios'
        /// pages, the zero page, large folios and changed bits.
        #[test]
        fn chunked_small_folio_zap_is_the_one_entry_one(
            orders in proptest::collection::vec(proptest::prop_oneof![6 => proptest::strategy::Just(0u32), 1 => 1u32..4], 1..120),
            entries in proptest::collection::vec((0u8..24, 0u8..16, 0u64..512), 1..200),
            kernel in 0usize..5,
            zero in proptest::option::of(0u64..512),
            split in 0usize..200,
        ) {
            use crate::memory::PG_FILE;
            let l = X86_64;
            let p = KernelProfile::parse(["6.8", "6.9", "6.12", "6.16", "6.18"][kernel]).unwrap();
            let n = 512usize;
            let mut a = Arrays::small(n);
            a.order.fill(FREE);
            a.mapcount.fill(0);
            a.refcount.fill(0);
            let mut folios = Vec::new();
            let mut at = 0u64;
            // Every page in a folio: order-0 ones fill the gaps before aligned large ones.
            let gaps = |o: u32, at: u64| std::iter::repeat(0).take((at.next_multiple_of(1 << o) - at) as usize);
            let mut order_at = Vec::new();
            for &o in &orders {
                let pad = order_at.iter().map(|&q: &u32| 1u64 << q).sum::<u64>();
                order_at.extend(gaps(o, pad).chain([o]));
            }
            for (k, &o) in order_at.iter().enumerate() {
                let nr = 1u64 << o;
                if at + nr > n as u64 {
                    break;
                }
                a.order[at as usize..(at + nr) as usize].fill(o as u8);
                a.flags[at as usize] = [PG_ANON | PG_SWAPBACKED, PG_ANON, PG_FILE, PG_SWAPBACKED][k % 4 * (k % 9 == 8) as usize];
                if o > 0 {
                    a.large_mapcount[at as usize] = -1;
                    a.mm_id[2 * at as usize] = 1;
                }
                folios.push((at, nr));
                at += nr;
            }
            // Entries: mostly the next page with the bits of the entry before.
            let mut ptes = Vec::new();
            let (mut pfn, mut bits) = (folios[0].0, 0u8);
            for &(kind, b, x) in &entries {
                match kind {
                    0 => { ptes.push(0); continue; }
                    1 => pfn = folios[x as usize % folios.len()].0,
                    2 => bits = b,
                    3 => pfn = x % at,
                    _ => pfn = (pfn + 1) % at,
                }
                let pte_bits = PteBits { present: true, write: bits & 1 != 0, dirty: bits & 2 != 0, young: bits & 4 != 0,
                    soft_dirty: bits & 8 != 0, ..Default::default() };
                ptes.push(l.mk_pte(pfn, pte_bits).unwrap());
            }
            let zero_pfn = zero.unwrap_or(u64::MAX);
            a.count_mappings(&l, &ptes, zero_pfn, &folios);
            let mut b = a.clone();
            let mut out = Vec::new();
            for (arrays, fused) in [(&mut a, true), (&mut b, false)] {
                let mut table = ptes.clone();
                let (mut st, mut rss) = (Stats::default(), [0i64; 3]);
                let mut gather = new_gather().unwrap();
                let ctx = ZapCtx { start: 0, fullmm: true, mm_id: 1, zero_pfn };
                let mut counts = arrays.counts();
                let mut env = ZapEnv { ptes: &mut table, mem: &mut counts, stats: &mut st, rss: &mut rss, gather: &mut gather };
                let s = split % (ptes.len() + 1);
                zap_pte_range_paths(&l, &p, &ctx, &mut env, 0, s, fused);
                zap_pte_range_paths(&l, &p, &ctx, &mut env, s, ptes.len(), fused);
                let runs = gather.runs.clone();
                tlb_finish(&mut Rmap { mem: &mut counts, stats: &mut st, profile: &p }, &mut gather);
                out.push((table, st, rss, runs.iter().map(|g| (g.head, g.nr, g.count)).collect::<Vec<_>>()));
            }
            proptest::prop_assert_eq!(&out[0], &out[1]);
            proptest::prop_assert_eq!((&a.order, &a.flags, &a.mapcount, &a.refcount), (&b.order, &b.flags, &b.mapcount, &b.refcount));
            proptest::prop_assert_eq!((&a.large_mapcount, &a.nr_pages_mapped), (&b.large_mapcount, &b.nr_pages_mapped));
            proptest::prop_assert_eq!((&a.mm_id, &a.mm_id_mapcount), (&b.mm_id, &b.mm_id_mapcount));
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

        /// A gather of long runs of small folios (the chunks of eight the finish takes at
        /// once), some counts reaching zero and some not, in the simulation's memory, against
        /// one folio_put_refs() at a time.
        #[test]
        fn gather_of_small_folio_runs_frees_as_single_puts(
            holes in proptest::collection::vec(0usize..1000, 0..40),
            runs in proptest::collection::vec((0usize..1000, 1u32..3, 1usize..40), 1..40),
            keep in proptest::collection::vec(0u8..8, 1000),
        ) {
            let p = KernelProfile::parse("6.18").unwrap();
            let mut a = crate::memory::Memory::new(1024, 10, 1).unwrap();
            let mut heads: Vec<u64> = (0..1000).filter_map(|_| a.alloc(0)).collect();
            for &h in &holes {
                if h < heads.len() {
                    a.free(heads.remove(h));
                }
            }
            for &h in &heads {
                a.token[h as usize] = h as u32 + 1;
                a.flags[h as usize] = PG_ANON;
            }
            // Runs of pfns in a row from an allocated page, each page once per run.
            let mut calls = Vec::new();
            for &(k, nr, len) in &runs {
                let h = heads[k % heads.len()];
                calls.extend((h..h + len as u64).take_while(|&q| a.order[q as usize] == 0).map(|q| (q, nr)));
            }
            // Each folio's count reaches zero on its last call, or stays above (`keep` 0).
            for &h in &heads {
                let total: i32 = calls.iter().filter(|c| c.0 == h).map(|c| c.1 as i32).sum();
                a.refcount[h as usize] = total + (keep[h as usize] == 0) as i32;
            }
            let mut b = a.clone();
            let (mut sa, mut sb) = (Stats::default(), Stats::default());
            let mut gather = new_gather().unwrap();
            for &(head, nr) in &calls {
                gather.push((head, nr));
            }
            tlb_finish(&mut Rmap { mem: &mut a, stats: &mut sa, profile: &p }, &mut gather);
            {
                let mut r = Rmap { mem: &mut b, stats: &mut sb, profile: &p };
                for &(head, nr) in &calls {
                    r.put_refs(head, nr as i32);
                }
            }
            proptest::prop_assert_eq!(&sa, &sb);
            proptest::prop_assert_eq!(a.free_blocks(), b.free_blocks());
            proptest::prop_assert_eq!(a.free_pages, b.free_pages);
            proptest::prop_assert_eq!((&a.order, &a.flags, &a.mapcount), (&b.order, &b.flags, &b.mapcount));
            proptest::prop_assert_eq!((&a.refcount, &a.token), (&b.refcount, &b.token));
        }
    }

    #[test]
    fn a_zap_of_more_folios_than_the_gather_holds_allocates_nothing() {
        // Every other page mapped: no two references merge, so the gather fills up and is
        // finished early, several times, within the room reserved up front.
        let l = X86_64;
        let p = KernelProfile::parse("6.18").unwrap();
        let n = 3 * GATHER_MAX + 5;
        let mut ptes: Vec<u64> = (0..n as u64)
            .map(|i| l.mk_pte(2 * i, PteBits { present: true, write: true, dirty: true, young: true, ..Default::default() }).unwrap())
            .collect();
        let mut arrays = Arrays::small(2 * n);
        let (mut st, mut rss) = (Stats::default(), [0i64; 3]);
        let mut gather = new_gather().unwrap();
        let room = gather.runs.capacity();
        let ctx = ZapCtx { start: 0, fullmm: false, mm_id: 1, zero_pfn: u64::MAX };
        {
            let mut counts = arrays.counts();
            let mut env = ZapEnv { ptes: &mut ptes, mem: &mut counts, stats: &mut st, rss: &mut rss, gather: &mut gather };
            zap_pte_range_arrays(&l, &p, &ctx, &mut env);
        }
        assert_eq!(gather.runs.capacity(), room);
        assert_eq!((st.refcount_atomics, st.folios_freed, st.rmap_calls), (n as u64, n as u64, n as u64));
        assert_eq!((st.pte_reads, st.pte_writes, st.batches, st.tlb_flush_pages), (n as u64, n as u64, n as u64, n as u64));
        assert_eq!(rss, [0, -(n as i64), 0]);
        assert!(ptes.iter().all(|&v| l.pte_none(v)));
        assert!((0..n).all(|i| arrays.order[2 * i] == FREE && arrays.order[2 * i + 1] == 0));
    }

    #[test]
    fn one_pte_at_a_time_in_bulk_equals_one_call_per_pte() {
        // folio_remove_ptes_one_by_one() against folio_remove_ptes() with one page per call,
        // on folios of order 3 in random (also inconsistent) states, with and without MM-ID slots.
        use crate::memory::{MM_ID_DUMMY, PG_PARTIALLY_MAPPED};
        use crate::rmap::{folio_remove_ptes, folio_remove_ptes_one_by_one};
        let mut rng = SplitMix64(11);
        let mut any_split = 0;
        for case in 0..4000 {
            let track = case % 2 == 0;
            let mut a = Arrays::small(8);
            a.order.fill(3);
            for m in &mut a.mapcount {
                *m = (rng.next_u64() % 4) as i32;
            }
            let mapped = a.mapcount.iter().filter(|&&m| m > 0).count() as i32;
            a.nr_pages_mapped[0] = mapped + (rng.next_u64() % 3) as i32 - 1;
            a.large_mapcount[0] = a.mapcount.iter().sum::<i32>() - 1;
            a.flags[0] = [PG_ANON, PG_ANON | PG_PARTIALLY_MAPPED, 0][(rng.next_u64() % 3) as usize];
            a.mm_id[..2].copy_from_slice(&[[1, 2], [1, MM_ID_DUMMY], [2, 1], [MM_ID_DUMMY, 2]][(rng.next_u64() % 4) as usize]);
            a.mm_id_mapcount[..2].copy_from_slice(&[(rng.next_u64() % 6) as i32 - 1, (rng.next_u64() % 6) as i32 - 1]);
            let pages: Vec<u64> = (0..1 + rng.next_u64() % 8).map(|_| rng.next_u64() % 8).collect();
            let mut b = a.clone();
            let mut split_a = 0;
            {
                let mut ca = a.counts();
                for &page in &pages {
                    split_a += folio_remove_ptes(&mut ca, track, 0, 3, page, 1, 1) as u32;
                }
            }
            let split_b = {
                let mut cb = b.counts();
                let mut last = 0;
                for &page in &pages {
                    let m = cb.mapcount_mut(page);
                    *m -= 1;
                    last += (*m == 0) as i32;
                }
                folio_remove_ptes_one_by_one(&mut cb, track, 0, pages.len() as u64, last, 1) as u32
            };
            assert_eq!(split_a, split_b, "case {case}");
            any_split += split_a;
            assert_eq!((&a.flags, &a.mapcount, &a.large_mapcount, &a.nr_pages_mapped), (&b.flags, &b.mapcount, &b.large_mapcount, &b.nr_pages_mapped), "case {case}");
            assert_eq!((&a.mm_id, &a.mm_id_mapcount), (&b.mm_id, &b.mm_id_mapcount), "case {case}");
        }
        assert!(any_split > 0);
    }
}

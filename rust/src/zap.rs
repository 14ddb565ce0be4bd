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
use crate::memory::{PG_ANON, PG_DIRTY};
use crate::mm::mm_counter;
use crate::pgtable;
use crate::rmap::{FolioCounts, Rmap};
use crate::sim::State;
use crate::stats::Stats;

/// Page references an mmu_gather holds until the TLB is flushed: (folio, count).
///
/// Like the kernel's batch of pages (`__tlb_remove_folio_pages()` forcing a flush when the
/// batch is full), it is bounded: every [`GATHER_MAX`] entries the references are dropped
/// early. The end state is the same as dropping them all at the end (freeing merges buddies
/// into the same blocks whatever the order, and a page still mapped is never freed), so only
/// the host memory an unmap of a huge range needs changes.
pub type Gather = Vec<(u64, u32)>;

/// Entries an mmu_gather holds before its references are dropped (16 bytes each).
pub const GATHER_MAX: usize = 1 << 16;

/// An empty gather with its whole room reserved up front, so that no zap allocates.
pub fn new_gather() -> crate::error::Result<Gather> {
    crate::alloc::try_with_capacity(GATHER_MAX, "an mmu_gather")
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

/// `zap_pte_range()` over entries `[i, e)` of one page table: each run of one folio
/// (`zap_present_ptes()`, batched by `folio_pte_batch()` where the kernel does) is cleared,
/// its rmap removed and its references queued in the gather.
pub fn zap_pte_range<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, mut i: usize, e: usize) {
    let cont = pgtable::cont_ptes(l, p);
    let mut cleared = false;
    while i < e {
        let pte = env.ptes[i];
        env.stats.pte_reads += 1;
        if l.pte_none(pte) {
            i += 1;
            continue;
        }
        cleared = true;
        let page = (!l.pte_special(pte)).then(|| l.pte_pfn(pte)).filter(|&pfn| pfn != ctx.zero_pfn);
        let Some(page) = page else {
            // No page (the zero page): clear the one entry.
            pgtable::clear_full_ptes(l, cont, env.ptes, ctx.start, i, 1, ctx.fullmm, env.stats);
            env.stats.tlb_flush_pages += 1;
            i += 1;
            continue;
        };
        let head = env.mem.folio_head(page);
        let order = env.mem.folio_order(head);
        let mut nr = 1usize;
        if let (true, true, Some(form)) = (order > 0, e - i != 1, p.fpb.filter(|_| p.zap_batched)) {
            // Dirty, soft-dirty, write and young never end a zap batch.
            let table = Table { ptes: env.ptes, first_vpn: ctx.start };
            let folio = Folio { pfn: head, nr_pages: 1 << order };
            nr = folio_pte_batch_unchecked(l, form, table, i, e - i, folio, FpbFlags::default()).nr;
            env.stats.folio_pte_batch_calls += 1;
            env.stats.pte_reads += nr as u64;
        }
        env.stats.batch(nr);
        zap_present_folio_ptes(l, p, ctx, env, i, nr, head, page);
        i += nr;
    }
    if cleared {
        env.stats.tlb_flush_ranges += 1;
    }
}

/// `zap_present_folio_ptes()`: file folios take the dirty bit of the cleared run
/// (`get_and_clear_full_ptes()`); anonymous ones do not need it (`clear_full_ptes()`).
#[allow(clippy::too_many_arguments)]
#[inline]
fn zap_present_folio_ptes<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &ZapCtx, env: &mut ZapEnv<'_, M>, i: usize, nr: usize, head: u64, page: u64) {
    let cont = pgtable::cont_ptes(l, p);
    if env.mem.test(head, PG_ANON) {
        pgtable::clear_full_ptes(l, cont, env.ptes, ctx.start, i, nr, ctx.fullmm, env.stats);
    } else {
        let pte = pgtable::get_and_clear_full_ptes(l, cont, env.ptes, ctx.start, i, nr, ctx.fullmm, env.stats);
        if l.pte_dirty(pte) {
            env.mem.set(head, PG_DIRTY);
        }
    }
    env.stats.tlb_flush_pages += nr as u64;
    env.rss[mm_counter(&*env.mem, head)] -= nr as i64;
    let mut r = Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p };
    r.remove_ptes(head, page, nr as u64, ctx.mm_id);
    if env.gather.len() == GATHER_MAX {
        tlb_finish(&mut r, env.gather);
    }
    env.gather.push((head, nr as u32));
}

/// `tlb_finish_mmu()`: the TLB is flushed, now the references go.
pub fn tlb_finish<M: FolioCounts>(r: &mut Rmap<'_, M>, gather: &mut Gather) {
    for (head, nr) in gather.drain(..) {
        r.put_refs(head, nr as i32);
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
    #[allow(clippy::too_many_arguments)]
    pub fn zap_vma_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, a: usize, b: usize, fullmm: bool, gather: &mut Gather) -> Result<()> {
        let start = self.mms[k].vmas[v].start;
        let ptrs = self.ptrs_per_pte as usize;
        let mut s = a;
        while s < b {
            let to_pmd = ptrs - ((start as usize + s) & (ptrs - 1));
            let e = b.min(s + to_pmd);
            if !self.zap_huge_pmd_range(l, p, k, v, s, e, gather) {
                self.zap_pte_range(l, p, k, v, s, e, fullmm, gather);
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

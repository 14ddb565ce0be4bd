//! Unmapping: `zap_pte_range()` → `zap_present_ptes()` → `zap_present_folio_ptes()` for
//! munmap, exit and MADV_DONTNEED (mm/memory.c; v6.8 per PTE, v6.9+ batched;
//! docs/simulation.md, "zap"). Page references are dropped only after the TLB
//! flush, when the mmu_gather is finished.

use crate::arch::PteLayout;
use crate::error::Result;
use crate::batch::{folio_pte_batch_unchecked, Folio, FpbFlags, Table};
use crate::kernel::KernelProfile;
use crate::memory::{PG_ANON, PG_DIRTY};
use crate::mm::mm_counter;
use crate::rmap::Rmap;
use crate::sim::State;

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

    /// `zap_pte_range()` over `[a, e)` of one page table.
    #[allow(clippy::too_many_arguments)]
    fn zap_pte_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, a: usize, e: usize, fullmm: bool, gather: &mut Gather) {
        let none = l.geometry().none_value;
        let mm_id = self.mms[k].mm_id;
        let start = self.mms[k].vmas[v].start;
        let mut rss = [0i64; 3];
        let mut cleared = false;
        let mut i = a;
        while i < e {
            let pte = self.mms[k].vmas[v].ptes[i];
            self.op.pte_reads += 1;
            if l.pte_none(pte) {
                i += 1;
                continue;
            }
            cleared = true;
            let Some(page) = self.vm_normal_page(l, pte) else {
                // No page (the zero page): clear the one entry.
                if !fullmm {
                    self.unfold(l, p, k, v, i);
                }
                self.mms[k].vmas[v].ptes[i] = none;
                self.op.pte_writes += 1;
                self.op.tlb_flush_pages += 1;
                i += 1;
                continue;
            };
            let head = self.mem.folio_head(page);
            let order = self.mem.folio_order(head);
            let mut nr = 1usize;
            if let (true, true, Some(form)) = (order > 0, e - i != 1, p.fpb.filter(|_| p.zap_batched)) {
                // Dirty, soft-dirty, write and young never end a zap batch.
                let table = Table { ptes: &self.mms[k].vmas[v].ptes, first_vpn: start };
                let folio = Folio { pfn: head, nr_pages: 1 << order };
                nr = folio_pte_batch_unchecked(l, form, table, i, e - i, folio, FpbFlags::default()).nr;
                self.op.folio_pte_batch_calls += 1;
                self.op.pte_reads += nr as u64;
            }
            self.op.batch(nr);
            // zap_present_folio_ptes(): file folios take the dirty bit of any cleared PTE
            // (get_and_clear_full_ptes); anonymous ones do not need it.
            let anon = self.mem.test(head, PG_ANON);
            // clear_full_ptes(): contpte blocks the run covers in part are unfolded first
            // (not when the whole mm goes, where arm64 skips it).
            if !fullmm {
                self.unfold_partial(l, p, k, v, i, nr);
            }
            let ptes = &mut self.mms[k].vmas[v].ptes[i..i + nr];
            let dirty = !anon && ptes.iter().any(|&x| l.pte_dirty(x));
            ptes.fill(none);
            self.op.pte_writes += nr as u64;
            self.op.tlb_flush_pages += nr as u64;
            if dirty {
                self.mem.set(head, PG_DIRTY);
            }
            let counter = mm_counter(&self.mem, head);
            rss[counter] -= nr as i64;
            Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p }.remove_ptes(head, page, nr as u64, mm_id);
            if gather.len() == GATHER_MAX {
                self.tlb_finish(l, p, gather);
            }
            gather.push((head, nr as u32));
            i += nr;
        }
        let mm = &mut self.mms[k];
        for c in 0..3 {
            mm.rss[c] += rss[c];
        }
        if cleared {
            self.op.tlb_flush_ranges += 1;
        }
    }

    /// `tlb_finish_mmu()`: the TLB is flushed, now the references go.
    pub fn tlb_finish<L: PteLayout>(&mut self, _l: &L, p: &KernelProfile, gather: &mut Gather) {
        let mut r = Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p };
        for (head, nr) in gather.drain(..) {
            r.put_refs(head, nr as i32);
        }
    }

    /// `munmap()` of `[a, b)` (vpns): VMAs split at the ends, zapped and removed.
    pub fn munmap<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64) -> Result<()> {
        let mut gather = new_gather()?;
        let room = self.mms[k].isolate_room(a, b)?;
        self.split_huge_pmd_at(l, p, k, a);
        self.split_huge_pmd_at(l, p, k, b);
        self.unfold_at_split(l, p, k, a);
        self.unfold_at_split(l, p, k, b);
        let r = self.mms[k].isolate(a, b, room);
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

//! arm64 transparent contiguous PTEs for user mappings (arch/arm64/mm/contpte.c, v6.9+;
//! contpte_set_ptes(), __contpte_try_fold(), contpte_convert()): which writes fold a naturally aligned block of
//! `CONT_PTES` entries into one TLB entry (PTE_CONT) and which unfold it, and the repaint both
//! do, which gives every entry of the block the young/dirty bits of all of them.
//!
//! The functions work on one VMA's page table (`t`, entry 0 mapping virtual page
//! `first_vpn`). A block is never folded across a VMA's edge; callers unfold a block before a
//! VMA is split inside it.

use crate::arch::PteLayout;
use crate::stats::Stats;

/// A VMA's page table as contpte sees it.
pub struct Cont<'a> {
    pub t: &'a mut [u64],
    pub first_vpn: u64,
    /// `CONT_PTES`.
    pub n: usize,
}

impl Cont<'_> {
    /// First entry of the block holding entry `i`, if the whole block lies in the table.
    fn block(&self, i: usize) -> Option<usize> {
        let off = ((self.first_vpn as usize).wrapping_add(i)) % self.n;
        let b = i.checked_sub(off)?;
        (b + self.n <= self.t.len()).then_some(b)
    }

    /// `contpte_convert()`: repaints the block at `b` with or without PTE_CONT, every entry
    /// taking the young and dirty bits of all of them (break-before-make, one TLB flush).
    fn convert<L: PteLayout>(&mut self, l: &L, b: usize, cont: bool, st: &mut Stats) {
        let mut base = l.clear_cont_bit(self.t[b]);
        for &e in &self.t[b..b + self.n] {
            if l.pte_dirty(e) {
                base = l.pte_mkdirty(base);
            }
            if l.pte_young(e) {
                base = l.pte_mkyoung(base);
            }
        }
        for k in 0..self.n {
            let v = l.pte_advance_pfn(base, k as u64);
            self.t[b + k] = if cont { l.set_cont_bit(v) } else { v };
        }
        st.pte_writes += self.n as u64;
        st.tlb_flush_ranges += 1;
        st.tlb_flush_pages += self.n as u64;
    }

    /// `contpte_try_unfold()`: if entry `i` is a valid contpte entry, unfolds its block.
    pub fn unfold<L: PteLayout>(&mut self, l: &L, i: usize, st: &mut Stats) {
        if l.pte_valid_cont(self.t[i]) {
            if let Some(b) = self.block(i) {
                self.convert(l, b, false, st);
            }
        }
    }

    /// `contpte_try_unfold_partial()`: unfolds the blocks that `[i, i + nr)` covers only in part.
    pub fn unfold_partial<L: PteLayout>(&mut self, l: &L, i: usize, nr: usize, st: &mut Stats) {
        if nr == 0 {
            return;
        }
        let first = self.first_vpn as usize;
        if (first + i) % self.n != 0 || nr < self.n {
            self.unfold(l, i, st);
        }
        if (first + i + nr) % self.n != 0 {
            self.unfold(l, i + nr - 1, st);
        }
    }

    /// `contpte_try_fold()`: after entry `i` was written, folds its block when `i` is the
    /// block's last entry, the block maps one aligned run of `n` pages of one large folio
    /// (`folio_of(pfn)` gives its first pfn and size) and all entries agree but for A/D.
    pub fn try_fold<L: PteLayout>(&mut self, l: &L, i: usize, folio_of: impl Fn(u64) -> Option<(u64, u64)>, st: &mut Stats) {
        let n = self.n;
        let v = self.t[i];
        if (self.first_vpn as usize + i) % n != n - 1 || !l.pte_valid(v) || l.pte_cont(v) || l.pte_special(v) {
            return;
        }
        let pfn = l.pte_pfn(v);
        if (pfn + 1) % n as u64 != 0 || i + 1 < n {
            return;
        }
        let b = i + 1 - n;
        let Some((head, nr)) = folio_of(pfn) else { return };
        let folio_va = (self.first_vpn + i as u64).wrapping_sub(pfn - head);
        let block_va = self.first_vpn + b as u64;
        if nr < n as u64 || folio_va > block_va || folio_va + nr < block_va + n as u64 {
            return;
        }
        let norm = |x: u64| l.pte_mkold(l.pte_mkclean(x));
        let base = norm(self.t[b]);
        if !l.pte_valid(self.t[b]) || l.pte_pfn(base) != pfn + 1 - n as u64 {
            return;
        }
        if (1..n).all(|k| norm(self.t[b + k]) == l.pte_advance_pfn(base, k as u64)) {
            self.convert(l, b, true, st);
        }
    }

    /// `set_ptes()` of `nr > 1` entries of a not-present range (`contpte_set_ptes()`): each
    /// whole block, aligned in virtual and physical address, gets PTE_CONT.
    pub fn set_ptes<L: PteLayout>(&mut self, l: &L, i: usize, pte: u64, nr: usize) {
        let n = self.n;
        let pte = l.clear_cont_bit(pte);
        let mut j = i;
        while j < i + nr {
            let vpn = self.first_vpn as usize + j;
            let next = (i + nr).min(j + n - vpn % n);
            let v0 = l.pte_advance_pfn(pte, (j - i) as u64);
            let full = next - j == n && vpn % n == 0 && l.pte_pfn(v0) % n as u64 == 0;
            for k in j..next {
                let v = l.pte_advance_pfn(pte, (k - i) as u64);
                self.t[k] = if full { l.set_cont_bit(v) } else { v };
            }
            j = next;
        }
    }

    /// `set_ptes()` of one entry (`set_pte_at()`): unfold what it overwrites, write, try to fold.
    pub fn set_pte<L: PteLayout>(&mut self, l: &L, i: usize, pte: u64, folio_of: impl Fn(u64) -> Option<(u64, u64)>, st: &mut Stats) {
        self.unfold(l, i, st);
        self.t[i] = l.clear_cont_bit(pte);
        self.try_fold(l, i, folio_of, st);
    }
}

use crate::kernel::KernelProfile;
use crate::pgtable;
use crate::sim::State;

impl State {
    /// `CONT_PTES` when the kernel folds user contpte blocks on this layout (arm64, v6.9+).
    pub fn cont_ptes<L: PteLayout>(l: &L, p: &KernelProfile) -> Option<usize> {
        pgtable::cont_ptes(l, p)
    }

    /// `ptep_get()`: on a contpte block, young and dirty of the whole block.
    pub fn ptep_get<L: PteLayout>(&self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize) -> u64 {
        let vma = &self.mms[k].vmas[v];
        pgtable::ptep_get(l, pgtable::cont_ptes(l, p), &vma.ptes, vma.start, i)
    }

    /// `set_pte_at()` / `set_ptes(.., 1)` of entry `i` of VMA `v`.
    pub fn set_pte<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize, pte: u64) {
        self.set_ptes(l, p, k, v, i, pte, 1);
    }

    /// `set_ptes()` of `nr` entries from `i` (pfn advancing by one).
    #[allow(clippy::too_many_arguments)]
    pub fn set_ptes<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize, pte: u64, nr: usize) {
        let State { mem, mms, op, .. } = self;
        let vma = &mut mms[k].vmas[v];
        let mem = &*mem;
        pgtable::set_ptes(l, pgtable::cont_ptes(l, p), &mut vma.ptes[..], vma.start, i, pte, nr, |pfn| pgtable::folio_of(mem, pfn), op);
    }

    /// Unfolds the contpte block holding entry `i`, if any (`contpte_try_unfold()`).
    pub fn unfold<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize) {
        if let Some(n) = Self::cont_ptes(l, p) {
            let vma = &mut self.mms[k].vmas[v];
            Cont { t: &mut vma.ptes, first_vpn: vma.start, n }.unfold(l, i, &mut self.op);
        }
    }

    /// Unfolds the blocks `[i, i + nr)` covers in part; `nr == 1` unfolds the entry's block.
    pub fn unfold_partial<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize, nr: usize) {
        if let Some(n) = Self::cont_ptes(l, p) {
            let vma = &mut self.mms[k].vmas[v];
            let mut c = Cont { t: &mut vma.ptes, first_vpn: vma.start, n };
            if nr == 1 {
                c.unfold(l, i, &mut self.op);
            } else {
                c.unfold_partial(l, i, nr, &mut self.op);
            }
        }
    }

    /// `contpte_try_fold()` after entry `i` was written by something other than `set_pte`.
    pub fn try_fold<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize) {
        if let Some(n) = Self::cont_ptes(l, p) {
            let mem = &self.mem;
            let vma = &mut self.mms[k].vmas[v];
            Cont { t: &mut vma.ptes, first_vpn: vma.start, n }.try_fold(l, i, |pfn| pgtable::folio_of(mem, pfn), &mut self.op);
        }
    }

    /// Before a VMA is split at `vpn`, the block the split would cut is unfolded (as the
    /// zap or protection change that comes with the split does in the kernel).
    pub fn unfold_at_split<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, vpn: u64) {
        if let (Some(n), Some(v)) = (Self::cont_ptes(l, p), self.mms[k].find_vma(vpn)) {
            if vpn % n as u64 != 0 {
                let i = (vpn - self.mms[k].vmas[v].start) as usize;
                self.unfold(l, p, k, v, i);
            }
        }
    }
}

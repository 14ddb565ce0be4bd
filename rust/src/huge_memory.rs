//! PMD-mapped THP (mm/huge_memory.c): the huge PMD fault and the huge zero page, the write
//! fault on a huge PMD, `copy_huge_pmd` at fork, `zap_huge_pmd`, `change_huge_pmd` and
//! `__split_huge_pmd` into PTEs of the same folio; with the PMD-level rmap accounting of
//! mm/rmap.c and include/linux/rmap.h (v6.8 – v7.0; docs/simulation.md, "PMD-mapped THP").
//!
//! A VMA keeps its huge PMDs in [`crate::mm::Vma::pmds`], keyed by the first vpn of the
//! PMD-aligned range, each encoded as a PTE of the layout (so the PTE accessors read it);
//! the PTEs of that range stay none. The huge zero page is a PMD of the zero pfn, special
//! and read-only, which no counter tracks (as the small zero page).

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::{KernelProfile, KernelVersion};
use crate::memory::{PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_PARTIALLY_MAPPED, PG_SWAPBACKED};
use crate::mm::{mm_counter, Vma, MM_ANONPAGES};
use crate::rmap::Rmap;
use crate::sim::State;
use crate::zap::{Gather, GATHER_MAX};

fn at_least(p: &KernelProfile, major: u16, minor: u16) -> bool {
    match p.version {
        KernelVersion::Seed => false,
        KernelVersion::Release { major: a, minor: b } => (a, b) >= (major, minor),
    }
}

/// A write fault on the huge zero PMD allocates a PMD THP (`do_huge_zero_wp_pmd()`, v6.13);
/// before, the PMD is split into zero-page PTEs and the PTE fault copies one page.
pub fn huge_zero_wp_allocates(p: &KernelProfile) -> bool {
    at_least(p, 6, 13)
}

/// How pagemap decides PM_MMAP_EXCLUSIVE for the pages of a huge PMD (fs/proc/task_mmu.c
/// `pagemap_pmd_range()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PmdPagemapExclusive {
    /// `page_mapcount(head) == 1` for every page (≤ v6.10); again the head's
    /// `folio_precise_page_mapcount()` from v6.15 (`__folio_page_mapped_exclusively(folio, page)`).
    Head,
    /// `page_mapcount(page + idx) == 1` per page (v6.11 – v6.14, "properly detect
    /// PM_MMAP_EXCLUSIVE per page of PMD-mapped THPs").
    PerPage,
    /// `!folio_maybe_mapped_shared()` (the newest tree, without CONFIG_PAGE_MAPCOUNT).
    Folio,
}

pub fn pmd_pagemap_exclusive(p: &KernelProfile) -> PmdPagemapExclusive {
    if p.pagemap_exclusive_by_folio {
        PmdPagemapExclusive::Folio
    } else if at_least(p, 6, 15) || !at_least(p, 6, 11) {
        PmdPagemapExclusive::Head
    } else {
        PmdPagemapExclusive::PerPage
    }
}

impl Rmap<'_> {
    /// `folio_add_new_anon_rmap(folio, vma, addr, RMAP_EXCLUSIVE)` of a PMD-mappable folio
    /// (mm/rmap.c): `_entire_mapcount` 0, large mapcount 1 (MM-ID slot 0), ENTIRELY_MAPPED
    /// (here: entire mapcount ≥ 0 with no PTE-mapped page), PageAnonExclusive on the head only.
    pub fn add_new_anon_pmd(&mut self, head: u64, mm_id: u32) {
        self.stats.rmap_calls += 1;
        self.mem.set(head, PG_ANON | PG_SWAPBACKED | PG_ANON_EXCLUSIVE);
        let track = self.profile.mm_id;
        let lf = self.mem.lf(head);
        lf.entire_mapcount = 0;
        lf.large_mapcount = 0;
        lf.nr_pages_mapped = 0;
        if track {
            lf.mm_id[0] = mm_id;
            lf.mm_id_mapcount[0] = 0;
        }
        self.stats.mapcount_updates += 2;
    }

    /// `folio_try_dup_anon_rmap_pmd()` (include/linux/rmap.h): fails when the source mm may
    /// have pinned the folio and the head is exclusive; else clears the head's exclusivity and
    /// adds one entire (and one large) mapping.
    pub fn try_dup_anon_pmd(&mut self, head: u64, dst_mm: u32, src_has_pinned: bool) -> bool {
        self.stats.rmap_calls += 1;
        if self.mem.test(head, PG_ANON_EXCLUSIVE) {
            if src_has_pinned && self.mem.folio_maybe_dma_pinned(head) {
                return false;
            }
            self.mem.clear(head, PG_ANON_EXCLUSIVE);
        }
        self.mem.lf(head).entire_mapcount += 1;
        self.stats.mapcount_updates += 1;
        self.add_large_mapcount(head, 1, dst_mm);
        true
    }

    /// `folio_remove_rmap_pmd()` → `__folio_remove_rmap(RMAP_LEVEL_PMD)`: when the last
    /// entire mapping goes and some, not all, pages stay PTE-mapped, an anonymous folio is
    /// queued for deferred split.
    pub fn remove_pmd(&mut self, head: u64, mm_id: u32) {
        self.stats.rmap_calls += 1;
        self.sub_large_mapcount(head, 1, mm_id);
        self.stats.mapcount_updates += 1;
        let nr_pages = 1i32 << self.mem.folio_order(head);
        let lf = self.mem.lf(head);
        lf.entire_mapcount -= 1;
        if lf.entire_mapcount >= 0 {
            return;
        }
        // nr = pages not also PTE-mapped; partially mapped when 0 < nr < the folio's pages.
        let nr = nr_pages - lf.nr_pages_mapped;
        if nr > 0 && nr < nr_pages && self.mem.test(head, PG_ANON) && !self.mem.test(head, PG_PARTIALLY_MAPPED) {
            self.mem.set(head, PG_PARTIALLY_MAPPED);
            self.stats.deferred_splits += 1;
        }
    }
}

impl State {
    /// The first vpn of the PMD range holding `vpn`.
    #[inline]
    pub fn pmd_base(&self, vpn: u64) -> u64 {
        vpn & !(self.ptrs_per_pte - 1)
    }

    /// The huge PMD mapping `vpn` in VMA `v` of process `k`, with its range's first vpn.
    #[inline]
    pub fn huge_pmd(&self, k: usize, v: usize, vpn: u64) -> Option<(u64, u64)> {
        let vma = &self.mms[k].vmas[v];
        if vma.pmds.is_empty() {
            return None;
        }
        let base = self.pmd_base(vpn);
        vma.pmds.get(&base).map(|&e| (base, e))
    }

    /// The page a huge PMD maps at `vpn`: `Some(None)` for the huge zero page, `None` when no
    /// huge PMD maps `vpn`.
    pub fn huge_pmd_page<L: PteLayout>(&self, l: &L, k: usize, v: usize, vpn: u64) -> Option<Option<u64>> {
        let (base, e) = self.huge_pmd(k, v, vpn)?;
        let pfn = l.pte_pfn(e);
        Some((pfn != self.zero_pfn).then_some(pfn + (vpn - base)))
    }

    /// The PMD a fault maps for `page` (`mk_huge_pmd(page, vma->vm_page_prot)`), made dirty,
    /// and writable where the VMA is (`maybe_pmd_mkwrite(pmd_mkdirty())`, `map_anon_folio_pmd()`).
    fn fault_pmd<L: PteLayout>(&self, l: &L, vma: &Vma, head: u64) -> u64 {
        let mut e = l.pte_mkdirty(l.pfn_pte_template(head, vma.prot.exec, vma.prot.none()));
        if vma.prot.write {
            e = l.pte_mkwrite(e);
        }
        e
    }

    /// `do_huge_pmd_anonymous_page()` (mm/huge_memory.c): maps the aligned PMD range holding
    /// `vpn` with one PMD when it lies in the VMA and its page table is empty: the huge zero
    /// page on a read fault (`use_zero_page`, on by default), else a new PMD-sized folio.
    /// Returns false (VM_FAULT_FALLBACK) where the PTE fault path must handle it.
    pub fn do_huge_pmd_anonymous_page<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool) -> Result<bool> {
        let n = self.ptrs_per_pte;
        let base = self.pmd_base(vpn);
        let vma = &self.mms[k].vmas[v];
        // thp_vma_suitable_order() and pmd_none(); uffd-wp registered VMAs stay PTE-mapped in
        // the model (see docs/simulation.md).
        if !vma.is_anon() || vma.uffd_wp || base < vma.start || base + n > vma.end() || vma.pmds.contains_key(&base) {
            return Ok(false);
        }
        let s = (base - vma.start) as usize;
        if !vma.ptes[s..s + n as usize].iter().all(|&e| l.pte_none(e)) {
            return Ok(false);
        }
        self.ensure_anon_vma(k, v);
        if !write {
            // mm_get_huge_zero_folio(), set_huge_zero_folio(): special, read-only.
            let vma = &self.mms[k].vmas[v];
            let e = l.pte_mkspecial(l.pfn_pte_template(self.zero_pfn, vma.prot.exec, vma.prot.none()));
            self.mms[k].vmas[v].pmds.insert(base, e);
            return Ok(true);
        }
        let Some(head) = self.alloc_pmd_folio() else { return Ok(false) };
        let mm_id = self.mms[k].mm_id;
        self.rmap(p).add_new_anon_pmd(head, mm_id);
        let mm = &mut self.mms[k];
        mm.rss[MM_ANONPAGES] += n as i64;
        let e = self.fault_pmd(l, &self.mms[k].vmas[v], head);
        self.mms[k].vmas[v].pmds.insert(base, e);
        Ok(true)
    }

    /// `vma_alloc_anon_folio_pmd()`: a PMD-sized folio, or None where memory (or the simulated
    /// fragmentation) has none.
    fn alloc_pmd_folio(&mut self) -> Option<u64> {
        let order = self.pmd_order;
        if self.mem.fragmented(order) {
            return None;
        }
        let head = self.mem.alloc(order)?;
        self.op.allocated(order);
        Some(head)
    }

    /// An access of process `k` to `vpn` under a huge PMD: `do_huge_pmd_wp_page()` for a write
    /// to a read-only PMD, then the MMU's accessed/dirty update on the PMD and, for a write,
    /// a new token in the page. Returns false where no huge PMD maps `vpn` (any more).
    pub fn huge_pmd_access<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool) -> Result<bool> {
        let Some((base, e)) = self.huge_pmd(k, v, vpn) else { return Ok(false) };
        self.op.pte_reads += 1;
        if write && !l.pte_write(e) && !self.do_huge_pmd_wp_page(l, p, k, v, base, false)? {
            return Ok(false);
        }
        let slot = self.mms[k].vmas[v].pmds.get_mut(&base).expect("still PMD-mapped");
        let mut e = *slot;
        if !l.pte_young(e) {
            e = l.pte_mkyoung(e);
        }
        if write && !l.pte_dirty(e) {
            e = l.pte_mkdirty(e);
        }
        *slot = e;
        if write {
            let t = self.new_token();
            self.mem.token[(l.pte_pfn(e) + (vpn - base)) as usize] = t;
        }
        Ok(true)
    }

    /// `do_huge_pmd_wp_page()`: a write (or GUP unshare) on a read-only huge PMD. The huge
    /// zero page gets a new PMD THP from v6.13 (`do_huge_zero_wp_pmd()`); an exclusive head,
    /// or a folio whose only reference is this PMD, is reused; anything else is split, and
    /// the fault falls back to the PTEs (returns false).
    pub fn do_huge_pmd_wp_page<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, base: u64, unshare: bool) -> Result<bool> {
        self.op.faults += 1;
        let e = self.mms[k].vmas[v].pmds[&base];
        let pfn = l.pte_pfn(e);
        if pfn == self.zero_pfn {
            if huge_zero_wp_allocates(p) {
                if let Some(head) = self.alloc_pmd_folio() {
                    let mm_id = self.mms[k].mm_id;
                    self.rmap(p).add_new_anon_pmd(head, mm_id);
                    self.mms[k].rss[MM_ANONPAGES] += self.ptrs_per_pte as i64;
                    // pmdp_huge_clear_flush() of the zero PMD, then map_anon_folio_pmd().
                    self.op.tlb_flush_ranges += 1;
                    let n = self.fault_pmd(l, &self.mms[k].vmas[v], head);
                    self.mms[k].vmas[v].pmds.insert(base, n);
                    return Ok(true);
                }
            }
            self.split_huge_pmd(l, p, k, v, base);
            return Ok(false);
        }
        let head = pfn;
        if self.mem.test(head, PG_ANON_EXCLUSIVE) || self.mem.refcount[head as usize] == 1 {
            self.mem.set(head, PG_ANON_EXCLUSIVE);
            self.op.cow_reuses += 1;
            if unshare {
                return Ok(true);
            }
            let mut n = l.pte_mkdirty(l.pte_mkyoung(e));
            if self.mms[k].vmas[v].prot.write {
                n = l.pte_mkwrite(n);
            }
            self.mms[k].vmas[v].pmds.insert(base, n);
            return Ok(true);
        }
        self.split_huge_pmd(l, p, k, v, base);
        Ok(false)
    }

    /// `__split_huge_pmd()` → `__split_huge_pmd_locked()` of the huge PMD at `base`: the
    /// same folio mapped by PTEs carrying the PMD's write, young, dirty, soft-dirty and uffd-wp
    /// bits (the folio takes the dirty bit); each PTE holds its own reference; the head's
    /// PageAnonExclusive moves to every page (`folio_add_anon_rmap_ptes(RMAP_EXCLUSIVE)`),
    /// then the entire mapping goes (`folio_remove_rmap_pmd()`). A huge zero PMD becomes PTEs
    /// of the small zero page (`__split_huge_zero_page_pmd()`).
    pub fn split_huge_pmd<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, base: u64) {
        let nr = self.ptrs_per_pte;
        let e = self.mms[k].vmas[v].pmds.remove(&base).expect("a huge PMD to split");
        self.op.pmd_splits += 1;
        // pmdp_invalidate() flushes the PMD's TLB entry.
        self.op.tlb_flush_ranges += 1;
        let vma = &self.mms[k].vmas[v];
        let i = (base - vma.start) as usize;
        let prot = vma.prot;
        let pfn = l.pte_pfn(e);
        if pfn == self.zero_pfn {
            let mut z = l.pte_mkspecial(l.pfn_pte_template(self.zero_pfn, prot.exec, prot.none()));
            if l.pte_uffd_wp(e) {
                z = l.set_uffd_wp_bit(z);
            }
            for j in 0..nr as usize {
                self.set_pte(l, p, k, v, i + j, z);
            }
            return;
        }
        let head = pfn;
        if l.pte_dirty(e) {
            self.mem.set(head, PG_DIRTY);
        }
        let exclusive = self.mem.test(head, PG_ANON_EXCLUSIVE);
        let mm_id = self.mms[k].mm_id;
        {
            let mut r = self.rmap(p);
            r.ref_add(head, nr as i32 - 1);
            r.add_anon_ptes(head, head, nr, mm_id, exclusive);
        }
        // mk_pte(page + i, vm_page_prot), then the PMD's bits in the kernel's order.
        let mut t = l.pfn_pte_template(head, prot.exec, prot.none());
        if l.pte_write(e) {
            t = l.pte_mkwrite(t);
        }
        if !l.pte_young(e) {
            t = l.pte_mkold(t);
        }
        if l.pte_dirty(e) {
            t = l.pte_mkdirty(t);
        }
        if l.pte_soft_dirty(e) {
            t = l.pte_mksoft_dirty(t);
        }
        if l.pte_uffd_wp(e) {
            t = l.set_uffd_wp_bit(t);
        }
        self.set_ptes(l, p, k, v, i, t, nr as usize);
        self.rmap(p).remove_pmd(head, mm_id);
    }

    /// `split_huge_pmd_address()` from `vma_adjust_trans_huge()`: a VMA split at `vpn` (not
    /// PMD-aligned) splits the huge PMD that straddles it first.
    pub fn split_huge_pmd_at<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, vpn: u64) {
        let base = self.pmd_base(vpn);
        if base == vpn {
            return;
        }
        if let Some(v) = self.mms[k].find_vma(vpn) {
            if self.mms[k].vmas[v].pmds.contains_key(&base) {
                self.split_huge_pmd(l, p, k, v, base);
            }
        }
    }

    /// `copy_huge_pmd()` for every huge PMD of the parent's VMA `vi` into the child's `dst`:
    /// the child's PMD is the parent's made old and read-only (uffd-wp only where the child
    /// VMA keeps it), the parent's is write-protected. Where `folio_try_dup_anon_rmap_pmd()`
    /// fails (maybe pinned) the parent's PMD is split and its PTEs are copied by
    /// `copy_pte_range()` afterwards, which handles the pinned pages (-EAGAIN in the kernel).
    #[allow(clippy::too_many_arguments)]
    pub fn copy_huge_pmds<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, vi: usize, dst_mm_id: u32, has_pinned: bool, dst: &mut Vma, rss: &mut [i64; 3]) {
        if self.mms[k].vmas[vi].pmds.is_empty() {
            return;
        }
        let nr = self.ptrs_per_pte;
        let bases: Vec<u64> = self.mms[k].vmas[vi].pmds.keys().copied().collect();
        for base in bases {
            let e = self.mms[k].vmas[vi].pmds[&base];
            let pfn = l.pte_pfn(e);
            if pfn != self.zero_pfn {
                let mut r = self.rmap(p);
                r.ref_add(pfn, 1);
                if !r.try_dup_anon_pmd(pfn, dst_mm_id, has_pinned) {
                    r.put_refs(pfn, 1);
                    self.split_huge_pmd(l, p, k, vi, base);
                    continue;
                }
                rss[mm_counter(&self.mem, pfn)] += nr as i64;
            }
            self.op.pmd_copies += 1;
            // pmdp_set_wrprotect() on the parent.
            self.mms[k].vmas[vi].pmds.insert(base, l.pte_wrprotect(e));
            let mut c = e;
            if !dst.uffd_wp {
                c = l.clear_uffd_wp_bit(c);
            }
            dst.pmds.insert(base, l.pte_mkold(l.pte_wrprotect(c)));
        }
    }

    /// `zap_pmd_range()` for entries `[s, e)` of VMA `v` (one page table's worth): a huge
    /// PMD covered whole is zapped (`zap_huge_pmd()`, returns true); one covered in part is
    /// split first, and the PTE zap does the rest (returns false).
    #[allow(clippy::too_many_arguments)]
    pub fn zap_huge_pmd_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, s: usize, e: usize, gather: &mut Gather) -> bool {
        let vpn = self.mms[k].vmas[v].start + s as u64;
        let Some((base, pmd)) = self.huge_pmd(k, v, vpn) else { return false };
        let nr = self.ptrs_per_pte;
        if vpn != base || (e - s) as u64 != nr {
            self.split_huge_pmd(l, p, k, v, base);
            return false;
        }
        self.mms[k].vmas[v].pmds.remove(&base);
        self.op.pmd_zaps += 1;
        self.op.tlb_flush_ranges += 1;
        self.op.tlb_flush_pages += nr;
        let pfn = l.pte_pfn(pmd);
        if pfn == self.zero_pfn {
            return true;
        }
        let mm_id = self.mms[k].mm_id;
        self.rmap(p).remove_pmd(pfn, mm_id);
        let c = mm_counter(&self.mem, pfn);
        self.mms[k].rss[c] -= nr as i64;
        if gather.len() == GATHER_MAX {
            self.tlb_finish(l, p, gather);
        }
        // tlb_remove_page_size(): the PMD's one reference goes after the flush.
        gather.push((pfn, 1));
        true
    }

    /// `change_pmd_range()` for entries `[s, e)` of VMA `v`: a huge PMD covered whole takes the
    /// new protection (`change_huge_pmd()`, returns true); one covered in part is split and
    /// the PTE path changes its entries (returns false).
    #[allow(clippy::too_many_arguments)]
    pub fn change_huge_pmd_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, s: usize, e: usize, uffd: Option<bool>) -> bool {
        let vpn = self.mms[k].vmas[v].start + s as u64;
        let Some((base, old)) = self.huge_pmd(k, v, vpn) else { return false };
        if vpn != base || (e - s) as u64 != self.ptrs_per_pte {
            self.split_huge_pmd(l, p, k, v, base);
            return false;
        }
        let vma = &self.mms[k].vmas[v];
        let page_prot_write = self.page_prot_write(l, vma);
        let try_writable = uffd != Some(true) && if vma.shared { self.wants_writenotify(l, vma) } else { vma.prot.write };
        // pmd_modify(): new permissions, the rest carried over.
        let mut n = crate::mprotect::pte_modify(l, old, vma.prot, page_prot_write);
        match uffd {
            Some(true) => n = l.set_uffd_wp_bit(l.pte_wrprotect(n)),
            Some(false) => n = l.clear_uffd_wp_bit(n),
            None => {}
        }
        if try_writable && !l.pte_write(n) {
            let page = Some(l.pte_pfn(n)).filter(|&f| f != self.zero_pfn);
            // can_change_pmd_writable(): as for PTEs, with the head page's exclusivity.
            if self.can_change_pte_writable(l, vma, n, page) {
                n = l.pte_mkwrite(n);
            }
        }
        self.mms[k].vmas[v].pmds.insert(base, n);
        self.op.tlb_flush_ranges += 1;
        true
    }

    /// `clear_soft_dirty_pmd()` (fs/proc/task_mmu.c): write-protected and soft-dirty cleared.
    pub fn clear_soft_dirty_pmds<L: PteLayout>(&mut self, l: &L, k: usize) {
        let mut writes = 0;
        for vma in &mut self.mms[k].vmas {
            for e in vma.pmds.values_mut() {
                *e = l.pte_clear_soft_dirty(l.pte_wrprotect(*e));
                writes += 1;
            }
        }
        self.op.pte_writes += writes;
    }

    /// GUP on a huge PMD (`follow_huge_pmd()`, mm/gup.c): a FOLL_WRITE pin of a read-only PMD
    /// breaks COW, a R/O pin that `gup_must_unshare()` (judged on the head page) unshares,
    /// both through `do_huge_pmd_wp_page()`. Returns the pinned pfn, or None where no huge
    /// PMD maps `vpn` (any more: the PTE path goes on).
    #[allow(clippy::too_many_arguments)]
    pub fn gup_huge_pmd<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool, longterm: bool) -> Result<Option<u64>> {
        let Some((base, e)) = self.huge_pmd(k, v, vpn) else { return Ok(None) };
        let pfn = l.pte_pfn(e);
        if write && !l.pte_write(e) {
            if !self.do_huge_pmd_wp_page(l, p, k, v, base, false)? {
                return Ok(None);
            }
        } else if !write && !l.pte_write(e) {
            let must_unshare = if pfn == self.zero_pfn {
                longterm && self.mms[k].vmas[v].is_cow()
            } else {
                !self.mem.test(pfn, PG_ANON_EXCLUSIVE)
            };
            if must_unshare && !self.do_huge_pmd_wp_page(l, p, k, v, base, true)? {
                return Ok(None);
            }
        }
        // The model's huge zero page is the one zero pfn for all its pages.
        let pfn = l.pte_pfn(self.mms[k].vmas[v].pmds[&base]);
        Ok(Some(if pfn == self.zero_pfn { pfn } else { pfn + (vpn - base) }))
    }

    /// Rebuilding captured memory: puts a huge PMD of process `k`'s VMA `v` at `base` mapping
    /// the PMD-sized anonymous folio at `head` (or the huge zero page).
    pub fn place_huge_pmd<L: PteLayout>(&mut self, l: &L, k: usize, v: usize, base: u64, head: u64, e: u64) -> Result<()> {
        let n = self.ptrs_per_pte;
        let vma = &self.mms[k].vmas[v];
        if base % n != 0 || base < vma.start || base + n > vma.end() {
            return Err(Error::value(format!(
                "a huge PMD at {:#x} must be PMD-aligned and lie whole in a mapping",
                base << self.page_shift
            )));
        }
        if !vma.is_anon() {
            return Err(Error::value("huge PMDs are modelled in private anonymous mappings only"));
        }
        let s = (base - vma.start) as usize;
        if vma.pmds.contains_key(&base) || !vma.ptes[s..s + n as usize].iter().all(|&x| l.pte_none(x)) {
            return Err(Error::value(format!("the PMD range at {:#x} is already mapped", base << self.page_shift)));
        }
        if head != self.zero_pfn {
            let ok = head < self.mem.nr_pages()
                && !self.mem.is_free(head)
                && self.mem.folio_head(head) == head
                && self.mem.folio_order(head) == self.pmd_order
                && self.mem.test(head, PG_ANON);
            if !ok {
                return Err(Error::value(format!("pfn {head:#x} is not the first page of a placed PMD-sized anonymous folio")));
            }
        }
        self.mms[k].vmas[v].pmds.insert(base, e);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::arch::{Layout, PteLayout};
    use crate::kernel::KernelProfile;
    use crate::memory::{PG_ANON_EXCLUSIVE, PG_PARTIALLY_MAPPED};
    use crate::mm::Prot;
    use crate::sim::Simulation;
    use crate::with_layout;

    const PMD: u64 = 2 << 20;

    fn setup(kernel: &str, write: bool) -> (Simulation, u32, u64) {
        let layout = Layout::by_name("x86-64", None).unwrap();
        let mut s = Simulation::new(layout, KernelProfile::parse(kernel).unwrap(), 16 << 20, 1).unwrap();
        let p = s.spawn();
        let rw = Prot { read: true, write: true, exec: false };
        let a = s.mmap(p, None, 2 * PMD, rw, false, None, Some(&[]), false, false, true).unwrap();
        s.touch(p, a, 2 * PMD, write).unwrap();
        check(&s);
        (s, p, a)
    }

    fn check(s: &Simulation) {
        with_layout!(&s.layout, l => s.st.check(l, &s.profile)).unwrap();
    }

    fn head(s: &Simulation, pid: u32, addr: u64) -> u64 {
        let (k, v) = s.vma_index(pid, addr).unwrap();
        let e = *s.st.mms[k].vmas[v].pmds.values().next().unwrap();
        with_layout!(&s.layout, l => l.pte_pfn(e))
    }

    #[test]
    fn fault_fork_write_split_and_zap_keep_the_kernels_accounting() {
        let (mut s, p, a) = setup("6.18", true);
        let h = head(&s, p, a);
        let lf = *s.st.mem.large_folio(h).unwrap();
        assert_eq!((lf.entire_mapcount, lf.large_mapcount, lf.nr_pages_mapped), (0, 0, 0));
        assert!(s.st.mem.test(h, PG_ANON_EXCLUSIVE) && !s.st.mem.test(h + 1, PG_ANON_EXCLUSIVE));
        let c = s.fork(p).unwrap();
        check(&s);
        assert_eq!(s.st.op.pmd_copies, 2);
        assert_eq!(s.st.mem.large_folio(h).unwrap().entire_mapcount, 1);
        s.write(c, a + 5 * 4096).unwrap();
        check(&s);
        assert_eq!((s.st.op.pmd_splits, s.st.op.cow_copies), (1, 1));
        let lf = *s.st.mem.large_folio(h).unwrap();
        assert_eq!((lf.entire_mapcount, lf.nr_pages_mapped, lf.large_mapcount), (0, 511, 511));
        assert_eq!(s.st.kpagecount(h + 6).unwrap(), 2);
        s.exit(c).unwrap();
        check(&s);
        // A partial munmap splits the parent's PMD and queues the folio for deferred split.
        s.munmap(p, a + 8 * 4096, 4096).unwrap();
        check(&s);
        assert_eq!((s.st.op.pmd_splits, s.st.op.deferred_splits), (1, 1));
        assert!(s.st.mem.test(h, PG_PARTIALLY_MAPPED));
        s.madvise(p, a + PMD, PMD, "dontneed").unwrap();
        check(&s);
        assert_eq!(s.st.op.pmd_zaps, 1);
        s.exit(p).unwrap();
        check(&s);
        assert_eq!(s.st.mem.free_pages, s.st.mem.nr_pages());
    }

    #[test]
    fn write_to_the_huge_zero_page_per_version() {
        for (kernel, splits, anon) in [("6.12", 1, 1), ("6.13", 0, 512)] {
            let (mut s, p, a) = setup(kernel, false);
            assert_eq!(head(&s, p, a), s.st.zero_pfn);
            s.write(p, a + 3 * 4096).unwrap();
            check(&s);
            assert_eq!((s.st.op.pmd_splits, s.st.mms[0].rss[crate::mm::MM_ANONPAGES]), (splits, anon), "{kernel}");
        }
    }
}

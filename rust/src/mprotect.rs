//! mprotect(): `change_protection()` → `change_pte_range()` (mm/mprotect.c). Per PTE up to
//! v6.16; from v6.17 runs of one large folio at once ("mm: optimize mprotect() by PTE
//! batching"), which reads the run's young and dirty bits into one template
//! (`modify_prot_start_ptes()`) and so may mark clean PTEs of the run dirty.

use crate::error::Result;
use crate::arch::PteLayout;
use crate::batch::{folio_pte_batch_unchecked, Folio, FpbFlags, Table};
use crate::kernel::KernelProfile;
use crate::memory::{PG_ANON, PG_ANON_EXCLUSIVE};
use crate::mm::{Prot, Vma};
use crate::sim::State;

/// `pte_modify(pte, newprot)`: new permissions; pfn, dirty, young, soft-dirty, uffd-wp and
/// special carried over.
pub fn pte_modify<L: PteLayout>(l: &L, old: u64, prot: Prot, page_prot_write: bool) -> u64 {
    let mut n = l.pfn_pte_template(l.pte_pfn(old), prot.exec, prot.none());
    if page_prot_write && !prot.none() {
        n = l.pte_mkwrite(n);
    }
    if l.pte_dirty(old) {
        n = l.pte_mkdirty(n);
    }
    n = if l.pte_young(old) { l.pte_mkyoung(n) } else { l.pte_mkold(n) };
    n = if l.pte_soft_dirty(old) { l.pte_mksoft_dirty(n) } else { l.pte_clear_soft_dirty(n) };
    if l.pte_uffd_wp(old) {
        n = l.set_uffd_wp_bit(n);
    }
    if l.pte_special(old) {
        n = l.pte_mkspecial(n);
    }
    n
}

impl State {
    /// `mprotect()` of `[a, b)` (vpns, entirely mapped).
    pub fn mprotect<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64, prot: Prot) -> Result<()> {
        self.split_huge_pmd_at(l, p, k, a);
        self.split_huge_pmd_at(l, p, k, b);
        self.unfold_at_split(l, p, k, a);
        self.unfold_at_split(l, p, k, b);
        // mprotect_fixup(): split and merge the VMAs first, then change_protection() the range.
        self.mms[k].modify(p, a, b, |v| v.prot = prot);
        self.change_range(l, p, k, a, b, None)
    }

    /// `change_protection()` over `[a, b)` (vpns) across the VMAs there.
    fn change_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64, uffd: Option<bool>) -> Result<()> {
        for v in 0..self.mms[k].vmas.len() {
            let vma = &self.mms[k].vmas[v];
            let (s, e) = (vma.start.max(a), vma.end().min(b));
            if s < e {
                let (ia, ib) = ((s - vma.start) as usize, (e - vma.start) as usize);
                self.change_protection(l, p, k, v, ia, ib, uffd)?;
            }
        }
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT` (`mwriteprotect_range()`, mm/userfaultfd.c): `change_protection()`
    /// with MM_CP_UFFD_WP (set the bit, write-protect) or MM_CP_UFFD_WP_RESOLVE (clear it, and
    /// let `can_change_pte_writable()` restore write access). VMAs are not split.
    pub fn uffd_writeprotect<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64, enable: bool) -> Result<()> {
        self.change_range(l, p, k, a, b, Some(enable))
    }

    /// `can_change_pte_writable()`.
    pub(crate) fn can_change_pte_writable<L: PteLayout>(&self, l: &L, vma: &Vma, pte: u64, page: Option<u64>) -> bool {
        if !vma.prot.write || l.pte_protnone(pte) {
            return false;
        }
        if vma.soft_dirty_tracking(l.caps()) && !l.pte_soft_dirty(pte) {
            return false;
        }
        if vma.uffd_wp && l.pte_uffd_wp(pte) {
            return false;
        }
        if !vma.shared {
            return page.is_some_and(|pg| {
                self.mem.test(self.mem.folio_head(pg), PG_ANON) && self.mem.test(pg, PG_ANON_EXCLUSIVE)
            });
        }
        l.pte_dirty(pte)
    }

    /// `change_protection()` over entries `[from, to)` of VMA `v`; `uffd` is MM_CP_UFFD_WP
    /// (`Some(true)`) or MM_CP_UFFD_WP_RESOLVE (`Some(false)`), `None` for mprotect.
    #[allow(clippy::too_many_arguments)]
    fn change_protection<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, from: usize, to: usize, uffd: Option<bool>) -> Result<()> {
        let vma = &self.mms[k].vmas[v];
        let (start, len) = (vma.start, to);
        let prot = vma.prot;
        let page_prot_write = self.page_prot_write(l, vma);
        // vma_wants_manual_pte_write_upgrade(); UFFDIO_WRITEPROTECT asks only when resolving.
        let try_writable = uffd != Some(true) && if vma.shared { self.wants_writenotify(l, vma) } else { vma.prot.write };
        let flags = FpbFlags { respect_soft_dirty: true, respect_write: true, ..Default::default() };
        let ptrs = self.ptrs_per_pte as usize;
        let mut s = from;
        while s < len {
            let e = len.min(s + ptrs - ((start as usize + s) & (ptrs - 1)));
            if self.change_huge_pmd_range(l, p, k, v, s, e, uffd) {
                self.ticker.tick((e - s) as u64)?;
                s = e;
                continue;
            }
            let mut changed = false;
            let mut i = s;
            while i < e {
                let old = self.mms[k].vmas[v].ptes[i];
                self.op.pte_reads += 1;
                if l.pte_none(old) {
                    i += 1;
                    continue;
                }
                changed = true;
                let page = self.vm_normal_page(l, old);
                let mut nr = 1usize;
                if let (Some(pg), true, Some(form)) = (page, e - i > 1, p.fpb.filter(|_| p.mprotect_batched)) {
                    let head = self.mem.folio_head(pg);
                    let order = self.mem.folio_order(head);
                    if order > 0 {
                        let table = Table { ptes: &self.mms[k].vmas[v].ptes, first_vpn: start };
                        let folio = Folio { pfn: head, nr_pages: 1 << order };
                        nr = folio_pte_batch_unchecked(l, form, table, i, e - i, folio, flags).nr;
                        self.op.folio_pte_batch_calls += 1;
                        self.op.pte_reads += nr as u64;
                    }
                }
                self.op.batch(nr);
                // modify_prot_start_ptes() clears the run; on arm64 (get_and_clear_ptes) that
                // first unfolds the contpte blocks the run covers in part, repainting them.
                self.unfold_partial(l, p, k, v, i, nr);
                // modify_prot_start_ptes(): young and dirty of the whole run in one value.
                let run = &self.mms[k].vmas[v].ptes[i..i + nr];
                let mut merged = l.clear_cont_bit(run[0]);
                for &x in &run[1..] {
                    if l.pte_dirty(x) {
                        merged = l.pte_mkdirty(merged);
                    }
                    if l.pte_young(x) {
                        merged = l.pte_mkyoung(merged);
                    }
                }
                let mut ptent = pte_modify(l, merged, prot, page_prot_write);
                match uffd {
                    Some(true) => ptent = l.set_uffd_wp_bit(l.pte_wrprotect(ptent)),
                    Some(false) => ptent = l.clear_uffd_wp_bit(ptent),
                    None => {}
                }
                let mut out = Vec::with_capacity(nr);
                // commit_anon_folio_batch() commits private anonymous runs in sub-batches of
                // equal PageAnonExclusive when it may make them writable.
                let split = !self.mms[k].vmas[v].shared && try_writable && !l.pte_write(ptent) && page.is_some();
                for j in 0..nr {
                    let mut x = l.pte_advance_pfn(ptent, j as u64);
                    // One decision per run for shared mappings, per page (its exclusivity)
                    // for private ones, which commit_anon_folio_batch() splits by.
                    if try_writable && !l.pte_write(x) {
                        let pg = page.map(|pg| pg + j as u64);
                        let vma = &self.mms[k].vmas[v];
                        let basis = if vma.shared { ptent } else { x };
                        let pgb = if vma.shared { page } else { pg };
                        if self.can_change_pte_writable(l, vma, basis, pgb) {
                            x = l.pte_mkwrite(x);
                        }
                    }
                    out.push(x);
                }
                // modify_prot_commit_ptes(): set_ptes() of each sub-batch (on arm64 that folds
                // whole aligned blocks, and a one-entry commit may fold a completed block).
                let excl = |j: usize| page.is_some_and(|pg| self.mem.test(pg + j as u64, PG_ANON_EXCLUSIVE));
                let mut j = 0;
                let mut subs = Vec::new();
                while j < nr {
                    let mut end = j + 1;
                    while end < nr && (!split || excl(end) == excl(j)) {
                        end += 1;
                    }
                    subs.push((j, end));
                    j = end;
                }
                for (a, b) in subs {
                    self.set_ptes(l, p, k, v, i + a, out[a], b - a);
                }
                i += nr;
            }
            if changed {
                self.op.tlb_flush_ranges += 1;
            }
            self.ticker.tick((e - s) as u64)?;
            s = e;
        }
        Ok(())
    }
}

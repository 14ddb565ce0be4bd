//! Page faults and accesses: `do_anonymous_page` with the THP order choice (policy.rs), file faults
//! (in filemap.rs), and the write-protect fault
//! `do_wp_page` with its reuse-or-copy decision per kernel version.
//!
//! Follows mm/memory.c (v6.8 – v6.18; large-folio reuse in wp_can_reuse_anon_folio() from v6.15). GUP pins, which
//! fault pages in the same way, are at the end.

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::{KernelProfile, LargeCowReuse};
use crate::memory::{LargeFolio, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_MAYBE_SHARED, PG_SWAPBACKED};
use crate::mm::{mm_counter, user_pte, Pin, MM_ANONPAGES};
use crate::sim::{Access, State};

/// Most entries a run of faults takes at once ([`State::do_anonymous_run`]): their page-table
/// entries are read, then written, while in the cache.
const RUN_PAGES: u64 = 2048;

/// Entries before the first that is not none.
fn count_none<L: PteLayout>(l: &L, ptes: &[u64]) -> u64 {
    // Blocks of 16 with one test each (vectorises), then the block that ends the run.
    let mut n = 0;
    for c in ptes.chunks(16) {
        if c.iter().fold(true, |all, &e| all & l.pte_none(e)) {
            n += c.len();
        } else {
            n += c.iter().take_while(|&&e| l.pte_none(e)).count();
            break;
        }
    }
    n as u64
}

#[cfg(not(test))]
#[inline(always)]
fn runs_enabled() -> bool {
    true
}

#[cfg(test)]
thread_local! {
    /// Off: every fault goes the single-fault way (the reference of the run proptests).
    static RUNS: std::cell::Cell<bool> = const { std::cell::Cell::new(true) };
}

#[cfg(test)]
fn runs_enabled() -> bool {
    RUNS.with(|r| r.get())
}

fn oom() -> Error {
    Error::out_of_memory("out of memory: no free page for the allocation")
}

impl State {
    /// (vma index, entry index) of a mapped vpn; callers checked the range first.
    fn locate(&self, k: usize, vpn: u64) -> (usize, usize) {
        let mm = &self.mms[k];
        let v = mm.find_vma(vpn).expect("range checked by the caller");
        (v, (vpn - mm.vmas[v].start) as usize)
    }

    /// Checks, before anything changes, that every page of `[a, b)` allows `access`.
    pub fn check_access<L: PteLayout>(&self, l: &L, k: usize, a: u64, b: u64, access: Access) -> Result<()> {
        let mm = &self.mms[k];
        let mut at = a;
        while at < b {
            let vma = &mm.vmas[mm.find_vma(at).expect("range checked by the caller")];
            let shift = self.page_shift;
            let ok = match access {
                Access::Read => vma.prot.read || vma.prot.write,
                Access::Write => vma.prot.write,
            };
            if !ok {
                return Err(Error::fault(format!(
                    "{} of {:#x} in a {} mapping: SIGSEGV",
                    if access == Access::Write { "write" } else { "read" },
                    at << shift,
                    vma.prot.as_string()
                )));
            }
            let stop = vma.end().min(b);
            if access == Access::Write && vma.uffd_wp {
                for vpn in at..stop {
                    let pte = vma.ptes[(vpn - vma.start) as usize];
                    if !l.pte_none(pte) && l.pte_uffd_wp(pte) {
                        return Err(Error::fault(format!(
                            "write to {:#x} hits a uffd-wp protected PTE: the process would wait \
                             for the userfaultfd monitor",
                            vpn << shift
                        )));
                    }
                }
            }
            at = stop;
        }
        Ok(())
    }

    /// Accesses of process `k` to every page of `[a, b)`, in order, faulting as needed; a write
    /// stores a new token in each page. What a fault mapped (a whole folio, a fault-around
    /// window, a huge PMD) takes no fault of its own: the run of pages the MMU can access
    /// as they are goes at the cost of reading their entries (`access_mapped_run`).
    pub fn access_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64, access: Access) -> Result<()> {
        let write = access == Access::Write;
        let mut vpn = a;
        while vpn < b {
            let (v, _) = self.locate(k, vpn);
            let run_order = self.anon_run_order(l, p, k, v);
            // Faults change no VMA; the check only guards the index against that changing.
            while vpn < b && self.mms[k].vmas[v].contains(vpn) {
                let vma = &self.mms[k].vmas[v];
                let end = vma.end().min(b);
                // A none PTE outside huge PMDs (every page of a first touch) faults at once.
                let none = vma.pmds.is_empty() && l.pte_none(vma.ptes[(vpn - vma.start) as usize]);
                let n = match run_order {
                    _ if !runs_enabled() => 0,
                    _ if !none => self.access_mapped_run(l, k, v, vpn, end, write),
                    Some(order) if write => self.do_anonymous_run(l, p, k, v, vpn, b, order),
                    _ => 0,
                };
                if n > 0 {
                    self.ticker.tick(n)?;
                    vpn += n;
                    continue;
                }
                self.ticker.tick(1)?;
                self.access_one(l, p, k, v, vpn, write)?;
                vpn += 1;
            }
        }
        Ok(())
    }

    /// The order of the folio every write fault on a none PTE of VMA `v` maps when its
    /// naturally aligned range lies inside the VMA, is all none and the allocation of that
    /// order succeeds at once: the highest order the THP policy allows, or 0. `None` where
    /// faults may do more than that: a userfaultfd-armed VMA, huge PMDs (`pmd=True`
    /// mappings, the PMD order by policy), file mappings, arm64 contpte folding.
    fn anon_run_order<L: PteLayout>(&self, l: &L, p: &KernelProfile, k: usize, v: usize) -> Option<u32> {
        let vma = &self.mms[k].vmas[v];
        if !vma.is_anon() || vma.uffd_wp || vma.thp_pmd || !vma.pmds.is_empty() || crate::pgtable::cont_ptes(l, p).is_some() {
            return None;
        }
        let orders = self.thp_vma_allowable_orders(k, v);
        if orders == 0 {
            return Some(0);
        }
        let order = 31 - orders.leading_zeros();
        // Only an explicit size list maps a PMD-sized folio with PTEs (pmd_order_fault()).
        (order != self.pmd_order || vma.mthp != 0).then_some(order)
    }

    /// Write faults on the none PTEs of VMA `v` from `vpn` (aligned to `order`; pages below
    /// `end` are written), where [`State::anon_run_order`] is `order`: a run of aligned,
    /// all-none slots of `2^order` entries, each what [`State::access_one`] and
    /// [`State::access_mapped_run`] give it (a fault, its `do_anonymous_page()` with the same
    /// entry reads, fragmentation draw and allocation, a new exclusive anonymous folio
    /// mapped by `set_ptes()`, young, dirty and writable, and a new token in each written
    /// page, in address order). The folios come from the allocator as runs of single
    /// allocations ([`Memory::alloc_run`]), and each per-page array is written in one pass.
    /// Returns the pages written; 0 (nothing done) where the first slot is not such a fault,
    /// for the single-fault path to take.
    ///
    /// [`Memory::alloc_run`]: crate::memory::Memory::alloc_run
    #[allow(clippy::too_many_arguments)]
    fn do_anonymous_run<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, end: u64, order: u32) -> u64 {
        let nr = 1u64 << order;
        let (start, vma_end, prot) = {
            let vma = &self.mms[k].vmas[v];
            (vma.start, vma.end(), vma.prot)
        };
        if vpn & (nr - 1) != 0 {
            return 0;
        }
        // Whole slots from vpn, at most RUN_PAGES entries (cache-sized), up to the slot
        // holding the last page written.
        let limit = vma_end.min((end + nr - 1) & !(nr - 1)).min(vpn + RUN_PAGES.max(nr));
        let i = (vpn - start) as usize;
        let none = count_none(l, &self.mms[k].vmas[v].ptes[i..i + (limit - vpn) as usize]);
        let mut slots = (none >> order).min(self.mem.free_folios(order));
        // fragmented() of each slot's order, in slot order; the first slot it fails stays
        // for the single fault, which draws the same value again.
        if order > 0 && self.mem.fallback[order as usize] > 0.0 {
            for s in 0..slots {
                let before = self.mem.rng.clone();
                if self.mem.fragmented(order) {
                    self.mem.rng = before;
                    slots = s;
                    break;
                }
            }
        }
        if slots == 0 {
            return 0;
        }
        self.ensure_anon_vma(k, v);
        let mm_id = self.mms[k].mm_id;
        // folio_add_new_anon_rmap(): folio_set_large_mapcount() puts every mapping in
        // MM-ID slot 0 (v6.15+).
        let rec = LargeFolio {
            large_mapcount: nr as i32 - 1,
            nr_pages_mapped: nr as i32,
            mm_id: [if p.mm_id { mm_id } else { MM_ID_DUMMY }, MM_ID_DUMMY],
            mm_id_mapcount: [if p.mm_id { nr as i32 - 1 } else { -1 }, -1],
            ..LargeFolio::default()
        };
        let written = (slots << order).min(end - vpn);
        let mut at = 0u64;
        while at < slots {
            let (first, n) = self.mem.alloc_run(order, slots - at, rec).expect("free_folios() counted it");
            let (a, e) = (first as usize, (first + (n << order)) as usize);
            let State { mem, mms, next_token, .. } = self;
            // folio_add_new_anon_rmap() of each folio: anonymous, each page exclusive and
            // mapped once; the folio's references, one per page.
            mem.mapcount[a..e].fill(1);
            if order == 0 {
                mem.flags[a..e].fill(PG_ANON | PG_SWAPBACKED | PG_ANON_EXCLUSIVE);
                mem.refcount[a..e].fill(1);
            } else {
                mem.flags[a..e].fill(PG_ANON_EXCLUSIVE);
                mem.refcount[a..e].fill(0);
                for h in (a..e).step_by(nr as usize) {
                    mem.flags[h] |= PG_ANON | PG_SWAPBACKED;
                    mem.refcount[h] = nr as i32;
                }
            }
            // The written pages' tokens; the rest of a last folio past `end` has none.
            let w = ((written - (at << order)) as usize).min(e - a);
            let tokens = &mut mem.token[a..e];
            let t0 = *next_token;
            if (t0 as u64) + (w as u64) <= u32::MAX as u64 {
                for (j, t) in tokens[..w].iter_mut().enumerate() {
                    *t = t0 + j as u32;
                }
                *next_token = (t0 + w as u32).max(1);
            } else {
                for t in &mut tokens[..w] {
                    *t = *next_token;
                    *next_token = next_token.wrapping_add(1).max(1);
                }
            }
            tokens[w..].fill(0);
            // set_ptes() of each folio: young and dirty (a write), writable as the VMA is.
            let template = user_pte(l, first, prot, prot.write, prot.write);
            let j = i + (at << order) as usize;
            let ptes = &mut mms[k].vmas[v].ptes[j..j + (e - a)];
            match l.linear_advance(template, (e - a) as u64) {
                Some(step) => {
                    let mut pte = template;
                    for x in ptes {
                        *x = pte;
                        pte = pte.wrapping_add(step);
                    }
                }
                None => {
                    for (j, x) in ptes.iter_mut().enumerate() {
                        *x = l.pte_advance_pfn(template, j as u64);
                    }
                }
            }
            at += n;
        }
        let pages = slots << order;
        self.mms[k].rss[MM_ANONPAGES] += pages as i64;
        let op = &mut self.op;
        // Each fault reads its entry, then the aligned range of its order (the single fault
        // of order 0 checks none); the written pages after the first are read as mapped.
        op.pte_reads += slots + if order > 0 { pages } else { 0 } + written - slots;
        op.faults += slots;
        op.folios_allocated += slots;
        if op.alloc_by_order.len() <= order as usize {
            op.alloc_by_order.resize(order as usize + 1, 0);
        }
        op.alloc_by_order[order as usize] += slots;
        if order > 0 {
            op.refcount_atomics += slots;
            op.mapcount_updates += slots;
        }
        op.rmap_calls += slots;
        op.mapcount_updates += pages;
        op.pte_writes += pages;
        written
    }

    /// The run of pages from `vpn` (below `end`, in VMA `v`) that an access takes without a
    /// fault, taken: present PTEs (writable for a write) outside huge PMDs, or the pages of
    /// a huge PMD that allows the access. Each entry is read (`pte_reads`) and gets young,
    /// and dirty for a write, as the MMU sets them; each written page gets a new token.
    /// Exactly what [`State::access_one`] does for such a page; returns how many.
    fn access_mapped_run<L: PteLayout>(&mut self, l: &L, k: usize, v: usize, vpn: u64, end: u64, write: bool) -> u64 {
        #[inline(always)]
        fn bump(next: &mut u32) -> u32 {
            let t = *next;
            *next = next.wrapping_add(1).max(1);
            t
        }
        let State { mms, mem, op, next_token, zero_pfn, ptrs_per_pte, .. } = self;
        let vma = &mut mms[k].vmas[v];
        let mut end = end;
        if !vma.pmds.is_empty() {
            // At most the rest of the PMD range of `vpn`, mapped by a huge PMD or by PTEs.
            let base = vpn & !(*ptrs_per_pte - 1);
            end = end.min(base + *ptrs_per_pte);
            if let Some(e) = vma.pmds.get_mut(&base) {
                if write && !l.pte_write(*e) {
                    return 0;
                }
                if !l.pte_young(*e) {
                    *e = l.pte_mkyoung(*e);
                }
                if write && !l.pte_dirty(*e) {
                    *e = l.pte_mkdirty(*e);
                }
                if write {
                    let first = (l.pte_pfn(*e) + (vpn - base)) as usize;
                    for t in &mut mem.token[first..first + (end - vpn) as usize] {
                        *t = bump(next_token);
                    }
                }
                op.pte_reads += end - vpn;
                return end - vpn;
            }
        }
        let i = (vpn - vma.start) as usize;
        let mut n = 0;
        for e in &mut vma.ptes[i..i + (end - vpn) as usize] {
            let mut pte = *e;
            if l.pte_none(pte) || (write && !l.pte_write(pte)) {
                break;
            }
            if !l.pte_young(pte) {
                pte = l.pte_mkyoung(pte);
            }
            if write {
                if !l.pte_dirty(pte) {
                    pte = l.pte_mkdirty(pte);
                }
                // vm_normal_page(): a writable entry maps a normal page.
                let pfn = l.pte_pfn(pte);
                if l.pte_special(pte) || pfn == *zero_pfn {
                    break;
                }
                mem.token[pfn as usize] = bump(next_token);
            }
            *e = pte;
            n += 1;
        }
        op.pte_reads += n;
        n
    }

    /// One access of process `k` to `vpn` in VMA `v`, faulting as needed; a write stores a
    /// new token.
    fn access_one<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool) -> Result<()> {
        let i = (vpn - self.mms[k].vmas[v].start) as usize;
        let no_pmds = |st: &State| st.mms[k].vmas[v].pmds.is_empty();
        if !no_pmds(self) && self.huge_pmd_access(l, p, k, v, vpn, write)? {
            return Ok(());
        }
        self.op.pte_reads += 1;
        let pte = self.mms[k].vmas[v].ptes[i];
        if l.pte_none(pte) {
            self.fault_none(l, p, k, v, vpn, write)?;
            // The fault may have mapped a huge PMD (huge_memory.rs).
            if !no_pmds(self) && self.huge_pmd_access(l, p, k, v, vpn, write)? {
                return Ok(());
            }
        } else if write && !l.pte_write(pte) {
            self.do_wp_page(l, p, k, v, i, false)?;
        }
        // The MMU sets the accessed bit, and the dirty bit on a write.
        let ptes = &mut self.mms[k].vmas[v].ptes;
        let mut pte = ptes[i];
        if !l.pte_young(pte) {
            pte = l.pte_mkyoung(pte);
        }
        if write && !l.pte_dirty(pte) {
            pte = l.pte_mkdirty(pte);
        }
        ptes[i] = pte;
        if write {
            let page = self.vm_normal_page(l, pte).expect("a written page is never the zero page");
            let t = self.new_token();
            self.mem.token[page as usize] = t;
        }
        Ok(())
    }

    /// A fault on a none PTE.
    fn fault_none<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool) -> Result<()> {
        self.op.faults += 1;
        if self.mms[k].vmas[v].is_anon() {
            self.do_anonymous_page(l, p, k, v, vpn, write)
        } else {
            self.do_file_fault(l, p, k, v, vpn, write)
        }
    }

    pub(crate) fn ensure_anon_vma(&mut self, k: usize, v: usize) {
        if self.mms[k].vmas[v].anon_vma == 0 {
            let a = self.new_anon_vma();
            self.mms[k].vmas[v].anon_vma = a;
        }
    }

    /// `do_anonymous_page()` with `alloc_anon_folio()` (mm/memory.c): a read maps the shared
    /// zero page; a write maps a new folio of the largest order the THP policy allows
    /// ([`State::thp_vma_allowable_orders`]) whose naturally aligned range lies in the VMA and
    /// is all none, falling back to smaller orders when allocation fails. The PMD order is
    /// tried first, as `__handle_mm_fault()` calls `create_huge_pmd()` before the PTE path,
    /// which itself only considers orders below PMD_ORDER.
    fn do_anonymous_page<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool) -> Result<()> {
        // alloc_anon_folio(): a userfaultfd-armed VMA gets single pages (the model also keeps
        // it from the PMD order).
        let vma = &self.mms[k].vmas[v];
        let allowed = if vma.uffd_wp { 0 } else { crate::policy::thp_vma_suitable_orders(vma, vpn, self.thp_vma_allowable_orders(k, v)) };
        let pmd_bit = 1u32 << self.pmd_order;
        // __handle_mm_fault(): where the policy allows the PMD order, create_huge_pmd() first
        // (read faults too: the huge zero page); `pmd=True` mappings always try it. An
        // explicit size list with the PMD size keeps the model's PTE-mapped PMD-sized folio.
        let pmd_by_policy = vma.mthp == 0 && allowed & pmd_bit != 0;
        if (vma.thp_pmd || pmd_by_policy) && self.do_huge_pmd_anonymous_page(l, p, k, v, vpn, write)? {
            return Ok(());
        }
        let vma = &self.mms[k].vmas[v];
        let i = (vpn - vma.start) as usize;
        if !write {
            let pte = l.pte_mkspecial(l.pte_mkyoung(l.pfn_pte_template(self.zero_pfn, vma.prot.exec, false)));
            self.set_pte(l, p, k, v, i, pte);
            return Ok(());
        }
        let pmd_order = self.pmd_order;
        if !pmd_by_policy && allowed & pmd_bit != 0 && self.pmd_order_fault(l, p, k, v, vpn)? {
            return Ok(());
        }
        // alloc_anon_folio(): the highest order whose aligned range is all none; every lower
        // order's range then is too.
        // Candidate orders as a mask, tried from the highest.
        let mut candidates = allowed & ((1u32 << pmd_order) - 1) & !1;
        let vma = &self.mms[k].vmas[v];
        while candidates != 0 {
            let o = 31 - candidates.leading_zeros();
            let n = 1u64 << o;
            let s = ((vpn & !(n - 1)) - vma.start) as usize;
            self.op.pte_reads += n;
            if vma.ptes[s..s + n as usize].iter().all(|&e| l.pte_none(e)) {
                break;
            }
            candidates &= !(1 << o);
        }
        let mut chosen = None;
        while candidates != 0 {
            let o = 31 - candidates.leading_zeros();
            candidates &= !(1 << o);
            if self.mem.fragmented(o) {
                continue;
            }
            if let Some(h) = self.mem.alloc(o) {
                chosen = Some((h, o));
                break;
            }
        }
        let (head, order) = match chosen {
            Some(c) => c,
            None => (self.mem.alloc(0).ok_or_else(oom)?, 0),
        };
        self.map_new_anon_folio(l, p, k, v, vpn, head, order);
        Ok(())
    }

    /// A write fault of a mapping whose explicit size list (`mmap(mthp=[..., "2M"])`) has the
    /// PMD size: the model's PTE-mapped PMD-sized folio, the state a PMD fault followed by a
    /// split leaves. Returns false (as VM_FAULT_FALLBACK) when the range is in use or there is
    /// no PMD-order memory, after which the PTE path runs.
    fn pmd_order_fault<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64) -> Result<bool> {
        let order = self.pmd_order;
        let n = 1u64 << order;
        let vma = &self.mms[k].vmas[v];
        let s = ((vpn & !(n - 1)) - vma.start) as usize;
        self.op.pte_reads += n;
        if !vma.ptes[s..s + n as usize].iter().all(|&e| l.pte_none(e)) || self.mem.fragmented(order) {
            return Ok(false);
        }
        let Some(head) = self.mem.alloc(order) else { return Ok(false) };
        self.map_new_anon_folio(l, p, k, v, vpn, head, order);
        Ok(true)
    }

    /// Maps a newly allocated anonymous folio of `order` over the aligned range around `vpn`
    /// (`folio_add_new_anon_rmap()`, `set_ptes()`), with its references and rss.
    #[allow(clippy::too_many_arguments)]
    fn map_new_anon_folio<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, head: u64, order: u32) {
        self.op.allocated(order);
        let nr = 1u64 << order;
        let mm_id = self.mms[k].mm_id;
        {
            let mut r = self.rmap(p);
            if nr > 1 {
                r.ref_add(head, nr as i32 - 1);
            }
            r.add_new_anon(head, mm_id);
        }
        self.ensure_anon_vma(k, v);
        let mm = &mut self.mms[k];
        mm.rss[MM_ANONPAGES] += nr as i64;
        let vma = &mm.vmas[v];
        let pte = user_pte(l, head, vma.prot, vma.prot.write, vma.prot.write);
        let base = ((vpn & !(nr - 1)) - vma.start) as usize;
        self.set_ptes(l, p, k, v, base, pte, nr as usize);
    }

    /// `wp_can_reuse_anon_folio()` (mm/memory.c): small folios (and, up to v6.8, large ones)
    /// by refcount; v6.9 – v6.14 never a large folio; v6.15+ a large folio whose MM-ID slots
    /// say one mm holds every mapping and whose every reference is a mapping.
    fn wp_can_reuse_anon_folio(&self, p: &KernelProfile, head: u64) -> bool {
        let refs = self.mem.refcount[head as usize];
        let large = self.mem.folio_order(head) > 0;
        if !large || p.large_cow_reuse == LargeCowReuse::RefcountOne {
            // No LRU batches or swap cache in the model: only "refcount == 1" remains.
            return refs == 1;
        }
        match p.large_cow_reuse {
            LargeCowReuse::Never | LargeCowReuse::RefcountOne => false,
            LargeCowReuse::MmId => {
                let mapcount = self.mem.folio_mapcount(head);
                if mapcount <= 1 || self.mem.test(head, PG_MAYBE_SHARED) {
                    return false;
                }
                mapcount == refs as i64
            }
        }
    }

    /// `do_wp_page()`: a write (or GUP unshare) on a present, non-writable PTE.
    pub(crate) fn do_wp_page<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize, unshare: bool) -> Result<()> {
        self.op.faults += 1;
        let vma = &self.mms[k].vmas[v];
        let (vma_uffd_wp, vma_shared) = (vma.uffd_wp, vma.shared);
        let mut pte = self.ptep_get(l, p, k, v, i);
        if !vma_uffd_wp && l.pte_uffd_wp(pte) {
            // A stale uffd-wp bit on an unregistered VMA is dropped.
            pte = l.clear_uffd_wp_bit(pte);
            self.set_pte(l, p, k, v, i, pte);
            pte = self.ptep_get(l, p, k, v, i);
        }
        let page = self.vm_normal_page(l, pte);
        if vma_shared {
            if unshare {
                return Ok(());
            }
            // wp_page_shared(): write-notify done, make the PTE writable in place.
            self.set_access_flags(l, p, k, v, i, l.pte_mkwrite(l.pte_mkdirty(l.pte_mkyoung(pte))));
            if let Some(pg) = page {
                let head = self.mem.folio_head(pg);
                self.mem.set(head, PG_DIRTY);
            }
            return Ok(());
        }
        if let Some(pg) = page {
            let head = self.mem.folio_head(pg);
            if self.mem.test(head, PG_ANON)
                && (self.mem.test(pg, PG_ANON_EXCLUSIVE) || self.wp_can_reuse_anon_folio(p, head))
            {
                self.mem.set(pg, PG_ANON_EXCLUSIVE);
                self.op.cow_reuses += 1;
                if unshare {
                    return Ok(());
                }
                // wp_page_reuse()
                let mut n = l.pte_mkdirty(l.pte_mkyoung(pte));
                if self.mms[k].vmas[v].prot.write {
                    n = l.pte_mkwrite(n);
                }
                self.set_access_flags(l, p, k, v, i, n);
                return Ok(());
            }
        }
        self.wp_page_copy(l, p, k, v, i, pte, page, unshare)
    }

    /// `wp_page_copy()`: a new order-0 anonymous page replaces the mapped one.
    #[allow(clippy::too_many_arguments)]
    fn wp_page_copy<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize, old: u64, page: Option<u64>, unshare: bool) -> Result<()> {
        let new = self.mem.alloc(0).ok_or_else(oom)?;
        self.op.allocated(0);
        self.op.cow_copies += 1;
        let mm_id = self.mms[k].mm_id;
        let old_head = page.map(|pg| self.mem.folio_head(pg));
        if let (Some(pg), Some(h)) = (page, old_head) {
            // do_wp_page() holds a reference across the copy.
            self.rmap(p).ref_add(h, 1);
            self.mem.token[new as usize] = self.mem.token[pg as usize];
            self.op.pages_copied += 1;
        }
        let old_counter = old_head.filter(|&h| !self.mem.test(h, PG_ANON)).map(|h| mm_counter(&self.mem, h));
        self.ensure_anon_vma(k, v);
        let mm = &mut self.mms[k];
        match (page, old_counter) {
            (None, _) => mm.rss[MM_ANONPAGES] += 1,
            (Some(_), Some(c)) => {
                mm.rss[c] -= 1;
                mm.rss[MM_ANONPAGES] += 1;
            }
            (Some(_), None) => {}
        }
        let vma = &mm.vmas[v];
        let n = if unshare {
            let mut n = user_pte(l, new, vma.prot, false, false);
            if l.pte_soft_dirty(old) {
                n = l.pte_mksoft_dirty(n);
            }
            if l.pte_uffd_wp(old) {
                n = l.set_uffd_wp_bit(n);
            }
            n
        } else {
            user_pte(l, new, vma.prot, vma.prot.write, true)
        };
        // ptep_clear_flush() of the old entry, then the new page goes in.
        self.unfold(l, p, k, v, i);
        self.op.tlb_flush_ranges += 1;
        self.op.tlb_flush_pages += 1;
        self.rmap(p).add_new_anon(new, mm_id);
        self.set_pte(l, p, k, v, i, n);
        if let (Some(pg), Some(h)) = (page, old_head) {
            let mut r = self.rmap(p);
            r.remove_ptes(h, pg, 1, mm_id);
            // The old PTE's reference, then do_wp_page()'s own.
            r.put_refs(h, 1);
            r.put_refs(h, 1);
        }
        Ok(())
    }

    /// `ptep_set_access_flags()` for a write fault: on a contpte block the change of write
    /// permission unfolds the block first (arm64); then the one entry is written.
    fn set_access_flags<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, i: usize, pte: u64) {
        self.unfold(l, p, k, v, i);
        self.mms[k].vmas[v].ptes[i] = l.clear_cont_bit(pte);
        self.op.pte_writes += 1;
    }

    /// `pin_user_pages()` (mm/gup.c): faults the range in (a FOLL_WRITE pin breaks COW; a
    /// read-only FOLL_LONGTERM pin unshares pages it may not pin as they are, per
    /// `gup_must_unshare()`), then takes one FOLL_PIN per page and sets MMF_HAS_PINNED.
    #[allow(clippy::too_many_arguments)]
    pub fn pin<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64, write: bool, longterm: bool) -> Result<u32> {
        let mut pfns = crate::alloc::try_with_capacity((b - a) as usize, "the pages of a pin")?;
        for vpn in a..b {
            self.ticker.tick(1)?;
            let (v, i) = self.locate(k, vpn);
            if let Some(pfn) = self.gup_huge_pmd(l, p, k, v, vpn, write, longterm)? {
                pfns.push(pfn);
                continue;
            }
            self.op.pte_reads += 1;
            if l.pte_none(self.mms[k].vmas[v].ptes[i]) {
                self.fault_none(l, p, k, v, vpn, write)?;
                if let Some(pfn) = self.gup_huge_pmd(l, p, k, v, vpn, write, longterm)? {
                    pfns.push(pfn);
                    continue;
                }
            }
            let pte = self.ptep_get(l, p, k, v, i);
            if write && !l.pte_write(pte) {
                self.do_wp_page(l, p, k, v, i, false)?;
            } else if !write && self.gup_must_unshare(l, k, v, pte, longterm) {
                self.do_wp_page(l, p, k, v, i, true)?;
            }
            let pte = self.mms[k].vmas[v].ptes[i];
            pfns.push(l.pte_pfn(pte));
        }
        for &pfn in &pfns {
            if pfn != self.zero_pfn {
                let head = self.mem.folio_head(pfn);
                self.rmap(p).pin(head);
            }
        }
        self.mms[k].has_pinned = true;
        self.pins.push(Pin { pfns, write, longterm, active: true });
        Ok(self.pins.len() as u32 - 1)
    }

    /// `gup_must_unshare()` for a read-only FOLL_PIN (mm/internal.h).
    fn gup_must_unshare<L: PteLayout>(&self, l: &L, k: usize, v: usize, pte: u64, longterm: bool) -> bool {
        let vma = &self.mms[k].vmas[v];
        match self.vm_normal_page(l, pte) {
            Some(pg) if self.mem.test(self.mem.folio_head(pg), PG_ANON) => {
                !self.mem.test(pg, PG_ANON_EXCLUSIVE)
            }
            // The zero page and page-cache pages in a private mapping: only long-term pins
            // need a private copy.
            _ => longterm && vma.is_cow(),
        }
    }

    /// clear_refs "4" (fs/proc/task_mmu.c): soft-dirty tracking starts: VM_SOFTDIRTY is
    /// cleared and every present PTE loses soft-dirty and write permission.
    pub fn clear_soft_dirty<L: PteLayout>(&mut self, l: &L, k: usize) -> Result<()> {
        let mut writes = 0;
        for vma in &mut self.mms[k].vmas {
            self.ticker.tick(vma.ptes.len() as u64)?;
            vma.vm_softdirty = false;
            for e in vma.ptes.iter_mut() {
                if !l.pte_none(*e) {
                    *e = l.pte_clear_soft_dirty(l.pte_wrprotect(*e));
                    writes += 1;
                }
            }
        }
        self.op.pte_writes += writes;
        self.clear_soft_dirty_pmds(l, k);
        self.op.tlb_flush_ranges += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::RUNS;
    use crate::arch::Layout;
    use crate::kernel::KernelProfile;
    use crate::mm::Prot;
    use crate::sim::Simulation;
    use proptest::prelude::*;

    /// Everything a touch may change, as text.
    fn dump(s: &Simulation) -> String {
        let m = &s.st.mem;
        format!(
            "{:?}",
            (
                (&m.order, &m.flags, &m.mapcount, &m.refcount, &m.token),
                (m.large_folios(), m.free_blocks(), m.free_pages, m.rng.0),
                (&s.st.mms, &s.st.op, &s.st.total, s.st.next_token, s.st.next_anon_vma),
            )
        )
    }

    const SIZES: [u64; 5] = [4 << 10, 16 << 10, 32 << 10, 64 << 10, 2 << 20];

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Write (and read) touches with runs of faults leave the state, counters and errors
        /// exactly as one fault at a time does: mTHP size lists and the THP policy, ranges
        /// that start and end inside folios and mappings, pages mapped before (zero page,
        /// written, other orders), simulated fragmentation, memory running short, and the
        /// token counter wrapping.
        #[test]
        fn runs_of_faults_are_single_faults(
            kernel in prop::sample::select(vec!["6.8", "6.18"]),
            mem_pages in 300u64..2_500,
            vmas in prop::collection::vec((1u64..700, prop::option::of(0u32..32)), 1..4),
            policy in prop::option::of(2u32..10),
            fallback in prop::collection::vec((2u32..10, 0u8..4), 0..3),
            token in prop::option::of(u32::MAX - 900..u32::MAX),
            touches in prop::collection::vec((0usize..4, 0u64..1_400, 1u64..900, any::<bool>()), 1..10),
        ) {
            let layout = Layout::by_name("x86-64", None).unwrap();
            let mut s = Simulation::new(layout, KernelProfile::parse(kernel).unwrap(), mem_pages << 12, 7).unwrap();
            if let Some(o) = policy {
                s.st.thp.set_size_mode(o, crate::policy::SizeEnabled::Always);
            }
            for (o, p) in fallback {
                s.set_fallback(o, [0.0, 0.3, 0.7, 1.0][p as usize]).unwrap();
            }
            if let Some(t) = token {
                s.st.next_token = t;
            }
            let pid = s.spawn();
            let rw = Prot { read: true, write: true, exec: false };
            let mut spans = Vec::new();
            for (pages, mthp) in vmas {
                let list: Option<Vec<u64>> = mthp.map(|bits| (0..5).filter(|b| bits & (1 << b) != 0).map(|b| SIZES[b]).collect());
                let a = s.mmap(pid, None, pages << 12, rw, false, None, list.as_deref(), false, false, false).unwrap();
                spans.push((a, pages));
            }
            let mut one = s.clone();
            for (vi, off, len, write) in touches {
                let (a, pages) = spans[vi % spans.len()];
                let off = off % pages;
                let len = len.min(pages - off);
                let got = s.touch(pid, a + (off << 12), len << 12, write).map_err(|e| e.message);
                RUNS.with(|r| r.set(false));
                let want = one.touch(pid, a + (off << 12), len << 12, write).map_err(|e| e.message);
                RUNS.with(|r| r.set(true));
                prop_assert_eq!(got, want);
                prop_assert_eq!(dump(&s), dump(&one));
            }
        }
    }
}

//! Page faults and accesses: `do_anonymous_page` with the THP order choice (policy.rs), file faults
//! (in filemap.rs), and the write-protect fault
//! `do_wp_page` with its reuse-or-copy decision per kernel version.
//!
//! Follows mm/memory.c (v6.8 – v6.18; large-folio reuse in wp_can_reuse_anon_folio() from v6.15). GUP pins, which
//! fault pages in the same way, are at the end.

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::{KernelProfile, LargeCowReuse};
use crate::memory::{PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_MAYBE_SHARED, PG_SWAPBACKED};
use crate::mm::{mm_counter, user_pte, Pin, MM_ANONPAGES};
use crate::sim::{Access, State};

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
            // A private anonymous VMA whose faults can only map single pages (the THP policy
            // allows no larger order anywhere in it, no huge PMD, no uffd-wp, no contpte).
            let small_only = {
                let vma = &self.mms[k].vmas[v];
                vma.is_anon()
                    && !vma.uffd_wp
                    && !vma.thp_pmd
                    && vma.pmds.is_empty()
                    && self.thp_vma_allowable_orders(k, v) & !1 == 0
                    && crate::pgtable::cont_ptes(l, p).is_none()
            };
            // Faults change no VMA; the check only guards the index against that changing.
            while vpn < b && self.mms[k].vmas[v].contains(vpn) {
                let vma = &self.mms[k].vmas[v];
                let end = vma.end().min(b);
                // A none PTE outside huge PMDs (every page of a first touch) faults at once.
                let none = vma.pmds.is_empty() && l.pte_none(vma.ptes[(vpn - vma.start) as usize]);
                let n = if !none {
                    self.access_mapped_run(l, k, v, vpn, end, write)
                } else if write && small_only {
                    self.do_anonymous_small_run(l, k, v, vpn, end)
                } else {
                    0
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

    /// Write faults on the run of none PTEs from `vpn` (below `end`) of a VMA where
    /// `do_anonymous_page()` can only map single pages: each page what [`State::access_one`]
    /// gives it (a fault, a new exclusive anonymous page, its PTE young, dirty and writable,
    /// a new token), with the pages taken from the allocator as a run of single allocations
    /// ([`Memory::alloc_order0_run`]). Returns how many; 0 when memory is out, for the
    /// single-page path to report.
    ///
    /// [`Memory::alloc_order0_run`]: crate::memory::Memory::alloc_order0_run
    fn do_anonymous_small_run<L: PteLayout>(&mut self, l: &L, k: usize, v: usize, vpn: u64, end: u64) -> u64 {
        let (start, prot) = (self.mms[k].vmas[v].start, self.mms[k].vmas[v].prot);
        let i = (vpn - start) as usize;
        // No run is longer than the largest free block.
        let cap = (end - vpn).min(1u64 << self.mem.max_order) as usize;
        let want = self.mms[k].vmas[v].ptes[i..i + cap].iter().take_while(|&&e| l.pte_none(e)).count() as u64;
        let Some((first, n)) = self.mem.alloc_order0_run(want) else { return 0 };
        self.ensure_anon_vma(k, v);
        // folio_add_new_anon_rmap() of each page: anonymous, exclusive, mapped once.
        let (a, e) = (first as usize, (first + n) as usize);
        for f in &mut self.mem.flags[a..e] {
            *f |= PG_ANON | PG_SWAPBACKED | PG_ANON_EXCLUSIVE;
        }
        self.mem.mapcount[a..e].fill(1);
        for t in a..e {
            let tok = self.new_token();
            self.mem.token[t] = tok;
        }
        // set_ptes() of each page: young and dirty (a write), writable as the VMA is.
        let template = user_pte(l, first, prot, prot.write, prot.write);
        let ptes = &mut self.mms[k].vmas[v].ptes[i..i + n as usize];
        match l.linear_advance(template, n) {
            Some(step) => {
                let mut pte = template;
                for e in ptes {
                    *e = pte;
                    pte = pte.wrapping_add(step);
                }
            }
            None => {
                for (j, e) in ptes.iter_mut().enumerate() {
                    *e = l.pte_advance_pfn(template, j as u64);
                }
            }
        }
        self.mms[k].rss[MM_ANONPAGES] += n as i64;
        let op = &mut self.op;
        op.pte_reads += n;
        op.faults += n;
        op.folios_allocated += n;
        if op.alloc_by_order.is_empty() {
            op.alloc_by_order.resize(1, 0);
        }
        op.alloc_by_order[0] += n;
        op.rmap_calls += n;
        op.mapcount_updates += n;
        op.pte_writes += n;
        n
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

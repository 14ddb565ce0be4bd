//! Invariants: everything the kernel's accounting promises, recomputed from scratch by
//! rescanning every page table, and compared with the stored counters.

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::memory::{
    GUP_PIN_COUNTING_BIAS, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_FILE, PG_MAYBE_SHARED,
};
use crate::mm::{mm_counter, NOT_CACHED, RSS_NAMES};
use crate::sim::State;

/// `owner[pfn]` of a page mapped by more than one mm.
const MANY: u32 = u32::MAX;

/// The owner of a page once `pid` maps it too: `pid`, or [`MANY`].
fn owned_by(owner: u32, pid: u32) -> u32 {
    match owner {
        0 => pid,
        o if o == pid => o,
        _ => MANY,
    }
}

fn broken(rule: &'static str, msg: String) -> Error {
    let mut e = Error::invariant(format!("{rule}: {msg}"));
    e.rule = Some(rule);
    e
}

impl State {
    /// Where `pfn` is mapped (pid and address), for error messages.
    fn where_mapped<L: PteLayout>(&self, l: &L, pfn: u64) -> String {
        for mm in &self.mms {
            for vma in &mm.vmas {
                for (&base, &e) in &vma.pmds {
                    let head = l.pte_pfn(e);
                    if pfn >= head && pfn < head + self.ptrs_per_pte {
                        return format!("; mapped by pid {} at {:#x} (huge PMD)", mm.pid, (base + pfn - head) << self.page_shift);
                    }
                }
                for (i, &e) in vma.ptes.iter().enumerate() {
                    if !l.pte_none(e) && l.pte_pfn(e) == pfn {
                        return format!("; mapped by pid {} at {:#x}", mm.pid, (vma.start + i as u64) << self.page_shift);
                    }
                }
            }
        }
        "; not mapped by any page table".into()
    }

    /// arm64 contpte blocks: PTE_CONT only where the kernel folds (v6.9+), and then on whole,
    /// naturally aligned blocks of valid entries mapping consecutive, aligned pfns with the
    /// same attributes but for young/dirty. PTE_CONT left on invalid (PROT_NONE) entries, which
    /// `contpte_set_ptes()` writes for a whole PROT_NONE block, is inert and allowed.
    fn check_contpte<L: PteLayout>(&self, l: &L, p: &KernelProfile, pid: u32, vma: &crate::mm::Vma) -> Result<()> {
        let n = State::cont_ptes(l, p);
        let mut i = 0usize;
        while i < vma.ptes.len() {
            let e = vma.ptes[i];
            if l.pte_none(e) || !l.pte_cont(e) {
                i += 1;
                continue;
            }
            let at = format!("pid {pid} address {:#x}", (vma.start + i as u64) << self.page_shift);
            let Some(n) = n else {
                return Err(broken("contpte-block", format!("{at}: PTE_CONT where this kernel never folds")));
            };
            if !l.pte_valid(e) {
                i += 1;
                continue;
            }
            let off = (vma.start as usize + i) % n;
            let ok = off == 0 && i + n <= vma.ptes.len() && {
                let norm = |x: u64| l.pte_mkold(l.pte_mkclean(x));
                let base = norm(vma.ptes[i]);
                l.pte_pfn(base) % n as u64 == 0
                    && (0..n).all(|k| {
                        let x = vma.ptes[i + k];
                        l.pte_valid(x) && l.pte_cont(x) && norm(x) == l.pte_advance_pfn(base, k as u64)
                    })
            };
            if !ok {
                return Err(broken("contpte-block", format!("{at}: a PTE_CONT block that is not {n} aligned, uniform entries")));
            }
            i += n;
        }
        Ok(())
    }

    /// Checks every invariant; the first one broken comes back as an Invariant error that
    /// names the rule, the page or folio, and a process and address that map it.
    pub fn check<L: PteLayout>(&self, l: &L, p: &KernelProfile) -> Result<()> {
        let n = self.mem.nr_pages() as usize;
        let shift = self.page_shift;
        use crate::alloc::try_filled;
        let mut count = try_filled(n, 0u32, "check()'s mapping counts")?;
        let mut owner = try_filled(n, 0u32, "check()'s owners")?;
        let mut writable = try_filled(n, 0u32, "check()'s writable counts")?;
        // Mappings of large folios per mm, as runs (folio, mm_id, PTEs): a folio's PTEs are
        // mostly consecutive, so there is about one run per folio and mm. Sorted once, they
        // are read in folio order by the pass over memory below.
        let mut runs: Vec<(u64, u32, u32)> = Vec::new();
        let mut flush = |run: &mut Option<(u64, u32, u32)>| -> Result<()> {
            if let Some(r) = run.take() {
                if runs.len() == runs.capacity() {
                    let more = runs.len().max(1 << 12);
                    runs.try_reserve(more).map_err(|_| Error::host_memory::<(u64, u32, u32)>("check()'s folio runs", runs.len() + more))?;
                }
                runs.push(r);
            }
            Ok(())
        };
        let mut run: Option<(u64, u32, u32)> = None;
        // Huge PMD mappings, by folio head (the kernel's entire mapcount); sorted below.
        let mut pmd_heads: Vec<u64> = Vec::new();
        for mm in &self.mms {
            if mm.exited && !mm.vmas.is_empty() {
                return Err(broken("exited-mm", format!("pid {} has exited but still has VMAs", mm.pid)));
            }
            let mut rss = [0i64; 3];
            for (vi, vma) in mm.vmas.iter().enumerate() {
                if vi > 0 && mm.vmas[vi - 1].end() > vma.start {
                    return Err(broken("vma-order", format!("pid {}: VMAs overlap at {:#x}", mm.pid, vma.start << shift)));
                }
                self.check_contpte(l, p, mm.pid, vma)?;
                for (&base, &e) in &vma.pmds {
                    let at = || format!("pid {} address {:#x} (PMD {e:#x})", mm.pid, base << shift);
                    let nr = self.ptrs_per_pte;
                    if base % nr != 0 || base < vma.start || base + nr > vma.end() || !vma.is_anon() {
                        return Err(broken("pmd-leaf", format!("{}: a huge PMD must be aligned, inside its mapping, in a private anonymous mapping", at())));
                    }
                    let s = (base - vma.start) as usize;
                    if !vma.ptes[s..s + nr as usize].iter().all(|&x| l.pte_none(x)) {
                        return Err(broken("pmd-leaf", format!("{}: PTEs under a huge PMD", at())));
                    }
                    let head = l.pte_pfn(e);
                    if head == self.zero_pfn {
                        if l.pte_write(e) || !l.pte_special(e) {
                            return Err(broken("zero-page-pte", format!("{}: the huge zero page must be mapped special and read-only", at())));
                        }
                        continue;
                    }
                    let ok = head < n as u64 && !self.mem.is_free(head) && self.mem.folio_head(head) == head && self.mem.folio_order(head) == self.pmd_order && self.mem.test(head, PG_ANON);
                    if !ok {
                        return Err(broken("pmd-leaf", format!("{}: pfn {head:#x} is not the first page of a PMD-sized anonymous folio", at())));
                    }
                    if l.pte_write(e) && !self.mem.test(head, PG_ANON_EXCLUSIVE) {
                        return Err(broken("writable-cow-not-exclusive", format!("{}: a writable huge PMD whose head pfn {head:#x} is not exclusive", at())));
                    }
                    pmd_heads.push(head);
                    for pu in head as usize..(head + nr) as usize {
                        owner[pu] = owned_by(owner[pu], mm.pid);
                        if l.pte_write(e) {
                            writable[pu] += 1;
                        }
                    }
                    flush(&mut run)?;
                    run = Some((head, mm.mm_id, 1));
                    rss[mm_counter(&self.mem, head)] += nr as i64;
                }
                for (i, &e) in vma.ptes.iter().enumerate() {
                    if i % 4096 == 0 {
                        self.ticker.tick(4096)?;
                    }
                    if l.pte_none(e) {
                        continue;
                    }
                    let addr = (vma.start + i as u64) << shift;
                    let at = || format!("pid {} address {addr:#x} (PTE {e:#x})", mm.pid);
                    let pfn = l.pte_pfn(e);
                    if pfn == self.zero_pfn {
                        if l.pte_write(e) || !l.pte_special(e) {
                            return Err(broken("zero-page-pte", format!("{}: the zero page must be mapped special and read-only", at())));
                        }
                        continue;
                    }
                    if pfn >= n as u64 || self.mem.is_free(pfn) {
                        return Err(broken("pte-maps-free-page", format!("{} maps pfn {pfn:#x}, which is not allocated", at())));
                    }
                    let head = self.mem.folio_head(pfn);
                    let anon = self.mem.test(head, PG_ANON);
                    if vma.is_anon() && !anon {
                        return Err(broken("anon-vma-maps-file-page", format!("{} maps page-cache pfn {pfn:#x} in a private anonymous mapping", at())));
                    }
                    let pu = pfn as usize;
                    count[pu] += 1;
                    owner[pu] = owned_by(owner[pu], mm.pid);
                    if l.pte_write(e) {
                        writable[pu] += 1;
                        if vma.is_cow() && !(anon && self.mem.test(pfn, PG_ANON_EXCLUSIVE)) {
                            return Err(broken("writable-cow-not-exclusive", format!("{} is writable in a private mapping but pfn {pfn:#x} is not an exclusive anonymous page", at())));
                        }
                    }
                    if self.mem.folio_order(head) > 0 {
                        match &mut run {
                            Some((h, id, n)) if *h == head && *id == mm.mm_id => *n += 1,
                            _ => {
                                flush(&mut run)?;
                                run = Some((head, mm.mm_id, 1));
                            }
                        }
                    }
                    let c = mm_counter(&self.mem, head);
                    rss[c] += 1;
                }
            }
            flush(&mut run)?;
            for c in 0..3 {
                if rss[c] != mm.rss[c] {
                    return Err(broken("rss", format!("pid {}: {} rss counter is {}, page tables map {} such pages", mm.pid, RSS_NAMES[c], mm.rss[c], rss[c])));
                }
            }
        }
        runs.sort_unstable_by_key(|&(head, mm_id, _)| (head, mm_id));
        pmd_heads.sort_unstable();
        let mut next_run = 0usize;
        // Pins and page-cache references.
        let mut pins = try_filled(n, 0u32, "check()'s pin counts")?;
        for pin in self.pins.iter().filter(|p| p.active) {
            for &pfn in &pin.pfns {
                if pfn != self.zero_pfn {
                    if pfn >= n as u64 || self.mem.is_free(pfn) {
                        return Err(broken("pin-of-free-page", format!("a pin holds pfn {pfn:#x}, which is free")));
                    }
                    pins[pfn as usize] += 1;
                }
            }
        }
        let mut cached = try_filled(n, false, "check()'s page-cache map")?;
        for f in &self.files {
            for &pfn in f.cache.iter().filter(|&&c| c != NOT_CACHED) {
                cached[pfn as usize] = true;
            }
        }
        let mut free = 0u64;
        let mut pfn = 0usize;
        while pfn < n {
            if pfn % 4096 == 0 {
                self.ticker.tick(4096)?;
            }
            if self.mem.is_free(pfn as u64) {
                if self.mem.refcount[pfn] != 0 || self.mem.mapcount[pfn] != 0 {
                    return Err(broken("free-page-state", format!("free pfn {pfn:#x} has refcount {} mapcount {}", self.mem.refcount[pfn], self.mem.mapcount[pfn])));
                }
                free += 1;
                pfn += 1;
                continue;
            }
            let head = pfn as u64;
            let order = self.mem.folio_order(head);
            let nr = 1usize << order;
            let what = |pg: usize| format!("pfn {pg:#x} (folio {head:#x}, order {order})");
            let mut maps = 0i64;
            let mut mapped_pages = 0i32;
            let mut pin_refs = 0i64;
            for pg in pfn..pfn + nr {
                if self.mem.mapcount[pg] as u32 != count[pg] {
                    return Err(broken("page-mapcount", format!("{}: stored mapcount {}, page tables map it {} time(s){}", what(pg), self.mem.mapcount[pg], count[pg], self.where_mapped(l, pg as u64))));
                }
                if self.mem.test(pg as u64, PG_ANON_EXCLUSIVE) {
                    if owner[pg] == MANY {
                        return Err(broken("anon-exclusive-shared", format!("{} is PageAnonExclusive but mapped by several processes{}", what(pg), self.where_mapped(l, pg as u64))));
                    }
                }
                if writable[pg] > 0 && owner[pg] == MANY && self.mem.test(head, PG_ANON) {
                    return Err(broken("writable-shared-anon", format!("{} is an anonymous page mapped writable while mapped by several processes{}", what(pg), self.where_mapped(l, pg as u64))));
                }
                maps += count[pg] as i64;
                mapped_pages += (count[pg] > 0) as i32;
                pin_refs += pins[pg] as i64;
            }
            let refs = self.mem.refcount[pfn] as i64;
            let bias = if order > 0 { 1 } else { GUP_PIN_COUNTING_BIAS as i64 };
            let cache_refs = if cached[pfn] { nr as i64 } else { 0 };
            if cached[pfn] != self.mem.test(head, PG_FILE) {
                return Err(broken("page-cache-flag", format!("{}: PG_FILE does not match page-cache membership", what(pfn))));
            }
            // A huge PMD maps the folio once and holds one reference.
            let pmd_maps = (pmd_heads.partition_point(|&h| h <= head) - pmd_heads.partition_point(|&h| h < head)) as i64;
            let expect = maps + pmd_maps + pin_refs * bias + cache_refs;
            if refs != expect {
                return Err(broken("refcount", format!("{}: refcount {refs}, expected {expect} = {maps} PTE mapping(s) + {pmd_maps} PMD mapping(s) + {pin_refs} pin(s) + {cache_refs} page-cache reference(s){}", what(pfn), self.where_mapped(l, head))));
            }
            if refs <= 0 {
                return Err(broken("refcount", format!("{}: an allocated folio with refcount {refs}", what(pfn))));
            }
            if order > 0 {
                let Some(lf) = self.mem.large_folio(head) else {
                    return Err(broken("large-folio-record", format!("{} has no large-folio record", what(pfn))));
                };
                if lf.large_mapcount as i64 + 1 != maps + pmd_maps {
                    return Err(broken("large-mapcount", format!("{}: large mapcount {}, page tables map it {} time(s){}", what(pfn), lf.large_mapcount + 1, maps + pmd_maps, self.where_mapped(l, head))));
                }
                if lf.entire_mapcount as i64 + 1 != pmd_maps {
                    return Err(broken("entire-mapcount", format!("{}: entire mapcount {}, {pmd_maps} huge PMD mapping(s){}", what(pfn), lf.entire_mapcount + 1, self.where_mapped(l, head))));
                }
                if lf.nr_pages_mapped != mapped_pages {
                    return Err(broken("nr-pages-mapped", format!("{}: nr_pages_mapped {}, {mapped_pages} page(s) are mapped", what(pfn), lf.nr_pages_mapped)));
                }
                if lf.pincount as i64 != pin_refs {
                    return Err(broken("pincount", format!("{}: pincount {}, {pin_refs} pin(s)", what(pfn), lf.pincount)));
                }
                // This folio's runs: mappings per mm.
                let first = next_run + runs[next_run..].partition_point(|r| r.0 < head);
                let mut end = first;
                let (mut mms, mut have) = (0usize, [0i64; 2]);
                while end < runs.len() && runs[end].0 == head {
                    let id = runs[end].1;
                    let mut by_mm = 0i64;
                    while end < runs.len() && runs[end].0 == head && runs[end].1 == id {
                        by_mm += runs[end].2 as i64;
                        end += 1;
                    }
                    mms += 1;
                    for s in 0..2 {
                        if lf.mm_id[s] == id {
                            have[s] = by_mm;
                        }
                    }
                }
                next_run = end;
                if p.mm_id {
                    let total = maps + pmd_maps - 1;
                    for s in 0..2 {
                        let id = lf.mm_id[s];
                        let c = lf.mm_id_mapcount[s];
                        if id == MM_ID_DUMMY {
                            if c != -1 {
                                return Err(broken("mm-id-slot", format!("{}: free MM-ID slot {s} has mapcount {}", what(pfn), c + 1)));
                            }
                            continue;
                        }
                        let have = have[s];
                        if c < 0 || c as i64 + 1 > have {
                            return Err(broken("mm-id-slot", format!("{}: MM-ID slot {s} says mm {id} maps it {} time(s), it maps it {have}{}", what(pfn), c + 1, self.where_mapped(l, head))));
                        }
                    }
                    if !self.mem.test(head, PG_MAYBE_SHARED) && total >= 0 {
                        let owned = (0..2).any(|s| lf.mm_id[s] != MM_ID_DUMMY && lf.mm_id_mapcount[s] as i64 == total);
                        if !owned || mms > 1 {
                            return Err(broken("mm-id-shared-bit", format!("{}: \"maybe mapped shared\" is clear but {mms} mm(s) map it{}", what(pfn), self.where_mapped(l, head))));
                        }
                    }
                }
            }
            pfn += nr;
        }
        if free != self.mem.free_pages {
            return Err(broken("free-pages", format!("the allocator counts {} free pages, {free} pages are free", self.mem.free_pages)));
        }
        Ok(())
    }
}

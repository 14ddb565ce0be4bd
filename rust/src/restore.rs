//! Rebuilding a simulation from captured page tables (issue: replay of /proc snapshots):
//! folios are placed at their captured pfns, PTEs written as captured (bits user space cannot
//! see are inferred by the caller), then every counter is recomputed from the page tables.

use crate::arch::{PteBits, PteLayout};
use crate::error::{Error, Result};
use crate::memory::{LargeFolio, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_FILE, PG_MAYBE_SHARED, PG_SWAPBACKED};
use crate::mm::{mm_counter, NOT_CACHED};
use crate::sim::Simulation;
use crate::with_layout;

/// What a placed folio is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolioKind {
    Anon,
    /// In file `fid`'s page cache, its first page at file page `index`.
    File { fid: u32, index: u64 },
}

impl Simulation {
    /// Puts a folio of `order` at pfn `head` (naturally aligned, currently free).
    pub fn place_folio(&mut self, head: u64, order: u32, kind: FolioKind, dirty: bool) -> Result<()> {
        if order > self.st.pmd_order {
            return Err(Error::value(format!("folio order {order} is above the PMD order {}", self.st.pmd_order)));
        }
        let n = 1u64 << order;
        if head % n != 0 || !matches!(head.checked_add(n), Some(end) if end <= self.st.mem.nr_pages()) {
            return Err(Error::value(format!("folio {head:#x} of order {order} is unaligned or beyond memory")));
        }
        if let FolioKind::File { fid, index } = kind {
            let f = self.st.files.get(fid as usize).ok_or_else(|| Error::value(format!("no file {fid}")))?;
            let beyond = !matches!(index.checked_add(n), Some(end) if end <= f.nr_pages);
            if beyond || f.cache[index as usize..(index + n) as usize].iter().any(|&c| c != NOT_CACHED) {
                return Err(Error::value(format!("file {fid} pages from {index} ({n} of them) are beyond the file or cached")));
            }
        }
        if !self.st.mem.alloc_at(head, order) {
            return Err(Error::value(format!("pfns {head:#x}..{:#x} are not free", head + n)));
        }
        let m = &mut self.st.mem;
        match kind {
            FolioKind::Anon => m.set(head, PG_ANON | PG_SWAPBACKED),
            FolioKind::File { fid, index } => {
                let f = &mut self.st.files[fid as usize];
                m.set(head, PG_FILE | if f.shmem { PG_SWAPBACKED } else { 0 });
                for j in 0..n {
                    f.cache[(index + j) as usize] = head + j;
                }
            }
        }
        if dirty {
            m.set(head, PG_DIRTY);
        }
        Ok(())
    }

    /// Writes one PTE of process `pid` as captured; `pfn` is an allocated page or the zero page.
    #[allow(clippy::too_many_arguments)]
    pub fn place_pte(&mut self, pid: u32, addr: u64, pfn: u64, write: bool, dirty: bool, young: bool, soft_dirty: bool, uffd_wp: bool) -> Result<()> {
        let (k, v) = self.vma_index(pid, addr)?;
        let zero = pfn == self.st.zero_pfn;
        if !zero && (pfn >= self.st.mem.nr_pages() || self.st.mem.is_free(pfn)) {
            return Err(Error::value(format!("pfn {pfn:#x} is not a placed folio's page")));
        }
        let caps = self.layout.caps();
        let vma = &self.st.mms[k].vmas[v];
        let bits = PteBits {
            present: true,
            write: write && !zero,
            dirty: dirty && !zero,
            young,
            soft_dirty: soft_dirty && caps.soft_dirty,
            uffd_wp: uffd_wp && caps.uffd_wp,
            exec: vma.prot.exec,
            special: zero,
            prot_none: vma.prot.none(),
            cont: false,
        };
        let pte = with_layout!(&self.layout, l => l.mk_pte(pfn, PteBits { write: bits.write && !bits.prot_none, exec: bits.exec && !bits.prot_none, ..bits }))?;
        let vpn = addr >> self.st.page_shift;
        if self.st.huge_pmd(k, v, vpn).is_some() {
            return Err(Error::value(format!("{addr:#x} is mapped by a huge PMD")));
        }
        let i = (vpn - self.st.mms[k].vmas[v].start) as usize;
        self.st.mms[k].vmas[v].ptes[i] = pte;
        Ok(())
    }

    /// Writes one captured huge PMD of process `pid` at the PMD-aligned `addr`: `pfn` is the
    /// first page of a placed PMD-sized anonymous folio, or the zero pfn (the huge zero page).
    #[allow(clippy::too_many_arguments)]
    pub fn place_pmd(&mut self, pid: u32, addr: u64, pfn: u64, write: bool, dirty: bool, young: bool, soft_dirty: bool, uffd_wp: bool) -> Result<()> {
        let (k, v) = self.vma_index(pid, addr)?;
        let zero = pfn == self.st.zero_pfn;
        let caps = self.layout.caps();
        let vma = &self.st.mms[k].vmas[v];
        let prot_none = vma.prot.none();
        let bits = PteBits {
            present: true,
            write: write && !zero && !prot_none,
            dirty: dirty && !zero,
            young,
            soft_dirty: soft_dirty && caps.soft_dirty,
            uffd_wp: uffd_wp && caps.uffd_wp,
            exec: vma.prot.exec && !prot_none,
            special: zero,
            prot_none,
            cont: false,
        };
        let e = with_layout!(&self.layout, l => l.mk_pte(pfn, bits))?;
        let base = addr >> self.st.page_shift;
        with_layout!(&self.layout, l => self.st.place_huge_pmd(l, k, v, base, pfn, e))
    }

    /// Recomputes every counter from the page tables: mapcounts, refcounts (mappings plus
    /// page-cache references), large-folio records, MM-ID slots (in process order) and the
    /// shared bit, rss, and PageAnonExclusive (inferred: an anonymous page mapped once; under
    /// a huge PMD mapped once, the head only, as a PMD fault leaves it).
    /// Placed folios that nothing maps or caches are freed.
    pub fn rebuild_accounting(&mut self) -> Result<()> {
        let st = &mut self.st;
        let n = st.mem.nr_pages();
        let mut heads = Vec::new();
        let mut pfn = 0u64;
        while pfn < n {
            if st.mem.is_free(pfn) {
                pfn += 1;
                continue;
            }
            let o = st.mem.folio_order(pfn);
            heads.push(pfn);
            for p in pfn..pfn + (1 << o) {
                st.mem.mapcount[p as usize] = 0;
                st.mem.clear(p, PG_ANON_EXCLUSIVE);
            }
            st.mem.clear(pfn, PG_MAYBE_SHARED);
            st.mem.refcount[pfn as usize] = 0;
            if o > 0 {
                *st.mem.lf(pfn) = LargeFolio { large_mapcount: -1, entire_mapcount: -1, nr_pages_mapped: 0, pincount: 0, mm_id: [MM_ID_DUMMY; 2], mm_id_mapcount: [-1; 2] };
            }
            pfn += 1 << o;
        }
        for f in &st.files {
            for &c in f.cache.iter().filter(|&&c| c != NOT_CACHED) {
                if st.mem.folio_head(c) == c {
                    st.mem.refcount[c as usize] += 1 << st.mem.folio_order(c);
                }
            }
        }
        let mm_id_on = self.profile.mm_id;
        let zero = st.zero_pfn;
        for mi in 0..st.mms.len() {
            let mm_id = st.mms[mi].mm_id;
            let mut rss = [0i64; 3];
            for vi in 0..st.mms[mi].vmas.len() {
                let mut any_anon = !st.mms[mi].vmas[vi].pmds.is_empty();
                let pmd_heads: Vec<u64> = st.mms[mi].vmas[vi].pmds.values().map(|&e| with_layout!(&self.layout, l => l.pte_pfn(e))).collect();
                for head in pmd_heads.into_iter().filter(|&h| h != zero) {
                    st.mem.refcount[head as usize] += 1;
                    rss[mm_counter(&st.mem, head)] += st.ptrs_per_pte as i64;
                    let lf = st.mem.lf(head);
                    lf.entire_mapcount += 1;
                    lf.large_mapcount += 1;
                    if mm_id_on {
                        let slot = (0..2).find(|&s| lf.mm_id[s] == mm_id).or_else(|| (0..2).find(|&s| lf.mm_id[s] == MM_ID_DUMMY));
                        if let Some(s) = slot {
                            lf.mm_id[s] = mm_id;
                            lf.mm_id_mapcount[s] += 1;
                        }
                    }
                }
                for i in 0..st.mms[mi].vmas[vi].ptes.len() {
                    let e = st.mms[mi].vmas[vi].ptes[i];
                    let pfn = with_layout!(&self.layout, l => if l.pte_none(e) { None } else { Some(l.pte_pfn(e)) });
                    let Some(pfn) = pfn.filter(|&p| p != zero) else { continue };
                    let head = st.mem.folio_head(pfn);
                    st.mem.mapcount[pfn as usize] += 1;
                    st.mem.refcount[head as usize] += 1;
                    let anon = st.mem.test(head, PG_ANON);
                    any_anon |= anon;
                    rss[mm_counter(&st.mem, head)] += 1;
                    if st.mem.folio_order(head) > 0 {
                        let first = st.mem.mapcount[pfn as usize] == 1;
                        let lf = st.mem.lf(head);
                        lf.large_mapcount += 1;
                        if first {
                            lf.nr_pages_mapped += 1;
                        }
                        if mm_id_on {
                            let slot = (0..2).find(|&s| lf.mm_id[s] == mm_id).or_else(|| (0..2).find(|&s| lf.mm_id[s] == MM_ID_DUMMY));
                            // A third mm takes no slot; the folio then counts as maybe-shared
                            // (below), since no slot holds all its mappings.
                            if let Some(s) = slot {
                                lf.mm_id[s] = mm_id;
                                lf.mm_id_mapcount[s] += 1;
                            }
                        }
                    }
                }
                if any_anon && st.mms[mi].vmas[vi].anon_vma == 0 {
                    let a = st.new_anon_vma();
                    st.mms[mi].vmas[vi].anon_vma = a;
                }
            }
            st.mms[mi].rss = rss;
        }
        for head in heads {
            let o = st.mem.folio_order(head);
            if st.mem.refcount[head as usize] == 0 {
                st.mem.free(head);
                continue;
            }
            let anon = st.mem.test(head, PG_ANON);
            let entire = st.mem.large_folio(head).map(|lf| lf.entire_mapcount + 1).unwrap_or(0);
            for p in head..head + (1 << o) {
                let ptes = st.mem.mapcount[p as usize];
                if anon && ((ptes == 1 && entire == 0) || (ptes == 0 && entire == 1 && p == head)) {
                    st.mem.set(p, PG_ANON_EXCLUSIVE);
                }
            }
            if o > 0 && mm_id_on {
                let lf = *st.mem.large_folio(head).expect("large folio");
                if lf.large_mapcount >= 0 && !lf.mm_id_mapcount.contains(&lf.large_mapcount) {
                    st.mem.set(head, PG_MAYBE_SHARED);
                }
            }
        }
        // A writable PTE on a page that turned out not to be exclusive cannot exist.
        for mm in &mut st.mms {
            for vma in &mut mm.vmas {
                if !vma.is_cow() {
                    continue;
                }
                for e in vma.pmds.values_mut() {
                    with_layout!(&self.layout, l => {
                        if l.pte_write(*e) && !st.mem.test(l.pte_pfn(*e), PG_ANON_EXCLUSIVE) {
                            *e = l.pte_wrprotect(*e);
                        }
                    });
                }
                for e in vma.ptes.iter_mut() {
                    with_layout!(&self.layout, l => {
                        if !l.pte_none(*e) && l.pte_write(*e) {
                            let pfn = l.pte_pfn(*e);
                            if pfn == zero || !st.mem.test(pfn, PG_ANON_EXCLUSIVE) {
                                *e = l.pte_wrprotect(*e);
                            }
                        }
                    });
                }
            }
        }
        with_layout!(&self.layout, l => self.st.check(l, &self.profile))
    }
}

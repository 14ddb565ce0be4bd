//! What /proc shows of the simulation: /proc/<pid>/pagemap entries (huge PMDs included),
//! /proc/kpagecount, /proc/kpageflags and smaps' AnonHugePages, computed as fs/proc/task_mmu.c
//! pte_to_pagemap_entry() / pagemap_pmd_range() / smaps_pmd_entry() and fs/proc/page.c
//! kpagecount_read() / stable_page_flags() do.

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::huge_memory::{pmd_pagemap_exclusive, PmdPagemapExclusive};
use crate::memory::{PG_ANON, PG_MAYBE_SHARED};
use crate::sim::State;

pub const PM_PFRAME_MASK: u64 = (1 << 55) - 1;
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
pub const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
pub const PM_UFFD_WP: u64 = 1 << 57;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_PRESENT: u64 = 1 << 63;

/// /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h).
pub const KPF_MMAP: u64 = 1 << 11;
pub const KPF_ANON: u64 = 1 << 12;
pub const KPF_COMPOUND_HEAD: u64 = 1 << 15;
pub const KPF_COMPOUND_TAIL: u64 = 1 << 16;
pub const KPF_THP: u64 = 1 << 22;
pub const KPF_ZERO_PAGE: u64 = 1 << 24;

impl State {
    /// `folio_maybe_mapped_shared()` (v6.15+; include/linux/mm.h).
    fn folio_maybe_mapped_shared(&self, head: u64) -> bool {
        let mapcount = self.mem.folio_mapcount(head);
        if self.mem.folio_order(head) == 0 {
            return mapcount > 1;
        }
        mapcount > 1 && self.mem.test(head, PG_MAYBE_SHARED)
    }

    /// `folio_precise_page_mapcount()` (`page_mapcount()` before v6.12): the page's PTE
    /// mappings plus the folio's entire (PMD) mappings.
    pub fn precise_page_mapcount(&self, pfn: u64) -> i64 {
        let head = self.mem.folio_head(pfn);
        let entire = self.mem.large_folio(head).map(|lf| lf.entire_mapcount as i64 + 1).unwrap_or(0);
        self.mem.mapcount[pfn as usize] as i64 + entire
    }

    /// `pagemap_pmd_range()`'s entry for `vpn` under the huge PMD `e` at `base`.
    fn pmd_pagemap_entry<L: PteLayout>(&self, l: &L, p: &KernelProfile, e: u64, base: u64, vpn: u64, mut flags: u64) -> u64 {
        flags |= PM_PRESENT;
        if l.pte_soft_dirty(e) {
            flags |= PM_SOFT_DIRTY;
        }
        if l.pte_uffd_wp(e) {
            flags |= PM_UFFD_WP;
        }
        let head = l.pte_pfn(e);
        if head == self.zero_pfn {
            // The huge zero folio: not anonymous (PM_FILE), never rmap-mapped (mapcount 0, so
            // "exclusive" only by the newest tree's folio_maybe_mapped_shared()). The model
            // shows the one zero pfn for all its pages.
            if pmd_pagemap_exclusive(p) == PmdPagemapExclusive::Folio {
                flags |= PM_MMAP_EXCLUSIVE;
            }
            return (head & PM_PFRAME_MASK) | flags | PM_FILE;
        }
        let frame = head + (vpn - base);
        let exclusive = match pmd_pagemap_exclusive(p) {
            PmdPagemapExclusive::Head => self.precise_page_mapcount(head) == 1,
            PmdPagemapExclusive::PerPage => self.precise_page_mapcount(frame) == 1,
            PmdPagemapExclusive::Folio => !self.folio_maybe_mapped_shared(head),
        };
        if exclusive {
            flags |= PM_MMAP_EXCLUSIVE;
        }
        (frame & PM_PFRAME_MASK) | flags
    }

    /// `pagemap_read()` of `[a, b)` (vpns) for process `k`, as root (PFNs shown).
    pub fn pagemap<L: PteLayout>(&self, l: &L, p: &KernelProfile, k: usize, a: u64, b: u64) -> Result<Vec<u64>> {
        let mm = &self.mms[k];
        let caps = l.caps();
        let mut out = crate::alloc::try_with_capacity((b - a) as usize, "a pagemap buffer")?;
        for vpn in a..b {
            if vpn % 4096 == 0 {
                self.ticker.tick(4096)?;
            }
            let Some(v) = mm.find_vma(vpn) else {
                out.push(0);
                continue;
            };
            let vma = &mm.vmas[v];
            let mut flags = 0u64;
            // A VMA with VM_SOFTDIRTY reports every page soft-dirty (CONFIG_MEM_SOFT_DIRTY).
            if caps.soft_dirty && vma.vm_softdirty {
                flags |= PM_SOFT_DIRTY;
            }
            if let Some((base, e)) = self.huge_pmd(k, v, vpn) {
                out.push(self.pmd_pagemap_entry(l, p, e, base, vpn, flags));
                continue;
            }
            let pte = vma.ptes[(vpn - vma.start) as usize];
            if l.pte_none(pte) {
                out.push(flags);
                continue;
            }
            flags |= PM_PRESENT;
            if l.pte_soft_dirty(pte) {
                flags |= PM_SOFT_DIRTY;
            }
            if l.pte_uffd_wp(pte) {
                flags |= PM_UFFD_WP;
            }
            if let Some(pg) = self.vm_normal_page(l, pte) {
                let head = self.mem.folio_head(pg);
                if !self.mem.test(head, PG_ANON) {
                    flags |= PM_FILE;
                }
                let exclusive = if p.pagemap_exclusive_by_folio {
                    !self.folio_maybe_mapped_shared(head)
                } else {
                    // CONFIG_PAGE_MAPCOUNT: the page's own (precise) mapcount.
                    self.precise_page_mapcount(pg) == 1
                };
                if exclusive {
                    flags |= PM_MMAP_EXCLUSIVE;
                }
            }
            out.push((l.pte_pfn(pte) & PM_PFRAME_MASK) | flags);
        }
        Ok(out)
    }

    /// /proc/kpagecount: the page's precise mapcount (CONFIG_PAGE_MAPCOUNT); 0 for free
    /// pages and for the shared zero page, which the rmap does not track.
    pub fn kpagecount(&self, pfn: u64) -> Result<u64> {
        if pfn == self.zero_pfn {
            return Ok(0);
        }
        if pfn >= self.mem.nr_pages() {
            return Err(Error::value(format!("pfn {pfn:#x} is beyond the {} pages of memory", self.mem.nr_pages())));
        }
        Ok(if self.mem.is_free(pfn) { 0 } else { self.precise_page_mapcount(pfn) as u64 })
    }

    /// /proc/kpageflags, the bits the model knows: KPF_ANON, KPF_MMAP, KPF_COMPOUND_HEAD /
    /// _TAIL and KPF_THP for large folios (any order, as `stable_page_flags()` reports them),
    /// KPF_ZERO_PAGE for the zero page. 0 for a free page.
    pub fn kpageflags(&self, pfn: u64) -> Result<u64> {
        if pfn == self.zero_pfn {
            return Ok(KPF_ZERO_PAGE);
        }
        if pfn >= self.mem.nr_pages() {
            return Err(Error::value(format!("pfn {pfn:#x} is beyond the {} pages of memory", self.mem.nr_pages())));
        }
        if self.mem.is_free(pfn) {
            return Ok(0);
        }
        let head = self.mem.folio_head(pfn);
        let mut f = 0;
        if self.mem.test(head, PG_ANON) {
            f |= KPF_ANON;
        }
        if self.mem.folio_mapcount(head) > 0 {
            f |= KPF_MMAP;
        }
        if self.mem.folio_order(head) > 0 {
            f |= KPF_THP | if pfn == head { KPF_COMPOUND_HEAD } else { KPF_COMPOUND_TAIL };
        }
        Ok(f)
    }

    /// smaps' AnonHugePages of VMA `v` of process `k`, in pages: anonymous folios mapped by a
    /// huge PMD (`smaps_pmd_entry()`; the huge zero page does not count).
    pub fn anon_huge_pages<L: PteLayout>(&self, l: &L, k: usize, v: usize) -> u64 {
        let vma = &self.mms[k].vmas[v];
        vma.pmds.values().filter(|&&e| l.pte_pfn(e) != self.zero_pfn).count() as u64 * self.ptrs_per_pte
    }
}

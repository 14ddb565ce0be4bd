//! What /proc shows of the simulation: /proc/<pid>/pagemap entries and /proc/kpagecount,
//! computed as fs/proc/task_mmu.c pte_to_pagemap_entry() and fs/proc/page.c kpagecount_read() do.

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::memory::{PG_ANON, PG_MAYBE_SHARED};
use crate::sim::State;

pub const PM_PFRAME_MASK: u64 = (1 << 55) - 1;
pub const PM_SOFT_DIRTY: u64 = 1 << 55;
pub const PM_MMAP_EXCLUSIVE: u64 = 1 << 56;
pub const PM_UFFD_WP: u64 = 1 << 57;
pub const PM_FILE: u64 = 1 << 61;
pub const PM_PRESENT: u64 = 1 << 63;

impl State {
    /// `folio_maybe_mapped_shared()` (v6.15+; include/linux/mm.h).
    fn folio_maybe_mapped_shared(&self, head: u64) -> bool {
        let mapcount = self.mem.folio_mapcount(head);
        if self.mem.folio_order(head) == 0 {
            return mapcount > 1;
        }
        mapcount > 1 && self.mem.test(head, PG_MAYBE_SHARED)
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
                    // CONFIG_PAGE_MAPCOUNT: the page's own mapcount.
                    self.mem.mapcount[pg as usize] == 1
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
        Ok(if self.mem.is_free(pfn) { 0 } else { self.mem.mapcount[pfn as usize] as u64 })
    }
}

//! Page-cache faults: `do_read_fault()` with fault-around (`do_fault_around()` →
//! `filemap_map_pages()` → `filemap_map_folio_range()` / `set_pte_range()`), `do_shared_fault()`,
//! `do_cow_fault()`, and `finish_fault()` mapping a whole page-cache folio where the kernel
//! version does (mm/memory.c, mm/filemap.c; v6.8 – v7.0).
//!
//! Every cached page is uptodate and unlocked here (no I/O, no truncation), so fault-around
//! maps every cached page of its window whose PTE is none.

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::{FinishFaultFolio, KernelProfile};
use crate::memory::{PG_DIRTY, PG_FILE, PG_SWAPBACKED};
use crate::mm::{user_pte, ShmemKind, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, NOT_CACHED};
use crate::shmem::ShmemFault;
use crate::sim::State;

fn oom() -> Error {
    Error::out_of_memory("out of memory: no free page for the allocation")
}

impl State {
    /// `mm_counter_file()`: the rss counter of file `f`'s pages.
    fn file_counter(&self, f: usize) -> usize {
        if self.files[f].shmem {
            MM_SHMEMPAGES
        } else {
            MM_FILEPAGES
        }
    }

    /// The page-cache folio holding file page `idx` of file `f`, read in if absent
    /// (`filemap_fault()` / `shmem_fault()`): a shmem object under a shmem policy chooses the
    /// order as mm/shmem.c does (shmem.rs); otherwise a folio of the file's order when its
    /// aligned range is uncached and memory allows, else one page.
    fn filemap_get<L: PteLayout>(&mut self, _l: &L, p: &KernelProfile, k: usize, v: usize, f: usize, idx: u64) -> Result<u64> {
        let cached = self.files[f].cache[idx as usize];
        if cached != NOT_CACHED {
            return Ok(cached);
        }
        let file = &self.files[f];
        let (head, order, base) = if file.kind == ShmemKind::Fixed {
            let order = file.folio_order;
            let mut got = None;
            if order > 0 {
                let n = 1u64 << order;
                let base = idx & !(n - 1);
                let free = file.cache[base as usize..(base + n) as usize].iter().all(|&c| c == NOT_CACHED);
                if free && !self.mem.fragmented(order) {
                    got = self.mem.alloc(order).map(|h| (h, order, base));
                }
            }
            match got {
                Some(g) => g,
                None => (self.mem.alloc(0).ok_or_else(oom)?, 0, idx),
            }
        } else {
            let vma = &self.mms[k].vmas[v];
            let fault = ShmemFault {
                index: idx,
                i_size: file.nr_pages,
                kind: file.kind,
                // VM_HUGEPAGE, and vma_thp_disabled() (VM_NOHUGEPAGE or PR_SET_THP_DISABLE),
                // which shmem_allowable_huge_orders() checks first (mm/shmem.c).
                vm_hugepage: vma.hugepage,
                vm_nohugepage: crate::policy::vma_thp_disabled(vma, self.mms[k].thp_disable),
                vma_start: vma.start,
                vma_end: vma.end(),
                vma_pgoff: vma.pgoff,
                vpn: vma.start + (idx - vma.pgoff),
            };
            self.shmem_alloc_folio(p, f, &fault)?
        };
        self.op.allocated(order);
        let nr = 1u64 << order;
        // __filemap_add_folio() / shmem_add_to_page_cache(): one reference per page.
        self.mem.refcount[head as usize] = nr as i32;
        self.op.refcount_atomics += 1;
        let shmem = self.files[f].shmem;
        self.mem.set(head, PG_FILE | if shmem { PG_SWAPBACKED } else { 0 });
        for j in 0..nr {
            self.files[f].cache[(base + j) as usize] = head + j;
        }
        Ok(head + (idx - base))
    }

    /// `do_fault()` for a file VMA: `do_read_fault()`, `do_cow_fault()` or `do_shared_fault()`.
    pub(crate) fn do_file_fault<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, write: bool) -> Result<()> {
        let vma = &self.mms[k].vmas[v];
        let f = vma.file.expect("file VMA") as usize;
        let idx = vma.pgoff + (vpn - vma.start);
        if write && !vma.shared {
            return self.do_cow_fault(l, p, k, v, vpn, f, idx);
        }
        // do_read_fault(): map what is cached around the fault first (should_fault_around():
        // every object here has ->map_pages; uffd-wp registration disables it).
        if !write && !vma.uffd_wp && self.fault_around_pages > 1 && self.do_fault_around(l, p, k, v, vpn) {
            return Ok(());
        }
        let page = self.filemap_get(l, p, k, v, f, idx)?;
        if write {
            let head = self.mem.folio_head(page);
            self.mem.set(head, PG_DIRTY);
        }
        self.finish_fault(l, p, k, v, vpn, page, write)
    }

    /// `do_cow_fault()`: the private copy is allocated before the file page is read.
    #[allow(clippy::too_many_arguments)]
    fn do_cow_fault<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, f: usize, idx: u64) -> Result<()> {
        let new = self.mem.alloc(0).ok_or_else(oom)?;
        self.op.allocated(0);
        let page = match self.filemap_get(l, p, k, v, f, idx) {
            Ok(pg) => pg,
            Err(e) => {
                self.mem.free(new);
                self.op.folios_freed += 1;
                return Err(e);
            }
        };
        self.mem.token[new as usize] = self.mem.token[page as usize];
        self.op.pages_copied += 1;
        self.op.cow_copies += 1;
        let mm_id = self.mms[k].mm_id;
        self.rmap(p).add_new_anon(new, mm_id);
        self.ensure_anon_vma(k, v);
        let mm = &mut self.mms[k];
        mm.rss[MM_ANONPAGES] += 1;
        let vma = &mm.vmas[v];
        let i = (vpn - vma.start) as usize;
        let pte = user_pte(l, new, vma.prot, vma.prot.write, true);
        self.set_pte(l, p, k, v, i, pte);
        Ok(())
    }

    /// `do_fault_around()`: the window of `fault_around_pages` around `vpn`, naturally aligned
    /// in the page table and clamped to the VMA and to the page table; maps what is cached
    /// there. Returns whether the faulting page was mapped (VM_FAULT_NOPAGE).
    fn do_fault_around<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64) -> bool {
        let nr = self.fault_around_pages;
        let vma = &self.mms[k].vmas[v];
        let pte_off = vpn & (self.ptrs_per_pte - 1);
        let vma_off = vpn - vma.start;
        let vma_pages = vma.ptes.len() as u64;
        let from_pte = (pte_off & !(nr - 1)).max(pte_off - pte_off.min(vma_off));
        let to_pte = (from_pte + nr).min(self.ptrs_per_pte).min(pte_off + vma_pages - vma_off) - 1;
        let idx = vma.pgoff + vma_off;
        self.filemap_map_pages(l, p, k, v, vpn, idx + from_pte - pte_off, idx + to_pte - pte_off)
    }

    /// `filemap_map_pages()`: maps the cached pages of file pages `[start, end]` whose PTEs are
    /// none, each folio's run at once; returns whether the page at `fault_vpn` was mapped.
    #[allow(clippy::too_many_arguments)]
    fn filemap_map_pages<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, fault_vpn: u64, start: u64, end: u64) -> bool {
        let vma = &self.mms[k].vmas[v];
        let f = vma.file.expect("file VMA") as usize;
        let (vstart, pgoff) = (vma.start, vma.pgoff);
        let mut rss = 0;
        let mut hit = false;
        let mut idx = start;
        while idx <= end {
            let c = self.files[f].cache[idx as usize];
            if c == NOT_CACHED {
                idx += 1;
                continue;
            }
            let head = self.mem.folio_head(c);
            let n = 1u64 << self.mem.folio_order(head);
            let folio_index = idx - (c - head);
            let folio_last = folio_index + n - 1;
            let nr_pages = folio_last.min(end) - idx + 1;
            // filemap_map_pmd(): a PMD-sized folio over an empty page table.
            if n == self.ptrs_per_pte && self.map_file_folio_pmd(head) {
                return true;
            }
            let (mapped, got) = self.filemap_map_folio_range(l, p, k, v, fault_vpn, head, idx - folio_index, vstart + (idx - pgoff), nr_pages);
            rss += mapped;
            hit |= got;
            idx = folio_last + 1;
        }
        let counter = self.file_counter(f);
        self.mms[k].rss[counter] += rss as i64;
        hit
    }

    /// `filemap_map_folio_range()` (and `filemap_map_order0_folio()`): maps pages `start ..
    /// start + nr_pages` of the folio at `head` from `vpn` on, run by run between PTEs that are
    /// not none; from v6.18 the whole folio where it lies in the VMA and one page table.
    /// Returns (pages mapped, whether `fault_vpn` was).
    #[allow(clippy::too_many_arguments)]
    fn filemap_map_folio_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, fault_vpn: u64, head: u64, start: u64, vpn: u64, nr_pages: u64) -> (u64, bool) {
        let n = 1u64 << self.mem.folio_order(head);
        let (mut first, mut page, mut count) = (vpn, head + start, nr_pages);
        if p.fault_around_whole_folio && n > 1 {
            let vma = &self.mms[k].vmas[v];
            let vpn0 = vpn - start;
            let pmd = self.ptrs_per_pte;
            let in_vma = vpn0 >= vma.start && vpn0 + n <= vma.end();
            if in_vma && vpn0 / pmd == (vpn0 + n - 1) / pmd {
                (first, page, count) = (vpn0, head, n);
            }
        }
        let (mut mapped, mut hit) = (0, false);
        let mut run = 0;
        self.op.pte_reads += count;
        for j in 0..=count {
            let none = j < count && {
                let vma = &self.mms[k].vmas[v];
                l.pte_none(vma.ptes[(first + j - vma.start) as usize])
            };
            if none {
                run += 1;
                continue;
            }
            if run > 0 {
                let (rv, rp) = (first + j - run, page + j - run);
                self.set_pte_range(l, p, k, v, head, rp, rv, run, false);
                self.rmap(p).ref_add(head, run as i32);
                mapped += run;
                hit |= (rv..rv + run).contains(&fault_vpn);
                run = 0;
            }
        }
        (mapped, hit)
    }

    /// `set_pte_range()`: `nr` PTEs from `vpn` for pages from `page` of the folio at `head`,
    /// with the file rmap. Prefaulted PTEs are young too: `arch_wants_old_prefaulted_pte()`
    /// is false on x86 and on arm64 with hardware access flags.
    #[allow(clippy::too_many_arguments)]
    fn set_pte_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, head: u64, page: u64, vpn: u64, nr: u64, write: bool) {
        let mm_id = self.mms[k].mm_id;
        let vma = &self.mms[k].vmas[v];
        let pw = self.page_prot_write(l, vma);
        // v6.16: a writable PTE of a dirty folio starts dirty (was s390's mk_pte()).
        let dirty = write || (p.set_pte_dirty_folio && pw && self.mem.test(head, PG_DIRTY));
        let pte = user_pte(l, page, vma.prot, pw || (write && vma.prot.write), dirty);
        let i = (vpn - vma.start) as usize;
        self.rmap(p).add_file_ptes(head, page, nr, mm_id);
        self.set_ptes(l, p, k, v, i, pte, nr as usize);
    }

    /// `finish_fault()` for a read or shared fault on `page`: one PTE, or from v6.11 the whole
    /// folio where the version maps it (shmem, then every file), it lies in the VMA and one
    /// page table, the VMA is not registered with userfaultfd and its PTEs are all none.
    #[allow(clippy::too_many_arguments)]
    fn finish_fault<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize, v: usize, vpn: u64, page: u64, write: bool) -> Result<()> {
        let head = self.mem.folio_head(page);
        let n = 1u64 << self.mem.folio_order(head);
        // do_set_pmd(): a PMD-sized folio over an empty page table.
        if n == self.ptrs_per_pte && self.map_file_folio_pmd(head) {
            return Ok(());
        }
        let vma = &self.mms[k].vmas[v];
        let f = vma.file.expect("file VMA") as usize;
        let kind = self.files[f].kind;
        let whole = match p.finish_fault_folio {
            FinishFaultFolio::Page => false,
            FinishFaultFolio::AnonShmem => kind == ShmemKind::Anon,
            FinishFaultFolio::Shmem => self.files[f].shmem,
            FinishFaultFolio::AnyFile => true,
        };
        let (mut first, mut from, mut nr) = (vpn, page, 1);
        if whole && n > 1 && !vma.uffd_wp {
            let idx = page - head;
            let vma_off = vpn - vma.start;
            let pte_off = vpn & (self.ptrs_per_pte - 1);
            let fits = vma_off >= idx && vma_off + (n - idx) <= vma.ptes.len() as u64 && pte_off >= idx && pte_off + (n - idx) <= self.ptrs_per_pte;
            if fits {
                let s = (vpn - idx - vma.start) as usize;
                self.op.pte_reads += n;
                // Not all none: one PTE (v6.14 "mm: fix finish_fault() handling for large
                // folios"; v6.11 – v6.13 retried the fault forever, which the model does not
                // reproduce).
                if vma.ptes[s..s + n as usize].iter().all(|&e| l.pte_none(e)) {
                    (first, from, nr) = (vpn - idx, head, n);
                }
            }
        }
        // The fault's reference (from filemap_fault()) and one per further page.
        self.rmap(p).ref_add(head, 1);
        if nr > 1 {
            self.rmap(p).ref_add(head, nr as i32 - 1);
        }
        self.set_pte_range(l, p, k, v, head, from, first, nr, write);
        let counter = self.file_counter(f);
        self.mms[k].rss[counter] += nr as i64;
        Ok(())
    }

    /// `do_set_pmd()` (mm/memory.c) for a PMD-sized page-cache folio: whether it was mapped with
    /// one PMD. PMD mappings of page-cache folios are not built in this model: such a folio
    /// is PTE-mapped, as when the kernel falls back. The PMD-mapped THP support hooks in here.
    fn map_file_folio_pmd(&mut self, _head: u64) -> bool {
        false
    }
}

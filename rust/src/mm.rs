//! Address spaces: `mm_struct`s with their VMAs, each VMA's PTEs as one array, rss counters,
//! and the page-cache objects (files and shmem) that file-backed VMAs map.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::arch::{Caps, PteLayout};
use crate::memory::{PG_ANON, PG_SWAPBACKED};
use crate::ptes::PteTable;

/// `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SHMEMPAGES` (include/linux/mm_types_task.h).
pub const MM_FILEPAGES: usize = 0;
pub const MM_ANONPAGES: usize = 1;
pub const MM_SHMEMPAGES: usize = 2;
pub const RSS_NAMES: [&str; 3] = ["file", "anon", "shmem"];

/// `mm_counter(folio)`: the rss counter a folio's pages are counted in.
#[inline]
pub fn mm_counter<M: crate::rmap::FolioCounts>(mem: &M, head: u64) -> usize {
    mm_counter_of(mem.flags_of(head))
}

/// [`mm_counter`] from the flags of the folio's first page.
#[inline]
pub fn mm_counter_of(flags: u8) -> usize {
    if flags & PG_ANON != 0 {
        MM_ANONPAGES
    } else if flags & PG_SWAPBACKED != 0 {
        MM_SHMEMPAGES
    } else {
        MM_FILEPAGES
    }
}

/// `PROT_READ | PROT_WRITE | PROT_EXEC`; all false is PROT_NONE.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Prot {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
}

impl Prot {
    /// Parses "rw", "r", "rwx", "none", "" (PROT_NONE), in any letter order.
    pub fn parse(s: &str) -> Option<Prot> {
        if s == "none" {
            return Some(Prot::default());
        }
        let mut p = Prot::default();
        for c in s.chars() {
            match c {
                'r' => p.read = true,
                'w' => p.write = true,
                'x' => p.exec = true,
                '-' => {}
                _ => return None,
            }
        }
        Some(p)
    }

    pub fn none(&self) -> bool {
        !self.read && !self.write && !self.exec
    }

    pub fn as_string(&self) -> String {
        if self.none() {
            return "none".into();
        }
        let mut s = String::new();
        if self.read {
            s.push('r');
        }
        if self.write {
            s.push('w');
        }
        if self.exec {
            s.push('x');
        }
        s
    }
}

/// A virtual memory area. Addresses are virtual page numbers.
#[derive(Clone, Debug)]
pub struct Vma {
    pub start: u64,
    /// Entry `i` maps virtual page `start + i`.
    pub ptes: PteTable,
    pub prot: Prot,
    /// VM_SHARED (VM_MAYWRITE is assumed, so a private mapping is a COW mapping).
    pub shared: bool,
    /// The file or shmem object mapped, and the file page of `start`.
    pub file: Option<u32>,
    pub pgoff: u64,
    /// VM_SOFTDIRTY: set at mmap; soft-dirty tracking is on only while it is clear.
    pub vm_softdirty: bool,
    /// Registered with userfaultfd in write-protect mode (VM_UFFD_WP).
    pub uffd_wp: bool,
    /// The uffd context has UFFD_FEATURE_EVENT_FORK, so the child VMA keeps VM_UFFD_WP.
    pub uffd_event_fork: bool,
    /// MADV_DONTFORK (VM_DONTCOPY) and MADV_WIPEONFORK.
    pub dontfork: bool,
    pub wipeonfork: bool,
    /// The VMA's anon_vma (0 = none yet); VMAs split from one VMA share it.
    pub anon_vma: u32,
    /// Anonymous folio orders of an explicit size list given at mmap (bit n = order n, bit 0
    /// always set), a model shortcut standing in for the sysfs controls; 0 = follow the THP
    /// policy ([`crate::policy`]).
    pub mthp: u32,
    /// VM_HUGEPAGE / VM_NOHUGEPAGE (MADV_HUGEPAGE / MADV_NOHUGEPAGE; never both).
    pub hugepage: bool,
    pub nohugepage: bool,
    /// `pmd=True`: anonymous faults map a PMD THP where a whole aligned PMD range lies in
    /// the VMA and its page table is empty (THP `enabled=always` for this mapping).
    pub thp_pmd: bool,
    /// Huge PMD leaves: the first vpn of a PMD-aligned range → the PMD entry, encoded as a
    /// PTE of the layout (pfn of the folio's first page, or the zero pfn for the huge zero
    /// page; write, dirty, young, soft-dirty, uffd-wp bits). The PTEs of such a range are none.
    pub pmds: BTreeMap<u64, u64>,
}

impl Vma {
    pub fn end(&self) -> u64 {
        self.start + self.ptes.len() as u64
    }

    pub fn contains(&self, vpn: u64) -> bool {
        vpn >= self.start && vpn < self.end()
    }

    /// `is_cow_mapping()`: private and (always, here) VM_MAYWRITE.
    pub fn is_cow(&self) -> bool {
        !self.shared
    }

    /// A private anonymous mapping (shared anonymous memory is a shmem object).
    pub fn is_anon(&self) -> bool {
        self.file.is_none()
    }

    /// `vma_soft_dirty_enabled()`.
    pub fn soft_dirty_tracking(&self, caps: Caps) -> bool {
        caps.soft_dirty && !self.vm_softdirty
    }

    /// Splits off `[at, end)` as a new VMA (`__split_vma`); the two share the page table's
    /// store, so no entry moves.
    pub fn split_off(&mut self, at: u64) -> Vma {
        let k = (at - self.start) as usize;
        let tail = self.ptes.split_off(k);
        let mut v = self.clone_without_ptes();
        v.start = at;
        v.ptes = tail;
        // A PMD leaf never straddles `at`: the caller split it first (vma_adjust_trans_huge()).
        v.pmds = self.pmds.split_off(&at);
        if v.file.is_some() {
            v.pgoff = self.pgoff + k as u64;
        }
        v
    }

    /// A copy of the VMA's attributes with no page table.
    pub fn clone_without_ptes(&self) -> Vma {
        Vma {
            start: self.start,
            ptes: PteTable::empty(),
            prot: self.prot,
            shared: self.shared,
            file: self.file,
            pgoff: self.pgoff,
            vm_softdirty: self.vm_softdirty,
            uffd_wp: self.uffd_wp,
            uffd_event_fork: self.uffd_event_fork,
            dontfork: self.dontfork,
            wipeonfork: self.wipeonfork,
            anon_vma: self.anon_vma,
            mthp: self.mthp,
            hugepage: self.hugepage,
            nohugepage: self.nohugepage,
            thp_pmd: self.thp_pmd,
            pmds: BTreeMap::new(),
        }
    }

    /// Whether `next` directly follows and can merge into this VMA (`vma_merge` rules that
    /// the model has: same flags, same file at contiguous offsets, compatible anon_vma).
    pub fn can_merge(&self, next: &Vma) -> bool {
        self.end() == next.start
            && self.prot == next.prot
            && self.shared == next.shared
            && self.file == next.file
            && (self.file.is_none() || self.pgoff + self.ptes.len() as u64 == next.pgoff)
            && self.vm_softdirty == next.vm_softdirty
            && self.uffd_wp == next.uffd_wp
            && self.uffd_event_fork == next.uffd_event_fork
            && self.dontfork == next.dontfork
            && self.wipeonfork == next.wipeonfork
            && self.mthp == next.mthp
            && self.hugepage == next.hugepage
            && self.nohugepage == next.nohugepage
            && self.thp_pmd == next.thp_pmd
            && (self.anon_vma == 0 || next.anon_vma == 0 || self.anon_vma == next.anon_vma)
    }
}

/// An `mm_struct`.
#[derive(Clone, Debug)]
pub struct Mm {
    pub pid: u32,
    /// `mm->mm_id` (never 0, which is MM_ID_DUMMY).
    pub mm_id: u32,
    /// Sorted by start, non-overlapping.
    pub vmas: Vec<Vma>,
    pub rss: [i64; 3],
    /// MMF_HAS_PINNED.
    pub has_pinned: bool,
    pub exited: bool,
    /// Where the next mmap without an address goes (virtual page number).
    pub next_vpn: u64,
    /// PR_SET_THP_DISABLE (MMF_DISABLE_THP*; inherited at fork through MMF_INIT_MASK).
    pub thp_disable: crate::policy::ThpDisable,
}

impl Mm {
    /// A copy, or a host out-of-memory error (or a stop from `t`); `copies` records the
    /// page-table stores copied ([`crate::ptes::StoreCopies`]).
    pub fn try_clone(&self, t: &crate::watch::Ticker, copies: &mut crate::ptes::StoreCopies) -> Result<Mm> {
        let mut vmas = crate::alloc::try_with_capacity(self.vmas.len(), "the VMAs")?;
        for v in &self.vmas {
            let mut c = v.clone_without_ptes();
            c.ptes = v.ptes.try_clone(t, copies)?;
            c.pmds = v.pmds.clone();
            vmas.push(c);
        }
        Ok(Mm { vmas, ..*self })
    }

    /// Index of the VMA holding `vpn`.
    pub fn find_vma(&self, vpn: u64) -> Option<usize> {
        let k = self.vmas.partition_point(|v| v.start <= vpn);
        (k > 0 && self.vmas[k - 1].contains(vpn)).then(|| k - 1)
    }

    /// Whether every page of `[from, to)` lies in some VMA.
    pub fn fully_mapped(&self, from: u64, to: u64) -> bool {
        let mut at = from;
        while at < to {
            match self.find_vma(at) {
                Some(k) => at = self.vmas[k].end(),
                None => return false,
            }
        }
        true
    }

    /// Splits VMAs so that `at` is a VMA boundary.
    fn split_at(&mut self, at: u64) {
        if let Some(k) = self.find_vma(at) {
            if self.vmas[k].start != at {
                let tail = self.vmas[k].split_off(at);
                self.vmas.insert(k + 1, tail);
            }
        }
    }

    /// Indices of the VMAs inside `[from, to)` after splitting at both ends.
    pub fn isolate(&mut self, from: u64, to: u64) -> std::ops::Range<usize> {
        self.split_at(from);
        self.split_at(to);
        let a = self.vmas.partition_point(|v| v.end() <= from);
        let b = self.vmas.partition_point(|v| v.start < to);
        a..b.max(a)
    }

    /// Whether applying `change` to the VMAs of `[from, to)` (after splitting them at both
    /// ends, as `isolate` does) would let `merge_around` merge two VMAs whose page tables lie
    /// in different stores while numpy views one of them: such a merge would move viewed
    /// entries, so the operation is refused first (`BufferError`). Only neighbours made by
    /// separate mmaps have different stores. Returns the viewed VMA's range, in vpns.
    pub fn merge_would_move_exported(&self, from: u64, to: u64, change: impl Fn(&mut Vma)) -> Option<(u64, u64)> {
        struct Piece<'a> {
            /// The attributes after the change, `start` and `pgoff` the piece's own; no entries.
            attrs: Vma,
            end: u64,
            /// Where the piece's entries lie: store and offset.
            store: *const crate::ptes::PteStore,
            off: usize,
            whole: &'a Vma,
        }
        let lo = self.vmas.partition_point(|v| v.end() < from);
        let hi = self.vmas.partition_point(|v| v.start <= to).min(self.vmas.len());
        let mut pieces = Vec::new();
        for v in &self.vmas[lo..hi] {
            let mut cuts = vec![v.start];
            cuts.extend([from, to].into_iter().filter(|&c| c > v.start && c < v.end()));
            cuts.push(v.end());
            for w in cuts.windows(2) {
                let (s, e) = (w[0], w[1]);
                let mut attrs = v.clone_without_ptes();
                attrs.start = s;
                if attrs.file.is_some() {
                    attrs.pgoff = v.pgoff + (s - v.start);
                }
                if s >= from && e <= to {
                    change(&mut attrs);
                }
                let off = v.ptes.offset() + (s - v.start) as usize;
                pieces.push(Piece { attrs, end: e, store: std::sync::Arc::as_ptr(v.ptes.store()), off, whole: v });
            }
        }
        for w in pieces.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let moves = a.store != b.store || a.off + (a.end - a.attrs.start) as usize != b.off;
            if !moves {
                continue;
            }
            // `a` as an empty VMA at its end, so that `can_merge` checks contiguity.
            let mut at_end = a.attrs.clone_without_ptes();
            at_end.start = a.end;
            if at_end.file.is_some() {
                at_end.pgoff += a.end - a.attrs.start;
            }
            if at_end.can_merge(&b.attrs) {
                for v in [a.whole, b.whole] {
                    if v.ptes.store().exported() {
                        return Some((v.start, v.end()));
                    }
                }
            }
        }
        None
    }

    /// After an unmap of `[from, to)`: a store of the VMAs next to it that is no longer mostly
    /// mapped, and that no numpy view holds, is replaced by stores of just the mapped windows
    /// (one per run of VMAs that continue one another), as the kernel frees page tables an
    /// unmap emptied (mm/memory.c `free_pgtables()`, v6.18).
    pub fn shrink_stores(&mut self, from: u64, to: u64) {
        /// Stores smaller than a page-table page, or at least a quarter mapped, stay.
        const MIN_SAVING: usize = 512;
        let near = self.vmas.iter().filter(|v| v.end() == from || v.start == to);
        // Only a store the neighbour itself fills less than a quarter of is worth the scan.
        let stores: Vec<_> = near.filter(|v| v.ptes.len() * 4 <= v.ptes.store().as_raw().1).map(|v| v.ptes.store().clone()).collect();
        for (i, s) in stores.iter().enumerate() {
            let (_, len) = s.as_raw();
            let same = |v: &Vma| std::sync::Arc::ptr_eq(v.ptes.store(), s);
            if s.exported() || len < MIN_SAVING || stores[..i].iter().any(|t| std::sync::Arc::ptr_eq(t, s)) {
                continue;
            }
            let mapped: usize = self.vmas.iter().filter(|v| same(v)).map(|v| v.ptes.len()).sum();
            if mapped * 4 > len || len - mapped < MIN_SAVING {
                continue;
            }
            let mut k = 0;
            while k < self.vmas.len() {
                if !same(&self.vmas[k]) {
                    k += 1;
                    continue;
                }
                let mut j = k + 1;
                while j < self.vmas.len() && self.vmas[j - 1].end() == self.vmas[j].start && self.vmas[j - 1].ptes.continues_into(&self.vmas[j].ptes) {
                    j += 1;
                }
                let mut run: Vec<&mut PteTable> = self.vmas[k..j].iter_mut().map(|v| &mut v.ptes).collect();
                PteTable::rehome(&mut run);
                k = j;
            }
        }
    }

    /// Merges neighbours that `Vma::can_merge` allows, around `range`.
    pub fn merge_around(&mut self, range: std::ops::Range<usize>) {
        let lo = range.start.saturating_sub(1);
        let mut k = (range.end + 1).min(self.vmas.len());
        while k > lo + 1 {
            k -= 1;
            // A merge the host has no memory for is skipped, as the kernel leaves VMAs
            // unmerged when vma_merge() cannot allocate; so is one that would move entries a
            // numpy view holds (callers refuse those first, see merge_would_move_exported).
            let (prev, next) = (&self.vmas[k - 1], &self.vmas[k]);
            let moves_viewed = !prev.ptes.continues_into(&next.ptes)
                && (prev.ptes.store().exported() || next.ptes.store().exported());
            if prev.can_merge(next) && !moves_viewed {
                let mut next = self.vmas.remove(k);
                let prev = &mut self.vmas[k - 1];
                let ptes = std::mem::replace(&mut next.ptes, PteTable::empty());
                match prev.ptes.join(ptes) {
                    Ok(()) => {
                        if prev.anon_vma == 0 {
                            prev.anon_vma = next.anon_vma;
                        }
                        prev.pmds.append(&mut next.pmds);
                    }
                    Err(ptes) => {
                        next.ptes = ptes;
                        self.vmas.insert(k, next);
                    }
                }
            }
        }
    }
}

/// How a shmem object chooses its folio sizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemKind {
    /// Not shmem, or a shmem object whose page cache is filled with folios of its fixed
    /// `folio_order` (as tmpfs write(2) may fill it from v6.14): no shmem policy applies.
    Fixed,
    /// A tmpfs file on a mount with this `huge=` option.
    Tmpfs(crate::shmem::ShmemHuge),
    /// Shared anonymous memory (`vma_is_anon_shmem()`), under the sysfs shmem controls.
    Anon,
}

/// A file or shmem object with its page cache: `cache[index]` is the pfn of that file page
/// or `u64::MAX` when not cached. Page-cache folios stay until the simulation ends (no
/// truncation or reclaim). A shmem object's cache reaches to the next PMD boundary, where a
/// huge folio may extend past `i_size`.
#[derive(Clone, Debug)]
pub struct File {
    /// `i_size` in pages.
    pub nr_pages: u64,
    /// The order of the folios the page cache is filled with where no shmem policy applies:
    /// a regular file's readahead / large-folio size.
    pub folio_order: u32,
    pub shmem: bool,
    pub kind: ShmemKind,
    pub cache: Vec<u64>,
}

impl File {
    /// Entries of the page cache of an object of `nr_pages`.
    pub fn cache_len(nr_pages: u64, shmem: bool, pmd_pages: u64) -> u64 {
        if shmem {
            nr_pages.div_ceil(pmd_pages) * pmd_pages
        } else {
            nr_pages
        }
    }
}

pub const NOT_CACHED: u64 = u64::MAX;

/// A FOLL_PIN pin of a user range.
#[derive(Clone, Debug)]
pub struct Pin {
    pub pfns: Vec<u64>,
    /// FOLL_WRITE: the device may write into the pages.
    pub write: bool,
    pub longterm: bool,
    pub active: bool,
}

/// The PTE a fault or COW builds for a page: `mk_pte(page, vma->vm_page_prot)`, made young
/// (`pte_sw_mkyoung`; user templates are accessed on x86 and arm64), then for a write
/// `pte_mkwrite(pte_mkdirty())` in the kernel's order (x86 turns SavedDirty into Dirty).
pub fn user_pte<L: PteLayout>(l: &L, pfn: u64, prot: Prot, page_prot_write: bool, dirty: bool) -> u64 {
    let mut v = l.pfn_pte_template(pfn, prot.exec, prot.none());
    v = l.pte_mkyoung(v);
    if dirty {
        v = l.pte_mkdirty(v);
    }
    if page_prot_write {
        v = l.pte_mkwrite(v);
    }
    v
}

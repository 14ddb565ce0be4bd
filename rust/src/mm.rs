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

    /// The attributes `is_mergeable_vma()` compares: the VMA flags but VM_SOFTDIRTY (which
    /// never prevents a merge: mm/mmap.c in older trees, mm/vma.c in newer), the file, and the
    /// model's per-mapping settings.
    pub fn same_flags(&self, o: &Vma) -> bool {
        self.prot == o.prot
            && self.shared == o.shared
            && self.file == o.file
            && self.uffd_wp == o.uffd_wp
            && self.uffd_event_fork == o.uffd_event_fork
            && self.dontfork == o.dontfork
            && self.wipeonfork == o.wipeonfork
            && self.mthp == o.mthp
            && self.hugepage == o.hugepage
            && self.nohugepage == o.nohugepage
            && self.thp_pmd == o.thp_pmd
    }

    /// Whether `next` directly follows and can merge into this VMA (`vma_merge` rules that
    /// the model has: the same flags but VM_SOFTDIRTY, the same file at contiguous offsets,
    /// compatible anon_vma).
    pub fn can_merge(&self, next: &Vma) -> bool {
        self.end() == next.start
            && self.same_flags(next)
            && (self.file.is_none() || self.pgoff + self.ptes.len() as u64 == next.pgoff)
            && (self.anon_vma == 0 || next.anon_vma == 0 || self.anon_vma == next.anon_vma)
    }
}

/// What VM_SOFTDIRTY a merged VMA gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftDirtyMerge {
    /// A new mapping merged with its neighbours: set (`__mmap_complete()`, mm/vma.c;
    /// `mmap_region()`, mm/mmap.c in older trees).
    Set,
    /// Up to v6.18, `mprotect_fixup()` and `madvise_update_vma()` reset the merged VMA's
    /// flags to those of the VMA they changed, so the last changed VMA of a run decides.
    Modified,
    /// From v6.19 VM_SOFTDIRTY is sticky (VM_STICKY, `vma_merge_existing_range()`, mm/vma.c
    /// "mm: propagate VM_SOFTDIRTY on merge"): set if any merged VMA had it.
    Sticky,
}

impl SoftDirtyMerge {
    /// The rule of `vma_modify_flags()`'s callers in kernel `p`.
    pub fn modify(p: &crate::kernel::KernelProfile) -> SoftDirtyMerge {
        if p.softdirty_sticky {
            SoftDirtyMerge::Sticky
        } else {
            SoftDirtyMerge::Modified
        }
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
    /// ends, as `modify` does) would let it merge two VMAs whose page tables lie
    /// in different stores while numpy views one of them: such a merge would move viewed
    /// entries, so the operation is refused first (`BufferError`). Only neighbours made by
    /// separate mmaps have different stores. Returns the viewed VMA's range, in vpns.
    pub fn merge_would_move_exported(&self, from: u64, to: u64, change: impl Fn(&mut Vma)) -> Option<(u64, u64)> {
        struct Piece<'a> {
            /// The attributes after the change, `start` and `pgoff` the piece's own; no entries.
            attrs: Vma,
            end: u64,
            /// Whether `change` changed the piece's flags.
            changed: bool,
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
                let mut changed = false;
                if s >= from && e <= to {
                    change(&mut attrs);
                    changed = !attrs.same_flags(v);
                }
                let off = v.ptes.offset() + (s - v.start) as usize;
                let store = std::sync::Arc::as_ptr(v.ptes.store());
                pieces.push(Piece { attrs, end: e, changed, store, off, whole: v });
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
            let softdirty = (a.attrs.vm_softdirty, b.attrs.vm_softdirty);
            if Self::pair_merges(&at_end, &b.attrs, (a.changed, b.changed), softdirty) {
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

    /// After a new mapping was inserted as the VMAs `range`: merges it with its neighbours
    /// that `Vma::can_merge` allows; a merged VMA gets VM_SOFTDIRTY.
    pub fn merge_around(&mut self, range: std::ops::Range<usize>) {
        let changed = vec![true; range.len()];
        self.merge_window(range, &changed, SoftDirtyMerge::Set);
    }

    /// Applies `change` to the VMAs of `[from, to)` after splitting them at both ends, then
    /// merges them with their neighbours: `vma_modify_flags()` (mm/vma.c) as `mprotect_fixup()`
    /// and `madvise_update_vma()` call it, VMA by VMA.
    pub fn modify(&mut self, p: &crate::kernel::KernelProfile, from: u64, to: u64, change: impl Fn(&mut Vma)) {
        let r = self.isolate(from, to);
        let changed: Vec<bool> = self.vmas[r.clone()]
            .iter_mut()
            .map(|v| {
                let before = v.clone_without_ptes();
                change(v);
                !v.same_flags(&before)
            })
            .collect();
        self.merge_window(r, &changed, SoftDirtyMerge::modify(p));
    }

    /// Whether VMAs `a` and `b` (adjacent) merge, given whether the operation changed each and
    /// their VM_SOFTDIRTY before any merge: `can_merge`, and a VMA the operation left alone
    /// starts no merge (`mprotect_fixup()` and `madvise_update_vma()` return early), so two such
    /// that differ in VM_SOFTDIRTY stay apart (pieces split from one VMA never differ).
    fn pair_merges(a: &Vma, b: &Vma, changed: (bool, bool), softdirty: (bool, bool)) -> bool {
        a.can_merge(b) && (changed.0 || changed.1 || softdirty.0 == softdirty.1)
    }

    /// Merges the VMAs `range` (`changed[i]`: whether the operation changed VMA
    /// `range.start + i`) with each other and their neighbours, right to left.
    fn merge_window(&mut self, range: std::ops::Range<usize>, changed: &[bool], rule: SoftDirtyMerge) {
        let lo = range.start.saturating_sub(1);
        let hi = (range.end + 1).min(self.vmas.len());
        if hi <= lo + 1 {
            return;
        }
        let changed_at = |i: usize| range.contains(&i) && changed[i - range.start];
        // The run merged so far at `k`: the VM_SOFTDIRTY of its last changed VMA, and whether
        // any of its VMAs had VM_SOFTDIRTY; and the flag of its first VMA before any merge.
        let mut last_changed = changed_at(hi - 1).then_some(self.vmas[hi - 1].vm_softdirty);
        let mut any = self.vmas[hi - 1].vm_softdirty;
        let mut first_sd = self.vmas[hi - 1].vm_softdirty;
        let mut k = hi - 1;
        while k > lo {
            // A merge the host has no memory for is skipped, as the kernel leaves VMAs
            // unmerged when vma_merge() cannot allocate; so is one that would move entries a
            // numpy view holds (callers refuse those first, see merge_would_move_exported).
            let (prev, next) = (&self.vmas[k - 1], &self.vmas[k]);
            let prev_changed = changed_at(k - 1);
            let prev_sd = prev.vm_softdirty;
            let moves_viewed = !prev.ptes.continues_into(&next.ptes)
                && (prev.ptes.store().exported() || next.ptes.store().exported());
            let mut merged = false;
            if !moves_viewed && Self::pair_merges(prev, next, (prev_changed, changed_at(k)), (prev_sd, first_sd)) {
                let mut next = self.vmas.remove(k);
                let prev = &mut self.vmas[k - 1];
                let ptes = std::mem::replace(&mut next.ptes, PteTable::empty());
                match prev.ptes.join(ptes) {
                    Ok(()) => {
                        if prev.anon_vma == 0 {
                            prev.anon_vma = next.anon_vma;
                        }
                        prev.pmds.append(&mut next.pmds);
                        last_changed = last_changed.or(prev_changed.then_some(prev_sd));
                        any |= prev_sd;
                        prev.vm_softdirty = match rule {
                            SoftDirtyMerge::Set => true,
                            SoftDirtyMerge::Sticky => any,
                            // A run no changed VMA joined has one VM_SOFTDIRTY (pair_merges).
                            SoftDirtyMerge::Modified => last_changed.unwrap_or(prev_sd),
                        };
                        merged = true;
                    }
                    Err(ptes) => {
                        next.ptes = ptes;
                        self.vmas.insert(k, next);
                    }
                }
            }
            if !merged {
                last_changed = prev_changed.then_some(prev_sd);
                any = prev_sd;
            }
            first_sd = prev_sd;
            k -= 1;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelProfile;

    fn anon(start: u64, n: usize, prot: &str, softdirty: bool) -> Vma {
        Vma {
            start,
            ptes: PteTable::filled(n, 0, "a page table").unwrap(),
            prot: Prot::parse(prot).unwrap(),
            shared: false,
            file: None,
            pgoff: 0,
            vm_softdirty: softdirty,
            uffd_wp: false,
            uffd_event_fork: false,
            dontfork: false,
            wipeonfork: false,
            anon_vma: 0,
            mthp: 0,
            hugepage: false,
            nohugepage: false,
            thp_pmd: false,
            pmds: BTreeMap::new(),
        }
    }

    fn mm(vmas: Vec<Vma>) -> Mm {
        Mm { pid: 1, mm_id: 1, vmas, rss: [0; 3], has_pinned: false, exited: false, next_vpn: 0, thp_disable: Default::default() }
    }

    fn layout(m: &Mm) -> Vec<(u64, u64, bool)> {
        m.vmas.iter().map(|v| (v.start, v.end(), v.vm_softdirty)).collect()
    }

    #[test]
    fn new_mapping_merges_whatever_the_neighbours_softdirty_and_sets_it() {
        let mut m = mm(vec![anon(0, 4, "rw", false), anon(4, 4, "rw", true), anon(8, 4, "rw", false)]);
        m.merge_around(1..2);
        assert_eq!(layout(&m), [(0, 12, true)]);
    }

    #[test]
    fn modify_merge_takes_the_changed_vma_softdirty_up_to_6_18_and_any_from_6_19() {
        // Two VMAs apart only by their protection; mprotect the one at `at` to the other's.
        let run = |kernel: &str, prots: [&str; 2], softdirty: [bool; 2], at: u64| {
            let mut m = mm(vec![anon(0, 4, prots[0], softdirty[0]), anon(4, 4, prots[1], softdirty[1])]);
            let to = Prot::parse(prots[1 - at as usize / 4]).unwrap();
            m.modify(&KernelProfile::parse(kernel).unwrap(), at, at + 4, |v| v.prot = to);
            layout(&m)
        };
        // The changed VMA has VM_SOFTDIRTY: kept in every version.
        for k in ["6.8", "6.18", "6.19", "7.0"] {
            assert_eq!(run(k, ["rw", "r"], [false, true], 4), [(0, 8, true)]);
        }
        // The changed VMA is clear, its merged neighbour set: lost up to 6.18, kept from 6.19.
        for (k, kept) in [("6.8", false), ("6.18", false), ("6.19", true), ("7.0", true)] {
            assert_eq!(run(k, ["r", "rw"], [false, true], 0), [(0, 8, kept)]);
        }
    }

    #[test]
    fn modify_over_a_changed_and_an_unchanged_vma_takes_the_changed_one() {
        // [r clear][rw set] both mprotected to rw: only the first changes.
        let mut m = mm(vec![anon(0, 4, "r", false), anon(4, 4, "rw", true)]);
        m.modify(&KernelProfile::parse("6.18").unwrap(), 0, 8, |v| v.prot = Prot::parse("rw").unwrap());
        assert_eq!(layout(&m), [(0, 8, false)]);
    }

    #[test]
    fn unchanged_vmas_differing_only_in_softdirty_stay_apart() {
        let mut m = mm(vec![anon(0, 4, "rw", false), anon(4, 4, "rw", true)]);
        m.modify(&KernelProfile::parse("6.18").unwrap(), 0, 8, |v| v.prot = Prot::parse("rw").unwrap());
        assert_eq!(layout(&m), [(0, 4, false), (4, 8, true)]);
        // A no-op change in the middle of a VMA splits and re-merges it.
        let mut m = mm(vec![anon(0, 12, "rw", false)]);
        m.modify(&KernelProfile::parse("6.18").unwrap(), 4, 8, |v| v.prot = Prot::parse("rw").unwrap());
        assert_eq!(layout(&m), [(0, 12, false)]);
    }
}

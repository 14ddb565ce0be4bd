//! Address spaces: `mm_struct`s with their VMAs, each VMA's PTEs as one array, rss counters,
//! and the page-cache objects (files and shmem) that file-backed VMAs map.

use std::collections::BTreeMap;

use crate::error::Result;
use crate::arch::{Caps, PteLayout};
use crate::memory::{Memory, PG_ANON, PG_SWAPBACKED};

/// `MM_FILEPAGES`, `MM_ANONPAGES`, `MM_SHMEMPAGES` (include/linux/mm_types_task.h).
pub const MM_FILEPAGES: usize = 0;
pub const MM_ANONPAGES: usize = 1;
pub const MM_SHMEMPAGES: usize = 2;
pub const RSS_NAMES: [&str; 3] = ["file", "anon", "shmem"];

/// `mm_counter(folio)`: the rss counter a folio's pages are counted in.
pub fn mm_counter(mem: &Memory, head: u64) -> usize {
    if mem.test(head, PG_ANON) {
        MM_ANONPAGES
    } else if mem.test(head, PG_SWAPBACKED) {
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
    pub ptes: Vec<u64>,
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
    /// Enabled anonymous folio orders (bit n = order n; order 0 is always allowed).
    pub mthp: u32,
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

    /// Splits off `[at, end)` as a new VMA (`__split_vma`), its page table copied into
    /// `room` (allocated beforehand, see [`Mm::split_room`]).
    pub fn split_off(&mut self, at: u64, mut room: Vec<u64>) -> Vma {
        let k = (at - self.start) as usize;
        room.clear();
        room.extend_from_slice(&self.ptes[k..]);
        self.ptes.truncate(k);
        self.ptes.shrink_to_fit();
        let mut v = self.clone_without_ptes();
        v.start = at;
        v.ptes = room;
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
            ptes: Vec::new(),
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
}

impl Mm {
    /// A copy, or a host out-of-memory error (or a stop from `t`).
    pub fn try_clone(&self, t: &crate::watch::Ticker) -> Result<Mm> {
        let mut vmas = crate::alloc::try_with_capacity(self.vmas.len(), "the VMAs")?;
        for v in &self.vmas {
            let mut c = v.clone_without_ptes();
            c.ptes = crate::alloc::try_copy(&v.ptes, "a page table", t)?;
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

    /// Room for the page tables that splits at `at` would cut off: allocated before anything
    /// changes, so that a host out of memory leaves the address space as it was.
    pub fn split_room(&self, at: &[u64]) -> Result<Vec<Vec<u64>>> {
        let mut room = Vec::new();
        for &x in at {
            if let Some(k) = self.find_vma(x) {
                if self.vmas[k].start != x {
                    let n = (self.vmas[k].end() - x) as usize;
                    room.push(crate::alloc::try_with_capacity(n, "the page table of a split VMA")?);
                }
            }
        }
        Ok(room)
    }

    /// Splits VMAs so that `at` is a VMA boundary, using room from [`Mm::split_room`].
    fn split_at(&mut self, at: u64, room: &mut Vec<Vec<u64>>) {
        if let Some(k) = self.find_vma(at) {
            if self.vmas[k].start != at {
                let buf = room.pop().unwrap_or_default();
                let tail = self.vmas[k].split_off(at, buf);
                self.vmas.insert(k + 1, tail);
            }
        }
    }

    /// Room for [`Mm::isolate`]`(from, to)`.
    pub fn isolate_room(&self, from: u64, to: u64) -> Result<Vec<Vec<u64>>> {
        // Splitting at `from` first leaves the VMA holding `to` with the same end; the room
        // for `from` is taken (popped) first.
        self.split_room(&[to, from])
    }

    /// Indices of the VMAs inside `[from, to)` after splitting at both ends, with the room
    /// that [`Mm::isolate_room`] took beforehand.
    pub fn isolate(&mut self, from: u64, to: u64, mut room: Vec<Vec<u64>>) -> std::ops::Range<usize> {
        self.split_at(from, &mut room);
        self.split_at(to, &mut room);
        let a = self.vmas.partition_point(|v| v.end() <= from);
        let b = self.vmas.partition_point(|v| v.start < to);
        a..b.max(a)
    }

    /// Merges neighbours that `Vma::can_merge` allows, around `range`.
    pub fn merge_around(&mut self, range: std::ops::Range<usize>) {
        let lo = range.start.saturating_sub(1);
        let mut k = (range.end + 1).min(self.vmas.len());
        while k > lo + 1 {
            k -= 1;
            // A merge the host has no memory for is skipped, as the kernel leaves VMAs
            // unmerged when vma_merge() cannot allocate.
            let extra = self.vmas[k].ptes.len();
            if self.vmas[k - 1].can_merge(&self.vmas[k]) && self.vmas[k - 1].ptes.try_reserve(extra).is_ok() {
                let next = self.vmas.remove(k);
                let prev = &mut self.vmas[k - 1];
                if prev.anon_vma == 0 {
                    prev.anon_vma = next.anon_vma;
                }
                prev.ptes.extend_from_slice(&next.ptes);
                let mut pmds = next.pmds;
                prev.pmds.append(&mut pmds);
            }
        }
    }
}

/// A file or shmem object with its page cache: `cache[index]` is the pfn of that file page
/// or `u64::MAX` when not cached. Page-cache folios stay until the simulation ends (no
/// truncation or reclaim).
#[derive(Clone, Debug)]
pub struct File {
    pub nr_pages: u64,
    /// Order of the folios the page cache allocates for it (readahead / shmem huge setting).
    pub folio_order: u32,
    pub shmem: bool,
    pub cache: Vec<u64>,
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

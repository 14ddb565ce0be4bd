//! Building a simulation from arrays a user prepared (`Simulation.from_arrays`, and replay
//! of /proc snapshots through it): folios placed at given pfns, page tables copied in as
//! given (in the layout's encoding) after every entry is checked against its VMA and the
//! placed folios, then every counter recomputed from the page tables, and `check()` run.
//! Not a kernel path; the rules it follows are listed in docs/from-arrays.md.

use crate::arch::{PteBits, PteLayout};
use crate::error::{Error, Result};
use crate::memory::{
    GUP_PIN_COUNTING_BIAS, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_FILE,
    PG_MAYBE_SHARED, PG_PARTIALLY_MAPPED, PG_SWAPBACKED,
};
use crate::mm::{mm_counter, Mm, Pin, Prot, Vma, NOT_CACHED};
use crate::sim::{order_of_size, Simulation, State, MAX_VMA_PAGES};
use crate::with_layout;

/// What a placed folio is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolioKind {
    Anon,
    /// In file `fid`'s page cache, its first page at file page `index`.
    File { fid: u32, index: u64 },
}

/// `FolioSpec::kind` codes.
pub const KIND_ANON: u8 = 0;
pub const KIND_FILE: u8 = 1;
pub const KIND_SHMEM: u8 = 2;

/// The folio table: one entry per folio, arrays of equal length. The optional arrays pin
/// what the page tables cannot tell (history); each is inferred when absent.
#[derive(Default)]
pub struct Folios<'a> {
    pub pfn: &'a [u64],
    pub order: &'a [u8],
    /// [`KIND_ANON`], [`KIND_FILE`] or [`KIND_SHMEM`].
    pub kind: &'a [u8],
    /// File id and file page of the first page (page-cache folios only).
    pub file: &'a [u32],
    pub index: &'a [u64],
    pub dirty: &'a [bool],
    pub partially_mapped: Option<&'a [bool]>,
    pub maybe_shared: Option<&'a [bool]>,
    /// Two MM-ID slots per folio (0 = free) and their mapcounts (plain counts).
    pub mm_ids: Option<&'a [u32]>,
    pub mm_id_mapcounts: Option<&'a [i32]>,
}

/// One VMA: what mmap/madvise set, and its page table (entry i maps `start + i`).
pub struct VmaSpec<'a> {
    /// First virtual page number.
    pub start: u64,
    pub ptes: &'a [u64],
    pub prot: Prot,
    pub shared: bool,
    pub file: Option<u32>,
    pub pgoff: u64,
    pub vm_softdirty: bool,
    pub uffd_wp: bool,
    pub uffd_event_fork: bool,
    pub dontfork: bool,
    pub wipeonfork: bool,
    /// 0: a new one if the VMA maps anonymous pages.
    pub anon_vma: u32,
    /// Enabled anonymous folio sizes in bytes (an explicit list, as `mmap(mthp=...)`), or
    /// `None`: the THP policy decides.
    pub mthp: Option<Vec<u64>>,
    /// VM_HUGEPAGE / VM_NOHUGEPAGE (MADV_HUGEPAGE / MADV_NOHUGEPAGE).
    pub hugepage: bool,
    pub nohugepage: bool,
    /// `mmap(pmd=True)`: faults map PMD THPs.
    pub thp_pmd: bool,
    /// Huge PMDs: (first vpn of the PMD range, PMD entry in the layout's PTE encoding).
    pub pmds: Vec<(u64, u64)>,
}

/// One process (pid = its position + 1).
pub struct MmSpec<'a> {
    pub vmas: Vec<VmaSpec<'a>>,
    pub exited: bool,
    pub has_pinned: bool,
    /// Where the next mmap without an address goes (virtual page number); `None`: past
    /// the last VMA, as mmap leaves it.
    pub next_vpn: Option<u64>,
    /// PR_SET_THP_DISABLE.
    pub thp_disable: crate::policy::ThpDisable,
}

/// A FOLL_PIN pin; an unpinned one keeps no pages.
pub struct PinSpec<'a> {
    pub pfns: &'a [u64],
    pub write: bool,
    pub longterm: bool,
    pub active: bool,
}

/// A file or shmem object, as `create_file` takes it (bytes).
pub struct FileSpec {
    pub size: u64,
    pub folio_size: u64,
    pub shmem: bool,
    /// A tmpfs file's `huge=` mount option.
    pub huge: Option<String>,
    /// Shared anonymous memory (a shmem object under the sysfs shmem controls).
    pub anon: bool,
}

/// Everything `Simulation::from_arrays` builds from.
#[derive(Default)]
pub struct Build<'a> {
    pub files: Vec<FileSpec>,
    pub folios: Folios<'a>,
    pub mms: Vec<MmSpec<'a>>,
    pub pins: Vec<PinSpec<'a>>,
    /// Per pfn: the content token, and PageAnonExclusive (inferred when absent).
    pub token: Option<&'a [u32]>,
    pub anon_exclusive: Option<&'a [bool]>,
    pub next_token: Option<u32>,
    pub next_anon_vma: Option<u32>,
}

fn bad(msg: String) -> Error {
    Error::value(msg)
}

impl Simulation {
    /// A new simulation holding the state `b` describes; fails, building nothing, on any
    /// inconsistency (ValueError) or broken invariant (InvariantError from `check()`).
    /// `watch` (Ctrl-C, progress) may stop the build, which then leaves nothing.
    pub fn from_arrays(layout: crate::arch::Layout, profile: crate::kernel::KernelProfile, memory_bytes: u64, seed: u64, b: &Build<'_>, watch: Option<std::sync::Arc<dyn crate::watch::Watch>>) -> Result<Simulation> {
        let mut sim = Simulation::new(layout, profile, memory_bytes, seed)?;
        sim.set_watch(watch);
        // Work: the check-and-copy and counting passes over the PTEs, then check()'s own.
        let ptes: u64 = b.mms.iter().flat_map(|m| &m.vmas).map(|v| v.ptes.len() as u64).sum();
        sim.st.ticker.start(2 * ptes, true);
        let r = sim.build(b);
        sim.st.ticker.stop();
        r.map(|()| sim)
    }

    fn build(&mut self, b: &Build<'_>) -> Result<()> {
        for (i, f) in b.files.iter().enumerate() {
            if f.anon && (!f.shmem || f.huge.is_some() || f.folio_size != 1 << self.st.page_shift) {
                return Err(bad(format!("files[{i}]: shared anonymous memory is a shmem object of page-size folios, without huge=")));
            }
            let id = self.create_file(f.size, f.folio_size, f.shmem, f.huge.as_deref()).map_err(|e| bad(format!("files[{i}]: {}", e.message)))?;
            if f.anon {
                self.st.files[id as usize].kind = crate::mm::ShmemKind::Anon;
            }
        }
        self.place_folios(&b.folios)?;
        let n = self.st.mem.nr_pages() as usize;
        for (name, len) in [("token", b.token.map(|t| t.len())), ("anon_exclusive", b.anon_exclusive.map(|t| t.len()))] {
            if len.is_some_and(|l| l != n) {
                return Err(bad(format!("pages[{name:?}] has {} entries, memory has {n} pages", len.unwrap_or(0))));
            }
        }
        if let Some(t) = b.token {
            if let Some(p) = (0..n).find(|&p| t[p] != 0 && self.st.mem.is_free(p as u64)) {
                return Err(bad(format!("pages[\"token\"][{p:#x}] is {}, but pfn {p:#x} is in no folio", t[p])));
            }
            self.st.mem.token.copy_from_slice(t);
        }
        if let Some(x) = b.anon_exclusive {
            if let Some(p) = (0..n).find(|&p| x[p] && (self.st.mem.is_free(p as u64) || !self.st.mem.test(self.st.mem.folio_head(p as u64), PG_ANON))) {
                return Err(bad(format!("pages[\"anon_exclusive\"] marks pfn {p:#x}, which is not a page of an anonymous folio")));
            }
        }
        for (k, m) in b.mms.iter().enumerate() {
            self.place_mm(k, m)?;
        }
        for (i, p) in b.pins.iter().enumerate() {
            self.place_pin(i, p)?;
        }
        let max_anon_vma = self.st.mms.iter().flat_map(|m| &m.vmas).map(|v| v.anon_vma).max().unwrap_or(0);
        self.st.next_anon_vma = match b.next_anon_vma {
            Some(a) if a <= max_anon_vma => return Err(bad(format!("next_anon_vma {a} is not above the anon_vma {max_anon_vma} a VMA has"))),
            Some(a) => a,
            None => max_anon_vma + 1,
        };
        self.st.next_token = match b.next_token {
            Some(0) => return Err(bad("next_token must not be 0 (the token of a zero-filled page)".into())),
            Some(t) => t,
            None => self.st.mem.token.iter().copied().max().unwrap_or(0).wrapping_add(1).max(1),
        };
        self.rebuild_accounting(&b.folios, b.anon_exclusive)?;
        self.check()
    }

    /// Places every folio of the table (see [`Simulation::place_folio`]).
    fn place_folios(&mut self, f: &Folios<'_>) -> Result<()> {
        let n = f.pfn.len();
        let lens = [
            ("order", f.order.len()),
            ("kind", f.kind.len()),
            ("file", f.file.len()),
            ("index", f.index.len()),
            ("dirty", f.dirty.len()),
            ("partially_mapped", f.partially_mapped.map_or(n, |a| a.len())),
            ("maybe_shared", f.maybe_shared.map_or(n, |a| a.len())),
            ("mm_ids", f.mm_ids.map_or(2 * n, |a| a.len())),
            ("mm_id_mapcounts", f.mm_id_mapcounts.map_or(2 * n, |a| a.len())),
        ];
        for (name, len) in lens {
            let want = if name.starts_with("mm_id") { 2 * n } else { n };
            if len != want {
                return Err(bad(format!("folios[{name:?}] has {len} entries for {n} folios{}", if want == n { "" } else { " (two per folio)" })));
            }
        }
        for i in 0..n {
            let kind = match f.kind[i] {
                KIND_ANON => FolioKind::Anon,
                KIND_FILE | KIND_SHMEM => {
                    let fid = f.file[i];
                    let want_shmem = f.kind[i] == KIND_SHMEM;
                    match self.st.files.get(fid as usize) {
                        Some(file) if file.shmem != want_shmem => {
                            let (is, says) = if file.shmem { ("shmem", "file") } else { ("file", "shmem") };
                            return Err(bad(format!("folios[{i}]: kind {says:?}, but file {fid} is a {is} object")));
                        }
                        _ => {}
                    }
                    let o = f.order[i] as u32;
                    if o < 64 && f.index[i] % (1u64 << o) != 0 {
                        return Err(bad(format!("folios[{i}]: a page-cache folio of order {o} starts at file page {}, which is not a multiple of {}", f.index[i], 1u64 << o)));
                    }
                    FolioKind::File { fid, index: f.index[i] }
                }
                k => return Err(bad(format!("folios[{i}]: unknown kind code {k}"))),
            };
            self.place_folio(f.pfn[i], f.order[i] as u32, kind, f.dirty[i]).map_err(|e| bad(format!("folios[{i}]: {}", e.message)))?;
        }
        Ok(())
    }

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
            // A shmem object's cache reaches the next PMD boundary: a huge folio may pass i_size.
            let beyond = !matches!(index.checked_add(n), Some(end) if end <= f.cache.len() as u64);
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

    /// Adds process `k` (pid `k + 1`) with its VMAs, each page table checked and copied in.
    fn place_mm(&mut self, k: usize, m: &MmSpec<'_>) -> Result<()> {
        let pid = self.spawn();
        debug_assert_eq!(pid as usize, k + 1);
        let shift = self.st.page_shift;
        let pmd_pages = self.st.ptrs_per_pte;
        let at = |i: usize| format!("processes[{k}][\"vmas\"][{i}]");
        if m.exited && !m.vmas.is_empty() {
            return Err(bad(format!("processes[{k}] has exited but has VMAs")));
        }
        let mut order: Vec<usize> = (0..m.vmas.len()).collect();
        order.sort_by_key(|&i| m.vmas[i].start);
        let mut vmas: Vec<Vma> = crate::alloc::try_with_capacity(m.vmas.len(), "the VMAs")?;
        let mut next_vpn = self.st.mms[k].next_vpn;
        for (pos, &i) in order.iter().enumerate() {
            let s = &m.vmas[i];
            let nr = s.ptes.len() as u64;
            if nr == 0 || nr > MAX_VMA_PAGES {
                return Err(bad(format!("{}: a page table of {nr} entries; a VMA has 1 to {MAX_VMA_PAGES} pages", at(i))));
            }
            if !matches!(s.start.checked_add(nr), Some(end) if end <= 1 << (56 - shift)) {
                return Err(bad(format!("{}: {:#x}+{nr} pages leaves the 56-bit user address space", at(i), s.start << shift)));
            }
            if pos > 0 {
                let prev = &m.vmas[order[pos - 1]];
                if prev.start + prev.ptes.len() as u64 > s.start {
                    return Err(bad(format!("{} at {:#x} overlaps {} at {:#x}", at(i), s.start << shift, at(order[pos - 1]), prev.start << shift)));
                }
            }
            let mut mthp = if s.mthp.is_some() { 1u32 } else { 0 };
            for &size in s.mthp.iter().flatten() {
                match order_of_size(size, shift).filter(|&o| o <= self.st.pmd_order && o != 1) {
                    Some(o) => mthp |= 1 << o,
                    None => return Err(bad(format!("{}: mTHP size {size} is not one of the page size, 4 pages … the PMD size", at(i)))),
                }
            }
            match s.file {
                Some(f) => {
                    let fo = self.st.files.get(f as usize).ok_or_else(|| bad(format!("{}: no file {f}", at(i))))?;
                    if !matches!(s.pgoff.checked_add(nr), Some(end) if end <= fo.nr_pages) {
                        return Err(bad(format!("{}: file pages {}+{nr} are beyond file {f}'s {} pages", at(i), s.pgoff, fo.nr_pages)));
                    }
                }
                None if s.shared => return Err(bad(format!("{}: a shared mapping needs a file (shared anonymous memory is a shmem file)", at(i)))),
                None if s.pgoff != 0 => return Err(bad(format!("{}: an offset without a file", at(i)))),
                None => {}
            }
            if s.uffd_wp && !self.layout.caps().uffd_wp {
                return Err(bad(format!("{}: {} has no uffd-wp PTE bit", at(i), self.layout.name())));
            }
            if s.wipeonfork && (s.shared || s.file.is_some()) {
                return Err(bad(format!("{}: MADV_WIPEONFORK applies to private anonymous mappings only", at(i))));
            }
            if s.hugepage && s.nohugepage {
                return Err(bad(format!("{}: hugepage and nohugepage exclude each other", at(i))));
            }
            let vma = Vma {
                start: s.start,
                ptes: crate::ptes::PteTable::empty(),
                hugepage: s.hugepage,
                nohugepage: s.nohugepage,
                thp_pmd: s.thp_pmd,
                pmds: Default::default(),
                prot: s.prot,
                shared: s.shared,
                file: s.file,
                pgoff: s.pgoff,
                vm_softdirty: s.vm_softdirty,
                uffd_wp: s.uffd_wp,
                uffd_event_fork: s.uffd_event_fork,
                dontfork: s.dontfork,
                wipeonfork: s.wipeonfork,
                anon_vma: s.anon_vma,
                mthp,
            };
            with_layout!(&self.layout, l => check_ptes(l, &self.st, &vma, s.ptes, pid).map_err(|e| bad(format!("{}: {}", at(i), e.message))))?;
            let mut vma = vma;
            vma.ptes = crate::alloc::try_copy(s.ptes, "a page table", &self.st.ticker)?.into();
            next_vpn = next_vpn.max(s.start + nr + pmd_pages);
            vmas.push(vma);
        }
        if m.thp_disable == crate::policy::ThpDisable::ExceptAdvised && !self.profile.thp_disable_except_advised {
            return Err(bad(format!("processes[{k}]: PR_THP_DISABLE_EXCEPT_ADVISED exists from kernel 6.18")));
        }
        self.st.mms[k].vmas = vmas;
        // Huge PMDs, each checked as a PMD fault would leave it (huge_memory.rs).
        for (pos, &i) in order.iter().enumerate() {
            for &(base, e) in &m.vmas[i].pmds {
                let pfn = with_layout!(&self.layout, l => l.pte_pfn(e));
                with_layout!(&self.layout, l => self.st.place_huge_pmd(l, k, pos, base, pfn, e)).map_err(|e| bad(format!("{}: pmds: {}", at(i), e.message)))?;
            }
        }
        let mm: &mut Mm = &mut self.st.mms[k];
        mm.exited = m.exited;
        mm.thp_disable = m.thp_disable;
        mm.has_pinned = m.has_pinned;
        mm.next_vpn = match m.next_vpn {
            Some(v) if v > 1 << (56 - shift) => return Err(bad(format!("processes[{k}]: next_mmap {:#x} is beyond the 56-bit user address space", v << shift))),
            Some(v) => v,
            None => next_vpn,
        };
        Ok(())
    }

    /// Adds pin `i`: its pages must be allocated (or the zero page).
    fn place_pin(&mut self, i: usize, p: &PinSpec<'_>) -> Result<()> {
        if !p.active && !p.pfns.is_empty() {
            return Err(bad(format!("pins[{i}] is not active but holds pages (unpinning drops them)")));
        }
        let (n, zero) = (self.st.mem.nr_pages(), self.st.zero_pfn);
        if let Some(&pfn) = p.pfns.iter().find(|&&pfn| pfn != zero && (pfn >= n || self.st.mem.is_free(pfn))) {
            return Err(bad(format!("pins[{i}] holds pfn {pfn:#x}, which is in no folio")));
        }
        let pfns = crate::alloc::try_copy(p.pfns, "a pin", &self.st.ticker)?;
        self.st.pins.push(Pin { pfns, write: p.write, longterm: p.longterm, active: p.active });
        Ok(())
    }

    /// Recomputes every counter from the page tables, page caches and pins of a state whose
    /// folios were just placed: mapcounts; refcounts (mappings, page-cache references and
    /// pins); large-folio records; the MM-ID slots, shared bit and deferred-split flag (as
    /// given, else inferred); PageAnonExclusive (as given, else an anonymous page mapped
    /// once); rss; an anon_vma for VMAs that map anonymous pages and have none.
    fn rebuild_accounting(&mut self, f: &Folios<'_>, exclusive: Option<&[bool]>) -> Result<()> {
        let st = &mut self.st;
        let mm_id_on = self.profile.mm_id;
        for fl in &st.files {
            for &c in fl.cache.iter().filter(|&&c| c != NOT_CACHED) {
                if st.mem.folio_head(c) == c {
                    st.mem.refcount[c as usize] += 1 << st.mem.folio_order(c);
                }
            }
        }
        for pin in st.pins.iter().filter(|p| p.active) {
            for &pfn in pin.pfns.iter().filter(|&&p| p != st.zero_pfn) {
                let head = st.mem.folio_head(pfn);
                if st.mem.folio_order(head) > 0 {
                    st.mem.refcount[head as usize] += 1;
                    st.mem.lf(head).pincount += 1;
                } else {
                    st.mem.refcount[head as usize] += GUP_PIN_COUNTING_BIAS;
                }
            }
        }
        // Slots come from the table when given; otherwise the first two mms (in pid order)
        // that map the folio take them with all their mappings.
        let assign_slots = mm_id_on && f.mm_ids.is_none();
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
                    if assign_slots {
                        let slot = (0..2).find(|&s| lf.mm_id[s] == mm_id).or_else(|| (0..2).find(|&s| lf.mm_id[s] == MM_ID_DUMMY));
                        if let Some(s) = slot {
                            lf.mm_id[s] = mm_id;
                            lf.mm_id_mapcount[s] += 1;
                        }
                    }
                }
                for i in 0..st.mms[mi].vmas[vi].ptes.len() {
                    if i % 4096 == 0 {
                        st.ticker.tick(4096)?;
                    }
                    let e = st.mms[mi].vmas[vi].ptes[i];
                    let pfn = with_layout!(&self.layout, l => if l.pte_none(e) { None } else { Some(l.pte_pfn(e)) });
                    let Some(pfn) = pfn.filter(|&p| p != zero) else { continue };
                    let head = st.mem.folio_head(pfn);
                    st.mem.mapcount[pfn as usize] += 1;
                    st.mem.refcount[head as usize] += 1;
                    any_anon |= st.mem.test(head, PG_ANON);
                    rss[mm_counter(&st.mem, head)] += 1;
                    if st.mem.folio_order(head) > 0 {
                        let first = st.mem.mapcount[pfn as usize] == 1;
                        let lf = st.mem.lf(head);
                        lf.large_mapcount += 1;
                        if first {
                            lf.nr_pages_mapped += 1;
                        }
                        if assign_slots {
                            let slot = (0..2).find(|&s| lf.mm_id[s] == mm_id).or_else(|| (0..2).find(|&s| lf.mm_id[s] == MM_ID_DUMMY));
                            // A third mm takes no slot; the folio then counts as maybe-shared.
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
        for i in 0..f.pfn.len() {
            let head = f.pfn[i];
            let o = st.mem.folio_order(head);
            let nr = 1u64 << o;
            if st.mem.refcount[head as usize] == 0 {
                return Err(bad(format!("folios[{i}] (pfn {head:#x}) is neither mapped, in a page cache nor pinned: the kernel would have freed it")));
            }
            let anon = st.mem.test(head, PG_ANON);
            // Huge PMD mappings of the folio (the entire mapcount).
            let entire = st.mem.large_folio(head).map_or(0, |lf| lf.entire_mapcount + 1);
            for p in head..head + nr {
                // Inferred: an anonymous page mapped once; under one huge PMD, the head only,
                // as a PMD fault leaves it.
                let ptes = st.mem.mapcount[p as usize];
                let excl = match exclusive {
                    Some(x) => x[p as usize],
                    None => anon && ((ptes == 1 && entire == 0) || (ptes == 0 && entire == 1 && p == head)),
                };
                if excl {
                    st.mem.set(p, PG_ANON_EXCLUSIVE);
                }
            }
            let given = |a: Option<&[bool]>| a.map(|a| a[i]);
            if o == 0 {
                let slots = f.mm_ids.is_some_and(|a| a[2 * i] != 0 || a[2 * i + 1] != 0) || f.mm_id_mapcounts.is_some_and(|a| a[2 * i] != 0 || a[2 * i + 1] != 0);
                if given(f.partially_mapped) == Some(true) || given(f.maybe_shared) == Some(true) || slots {
                    return Err(bad(format!("folios[{i}]: a small folio has no partially-mapped flag, shared bit or MM-ID slots")));
                }
                continue;
            }
            let lf = *st.mem.large_folio(head).expect("a placed large folio has a record");
            // A folio a huge PMD maps is entirely mapped (ENTIRELY_MAPPED), never partially.
            let partial = given(f.partially_mapped).unwrap_or(anon && lf.entire_mapcount < 0 && lf.nr_pages_mapped > 0 && (lf.nr_pages_mapped as u64) < nr);
            if partial && !anon {
                return Err(bad(format!("folios[{i}]: only anonymous folios are queued for deferred split (partially_mapped)")));
            }
            if partial {
                st.mem.set(head, PG_PARTIALLY_MAPPED);
            }
            if let (Some(ids), Some(counts)) = (f.mm_ids, f.mm_id_mapcounts) {
                let lfm = st.mem.lf(head);
                for s in 0..2 {
                    let (id, c) = (ids[2 * i + s], counts[2 * i + s]);
                    if (id == MM_ID_DUMMY) != (c == 0) || c < 0 || (!mm_id_on && id != MM_ID_DUMMY) {
                        return Err(bad(format!("folios[{i}]: MM-ID slot {s} holds mm {id} with {c} mapping(s); a slot is free (0, 0), or an mm with at least one mapping on a kernel with MM-IDs (6.15+)")));
                    }
                    lfm.mm_id[s] = id;
                    lfm.mm_id_mapcount[s] = c - 1;
                }
            } else if f.mm_ids.is_some() || f.mm_id_mapcounts.is_some() {
                return Err(bad("folios: mm_ids and mm_id_mapcounts go together".into()));
            }
            if mm_id_on {
                let lf = *st.mem.large_folio(head).expect("a placed large folio has a record");
                let shared = given(f.maybe_shared).unwrap_or(lf.large_mapcount >= 0 && !lf.mm_id_mapcount.contains(&lf.large_mapcount));
                if shared {
                    st.mem.set(head, PG_MAYBE_SHARED);
                }
            } else if given(f.maybe_shared) == Some(true) {
                return Err(bad(format!("folios[{i}]: the \"maybe mapped shared\" bit exists from kernel 6.15 (MM-IDs)")));
            }
        }
        Ok(())
    }
}

/// Checks a page table against its VMA and the placed folios: every entry is none, or a
/// present entry the layout's `mk_pte` makes, with the VMA's protection, mapping the zero
/// page (private anonymous VMAs only), an anonymous page (private VMAs only) or the page
/// cache page of the VMA's file at that offset.
fn check_ptes<L: PteLayout>(l: &L, st: &State, vma: &Vma, ptes: &[u64], pid: u32) -> Result<()> {
    let n = st.mem.nr_pages();
    let file = vma.file.map(|f| &st.files[f as usize]);
    for (i, &e) in ptes.iter().enumerate() {
        if i % 4096 == 0 {
            st.ticker.tick(4096)?;
        }
        if l.pte_none(e) {
            continue;
        }
        let addr = (vma.start + i as u64) << st.page_shift;
        let at = || format!("pid {pid} address {addr:#x}: PTE {e:#x}");
        if !l.pte_present(e) {
            return Err(bad(format!("{} is neither none nor present (the model has no swap or migration entries)", at())));
        }
        let pfn = l.pte_pfn(e);
        let prot_none = l.pte_protnone(e);
        let bits = PteBits {
            present: true,
            write: l.pte_write(e),
            dirty: l.pte_dirty(e),
            young: l.pte_young(e),
            soft_dirty: l.pte_soft_dirty(e),
            uffd_wp: l.pte_uffd_wp(e),
            // A PROT_NONE template may lack the no-execute bit (x86 PAGE_NONE).
            exec: !prot_none && l.pte_exec(e),
            special: l.pte_special(e),
            prot_none,
            cont: l.pte_cont(e),
        };
        if l.mk_pte(pfn, bits).ok() != Some(e) {
            return Err(bad(format!("{} is not an entry {} makes (bits the model does not use)", at(), l.name())));
        }
        if bits.prot_none != vma.prot.none() || (!bits.prot_none && bits.exec != vma.prot.exec) || (bits.write && !vma.prot.write) {
            return Err(bad(format!("{} does not have the VMA's protection {:?}", at(), vma.prot.as_string())));
        }
        if pfn == st.zero_pfn {
            if !bits.special || bits.write || !vma.is_anon() {
                return Err(bad(format!("{} maps the zero page, which is mapped special and read-only in private anonymous VMAs only", at())));
            }
            continue;
        }
        if bits.special {
            return Err(bad(format!("{} is special but maps pfn {pfn:#x}, not the zero page", at())));
        }
        if pfn >= n || st.mem.is_free(pfn) {
            return Err(bad(format!("{} maps pfn {pfn:#x}, which is in no folio", at())));
        }
        if st.mem.test(st.mem.folio_head(pfn), PG_ANON) {
            if vma.shared {
                return Err(bad(format!("{} maps anonymous pfn {pfn:#x} in a shared mapping", at())));
            }
            continue;
        }
        let index = vma.pgoff + i as u64;
        if !file.is_some_and(|f| f.cache[index as usize] == pfn) {
            let want = match vma.file {
                Some(f) => format!("file {f}'s page {index}"),
                None => "an anonymous page (the VMA has no file)".into(),
            };
            return Err(bad(format!("{} maps page-cache pfn {pfn:#x}, which is not {want}", at())));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::Layout;
    use crate::kernel::KernelProfile;

    fn anon_vma(start: u64, ptes: &[u64]) -> VmaSpec<'_> {
        VmaSpec {
            start,
            ptes,
            prot: Prot::parse("rw").unwrap(),
            shared: false,
            file: None,
            pgoff: 0,
            vm_softdirty: true,
            uffd_wp: false,
            uffd_event_fork: false,
            dontfork: false,
            wipeonfork: false,
            anon_vma: 0,
            mthp: Some(vec![]),
            hugepage: false,
            nohugepage: false,
            thp_pmd: false,
            pmds: vec![],
        }
    }

    fn build(ptes: &[u64]) -> Result<Simulation> {
        let layout = Layout::by_name("x86-64", None)?;
        let folio = Folios { pfn: &[16], order: &[4], kind: &[KIND_ANON], file: &[0], index: &[0], dirty: &[false], ..Default::default() };
        let b = Build { folios: folio, mms: vec![MmSpec { vmas: vec![anon_vma(0x100_0000, ptes)], exited: false, has_pinned: false, thp_disable: Default::default(), next_vpn: None }], ..Default::default() };
        Simulation::from_arrays(layout, KernelProfile::parse("6.18")?, 4 << 20, 0, &b, None)
    }

    fn ptes(pfns: std::ops::Range<u64>) -> Vec<u64> {
        let l = Layout::by_name("x86-64", None).unwrap();
        with_layout!(&l, l => pfns.map(|p| l.mk_pte(p, PteBits { present: true, write: true, dirty: true, young: true, ..Default::default() }).unwrap()).collect())
    }

    #[test]
    fn counters_come_from_the_page_table() {
        let sim = build(&ptes(16..32)).unwrap();
        let m = &sim.st.mem;
        assert_eq!(m.refcount[16], 16);
        assert!((16..32).all(|p| m.mapcount[p] == 1 && m.test(p as u64, PG_ANON_EXCLUSIVE)));
        let lf = m.large_folio(16).unwrap();
        assert_eq!((lf.large_mapcount, lf.nr_pages_mapped, lf.mm_id, lf.mm_id_mapcount), (15, 16, [1, 0], [15, -1]));
        assert_eq!(sim.st.mms[0].rss, [0, 16, 0]);
        assert_eq!(sim.st.mms[0].vmas[0].anon_vma, 1);
        assert_eq!(m.free_pages, 1024 - 16);
    }

    #[test]
    fn a_pte_of_a_free_page_or_an_unmapped_folio_is_refused() {
        let mut t = ptes(16..32);
        t[3] = ptes(100..101)[0];
        assert!(build(&t).unwrap_err().message.contains("in no folio"));
        assert!(build(&[0; 16]).unwrap_err().message.contains("neither mapped"));
        assert!(build(&ptes(16..24)).is_ok(), "a partly mapped folio is fine");
        assert!(build(&ptes(16..24)).unwrap().st.mem.test(16, PG_PARTIALLY_MAPPED));
    }
}

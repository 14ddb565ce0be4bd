//! Invariants: everything the kernel's accounting promises, recomputed from scratch by
//! rescanning every page table, and compared with the stored counters.
//!
//! One pass over each mm's page tables counts, per page, its PTE mappings and whether it is
//! mapped writable or by more than one mm, in two bytes of scratch a page ([`COUNT`] and the
//! bits after it); one pass over memory then compares them with the stored counts, folio by
//! folio. A large folio's MM-ID slots are proven by runs of one mm's mappings of it (about one
//! run per folio and mm), so no per-(folio, mm) table is built. On a large machine two threads
//! share the work, each owning half of the pfns: both read every page table and each counts
//! the entries that map its pfns. Where they find a rule broken, one thread scans again in the
//! order below, so that the error names the first broken rule, as the single pass would: the
//! mms in order (their VMAs, PMDs and PTEs, then rss), the pins, then memory in pfn order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::arch::PteLayout;
use crate::error::{Error, ErrorKind, Result};
use crate::kernel::KernelProfile;
use crate::memory::{
    Memory, FREE, GUP_PIN_COUNTING_BIAS, MM_ID_DUMMY, PG_ANON, PG_ANON_EXCLUSIVE, PG_FILE, PG_MAYBE_SHARED,
    PG_SWAPBACKED,
};
use crate::mm::{mm_counter, File, Mm, Pin, Vma, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES, NOT_CACHED, RSS_NAMES};
use crate::sim::State;
use crate::watch::Ticker;

// Per-page scratch.
/// PTE mappings of the page; `COUNT` itself means "`COUNT` plus what [`Share::overflow`] holds".
const COUNT: u16 = 0x1ff;
/// The mm that mapped the page last: 0 none, [`EARLIER`] an mm scanned at least [`NR_TAGS`] mms
/// before the one being scanned, else [`tag`] of one of the mms since.
const TAG: u16 = 7 << 9;
const EARLIER: u16 = 1 << 9;
const NR_TAGS: usize = 6;
/// Mapped by more than one mm.
const SHARED: u16 = 1 << 12;
/// Mapped writable somewhere.
const WRITABLE: u16 = 1 << 13;
/// In a page cache (read on a folio's first page).
const CACHED: u16 = 1 << 14;
/// On a large folio's first page: a run of slot 0's mm's mappings of the folio reaches the
/// slot's mapcount; on its second page: the same for slot 1.
const SLOT_OK: u16 = 1 << 15;

/// The tag of the `k`th mm.
fn tag(k: usize) -> u16 {
    (2 + (k % NR_TAGS) as u16) << 9
}

/// Pages from which `check()` runs on two threads.
const PARALLEL_FROM: u64 = 1 << 20;
/// Work between two looks at the watch (or, on the second thread, at the stop flag).
const CHUNK: usize = 4096;

fn broken(rule: &'static str, msg: String) -> Error {
    let mut e = Error::invariant(format!("{rule}: {msg}"));
    e.rule = Some(rule);
    e
}

/// What the check reads: the state, without its ticker (which only the first thread uses).
struct Ctx<'a, L> {
    l: &'a L,
    p: &'a KernelProfile,
    mem: &'a Memory,
    mms: &'a [Mm],
    files: &'a [File],
    pins: &'a [Pin],
    n: u64,
    zero_pfn: u64,
    shift: u32,
    ptrs_per_pte: u64,
    pmd_order: u32,
}

/// One thread's share: pfns `[lo, hi)` (the last share also owns the zero pfn and any pfn past
/// memory, `hi == u64::MAX`), with the scratch of its pages.
struct Share<'s> {
    lo: u64,
    hi: u64,
    page: &'s mut [u16],
    /// Mappings past [`COUNT`], by pfn.
    overflow: HashMap<u64, u32>,
    /// Folio heads of huge PMD mappings.
    pmd_heads: Vec<u64>,
    /// Runs (folio, mm_id, mappings) that prove no MM-ID slot on their own.
    runs: Vec<(u64, u32, u32)>,
    /// Checks the contpte blocks (one share does).
    lead: bool,
    /// Work units a page of this share stands for in the progress count.
    page_weight: u64,
    stop: &'s AtomicBool,
}

/// Where [`Ctx::scan_pages`] is in the sorted pins, PMD heads and runs.
struct Cursors {
    pin: usize,
    pmd: usize,
    run: usize,
}

/// PTEs of one VMA mapping pages counted as anon and as shmem, and all of them.
#[derive(Default)]
struct RssCount {
    anon: i64,
    shmem: i64,
    pages: i64,
}

/// PTEs (or pages) the scans take at once where they can.
const BLOCK: usize = 8;

/// No run of large-folio mappings yet.
const NO_RUN: u64 = u64::MAX;

impl<'s> Share<'s> {
    fn new(lo: u64, hi: u64, page: &'s mut [u16], lead: bool, page_weight: u64, stop: &'s AtomicBool) -> Share<'s> {
        Share { lo, hi, page, overflow: HashMap::new(), pmd_heads: Vec::new(), runs: Vec::new(), lead, page_weight, stop }
    }

    #[inline]
    fn owns(&self, pfn: u64) -> bool {
        pfn.wrapping_sub(self.lo) < self.hi - self.lo
    }

    /// Asks the watch (first thread) or the stop flag (second) whether to go on.
    #[inline]
    fn pace(&self, t: Option<&Ticker>, n: u64) -> Result<()> {
        match t {
            Some(t) => t.tick(n).inspect_err(|_| self.stop.store(true, Ordering::Relaxed)),
            None if self.stop.load(Ordering::Relaxed) => Err(Error::interrupted()),
            None => Ok(()),
        }
    }

    /// Page `pfn` (owned, in memory) is mapped by the mm tagged `cur`; `pte`: by a PTE.
    #[inline]
    fn map(&mut self, pfn: u64, cur: u16, write: bool, pte: bool) {
        let s = &mut self.page[(pfn - self.lo) as usize];
        let t = *s & TAG;
        let shared = if t != 0 && t != cur { SHARED } else { 0 };
        let mut v = (*s & !TAG) | cur | shared | if write { WRITABLE } else { 0 };
        if pte {
            if v & COUNT == COUNT {
                *self.overflow.entry(pfn).or_default() += 1;
            } else {
                v += 1;
            }
        }
        *s = v;
    }

    /// PTE mappings of page `pfn` (owned, in memory).
    #[inline]
    fn count(&self, pfn: u64) -> u32 {
        let c = (self.page[(pfn - self.lo) as usize] & COUNT) as u32;
        if c == COUNT as u32 {
            c + self.overflow.get(&pfn).copied().unwrap_or(0)
        } else {
            c
        }
    }
}

impl<'a, L: PteLayout> Ctx<'a, L> {
    fn new(st: &'a State, l: &'a L, p: &'a KernelProfile) -> Ctx<'a, L> {
        Ctx {
            l,
            p,
            mem: &st.mem,
            mms: &st.mms,
            files: &st.files,
            pins: &st.pins,
            n: st.mem.nr_pages(),
            zero_pfn: st.zero_pfn,
            shift: st.page_shift,
            ptrs_per_pte: st.ptrs_per_pte,
            pmd_order: st.pmd_order,
        }
    }

    /// Where `pfn` is mapped (pid and address), for error messages.
    fn where_mapped(&self, pfn: u64) -> String {
        let l = self.l;
        for mm in self.mms {
            for vma in &mm.vmas {
                for (&base, &e) in &vma.pmds {
                    let head = l.pte_pfn(e);
                    if pfn >= head && pfn < head + self.ptrs_per_pte {
                        return format!("; mapped by pid {} at {:#x} (huge PMD)", mm.pid, (base + pfn - head) << self.shift);
                    }
                }
                for (i, &e) in vma.ptes.iter().enumerate() {
                    if !l.pte_none(e) && l.pte_pfn(e) == pfn {
                        return format!("; mapped by pid {} at {:#x}", mm.pid, (vma.start + i as u64) << self.shift);
                    }
                }
            }
        }
        "; not mapped by any page table".into()
    }

    /// Mappings of the large folio at `head` per mm_id (PTEs, and huge PMDs once each), by a
    /// rescan; for the message of a broken MM-ID rule.
    fn maps_by_mm(&self, head: u64) -> Vec<(u32, i64)> {
        let l = self.l;
        let nr = 1u64 << self.mem.folio_order(head);
        let mut out: Vec<(u32, i64)> = Vec::new();
        for mm in self.mms {
            let mut maps = 0i64;
            for vma in &mm.vmas {
                maps += vma.pmds.values().filter(|&&e| l.pte_pfn(e) == head).count() as i64;
                maps += vma.ptes.iter().filter(|&&e| !l.pte_none(e) && l.pte_pfn(e).wrapping_sub(head) < nr).count() as i64;
            }
            if maps > 0 {
                match out.iter_mut().find(|(id, _)| *id == mm.mm_id) {
                    Some((_, m)) => *m += maps,
                    None => out.push((mm.mm_id, maps)),
                }
            }
        }
        out
    }

    /// arm64 contpte blocks: PTE_CONT only where the kernel folds (v6.9+), and then on whole,
    /// naturally aligned blocks of valid entries mapping consecutive, aligned pfns with the
    /// same attributes but for young/dirty. PTE_CONT left on invalid (PROT_NONE) entries, which
    /// `contpte_set_ptes()` writes for a whole PROT_NONE block, is inert and allowed.
    fn check_contpte(&self, pid: u32, vma: &Vma) -> Result<()> {
        let l = self.l;
        let n = State::cont_ptes(l, self.p);
        let mut i = 0usize;
        while i < vma.ptes.len() {
            let e = vma.ptes[i];
            if l.pte_none(e) || !l.pte_cont(e) {
                i += 1;
                continue;
            }
            let at = format!("pid {pid} address {:#x}", (vma.start + i as u64) << self.shift);
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

    /// Before the `k`th mm is scanned: pages whose last mapper carries its tag (the mm
    /// [`NR_TAGS`] before) are marked [`EARLIER`], by a walk of that mm's page tables or, where
    /// that is longer, a sweep of the share's pages.
    fn retag(&self, sc: &mut Share, k: usize) {
        let (old, cur) = (&self.mms[k - NR_TAGS], tag(k));
        let entries: usize = old.vmas.iter().map(|v| v.ptes.len() + v.pmds.len() * self.ptrs_per_pte as usize).sum();
        let mut retag = |s: &mut u16| {
            if *s & TAG == cur {
                *s = (*s & !TAG) | EARLIER;
            }
        };
        if entries >= sc.page.len() / 4 {
            sc.page.iter_mut().for_each(retag);
            return;
        }
        let (lo, end) = (sc.lo, sc.lo + sc.page.len() as u64);
        for vma in &old.vmas {
            for &e in vma.pmds.values() {
                let head = self.l.pte_pfn(e);
                if head >= lo && head + self.ptrs_per_pte <= end {
                    sc.page[(head - lo) as usize..(head - lo + self.ptrs_per_pte) as usize].iter_mut().for_each(&mut retag);
                }
            }
            for &e in vma.ptes.iter() {
                let pfn = self.l.pte_pfn(e);
                if !self.l.pte_none(e) && pfn >= lo && pfn < end {
                    retag(&mut sc.page[(pfn - lo) as usize]);
                }
            }
        }
    }

    /// A run of `count` mappings of the large folio at `head` by mm `id` has ended: it proves
    /// the MM-ID slot of `id` if it reaches the slot's mapcount; else it is kept for the sum.
    fn end_run(&self, sc: &mut Share, id: u32, head: u64, count: u32) {
        if head == NO_RUN {
            return;
        }
        let mut keep = true;
        if let Some(lf) = self.mem.large_folio(head) {
            keep = false;
            for s in 0..2 {
                if lf.mm_id[s] == id {
                    let at = (head + s as u64).wrapping_sub(sc.lo) as usize;
                    match sc.page.get_mut(at) {
                        Some(v) if count as i64 > lf.mm_id_mapcount[s] as i64 => *v |= SLOT_OK,
                        _ => keep = true,
                    }
                }
            }
        }
        if keep {
            sc.runs.push((head, id, count));
        }
    }

    /// The page tables of the `k`th mm, for the pages the share owns: the PTE and PMD rules,
    /// counted into the scratch; returns the rss the share counts.
    fn scan_mm(&self, sc: &mut Share, t: Option<&Ticker>, k: usize) -> Result<[i64; 3]> {
        let (l, mem, mm) = (self.l, self.mem, &self.mms[k]);
        let shift = self.shift;
        if mm.exited && !mm.vmas.is_empty() {
            return Err(broken("exited-mm", format!("pid {} has exited but still has VMAs", mm.pid)));
        }
        if k >= NR_TAGS {
            self.retag(sc, k);
        }
        let cur = tag(k);
        let runs = self.p.mm_id;
        let mut rss = [0i64; 3];
        // The current run of one large folio's mappings: (folio, mappings).
        let mut run = (NO_RUN, 0u32);
        for (vi, vma) in mm.vmas.iter().enumerate() {
            if vi > 0 && mm.vmas[vi - 1].end() > vma.start {
                return Err(broken("vma-order", format!("pid {}: VMAs overlap at {:#x}", mm.pid, vma.start << shift)));
            }
            if sc.lead {
                self.check_contpte(mm.pid, vma)?;
            }
            for (&base, &e) in &vma.pmds {
                let head = l.pte_pfn(e);
                if !sc.owns(head) {
                    continue;
                }
                let at = || format!("pid {} address {:#x} (PMD {e:#x})", mm.pid, base << shift);
                let nr = self.ptrs_per_pte;
                if base % nr != 0 || base < vma.start || base + nr > vma.end() || !vma.is_anon() {
                    return Err(broken("pmd-leaf", format!("{}: a huge PMD must be aligned, inside its mapping, in a private anonymous mapping", at())));
                }
                let s = (base - vma.start) as usize;
                if !vma.ptes[s..s + nr as usize].iter().all(|&x| l.pte_none(x)) {
                    return Err(broken("pmd-leaf", format!("{}: PTEs under a huge PMD", at())));
                }
                if head == self.zero_pfn {
                    if l.pte_write(e) || !l.pte_special(e) {
                        return Err(broken("zero-page-pte", format!("{}: the huge zero page must be mapped special and read-only", at())));
                    }
                    continue;
                }
                let ok = head < self.n && !mem.is_free(head) && mem.folio_head(head) == head && mem.folio_order(head) == self.pmd_order && mem.test(head, PG_ANON);
                if !ok {
                    return Err(broken("pmd-leaf", format!("{}: pfn {head:#x} is not the first page of a PMD-sized anonymous folio", at())));
                }
                if l.pte_write(e) && !mem.test(head, PG_ANON_EXCLUSIVE) {
                    return Err(broken("writable-cow-not-exclusive", format!("{}: a writable huge PMD whose head pfn {head:#x} is not exclusive", at())));
                }
                if head + nr > self.n {
                    return Err(broken("pmd-leaf", format!("{}: the PMD-sized folio at pfn {head:#x} reaches past the end of memory", at())));
                }
                sc.pmd_heads.push(head);
                for pu in head..head + nr {
                    sc.map(pu, cur, l.pte_write(e), false);
                }
                if runs {
                    self.end_run(sc, mm.mm_id, run.0, run.1);
                    run = (head, 1);
                }
                rss[mm_counter(mem, head)] += nr as i64;
            }
            self.scan_ptes(sc, t, mm, vma, cur, &mut rss, &mut run)?;
        }
        self.end_run(sc, mm.mm_id, run.0, run.1);
        Ok(rss)
    }

    /// The PTEs of `vma` that map pages of the share. Blocks of [`BLOCK`] entries that map
    /// consecutive pfns, all small folios or all one large folio, are taken at once; other
    /// entries one by one ([`Ctx::scan_pte`]).
    #[allow(clippy::too_many_arguments)]
    #[inline(never)]
    fn scan_ptes(&self, sc: &mut Share, t: Option<&Ticker>, mm: &Mm, vma: &Vma, cur: u16, rss: &mut [i64; 3], run: &mut (u64, u32)) -> Result<()> {
        let l = self.l;
        let (lo, hi, end) = (sc.lo, sc.hi, sc.lo + sc.page.len() as u64);
        let (anon_vma, cow, runs) = (vma.is_anon(), vma.is_cow(), self.p.mm_id);
        let mut rc = RssCount::default();
        for (c, chunk) in vma.ptes.chunks(CHUNK).enumerate() {
            sc.pace(t, chunk.len() as u64)?;
            let mut j = 0;
            while j < chunk.len() {
                let Some(blk) = chunk.get(j..j + BLOCK) else {
                    self.scan_pte(sc, mm, vma, c * CHUNK + j, chunk[j], cur, rss, run, &mut rc)?;
                    j += 1;
                    continue;
                };
                let e0 = blk[0];
                let (pfn, write) = (l.pte_pfn(e0), l.pte_write(e0));
                // A run: present entries of consecutive pfns, one write bit. Mostly they differ
                // in the pfn alone, which one comparison of each whole entry tells.
                let linear = || {
                    let Some(d) = l.linear_advance(e0, BLOCK as u64) else {
                        return false;
                    };
                    let mut odd = 0u64;
                    for (k, &e) in blk.iter().enumerate() {
                        odd |= (e ^ e0.wrapping_add(d.wrapping_mul(k as u64))) | l.pte_none(e) as u64;
                    }
                    odd == 0 && l.pte_pfn(blk[BLOCK - 1]) == pfn.wrapping_add(BLOCK as u64 - 1)
                };
                let by_pfn = || {
                    let mut odd = 0u64;
                    for (k, &e) in blk.iter().enumerate() {
                        odd |= (l.pte_pfn(e) ^ pfn.wrapping_add(k as u64)) | l.pte_none(e) as u64 | (l.pte_write(e) ^ write) as u64;
                    }
                    odd == 0
                };
                let uniform = linear() || by_pfn();
                if uniform && (pfn.wrapping_add(BLOCK as u64) <= lo || pfn >= hi) {
                    // None of the pages is the share's.
                    j += BLOCK;
                    continue;
                }
                if uniform && pfn >= lo && pfn + BLOCK as u64 <= end && self.map_block(sc, mm.mm_id, pfn, write, anon_vma, cow, runs, cur, run, &mut rc) {
                    j += BLOCK;
                    continue;
                }
                for (k, &e) in blk.iter().enumerate() {
                    self.scan_pte(sc, mm, vma, c * CHUNK + j + k, e, cur, rss, run, &mut rc)?;
                }
                j += BLOCK;
            }
        }
        rss[MM_ANONPAGES] += rc.anon;
        rss[MM_SHMEMPAGES] += rc.shmem;
        rss[MM_FILEPAGES] += rc.pages - rc.anon - rc.shmem;
        Ok(())
    }

    /// [`BLOCK`] PTEs mapping pfns `[pfn, pfn + BLOCK)` of the share, writable or not: counted
    /// if they are all small folios or all one large folio and break no rule; else false,
    /// with nothing counted.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn map_block(&self, sc: &mut Share, mm_id: u32, pfn: u64, write: bool, anon_vma: bool, cow: bool, runs: bool, cur: u16, run: &mut (u64, u32), rc: &mut RssCount) -> bool {
        const ONES: u64 = 0x0101_0101_0101_0101;
        let mem = self.mem;
        let p = pfn as usize;
        let word = |a: &[u8]| u64::from_le_bytes(a[p..p + BLOCK].try_into().unwrap());
        let (orders, fl) = (word(&mem.order), word(&mem.flags));
        let o = orders & 0xff;
        let (anon, shmem);
        let mut head = NO_RUN;
        if orders == 0 {
            // Small folios: each page its own folio's first page.
            let anon_bits = (fl >> 1) & ONES;
            if anon_vma && anon_bits != ONES {
                return false;
            }
            let exclusive = ONES * (PG_ANON | PG_ANON_EXCLUSIVE) as u64;
            if write && cow && fl & exclusive != exclusive {
                return false;
            }
            let shmem_bits = (fl >> 2) & ONES & !anon_bits;
            // Bytes of 0 or 1 summed by a multiplication (no popcount in the baseline x86-64).
            anon = (anon_bits.wrapping_mul(ONES) >> 56) as i64;
            shmem = (shmem_bits.wrapping_mul(ONES) >> 56) as i64;
        } else if orders == o * ONES && o < 32 && (pfn ^ (pfn + BLOCK as u64 - 1)) >> o == 0 {
            // One large folio.
            head = pfn & !((1u64 << o) - 1);
            let hf = mem.flags[head as usize];
            let is_anon = hf & PG_ANON != 0;
            if anon_vma && !is_anon {
                return false;
            }
            let exclusive = ONES * PG_ANON_EXCLUSIVE as u64;
            if write && cow && !(is_anon && fl & exclusive == exclusive) {
                return false;
            }
            anon = if is_anon { BLOCK as i64 } else { 0 };
            shmem = if !is_anon && hf & PG_SWAPBACKED != 0 { BLOCK as i64 } else { 0 };
        } else if orders == o * ONES && (1..3).contains(&o) && pfn % BLOCK as u64 == 0 {
            // Whole folios of two or four pages: their first pages' flags.
            let nr = 1usize << o;
            let (mut a, mut sh, mut bad) = (0i64, 0i64, false);
            for j in (0..BLOCK).step_by(nr) {
                let hf = (fl >> (8 * j)) as u8;
                let is_anon = hf & PG_ANON != 0;
                bad |= anon_vma && !is_anon || write && cow && !is_anon;
                a += if is_anon { nr as i64 } else { 0 };
                sh += if !is_anon && hf & PG_SWAPBACKED != 0 { nr as i64 } else { 0 };
            }
            let exclusive = ONES * PG_ANON_EXCLUSIVE as u64;
            if bad || write && cow && fl & exclusive != exclusive {
                return false;
            }
            if !self.map_pages(sc, pfn, cur, write) {
                return false;
            }
            if runs {
                for j in (0..BLOCK).step_by(nr) {
                    let head = pfn + j as u64;
                    if head == run.0 {
                        run.1 += nr as u32;
                    } else {
                        self.end_run(sc, mm_id, run.0, run.1);
                        *run = (head, nr as u32);
                    }
                }
            }
            rc.pages += BLOCK as i64;
            rc.anon += a;
            rc.shmem += sh;
            return true;
        } else {
            return false;
        }
        if !self.map_pages(sc, pfn, cur, write) {
            return false;
        }
        if runs && head != NO_RUN {
            if head == run.0 {
                run.1 += BLOCK as u32;
            } else {
                self.end_run(sc, mm_id, run.0, run.1);
                *run = (head, BLOCK as u32);
            }
        }
        rc.pages += BLOCK as i64;
        rc.anon += anon;
        rc.shmem += shmem;
        true
    }

    /// Counts one PTE mapping of each of the [`BLOCK`] pages from `pfn` by the mm tagged `cur`;
    /// false, with nothing counted, if a count would overflow the scratch.
    #[inline(always)]
    fn map_pages(&self, sc: &mut Share, pfn: u64, cur: u16, write: bool) -> bool {
        let at = (pfn - sc.lo) as usize;
        let pages: &mut [u16; BLOCK] = (&mut sc.page[at..at + BLOCK]).try_into().unwrap();
        let w = if write { WRITABLE } else { 0 };
        let (mut new, mut full) = ([0u16; BLOCK], false);
        for (v, &s) in new.iter_mut().zip(pages.iter()) {
            let tag = s & TAG;
            let shared = ((tag != 0) & (tag != cur)) as u16 * SHARED;
            full |= s & COUNT == COUNT;
            *v = ((s & !TAG) | cur | shared | w).wrapping_add(1);
        }
        if full {
            return false;
        }
        *pages = new;
        true
    }

    /// One PTE, entry `i` of `vma`: the common case here, the rest in [`Ctx::map_pte`].
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn scan_pte(&self, sc: &mut Share, mm: &Mm, vma: &Vma, i: usize, e: u64, cur: u16, rss: &mut [i64; 3], run: &mut (u64, u32), rc: &mut RssCount) -> Result<()> {
        let (l, mem, n) = (self.l, self.mem, self.n as usize);
        if l.pte_none(e) {
            return Ok(());
        }
        let pfn = l.pte_pfn(e);
        let off = pfn.wrapping_sub(sc.lo);
        if off >= sc.hi - sc.lo {
            return Ok(());
        }
        let pu = pfn as usize;
        let o = if pu < n { mem.order[pu] } else { FREE };
        if o == FREE {
            return self.map_pte(sc, mm, vma, i, e, cur, rss, run);
        }
        // As `Memory::folio_head()`.
        let head = pfn & !((1u64 << (o & 63)) - 1);
        let hf = mem.flags[head as usize];
        let anon = hf & PG_ANON != 0;
        let write = l.pte_write(e);
        let s = sc.page[off as usize];
        let odd = vma.is_anon() && !anon || write && vma.is_cow() && !(anon && mem.flags[pu] & PG_ANON_EXCLUSIVE != 0) || s & COUNT == COUNT;
        if odd {
            return self.map_pte(sc, mm, vma, i, e, cur, rss, run);
        }
        let tag = s & TAG;
        let shared = if tag != 0 && tag != cur { SHARED } else { 0 };
        sc.page[off as usize] = ((s & !TAG) | cur | shared | if write { WRITABLE } else { 0 }) + 1;
        if self.p.mm_id && o > 0 {
            if head == run.0 {
                run.1 += 1;
            } else {
                self.end_run(sc, mm.mm_id, run.0, run.1);
                *run = (head, 1);
            }
        }
        rc.pages += 1;
        rc.anon += anon as i64;
        rc.shmem += (!anon && hf & PG_SWAPBACKED != 0) as i64;
        Ok(())
    }

    /// One PTE, entry `i` of `vma`, mapping a pfn of the share, every rule in order.
    #[allow(clippy::too_many_arguments)]
    #[cold]
    #[inline(never)]
    fn map_pte(&self, sc: &mut Share, mm: &Mm, vma: &Vma, i: usize, e: u64, cur: u16, rss: &mut [i64; 3], run: &mut (u64, u32)) -> Result<()> {
        let (l, mem) = (self.l, self.mem);
        let at = || format!("pid {} address {:#x} (PTE {e:#x})", mm.pid, (vma.start + i as u64) << self.shift);
        let pfn = l.pte_pfn(e);
        if pfn == self.zero_pfn {
            if l.pte_write(e) || !l.pte_special(e) {
                return Err(broken("zero-page-pte", format!("{}: the zero page must be mapped special and read-only", at())));
            }
            return Ok(());
        }
        if pfn >= self.n || mem.is_free(pfn) {
            return Err(broken("pte-maps-free-page", format!("{} maps pfn {pfn:#x}, which is not allocated", at())));
        }
        let head = mem.folio_head(pfn);
        let anon = mem.test(head, PG_ANON);
        if vma.is_anon() && !anon {
            return Err(broken("anon-vma-maps-file-page", format!("{} maps page-cache pfn {pfn:#x} in a private anonymous mapping", at())));
        }
        sc.map(pfn, cur, l.pte_write(e), true);
        if l.pte_write(e) && vma.is_cow() && !(anon && mem.test(pfn, PG_ANON_EXCLUSIVE)) {
            return Err(broken("writable-cow-not-exclusive", format!("{} is writable in a private mapping but pfn {pfn:#x} is not an exclusive anonymous page", at())));
        }
        if self.p.mm_id && mem.folio_order(head) > 0 {
            if head == run.0 {
                run.1 += 1;
            } else {
                self.end_run(sc, mm.mm_id, run.0, run.1);
                *run = (head, 1);
            }
        }
        rss[mm_counter(mem, head)] += 1;
        Ok(())
    }

    fn check_rss(&self, k: usize, rss: [i64; 3]) -> Result<()> {
        let mm = &self.mms[k];
        for c in 0..3 {
            if rss[c] != mm.rss[c] {
                return Err(broken("rss", format!("pid {}: {} rss counter is {}, page tables map {} such pages", mm.pid, RSS_NAMES[c], mm.rss[c], rss[c])));
            }
        }
        Ok(())
    }

    /// The pfns the active pins hold (but the zero page), sorted.
    fn pinned(&self) -> Result<Vec<u32>> {
        let active = || self.pins.iter().filter(|p| p.active);
        let mut v = crate::alloc::try_with_capacity(active().map(|p| p.pfns.len()).sum(), "check()'s pinned pages")?;
        for pin in active() {
            for &pfn in &pin.pfns {
                if pfn != self.zero_pfn {
                    if pfn >= self.n || self.mem.is_free(pfn) {
                        return Err(broken("pin-of-free-page", format!("a pin holds pfn {pfn:#x}, which is free")));
                    }
                    v.push(pfn as u32);
                }
            }
        }
        v.sort_unstable();
        Ok(v)
    }

    fn mark_cached(&self, sc: &mut Share) {
        let end = sc.lo + sc.page.len() as u64;
        for f in self.files {
            for &pfn in &f.cache {
                if pfn != NOT_CACHED && pfn >= sc.lo && pfn < end {
                    sc.page[(pfn - sc.lo) as usize] |= CACHED;
                }
            }
        }
    }

    /// The share's memory against the scratch: returns the free pages. The loop takes free
    /// pages and small folios that break no rule and leaves the rest to [`Ctx::check_folio`].
    #[inline(never)]
    fn scan_pages(&self, sc: &mut Share, t: Option<&Ticker>, pins: &[u32]) -> Result<u64> {
        let mem = self.mem;
        sc.pmd_heads.sort_unstable();
        sc.runs.sort_unstable_by_key(|&(head, id, _)| (head, id));
        let (lo, end) = (sc.lo, sc.lo + sc.page.len() as u64);
        let n = self.n as usize;
        let (order, flags, mapcount, refcount) = (&mem.order[..n], &mem.flags[..n], &mem.mapcount[..n], &mem.refcount[..n]);
        let mut at = Cursors { pin: pins.partition_point(|&x| (x as u64) < lo), pmd: 0, run: 0 };
        let mut free = 0u64;
        let mut pfn = lo;
        while pfn < end {
            sc.pace(t, CHUNK as u64 * sc.page_weight)?;
            let stop = end.min(pfn + CHUNK as u64);
            while pfn < stop {
                let i = pfn as usize;
                if pfn + BLOCK as u64 <= end {
                    let orders = u64::from_le_bytes(order[i..i + BLOCK].try_into().unwrap());
                    let zero = |a: &[i32]| a[i..i + BLOCK].iter().all(|&x| x == 0);
                    if orders == u64::MAX && zero(refcount) && zero(mapcount) {
                        free += BLOCK as u64;
                        pfn += BLOCK as u64;
                        continue;
                    }
                    if orders == 0 && self.small_block_ok(sc, pfn, pins, &at) {
                        pfn += BLOCK as u64;
                        continue;
                    }
                }
                let o = order[i];
                if o == FREE && refcount[i] == 0 && mapcount[i] == 0 {
                    free += 1;
                    pfn += 1;
                    continue;
                }
                if o == 0 {
                    let (s, f) = (sc.page[i - lo as usize], flags[i]);
                    let count = (s & COUNT) as i32;
                    let cached = s & CACHED != 0;
                    let ok = count != COUNT as i32
                        && mapcount[i] == count
                        && (s & SHARED == 0 || f & PG_ANON_EXCLUSIVE == 0 && (s & WRITABLE == 0 || f & PG_ANON == 0))
                        && cached == (f & PG_FILE != 0)
                        && refcount[i] == count + cached as i32
                        && refcount[i] > 0
                        && !matches!(pins.get(at.pin), Some(&x) if x as u64 == pfn);
                    if ok {
                        pfn += 1;
                        continue;
                    }
                }
                if o == FREE {
                    return Err(broken("free-page-state", format!("free pfn {pfn:#x} has refcount {} mapcount {}", refcount[i], mapcount[i])));
                }
                pfn += self.check_folio(sc, pfn, pins, &mut at)?;
            }
        }
        Ok(free)
    }

    /// Whether the [`BLOCK`] pages from `pfn`, small folios all, break no rule and hold no pin.
    #[inline(always)]
    fn small_block_ok(&self, sc: &Share, pfn: u64, pins: &[u32], at: &Cursors) -> bool {
        let mem = self.mem;
        let (i, k) = (pfn as usize, (pfn - sc.lo) as usize);
        let pages: &[u16; BLOCK] = sc.page[k..k + BLOCK].try_into().unwrap();
        let flags: &[u8; BLOCK] = mem.flags[i..i + BLOCK].try_into().unwrap();
        let mapcount: &[i32; BLOCK] = mem.mapcount[i..i + BLOCK].try_into().unwrap();
        let refcount: &[i32; BLOCK] = mem.refcount[i..i + BLOCK].try_into().unwrap();
        let mut ok = true;
        for j in 0..BLOCK {
            let (s, f) = (pages[j], flags[j]);
            let count = (s & COUNT) as i32;
            let cached = s & CACHED != 0;
            ok &= (count != COUNT as i32)
                & (mapcount[j] == count)
                & ((s & SHARED == 0) | ((f & PG_ANON_EXCLUSIVE == 0) & ((s & WRITABLE == 0) | (f & PG_ANON == 0))))
                & (cached == (f & PG_FILE != 0))
                & (refcount[j] == count + cached as i32)
                & (refcount[j] > 0);
        }
        ok && !matches!(pins.get(at.pin), Some(&x) if (x as u64) < pfn + BLOCK as u64)
    }

    /// The per-page rules of the folio at `head`, page by page: the first broken, or the
    /// folio's PTE mappings and mapped pages.
    #[cold]
    #[inline(never)]
    fn check_pages(&self, sc: &Share, head: u64, nr: u64) -> Result<(i64, i32)> {
        let (mem, lo) = (self.mem, sc.lo);
        let order = mem.folio_order(head);
        let what = |pg: u64| format!("pfn {pg:#x} (folio {head:#x}, order {order})");
        let anon = mem.flags[head as usize] & PG_ANON != 0;
        let (mut maps, mut mapped_pages) = (0i64, 0i32);
        for pg in head..head + nr {
            let j = pg as usize;
            let s = sc.page[(pg - lo) as usize];
            let count = sc.count(pg);
            if mem.mapcount[j] as u32 != count {
                return Err(broken("page-mapcount", format!("{}: stored mapcount {}, page tables map it {} time(s){}", what(pg), mem.mapcount[j], count, self.where_mapped(pg))));
            }
            if s & SHARED != 0 {
                if mem.flags[j] & PG_ANON_EXCLUSIVE != 0 {
                    return Err(broken("anon-exclusive-shared", format!("{} is PageAnonExclusive but mapped by several processes{}", what(pg), self.where_mapped(pg))));
                }
                if s & WRITABLE != 0 && anon {
                    return Err(broken("writable-shared-anon", format!("{} is an anonymous page mapped writable while mapped by several processes{}", what(pg), self.where_mapped(pg))));
                }
            }
            maps += count as i64;
            mapped_pages += (count > 0) as i32;
        }
        Ok((maps, mapped_pages))
    }

    /// The allocated folio at `head`, every rule in order; returns its pages.
    #[inline(never)]
    fn check_folio(&self, sc: &Share, head: u64, pins: &[u32], at: &mut Cursors) -> Result<u64> {
        let (p, mem, lo) = (self.p, self.mem, sc.lo);
        let end = lo + sc.page.len() as u64;
        let i = head as usize;
        let (mut pin_at, mut pmd_at, mut run_at) = (at.pin, at.pmd, at.run);
        let order = mem.folio_order(head);
        let what = |pg: u64| format!("pfn {pg:#x} (folio {head:#x}, order {order})");
        let nr = 1u64.checked_shl(order).filter(|&nr| head + nr <= end);
        let Some(nr) = nr else {
            return Err(broken("folio-order", format!("{}: the folio does not fit in memory", what(head))));
        };
        let anon = mem.flags[i] & PG_ANON != 0;
        // The per-page rules at once; page by page only where one is broken.
        let (k, len) = ((head - lo) as usize, nr as usize);
        let (mut maps, mut mapped_pages, mut odd) = (0i64, 0i32, false);
        let pages = sc.page[k..k + len].iter().zip(&mem.mapcount[i..i + len]).zip(&mem.flags[i..i + len]);
        for ((&s, &mapcount), &f) in pages {
            let count = s & COUNT;
            odd |= (count == COUNT) | (mapcount != count as i32) | ((s & SHARED != 0) & ((f & PG_ANON_EXCLUSIVE != 0) | ((s & WRITABLE != 0) & anon)));
            maps += count as i64;
            mapped_pages += (count != 0) as i32;
        }
        if odd {
            (maps, mapped_pages) = self.check_pages(sc, head, nr)?;
        }
        let mut pin_refs = 0i64;
        while pin_at < pins.len() && (pins[pin_at] as u64) < head + nr {
            pin_refs += 1;
            pin_at += 1;
        }
        let refs = mem.refcount[i] as i64;
        let bias = if order > 0 { 1 } else { GUP_PIN_COUNTING_BIAS as i64 };
        let cached = sc.page[(head - lo) as usize] & CACHED != 0;
        let cache_refs = if cached { nr as i64 } else { 0 };
        if cached != mem.test(head, PG_FILE) {
            return Err(broken("page-cache-flag", format!("{}: PG_FILE does not match page-cache membership", what(head))));
        }
        // A huge PMD maps the folio once and holds one reference.
        while pmd_at < sc.pmd_heads.len() && sc.pmd_heads[pmd_at] < head {
            pmd_at += 1;
        }
        let mut pmd_maps = 0i64;
        while pmd_at < sc.pmd_heads.len() && sc.pmd_heads[pmd_at] == head {
            pmd_maps += 1;
            pmd_at += 1;
        }
        let expect = maps + pmd_maps + pin_refs * bias + cache_refs;
        if refs != expect {
            return Err(broken("refcount", format!("{}: refcount {refs}, expected {expect} = {maps} PTE mapping(s) + {pmd_maps} PMD mapping(s) + {pin_refs} pin(s) + {cache_refs} page-cache reference(s){}", what(head), self.where_mapped(head))));
        }
        if refs <= 0 {
            return Err(broken("refcount", format!("{}: an allocated folio with refcount {refs}", what(head))));
        }
        if order > 0 {
            let Some(lf) = mem.large_folio(head) else {
                return Err(broken("large-folio-record", format!("{} has no large-folio record", what(head))));
            };
            if lf.large_mapcount as i64 + 1 != maps + pmd_maps {
                return Err(broken("large-mapcount", format!("{}: large mapcount {}, page tables map it {} time(s){}", what(head), lf.large_mapcount + 1, maps + pmd_maps, self.where_mapped(head))));
            }
            if lf.entire_mapcount as i64 + 1 != pmd_maps {
                return Err(broken("entire-mapcount", format!("{}: entire mapcount {}, {pmd_maps} huge PMD mapping(s){}", what(head), lf.entire_mapcount + 1, self.where_mapped(head))));
            }
            if lf.nr_pages_mapped != mapped_pages {
                return Err(broken("nr-pages-mapped", format!("{}: nr_pages_mapped {}, {mapped_pages} page(s) are mapped", what(head), lf.nr_pages_mapped)));
            }
            if lf.pincount as i64 != pin_refs {
                return Err(broken("pincount", format!("{}: pincount {}, {pin_refs} pin(s)", what(head), lf.pincount)));
            }
            // This folio's runs that proved no slot alone.
            while run_at < sc.runs.len() && sc.runs[run_at].0 < head {
                run_at += 1;
            }
            let first = run_at;
            while run_at < sc.runs.len() && sc.runs[run_at].0 == head {
                run_at += 1;
            }
            let runs = &sc.runs[first..run_at];
            if p.mm_id {
                let total = maps + pmd_maps - 1;
                for s in 0..2 {
                    let id = lf.mm_id[s];
                    let c = lf.mm_id_mapcount[s];
                    if id == MM_ID_DUMMY {
                        if c != -1 {
                            return Err(broken("mm-id-slot", format!("{}: free MM-ID slot {s} has mapcount {}", what(head), c + 1)));
                        }
                        continue;
                    }
                    // Every run of this mm went to `runs` unless one proved the slot.
                    let proven = sc.page[(head + s as u64 - lo) as usize] & SLOT_OK != 0;
                    let summed = || runs.iter().filter(|r| r.1 == id).map(|r| r.2 as i64).sum::<i64>();
                    if c < 0 || !proven && c as i64 + 1 > summed() {
                        let have = self.maps_by_mm(head).iter().find(|m| m.0 == id).map_or(0, |m| m.1);
                        return Err(broken("mm-id-slot", format!("{}: MM-ID slot {s} says mm {id} maps it {} time(s), it maps it {have}{}", what(head), c + 1, self.where_mapped(head))));
                    }
                }
                // A slot that holds every mapping leaves no other mm mapping it.
                if !mem.test(head, PG_MAYBE_SHARED) && total >= 0 {
                    let owned = (0..2).any(|s| lf.mm_id[s] != MM_ID_DUMMY && lf.mm_id_mapcount[s] as i64 == total);
                    if !owned {
                        let mms = self.maps_by_mm(head).len();
                        return Err(broken("mm-id-shared-bit", format!("{}: \"maybe mapped shared\" is clear but {mms} mm(s) map it{}", what(head), self.where_mapped(head))));
                    }
                }
            }
        }
        *at = Cursors { pin: pin_at, pmd: pmd_at, run: run_at };
        Ok(nr)
    }

    /// Every rule, in order, on one thread.
    fn check_in_order(&self, page: &mut [u16], t: &Ticker) -> Result<()> {
        let stop = AtomicBool::new(false);
        let mut sc = Share::new(0, u64::MAX, page, true, 1, &stop);
        for k in 0..self.mms.len() {
            let rss = self.scan_mm(&mut sc, Some(t), k)?;
            self.check_rss(k, rss)?;
        }
        let pins = self.pinned()?;
        self.mark_cached(&mut sc);
        let free = self.scan_pages(&mut sc, Some(t), &pins)?;
        self.check_free(free)
    }

    fn check_free(&self, free: u64) -> Result<()> {
        if free != self.mem.free_pages {
            return Err(broken("free-pages", format!("the allocator counts {} free pages, {free} pages are free", self.mem.free_pages)));
        }
        Ok(())
    }

    /// One share's part of every rule: its rss per mm and its free pages.
    fn run_share(&self, sc: &mut Share, t: Option<&Ticker>, pins: &[u32]) -> Result<(Vec<[i64; 3]>, u64)> {
        let mut rss = crate::alloc::try_with_capacity(self.mms.len(), "check()'s rss counts")?;
        for k in 0..self.mms.len() {
            rss.push(self.scan_mm(sc, t, k)?);
        }
        self.mark_cached(sc);
        let free = self.scan_pages(sc, t, pins)?;
        Ok((rss, free))
    }

    /// Every rule on two threads that own pfns `[0, mid)` and `[mid, ..)`: true if all hold,
    /// false if some rule is broken (not which is first) or no second thread could be had.
    fn check_split(&self, page: &mut [u16], mid: u64, t: &Ticker) -> Result<bool> {
        let pins = match self.pinned() {
            Err(e) if e.kind == ErrorKind::Invariant => return Ok(false),
            r => r?,
        };
        let stop = AtomicBool::new(false);
        let (a, b) = page.split_at_mut(mid as usize);
        let mut first = Share::new(0, mid, a, true, 2, &stop);
        let second = Share::new(mid, u64::MAX, b, false, 1, &stop);
        let pins = &pins[..];
        let done = std::thread::scope(|s| {
            let h = std::thread::Builder::new().name("check".into()).spawn_scoped(s, move || {
                let mut second = second;
                self.run_share(&mut second, None, pins)
            });
            let Ok(h) = h else {
                return None;
            };
            let mut r0 = self.run_share(&mut first, Some(t), pins);
            if r0.is_err() {
                stop.store(true, Ordering::Relaxed);
            }
            while !h.is_finished() {
                std::thread::sleep(std::time::Duration::from_millis(2));
                if let Err(e) = t.poll() {
                    stop.store(true, Ordering::Relaxed);
                    r0 = r0.and(Err(e));
                }
            }
            Some((r0, h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))))
        });
        let Some((r0, r1)) = done else {
            return Ok(false);
        };
        // The first thread's error comes first: the second one stops when told to.
        let ((rss0, free0), (rss1, free1)) = match (r0, r1) {
            (Ok(a), Ok(b)) => (a, b),
            (Err(e), _) | (_, Err(e)) if e.kind == ErrorKind::Invariant => return Ok(false),
            (Err(e), _) | (_, Err(e)) => return Err(e),
        };
        let rss_ok = (0..self.mms.len()).all(|k| (0..3).all(|c| rss0[k][c] + rss1[k][c] == self.mms[k].rss[c]));
        Ok(rss_ok && free0 + free1 == self.mem.free_pages)
    }
}

impl State {
    /// Checks every invariant; the first one broken comes back as an Invariant error that
    /// names the rule, the page or folio, and a process and address that map it.
    pub fn check<L: PteLayout>(&self, l: &L, p: &KernelProfile) -> Result<()> {
        self.check_threads(l, p, PARALLEL_FROM)
    }

    /// [`State::check`], on two threads where memory has at least `parallel_from` pages and
    /// the host two CPUs.
    pub(crate) fn check_threads<L: PteLayout>(&self, l: &L, p: &KernelProfile, parallel_from: u64) -> Result<()> {
        let cx = Ctx::new(self, l, p);
        let n = cx.n as usize;
        let mut page = crate::alloc::try_with_capacity_huge::<u16>(n, "check()'s page scratch")?;
        page.resize(n, 0);
        // The border between the threads' pfns: no folio crosses it.
        let align = 1u64 << self.mem.max_order.max(self.pmd_order);
        let mid = cx.n / 2 / align * align;
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
        if cx.n >= parallel_from && mid > 0 && cpus > 1 {
            if cx.check_split(&mut page, mid, &self.ticker)? {
                return Ok(());
            }
            page.fill(0);
        }
        cx.check_in_order(&mut page, &self.ticker)
    }
}

#[cfg(test)]
mod tests;

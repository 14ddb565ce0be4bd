//! `folio_pte_batch()` in every form the kernel has had, and the fork loop's cut of a whole
//! table into batches. docs/semantics.md §3–§4 is the specification; the pure-Python
//! `ptebatch.reference.batch` is the readable twin that the tests hold this code to.
//!
//! Kernel sources: mm/memory.c (seed series v3 patches 13–15, Jan 2024; v6.9),
//! mm/internal.h (v6.10 – v6.16, and `folio_pte_batch_flags()` from v6.17),
//! arch/arm64/mm/contpte.c (`contpte_ptep_get`, v6.9+).

use crate::arch::PteLayout;
use crate::error::{Error, Result};
use crate::kernel::{FlagFamily, FolioEnd, FpbForm, KernelProfile};

/// The `fpb_t` flags in one canonical sense, whatever family they were given in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FpbFlags {
    pub respect_dirty: bool,
    pub respect_soft_dirty: bool,
    pub respect_write: bool,
    pub merge_write: bool,
    pub merge_young_dirty: bool,
}

pub const FPB_IGNORE_DIRTY: u32 = 1 << 0;
pub const FPB_IGNORE_SOFT_DIRTY: u32 = 1 << 1;
pub const FPB_RESPECT_DIRTY: u32 = 1 << 0;
pub const FPB_RESPECT_SOFT_DIRTY: u32 = 1 << 1;
pub const FPB_RESPECT_WRITE: u32 = 1 << 2;
pub const FPB_MERGE_WRITE: u32 = 1 << 3;
pub const FPB_MERGE_YOUNG_DIRTY: u32 = 1 << 4;

impl FpbFlags {
    /// Reads kernel flag bits of `family`; bits the family does not define are an error.
    pub fn from_bits(family: FlagFamily, bits: u32) -> Result<FpbFlags> {
        match family {
            FlagFamily::Ignore => {
                if bits & !(FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY) != 0 {
                    return Err(Error::value(format!(
                        "flags {bits:#x}: this kernel knows only FPB_IGNORE_DIRTY and \
                         FPB_IGNORE_SOFT_DIRTY"
                    )));
                }
                Ok(FpbFlags {
                    respect_dirty: bits & FPB_IGNORE_DIRTY == 0,
                    respect_soft_dirty: bits & FPB_IGNORE_SOFT_DIRTY == 0,
                    ..Default::default()
                })
            }
            FlagFamily::Respect => {
                let all = FPB_RESPECT_DIRTY
                    | FPB_RESPECT_SOFT_DIRTY
                    | FPB_RESPECT_WRITE
                    | FPB_MERGE_WRITE
                    | FPB_MERGE_YOUNG_DIRTY;
                if bits & !all != 0 {
                    return Err(Error::value(format!("flags {bits:#x}: unknown FPB_* bits")));
                }
                Ok(FpbFlags {
                    respect_dirty: bits & FPB_RESPECT_DIRTY != 0,
                    respect_soft_dirty: bits & FPB_RESPECT_SOFT_DIRTY != 0,
                    respect_write: bits & FPB_RESPECT_WRITE != 0,
                    merge_write: bits & FPB_MERGE_WRITE != 0,
                    merge_young_dirty: bits & FPB_MERGE_YOUNG_DIRTY != 0,
                })
            }
        }
    }

    /// The flags `copy_present_ptes()` (mm/memory.c) passes on fork, as kernel bits of the
    /// form's family: dirty matters unless the VMA is shared, soft-dirty only while tracking
    /// is on, and from v6.17 the write bit is merged into the child's template.
    pub fn fork_bits(form: FpbForm, shared: bool, soft_dirty_tracking: bool) -> u32 {
        match form.flag_family() {
            FlagFamily::Ignore => {
                (if shared { FPB_IGNORE_DIRTY } else { 0 })
                    | (if soft_dirty_tracking { 0 } else { FPB_IGNORE_SOFT_DIRTY })
            }
            FlagFamily::Respect => {
                FPB_MERGE_WRITE
                    | (if shared { 0 } else { FPB_RESPECT_DIRTY })
                    | (if soft_dirty_tracking { FPB_RESPECT_SOFT_DIRTY } else { 0 })
            }
        }
    }
}

/// A folio as `folio_pte_batch()` sees it: its first PFN and its size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Folio {
    pub pfn: u64,
    pub nr_pages: u64,
}

impl Folio {
    fn end_pfn(&self) -> u64 {
        self.pfn.saturating_add(self.nr_pages)
    }

    fn contains(&self, pfn: u64) -> bool {
        pfn >= self.pfn && pfn - self.pfn < self.nr_pages
    }
}

/// What one call reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// PTEs in the batch, from 1 to `max_nr`.
    pub nr: usize,
    /// The caller's copy of the first PTE after the call (merged in v6.17+).
    pub pte: u64,
    /// `None` where the version has no such out-parameter.
    pub any_writable: Option<bool>,
    pub any_young: Option<bool>,
    pub any_dirty: Option<bool>,
}

/// A page table as the kernel walks it: the entries and the virtual page number of entry 0.
#[derive(Clone, Copy, Debug)]
pub struct Table<'a> {
    pub ptes: &'a [u64],
    pub first_vpn: u64,
}

impl Table<'_> {
    /// Position of entry `i` inside its last-level table, modulo `n` (a power of two).
    #[inline]
    fn index_mod(&self, i: usize, n: u64) -> u64 {
        self.first_vpn.wrapping_add(i as u64) & (n - 1)
    }

    /// `ptep_get()`; on arm64 from v6.9 a valid contpte entry comes back with the young and
    /// dirty state of its whole block OR-ed in (`contpte_ptep_get`, arch/arm64/mm/contpte.c),
    /// counting the block entries that lie inside this table.
    #[inline]
    pub fn ptep_get<L: PteLayout>(&self, l: &L, contpte: bool, i: usize) -> u64 {
        let v = self.ptes[i];
        if contpte && l.pte_valid_cont(v) {
            self.contpte_gather(l, i, v)
        } else {
            v
        }
    }

    fn contpte_gather<L: PteLayout>(&self, l: &L, i: usize, v: u64) -> u64 {
        let n = l.geometry().cont_ptes;
        let back = (self.index_mod(i, n) as usize).min(i);
        let start = i - back;
        let end = (i - self.index_mod(i, n) as usize + n as usize).min(self.ptes.len());
        let end = end.max(i + 1);
        let mut out = v;
        for &e in &self.ptes[start..end] {
            if l.pte_dirty(e) {
                out = l.pte_mkdirty(out);
            }
            if l.pte_young(e) {
                out = l.pte_mkyoung(out);
            }
        }
        out
    }
}

/// `__pte_batch_clear_ignored()`: the value a PTE is compared by.
#[inline]
fn normalise<L: PteLayout>(l: &L, flags: FpbFlags, mut v: u64) -> u64 {
    if !flags.respect_dirty {
        v = l.pte_mkclean(v);
    }
    if !flags.respect_soft_dirty {
        v = l.pte_clear_soft_dirty(v);
    }
    if !flags.respect_write {
        v = l.pte_wrprotect(v);
    }
    l.pte_mkold(v)
}

/// `folio_pte_batch()` with the kernel's debug preconditions turned into errors.
#[allow(clippy::too_many_arguments)]
pub fn folio_pte_batch<L: PteLayout>(
    l: &L,
    form: FpbForm,
    table: Table<'_>,
    start: usize,
    max_nr: usize,
    folio: Folio,
    flags: FpbFlags,
) -> Result<Batch> {
    let len = table.ptes.len();
    if start >= len {
        return Err(Error::value(format!("start {start} is outside the table of {len} PTEs")));
    }
    if max_nr < 1 || max_nr > len - start {
        return Err(Error::value(format!(
            "max_nr {max_nr} must be between 1 and the {} PTEs left in the table from start {start}",
            len - start
        )));
    }
    if folio.nr_pages < 2 {
        return Err(Error::value(format!(
            "folio_nr_pages {} is not a large folio; the kernel only batches large folios",
            folio.nr_pages
        )));
    }
    if folio.pfn.checked_add(folio.nr_pages).is_none() {
        return Err(Error::value("folio_pfn + folio_nr_pages overflows"));
    }
    let first = table.ptep_get(l, form.uses_hint(), start);
    if !l.pte_present(first) {
        return Err(Error::value(format!("the first PTE {first:#x} (index {start}) is not present")));
    }
    let pfn = l.pte_pfn(first);
    if !folio.contains(pfn) {
        return Err(Error::value(format!(
            "the first PTE maps pfn {pfn:#x}, outside the folio [{:#x}, {:#x})",
            folio.pfn,
            folio.end_pfn()
        )));
    }
    check_family(form, flags)?;
    Ok(folio_pte_batch_unchecked(l, form, table, start, max_nr, folio, flags))
}

fn check_family(form: FpbForm, flags: FpbFlags) -> Result<()> {
    if form.flag_family() == FlagFamily::Ignore
        && (flags.respect_write || flags.merge_write || flags.merge_young_dirty)
    {
        return Err(Error::value(format!(
            "FPB_RESPECT_WRITE and FPB_MERGE_* do not exist in the {} form",
            form.name()
        )));
    }
    Ok(())
}

/// The algorithm itself; callers guarantee docs/semantics.md §3's preconditions.
pub fn folio_pte_batch_unchecked<L: PteLayout>(
    l: &L,
    form: FpbForm,
    table: Table<'_>,
    start: usize,
    max_nr: usize,
    folio: Folio,
    flags: FpbFlags,
) -> Batch {
    let contpte = form.uses_hint();
    let first = table.ptep_get(l, contpte, start);
    let end = folio.end_pfn();
    let hint = |i: usize, v: u64| -> u64 {
        if contpte {
            l.pte_batch_hint(table.first_vpn.wrapping_add(i as u64), v)
        } else {
            1
        }
    };
    let mut any_writable = false;
    let mut any_young = false;
    let mut any_dirty = false;

    let nr = match form.folio_end() {
        // Seed series, and v6.9 – v6.14: test the folio end on each accepted entry.
        FolioEnd::Equal | FolioEnd::AtOrAfter => {
            let stop = start + max_nr;
            let first_step = hint(start, first);
            let mut expected = normalise(l, flags, l.pte_advance_pfn(first, first_step));
            let mut i = start.saturating_add(first_step as usize);
            loop {
                let run = scan_runs(l, flags, table, contpte, i, stop, expected, Some(end));
                i = run.i;
                expected = run.expected;
                any_writable |= run.any_writable;
                any_young |= run.any_young;
                any_dirty |= run.any_dirty;
                if i >= stop {
                    break;
                }
                let cur = table.ptep_get(l, contpte, i);
                if normalise(l, flags, cur) != expected {
                    break;
                }
                let pfn = l.pte_pfn(cur);
                let past = match form.folio_end() {
                    FolioEnd::Equal => pfn == end,
                    _ => pfn >= end,
                };
                if past {
                    break;
                }
                any_writable |= l.pte_write(cur);
                any_young |= l.pte_young(cur);
                any_dirty |= l.pte_dirty(cur);
                let step = hint(i, cur);
                expected = l.pte_advance_pfn(expected, step);
                i = i.saturating_add(step as usize);
            }
            (i - start).min(max_nr)
        }
        // v6.15+: the folio end is a bound on max_nr, so nothing past it is ever read.
        FolioEnd::Clamp => {
            let max_nr = max_nr.min((end - l.pte_pfn(first)) as usize);
            let mut nr = hint(start, first) as usize;
            let mut expected = normalise(l, flags, l.pte_advance_pfn(first, nr as u64));
            loop {
                let run = scan_runs(l, flags, table, contpte, start + nr, start + max_nr, expected, None);
                nr = run.i - start;
                expected = run.expected;
                any_writable |= run.any_writable;
                any_young |= run.any_young;
                any_dirty |= run.any_dirty;
                if nr >= max_nr {
                    break;
                }
                let cur = table.ptep_get(l, contpte, start + nr);
                if normalise(l, flags, cur) != expected {
                    break;
                }
                any_writable |= l.pte_write(cur);
                any_young |= l.pte_young(cur);
                any_dirty |= l.pte_dirty(cur);
                let step = hint(start + nr, cur);
                expected = l.pte_advance_pfn(expected, step);
                nr = nr.saturating_add(step as usize);
            }
            nr.min(max_nr)
        }
    };

    batch_result(l, form, flags, first, nr, any_writable, any_young, any_dirty)
}

/// What `folio_pte_batch()` reports for a batch of `nr` entries from `first` whose entries
/// had these write, young and dirty bits: the first PTE, merged where the flags ask.
#[allow(clippy::too_many_arguments)]
#[inline]
fn batch_result<L: PteLayout>(l: &L, form: FpbForm, flags: FpbFlags, first: u64, nr: usize, any_writable: bool, any_young: bool, any_dirty: bool) -> Batch {
    let mut pte = first;
    if flags.merge_write && any_writable {
        pte = l.pte_mkwrite(pte);
    }
    if flags.merge_young_dirty {
        if any_young {
            pte = l.pte_mkyoung(pte);
        }
        if any_dirty {
            pte = l.pte_mkdirty(pte);
        }
    }
    Batch {
        nr,
        pte,
        any_writable: form.reports_any_writable().then_some(any_writable),
        any_young: form.reports_any_young_dirty().then_some(any_young),
        any_dirty: form.reports_any_young_dirty().then_some(any_dirty),
    }
}

/// [`folio_pte_batch_unchecked`] for the common run, found without the scan: the entries
/// from `start` to the folio's end (or `max_nr`) are `pte_advance_pfn(first, k)` exactly, as
/// a fault or a fork writes a whole folio. Every form accepts each of them (each equals the
/// expected value before any normalisation, no pfn reaches the folio end) and stops after
/// the last: at `max_nr`, at the folio end, or at the next entry, whose pfn would be the
/// folio end. `None` when the run is not such, or may be contpte (the hint and the read
/// differ), for the caller to scan.
#[inline(always)]
pub fn folio_pte_batch_linear<L: PteLayout>(l: &L, form: FpbForm, ptes: &[u64], start: usize, max_nr: usize, folio: Folio, flags: FpbFlags) -> Option<Batch> {
    let (step, b) = folio_pte_batch_linear_guess(l, form, ptes[start], max_nr, folio, flags)?;
    let run = &ptes[start..start + b.nr];
    // Differences OR-ed over the run: no branch per entry, so it vectorises.
    let mut diff = 0u64;
    let mut expected = run[0];
    for &v in run {
        diff |= v ^ expected;
        expected = expected.wrapping_add(step);
    }
    (diff == 0).then_some(b)
}

/// What [`folio_pte_batch_linear`] reports for a run from `first` if the run is linear, and
/// the step `d` it must have (entry `k` is `first + k * d`), without reading the run: for a
/// caller that compares the run in a pass of its own. `None` where it would give `None`
/// without reading the run.
#[inline(always)]
pub fn folio_pte_batch_linear_guess<L: PteLayout>(l: &L, form: FpbForm, first: u64, max_nr: usize, folio: Folio, flags: FpbFlags) -> Option<(u64, Batch)> {
    if form.uses_hint() && l.pte_valid_cont(first) {
        return None;
    }
    let pfn = l.pte_pfn(first);
    let nr = max_nr.min(folio.end_pfn().checked_sub(pfn)? as usize);
    let step = l.linear_advance(first, nr as u64)?;
    // The out-parameters gather the entries after the first, which has the bits of each.
    let more = nr > 1;
    Some((step, batch_result(l, form, flags, first, nr, more && l.pte_write(first), more && l.pte_young(first), more && l.pte_dirty(first))))
}

/// Entries compared per step of [`scan_runs`].
const RUN: usize = 8;

/// Where [`scan_runs`] stopped, and what it accepted.
struct Run {
    i: usize,
    expected: u64,
    any_writable: bool,
    any_young: bool,
    any_dirty: bool,
}

/// Accepts whole runs of `RUN` entries at once while that cannot differ from stepping one by
/// one: every entry matches, none is a contpte entry (whose read and hint differ), the PFN
/// advance is linear, and no PFN in the run reaches the folio end `end` (for the forms that
/// test it per entry). Without contpte it then takes the entries after the last whole run
/// one by one up to the first that stops the batch; the caller's single-step loop takes it
/// from where this stops, so the result is the kernel loop's exactly.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn scan_runs<L: PteLayout>(
    l: &L,
    flags: FpbFlags,
    table: Table<'_>,
    contpte: bool,
    i: usize,
    stop: usize,
    expected: u64,
    end: Option<u64>,
) -> Run {
    // One copy of the loop per set of ignored bits, so that the comparison has no branches.
    match (flags.respect_dirty, flags.respect_soft_dirty, flags.respect_write) {
        (false, false, false) => scan_runs_as::<L, false, false, false>(l, table, contpte, i, stop, expected, end),
        (false, false, true) => scan_runs_as::<L, false, false, true>(l, table, contpte, i, stop, expected, end),
        (false, true, false) => scan_runs_as::<L, false, true, false>(l, table, contpte, i, stop, expected, end),
        (false, true, true) => scan_runs_as::<L, false, true, true>(l, table, contpte, i, stop, expected, end),
        (true, false, false) => scan_runs_as::<L, true, false, false>(l, table, contpte, i, stop, expected, end),
        (true, false, true) => scan_runs_as::<L, true, false, true>(l, table, contpte, i, stop, expected, end),
        (true, true, false) => scan_runs_as::<L, true, true, false>(l, table, contpte, i, stop, expected, end),
        (true, true, true) => scan_runs_as::<L, true, true, true>(l, table, contpte, i, stop, expected, end),
    }
}

/// [`normalise`] with the flags as constants.
#[inline(always)]
fn normalise_as<L: PteLayout, const DIRTY: bool, const SOFT_DIRTY: bool, const WRITE: bool>(l: &L, v: u64) -> u64 {
    let flags = FpbFlags { respect_dirty: DIRTY, respect_soft_dirty: SOFT_DIRTY, respect_write: WRITE, ..Default::default() };
    normalise(l, flags, v)
}

/// [`scan_runs`] for one set of respected bits.
#[inline(never)]
#[allow(clippy::too_many_arguments)]
fn scan_runs_as<L: PteLayout, const DIRTY: bool, const SOFT_DIRTY: bool, const WRITE: bool>(
    l: &L,
    table: Table<'_>,
    contpte: bool,
    mut i: usize,
    stop: usize,
    mut expected: u64,
    end: Option<u64>,
) -> Run {
    let (mut w, mut y, mut d) = (false, false, false);
    while i + RUN <= stop {
        if contpte && l.pte_valid_cont(table.ptes[i]) {
            break;
        }
        let Some(step) = l.linear_advance(expected, RUN as u64) else { break };
        if let Some(end) = end {
            if l.pte_pfn(expected).saturating_add(RUN as u64) > end {
                break;
            }
        }
        let chunk: &[u64; RUN] = table.ptes[i..i + RUN].try_into().expect("RUN entries");
        // Differences OR-ed together rather than compared one by one: no branch per entry.
        let mut diff = 0u64;
        let mut cont = false;
        let (mut cw, mut cy, mut cd) = (false, false, false);
        for (k, &cur) in chunk.iter().enumerate() {
            diff |= normalise_as::<L, DIRTY, SOFT_DIRTY, WRITE>(l, cur) ^ expected.wrapping_add(step.wrapping_mul(k as u64));
            cont |= contpte & l.pte_valid_cont(cur);
            cw |= l.pte_write(cur);
            cy |= l.pte_young(cur);
            cd |= l.pte_dirty(cur);
        }
        let e = expected.wrapping_add(step.wrapping_mul(RUN as u64));
        if diff != 0 || cont {
            break;
        }
        w |= cw;
        y |= cy;
        d |= cd;
        expected = e;
        i += RUN;
    }
    if !contpte {
        // The rest one at a time, as the caller's loop takes them (a hint of 1): it stops at
        // the same entry, which it tests again. A matching entry's pfn is the expected one,
        // which reaches the folio end before passing it, so `>=` serves every form.
        while i < stop {
            let cur = table.ptes[i];
            if normalise_as::<L, DIRTY, SOFT_DIRTY, WRITE>(l, cur) != expected || end.is_some_and(|end| l.pte_pfn(cur) >= end) {
                break;
            }
            w |= l.pte_write(cur);
            y |= l.pte_young(cur);
            d |= l.pte_dirty(cur);
            expected = l.pte_advance_pfn(expected, 1);
            i += 1;
        }
    }
    Run { i, expected, any_writable: w, any_young: y, any_dirty: d }
}

/// The folios of a table: sorted, non-overlapping runs of PFNs, with an optional
/// PFN-indexed map for O(1) lookups.
#[derive(Clone, Copy, Debug)]
pub struct Folios<'a> {
    start: &'a [u64],
    nr_pages: &'a [u64],
    pfn_to_folio: Option<&'a [i64]>,
}

impl<'a> Folios<'a> {
    pub fn new(
        start: &'a [u64],
        nr_pages: &'a [u64],
        pfn_to_folio: Option<&'a [i64]>,
    ) -> Result<Folios<'a>> {
        if start.len() != nr_pages.len() {
            return Err(Error::value(format!(
                "folio_start has {} entries but folio_nr_pages has {}",
                start.len(),
                nr_pages.len()
            )));
        }
        let mut prev_end = 0u64;
        for (k, (&s, &n)) in start.iter().zip(nr_pages).enumerate() {
            if n == 0 {
                return Err(Error::value(format!("folio {k} has folio_nr_pages 0")));
            }
            let e = s.checked_add(n).ok_or_else(|| {
                Error::value(format!("folio {k}: start {s:#x} + {n} pages overflows"))
            })?;
            if k > 0 && s < prev_end {
                return Err(Error::value(format!(
                    "folio {k} (start {s:#x}) overlaps or precedes folio {} (end {prev_end:#x}); \
                     folios must be sorted by start and must not overlap",
                    k - 1
                )));
            }
            prev_end = e;
        }
        if let Some(map) = pfn_to_folio {
            for (pfn, &k) in map.iter().enumerate() {
                if k == -1 {
                    continue;
                }
                let ok = usize::try_from(k).ok().filter(|&k| k < start.len()).map(|k| {
                    let f = Folio { pfn: start[k], nr_pages: nr_pages[k] };
                    f.contains(pfn as u64)
                });
                match ok {
                    Some(true) => {}
                    Some(false) => {
                        return Err(Error::value(format!(
                            "pfn_to_folio[{pfn}]={k} but folio {k} does not contain pfn {pfn:#x}"
                        )))
                    }
                    None => {
                        return Err(Error::value(format!(
                            "pfn_to_folio[{pfn}]={k} is neither -1 nor a folio index (there are {} \
                             folios)",
                            start.len()
                        )))
                    }
                }
            }
        }
        Ok(Folios { start, nr_pages, pfn_to_folio })
    }

    pub fn len(&self) -> usize {
        self.start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
    }

    #[inline]
    fn folio(&self, k: usize) -> Folio {
        Folio { pfn: self.start[k], nr_pages: self.nr_pages[k] }
    }

    /// The folio holding `pfn`. `cursor` remembers the last hit, so that a walk over
    /// ascending PFNs costs O(1) per lookup without a map.
    #[inline]
    pub fn lookup(&self, pfn: u64, cursor: &mut usize) -> Option<Folio> {
        if let Some(map) = self.pfn_to_folio {
            // `new` checked every entry: -1, or a folio that holds that PFN.
            let k = usize::try_from(pfn).ok().and_then(|p| map.get(p)).copied()?;
            return usize::try_from(k).ok().map(|k| self.folio(k));
        }
        for k in [*cursor + 1, *cursor] {
            if k < self.len() && self.folio(k).contains(pfn) {
                *cursor = k;
                return Some(self.folio(k));
            }
        }
        // Last folio starting at or below pfn.
        let k = self.start.partition_point(|&s| s <= pfn);
        if k > 0 && self.folio(k - 1).contains(pfn) {
            *cursor = k - 1;
            return Some(self.folio(k - 1));
        }
        None
    }
}

/// Cuts a whole table into the batches `copy_pte_range()` forms on fork (mm/memory.c):
/// none, non-present, special and small-folio entries are batches of one; a large folio's
/// run never crosses a page-table (PMD) boundary or the end of the table. Returns the lengths.
pub fn batch_lengths<L: PteLayout>(
    l: &L,
    profile: &KernelProfile,
    table: Table<'_>,
    folios: &Folios<'_>,
    flags: FpbFlags,
) -> Result<Vec<u32>> {
    let n = table.ptes.len();
    let mut out = crate::alloc::try_with_capacity_huge::<u32>(n, "the batch lengths")?;
    let Some(form) = profile.fpb else {
        out.resize(n, 1);
        return Ok(out);
    };
    check_family(form, flags)?;
    let contpte = form.uses_hint();
    let ptrs = l.geometry().ptrs_per_pte;
    let mut cursor = 0usize;
    let mut cached: Option<Folio> = None;
    let mut i = 0usize;
    while i < n {
        let v = table.ptep_get(l, contpte, i);
        let mut len = 1usize;
        if l.pte_present(v) && !l.pte_none(v) && !l.pte_special(v) {
            let pfn = l.pte_pfn(v);
            // Tables of small folios in PFN order: the next folio is this single page.
            if folios.pfn_to_folio.is_none()
                && folios.start.get(cursor + 1) == Some(&pfn)
                && folios.nr_pages.get(cursor + 1) == Some(&1)
            {
                cursor += 1;
                out.push(1);
                i += 1;
                continue;
            }
            let folio = match cached {
                Some(f) if f.contains(pfn) => cached,
                _ => {
                    cached = folios.lookup(pfn, &mut cursor);
                    cached
                }
            };
            if let Some(folio) = folio {
                if folio.nr_pages > 1 {
                    let to_pmd = (ptrs - table.index_mod(i, ptrs)) as usize;
                    let max_nr = to_pmd.min(n - i);
                    if max_nr > 1 {
                        len = folio_pte_batch_unchecked(l, form, table, i, max_nr, folio, flags).nr;
                    }
                }
            }
        }
        out.push(len as u32);
        i += len;
    }
    if out.len() < out.capacity() / 2 {
        out.shrink_to_fit();
    }
    Ok(out)
}

#[cfg(test)]
mod tests;

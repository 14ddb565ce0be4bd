//! The kernel's batched PTE helpers over a run of one page table (include/linux/pgtable.h,
//! v6.9+: `set_ptes()`, `wrprotect_ptes()`, `clear_full_ptes()`, `get_and_clear_full_ptes()`;
//! arch/arm64/include/asm/pgtable.h and arch/arm64/mm/contpte.c for the contpte forms and
//! `ptep_get()`). One implementation: the simulation's fork, zap, fault and mprotect paths and
//! the array helpers for Python (docs/helpers.md) both call these.
//!
//! A table is `&mut [u64]` whose entry 0 maps virtual page `first_vpn`; `cont` is `CONT_PTES`
//! when the kernel folds contpte blocks (arm64, v6.9+), else `None` (every other layout and
//! version, where the helpers are the generic loops).

use crate::arch::PteLayout;
use crate::batch::Table;
use crate::contpte::Cont;
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::rmap::FolioCounts;
use crate::stats::Stats;

/// `CONT_PTES` when the kernel folds user contpte blocks on this layout (arm64, v6.9+).
#[inline]
pub fn cont_ptes<L: PteLayout>(l: &L, p: &KernelProfile) -> Option<usize> {
    (p.contpte && l.caps().contpte).then(|| l.geometry().cont_ptes as usize)
}

/// The folio holding `pfn`: its first pfn and size, or `None` for a free page or a pfn
/// outside memory (what contpte folding asks before it folds a block).
#[inline]
pub fn folio_of<M: FolioCounts>(m: &M, pfn: u64) -> Option<(u64, u64)> {
    if pfn >= m.nr_pages() || m.order_of(pfn) == crate::memory::FREE {
        return None;
    }
    let h = m.folio_head(pfn);
    Some((h, 1 << m.folio_order(h)))
}

/// `ptep_get()`: on a contpte entry (arm64, v6.9+), the young and dirty bits of the whole
/// block OR-ed in (`contpte_ptep_get()`), counting the block's entries inside the table.
#[inline]
pub fn ptep_get<L: PteLayout>(l: &L, cont: Option<usize>, t: &[u64], first_vpn: u64, i: usize) -> u64 {
    Table { ptes: t, first_vpn }.ptep_get(l, cont.is_some(), i)
}

/// `set_ptes(mm, addr, ptep, pte, nr)`: entry `i + k` gets `pte_advance_pfn(pte, k)`. On
/// arm64 contpte, one entry (`set_pte_at()`) unfolds the block it overwrites and then tries
/// to fold (`contpte_try_fold()`, which asks `folio_of` which folio a pfn is in); several
/// entries go to a not-present range and whole aligned blocks get PTE_CONT
/// (`contpte_set_ptes()`).
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn set_ptes<L: PteLayout>(
    l: &L,
    cont: Option<usize>,
    t: &mut [u64],
    first_vpn: u64,
    i: usize,
    pte: u64,
    nr: usize,
    folio_of: impl Fn(u64) -> Option<(u64, u64)>,
    st: &mut Stats,
) {
    st.pte_writes += nr as u64;
    match cont {
        None => match l.linear_advance(pte, nr as u64) {
            // The common case: each entry is the last plus a constant (vectorises).
            Some(step) => {
                let mut v = pte;
                for e in &mut t[i..i + nr] {
                    *e = v;
                    v = v.wrapping_add(step);
                }
            }
            None => {
                for (k, e) in t[i..i + nr].iter_mut().enumerate() {
                    *e = l.pte_advance_pfn(pte, k as u64);
                }
            }
        },
        Some(n) => {
            let mut c = Cont { t, first_vpn, n };
            if nr == 1 {
                c.set_pte(l, i, pte, folio_of, st);
            } else {
                c.set_ptes(l, i, pte, nr);
            }
        }
    }
}

/// `contpte_try_unfold_partial()` (one entry: `contpte_try_unfold()`, the same thing): the
/// blocks `[i, i + nr)` covers only in part are unfolded before a batched write.
#[inline]
fn unfold_partial<L: PteLayout>(l: &L, cont: Option<usize>, t: &mut [u64], first_vpn: u64, i: usize, nr: usize, st: &mut Stats) {
    if let Some(n) = cont {
        let mut c = Cont { t, first_vpn, n };
        if nr == 1 {
            c.unfold(l, i, st);
        } else {
            c.unfold_partial(l, i, nr, st);
        }
    }
}

/// `wrprotect_ptes()`: `pte_wrprotect()` on each entry of the run; on arm64 the blocks it
/// covers in part are unfolded first and whole blocks keep PTE_CONT
/// (`contpte_wrprotect_ptes()`, v6.9).
#[inline]
pub fn wrprotect_ptes<L: PteLayout>(l: &L, cont: Option<usize>, t: &mut [u64], first_vpn: u64, i: usize, nr: usize, st: &mut Stats) {
    unfold_partial(l, cont, t, first_vpn, i, nr, st);
    for e in &mut t[i..i + nr] {
        *e = l.pte_wrprotect(*e);
    }
    st.pte_writes += nr as u64;
}

/// `clear_full_ptes()`: the run becomes `pte_none`. On arm64 the blocks it covers in part are
/// unfolded first, except when the whole mm goes (`full`), where nothing is repainted.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn clear_full_ptes<L: PteLayout>(l: &L, cont: Option<usize>, t: &mut [u64], first_vpn: u64, i: usize, nr: usize, full: bool, st: &mut Stats) {
    if !full {
        unfold_partial(l, cont, t, first_vpn, i, nr, st);
    }
    t[i..i + nr].fill(l.geometry().none_value);
    st.pte_writes += nr as u64;
}

/// `get_and_clear_full_ptes()`: as [`clear_full_ptes`], returning the run's first entry
/// (after any unfold) with the dirty and young bits of every entry of the run OR-ed in.
#[allow(clippy::too_many_arguments)]
#[inline]
pub fn get_and_clear_full_ptes<L: PteLayout>(
    l: &L,
    cont: Option<usize>,
    t: &mut [u64],
    first_vpn: u64,
    i: usize,
    nr: usize,
    full: bool,
    st: &mut Stats,
) -> u64 {
    if !full {
        unfold_partial(l, cont, t, first_vpn, i, nr, st);
    }
    let run = &mut t[i..i + nr];
    let mut pte = run[0];
    let (mut dirty, mut young) = (false, false);
    for &e in &run[1..] {
        dirty |= l.pte_dirty(e);
        young |= l.pte_young(e);
    }
    if dirty {
        pte = l.pte_mkdirty(pte);
    }
    if young {
        pte = l.pte_mkyoung(pte);
    }
    run.fill(l.geometry().none_value);
    st.pte_writes += nr as u64;
    pte
}

/// The run `[i, i + nr)` of a table of `len` entries, checked for the array helpers.
pub fn check_run(len: usize, i: usize, nr: usize) -> Result<()> {
    if nr == 0 {
        return Err(Error::value("nr must be at least 1"));
    }
    if i >= len || nr > len - i {
        return Err(Error::value(format!(
            "the run [{i}, {i} + {nr}) does not fit the table of {len} entries (index, nr)"
        )));
    }
    Ok(())
}

/// The checks the array forms of the whole-table loops make before they write anything:
/// every entry is `pte_none` or present (swap and migration entries are not modelled), and
/// every present entry that maps a page (not special, not the zero page) maps an allocated
/// page of `mem` whose folio (the order stored on that page) has that order stored on every
/// page and ends inside memory, so that the loops stay inside the arrays. `what` names
/// the table in messages.
pub fn check_table<L: PteLayout, M: FolioCounts>(l: &L, t: &[u64], zero_pfn: u64, mem: &M, what: &str) -> Result<()> {
    // The folio checked last: the rest of a run of one folio costs a range test, done for
    // CHUNK entries at once without branches; a chunk that leaves the folio is walked entry
    // by entry.
    const CHUNK: usize = 8;
    let (mut lo, mut hi) = (0u64, 0u64);
    let in_folio = |v: u64, lo: u64, hi: u64| {
        (l.pte_pfn(v).wrapping_sub(lo) < hi.wrapping_sub(lo)) & l.pte_present(v) & !l.pte_special(v)
    };
    let mut i = 0;
    while i < t.len() {
        let end = (i + CHUNK).min(t.len());
        let chunk = &t[i..end];
        if chunk.len() == CHUNK && chunk.iter().all(|&v| in_folio(v, lo, hi)) {
            i = end;
            continue;
        }
        for (j, &v) in chunk.iter().enumerate() {
            if in_folio(v, lo, hi) {
                continue;
            }
            if let Some((head, nr)) = check_entry(l, i + j, v, zero_pfn, mem, what)? {
                (lo, hi) = (head, head + nr);
            }
        }
        i = end;
    }
    Ok(())
}

/// One entry of [`check_table`]: the folio it maps, if any.
#[inline(never)]
pub(crate) fn check_entry<L: PteLayout, M: FolioCounts>(l: &L, i: usize, v: u64, zero_pfn: u64, mem: &M, what: &str) -> Result<Option<(u64, u64)>> {
    if l.pte_none(v) || (l.pte_present(v) && l.pte_special(v)) {
        return Ok(None);
    }
    if !l.pte_present(v) {
        return Err(Error::value(format!(
            "{what}[{i}]={v:#x} is neither none nor present: swap and migration entries are not modelled"
        )));
    }
    let pfn = l.pte_pfn(v);
    if pfn == zero_pfn {
        return Ok(None);
    }
    let n = mem.nr_pages();
    if pfn >= n {
        return Err(Error::value(format!("{what}[{i}]={v:#x} maps pfn {pfn:#x}, beyond the {n} pages of the count arrays")));
    }
    let o = mem.order_of(pfn);
    if o == crate::memory::FREE {
        return Err(Error::value(format!("{what}[{i}]={v:#x} maps pfn {pfn:#x}, a free page (order 255)")));
    }
    let head = pfn & !((1u64 << o.min(63)) - 1);
    if o >= 32 || mem.order_of(head) != o || head + (1u64 << o) > n {
        return Err(Error::value(format!(
            "{what}[{i}]={v:#x} maps pfn {pfn:#x} of order {o}, but order[{head}]={} (every page of a \
             folio carries its order, and a folio ends inside memory)",
            mem.order_of(head)
        )));
    }
    // The callers skip the checks of later entries inside this folio, and the loops take the
    // folio from any of its pages: every page must carry the order, not only this one.
    if let Some(k) = mem.orders(head, 1u64 << o).iter().position(|&x| x != o) {
        return Err(Error::value(format!(
            "{what}[{i}]={v:#x} maps pfn {pfn:#x} of a folio of order {o} at {head}, but order[{}]={} \
             (every page of a folio carries its order)",
            head + k as u64,
            mem.order_of(head + k as u64)
        )));
    }
    Ok(Some((head, 1u64 << o)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::{Arm64, PteBits, X86_64};

    fn pte<L: PteLayout>(l: &L, pfn: u64, write: bool, dirty: bool, young: bool) -> u64 {
        l.mk_pte(pfn, PteBits { present: true, write, dirty, young, ..Default::default() }).unwrap()
    }

    #[test]
    fn set_ptes_advances_the_pfn() {
        let l = X86_64;
        let mut t = vec![0u64; 8];
        let mut st = Stats::default();
        set_ptes(&l, None, &mut t, 0, 2, pte(&l, 100, true, false, false), 4, |_| None, &mut st);
        let pfns: Vec<u64> = t[2..6].iter().map(|&v| l.pte_pfn(v)).collect();
        assert_eq!(pfns, vec![100, 101, 102, 103]);
        assert!(t[..2].iter().chain(&t[6..]).all(|&v| l.pte_none(v)));
        assert_eq!(st.pte_writes, 4);
    }

    #[test]
    fn get_and_clear_gathers_dirty_and_young_of_the_run() {
        let l = X86_64;
        let mut t: Vec<u64> = (0..4).map(|k| pte(&l, 8 + k, false, k == 2, k == 3)).collect();
        let mut st = Stats::default();
        let got = get_and_clear_full_ptes(&l, None, &mut t, 0, 0, 4, false, &mut st);
        assert_eq!(l.pte_pfn(got), 8);
        assert!(l.pte_dirty(got) && l.pte_young(got));
        assert!(t.iter().all(|&v| l.pte_none(v)));
        // A run of one returns its entry as it was.
        let mut t = vec![pte(&l, 8, true, false, true)];
        assert_eq!(get_and_clear_full_ptes(&l, None, &mut t, 0, 0, 1, true, &mut st), pte(&l, 8, true, false, true));
    }

    #[test]
    fn contpte_set_ptes_folds_whole_aligned_blocks_and_wrprotect_unfolds_partial_ones() {
        let l = Arm64::new(12);
        let n = l.geometry().cont_ptes as usize;
        let mut t = vec![l.geometry().none_value; 3 * n];
        let mut st = Stats::default();
        // Entries n/2 .. 2n + n/2 map pfns aligned with them: only the middle block is whole.
        set_ptes(&l, Some(n), &mut t, 0, n / 2, pte(&l, 4 * n as u64 + n as u64 / 2, true, false, false), 2 * n, |_| None, &mut st);
        assert!(t[n..2 * n].iter().all(|&v| l.pte_cont(v)));
        assert!(!t[n / 2..n].iter().any(|&v| l.pte_cont(v)));
        // Write-protect a run that covers the middle block in part: it is unfolded.
        t[n + 1] = l.pte_mkdirty(t[n + 1]);
        wrprotect_ptes(&l, Some(n), &mut t, 0, n + 2, 3, &mut st);
        assert!(!t[n..2 * n].iter().any(|&v| l.pte_cont(v)));
        // The repaint gave every entry of the block the dirty bit.
        assert!(t[n..2 * n].iter().all(|&v| l.pte_dirty(v)));
        assert!(t[n + 2..n + 5].iter().all(|&v| !l.pte_write(v)));
        assert!(l.pte_write(t[n + 5]));
        assert_eq!(st.tlb_flush_ranges, 1);
    }

    #[test]
    fn contpte_ptep_get_gathers_the_block_and_full_clear_does_not_unfold() {
        let l = Arm64::new(12);
        let n = l.geometry().cont_ptes as usize;
        let mut t = vec![l.geometry().none_value; n];
        let mut st = Stats::default();
        set_ptes(&l, Some(n), &mut t, 0, 0, pte(&l, 0, true, false, false), n, |_| None, &mut st);
        t[n - 1] = l.pte_mkyoung(l.pte_mkdirty(t[n - 1]));
        let got = ptep_get(&l, Some(n), &t, 0, 0);
        assert!(l.pte_dirty(got) && l.pte_young(got) && l.pte_cont(got));
        assert!(!l.pte_dirty(ptep_get(&l, None, &t, 0, 0)));
        let flushes = st.tlb_flush_ranges;
        let mut u = t.clone();
        clear_full_ptes(&l, Some(n), &mut u, 0, 0, 2, true, &mut st);
        assert_eq!(st.tlb_flush_ranges, flushes);
        assert!(u[2..].iter().all(|&v| l.pte_cont(v)));
        // Not full: the block is unfolded before two of its entries go.
        clear_full_ptes(&l, Some(n), &mut t, 0, 0, 2, false, &mut st);
        assert_eq!(st.tlb_flush_ranges, flushes + 1);
        assert!(t[2..].iter().all(|&v| !l.pte_cont(v) && l.pte_dirty(v)));
    }

    #[test]
    fn single_set_pte_folds_the_last_entry_of_a_block_of_one_folio() {
        let l = Arm64::new(12);
        let n = l.geometry().cont_ptes as usize;
        let mut t = vec![l.geometry().none_value; n];
        let mut st = Stats::default();
        let folio = |pfn: u64| (32..48).contains(&pfn).then_some((32, 16));
        for k in 0..n {
            set_ptes(&l, Some(n), &mut t, 0, k, pte(&l, 32 + k as u64, false, false, false), 1, folio, &mut st);
        }
        assert!(t.iter().all(|&v| l.pte_cont(v)));
    }

    #[test]
    fn run_and_table_checks() {
        assert!(check_run(8, 0, 8).is_ok());
        assert!(check_run(8, 7, 2).is_err());
        assert!(check_run(8, 8, 1).is_err());
        assert!(check_run(8, 0, 0).is_err());
    }
}

//! Named corner cases of folio_pte_batch() (mm/memory.c v6.9, mm/internal.h v6.10 – v6.17):
//! folio end, XEN PV, contpte hints, merged bits; and properties over random tables.

use super::*;
use crate::arch::{Arm64, Layout, PteBits, X86_64XenPv, X86_64};
use crate::kernel::{FpbForm, KernelProfile};
use crate::with_layout;
use proptest::prelude::*;

const ALL_FORMS: [FpbForm; 5] =
    [FpbForm::Seed, FpbForm::V6_9, FpbForm::V6_10, FpbForm::V6_15, FpbForm::V6_17];

fn ro() -> PteBits {
    PteBits::present()
}

fn table_of<L: PteLayout>(l: &L, pfns: &[Option<u64>], bits: PteBits) -> Vec<u64> {
    pfns.iter()
        .map(|p| match p {
            Some(pfn) => l.mk_pte(*pfn, bits).unwrap(),
            None => l.geometry().none_value,
        })
        .collect()
}

fn fork_flags(form: FpbForm) -> FpbFlags {
    FpbFlags::from_bits(form.flag_family(), FpbFlags::fork_bits(form, false, false)).unwrap()
}

fn run<L: PteLayout>(l: &L, form: FpbForm, t: &[u64], start: usize, max_nr: usize, folio: Folio) -> Batch {
    let table = Table { ptes: t, first_vpn: 0 };
    folio_pte_batch(l, form, table, start, max_nr, folio, fork_flags(form)).unwrap()
}

#[test]
fn stops_at_a_physically_adjacent_next_folio_in_every_form() {
    let l = X86_64;
    let pfns: Vec<_> = (0x100..0x120).map(Some).collect();
    let t = table_of(&l, &pfns, ro());
    let folio = Folio { pfn: 0x100, nr_pages: 16 };
    for form in ALL_FORMS {
        assert_eq!(run(&l, form, &t, 0, 32, folio).nr, 16, "{form:?}");
        assert_eq!(run(&l, form, &t, 5, 27, folio).nr, 11, "{form:?}");
        assert_eq!(run(&l, form, &t, 5, 4, folio).nr, 4, "{form:?}: max_nr bounds");
    }
}

#[test]
fn xen_pv_none_pte_overrun_before_v6_15_only() {
    // pfn 0x110, right after the folio, has no machine frame; the table has holes after it.
    let l = X86_64XenPv::new(vec![0x110]);
    let mut pfns: Vec<_> = (0x100..0x110).map(Some).collect();
    pfns.extend([None, None, None]);
    let t = table_of(&l, &pfns, ro());
    let folio = Folio { pfn: 0x100, nr_pages: 16 };
    for form in [FpbForm::Seed, FpbForm::V6_9, FpbForm::V6_10] {
        assert_eq!(run(&l, form, &t, 0, 19, folio).nr, 17, "{form:?} overruns by one none PTE");
    }
    for form in [FpbForm::V6_15, FpbForm::V6_17] {
        assert_eq!(run(&l, form, &t, 0, 19, folio).nr, 16, "{form:?} stops at the folio end");
    }
    // Without the quirk nothing overruns.
    let plain = table_of(&X86_64, &pfns, ro());
    for form in ALL_FORMS {
        assert_eq!(run(&X86_64, form, &plain, 0, 19, folio).nr, 16);
    }
}

#[test]
fn contpte_hint_overshoot_is_caught_by_at_or_after_and_by_the_clamp() {
    // A 12-page folio under a (crafted) contpte block of 16 entries, then another block.
    let l = Arm64::new(12);
    let pfns: Vec<_> = (0x100..0x120).map(Some).collect();
    let t = table_of(&l, &pfns, PteBits { cont: true, ..ro() });
    let folio = Folio { pfn: 0x100, nr_pages: 12 };
    // v6.9/v6.10: the hint jumps the whole block, the next read (pfn 0x110) is >= the end.
    assert_eq!(run(&l, FpbForm::V6_9, &t, 0, 32, folio).nr, 16);
    assert_eq!(run(&l, FpbForm::V6_10, &t, 0, 32, folio).nr, 16);
    // v6.15+: max_nr is clamped to the 12 pages left, and the result to max_nr.
    assert_eq!(run(&l, FpbForm::V6_15, &t, 0, 32, folio).nr, 12);
    assert_eq!(run(&l, FpbForm::V6_17, &t, 0, 32, folio).nr, 12);
    // The seed form has no hints: it reads every entry and stops exactly at the end.
    assert_eq!(run(&l, FpbForm::Seed, &t, 0, 32, folio).nr, 12);
    // Starting mid-block, the first hint is the rest of the block.
    assert_eq!(run(&l, FpbForm::V6_17, &t, 3, 29, folio).nr, 9);
}

#[test]
fn any_writable_never_includes_the_first_pte() {
    let l = X86_64;
    let mut t = table_of(&l, &[Some(0x40), Some(0x41), Some(0x42)], ro());
    t[0] = l.pte_mkwrite(t[0]);
    let folio = Folio { pfn: 0x40, nr_pages: 4 };
    for form in [FpbForm::Seed, FpbForm::V6_9, FpbForm::V6_10, FpbForm::V6_15] {
        let b = run(&l, form, &t, 0, 3, folio);
        assert_eq!((b.nr, b.any_writable), (3, Some(false)), "{form:?}");
    }
    t[2] = l.pte_mkwrite(t[2]);
    let b = run(&l, FpbForm::V6_9, &t, 0, 3, folio);
    assert_eq!((b.any_writable, b.any_young, b.any_dirty), (Some(true), None, None));
    let b = run(&l, FpbForm::V6_10, &t, 0, 3, folio);
    assert_eq!((b.any_writable, b.any_young, b.any_dirty), (Some(true), Some(false), Some(false)));
    let b = run(&l, FpbForm::V6_17, &t, 0, 3, folio);
    assert_eq!((b.any_writable, b.any_young, b.any_dirty), (None, None, None));
}

#[test]
fn v6_17_merges_into_the_first_pte() {
    let l = X86_64;
    let mut t = table_of(&l, &[Some(8), Some(9), Some(10), Some(11)], ro());
    t[1] = l.pte_mkwrite(t[1]);
    t[2] = l.pte_mkyoung(t[2]);
    t[3] = l.pte_mkdirty(t[3]);
    let folio = Folio { pfn: 8, nr_pages: 4 };
    let table = Table { ptes: &t, first_vpn: 0 };
    let flags = FpbFlags::from_bits(FlagFamily::Respect, FPB_MERGE_WRITE | FPB_MERGE_YOUNG_DIRTY).unwrap();
    let b = folio_pte_batch(&l, FpbForm::V6_17, table, 0, 4, folio, flags).unwrap();
    assert_eq!(b.nr, 4);
    assert_eq!(b.pte, l.pte_mkdirty(l.pte_mkyoung(l.pte_mkwrite(t[0]))));
    // Respecting dirt splits the batch at the dirty PTE; respecting write at the writable one.
    let respect = |bits| FpbFlags::from_bits(FlagFamily::Respect, bits).unwrap();
    let b = folio_pte_batch(&l, FpbForm::V6_17, table, 0, 4, folio, respect(FPB_RESPECT_DIRTY)).unwrap();
    assert_eq!((b.nr, b.pte), (3, t[0]));
    let b = folio_pte_batch(&l, FpbForm::V6_17, table, 0, 4, folio, respect(FPB_RESPECT_WRITE)).unwrap();
    assert_eq!(b.nr, 1);
}

#[test]
fn uffd_wp_always_ends_a_batch_young_never_does() {
    let l = X86_64;
    let mut t = table_of(&l, &[Some(0), Some(1), Some(2), Some(3)], ro());
    t[1] = l.pte_mkyoung(t[1]);
    t[3] |= 1 << 10; // uffd-wp
    let folio = Folio { pfn: 0, nr_pages: 4 };
    for form in ALL_FORMS {
        assert_eq!(run(&l, form, &t, 0, 4, folio).nr, 3, "{form:?}");
    }
}

#[test]
fn contpte_ptep_get_gathers_dirt_over_the_block() {
    // Block of 16 at vpn 16..31; only entry 20 is dirty. Respecting dirt, a batch from a clean
    // first entry of the previous (non-cont) run must stop at the block (it reads as dirty).
    let l = Arm64::new(12);
    let mut t = table_of(&l, &(0..32).map(Some).collect::<Vec<_>>(), ro());
    for e in &mut t[16..] {
        *e = l.set_cont_bit(*e);
    }
    t[20] = l.pte_mkdirty(t[20]);
    let table = Table { ptes: &t, first_vpn: 0 };
    assert!(l.pte_dirty(table.ptep_get(&l, true, 17)));
    assert!(!l.pte_dirty(table.ptep_get(&l, false, 17)));
    let folio = Folio { pfn: 0, nr_pages: 32 };
    // From a clean first PTE inside the block: gathered dirty first, so the whole block batches.
    assert_eq!(run(&l, FpbForm::V6_17, &t, 16, 16, folio).nr, 16);
    // The seed form reads raw entries: it stops at the dirty one.
    assert_eq!(run(&l, FpbForm::Seed, &t, 16, 16, folio).nr, 4);
}

#[test]
fn preconditions_are_errors() {
    let l = X86_64;
    let t = table_of(&l, &[Some(4), None, Some(6)], ro());
    let table = Table { ptes: &t, first_vpn: 0 };
    let folio = Folio { pfn: 4, nr_pages: 4 };
    let f = fork_flags(FpbForm::V6_17);
    let call = |start, max_nr, folio| folio_pte_batch(&l, FpbForm::V6_17, table, start, max_nr, folio, f);
    assert!(call(3, 1, folio).is_err(), "start past the end");
    assert!(call(0, 0, folio).is_err(), "max_nr 0");
    assert!(call(0, 4, folio).is_err(), "max_nr past the table");
    assert!(call(1, 1, folio).is_err(), "first PTE not present");
    assert!(call(0, 1, Folio { pfn: 5, nr_pages: 4 }).is_err(), "pfn outside the folio");
    assert!(call(0, 1, Folio { pfn: 4, nr_pages: 1 }).is_err(), "small folio");
    assert!(call(0, 1, Folio { pfn: u64::MAX - 1, nr_pages: 4 }).is_err(), "overflow");
    let respect = FpbFlags::from_bits(FlagFamily::Respect, FPB_RESPECT_WRITE).unwrap();
    assert!(folio_pte_batch(&l, FpbForm::V6_9, table, 0, 1, folio, respect).is_err());
    assert!(FpbFlags::from_bits(FlagFamily::Ignore, 4).is_err());
    assert!(FpbFlags::from_bits(FlagFamily::Respect, 32).is_err());
}

fn lengths(layout: &Layout, kernel: &str, t: &[u64], first_vpn: u64, start: &[u64], nr: &[u64]) -> Vec<u32> {
    let profile = KernelProfile::parse(kernel).unwrap();
    let folios = Folios::new(start, nr, None).unwrap();
    let flags = match profile.fpb {
        Some(form) => FpbFlags::from_bits(form.flag_family(), FpbFlags::fork_bits(form, false, false)).unwrap(),
        None => FpbFlags::default(),
    };
    with_layout!(layout, l => batch_lengths(l, &profile, Table { ptes: t, first_vpn }, &folios, flags)).unwrap()
}

#[test]
fn a_folio_across_a_pmd_boundary_is_two_batches() {
    let layout = Layout::X86_64(X86_64);
    // 16-page folio at pfn 0x1000 mapped at vpn 504..519: 8 PTEs each side of the boundary.
    let t = table_of(&X86_64, &(0x1000..0x1010).map(Some).collect::<Vec<_>>(), ro());
    for k in ["seed", "6.9", "6.12", "6.15", "6.18"] {
        assert_eq!(lengths(&layout, k, &t, 504, &[0x1000], &[16]), vec![8, 8], "{k}");
    }
    assert_eq!(lengths(&layout, "6.8", &t, 504, &[0x1000], &[16]), vec![1; 16]);
    assert_eq!(lengths(&layout, "6.18", &t, 0, &[0x1000], &[16]), vec![16]);
}

#[test]
fn holes_small_folios_and_special_ptes_are_single() {
    let l = X86_64;
    let layout = Layout::X86_64(l);
    let mut t = table_of(&l, &[Some(0), Some(1), None, Some(3), Some(8), Some(9), Some(10), Some(11)], ro());
    t[5] = l.pte_mkspecial(t[5]);
    // Folios: [0,4) large, 8 small, [9, 12) large (3 pages is not a power of two, but fine).
    let got = lengths(&layout, "6.18", &t, 0, &[0, 8, 9], &[4, 1, 3]);
    assert_eq!(got, vec![2, 1, 1, 1, 1, 2]);
}

#[test]
fn folio_lists_are_validated() {
    assert!(Folios::new(&[0, 2], &[4, 2], None).is_err(), "overlap");
    assert!(Folios::new(&[4, 0], &[1, 1], None).is_err(), "unsorted");
    assert!(Folios::new(&[0], &[0], None).is_err(), "empty folio");
    assert!(Folios::new(&[0], &[1, 2], None).is_err(), "lengths differ");
    assert!(Folios::new(&[0, 4], &[2, 2], Some(&[0i64, 0, 1])).is_err(), "folio 1 lacks pfn 2");
    assert!(Folios::new(&[0, 4], &[2, 2], Some(&[0i64, 0, -2])).is_err(), "not an index");
    assert!(Folios::new(&[0, 4], &[2, 2], Some(&[0i64, 0, 2])).is_err(), "no folio 2");
    let map = [0i64, 0, -1, -1, 1];
    let f = Folios::new(&[0, 4], &[2, 2], Some(&map)).unwrap();
    let mut c = 0;
    assert_eq!(f.lookup(1, &mut c), Some(Folio { pfn: 0, nr_pages: 2 }));
    assert_eq!(f.lookup(4, &mut c), Some(Folio { pfn: 4, nr_pages: 2 }));
    assert_eq!(f.lookup(2, &mut c), None);
    assert_eq!(f.lookup(99, &mut c), None, "past the map: no folio");
}

/// The linear shortcut takes a whole written folio, and leaves a run with a changed bit, or
/// a contpte run, to the scan.
#[test]
fn the_linear_shortcut_takes_whole_written_folios() {
    let l = X86_64;
    let bits = PteBits { write: true, dirty: true, young: true, ..ro() };
    let pfns: Vec<Option<u64>> = (32..64).map(Some).collect();
    let mut t = table_of(&l, &pfns, bits);
    let folio = Folio { pfn: 32, nr_pages: 16 };
    for form in ALL_FORMS {
        let b = folio_pte_batch_linear(&l, form, &t, 2, 30, folio, fork_flags(form)).unwrap();
        assert_eq!(b.nr, 14);
        assert_eq!(b, folio_pte_batch_unchecked(&l, form, Table { ptes: &t, first_vpn: 0 }, 2, 30, folio, fork_flags(form)));
    }
    t[5] = l.pte_mkclean(t[5]);
    assert!(folio_pte_batch_linear(&l, FpbForm::V6_17, &t, 0, 16, folio, fork_flags(FpbForm::V6_17)).is_none());
    let a = Arm64::new(12);
    let n = a.geometry().cont_ptes as usize;
    let mut c = vec![a.geometry().none_value; n];
    crate::pgtable::set_ptes(&a, Some(n), &mut c, 0, 0, a.mk_pte(32, bits).unwrap(), n, |_| None, &mut Default::default());
    assert!(folio_pte_batch_linear(&a, FpbForm::V6_17, &c, 0, n, folio, fork_flags(FpbForm::V6_17)).is_none());
}

/// A random table: runs of folios of random orders placed at random virtual offsets, with
/// holes, random bits, and some physically adjacent folios.
fn random_table() -> impl Strategy<Value = (Vec<u64>, Vec<u64>, Vec<u64>, u64, Vec<u8>)> {
    (
        prop::collection::vec((0u32..5, 0u8..8, 0u8..3), 1..24),
        0u64..1024,
        prop::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(runs, first_vpn, noise)| {
            let mut starts = vec![];
            let mut nrs = vec![];
            let mut pfns: Vec<Option<u64>> = vec![];
            let mut next = 0x4000u64;
            for (order, gap, hole) in runs {
                let nr = 1u64 << order;
                let pfn = (next + nr - 1) / nr * nr + (gap as u64 & 1) * nr;
                starts.push(pfn);
                nrs.push(nr);
                next = pfn + nr;
                for _ in 0..hole {
                    pfns.push(None);
                }
                // Map a random sub-run of the folio.
                let skip = (gap as u64 >> 1) % nr;
                for p in pfn + skip..pfn + nr {
                    pfns.push(Some(p));
                }
            }
            (pfns.iter().map(|p| p.map_or(0, |p| p + 1)).collect(), starts, nrs, first_vpn, noise)
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn batches_cover_the_table_and_map_consecutive_pages((enc, starts, nrs, first_vpn, noise) in random_table()) {
        let l = X86_64;
        let t: Vec<u64> = enc.iter().enumerate().map(|(i, &e)| {
            if e == 0 { return 0; }
            let n = noise.get(i).copied().unwrap_or(0);
            let b = PteBits { write: n & 1 != 0, dirty: n & 2 != 0, young: n & 4 != 0,
                              uffd_wp: n & 0x38 == 0x38, ..ro() };
            l.mk_pte(e - 1, b).unwrap()
        }).collect();
        let layout = Layout::X86_64(l);
        let folios = Folios::new(&starts, &nrs, None).unwrap();
        let mut per_kernel = vec![];
        for k in ["seed", "6.9", "6.10", "6.15", "6.17"] {
            let got = lengths(&layout, k, &t, first_vpn, &starts, &nrs);
            prop_assert_eq!(got.iter().map(|&x| x as usize).sum::<usize>(), t.len());
            let mut i = 0usize;
            for &n in &got {
                let n = n as usize;
                if n > 1 {
                    let vpn = first_vpn + i as u64;
                    prop_assert_eq!(vpn / 512, (vpn + n as u64 - 1) / 512, "batch crosses a PMD");
                    let mut c = 0;
                    let f = folios.lookup(l.pte_pfn(t[i]), &mut c).unwrap();
                    for k in 0..n {
                        prop_assert_eq!(l.pte_pfn(t[i + k]), l.pte_pfn(t[i]) + k as u64);
                        prop_assert!(f.contains(l.pte_pfn(t[i + k])));
                        prop_assert_eq!(l.pte_uffd_wp(t[i + k]), l.pte_uffd_wp(t[i]));
                        prop_assert_eq!(l.pte_dirty(t[i + k]), l.pte_dirty(t[i]), "private fork respects dirt");
                    }
                }
                i += n;
            }
            per_kernel.push(got);
        }
        // Without XEN PV or contpte the forms cut every table the same way.
        for got in &per_kernel[1..] {
            prop_assert_eq!(got, &per_kernel[0]);
        }
    }

    #[test]
    fn pfn_map_and_sorted_lists_agree((enc, starts, nrs, first_vpn, _noise) in random_table()) {
        let l = X86_64;
        let t: Vec<u64> = enc.iter().map(|&e| if e == 0 { 0 } else { l.mk_pte(e - 1, ro()).unwrap() }).collect();
        let max = starts.last().unwrap() + nrs.last().unwrap();
        let mut map = vec![-1i64; max as usize];
        for (k, (&s, &n)) in starts.iter().zip(&nrs).enumerate() {
            for p in s..s + n {
                map[p as usize] = k as i64;
            }
        }
        let profile = KernelProfile::parse("6.18").unwrap();
        let flags = fork_flags(FpbForm::V6_17);
        let table = Table { ptes: &t, first_vpn };
        let a = batch_lengths(&l, &profile, table, &Folios::new(&starts, &nrs, None).unwrap(), flags).unwrap();
        let b = batch_lengths(&l, &profile, table, &Folios::new(&starts, &nrs, Some(&map)).unwrap(), flags).unwrap();
        prop_assert_eq!(a, b);
    }

    /// The linear shortcut, where it answers, answers as the scan does: for every form, fork
    /// flags (private or shared, soft-dirty tracked or not), start and max_nr, over tables
    /// whose entries mostly carry the same bits.
    #[test]
    fn the_linear_shortcut_agrees_with_the_scan((enc, starts, nrs, first_vpn, noise) in random_table()) {
        let l = X86_64;
        let t: Vec<u64> = enc.iter().enumerate().map(|(i, &e)| {
            if e == 0 { return 0; }
            let n = noise.get(i).copied().unwrap_or(0xff);
            let b = if n < 0x20 {
                PteBits { write: n & 1 != 0, dirty: n & 2 != 0, young: n & 4 != 0, uffd_wp: n & 0x18 == 0x18, ..ro() }
            } else {
                PteBits { write: true, dirty: true, young: true, ..ro() }
            };
            l.mk_pte(e - 1, b).unwrap()
        }).collect();
        let folios = Folios::new(&starts, &nrs, None).unwrap();
        for form in ALL_FORMS {
            for (shared, soft_dirty) in [(false, false), (true, false), (false, true)] {
                let flags = FpbFlags::from_bits(form.flag_family(), FpbFlags::fork_bits(form, shared, soft_dirty)).unwrap();
                for start in 0..t.len() {
                    if t[start] == 0 {
                        continue;
                    }
                    let mut c = 0;
                    let f = folios.lookup(l.pte_pfn(t[start]), &mut c).unwrap();
                    if f.nr_pages < 2 {
                        continue;
                    }
                    for max_nr in [1, 2, 7, t.len() - start] {
                        let max_nr = max_nr.min(t.len() - start);
                        let table = Table { ptes: &t, first_vpn };
                        if let Some(b) = folio_pte_batch_linear(&l, form, &t, start, max_nr, f, flags) {
                            prop_assert_eq!(b, folio_pte_batch_unchecked(&l, form, table, start, max_nr, f, flags));
                        }
                    }
                }
            }
        }
    }
}

//! Known encodings and the identities of the kernel's mm/debug_vm_pgtable.c, on every layout.

use super::*;
use proptest::prelude::*;

fn all_layouts() -> Vec<Layout> {
    LAYOUT_NAMES
        .iter()
        .map(|n| Layout::by_name(n, if *n == "x86-64-xenpv" { Some(vec![]) } else { None }).unwrap())
        .collect()
}

fn mk(name: &str, pfn: u64, bits: PteBits) -> u64 {
    let l = Layout::by_name(name, None).unwrap();
    with_layout!(&l, l => l.mk_pte(pfn, bits)).unwrap()
}

#[test]
fn known_encodings() {
    let ro = PteBits::present();
    let rw_dirty_young = PteBits { write: true, dirty: true, young: true, ..ro };
    // x86: P|USER|NX, pfn 0x1234 at bit 12; write+dirty+young adds RW, D, A (and soft-dirty
    // from pte_mkdirty is cleared again by soft_dirty=false).
    assert_eq!(mk("x86-64", 0x1234, ro), 0x8000_0000_0123_4005);
    assert_eq!(mk("x86-64", 0x1234, rw_dirty_young), 0x8000_0000_0123_4067);
    // x86 dirty but read-only: the dirt lives in SavedDirty (bit 58).
    assert_eq!(mk("x86-64", 0x1, PteBits { dirty: true, ..ro }), 0x8400_0000_0000_1005);
    // x86 PROT_NONE: PROTNONE|A with the PFN field inverted.
    let pn = mk("x86-64", 0x1, PteBits { prot_none: true, young: true, ..ro });
    assert_eq!(pn, 0x000F_FFFF_FFFF_E120);
    // arm64-4k: PAGE_READONLY is 0x0060_0000_0000_0FC3 with AF (bit 10); old clears AF.
    assert_eq!(mk("arm64-4k", 0x1234, PteBits { young: true, ..ro }), 0x0060_0000_0123_4FC3);
    assert_eq!(mk("arm64-4k", 0x1234, ro), 0x0060_0000_0123_4BC3);
    // arm64 writable dirty: WRITE set, RDONLY clear, sw DIRTY set.
    assert_eq!(mk("arm64-4k", 0x1, rw_dirty_young), 0x00E8_0000_0000_1F43);
    // arm64 PAGE_NONE (VALID clear, bit 11 set, no USER), old.
    assert_eq!(mk("arm64-4k", 0, PteBits { prot_none: true, ..ro }), 0x0060_0000_0000_0B82);
    // riscv: PPN at bit 10; PAGE_READ = V|R|U|A.
    assert_eq!(mk("riscv64", 0x1, PteBits { young: true, ..ro }), 0x453);
    // ppc64-4k: PRESENT|PTE|ACCESSED|READ.
    assert_eq!(mk("ppc64-4k", 0x1, PteBits { young: true, ..ro }), 0xC000_0000_0000_1104);
    // s390: PAGE_RO old = PRESENT|READ|NOEXEC|INVALID|PROTECT.
    assert_eq!(mk("s390x", 0x1, ro), 0x1711);
    // s390 young and readable: INVALID cleared.
    assert_eq!(mk("s390x", 0x1, PteBits { young: true, ..ro }), 0x1315);
    // loongarch 16K: PRESENT|PLV3|CC|NO_EXEC, pfn at bit 14, young = VALID.
    assert_eq!(mk("loongarch64", 0x1, PteBits { young: true, ..ro }), 0x4000_0000_0000_409D);
}

#[test]
fn x86_inverted_pfn_advances_downwards_in_raw_value() {
    let l = X86_64;
    let pn = l.mk_pte(0x100, PteBits { prot_none: true, ..PteBits::present() }).unwrap();
    assert!(l.pte_present(pn) && l.pte_protnone(pn));
    assert_eq!(l.pte_pfn(pn), 0x100);
    let next = l.pte_advance_pfn(pn, 3);
    assert!(next < pn, "inverted PFN field moves down");
    assert_eq!(l.pte_pfn(next), 0x103);
}

#[test]
fn x86_saved_dirty_moves_on_wrprotect_and_back() {
    let l = X86_64;
    let p = l.mk_pte(7, PteBits { write: true, dirty: true, ..PteBits::present() }).unwrap();
    assert_eq!(p & (1 << 6), 1 << 6);
    let w = l.pte_wrprotect(p);
    assert_eq!(w & (1 << 6), 0);
    assert_eq!(w & (1 << 58), 1 << 58);
    assert!(l.pte_dirty(w));
    assert_eq!(l.pte_mkwrite(w), p);
}

#[test]
fn arm64_hw_dirty_moves_to_sw_dirty_on_wrprotect() {
    let l = Arm64::new(12);
    // Writable, hardware-dirty: DBM set and RDONLY clear, no software dirty bit.
    let p = l.mk_pte(5, PteBits { write: true, ..PteBits::present() }).unwrap() & !(1 << 7);
    assert!(l.pte_dirty(p));
    assert_eq!(p & (1 << 55), 0);
    let w = l.pte_wrprotect(p);
    assert!(l.pte_dirty(w) && !l.pte_write(w));
    assert_eq!(w & (1 << 55), 1 << 55);
}

#[test]
fn xenpv_advance_onto_ballooned_pfn_is_none() {
    let l = X86_64XenPv::new(vec![0x20]);
    let p = l.mk_pte(0x1f, PteBits::present()).unwrap();
    assert_eq!(l.pte_advance_pfn(p, 1), 0);
    assert_ne!(l.pte_advance_pfn(p, 2), 0);
    // From none, advancing is plain arithmetic again: one step past the ballooned frame.
    assert_eq!(l.pte_advance_pfn(0, 1), 0x1000);
}

#[test]
fn arm64_batch_hint_counts_to_block_end() {
    let l = Arm64::new(12);
    let c = l.mk_pte(0, PteBits { cont: true, ..PteBits::present() }).unwrap();
    assert_eq!(l.pte_batch_hint(0, c), 16);
    assert_eq!(l.pte_batch_hint(5, c), 11);
    assert_eq!(l.pte_batch_hint(31, c), 1);
    assert_eq!(l.pte_batch_hint(5, c & !1), 1, "not valid: no hint");
    let l64 = Arm64::new(16);
    assert_eq!(l64.pte_batch_hint(3, c), 29);
}

#[test]
fn mk_pte_rejects_what_the_arch_lacks() {
    let e = Arm64::new(12).mk_pte(1, PteBits { soft_dirty: true, ..PteBits::present() });
    assert!(e.unwrap_err().message.contains("soft-dirty"));
    assert!(S390x.mk_pte(1, PteBits { uffd_wp: true, ..PteBits::present() }).is_err());
    assert!(X86_64.mk_pte(1, PteBits { cont: true, ..PteBits::present() }).is_err());
    assert!(X86_64.mk_pte(1 << 40, PteBits::present()).is_err());
    let bad = PteBits { prot_none: true, write: true, ..PteBits::present() };
    assert!(X86_64.mk_pte(1, bad).is_err());
    assert_eq!(S390x.mk_pte(1, PteBits::default()).unwrap(), 0x400);
}

#[test]
fn unknown_layout_is_an_error() {
    assert!(Layout::by_name("sparc64", None).is_err());
    assert_eq!(Layout::by_name("x86-64", Some(vec![1])).unwrap_err().kind, crate::ErrorKind::Type);
}

fn bits_strategy() -> impl Strategy<Value = PteBits> {
    (any::<[bool; 8]>()).prop_map(|b| PteBits {
        present: true,
        write: b[0] && !b[7],
        dirty: b[1],
        young: b[2],
        soft_dirty: b[3],
        uffd_wp: b[4],
        exec: b[5] && !b[7],
        special: b[6],
        prot_none: b[7],
        cont: false,
    })
}

fn fit(l: &Layout, mut b: PteBits) -> PteBits {
    let c = l.caps();
    b.soft_dirty &= c.soft_dirty;
    b.uffd_wp &= c.uffd_wp;
    b
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The helper identities of mm/debug_vm_pgtable.c (pte_basic_tests) and
    /// Documentation/mm/arch_pgtable_helpers.rst, plus PFN preservation.
    #[test]
    fn debug_vm_pgtable_identities(pfn in 0u64..(1 << 30), b in bits_strategy(), nr in 0u64..4096) {
        for layout in all_layouts() {
            let b = fit(&layout, b);
            with_layout!(&layout, l => {
                let p = l.mk_pte(pfn, b).unwrap();
                prop_assert!(l.pte_present(p));
                prop_assert_eq!(l.pte_pfn(p), pfn);
                prop_assert_eq!(l.pte_write(p), b.write);
                prop_assert_eq!(l.pte_dirty(p), b.dirty);
                prop_assert_eq!(l.pte_young(p), b.young);
                prop_assert_eq!(l.pte_soft_dirty(p), b.soft_dirty);
                prop_assert_eq!(l.pte_uffd_wp(p), b.uffd_wp);
                prop_assert_eq!(l.pte_special(p), b.special);
                prop_assert_eq!(l.pte_protnone(p), b.prot_none);
                if !b.prot_none {
                    prop_assert_eq!(l.pte_exec(p), b.exec);
                }
                prop_assert!(!l.pte_write(l.pte_wrprotect(p)));
                prop_assert_eq!(l.pte_dirty(l.pte_wrprotect(p)), l.pte_dirty(p), "wrprotect keeps dirt");
                prop_assert!(!l.pte_dirty(l.pte_wrprotect(l.pte_mkclean(p))), "wrprotect never sets dirty");
                prop_assert!(l.pte_write(l.pte_mkwrite(l.pte_wrprotect(p))));
                prop_assert!(l.pte_young(l.pte_mkyoung(l.pte_mkold(p))));
                prop_assert!(!l.pte_young(l.pte_mkold(l.pte_mkyoung(p))));
                prop_assert!(l.pte_dirty(l.pte_mkdirty(l.pte_mkclean(p))));
                prop_assert!(!l.pte_dirty(l.pte_mkclean(l.pte_mkdirty(p))));
                prop_assert!(!l.pte_soft_dirty(l.pte_clear_soft_dirty(p)));
                for t in [
                    l.pte_wrprotect(p), l.pte_mkwrite(p), l.pte_mkold(p), l.pte_mkyoung(p),
                    l.pte_mkclean(p), l.pte_mkdirty(p), l.pte_clear_soft_dirty(p),
                ] {
                    prop_assert_eq!(l.pte_pfn(t), pfn);
                    prop_assert!(l.pte_present(t));
                }
                // Write and young are independent of each other and of the PFN.
                prop_assert_eq!(l.pte_write(l.pte_mkold(p)), b.write);
                prop_assert_eq!(l.pte_young(l.pte_wrprotect(p)), b.young);
                // Advancing moves only the PFN.
                let a = l.pte_advance_pfn(p, nr);
                prop_assert_eq!(l.pte_pfn(a), pfn + nr);
                prop_assert_eq!(l.pte_advance_pfn(l.pte_advance_pfn(p, nr), 7), l.pte_advance_pfn(p, nr + 7));
                prop_assert_eq!(l.mk_pte(pfn + nr, b).unwrap(), a);
            });
        }
    }

    /// `linear_advance` promises what single steps give, on arbitrary bit patterns.
    #[test]
    fn linear_advance_matches_single_steps(v in any::<u64>(), nr in 1u64..20, small in any::<bool>()) {
        let v = if small { v & 0xF_FFFF } else { v };
        for layout in all_layouts() {
            with_layout!(&layout, l => {
                if let Some(d) = l.linear_advance(v, nr) {
                    let mut stepped = v;
                    for k in 0..=nr {
                        prop_assert_eq!(stepped, v.wrapping_add(d.wrapping_mul(k)), "{} k={}", l.name(), k);
                        stepped = l.pte_advance_pfn(stepped, 1);
                    }
                }
            });
        }
    }
}

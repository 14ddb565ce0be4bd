//! x86-64 leaf PTEs: arch/x86/include/asm/pgtable_types.h, pgtable.h, pgtable-invert.h
//! (v6.15 – v6.18; every bit in docs/semantics.md §1.2, sources in docs/kernel-facts.md).

use super::{bit, bits, Caps, Geometry, PteLayout};

const P: u64 = bit(0);
const RW: u64 = bit(1);
const USER: u64 = bit(2);
const ACCESSED: u64 = bit(5);
const DIRTY: u64 = bit(6);
/// `_PAGE_PROTNONE` (the global bit, meaningful only while `_PAGE_PRESENT` is clear).
const PROTNONE: u64 = bit(8);
const SPECIAL: u64 = bit(9);
const UFFD_WP: u64 = bit(10);
const SOFT_DIRTY: u64 = bit(11);
/// `_PAGE_SAVED_DIRTY`: where a read-only PTE keeps its dirty bit, so that Write=0,Dirty=1
/// (a shadow-stack PTE to the CPU) is never made by accident.
const SAVED_DIRTY: u64 = bit(58);
const NX: u64 = bit(63);
/// `PTE_PFN_MASK`: physical address bits 12..51.
const PFN_MASK: u64 = bits(12, 51);

/// `__pte_needs_invert()`: L1TF mitigation inverts the PFN of non-zero, non-present entries.
#[inline]
fn needs_invert(v: u64) -> bool {
    v != 0 && v & P == 0
}

/// `protnone_mask()`.
#[inline]
fn invert_mask(v: u64) -> u64 {
    if needs_invert(v) {
        !0
    } else {
        0
    }
}

/// Moves Dirty to SavedDirty when the PTE is read-only (`mksaveddirty_shift`).
#[inline]
fn mksaveddirty(v: u64) -> u64 {
    if v & RW == 0 && v & DIRTY != 0 {
        (v & !DIRTY) | SAVED_DIRTY
    } else {
        v
    }
}

/// Moves SavedDirty back to Dirty when the PTE is writable (`clear_saveddirty_shift`).
#[inline]
fn clear_saveddirty(v: u64) -> u64 {
    if v & RW != 0 && v & SAVED_DIRTY != 0 {
        (v & !SAVED_DIRTY) | DIRTY
    } else {
        v
    }
}

/// Shared by the plain and the XEN PV layout.
mod common {
    use super::*;

    pub(super) const GEOMETRY: Geometry = Geometry {
        page_shift: 12,
        ptrs_per_pte: 512,
        cont_ptes: 1,
        pfn_pte_shift: Some(12),
        pfn_mask: PFN_MASK,
        max_pfn: PFN_MASK >> 12,
        none_value: 0,
    };

    pub(super) fn template(pfn: u64, exec: bool, prot_none: bool) -> u64 {
        let prot = if prot_none {
            ACCESSED | PROTNONE
        } else {
            P | USER | ACCESSED | if exec { 0 } else { NX }
        };
        // pfn_pte(): the PFN is inverted when the protection is not present.
        ((pfn << 12) ^ invert_mask(prot)) & PFN_MASK | prot
    }

    /// The step of `advance` while the inversion state cannot change: it flips only when a
    /// step starts from 0 (then adds) or lands on 0 (an inverted value counting down).
    #[inline]
    pub(super) fn linear(v: u64, nr: u64) -> Option<u64> {
        if v == 0 || (needs_invert(v) && v & 0xfff == 0 && v <= nr << 12) {
            None
        } else if needs_invert(v) {
            Some(0u64.wrapping_sub(1 << 12))
        } else {
            Some(1 << 12)
        }
    }

    /// x86 `pte_advance_pfn()`: subtract for an inverted PFN so it still moves forward.
    #[inline]
    pub(super) fn advance(v: u64, nr: u64) -> u64 {
        let delta = nr.wrapping_shl(12);
        if needs_invert(v) {
            v.wrapping_sub(delta)
        } else {
            v.wrapping_add(delta)
        }
    }
}

macro_rules! x86_accessors {
    () => {
        fn geometry(&self) -> Geometry {
            common::GEOMETRY
        }
        fn caps(&self) -> Caps {
            Caps { soft_dirty: true, uffd_wp: true, contpte: false }
        }
        fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64 {
            common::template(pfn, exec, prot_none)
        }
        /// `pte_none()`: Knights Landing may set A/D spuriously, so they are ignored.
        #[inline]
        fn pte_none(&self, v: u64) -> bool {
            v & !(ACCESSED | DIRTY) == 0
        }
        #[inline]
        fn pte_present(&self, v: u64) -> bool {
            v & (P | PROTNONE) != 0
        }
        fn pte_protnone(&self, v: u64) -> bool {
            v & (P | PROTNONE) == PROTNONE
        }
        #[inline]
        fn pte_pfn(&self, v: u64) -> u64 {
            ((v ^ invert_mask(v)) & PFN_MASK) >> 12
        }
        #[inline]
        fn pte_write(&self, v: u64) -> bool {
            v & RW != 0
        }
        #[inline]
        fn pte_dirty(&self, v: u64) -> bool {
            v & (DIRTY | SAVED_DIRTY) != 0
        }
        #[inline]
        fn pte_young(&self, v: u64) -> bool {
            v & ACCESSED != 0
        }
        fn pte_soft_dirty(&self, v: u64) -> bool {
            v & SOFT_DIRTY != 0
        }
        fn pte_uffd_wp(&self, v: u64) -> bool {
            v & UFFD_WP != 0
        }
        #[inline]
        fn pte_special(&self, v: u64) -> bool {
            v & SPECIAL != 0
        }
        fn pte_exec(&self, v: u64) -> bool {
            v & NX == 0
        }
        #[inline]
        fn pte_wrprotect(&self, v: u64) -> u64 {
            mksaveddirty(v & !RW)
        }
        #[inline]
        fn pte_mkwrite(&self, v: u64) -> u64 {
            clear_saveddirty(v | RW)
        }
        #[inline]
        fn pte_mkold(&self, v: u64) -> u64 {
            v & !ACCESSED
        }
        fn pte_mkyoung(&self, v: u64) -> u64 {
            v | ACCESSED
        }
        #[inline]
        fn pte_mkclean(&self, v: u64) -> u64 {
            v & !(DIRTY | SAVED_DIRTY)
        }
        fn pte_mkdirty(&self, v: u64) -> u64 {
            mksaveddirty(v | DIRTY | SOFT_DIRTY)
        }
        #[inline]
        fn pte_clear_soft_dirty(&self, v: u64) -> u64 {
            v & !SOFT_DIRTY
        }
        fn pte_mksoft_dirty(&self, v: u64) -> u64 {
            v | SOFT_DIRTY
        }
        fn clear_uffd_wp_bit(&self, v: u64) -> u64 {
            v & !UFFD_WP
        }
        fn set_uffd_wp_bit(&self, v: u64) -> u64 {
            v | UFFD_WP
        }
        fn pte_mkspecial(&self, v: u64) -> u64 {
            v | SPECIAL
        }
    };
}

/// x86-64, 4-level or 5-level paging (the leaf format is the same).
#[derive(Clone, Copy, Debug, Default)]
pub struct X86_64;

impl PteLayout for X86_64 {
    fn name(&self) -> &'static str {
        "x86-64"
    }
    x86_accessors!();

    #[inline]
    fn pte_advance_pfn(&self, v: u64, nr: u64) -> u64 {
        common::advance(v, nr)
    }

    #[inline]
    fn linear_advance(&self, v: u64, nr: u64) -> Option<u64> {
        common::linear(v, nr)
    }
}

/// x86-64 as a XEN PV guest sees it: a present PTE advanced onto a PFN without a machine
/// frame comes back as `pte_none` (`xen_make_pte()` for an invalid MFN). This is the case
/// that made folio_pte_batch() overrun a folio before v6.15 (commit 7b08b74f3d99).
#[derive(Clone, Debug, Default)]
pub struct X86_64XenPv {
    /// Sorted, deduplicated.
    ballooned: Vec<u64>,
}

impl X86_64XenPv {
    pub fn new(mut ballooned: Vec<u64>) -> Self {
        ballooned.sort_unstable();
        ballooned.dedup();
        X86_64XenPv { ballooned }
    }

    pub fn ballooned(&self) -> &[u64] {
        &self.ballooned
    }
}

impl PteLayout for X86_64XenPv {
    fn name(&self) -> &'static str {
        "x86-64-xenpv"
    }
    x86_accessors!();

    fn linear_advance(&self, v: u64, nr: u64) -> Option<u64> {
        if self.ballooned.is_empty() {
            common::linear(v, nr)
        } else {
            None
        }
    }

    fn pte_advance_pfn(&self, v: u64, nr: u64) -> u64 {
        let next = common::advance(v, nr);
        if v & P != 0 && self.ballooned.binary_search(&self.pte_pfn(next)).is_ok() {
            0
        } else {
            next
        }
    }
}

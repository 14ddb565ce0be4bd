//! riscv64 Sv39/Sv48/Sv57 leaf PTEs: arch/riscv/include/asm/pgtable-bits.h, pgtable.h,
//! pgtable-64.h (v6.17; soft-dirty and uffd-wp from v6.19). Svnapot (bit 63) is used by hugetlb only, so
//! user mappings batch like x86: hint 1, plain scan.

use super::{bit, bits, Caps, Geometry, PteLayout};

const V: u64 = bit(0);
const R: u64 = bit(1);
const W: u64 = bit(2);
const X: u64 = bit(3);
const U: u64 = bit(4);
/// `_PAGE_PROT_NONE` is the global bit, meaningful while V is clear.
const PROT_NONE: u64 = bit(5);
const A: u64 = bit(6);
const D: u64 = bit(7);
const SPECIAL: u64 = bit(8);
/// v6.19+, and only on CPUs with the Svrsw60t59b extension (which frees bits 59..60).
const SOFT_DIRTY: u64 = bit(59);
const UFFD_WP: u64 = bit(60);
/// `_PAGE_PFN_MASK`: PPN in bits 10..53, so `PFN_PTE_SHIFT` is 10, not PAGE_SHIFT.
const PFN_MASK: u64 = bits(10, 53);

/// riscv64; `svrsw60t59b` adds the v6.19 soft-dirty and uffd-wp bits.
#[derive(Clone, Copy, Debug, Default)]
pub struct Riscv64 {
    svrsw60t59b: bool,
}

impl Riscv64 {
    pub const fn new(svrsw60t59b: bool) -> Self {
        Riscv64 { svrsw60t59b }
    }

    #[inline]
    fn soft_dirty_bit(&self) -> u64 {
        if self.svrsw60t59b {
            SOFT_DIRTY
        } else {
            0
        }
    }
}

impl PteLayout for Riscv64 {
    fn name(&self) -> &'static str {
        if self.svrsw60t59b {
            "riscv64-svrsw60t59b"
        } else {
            "riscv64"
        }
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            page_shift: 12,
            ptrs_per_pte: 512,
            cont_ptes: 1,
            pfn_pte_shift: Some(10),
            pfn_mask: PFN_MASK,
            max_pfn: PFN_MASK >> 10,
            none_value: 0,
        }
    }
    fn caps(&self) -> Caps {
        Caps { soft_dirty: self.svrsw60t59b, uffd_wp: self.svrsw60t59b, contpte: false }
    }
    fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64 {
        // PAGE_READ = _PAGE_BASE (V|A|U) | R; PAGE_NONE = _PAGE_PROT_NONE | R.
        let prot = if prot_none {
            PROT_NONE | R
        } else {
            V | A | U | R | if exec { X } else { 0 }
        };
        (pfn << 10) | prot
    }
    #[inline]
    fn pte_none(&self, v: u64) -> bool {
        v == 0
    }
    #[inline]
    fn pte_present(&self, v: u64) -> bool {
        v & (V | PROT_NONE) != 0
    }
    fn pte_protnone(&self, v: u64) -> bool {
        v & (V | PROT_NONE) == PROT_NONE
    }
    #[inline]
    fn pte_pfn(&self, v: u64) -> u64 {
        (v & PFN_MASK) >> 10
    }
    #[inline]
    fn pte_write(&self, v: u64) -> bool {
        v & W != 0
    }
    #[inline]
    fn pte_dirty(&self, v: u64) -> bool {
        v & D != 0
    }
    #[inline]
    fn pte_young(&self, v: u64) -> bool {
        v & A != 0
    }
    #[inline]
    fn pte_special(&self, v: u64) -> bool {
        v & SPECIAL != 0
    }
    fn pte_exec(&self, v: u64) -> bool {
        v & X != 0
    }
    #[inline]
    fn pte_wrprotect(&self, v: u64) -> u64 {
        v & !W
    }
    fn pte_mkwrite(&self, v: u64) -> u64 {
        v | W
    }
    #[inline]
    fn pte_mkold(&self, v: u64) -> u64 {
        v & !A
    }
    fn pte_mkyoung(&self, v: u64) -> u64 {
        v | A
    }
    #[inline]
    fn pte_mkclean(&self, v: u64) -> u64 {
        v & !D
    }
    fn pte_mkdirty(&self, v: u64) -> u64 {
        v | D | self.soft_dirty_bit()
    }
    fn pte_soft_dirty(&self, v: u64) -> bool {
        v & self.soft_dirty_bit() != 0
    }
    #[inline]
    fn pte_clear_soft_dirty(&self, v: u64) -> u64 {
        v & !self.soft_dirty_bit()
    }
    fn pte_mksoft_dirty(&self, v: u64) -> u64 {
        v | self.soft_dirty_bit()
    }
    fn pte_uffd_wp(&self, v: u64) -> bool {
        self.svrsw60t59b && v & UFFD_WP != 0
    }
    fn clear_uffd_wp_bit(&self, v: u64) -> u64 {
        if self.svrsw60t59b {
            v & !UFFD_WP
        } else {
            v
        }
    }
    fn set_uffd_wp_bit(&self, v: u64) -> u64 {
        if self.svrsw60t59b {
            v | UFFD_WP
        } else {
            v
        }
    }
    fn pte_mkspecial(&self, v: u64) -> u64 {
        v | SPECIAL
    }
}

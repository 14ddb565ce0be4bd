//! loongarch64 PTEs with the default 16 KiB pages: arch/loongarch/include/asm/pgtable-bits.h,
//! pgtable.h, arch/loongarch/mm/cache.c protection_map (v6.17). The hardware valid
//! bit doubles as "young": an old PTE faults and is made valid again.

use super::{bit, bits, Caps, Geometry, PteLayout};

/// `_PAGE_VALID` == `_PAGE_ACCESSED`.
const VALID: u64 = bit(0);
/// Hardware write-enable ("dirty" in the MIPS-style TLB).
const HW_DIRTY: u64 = bit(1);
/// `_PAGE_USER`: privilege level 3.
const PLV_USER: u64 = bits(2, 3);
/// `_CACHE_CC`: coherent cached.
const CACHE_CC: u64 = bit(4);
const GLOBAL: u64 = bit(6);
const PRESENT: u64 = bit(7);
const WRITE: u64 = bit(8);
/// `_PAGE_MODIFIED`: the software dirty bit.
const MODIFIED: u64 = bit(9);
const PROTNONE: u64 = bit(10);
const SPECIAL: u64 = bit(11);
const NO_READ: u64 = bit(61);
const NO_EXEC: u64 = bit(62);
const PAGE_SHIFT: u32 = 14;
/// `_PFN_MASK`: bits PFN_PTE_SHIFT..47.
const PFN_MASK: u64 = bits(PAGE_SHIFT, 47);

#[derive(Clone, Copy, Debug, Default)]
pub struct Loongarch64;

impl PteLayout for Loongarch64 {
    fn name(&self) -> &'static str {
        "loongarch64"
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            page_shift: PAGE_SHIFT,
            ptrs_per_pte: 1 << (PAGE_SHIFT - 3),
            cont_ptes: 1,
            pfn_pte_shift: Some(PAGE_SHIFT),
            pfn_mask: PFN_MASK,
            max_pfn: PFN_MASK >> PAGE_SHIFT,
            none_value: 0,
        }
    }
    fn caps(&self) -> Caps {
        Caps { soft_dirty: false, uffd_wp: false, contpte: false }
    }
    fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64 {
        let prot = if prot_none {
            PROTNONE | PLV_USER | CACHE_CC | NO_READ | NO_EXEC
        } else {
            PRESENT | PLV_USER | CACHE_CC | if exec { 0 } else { NO_EXEC }
        };
        (pfn << PAGE_SHIFT) | prot
    }
    #[inline]
    fn pte_none(&self, v: u64) -> bool {
        v & !GLOBAL == 0
    }
    #[inline]
    fn pte_present(&self, v: u64) -> bool {
        v & (PRESENT | PROTNONE) != 0
    }
    fn pte_protnone(&self, v: u64) -> bool {
        v & PROTNONE != 0
    }
    #[inline]
    fn pte_pfn(&self, v: u64) -> u64 {
        (v & PFN_MASK) >> PAGE_SHIFT
    }
    #[inline]
    fn pte_write(&self, v: u64) -> bool {
        v & WRITE != 0
    }
    #[inline]
    fn pte_dirty(&self, v: u64) -> bool {
        v & (HW_DIRTY | MODIFIED) != 0
    }
    #[inline]
    fn pte_young(&self, v: u64) -> bool {
        v & VALID != 0
    }
    #[inline]
    fn pte_special(&self, v: u64) -> bool {
        v & SPECIAL != 0
    }
    fn pte_exec(&self, v: u64) -> bool {
        v & NO_EXEC == 0
    }
    #[inline]
    fn pte_wrprotect(&self, v: u64) -> u64 {
        v & !(WRITE | HW_DIRTY)
    }
    fn pte_mkwrite(&self, v: u64) -> u64 {
        let v = v | WRITE;
        if v & MODIFIED != 0 {
            v | HW_DIRTY
        } else {
            v
        }
    }
    #[inline]
    fn pte_mkold(&self, v: u64) -> u64 {
        v & !VALID
    }
    fn pte_mkyoung(&self, v: u64) -> u64 {
        v | VALID
    }
    #[inline]
    fn pte_mkclean(&self, v: u64) -> u64 {
        v & !(HW_DIRTY | MODIFIED)
    }
    fn pte_mkdirty(&self, v: u64) -> u64 {
        let v = v | MODIFIED;
        if v & WRITE != 0 {
            v | HW_DIRTY
        } else {
            v
        }
    }
    fn pte_mkspecial(&self, v: u64) -> u64 {
        v | SPECIAL
    }
}

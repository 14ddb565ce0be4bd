//! s390x PTEs: arch/s390/include/asm/pgtable.h (v6.17). The hardware
//! bits INVALID and PROTECT are derived from the software bits by every accessor; an empty
//! entry is `_PAGE_INVALID` (0x400), not 0.

use super::{bit, Caps, Geometry, PteLayout};

const PRESENT: u64 = bit(0);
const SOFT_DIRTY: u64 = bit(1);
const YOUNG: u64 = bit(2);
const DIRTY: u64 = bit(3);
const READ: u64 = bit(4);
const WRITE: u64 = bit(5);
const SPECIAL: u64 = bit(6);
const NOEXEC: u64 = bit(8);
/// Hardware store protection: set while the PTE is read-only or clean.
const PROTECT: u64 = bit(9);
/// Hardware invalid: set while the PTE is old (young is tracked by faults) or PROT_NONE.
const INVALID: u64 = bit(10);

#[derive(Clone, Copy, Debug, Default)]
pub struct S390x;

impl PteLayout for S390x {
    fn name(&self) -> &'static str {
        "s390x"
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            page_shift: 12,
            ptrs_per_pte: 256,
            cont_ptes: 1,
            pfn_pte_shift: Some(12),
            pfn_mask: !0xfff,
            max_pfn: u64::MAX >> 12,
            none_value: INVALID,
        }
    }
    fn caps(&self) -> Caps {
        Caps { soft_dirty: true, uffd_wp: false, contpte: false }
    }
    fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64 {
        // PAGE_NONE = PRESENT|INVALID|PROTECT; PAGE_RO adds READ|NOEXEC; PAGE_RX adds READ.
        let prot = if prot_none {
            PRESENT | INVALID | PROTECT
        } else {
            PRESENT | READ | INVALID | PROTECT | if exec { 0 } else { NOEXEC }
        };
        (pfn << 12) | prot
    }
    #[inline]
    fn pte_none(&self, v: u64) -> bool {
        v == INVALID
    }
    #[inline]
    fn pte_present(&self, v: u64) -> bool {
        v & PRESENT != 0
    }
    fn pte_protnone(&self, v: u64) -> bool {
        v & PRESENT != 0 && v & READ == 0
    }
    #[inline]
    fn pte_pfn(&self, v: u64) -> u64 {
        v >> 12
    }
    #[inline]
    fn pte_write(&self, v: u64) -> bool {
        v & WRITE != 0
    }
    #[inline]
    fn pte_dirty(&self, v: u64) -> bool {
        v & DIRTY != 0
    }
    #[inline]
    fn pte_young(&self, v: u64) -> bool {
        v & YOUNG != 0
    }
    fn pte_soft_dirty(&self, v: u64) -> bool {
        v & SOFT_DIRTY != 0
    }
    #[inline]
    fn pte_special(&self, v: u64) -> bool {
        v & SPECIAL != 0
    }
    fn pte_exec(&self, v: u64) -> bool {
        v & NOEXEC == 0
    }
    #[inline]
    fn pte_wrprotect(&self, v: u64) -> u64 {
        (v & !WRITE) | PROTECT
    }
    fn pte_mkwrite(&self, v: u64) -> u64 {
        let v = v | WRITE;
        if v & DIRTY != 0 {
            v & !PROTECT
        } else {
            v
        }
    }
    #[inline]
    fn pte_mkold(&self, v: u64) -> u64 {
        (v & !YOUNG) | INVALID
    }
    fn pte_mkyoung(&self, v: u64) -> u64 {
        let v = v | YOUNG;
        if v & READ != 0 {
            v & !INVALID
        } else {
            v
        }
    }
    #[inline]
    fn pte_mkclean(&self, v: u64) -> u64 {
        (v & !DIRTY) | PROTECT
    }
    fn pte_mkdirty(&self, v: u64) -> u64 {
        let v = v | DIRTY | SOFT_DIRTY;
        if v & WRITE != 0 {
            v & !PROTECT
        } else {
            v
        }
    }
    #[inline]
    fn pte_clear_soft_dirty(&self, v: u64) -> u64 {
        v & !SOFT_DIRTY
    }
    fn pte_mksoft_dirty(&self, v: u64) -> u64 {
        v | SOFT_DIRTY
    }
    fn pte_mkspecial(&self, v: u64) -> u64 {
        v | SPECIAL
    }
}

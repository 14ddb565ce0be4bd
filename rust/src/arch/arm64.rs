//! arm64 level-3 page descriptors: arch/arm64/include/asm/pgtable.h, pgtable-prot.h,
//! pgtable-hwdef.h (v6.16+) and arch/arm64/mm/contpte.c (v6.9+; docs/kernel-facts.md).
//! The 48-bit physical-address configuration; LPA/LPA2 split addresses are not modelled.

use super::{bit, bits, Caps, Geometry, PteLayout};

const VALID: u64 = bit(0);
/// Bit 1 of `PTE_TYPE_PAGE` (0b11 at level 3).
const TYPE_BIT: u64 = bit(1);
const USER: u64 = bit(6);
const RDONLY: u64 = bit(7);
/// `PTE_SHARED`: inner shareable.
const SHARED: u64 = bits(8, 9);
const AF: u64 = bit(10);
/// `PTE_NG` while valid; `PTE_PRESENT_INVALID` while `PTE_VALID` is clear.
const NG: u64 = bit(11);
const PRESENT_INVALID: u64 = NG;
/// `PTE_WRITE` == `PTE_DBM`.
const WRITE: u64 = bit(51);
const CONT: u64 = bit(52);
const PXN: u64 = bit(53);
const UXN: u64 = bit(54);
/// `PTE_DIRTY`: the software dirty bit.
const SW_DIRTY: u64 = bit(55);
const SPECIAL: u64 = bit(56);
const UFFD_WP: u64 = bit(58);

/// arm64 with a 4 KiB, 16 KiB or 64 KiB granule.
#[derive(Clone, Copy, Debug)]
pub struct Arm64 {
    page_shift: u32,
}

impl Arm64 {
    /// `page_shift` is 12, 14 or 16.
    pub const fn new(page_shift: u32) -> Self {
        Arm64 { page_shift }
    }

    /// `PTE_ADDR_LOW`: output-address bits PAGE_SHIFT..49.
    #[inline]
    fn addr_mask(&self) -> u64 {
        bits(self.page_shift, 49)
    }

    #[inline]
    fn hw_dirty(v: u64) -> bool {
        v & WRITE != 0 && v & RDONLY == 0
    }
}

impl PteLayout for Arm64 {
    fn name(&self) -> &'static str {
        match self.page_shift {
            12 => "arm64-4k",
            14 => "arm64-16k",
            _ => "arm64-64k",
        }
    }

    fn geometry(&self) -> Geometry {
        let cont_ptes = match self.page_shift {
            12 => 16,
            14 => 128,
            _ => 32,
        };
        Geometry {
            page_shift: self.page_shift,
            ptrs_per_pte: 1 << (self.page_shift - 3),
            cont_ptes,
            pfn_pte_shift: None,
            pfn_mask: self.addr_mask(),
            max_pfn: (1u64 << (48 - self.page_shift)) - 1,
            none_value: 0,
        }
    }

    fn caps(&self) -> Caps {
        Caps { soft_dirty: false, uffd_wp: true, contpte: true }
    }

    fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64 {
        // _PAGE_DEFAULT = PTE_TYPE_PAGE | PTE_AF | PTE_SHARED | PTE_ATTRINDX(MT_NORMAL = 0).
        let default = VALID | TYPE_BIT | AF | SHARED;
        let prot = if prot_none {
            (default & !VALID) | PRESENT_INVALID | RDONLY | NG | PXN | UXN
        } else {
            default | USER | RDONLY | NG | PXN | if exec { 0 } else { UXN }
        };
        (pfn << self.page_shift) | prot
    }

    #[inline]
    fn pte_none(&self, v: u64) -> bool {
        v == 0
    }
    #[inline]
    fn pte_present(&self, v: u64) -> bool {
        v & VALID != 0 || v & (VALID | PRESENT_INVALID) == PRESENT_INVALID
    }
    fn pte_protnone(&self, v: u64) -> bool {
        v & (VALID | PRESENT_INVALID) == PRESENT_INVALID && v & USER == 0 && v & UXN != 0
    }
    #[inline]
    fn pte_pfn(&self, v: u64) -> u64 {
        (v & self.addr_mask()) >> self.page_shift
    }
    #[inline]
    fn pte_write(&self, v: u64) -> bool {
        v & WRITE != 0
    }
    #[inline]
    fn pte_dirty(&self, v: u64) -> bool {
        v & SW_DIRTY != 0 || Self::hw_dirty(v)
    }
    #[inline]
    fn pte_young(&self, v: u64) -> bool {
        v & AF != 0
    }
    fn pte_uffd_wp(&self, v: u64) -> bool {
        v & UFFD_WP != 0
    }
    #[inline]
    fn pte_special(&self, v: u64) -> bool {
        v & SPECIAL != 0
    }
    fn pte_exec(&self, v: u64) -> bool {
        v & UXN == 0
    }
    #[inline]
    fn pte_cont(&self, v: u64) -> bool {
        v & CONT != 0
    }

    /// Hardware dirt (DBM and not RDONLY) moves into the software dirty bit first.
    #[inline]
    fn pte_wrprotect(&self, v: u64) -> u64 {
        let v = if Self::hw_dirty(v) { v | SW_DIRTY } else { v };
        (v & !WRITE) | RDONLY
    }
    #[inline]
    fn pte_mkwrite(&self, v: u64) -> u64 {
        let v = v | WRITE;
        if v & SW_DIRTY != 0 {
            v & !RDONLY
        } else {
            v
        }
    }
    #[inline]
    fn pte_mkold(&self, v: u64) -> u64 {
        v & !AF
    }
    #[inline]
    fn pte_mkyoung(&self, v: u64) -> u64 {
        v | AF
    }
    #[inline]
    fn pte_mkclean(&self, v: u64) -> u64 {
        (v & !SW_DIRTY) | RDONLY
    }
    #[inline]
    fn pte_mkdirty(&self, v: u64) -> u64 {
        let v = v | SW_DIRTY;
        if v & WRITE != 0 {
            v & !RDONLY
        } else {
            v
        }
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
    fn clear_cont_bit(&self, v: u64) -> u64 {
        v & !CONT
    }
    fn pte_valid(&self, v: u64) -> bool {
        v & VALID != 0
    }
    fn set_cont_bit(&self, v: u64) -> u64 {
        v | CONT
    }

    /// arm64 `pte_advance_pfn()`: `pfn_pte(pte_pfn(pte) + nr, pte_pgprot(pte))`.
    #[inline]
    fn pte_advance_pfn(&self, v: u64, nr: u64) -> u64 {
        let pfn = self.pte_pfn(v).wrapping_add(nr);
        (v & !self.addr_mask()) | pfn.wrapping_shl(self.page_shift)
    }

    /// Rebuilding equals a raw add while the PFN stays inside the address field.
    #[inline]
    fn linear_advance(&self, v: u64, nr: u64) -> Option<u64> {
        let field_max = self.addr_mask() >> self.page_shift;
        (self.pte_pfn(v) <= field_max - nr.min(field_max)).then_some(1 << self.page_shift)
    }

    /// arm64 `pte_batch_hint()`: entries left to the end of the contpte block.
    #[inline]
    fn pte_batch_hint(&self, index: u64, v: u64) -> u64 {
        if self.pte_valid_cont(v) {
            let n = self.geometry().cont_ptes;
            n - (index & (n - 1))
        } else {
            1
        }
    }

    #[inline]
    fn pte_valid_cont(&self, v: u64) -> bool {
        v & (VALID | CONT) == (VALID | CONT)
    }
}

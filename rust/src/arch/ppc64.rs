//! powerpc book3s64 PTEs (shared by the hash and radix MMUs):
//! arch/powerpc/include/asm/book3s/64/pgtable.h, asm/pgtable-masks.h (v6.8+). Values are the
//! CPU-order word; the kernel stores it big-endian. Geometry is the radix MMU's.

use super::{bit, bits, Caps, Geometry, PteLayout};

const EXEC: u64 = bit(0);
const WRITE: u64 = bit(1);
const READ: u64 = bit(2);
const DIRTY: u64 = bit(7);
const ACCESSED: u64 = bit(8);
const SOFT_DIRTY: u64 = bit(9);
const SPECIAL: u64 = bit(10);
/// `_PAGE_INVALID`: present but temporarily invalidated (only with PRESENT clear).
const INVALID: u64 = bit(61);
/// `_PAGE_PTE`: a leaf entry; `pfn_pte` always sets it.
const PTE: u64 = bit(62);
const PRESENT: u64 = bit(63);
const RWX: u64 = READ | WRITE | EXEC;

/// book3s64 with 4 KiB or 64 KiB pages.
#[derive(Clone, Copy, Debug)]
pub struct Ppc64 {
    page_shift: u32,
}

impl Ppc64 {
    /// `page_shift` is 12 or 16.
    pub const fn new(page_shift: u32) -> Self {
        Ppc64 { page_shift }
    }

    /// `PTE_RPN_MASK`: real page number up to `_PAGE_PA_MAX` (53 bits).
    #[inline]
    fn rpn_mask(&self) -> u64 {
        bits(self.page_shift, 52)
    }
}

impl PteLayout for Ppc64 {
    fn name(&self) -> &'static str {
        if self.page_shift == 12 {
            "ppc64-4k"
        } else {
            "ppc64-64k"
        }
    }
    fn geometry(&self) -> Geometry {
        Geometry {
            page_shift: self.page_shift,
            // RADIX_PTE_INDEX_SIZE: 9 with 4 KiB pages, 5 with 64 KiB pages.
            ptrs_per_pte: if self.page_shift == 12 { 512 } else { 32 },
            cont_ptes: 1,
            pfn_pte_shift: Some(self.page_shift),
            pfn_mask: self.rpn_mask(),
            max_pfn: self.rpn_mask() >> self.page_shift,
            none_value: 0,
        }
    }
    fn caps(&self) -> Caps {
        Caps { soft_dirty: true, uffd_wp: false, contpte: false }
    }
    fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64 {
        // _PAGE_BASE = PRESENT | ACCESSED. Since v6.8 book3s64 takes its permissions from the
        // generic pgtable-masks.h: PAGE_NONE is the bare base (no PRIVILEGED), PAGE_READONLY
        // adds READ.
        let prot = if prot_none {
            PRESENT | ACCESSED
        } else {
            PRESENT | ACCESSED | READ | if exec { EXEC } else { 0 }
        };
        (pfn << self.page_shift) | prot | PTE
    }
    /// Radix `pte_none()`: dirty and accessed alone still count as none.
    #[inline]
    fn pte_none(&self, v: u64) -> bool {
        v & !(DIRTY | ACCESSED) == 0
    }
    #[inline]
    fn pte_present(&self, v: u64) -> bool {
        v & PRESENT != 0 || v & (INVALID | PTE) == (INVALID | PTE)
    }
    fn pte_protnone(&self, v: u64) -> bool {
        v & (PRESENT | PTE | RWX) == (PRESENT | PTE)
    }
    #[inline]
    fn pte_pfn(&self, v: u64) -> u64 {
        (v & self.rpn_mask()) >> self.page_shift
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
        v & ACCESSED != 0
    }
    fn pte_soft_dirty(&self, v: u64) -> bool {
        v & SOFT_DIRTY != 0
    }
    #[inline]
    fn pte_special(&self, v: u64) -> bool {
        v & SPECIAL != 0
    }
    fn pte_exec(&self, v: u64) -> bool {
        v & EXEC != 0
    }
    #[inline]
    fn pte_wrprotect(&self, v: u64) -> u64 {
        v & !WRITE
    }
    /// Write implies read on book3s64.
    fn pte_mkwrite(&self, v: u64) -> u64 {
        v | READ | WRITE
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
        v & !DIRTY
    }
    fn pte_mkdirty(&self, v: u64) -> u64 {
        v | DIRTY | SOFT_DIRTY
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

//! PTE layouts: each architecture's bit encoding and the kernel accessors on it.
//!
//! A PTE is a `u64` in the architecture's own encoding (ppc64: the CPU-order value, before
//! the big-endian store). Every accessor is a pure function of the value, as in the kernel's
//! `arch/*/include/asm/pgtable*.h`. docs/semantics.md §1 lists every bit.

mod arm64;
mod loongarch64;
mod ppc64;
mod riscv64;
mod s390x;
mod x86_64;

pub use arm64::Arm64;
pub use loongarch64::Loongarch64;
pub use ppc64::Ppc64;
pub use riscv64::Riscv64;
pub use s390x::S390x;
pub use x86_64::{X86_64, X86_64XenPv};

use crate::error::{Error, Result};

/// The logical bits `mk_pte` builds a PTE from (docs/semantics.md §1.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PteBits {
    pub present: bool,
    pub write: bool,
    pub dirty: bool,
    pub young: bool,
    pub soft_dirty: bool,
    pub uffd_wp: bool,
    pub exec: bool,
    pub special: bool,
    pub prot_none: bool,
    pub cont: bool,
}

impl PteBits {
    /// A present, read-only, clean, old user PTE.
    pub fn present() -> Self {
        PteBits { present: true, ..Default::default() }
    }
}

/// Fixed numbers of a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub page_shift: u32,
    /// Entries per last-level table (one PMD-sized range).
    pub ptrs_per_pte: u64,
    /// arm64 `CONT_PTES`; 1 where the architecture has no contiguous bit.
    pub cont_ptes: u64,
    /// The arch's `PFN_PTE_SHIFT`, or `None` where it advances PFNs its own way (arm64).
    pub pfn_pte_shift: Option<u32>,
    /// Mask of the PFN field inside the PTE.
    pub pfn_mask: u64,
    /// Largest PFN the PFN field holds.
    pub max_pfn: u64,
    /// Value of an empty entry (`pte_none`).
    pub none_value: u64,
}

/// Which optional bits exist on a layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    pub soft_dirty: bool,
    pub uffd_wp: bool,
    pub contpte: bool,
}

/// One architecture's PTE encoding.
///
/// Transforms that the architecture lacks (soft-dirty on arm64, ...) are the identity and the
/// matching predicates are false, like the kernel's generic stubs in include/linux/pgtable.h.
pub trait PteLayout: Sync {
    fn name(&self) -> &'static str;
    fn geometry(&self) -> Geometry;
    fn caps(&self) -> Caps;

    /// `pfn_pte(pfn, PAGE_READONLY[_EXEC] or PAGE_NONE)` — the arch's user templates.
    fn pfn_pte_template(&self, pfn: u64, exec: bool, prot_none: bool) -> u64;

    fn pte_none(&self, pte: u64) -> bool;
    fn pte_present(&self, pte: u64) -> bool;
    fn pte_protnone(&self, pte: u64) -> bool;
    fn pte_pfn(&self, pte: u64) -> u64;
    fn pte_write(&self, pte: u64) -> bool;
    fn pte_dirty(&self, pte: u64) -> bool;
    fn pte_young(&self, pte: u64) -> bool;
    fn pte_soft_dirty(&self, _pte: u64) -> bool {
        false
    }
    fn pte_uffd_wp(&self, _pte: u64) -> bool {
        false
    }
    fn pte_special(&self, pte: u64) -> bool;
    fn pte_exec(&self, pte: u64) -> bool;
    fn pte_cont(&self, _pte: u64) -> bool {
        false
    }

    fn pte_wrprotect(&self, pte: u64) -> u64;
    /// `pte_mkwrite(pte, vma)` for an ordinary (not shadow-stack) VMA.
    fn pte_mkwrite(&self, pte: u64) -> u64;
    fn pte_mkold(&self, pte: u64) -> u64;
    fn pte_mkyoung(&self, pte: u64) -> u64;
    fn pte_mkclean(&self, pte: u64) -> u64;
    fn pte_mkdirty(&self, pte: u64) -> u64;
    fn pte_clear_soft_dirty(&self, pte: u64) -> u64 {
        pte
    }
    fn pte_mksoft_dirty(&self, pte: u64) -> u64 {
        pte
    }
    /// Sets the arch's uffd-wp bit only (no write-protect).
    fn set_uffd_wp_bit(&self, pte: u64) -> u64 {
        pte
    }
    /// Clears the arch's uffd-wp bit only (`pte_clear_uffd_wp` without the write side).
    fn clear_uffd_wp_bit(&self, pte: u64) -> u64 {
        pte
    }
    fn pte_mkspecial(&self, pte: u64) -> u64;
    /// Sets arm64 `PTE_CONT`; identity elsewhere.
    fn set_cont_bit(&self, pte: u64) -> u64 {
        pte
    }
    /// Clears arm64 `PTE_CONT` (`pte_mknoncont`); identity elsewhere.
    fn clear_cont_bit(&self, pte: u64) -> u64 {
        pte
    }
    /// `pte_valid()`: the hardware-valid bit (arm64); elsewhere present and not PROT_NONE.
    fn pte_valid(&self, pte: u64) -> bool {
        self.pte_present(pte) && !self.pte_protnone(pte)
    }

    /// `pte_advance_pfn(pte, nr)` (include/linux/pgtable.h, v6.9; arch overrides on x86, arm64).
    /// Generic form: add `nr << PFN_PTE_SHIFT` to the raw value.
    fn pte_advance_pfn(&self, pte: u64, nr: u64) -> u64 {
        let shift = self.geometry().pfn_pte_shift.unwrap_or(self.geometry().page_shift);
        pte.wrapping_add(nr.wrapping_shl(shift))
    }

    /// `Some(d)` when `pte_advance_pfn(pte, k)` stepped one page at a time equals
    /// `pte + k * d` (wrapping) for every `k <= nr`. Scans use it to compare a run of entries
    /// at once; `None` sends them back to single steps. Generic raw add: always linear.
    fn linear_advance(&self, _pte: u64, _nr: u64) -> Option<u64> {
        let g = self.geometry();
        Some(1u64 << g.pfn_pte_shift.unwrap_or(g.page_shift))
    }

    /// `pte_batch_hint(ptep, pte)` with `index` the entry's position in its table (mod
    /// `cont_ptes`); 1 except on arm64 contpte blocks.
    fn pte_batch_hint(&self, _index: u64, _pte: u64) -> u64 {
        1
    }

    /// Whether `ptep_get()` gathers young/dirty over this entry's contpte block
    /// (arm64 `pte_valid_cont`).
    fn pte_valid_cont(&self, _pte: u64) -> bool {
        false
    }

    /// `mk_pte` as docs/semantics.md §1.1 builds it from the kernel accessors.
    fn mk_pte(&self, pfn: u64, bits: PteBits) -> Result<u64> {
        let g = self.geometry();
        let caps = self.caps();
        if !bits.present {
            return Ok(g.none_value);
        }
        if pfn > g.max_pfn {
            return Err(Error::value(format!(
                "pfn {pfn:#x} does not fit the {} PFN field (max {:#x})",
                self.name(),
                g.max_pfn
            )));
        }
        if bits.prot_none && (bits.write || bits.exec) {
            return Err(Error::value("a prot_none PTE can be neither writable nor executable"));
        }
        if bits.soft_dirty && !caps.soft_dirty {
            return Err(Error::value(format!("{} has no soft-dirty PTE bit", self.name())));
        }
        if bits.uffd_wp && !caps.uffd_wp {
            return Err(Error::value(format!("{} has no uffd-wp PTE bit", self.name())));
        }
        if bits.cont && !caps.contpte {
            return Err(Error::value(format!("{} has no contiguous (PTE_CONT) bit", self.name())));
        }
        let mut v = self.pfn_pte_template(pfn, bits.exec, bits.prot_none);
        if bits.write {
            v = self.pte_mkwrite(v);
        }
        if bits.dirty {
            v = self.pte_mkdirty(v);
        }
        v = if bits.young { self.pte_mkyoung(v) } else { self.pte_mkold(v) };
        v = if bits.soft_dirty { self.pte_mksoft_dirty(v) } else { self.pte_clear_soft_dirty(v) };
        if bits.uffd_wp {
            v = self.set_uffd_wp_bit(v);
        }
        if bits.special {
            v = self.pte_mkspecial(v);
        }
        if bits.cont {
            v = self.set_cont_bit(v);
        }
        Ok(v)
    }
}

/// Names accepted by [`Layout::by_name`].
pub const LAYOUT_NAMES: [&str; 11] = [
    "x86-64",
    "x86-64-xenpv",
    "arm64-4k",
    "arm64-16k",
    "arm64-64k",
    "riscv64",
    "riscv64-svrsw60t59b",
    "ppc64-4k",
    "ppc64-64k",
    "s390x",
    "loongarch64",
];

/// A layout chosen at run time. Hot loops are generic over [`PteLayout`] and reached through
/// [`with_layout!`], so each architecture gets its own monomorphic copy.
#[derive(Clone, Debug)]
pub enum Layout {
    X86_64(X86_64),
    X86_64XenPv(X86_64XenPv),
    Arm64(Arm64),
    Riscv64(Riscv64),
    Ppc64(Ppc64),
    S390x(S390x),
    Loongarch64(Loongarch64),
}

/// Runs `$body` with `$l` bound to the concrete layout inside a [`Layout`].
#[macro_export]
macro_rules! with_layout {
    ($layout:expr, $l:ident => $body:expr) => {
        match $layout {
            $crate::arch::Layout::X86_64($l) => $body,
            $crate::arch::Layout::X86_64XenPv($l) => $body,
            $crate::arch::Layout::Arm64($l) => $body,
            $crate::arch::Layout::Riscv64($l) => $body,
            $crate::arch::Layout::Ppc64($l) => $body,
            $crate::arch::Layout::S390x($l) => $body,
            $crate::arch::Layout::Loongarch64($l) => $body,
        }
    };
}

impl Layout {
    /// The layout called `name`; `x86-64-xenpv` takes its ballooned PFNs from `ballooned`.
    pub fn by_name(name: &str, ballooned: Option<Vec<u64>>) -> Result<Layout> {
        if ballooned.is_some() && name != "x86-64-xenpv" {
            return Err(Error::type_error(format!(
                "ballooned_pfns only applies to the x86-64-xenpv layout, not {name}"
            )));
        }
        Ok(match name {
            "x86-64" => Layout::X86_64(X86_64),
            "x86-64-xenpv" => Layout::X86_64XenPv(X86_64XenPv::new(ballooned.unwrap_or_default())),
            "arm64-4k" => Layout::Arm64(Arm64::new(12)),
            "arm64-16k" => Layout::Arm64(Arm64::new(14)),
            "arm64-64k" => Layout::Arm64(Arm64::new(16)),
            "riscv64" => Layout::Riscv64(Riscv64::new(false)),
            "riscv64-svrsw60t59b" => Layout::Riscv64(Riscv64::new(true)),
            "ppc64-4k" => Layout::Ppc64(Ppc64::new(12)),
            "ppc64-64k" => Layout::Ppc64(Ppc64::new(16)),
            "s390x" => Layout::S390x(S390x),
            "loongarch64" => Layout::Loongarch64(Loongarch64),
            _ => {
                return Err(Error::value(format!(
                    "unknown layout {name:?}; known layouts: {}",
                    LAYOUT_NAMES.join(", ")
                )))
            }
        })
    }

    pub fn name(&self) -> &'static str {
        with_layout!(self, l => l.name())
    }

    pub fn geometry(&self) -> Geometry {
        with_layout!(self, l => l.geometry())
    }

    pub fn caps(&self) -> Caps {
        with_layout!(self, l => l.caps())
    }

    /// How `pte_advance_pfn` works on this layout, for reports.
    pub fn advance_rule(&self) -> &'static str {
        match self {
            Layout::X86_64(_) => "x86: add nr<<12, subtract when the PFN is L1TF-inverted",
            Layout::X86_64XenPv(_) => {
                "x86 rule; a present PTE advanced onto a ballooned PFN becomes pte_none (XEN PV)"
            }
            Layout::Arm64(_) => "arm64: rebuild from pte_pfn(pte) + nr and pte_pgprot(pte)",
            _ => "generic: add nr << PFN_PTE_SHIFT",
        }
    }
}

/// Helper for bit constants.
pub(crate) const fn bit(n: u32) -> u64 {
    1u64 << n
}

/// Mask of bits `lo..=hi`.
pub(crate) const fn bits(lo: u32, hi: u32) -> u64 {
    ((!0u64) >> (63 - hi)) & !((1u64 << lo) - 1)
}

#[cfg(test)]
mod tests;

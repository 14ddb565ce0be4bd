//! The THP policy for anonymous memory, as the kernel reads it at a fault: the sysfs controls
//! (`/sys/kernel/mm/transparent_hugepage/enabled` and `hugepages-<size>kB/enabled`), the VMA
//! flags VM_HUGEPAGE / VM_NOHUGEPAGE (MADV_HUGEPAGE / MADV_NOHUGEPAGE) and the process-wide
//! PR_SET_THP_DISABLE; then which folio order a fault may allocate.
//!
//! Follows include/linux/huge_mm.h (`thp_vma_allowable_orders()`, `thp_vma_suitable_orders()`,
//! `vma_thp_disabled()`) and mm/huge_memory.c (`__thp_vma_allowable_orders()`,
//! `hugepage_madvise()`, sysfs defaults), v6.8 – v7.0.

use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::mm::Vma;
use crate::sim::State;

/// The top-level `enabled` control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThpEnabled {
    Always,
    Madvise,
    Never,
}

/// A per-size `hugepages-<size>kB/enabled` control.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeEnabled {
    Always,
    Inherit,
    Madvise,
    Never,
}

impl ThpEnabled {
    pub const NAMES: [&'static str; 3] = ["always", "madvise", "never"];

    pub fn parse(s: &str) -> Option<ThpEnabled> {
        match s {
            "always" => Some(ThpEnabled::Always),
            "madvise" => Some(ThpEnabled::Madvise),
            "never" => Some(ThpEnabled::Never),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            ThpEnabled::Always => "always",
            ThpEnabled::Madvise => "madvise",
            ThpEnabled::Never => "never",
        }
    }
}

impl SizeEnabled {
    pub const NAMES: [&'static str; 4] = ["always", "inherit", "madvise", "never"];

    pub fn parse(s: &str) -> Option<SizeEnabled> {
        match s {
            "always" => Some(SizeEnabled::Always),
            "inherit" => Some(SizeEnabled::Inherit),
            "madvise" => Some(SizeEnabled::Madvise),
            "never" => Some(SizeEnabled::Never),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            SizeEnabled::Always => "always",
            SizeEnabled::Inherit => "inherit",
            SizeEnabled::Madvise => "madvise",
            SizeEnabled::Never => "never",
        }
    }
}

/// PR_SET_THP_DISABLE's state of an mm: MMF_DISABLE_THP (v6.8 – v6.17), renamed
/// MMF_DISABLE_THP_COMPLETELY in v6.18, which adds MMF_DISABLE_THP_EXCEPT_ADVISED.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ThpDisable {
    #[default]
    No,
    Completely,
    ExceptAdvised,
}

impl ThpDisable {
    /// What `prctl(PR_GET_THP_DISABLE)` returns (kernel/sys.c): 0, 1, or 3 (1 | the flag).
    pub fn prctl_value(&self) -> u32 {
        match self {
            ThpDisable::No => 0,
            ThpDisable::Completely => 1,
            ThpDisable::ExceptAdvised => 3,
        }
    }
}

/// The sysfs anonymous THP controls, kept as the kernel keeps them: the top-level mode and
/// one order bitmask per per-size mode (`huge_anon_orders_always` / `_madvise` / `_inherit`;
/// an order in none of them is "never").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ThpPolicy {
    pub enabled: ThpEnabled,
    pub orders_always: u32,
    pub orders_madvise: u32,
    pub orders_inherit: u32,
}

/// `THP_ORDERS_ALL_ANON`: orders 2 ..= PMD_ORDER (order 1 is not supported for anonymous THP).
pub fn thp_orders_all_anon(pmd_order: u32) -> u32 {
    ((1u32 << (pmd_order + 1)) - 1) & !0b11
}

impl ThpPolicy {
    /// The boot defaults with top-level "madvise": `hugepage_init_sysfs()` sets the PMD size
    /// to "inherit" and every other size to "never"; the top level is a Kconfig choice
    /// (upstream's default is "always"; distributions and these machines run "madvise").
    pub fn default_for(pmd_order: u32) -> ThpPolicy {
        ThpPolicy { enabled: ThpEnabled::Madvise, orders_always: 0, orders_madvise: 0, orders_inherit: 1 << pmd_order }
    }

    pub fn size_mode(&self, order: u32) -> SizeEnabled {
        let bit = 1u32 << order;
        if self.orders_always & bit != 0 {
            SizeEnabled::Always
        } else if self.orders_inherit & bit != 0 {
            SizeEnabled::Inherit
        } else if self.orders_madvise & bit != 0 {
            SizeEnabled::Madvise
        } else {
            SizeEnabled::Never
        }
    }

    /// Writes one per-size control (`thpsize_enabled_store()`): the order moves to one mask.
    pub fn set_size_mode(&mut self, order: u32, mode: SizeEnabled) {
        let bit = 1u32 << order;
        self.orders_always &= !bit;
        self.orders_madvise &= !bit;
        self.orders_inherit &= !bit;
        match mode {
            SizeEnabled::Always => self.orders_always |= bit,
            SizeEnabled::Madvise => self.orders_madvise |= bit,
            SizeEnabled::Inherit => self.orders_inherit |= bit,
            SizeEnabled::Never => {}
        }
    }

    /// The sysfs part of `thp_vma_allowable_orders()` (huge_mm.h): the orders the per-size
    /// controls allow for a VMA with or without VM_HUGEPAGE.
    pub fn sysfs_orders(&self, vm_hugepage: bool) -> u32 {
        let mut mask = self.orders_always;
        if vm_hugepage {
            mask |= self.orders_madvise;
        }
        if self.enabled == ThpEnabled::Always || (vm_hugepage && self.enabled != ThpEnabled::Never) {
            mask |= self.orders_inherit;
        }
        mask
    }
}

/// `vma_thp_disabled()` (huge_mm.h, v6.12+; inline in `__thp_vma_allowable_orders()` before):
/// VM_NOHUGEPAGE, or PR_SET_THP_DISABLE for the whole process, or (v6.18+) for every VMA
/// without VM_HUGEPAGE.
pub fn vma_thp_disabled(vma: &Vma, disable: ThpDisable) -> bool {
    if vma.nohugepage {
        return true;
    }
    match disable {
        ThpDisable::No => false,
        ThpDisable::Completely => true,
        ThpDisable::ExceptAdvised => !vma.hugepage,
    }
}

/// `thp_vma_suitable_orders()` (huge_mm.h) for an anonymous VMA: drops the orders whose
/// naturally aligned range around `vpn` does not lie inside the VMA.
pub fn thp_vma_suitable_orders(vma: &Vma, vpn: u64, orders: u32) -> u32 {
    let mut out = orders;
    while out != 0 {
        let o = 31 - out.leading_zeros();
        let n = 1u64 << o;
        let base = vpn & !(n - 1);
        if base >= vma.start && base + n <= vma.end() {
            // Every lower order's range lies inside this one.
            break;
        }
        out &= !(1 << o);
    }
    out
}

impl State {
    /// `thp_vma_allowable_orders(vma, vm_flags, TVA_PAGEFAULT, orders)` for the anonymous VMA
    /// `v` of process `k`: the large orders (up to and including the PMD order) a fault may
    /// use, before alignment. A VMA mapped with an explicit list of sizes (`Vma::mthp`, a
    /// model shortcut) takes that list instead of the sysfs controls; VM_NOHUGEPAGE and
    /// PR_SET_THP_DISABLE still apply.
    pub fn thp_vma_allowable_orders(&self, k: usize, v: usize) -> u32 {
        let vma = &self.mms[k].vmas[v];
        if !vma.is_anon() || vma_thp_disabled(vma, self.mms[k].thp_disable) {
            return 0;
        }
        let mask = if vma.mthp != 0 { vma.mthp } else { self.thp.sysfs_orders(vma.hugepage) };
        mask & thp_orders_all_anon(self.pmd_order)
    }

    /// The largest folio order faults on `v` may allocate (0 when only pages), for the
    /// worst-case memory bound of a step.
    pub fn vma_max_order(&self, k: usize, v: usize) -> u32 {
        let orders = self.thp_vma_allowable_orders(k, v) | 1;
        31 - orders.leading_zeros()
    }
}

/// Checks a `prctl(PR_SET_THP_DISABLE, disable, flags)` request for kernel `p` (kernel/sys.c
/// `prctl_set_thp_disable()`): PR_THP_DISABLE_EXCEPT_ADVISED exists from v6.18, and only
/// when disabling.
pub fn prctl_thp_disable_state(p: &KernelProfile, disable: bool, except_advised: bool) -> Result<ThpDisable> {
    if except_advised && !p.thp_disable_except_advised {
        return Err(Error::value(format!(
            "PR_THP_DISABLE_EXCEPT_ADVISED is not in kernel {} (it came in 6.18; older kernels return EINVAL)",
            p.version
        )));
    }
    if except_advised && !disable {
        return Err(Error::value("except_advised applies only when disabling THP (the kernel returns EINVAL)"));
    }
    Ok(match (disable, except_advised) {
        (false, _) => ThpDisable::No,
        (true, false) => ThpDisable::Completely,
        (true, true) => ThpDisable::ExceptAdvised,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_hugepage_init_sysfs() {
        let p = ThpPolicy::default_for(9);
        assert_eq!(p.size_mode(9), SizeEnabled::Inherit);
        assert_eq!(p.size_mode(4), SizeEnabled::Never);
        // top-level madvise: only MADV_HUGEPAGE VMAs get the PMD size
        assert_eq!(p.sysfs_orders(false), 0);
        assert_eq!(p.sysfs_orders(true), 1 << 9);
    }

    #[test]
    fn per_size_modes_combine_with_the_top_level() {
        let mut p = ThpPolicy::default_for(9);
        p.set_size_mode(4, SizeEnabled::Always);
        p.set_size_mode(2, SizeEnabled::Madvise);
        p.enabled = ThpEnabled::Never;
        // "always" per size ignores the top level; "inherit" follows it; "madvise" needs VM_HUGEPAGE
        assert_eq!(p.sysfs_orders(false), 1 << 4);
        assert_eq!(p.sysfs_orders(true), (1 << 4) | (1 << 2));
        p.enabled = ThpEnabled::Always;
        assert_eq!(p.sysfs_orders(false), (1 << 4) | (1 << 9));
        p.set_size_mode(9, SizeEnabled::Never);
        assert_eq!(p.size_mode(9), SizeEnabled::Never);
        assert_eq!(p.sysfs_orders(true), (1 << 4) | (1 << 2));
    }

    #[test]
    fn anon_orders_exclude_zero_and_one() {
        assert_eq!(thp_orders_all_anon(9), 0b11_1111_1100);
        assert_eq!(thp_orders_all_anon(4), 0b1_1100);
    }
}

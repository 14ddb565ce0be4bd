//! shmem folio sizes: the sysfs shmem THP controls (`shmem_enabled`, and from v6.11 the
//! per-size `hugepages-<size>kB/shmem_enabled`), the tmpfs `huge=` mount option, and the order
//! a shmem fault allocates (mm/shmem.c `shmem_is_huge()` / `shmem_huge_global_enabled()`,
//! `shmem_allowable_huge_orders()`, `shmem_suitable_orders()`, `shmem_alloc_and_add_folio()`;
//! include/linux/huge_mm.h `thp_vma_suitable_order()`), per kernel version.

use crate::error::{Error, Result};
use crate::kernel::{KernelProfile, ShmemForm};
use crate::mm::{ShmemKind, NOT_CACHED};
use crate::sim::State;

/// `MAX_PAGECACHE_ORDER` (include/linux/pagemap.h): at most `MAX_XAS_ORDER` (11).
const MAX_XAS_ORDER: u32 = 11;

/// `SHMEM_HUGE_*`: a top-level `shmem_enabled` value or a tmpfs `huge=` option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemHuge {
    Never,
    Always,
    WithinSize,
    Advise,
    /// Top level only: no huge folios on any mount.
    Deny,
    /// Top level only: PMD-sized folios on every mount.
    Force,
}

impl ShmemHuge {
    pub const NAMES: [&'static str; 6] = ["always", "within_size", "advise", "never", "deny", "force"];

    /// `shmem_parse_huge()`.
    pub fn parse(s: &str) -> Option<ShmemHuge> {
        Some(match s {
            "never" => ShmemHuge::Never,
            "always" => ShmemHuge::Always,
            "within_size" => ShmemHuge::WithinSize,
            "advise" => ShmemHuge::Advise,
            "deny" => ShmemHuge::Deny,
            "force" => ShmemHuge::Force,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            ShmemHuge::Never => "never",
            ShmemHuge::Always => "always",
            ShmemHuge::WithinSize => "within_size",
            ShmemHuge::Advise => "advise",
            ShmemHuge::Deny => "deny",
            ShmemHuge::Force => "force",
        }
    }
}

/// A per-size `hugepages-<size>kB/shmem_enabled` value (v6.11).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemSize {
    Never,
    Always,
    Inherit,
    WithinSize,
    Advise,
}

impl ShmemSize {
    pub const NAMES: [&'static str; 5] = ["always", "inherit", "within_size", "advise", "never"];

    pub fn parse(s: &str) -> Option<ShmemSize> {
        Some(match s {
            "never" => ShmemSize::Never,
            "always" => ShmemSize::Always,
            "inherit" => ShmemSize::Inherit,
            "within_size" => ShmemSize::WithinSize,
            "advise" => ShmemSize::Advise,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            ShmemSize::Never => "never",
            ShmemSize::Always => "always",
            ShmemSize::Inherit => "inherit",
            ShmemSize::WithinSize => "within_size",
            ShmemSize::Advise => "advise",
        }
    }
}

/// The sysfs shmem controls: the top level and one value per folio order (index = order;
/// orders 1 ..= PMD order have a `hugepages-<size>kB` directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmemPolicy {
    pub enabled: ShmemHuge,
    pub sizes: [ShmemSize; 32],
}

impl ShmemPolicy {
    /// The boot defaults: `shmem_enabled` never, the PMD size "inherit", the others never.
    pub fn new(pmd_order: u32) -> ShmemPolicy {
        let mut sizes = [ShmemSize::Never; 32];
        sizes[pmd_order as usize] = ShmemSize::Inherit;
        ShmemPolicy { enabled: ShmemHuge::Never, sizes }
    }

    /// `huge_shmem_orders_{always,inherit,madvise,within_size}` as bitmaps.
    fn mask(&self, which: ShmemSize) -> u32 {
        (0..32).filter(|&o| self.sizes[o] == which).fold(0, |m, o| m | 1 << o)
    }

    /// A new policy from this one, checked as `shmem_enabled_store()` and
    /// `thpsize_shmem_enabled_store()` check each write: "force" only while no size but the
    /// PMD size inherits (v6.11+).
    pub fn updated(&self, p: &KernelProfile, pmd_order: u32, enabled: Option<ShmemHuge>, sizes: &[(u32, ShmemSize)]) -> Result<ShmemPolicy> {
        let mut new = *self;
        if let Some(e) = enabled {
            new.enabled = e;
        }
        if !sizes.is_empty() && !p.shmem.per_size() {
            return Err(Error::value(format!(
                "kernel {} has no per-size shmem controls (hugepages-<size>kB/shmem_enabled appeared in 6.11)",
                p.version
            )));
        }
        for &(order, v) in sizes {
            if order == 0 || order > pmd_order {
                return Err(Error::value(format!(
                    "no hugepages-<size>kB/shmem_enabled for folio order {order}: sizes are 2 pages … the PMD size"
                )));
            }
            new.sizes[order as usize] = v;
        }
        if p.shmem.per_size() && new.enabled == ShmemHuge::Force && new.mask(ShmemSize::Inherit) & !(1 << pmd_order) != 0 {
            return Err(Error::value(
                "shmem_enabled \"force\" with a size other than the PMD size set to \"inherit\": the kernel \
                 refuses it (EINVAL)",
            ));
        }
        Ok(new)
    }
}

/// What a shmem fault's order choice reads about the object, the VMA and the fault.
pub struct ShmemFault {
    /// File page of the fault, and the object's size in pages (`i_size`).
    pub index: u64,
    pub i_size: u64,
    /// The object's `huge` setting: a tmpfs mount option, or shared anonymous memory, whose
    /// superblock (`shm_mnt`) follows the top-level control.
    pub kind: ShmemKind,
    /// VM_HUGEPAGE / VM_NOHUGEPAGE of the VMA (MADV_HUGEPAGE, MADV_NOHUGEPAGE).
    pub vm_hugepage: bool,
    pub vm_nohugepage: bool,
    /// The VMA (first page, end, file page of its start) and the faulting page.
    pub vma_start: u64,
    pub vma_end: u64,
    pub vma_pgoff: u64,
    pub vpn: u64,
}

/// `round_up()` (include/linux/math.h), which assumes a power-of-two `y`.
fn round_up(x: u64, y: u64) -> u64 {
    ((x - 1) | (y - 1)) + 1
}

/// `highest_order()` / `next_order()` walk: the set bits of `orders`, highest first.
fn orders_desc(orders: u32) -> impl Iterator<Item = u32> {
    (0..32).rev().filter(move |o| orders & (1 << o) != 0)
}

/// `thp_vma_suitable_order()` for a file VMA: the VMA's start is aligned to the order in the
/// file, and the naturally aligned range around the fault lies in the VMA.
pub fn thp_vma_suitable(order: u32, f: &ShmemFault) -> bool {
    let n = 1u64 << order;
    if (f.vma_start.wrapping_sub(f.vma_pgoff)) & (n - 1) != 0 {
        return false;
    }
    let base = f.vpn & !(n - 1);
    base >= f.vma_start && base + n <= f.vma_end
}

impl State {
    /// `MAX_PAGECACHE_ORDER`, and `THP_ORDERS_ALL_FILE_DEFAULT` (orders 1 ..= it).
    fn max_pagecache_order(&self) -> u32 {
        self.pmd_order.min(MAX_XAS_ORDER)
    }

    fn all_file_orders(&self) -> u32 {
        let m = self.max_pagecache_order();
        ((1u64 << (m + 1)) - 1) as u32 & !1
    }

    /// `maybe_pmd_order`: the PMD order, where the page cache can hold it.
    fn maybe_pmd_order(&self) -> u32 {
        if self.pmd_order <= self.max_pagecache_order() {
            1 << self.pmd_order
        } else {
            0
        }
    }

    /// The object's `huge` value: the mount option, or for shared anonymous memory the top
    /// level (`shmem_enabled_store()` copies it into `shm_mnt`'s superblock).
    fn sb_huge(&self, kind: ShmemKind) -> ShmemHuge {
        match kind {
            ShmemKind::Tmpfs(h) => h,
            ShmemKind::Anon | ShmemKind::Fixed => self.shmem_policy.enabled,
        }
    }

    /// `shmem_huge_global_enabled()` (`shmem_is_huge()` before v6.14) for a fault: the PMD
    /// order when the top level and the object's `huge` setting allow huge folios, else 0.
    fn shmem_huge_global(&self, f: &ShmemFault) -> u32 {
        let pmd = self.maybe_pmd_order();
        let top = self.shmem_policy.enabled;
        if top == ShmemHuge::Deny {
            return 0;
        }
        if top == ShmemHuge::Force {
            return pmd;
        }
        let within = |order: u32| self.i_size_covers(f, order);
        match self.sb_huge(f.kind) {
            ShmemHuge::Always => pmd,
            ShmemHuge::WithinSize if within(self.pmd_order) => pmd,
            ShmemHuge::WithinSize | ShmemHuge::Advise if f.vm_hugepage => pmd,
            _ => 0,
        }
    }

    /// The within_size test: the object's size reaches past the naturally aligned block of
    /// `order` that holds the fault.
    fn i_size_covers(&self, f: &ShmemFault, order: u32) -> bool {
        f.i_size >= round_up(f.index + 1, 1 << order)
    }

    /// `shmem_allowable_huge_orders()` (v6.11+) or `shmem_is_huge()` (v6.8 – v6.10): the
    /// large orders a fault may allocate, before alignment and conflicts.
    pub fn shmem_allowable_orders(&self, p: &KernelProfile, f: &ShmemFault) -> u32 {
        if f.vm_nohugepage {
            return 0;
        }
        let global = self.shmem_huge_global(f);
        let anon = f.kind == ShmemKind::Anon;
        if !anon || p.shmem == ShmemForm::PmdOnly {
            return global;
        }
        let pol = &self.shmem_policy;
        match pol.enabled {
            ShmemHuge::Deny => return 0,
            ShmemHuge::Force => return pol.mask(ShmemSize::Inherit),
            _ => {}
        }
        let mut mask = pol.mask(ShmemSize::Always);
        // Within-size orders: the largest whose aligned block lies within i_size, and the
        // smaller ones (the walk clears the orders it passes).
        let within = pol.mask(ShmemSize::WithinSize);
        let first_covering = match p.shmem {
            // v6.11, v6.12: the index is rounded up to `order` (not 1 << order) and carried
            // on to the next, smaller order.
            ShmemForm::AnonMthp => {
                let mut index = f.index;
                orders_desc(within).find(|&o| {
                    index = round_up(index + 1, o as u64);
                    f.i_size >= index
                })
            }
            _ => orders_desc(within).find(|&o| self.i_size_covers(f, o)),
        };
        if let Some(o) = first_covering {
            mask |= within & ((2u64 << o) - 1) as u32;
        }
        if f.vm_hugepage {
            mask |= pol.mask(ShmemSize::Advise);
        }
        if global != 0 {
            mask |= pol.mask(ShmemSize::Inherit);
        }
        mask & self.all_file_orders()
    }

    /// The order a shmem fault at file page `f.index` of object `file` allocates, tried from
    /// the largest allowed: `shmem_suitable_orders()` (from v6.11 for shared anonymous memory,
    /// v6.14 for tmpfs, with the VMA check) keeps the largest order whose aligned range holds
    /// no cached page, and the ones below it; allocation failures fall back order by order,
    /// then to a page. Returns (head, order, first index).
    pub fn shmem_alloc_folio(&mut self, p: &KernelProfile, file: usize, f: &ShmemFault) -> Result<(u64, u32, u64)> {
        let mut orders = self.shmem_allowable_orders(p, f);
        let vma_checked = match p.shmem {
            ShmemForm::PmdOnly => false,
            ShmemForm::AnonMthp | ShmemForm::AnonMthpFixed => f.kind == ShmemKind::Anon,
            ShmemForm::Unified => true,
        };
        if vma_checked {
            orders &= orders_desc(orders).filter(|&o| thp_vma_suitable(o, f)).fold(0, |m, o| m | 1 << o);
        }
        // The highest order whose range is free of cached pages, and every order below it.
        let cache = &self.files[file].cache;
        let free = |o: u32| {
            let base = (f.index & !((1u64 << o) - 1)) as usize;
            cache[base..base + (1usize << o)].iter().all(|&c| c == NOT_CACHED)
        };
        let first_free = orders_desc(orders).find(|&o| free(o));
        let candidates: u32 = match first_free {
            Some(o) if vma_checked => orders & ((2u64 << o) - 1) as u32,
            // Before the unified check, the PMD range conflicting means a page (-E2BIG).
            Some(o) => 1 << o,
            None => 0,
        };
        for o in orders_desc(candidates) {
            if self.mem.fragmented(o) {
                continue;
            }
            if let Some(h) = self.mem.alloc(o) {
                return Ok((h, o, f.index & !((1u64 << o) - 1)));
            }
        }
        let h = self.mem.alloc(0).ok_or_else(|| Error::out_of_memory("out of memory: no free page for the allocation"))?;
        Ok((h, 0, f.index))
    }
}

//! Kernel versions and the behaviour each one has. Every behaviour switch reads a
//! [`KernelProfile`]; no version numbers are compared deeper in the code.

use crate::error::{Error, Result};

/// A kernel we model: the posted seed series, or a mainline release.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelVersion {
    /// "mm/memory: optimize fork() with PTE-mapped THP" v3 (29 Jan 2024), patches 13–15.
    Seed,
    Release { major: u16, minor: u16 },
}

/// Releases we model, oldest first. 7.0 is the newest kernel source the model follows.
pub const RELEASES: [(u16, u16); 13] = [
    (6, 8),
    (6, 9),
    (6, 10),
    (6, 11),
    (6, 12),
    (6, 13),
    (6, 14),
    (6, 15),
    (6, 16),
    (6, 17),
    (6, 18),
    (6, 19),
    (7, 0),
];

impl KernelVersion {
    /// Parses `"seed"` or `"X.Y"`.
    pub fn parse(s: &str) -> Result<KernelVersion> {
        let t = s.trim();
        if t == "seed" {
            return Ok(KernelVersion::Seed);
        }
        let known = || {
            let list: Vec<String> = RELEASES.iter().map(|(a, b)| format!("{a}.{b}")).collect();
            format!("\"seed\", {}", list.join(", "))
        };
        let parts: Vec<&str> = t.split('.').collect();
        let parsed = match parts.as_slice() {
            [a, b] => a.parse::<u16>().ok().zip(b.parse::<u16>().ok()),
            [_, _, _] => {
                return Err(Error::value(format!(
                    "kernel {s:?}: give the mainline release as \"X.Y\" (stable backports are not \
                     modelled); known: {}",
                    known()
                )))
            }
            _ => None,
        };
        match parsed {
            Some((major, minor)) if RELEASES.contains(&(major, minor)) => {
                Ok(KernelVersion::Release { major, minor })
            }
            _ => Err(Error::value(format!("unknown kernel version {s:?}; known: {}", known()))),
        }
    }

    fn at_least(&self, major: u16, minor: u16) -> bool {
        match *self {
            KernelVersion::Seed => false,
            KernelVersion::Release { major: a, minor: b } => (a, b) >= (major, minor),
        }
    }
}

impl std::fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KernelVersion::Seed => f.write_str("seed"),
            KernelVersion::Release { major, minor } => write!(f, "{major}.{minor}"),
        }
    }
}

/// The shapes `folio_pte_batch()` has had (docs/semantics.md §2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FpbForm {
    /// Seed series: single steps, `==` end-of-folio test, `any_writable`.
    Seed,
    /// v6.9: `pte_batch_hint` steps, `>=` end test, `min(nr, max_nr)`.
    V6_9,
    /// v6.10 – v6.14: adds `any_young` and `any_dirty`.
    V6_10,
    /// v6.15, v6.16: the XEN PV fix clamps `max_nr` to the folio up front.
    V6_15,
    /// v6.17+: `FPB_RESPECT_*` / `FPB_MERGE_*`, merged first PTE.
    V6_17,
}

/// How the loop recognises the end of the folio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FolioEnd {
    /// Stop when the read PTE maps exactly the first page after the folio.
    Equal,
    /// Stop when the read PTE maps a page at or after the folio end.
    AtOrAfter,
    /// Clamp `max_nr` to the pages left in the folio before the loop.
    Clamp,
}

/// Which `fpb_t` flag family a form takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlagFamily {
    /// `FPB_IGNORE_DIRTY`, `FPB_IGNORE_SOFT_DIRTY` (seed … v6.16).
    Ignore,
    /// `FPB_RESPECT_*`, `FPB_MERGE_*` (v6.17+).
    Respect,
}

impl FpbForm {
    pub fn name(&self) -> &'static str {
        match self {
            FpbForm::Seed => "seed",
            FpbForm::V6_9 => "v6.9",
            FpbForm::V6_10 => "v6.10",
            FpbForm::V6_15 => "v6.15",
            FpbForm::V6_17 => "v6.17",
        }
    }

    /// Whether the loop steps by `pte_batch_hint()` (and reads through contpte `ptep_get`).
    pub fn uses_hint(&self) -> bool {
        !matches!(self, FpbForm::Seed)
    }

    pub fn folio_end(&self) -> FolioEnd {
        match self {
            FpbForm::Seed => FolioEnd::Equal,
            FpbForm::V6_9 | FpbForm::V6_10 => FolioEnd::AtOrAfter,
            FpbForm::V6_15 | FpbForm::V6_17 => FolioEnd::Clamp,
        }
    }

    pub fn flag_family(&self) -> FlagFamily {
        match self {
            FpbForm::V6_17 => FlagFamily::Respect,
            _ => FlagFamily::Ignore,
        }
    }

    /// Whether the version has the `any_writable` out-parameter.
    pub fn reports_any_writable(&self) -> bool {
        !matches!(self, FpbForm::V6_17)
    }

    /// Whether the version has the `any_young` / `any_dirty` out-parameters.
    pub fn reports_any_young_dirty(&self) -> bool {
        matches!(self, FpbForm::V6_10 | FpbForm::V6_15)
    }
}

/// When a write fault may reuse a large anonymous folio whose faulting page is not
/// PageAnonExclusive (`wp_can_reuse_anon_folio()`, mm/memory.c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LargeCowReuse {
    /// v6.5 – v6.8 (and the seed series): like a small folio, only at refcount 1.
    RefcountOne,
    /// v6.9 – v6.14: never ("mm: prohibit the last subpage from reusing the entire large folio").
    Never,
    /// v6.15+: when the MM-ID slots say one mm holds every mapping and every reference.
    MmId,
}

/// Which page-cache faults `finish_fault()` (mm/memory.c) maps the whole folio on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishFaultFolio {
    /// v6.8 – v6.10: one PTE per fault.
    Page,
    /// v6.11 – v6.16: shared anonymous memory only (`vma_is_anon_shmem()`).
    AnonShmem,
    /// v6.17: shmem and tmpfs (`vma_is_shmem()`).
    Shmem,
    /// v6.18+: every file ("mm/fault: try to map the entire file folio in finish_fault()").
    AnyFile,
}

/// How a shmem fault chooses its folio order (mm/shmem.c).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShmemForm {
    /// v6.8 – v6.10: `shmem_is_huge()`, PMD order or a page.
    PmdOnly,
    /// v6.11, v6.12: per-size controls for anonymous shmem (`shmem_allowable_huge_orders()`,
    /// with its within_size loop rounding to the order rather than to 1 << order).
    AnonMthp,
    /// v6.13: the same with the within_size rounding fixed.
    AnonMthpFixed,
    /// v6.14+: `shmem_huge_global_enabled()` returns orders and `shmem_suitable_orders()`
    /// checks the VMA for tmpfs too.
    Unified,
}

impl ShmemForm {
    /// The per-size `hugepages-<size>kB/shmem_enabled` controls exist (v6.11).
    pub fn per_size(&self) -> bool {
        !matches!(self, ShmemForm::PmdOnly)
    }
}

/// What one kernel version does, as far as the model needs to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelProfile {
    pub version: KernelVersion,
    /// `folio_pte_batch()`'s form; `None` before v6.9 (no batching at all).
    pub fpb: Option<FpbForm>,
    /// fork copies runs of PTEs of one large folio at once (`copy_present_ptes`).
    pub fork_batched: bool,
    /// zap clears runs at once (`zap_present_ptes`).
    pub zap_batched: bool,
    /// arm64 transparent contpte for user mappings (`ptep_get` gathers A/D, hints).
    pub contpte: bool,
    /// mprotect batches runs of one large folio (`change_pte_range`, v6.17).
    pub mprotect_batched: bool,
    /// `folio->_large_mapcount` is kept (v6.10, "track mapcount of large folios in single value").
    pub large_mapcount: bool,
    /// CONFIG_MM_ID: per-folio MM-ID slots and the "maybe mapped shared" bit (v6.15).
    pub mm_id: bool,
    /// Write-fault reuse rule for large anonymous folios.
    pub large_cow_reuse: LargeCowReuse,
    /// pagemap's "exclusively mapped" bit comes from `folio_maybe_mapped_shared()` (the
    /// newest tree) rather than the page's own mapcount (CONFIG_PAGE_MAPCOUNT, ≤ v6.19).
    pub pagemap_exclusive_by_folio: bool,
    /// `prctl(PR_SET_THP_DISABLE)` takes PR_THP_DISABLE_EXCEPT_ADVISED (v6.18, kernel/sys.c).
    pub thp_disable_except_advised: bool,
    /// VM_SOFTDIRTY is a sticky VMA flag: a merge of existing VMAs (mprotect, madvise) keeps
    /// it if any merged VMA had it (mm/vma.c `vma_merge_existing_range()`, v6.19 "mm:
    /// propagate VM_SOFTDIRTY on merge"); before, the merged VMA took the changed VMA's.
    pub softdirty_sticky: bool,
    // ---- page cache and shmem (filemap.rs, shmem.rs) ----
    /// Which faults `finish_fault()` maps a whole page-cache folio on.
    pub finish_fault_folio: FinishFaultFolio,
    /// Fault-around maps a large folio whole where it fits the VMA and the page table
    /// (`filemap_map_folio_range()`, v6.18 "mm/filemap: map entire large folio faultaround").
    pub fault_around_whole_folio: bool,
    /// `set_pte_range()` makes the PTE of a dirty folio dirty when it is writable (v6.16).
    pub set_pte_dirty_folio: bool,
    /// The shmem order choice.
    pub shmem: ShmemForm,
}

impl KernelProfile {
    pub fn new(version: KernelVersion) -> KernelProfile {
        let fpb = match version {
            KernelVersion::Seed => Some(FpbForm::Seed),
            v if v.at_least(6, 17) => Some(FpbForm::V6_17),
            v if v.at_least(6, 15) => Some(FpbForm::V6_15),
            v if v.at_least(6, 10) => Some(FpbForm::V6_10),
            v if v.at_least(6, 9) => Some(FpbForm::V6_9),
            _ => None,
        };
        KernelProfile {
            version,
            fpb,
            fork_batched: fpb.is_some(),
            // The zap series was posted after the fork series; the seed kernel zaps per PTE.
            zap_batched: version.at_least(6, 9),
            contpte: version.at_least(6, 9),
            mprotect_batched: version.at_least(6, 17),
            large_mapcount: version.at_least(6, 10),
            mm_id: version.at_least(6, 15),
            large_cow_reuse: if version.at_least(6, 15) {
                LargeCowReuse::MmId
            } else if version.at_least(6, 9) {
                LargeCowReuse::Never
            } else {
                LargeCowReuse::RefcountOne
            },
            pagemap_exclusive_by_folio: version.at_least(7, 0),
            thp_disable_except_advised: version.at_least(6, 18),
            softdirty_sticky: version.at_least(6, 19),
            finish_fault_folio: if version.at_least(6, 18) {
                FinishFaultFolio::AnyFile
            } else if version.at_least(6, 17) {
                FinishFaultFolio::Shmem
            } else if version.at_least(6, 11) {
                FinishFaultFolio::AnonShmem
            } else {
                FinishFaultFolio::Page
            },
            fault_around_whole_folio: version.at_least(6, 18),
            set_pte_dirty_folio: version.at_least(6, 16),
            shmem: if version.at_least(6, 14) {
                ShmemForm::Unified
            } else if version.at_least(6, 13) {
                ShmemForm::AnonMthpFixed
            } else if version.at_least(6, 11) {
                ShmemForm::AnonMthp
            } else {
                ShmemForm::PmdOnly
            },
        }
    }

    /// The same kernel with every batched path (fork, zap, mprotect) run per PTE: the
    /// reference against which batching must give the same end state.
    pub fn unbatched(mut self) -> KernelProfile {
        self.fork_batched = false;
        self.zap_batched = false;
        self.mprotect_batched = false;
        self
    }

    pub fn parse(s: &str) -> Result<KernelProfile> {
        Ok(KernelProfile::new(KernelVersion::parse(s)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_maps_versions_to_forms() {
        let form = |s: &str| KernelProfile::parse(s).unwrap().fpb;
        assert_eq!(form("seed"), Some(FpbForm::Seed));
        assert_eq!(form("6.8"), None);
        assert_eq!(form("6.9"), Some(FpbForm::V6_9));
        assert_eq!(form("6.10"), Some(FpbForm::V6_10));
        assert_eq!(form("6.14"), Some(FpbForm::V6_10));
        assert_eq!(form("6.15"), Some(FpbForm::V6_15));
        assert_eq!(form("6.16"), Some(FpbForm::V6_15));
        assert_eq!(form("6.17"), Some(FpbForm::V6_17));
        assert_eq!(form("7.0"), Some(FpbForm::V6_17));
    }

    #[test]
    fn page_cache_switches_per_version() {
        let p = |s: &str| KernelProfile::parse(s).unwrap();
        assert_eq!(p("6.10").finish_fault_folio, FinishFaultFolio::Page);
        assert_eq!(p("6.11").finish_fault_folio, FinishFaultFolio::AnonShmem);
        assert_eq!(p("6.17").finish_fault_folio, FinishFaultFolio::Shmem);
        assert_eq!(p("6.18").finish_fault_folio, FinishFaultFolio::AnyFile);
        assert!(!p("6.17").fault_around_whole_folio && p("6.18").fault_around_whole_folio);
        assert!(!p("6.15").set_pte_dirty_folio && p("6.16").set_pte_dirty_folio);
        let forms: Vec<ShmemForm> = ["6.10", "6.11", "6.12", "6.13", "6.14", "7.0"].iter().map(|s| p(s).shmem).collect();
        assert_eq!(forms, [ShmemForm::PmdOnly, ShmemForm::AnonMthp, ShmemForm::AnonMthp, ShmemForm::AnonMthpFixed, ShmemForm::Unified, ShmemForm::Unified]);
        assert_eq!(p("seed").shmem, ShmemForm::PmdOnly);
    }

    #[test]
    fn softdirty_is_sticky_from_6_19() {
        let sticky = |s: &str| KernelProfile::parse(s).unwrap().softdirty_sticky;
        assert!(!sticky("seed") && !sticky("6.8") && !sticky("6.18") && sticky("6.19") && sticky("7.0"));
    }

    #[test]
    fn rejects_unknown_versions() {
        for bad in ["6.7", "5.10", "6.18.44", "6", "", "six.nine", "7.1", "-6.9"] {
            let err = KernelVersion::parse(bad).unwrap_err();
            assert_eq!(err.kind, crate::error::ErrorKind::Value, "{bad}");
        }
        assert!(KernelVersion::parse("6.18.44").unwrap_err().message.contains("X.Y"));
    }

    #[test]
    fn display_round_trips() {
        for (a, b) in RELEASES {
            let s = format!("{a}.{b}");
            assert_eq!(KernelVersion::parse(&s).unwrap().to_string(), s);
        }
        assert_eq!(KernelVersion::Seed.to_string(), "seed");
    }
}

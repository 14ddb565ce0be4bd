//! Operation counters: what the kernel would have done, counted the way a profiler would
//! count kernel work (one atomic per `folio_ref_add`, one rmap call per `folio_*_rmap_*`).

/// Counter names, in the order [`Stats::values`] returns them.
pub const COUNTER_NAMES: [&str; 21] = [
    "refcount_atomics",
    "mapcount_updates",
    "rmap_calls",
    "pte_reads",
    "pte_writes",
    "tlb_flush_ranges",
    "tlb_flush_pages",
    "folio_pte_batch_calls",
    "batches",
    "pages_copied",
    "folios_allocated",
    "folios_freed",
    "faults",
    "cow_copies",
    "cow_reuses",
    "fork_eagain_retries",
    "pins",
    "deferred_splits",
    "pmd_copies",
    "pmd_zaps",
    "pmd_splits",
];

/// Counters of one operation or of a whole run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub refcount_atomics: u64,
    /// Per-page `_mapcount` changes plus large-mapcount changes (one per call).
    pub mapcount_updates: u64,
    pub rmap_calls: u64,
    pub pte_reads: u64,
    pub pte_writes: u64,
    pub tlb_flush_ranges: u64,
    pub tlb_flush_pages: u64,
    pub folio_pte_batch_calls: u64,
    /// Runs handled at once by fork/zap/mprotect (one per `folio_pte_batch` call or per
    /// single PTE of a present page); `batch_histogram[n]` counts those of length n.
    pub batches: u64,
    pub pages_copied: u64,
    pub folios_allocated: u64,
    pub folios_freed: u64,
    pub faults: u64,
    pub cow_copies: u64,
    pub cow_reuses: u64,
    pub fork_eagain_retries: u64,
    pub pins: u64,
    pub deferred_splits: u64,
    /// Huge PMDs copied at fork (`copy_huge_pmd`), zapped whole (`zap_huge_pmd`) and split
    /// into PTEs (`__split_huge_pmd`).
    pub pmd_copies: u64,
    pub pmd_zaps: u64,
    pub pmd_splits: u64,
    pub batch_histogram: Vec<u64>,
    /// Folios allocated per order.
    pub alloc_by_order: Vec<u64>,
}

impl Stats {
    pub fn values(&self) -> [u64; 21] {
        [
            self.refcount_atomics,
            self.mapcount_updates,
            self.rmap_calls,
            self.pte_reads,
            self.pte_writes,
            self.tlb_flush_ranges,
            self.tlb_flush_pages,
            self.folio_pte_batch_calls,
            self.batches,
            self.pages_copied,
            self.folios_allocated,
            self.folios_freed,
            self.faults,
            self.cow_copies,
            self.cow_reuses,
            self.fork_eagain_retries,
            self.pins,
            self.deferred_splits,
            self.pmd_copies,
            self.pmd_zaps,
            self.pmd_splits,
        ]
    }

    fn fields_mut(&mut self) -> [&mut u64; 21] {
        [
            &mut self.refcount_atomics,
            &mut self.mapcount_updates,
            &mut self.rmap_calls,
            &mut self.pte_reads,
            &mut self.pte_writes,
            &mut self.tlb_flush_ranges,
            &mut self.tlb_flush_pages,
            &mut self.folio_pte_batch_calls,
            &mut self.batches,
            &mut self.pages_copied,
            &mut self.folios_allocated,
            &mut self.folios_freed,
            &mut self.faults,
            &mut self.cow_copies,
            &mut self.cow_reuses,
            &mut self.fork_eagain_retries,
            &mut self.pins,
            &mut self.deferred_splits,
            &mut self.pmd_copies,
            &mut self.pmd_zaps,
            &mut self.pmd_splits,
        ]
    }

    /// Records one run of `n` PTEs handled at once.
    #[inline]
    pub fn batch(&mut self, n: usize) {
        self.batches += 1;
        if self.batch_histogram.len() <= n {
            self.batch_histogram.resize(n + 1, 0);
        }
        self.batch_histogram[n] += 1;
    }

    #[inline]
    pub fn allocated(&mut self, order: u32) {
        self.folios_allocated += 1;
        let o = order as usize;
        if self.alloc_by_order.len() <= o {
            self.alloc_by_order.resize(o + 1, 0);
        }
        self.alloc_by_order[o] += 1;
    }

    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &Stats) {
        for (a, b) in self.fields_mut().into_iter().zip(other.values()) {
            *a += b;
        }
        add_vec(&mut self.batch_histogram, &other.batch_histogram);
        add_vec(&mut self.alloc_by_order, &other.alloc_by_order);
    }
}

fn add_vec(a: &mut Vec<u64>, b: &[u64]) {
    if a.len() < b.len() {
        a.resize(b.len(), 0);
    }
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
}

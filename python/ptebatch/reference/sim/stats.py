"""Operation counters, counted the way a profiler would count kernel work (rust/src/stats.rs)."""

from __future__ import annotations

import dataclasses

COUNTER_NAMES = (
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
)


def _grow(values: list[int], length: int) -> None:
    """Vec::resize(length, 0) for a growing vector."""
    values.extend([0] * (length - len(values)))


@dataclasses.dataclass
class Stats:
    """Counters of one operation or of a whole run; the lists grow on demand, never shrink."""

    refcount_atomics: int = 0  # one per folio_ref_add() / folio_put_refs()
    mapcount_updates: int = 0  # per-page _mapcount changes, plus one per large-mapcount update
    rmap_calls: int = 0  # one per folio_*_rmap_*() call
    pte_reads: int = 0
    pte_writes: int = 0
    tlb_flush_ranges: int = 0
    tlb_flush_pages: int = 0
    folio_pte_batch_calls: int = 0
    batches: int = 0  # runs handled at once by fork, zap, mprotect
    pages_copied: int = 0
    folios_allocated: int = 0
    folios_freed: int = 0
    faults: int = 0
    cow_copies: int = 0
    cow_reuses: int = 0
    fork_eagain_retries: int = 0
    pins: int = 0
    deferred_splits: int = 0
    pmd_copies: int = 0  # huge PMDs copied at fork (copy_huge_pmd)
    pmd_zaps: int = 0  # huge PMDs zapped whole (zap_huge_pmd)
    pmd_splits: int = 0  # huge PMDs split into PTEs (__split_huge_pmd)
    batch_histogram: list[int] = dataclasses.field(default_factory=list)  # [n]: runs of n PTEs
    alloc_by_order: list[int] = dataclasses.field(default_factory=list)  # [order]: folios

    def batch(self, n: int) -> None:
        """One run of ``n`` PTEs handled at once (fork, zap, mprotect)."""
        self.batches += 1
        if len(self.batch_histogram) <= n:
            _grow(self.batch_histogram, n + 1)
        self.batch_histogram[n] += 1

    def allocated(self, order: int) -> None:
        """One folio of ``order`` allocated."""
        self.folios_allocated += 1
        if len(self.alloc_by_order) <= order:
            _grow(self.alloc_by_order, order + 1)
        self.alloc_by_order[order] += 1

    def add(self, other: Stats) -> None:
        """Adds ``other`` into these counters."""
        for name in COUNTER_NAMES:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mine, theirs in ((self.batch_histogram, other.batch_histogram),
                             (self.alloc_by_order, other.alloc_by_order)):
            if len(mine) < len(theirs):
                _grow(mine, len(theirs))
            for i, v in enumerate(theirs):
                mine[i] += v

    def as_dict(self) -> dict:
        """The counters by name, plus copies of the two lists."""
        d: dict = {name: getattr(self, name) for name in COUNTER_NAMES}
        d["batch_histogram"] = list(self.batch_histogram)
        d["alloc_by_order"] = list(self.alloc_by_order)
        return d

"""Operation counters, counted the way a profiler would count kernel work (rust/src/stats.rs)."""

from __future__ import annotations

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
)


def _grow(values: list[int], length: int) -> None:
    """Vec::resize(length, 0) for a growing vector."""
    values.extend([0] * (length - len(values)))


class Stats:
    """Counters of one operation or of a whole run; the lists grow on demand, never shrink."""

    def __init__(self) -> None:
        for name in COUNTER_NAMES:
            setattr(self, name, 0)
        self.batch_histogram: list[int] = []  # [n] = runs of n PTEs handled at once
        self.alloc_by_order: list[int] = []  # [order] = folios allocated of that order

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

"""Physical memory: per-page arrays, large-folio records and a buddy allocator (rust/src/memory.rs).

Per page (indexed by pfn): folio order (or FREE), flags, mapcount (the number of mappings,
i.e. the kernel's ``_mapcount + 1``), refcount (meaningful on a folio's first page) and a
content token. What the kernel keeps in a large folio's tail pages lives in a
:class:`LargeFolio` record keyed by the folio's first pfn, with the kernel's "minus one"
encoding for mapcounts.
"""

from __future__ import annotations

import dataclasses

from .errors import value_error

FREE = 0xFF  # order[pfn] of a free page

PG_ANON_EXCLUSIVE = 1 << 0  # per page
PG_ANON = 1 << 1  # folio flags, kept on the first page
PG_SWAPBACKED = 1 << 2
PG_FILE = 1 << 3  # in a file's or shmem object's page cache
PG_DIRTY = 1 << 4
PG_PARTIALLY_MAPPED = 1 << 5  # queued for deferred split
PG_MAYBE_SHARED = 1 << 6  # FOLIO_MM_IDS_SHARED_BIT (CONFIG_MM_ID)

GUP_PIN_COUNTING_BIAS = 1024
MM_ID_DUMMY = 0

MASK64 = (1 << 64) - 1
U32_MAX = (1 << 32) - 1


@dataclasses.dataclass
class LargeFolio:
    """The tail-page fields of a large folio; mapcounts are stored minus one (-1 = none)."""

    large_mapcount: int = -1
    entire_mapcount: int = -1
    nr_pages_mapped: int = 0
    pincount: int = 0
    mm_id: list[int] = dataclasses.field(default_factory=lambda: [MM_ID_DUMMY, MM_ID_DUMMY])
    mm_id_mapcount: list[int] = dataclasses.field(default_factory=lambda: [-1, -1])


class SplitMix64:
    """splitmix64, the generator behind simulated fragmentation."""

    def __init__(self, seed: int) -> None:
        self.state = seed & MASK64

    def next_u64(self) -> int:
        """The next 64-bit output."""
        self.state = (self.state + 0x9E3779B97F4A7C15) & MASK64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def next_f64(self) -> float:
        """A uniform double in [0, 1) from the top 53 bits."""
        return (self.next_u64() >> 11) * (1.0 / (1 << 53))


class Memory:
    """``nr_pages`` page frames with a buddy allocator of blocks up to ``max_order``."""

    def __init__(self, nr_pages: int, max_order: int, seed: int) -> None:
        if nr_pages == 0:
            raise value_error("memory must hold at least one page")
        if nr_pages > U32_MAX:
            raise value_error(f"{nr_pages} pages is more than the model's 2^32 page frames")
        self.order = [FREE] * nr_pages
        self.flags = [0] * nr_pages
        self.mapcount = [0] * nr_pages
        self.refcount = [0] * nr_pages
        self.token = [0] * nr_pages
        self.large: dict[int, LargeFolio] = {}
        self.free_lists: list[set[int]] = [set() for _ in range(max_order + 1)]
        self.free_pages = 0
        self.max_order = max_order
        self.fallback = [0.0] * (max_order + 1)
        self.rng = SplitMix64(seed)
        # Naturally aligned blocks, each as large as alignment and the end of memory allow.
        pfn = 0
        while pfn < nr_pages:
            o = max_order
            while o > 0 and (pfn & ((1 << o) - 1) != 0 or pfn + (1 << o) > nr_pages):
                o -= 1
            self.free_lists[o].add(pfn)
            self.free_pages += 1 << o
            pfn += 1 << o

    def nr_pages(self) -> int:
        return len(self.order)

    def folio_head(self, pfn: int) -> int:
        """page_folio(): the first pfn of the folio holding allocated page ``pfn``."""
        return pfn & ~((1 << self.order[pfn]) - 1)

    def folio_order(self, head: int) -> int:
        return self.order[head]

    def is_free(self, pfn: int) -> bool:
        return self.order[pfn] == FREE

    def test(self, pfn: int, flag: int) -> bool:
        return self.flags[pfn] & flag != 0

    def set(self, pfn: int, flag: int) -> None:
        self.flags[pfn] |= flag

    def clear(self, pfn: int, flag: int) -> None:
        self.flags[pfn] &= ~flag

    def can_alloc(self, order: int) -> bool:
        """Whether some free block of ``order`` or more exists."""
        return any(self.free_lists[o] for o in range(order, self.max_order + 1))

    def fragmented(self, order: int) -> bool:
        """The simulated-fragmentation coin: True = fail as if fragmented (draws only when p > 0)."""
        p = self.fallback[order] if order < len(self.fallback) else 0.0
        return order > 0 and p > 0.0 and self.rng.next_f64() < p

    def alloc(self, order: int) -> int | None:
        """__alloc_pages(): lowest free block of the smallest sufficient order, split down; refcount 1."""
        source = next((o for o in range(order, self.max_order + 1) if self.free_lists[o]), None)
        if source is None:
            return None
        pfn = min(self.free_lists[source])
        self.free_lists[source].remove(pfn)
        for o in reversed(range(order, source)):
            self.free_lists[o].add(pfn + (1 << o))  # the upper halves go back
        self.init_folio(pfn, order)
        self.refcount[pfn] = 1
        return pfn

    def init_folio(self, pfn: int, order: int) -> None:
        """A free block taken as a new folio: pages cleared, refcount 0, a fresh large-folio record."""
        n = 1 << order
        self.free_pages -= n
        for p in range(pfn, pfn + n):
            self.order[p] = order
            self.flags[p] = 0
            self.mapcount[p] = 0
            self.refcount[p] = 0
            self.token[p] = 0
        if order > 0:
            self.large[pfn] = LargeFolio()

    def alloc_at(self, pfn: int, order: int) -> bool:
        """The naturally aligned block at ``pfn`` taken if free, splitting the free block holding it."""
        source = next((o for o in range(order, self.max_order + 1)
                       if pfn & ~((1 << o) - 1) in self.free_lists[o]), None)
        if source is None:
            return False
        block = pfn & ~((1 << source) - 1)
        self.free_lists[source].remove(block)
        for o in reversed(range(order, source)):
            half = 1 << o
            if pfn >= block + half:  # keep the half holding pfn, free the other
                self.free_lists[o].add(block)
                block += half
            else:
                self.free_lists[o].add(block + half)
        self.init_folio(pfn, order)
        return True

    def free(self, head: int) -> None:
        """__free_pages(): back to the allocator, merging free buddies."""
        order = self.folio_order(head)
        n = 1 << order
        for p in range(head, head + n):
            self.order[p] = FREE
            self.flags[p] = 0
            self.mapcount[p] = 0
            self.refcount[p] = 0
            self.token[p] = 0
        self.large.pop(head, None)
        self.free_pages += n
        pfn, o = head, order
        while o < self.max_order:
            buddy = pfn ^ (1 << o)
            if buddy + (1 << o) > self.nr_pages() or buddy not in self.free_lists[o]:
                break
            self.free_lists[o].remove(buddy)
            pfn = min(pfn, buddy)
            o += 1
        self.free_lists[o].add(pfn)

    def free_blocks(self) -> list[tuple[int, int]]:
        """Free blocks as (first pfn, order), by pfn."""
        return sorted((pfn, o) for o, s in enumerate(self.free_lists) for pfn in s)

    def lf(self, head: int) -> LargeFolio:
        """The large-folio record of ``head`` (created if missing, as the Rust entry() does)."""
        return self.large.setdefault(head, LargeFolio())

    def folio_mapcount(self, head: int) -> int:
        """folio_mapcount() — include/linux/mm.h"""
        lf = self.large.get(head)
        return lf.large_mapcount + 1 if lf is not None else self.mapcount[head]

    def folio_maybe_dma_pinned(self, head: int) -> bool:
        """folio_maybe_dma_pinned() — include/linux/mm.h"""
        lf = self.large.get(head)
        if lf is not None:
            return lf.pincount > 0
        return self.refcount[head] >= GUP_PIN_COUNTING_BIAS

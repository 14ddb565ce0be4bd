"""Generated page tables: PTE arrays with the folios behind them, for demos, tests and benches.

Folios are physically naturally aligned, as the buddy allocator hands them out. On arm64,
blocks of ``cont_ptes`` entries that are aligned in both virtual and physical address space
and lie inside one folio get ``PTE_CONT``, as ``contpte_set_ptes()`` would write them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ptebatch._core import Layout


@dataclass(frozen=True)
class GeneratedTable:
    """A page table and the folios it maps."""

    ptes: np.ndarray  # uint64, one entry per virtual page from first_vpn
    folio_start: np.ndarray  # uint64, sorted
    folio_nr_pages: np.ndarray  # uint64
    first_vpn: int = 0

    def __len__(self) -> int:
        return len(self.ptes)


def _cont_mask(layout: Layout, vpns: np.ndarray, pfns: np.ndarray, folio_first: np.ndarray,
               folio_pages: np.ndarray) -> np.ndarray:
    """Entries that lie in a contpte block aligned in VA and PA and inside one folio."""
    n = layout.cont_ptes
    if n == 1:
        return np.zeros(len(vpns), dtype=bool)
    block_va = vpns - (vpns % n)
    block_pa = pfns - (vpns - block_va)
    aligned = (vpns % n) == (pfns % n)
    inside = (block_pa >= folio_first) & (block_pa + n <= folio_first + folio_pages)
    return aligned & inside & (folio_pages >= n)


def uniform_table(layout: Layout, n_ptes: int, folio_pages: int, *, base_pfn: int | None = None,
                  first_vpn: int = 0, write: bool = True, dirty: bool = True,
                  young: bool = True, contpte: bool = True) -> GeneratedTable:
    """``n_ptes`` PTEs mapping consecutive pages of folios that all have ``folio_pages`` pages
    (the seed series' benchmark: 1 GiB of one folio size), built without Python loops."""
    if folio_pages < 1 or folio_pages & (folio_pages - 1):
        raise ValueError(f"folio_pages must be a power of two, got {folio_pages}")
    if base_pfn is None:
        base_pfn = 1 << 20
    if base_pfn % folio_pages:
        raise ValueError("base_pfn must be aligned to the folio size")
    pfns = np.arange(base_pfn, base_pfn + n_ptes, dtype=np.uint64)
    nfolios = -(-n_ptes // folio_pages)
    starts = base_pfn + np.arange(nfolios, dtype=np.uint64) * np.uint64(folio_pages)
    sizes = np.full(nfolios, folio_pages, dtype=np.uint64)
    cont = False
    if contpte and layout.has_contpte:
        vpns = np.arange(first_vpn, first_vpn + n_ptes, dtype=np.uint64)
        first = pfns - (pfns % np.uint64(folio_pages))
        cont = _cont_mask(layout, vpns, pfns, first, np.full(n_ptes, folio_pages, dtype=np.uint64))
    ptes = layout.mk_pte(pfns, write=write, dirty=dirty, young=young,
                         cont=cont if isinstance(cont, np.ndarray) else False)
    return GeneratedTable(ptes, starts, sizes, first_vpn)


def mixed_table(layout: Layout, n_ptes: int, *, seed: int = 0,
                folio_orders: tuple[int, ...] = (0, 2, 4, 9),
                hole_rate: float = 0.05, partial_rate: float = 0.1,
                dirty_rate: float = 0.5, first_vpn: int = 0) -> GeneratedTable:
    """A table of folios of mixed orders (mTHP), some mapped only in part, with holes and
    per-folio dirty state, placed at random virtual offsets. Orders may not exceed the
    layout's PMD order: no folio is larger than what one page table maps."""
    _check_count("n_ptes", n_ptes, 1)
    _check_count("first_vpn", first_vpn, 0)
    _check_count("seed", seed, 0)
    pmd_order = layout.ptrs_per_pte.bit_length() - 1
    if not folio_orders:
        raise ValueError("folio_orders is empty")
    for o in folio_orders:
        _check_count("folio order", o, 0)
        if o > pmd_order:
            raise ValueError(f"folio order {o} is above the PMD order {pmd_order} of {layout.name}")
    for name, rate in (("hole_rate", hole_rate), ("partial_rate", partial_rate), ("dirty_rate", dirty_rate)):
        if isinstance(rate, bool) or not isinstance(rate, (int, float)):
            raise TypeError(f"{name} must be a number, not {type(rate).__name__}")
        if not (math.isfinite(rate) and 0 <= rate <= 1):
            raise ValueError(f"{name} must be a probability in [0, 1], not {rate}")
    rng = np.random.default_rng(seed)
    # Draw small folios more often than large ones, so a short table still holds many.
    weights = np.array([2.0 ** (-o / 2) for o in folio_orders])
    weights /= weights.sum()
    max_order = max(folio_orders)
    next_pfn = 1 << (max_order + 8)
    pfns: list[np.ndarray] = []
    flags_dirty: list[np.ndarray] = []
    present: list[np.ndarray] = []
    starts: list[int] = []
    sizes: list[int] = []
    filled = 0
    while filled < n_ptes:
        if rng.random() < hole_rate:
            k = int(rng.integers(1, 4))
            pfns.append(np.zeros(k, dtype=np.uint64))
            flags_dirty.append(np.zeros(k, dtype=bool))
            present.append(np.zeros(k, dtype=bool))
            filled += k
            continue
        order = int(rng.choice(folio_orders, p=weights))
        nr = 1 << order
        pfn = -(-next_pfn // nr) * nr
        next_pfn = pfn + nr + (nr if rng.random() < 0.3 else 0)
        starts.append(pfn)
        sizes.append(nr)
        lo, hi = 0, nr
        if nr > 1 and rng.random() < partial_rate:
            lo = int(rng.integers(0, nr))
            hi = int(rng.integers(lo + 1, nr + 1))
        run = np.arange(pfn + lo, pfn + hi, dtype=np.uint64)
        pfns.append(run)
        flags_dirty.append(np.full(len(run), rng.random() < dirty_rate))
        present.append(np.ones(len(run), dtype=bool))
        filled += len(run)
    all_pfns = np.concatenate(pfns)[:n_ptes]
    dirty = np.concatenate(flags_dirty)[:n_ptes]
    pres = np.concatenate(present)[:n_ptes]
    start_arr = np.array(starts, dtype=np.uint64)
    size_arr = np.array(sizes, dtype=np.uint64)
    cont: np.ndarray | bool = False
    if layout.has_contpte and len(start_arr):
        idx = np.searchsorted(start_arr, all_pfns, side="right") - 1
        first = start_arr[np.maximum(idx, 0)]
        npages = size_arr[np.maximum(idx, 0)]
        vpns = np.arange(first_vpn, first_vpn + n_ptes, dtype=np.uint64)
        cont = _cont_mask(layout, vpns, all_pfns, first, npages) & pres
        # A block folds only if all of its entries are present and mapped in sequence.
        n = layout.cont_ptes
        blocks = (vpns - vpns % np.uint64(n)).astype(np.int64)
        for b in np.unique(blocks[cont]):
            sel = blocks == b
            if sel.sum() != n or not np.all(np.diff(all_pfns[sel].astype(np.int64)) == 1):
                cont[sel] = False
    ptes = layout.mk_pte(all_pfns, present=pres, write=True, dirty=dirty, young=True, cont=cont)
    return GeneratedTable(ptes, start_arr, size_arr, first_vpn)


def _check_count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")


def unbacked_pfns(t: GeneratedTable) -> np.ndarray:
    """PFNs between the table's folios: as a XEN PV guest's ballooned-out frames they have
    no machine frame (``x86-64-xenpv``'s ``ballooned_pfns``)."""
    ends = t.folio_start[:-1] + t.folio_nr_pages[:-1]
    gaps = [np.arange(e, s, dtype=np.uint64) for e, s in zip(ends, t.folio_start[1:]) if s > e]
    if len(t.folio_start):
        last = int(t.folio_start[-1] + t.folio_nr_pages[-1])
        gaps.append(np.arange(last, last + 1, dtype=np.uint64))
    return np.concatenate(gaps) if gaps else np.zeros(0, dtype=np.uint64)

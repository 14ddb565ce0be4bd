"""The kernel's batched helpers as functions over numpy arrays you own.

The simulation's fork, zap and fault paths call these same functions (rust/src/pgtable.rs,
rmap.rs, fork.rs, zap.rs) on its own storage, so they give the simulation's results exactly.
Every function checks its arguments before it writes anything (``TypeError`` for a wrong
type or dtype, ``ValueError`` for a wrong shape, a read-only or non-contiguous array, or an
index out of range, each naming the argument), updates the arrays in place and releases the
GIL while it runs. docs/helpers.md describes the array layouts and what each models.

PTE helpers, over a ``uint64`` page table (entry 0 maps virtual page ``first_vpn``)::

    ptep_get, set_ptes, wrprotect_ptes, clear_full_ptes, get_and_clear_full_ptes

Folio reference and rmap helpers, over a :class:`FolioCounts`::

    folio_ref_add, folio_put_refs, folio_add_anon_rmap_ptes, folio_try_dup_anon_rmap_ptes,
    folio_dup_file_rmap_ptes, folio_remove_rmap_ptes

Whole page tables (``copy_page_range()`` of a fork, ``unmap_page_range()``)::

    copy_pte_range, zap_pte_range
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from ._core import (
    clear_full_ptes,
    copy_pte_range,
    folio_add_anon_rmap_ptes,
    folio_dup_file_rmap_ptes,
    folio_put_refs,
    folio_ref_add,
    folio_remove_rmap_ptes,
    folio_try_dup_anon_rmap_ptes,
    get_and_clear_full_ptes,
    ptep_get,
    set_ptes,
    wrprotect_ptes,
    zap_pte_range,
)

#: ``order`` of a free page.
FREE = 0xFF
#: Bits of ``FolioCounts.flags`` (the simulation's numbering): PG_anon_exclusive is per
#: page, the others are folio flags kept on the folio's first page.
PG_ANON_EXCLUSIVE = 1 << 0
PG_ANON = 1 << 1
PG_SWAPBACKED = 1 << 2
PG_FILE = 1 << 3
PG_DIRTY = 1 << 4
PG_PARTIALLY_MAPPED = 1 << 5
PG_MAYBE_SHARED = 1 << 6

#: Columns of ``Simulation.state()["large"]``.
LARGE_COLUMNS = ("head", "large_mapcount", "entire_mapcount", "nr_pages_mapped", "pincount",
                 "mm_id0", "mm_id1", "mm_id_mapcount0", "mm_id_mapcount1")


@dataclasses.dataclass(eq=False)
class FolioCounts:
    """The per-page and per-folio counts the rmap helpers read and write, one entry per pfn.

    Per page: ``order`` (uint8; the folio's order on every page of it, 255 on a free page),
    ``flags`` (uint8, ``PG_*``), ``mapcount`` (int32, mappings of the page: the kernel's
    ``_mapcount + 1``). Per folio, at the folio's first pfn (tail entries are left alone):
    ``refcount`` (int32), and for large folios ``large_mapcount`` (int32, the kernel's
    encoding: -1 = unmapped), ``nr_pages_mapped``, ``pincount`` (int32) and the v6.15 MM-ID
    slots ``mm_id`` (uint32, shape (n, 2), 0 = free slot) and ``mm_id_mapcount`` (int32,
    shape (n, 2), -1 = none). Every array must be C-contiguous and writeable.
    """

    order: np.ndarray
    flags: np.ndarray
    mapcount: np.ndarray
    refcount: np.ndarray
    large_mapcount: np.ndarray
    nr_pages_mapped: np.ndarray
    pincount: np.ndarray
    mm_id: np.ndarray
    mm_id_mapcount: np.ndarray

    @classmethod
    def empty(cls, nr_pages: int) -> FolioCounts:
        """``nr_pages`` free pages (order 255, counts zero, large fields at their empty values)."""
        n = int(nr_pages)
        if n < 0:
            raise ValueError(f"nr_pages must be non-negative, not {n}")
        return cls(
            order=np.full(n, FREE, np.uint8),
            flags=np.zeros(n, np.uint8),
            mapcount=np.zeros(n, np.int32),
            refcount=np.zeros(n, np.int32),
            large_mapcount=np.full(n, -1, np.int32),
            nr_pages_mapped=np.zeros(n, np.int32),
            pincount=np.zeros(n, np.int32),
            mm_id=np.zeros((n, 2), np.uint32),
            mm_id_mapcount=np.full((n, 2), -1, np.int32),
        )

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> FolioCounts:
        """Copies of the counts of ``Simulation.state()`` (the reference backend's too)."""
        n = len(state["order"])
        c = cls.empty(n)
        c.order[:] = state["order"]
        c.flags[:] = state["flags"]
        c.mapcount[:] = state["mapcount"]
        c.refcount[:] = state["refcount"]
        large = np.asarray(state["large"], dtype=np.int64).reshape(-1, len(LARGE_COLUMNS))
        heads = large[:, 0]
        c.large_mapcount[heads] = large[:, 1]
        c.nr_pages_mapped[heads] = large[:, 3]
        c.pincount[heads] = large[:, 4]
        c.mm_id[heads] = large[:, 5:7]
        c.mm_id_mapcount[heads] = large[:, 7:9]
        return c

    def large_table(self) -> np.ndarray:
        """The large folios as ``Simulation.state()["large"]`` lists them (entire_mapcount,
        which no PTE helper touches, as -1)."""
        order = self.order
        heads = np.flatnonzero((order != FREE) & (order > 0))
        heads = heads[(heads & ((1 << order[heads].astype(np.int64)) - 1)) == 0]
        out = np.empty((len(heads), len(LARGE_COLUMNS)), np.int64)
        out[:, 0] = heads
        out[:, 1] = self.large_mapcount[heads]
        out[:, 2] = -1
        out[:, 3] = self.nr_pages_mapped[heads]
        out[:, 4] = self.pincount[heads]
        out[:, 5:7] = self.mm_id[heads]
        out[:, 7:9] = self.mm_id_mapcount[heads]
        return out

    def copy(self) -> FolioCounts:
        return FolioCounts(**{f.name: getattr(self, f.name).copy() for f in dataclasses.fields(self)})

    def equal(self, other: FolioCounts) -> bool:
        """Whether every array of the two is equal."""
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name))
                   for f in dataclasses.fields(self))


__all__ = [
    "FREE",
    "LARGE_COLUMNS",
    "PG_ANON",
    "PG_ANON_EXCLUSIVE",
    "PG_DIRTY",
    "PG_FILE",
    "PG_MAYBE_SHARED",
    "PG_PARTIALLY_MAPPED",
    "PG_SWAPBACKED",
    "FolioCounts",
    "clear_full_ptes",
    "copy_pte_range",
    "folio_add_anon_rmap_ptes",
    "folio_dup_file_rmap_ptes",
    "folio_put_refs",
    "folio_ref_add",
    "folio_remove_rmap_ptes",
    "folio_try_dup_anon_rmap_ptes",
    "get_and_clear_full_ptes",
    "ptep_get",
    "set_ptes",
    "wrprotect_ptes",
    "zap_pte_range",
]

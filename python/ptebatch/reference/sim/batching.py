"""The simulation's calls of ``folio_pte_batch()``: the reference loops of :mod:`..batch`, run on
a VMA's PTE list, with the flags each caller passes (rust/src/batch.rs, ``FpbFlags``)."""

from __future__ import annotations

from ..._flags import (
    FPB_IGNORE_DIRTY,
    FPB_IGNORE_SOFT_DIRTY,
    FPB_MERGE_WRITE,
    FPB_RESPECT_DIRTY,
    FPB_RESPECT_SOFT_DIRTY,
    FPB_RESPECT_WRITE,
    IGNORE,
    RESPECT,
    FpbFlags,
    family_of,
)
from ..batch import _LOOPS, Batch, _PageTable


def fpb_flags(form: str, *, respect_dirty: bool = False, respect_soft_dirty: bool = False,
              respect_write: bool = False, merge_write: bool = False) -> FpbFlags:
    """The kernel flag bits of ``form``'s family that mean these canonical flags."""
    if family_of(form) == IGNORE:
        assert not (respect_write or merge_write), "no such flags before v6.17"
        flags = FpbFlags(IGNORE, 0)
        if not respect_dirty:
            flags = flags | FPB_IGNORE_DIRTY
        if not respect_soft_dirty:
            flags = flags | FPB_IGNORE_SOFT_DIRTY
        return flags
    flags = FpbFlags(RESPECT, 0)
    for wanted, flag in ((respect_dirty, FPB_RESPECT_DIRTY),
                         (respect_soft_dirty, FPB_RESPECT_SOFT_DIRTY),
                         (respect_write, FPB_RESPECT_WRITE),
                         (merge_write, FPB_MERGE_WRITE)):
        if wanted:
            flags = flags | flag
    return flags


def fork_flags(form: str, shared: bool, soft_dirty_tracking: bool) -> FpbFlags:
    """copy_present_ptes()'s flags — mm/memory.c: dirty unless shared, soft-dirty while tracking,
    and from v6.17 FPB_MERGE_WRITE."""
    return fpb_flags(form, respect_dirty=not shared, respect_soft_dirty=soft_dirty_tracking,
                     merge_write=family_of(form) == RESPECT)


def folio_pte_batch(l, form: str, ptes: list[int], first_vpn: int, start: int, max_nr: int,
                    folio_pfn: int, folio_nr_pages: int, flags: FpbFlags) -> Batch:
    """folio_pte_batch() of ``form`` over ``ptes[start:start + max_nr]`` (preconditions hold)."""
    table = _PageTable(ptes, l, form, first_vpn)
    return _LOOPS[form](table, start, max_nr, folio_pfn, folio_nr_pages, flags)

"""``folio_pte_batch()`` in each of its kernel forms, and the fork loop's cut (docs/semantics.md §3, §4).

A page table is modelled as a list ``T`` of PTE values; ``T[0]`` maps virtual page ``first_vpn``.
Every form's loop is its own small function below, so that they can be read side by side and
against the kernel's history:

========  ==============================  ============================================
form      kernels                          function
========  ==============================  ============================================
seed      the posted v3 fork series        :func:`_folio_pte_batch_seed`
v6.9      6.9                              :func:`_folio_pte_batch_v6_9`
v6.10     6.10 – 6.14                      :func:`_folio_pte_batch_v6_10`
v6.15     6.15, 6.16                       :func:`_folio_pte_batch_v6_15`
v6.17     6.17 – 7.0                       :func:`_folio_pte_batch_v6_17`
========  ==============================  ============================================
"""

from __future__ import annotations

import bisect
import operator
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from .._flags import (
    FPB_IGNORE_DIRTY,
    FPB_IGNORE_SOFT_DIRTY,
    FPB_MERGE_WRITE,
    FPB_MERGE_YOUNG_DIRTY,
    FPB_RESPECT_DIRTY,
    FPB_RESPECT_SOFT_DIRTY,
    FPB_RESPECT_WRITE,
    IGNORE,
    RESPECT,
    FpbFlags,
    family_of,
)
from .kernel import fpb_form
from .layouts import MASK64, RefLayout, _integer, _is_bool, _u64


@dataclass(frozen=True)
class Batch:
    """What one ``folio_pte_batch()`` call gives back.

    ``nr``: entries in the batch (>= 1). ``pte``: the first PTE as the caller ends up with it
    (merged under v6.17's ``FPB_MERGE_*``). ``any_writable`` / ``any_young`` / ``any_dirty``:
    the out-parameters of the version, ``None`` where the version has no such parameter.
    """

    nr: int
    pte: int
    any_writable: bool | None
    any_young: bool | None
    any_dirty: bool | None


# ============================================================================================
# Reading the page table
# ============================================================================================


class _PageTable:
    """The table ``T`` as one kernel version reads it: ``ptep_get()`` and ``pte_batch_hint()``."""

    def __init__(self, values: list[int], layout: RefLayout, form: str | None, first_vpn: int):
        self.values = values
        self.layout = layout
        self.form = form
        self.first_vpn = first_vpn

    def __len__(self) -> int:
        return len(self.values)

    def ptep_get(self, i: int) -> int:
        """ptep_get() — include/linux/pgtable.h; arm64 (6.9+): arch/arm64/include/asm/pgtable.h"""
        v = self.values[i]
        # arm64 gathers young/dirty over a contpte block from 6.9 on (the contpte series);
        # the seed series and 6.8 predate it and read the raw entry.
        if self.form not in (None, "seed") and self.layout.has_contpte and self.layout.pte_valid_cont(v):
            return self.contpte_ptep_get(i, v)
        return v

    def contpte_ptep_get(self, i: int, orig: int) -> int:
        """contpte_ptep_get(): OR in young/dirty of the aligned block — arch/arm64/mm/contpte.c"""
        lay = self.layout
        block_start = i - (self.first_vpn + i) % lay.cont_ptes
        inside = range(max(block_start, 0), min(block_start + lay.cont_ptes, len(self.values)))
        if any(lay.pte_dirty(self.values[j]) for j in inside):
            orig = lay.pte_mkdirty(orig)
        if any(lay.pte_young(self.values[j]) for j in inside):
            orig = lay.pte_mkyoung(orig)
        return orig

    def pte_batch_hint(self, i: int, v: int) -> int:
        """pte_batch_hint() of T[i] — include/linux/pgtable.h, arch/arm64/include/asm/pgtable.h

        The seed series steps one entry at a time (the hint arrived with the contpte series).
        """
        if self.form == "seed":
            return 1
        return self.layout.pte_batch_hint((self.first_vpn + i) & MASK64, v)


# ============================================================================================
# Normalisation: __pte_batch_clear_ignored()
# ============================================================================================


def _pte_batch_clear_ignored_v6_9(layout: RefLayout, v: int, flags: FpbFlags) -> int:
    """__pte_batch_clear_ignored(), FPB_IGNORE_* — mm/memory.c (seed, 6.9), mm/internal.h (6.10-6.16)"""
    if FPB_IGNORE_DIRTY in flags:
        v = layout.pte_mkclean(v)
    if FPB_IGNORE_SOFT_DIRTY in flags:
        v = layout.pte_clear_soft_dirty(v)
    return layout.pte_wrprotect(layout.pte_mkold(v))


def _pte_batch_clear_ignored_v6_17(layout: RefLayout, v: int, flags: FpbFlags) -> int:
    """__pte_batch_clear_ignored(), FPB_RESPECT_* — mm/internal.h (6.17+)"""
    if FPB_RESPECT_DIRTY not in flags:
        v = layout.pte_mkclean(v)
    if FPB_RESPECT_SOFT_DIRTY not in flags:
        v = layout.pte_clear_soft_dirty(v)
    if FPB_RESPECT_WRITE not in flags:
        v = layout.pte_wrprotect(v)
    return layout.pte_mkold(v)


def _pte_batch_clear_ignored(layout: RefLayout, v: int, flags: FpbFlags) -> int:
    """__pte_batch_clear_ignored() — the form that matches the flags' family."""
    if flags.family == RESPECT:
        return _pte_batch_clear_ignored_v6_17(layout, v, flags)
    return _pte_batch_clear_ignored_v6_9(layout, v, flags)


# ============================================================================================
# The loops, one per form
# ============================================================================================


def _folio_pte_batch_seed(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                          folio_nr_pages: int, flags: FpbFlags) -> Batch:
    """folio_pte_batch() of the seed series (v3, patches 13-15, as posted) — mm/memory.c"""
    lay = t.layout
    end = folio_pfn + folio_nr_pages
    first = t.ptep_get(start)
    any_writable = False

    expected = _pte_batch_clear_ignored(lay, lay.pte_advance_pfn(first, 1), flags)  # pte_next_pfn()
    i = start + 1
    while i < start + max_nr:
        cur = t.ptep_get(i)
        if _pte_batch_clear_ignored(lay, cur, flags) != expected:
            break
        if lay.pte_pfn(cur) == end:  # first page of a physically adjacent next folio
            break
        any_writable |= lay.pte_write(cur)
        expected = lay.pte_advance_pfn(expected, 1)
        i += 1
    return Batch(i - start, first, any_writable, None, None)


def _folio_pte_batch_v6_9(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                          folio_nr_pages: int, flags: FpbFlags) -> Batch:
    """folio_pte_batch() of 6.9: pte_batch_hint() steps, end test >= — mm/internal.h (v6.9)"""
    lay = t.layout
    end = folio_pfn + folio_nr_pages
    first = t.ptep_get(start)
    any_writable = False

    nr = t.pte_batch_hint(start, first)
    expected = _pte_batch_clear_ignored(lay, lay.pte_advance_pfn(first, nr), flags)
    i = start + nr
    while i < start + max_nr:
        cur = t.ptep_get(i)
        if _pte_batch_clear_ignored(lay, cur, flags) != expected:
            break
        if lay.pte_pfn(cur) >= end:
            break
        any_writable |= lay.pte_write(cur)
        step = t.pte_batch_hint(i, cur)
        expected = lay.pte_advance_pfn(expected, step)
        i += step
    return Batch(min(i - start, max_nr), first, any_writable, None, None)


def _folio_pte_batch_v6_10(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                           folio_nr_pages: int, flags: FpbFlags) -> Batch:
    """folio_pte_batch() of 6.10-6.14: v6.9 plus any_young, any_dirty — mm/internal.h"""
    lay = t.layout
    end = folio_pfn + folio_nr_pages
    first = t.ptep_get(start)
    any_writable = any_young = any_dirty = False

    nr = t.pte_batch_hint(start, first)
    expected = _pte_batch_clear_ignored(lay, lay.pte_advance_pfn(first, nr), flags)
    i = start + nr
    while i < start + max_nr:
        cur = t.ptep_get(i)
        if _pte_batch_clear_ignored(lay, cur, flags) != expected:
            break
        if lay.pte_pfn(cur) >= end:
            break
        any_writable |= lay.pte_write(cur)
        any_young |= lay.pte_young(cur)
        any_dirty |= lay.pte_dirty(cur)
        step = t.pte_batch_hint(i, cur)
        expected = lay.pte_advance_pfn(expected, step)
        i += step
    return Batch(min(i - start, max_nr), first, any_writable, any_young, any_dirty)


def _folio_pte_batch_v6_15(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                           folio_nr_pages: int, flags: FpbFlags) -> Batch:
    """folio_pte_batch() of 6.15-6.16: max_nr clamped to the folio up front (XEN PV fix) — mm/internal.h"""
    lay = t.layout
    end = folio_pfn + folio_nr_pages
    first = t.ptep_get(start)
    any_writable = any_young = any_dirty = False

    max_nr = min(max_nr, end - lay.pte_pfn(first))
    nr = t.pte_batch_hint(start, first)
    expected = _pte_batch_clear_ignored(lay, lay.pte_advance_pfn(first, nr), flags)
    while nr < max_nr:
        cur = t.ptep_get(start + nr)
        if _pte_batch_clear_ignored(lay, cur, flags) != expected:
            break
        any_writable |= lay.pte_write(cur)
        any_young |= lay.pte_young(cur)
        any_dirty |= lay.pte_dirty(cur)
        step = t.pte_batch_hint(start + nr, cur)
        expected = lay.pte_advance_pfn(expected, step)
        nr += step
    return Batch(min(nr, max_nr), first, any_writable, any_young, any_dirty)


def _folio_pte_batch_v6_17(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                           folio_nr_pages: int, flags: FpbFlags) -> Batch:
    """folio_pte_batch_flags() of 6.17+: FPB_RESPECT_* / FPB_MERGE_* — mm/internal.h"""
    lay = t.layout
    end = folio_pfn + folio_nr_pages
    first = t.ptep_get(start)
    any_writable = any_young = any_dirty = False

    max_nr = min(max_nr, end - lay.pte_pfn(first))
    nr = t.pte_batch_hint(start, first)
    expected = _pte_batch_clear_ignored(lay, lay.pte_advance_pfn(first, nr), flags)
    while nr < max_nr:
        cur = t.ptep_get(start + nr)
        if _pte_batch_clear_ignored(lay, cur, flags) != expected:
            break
        any_writable |= lay.pte_write(cur)
        any_young |= lay.pte_young(cur)
        any_dirty |= lay.pte_dirty(cur)
        step = t.pte_batch_hint(start + nr, cur)
        expected = lay.pte_advance_pfn(expected, step)
        nr += step

    pte = first  # the caller's copy, *ptentp
    if FPB_MERGE_WRITE in flags and any_writable:
        pte = lay.pte_mkwrite(pte)
    if FPB_MERGE_YOUNG_DIRTY in flags:
        if any_young:
            pte = lay.pte_mkyoung(pte)
        if any_dirty:
            pte = lay.pte_mkdirty(pte)
    return Batch(min(nr, max_nr), pte, None, None, None)


_LOOPS = {
    "seed": _folio_pte_batch_seed,
    "v6.9": _folio_pte_batch_v6_9,
    "v6.10": _folio_pte_batch_v6_10,
    "v6.15": _folio_pte_batch_v6_15,
    "v6.17": _folio_pte_batch_v6_17,
}


# ============================================================================================
# Argument checking
# ============================================================================================


def _batching_form(kernel: str) -> str:
    """The folio_pte_batch form of ``kernel``; ValueError for 6.8, which has none."""
    form = fpb_form(kernel)
    if form is None:
        raise ValueError(
            f"kernel {kernel!r} has no folio_pte_batch (it arrived in 6.9): "
            "fork copies one PTE at a time there"
        )
    return form


def _check_layout(layout: object) -> RefLayout:
    if not isinstance(layout, RefLayout):
        raise TypeError(
            f"layout must be a reference layout from ptebatch.reference.layout(), "
            f"got {type(layout).__name__}"
        )
    return layout


def _flags_for(form: str | None, flags: object, *, check_family: bool = True) -> FpbFlags:
    """``flags`` as an FpbFlags of the form's family (0 or None: no flags)."""
    family = family_of(form)
    if isinstance(flags, FpbFlags):
        if check_family and flags.family != family:
            kernels = "6.17 and newer" if flags.family == RESPECT else "the seed series to 6.16"
            raise ValueError(
                f"flags {flags!r} belong to {kernels}, not to the {form} form of folio_pte_batch"
            )
        return flags
    if flags is None:
        return FpbFlags(family, 0)
    if _is_bool(flags):
        raise TypeError("flags must be an FpbFlags (e.g. FPB_IGNORE_DIRTY), 0 or None, got bool")
    try:
        number = operator.index(flags)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"flags must be an FpbFlags (e.g. FPB_IGNORE_DIRTY), 0 or None, "
            f"got {type(flags).__name__}"
        ) from None
    if number != 0:
        raise TypeError(
            f"flags={number} is a plain int; pass FpbFlags constants (FPB_IGNORE_* up to 6.16, "
            "FPB_RESPECT_*/FPB_MERGE_* from 6.17): the same bits mean different flags there"
        )
    return FpbFlags(family, 0)


def _sequence(values: Any, what: str, dtype: str) -> Iterable[Any]:
    """``values`` if it is a one-dimensional sequence to read item by item: a numpy array must
    have the ``dtype`` (no silent conversion) and be C-contiguous, and strings, mappings and
    sets are refused."""
    if isinstance(values, (str, bytes, bytearray, dict, set, frozenset)) or not hasattr(values, "__len__"):
        raise TypeError(f"{what} must be a one-dimensional numpy {dtype} array or a list of ints, "
                        f"not {type(values).__name__}")
    ndim = getattr(values, "ndim", 1)
    if ndim != 1:
        raise ValueError(f"{what} must be one-dimensional, got {ndim} dimensions")
    dt = getattr(values, "dtype", None)
    if dt is not None and str(dt) != dtype:
        raise TypeError(f"{what} must be a numpy {dtype} array, got dtype {dt} "
                        f"(use np.asarray(x, dtype=np.{dtype}))")
    flags = getattr(values, "flags", None)
    if dt is not None and flags is not None and not flags.c_contiguous:
        # The Rust core borrows tables without copying; both refuse a strided view alike.
        raise ValueError(f"{what} must be C-contiguous (a page table is one run of entries); "
                         "use np.ascontiguousarray")
    return values


def _table_values(ptes: object, what: str = "ptes") -> list[int]:
    """The PTEs as a list of ints in 0..2**64-1 (a sequence of ints, or a 1-D numpy uint64 array)."""
    return [_u64(v, f"{what}[{i}]") for i, v in enumerate(_sequence(ptes, what, "uint64"))]


def _bool(value: object, what: str) -> bool:
    if not _is_bool(value):
        raise TypeError(f"{what} must be a bool, not {type(value).__name__}")
    return bool(value)


def _check_folio(folio_pfn: int, folio_nr_pages: int, pfn_what: str, nr_what: str) -> None:
    """Folios are naturally aligned powers of two (the buddy allocator hands out 2**order
    pages at a multiple of their size): anything else cannot come from a kernel."""
    if folio_nr_pages & (folio_nr_pages - 1) or folio_nr_pages == 0:
        raise ValueError(f"{nr_what}={folio_nr_pages} is not a power of two: a folio has 2**order pages")
    if folio_pfn % folio_nr_pages:
        raise ValueError(f"{pfn_what}={folio_pfn:#x} is not a multiple of {nr_what}={folio_nr_pages}: "
                         "folios are naturally aligned")


def _index(value: object, what: str) -> int:
    """A non-negative int (TypeError for bools and non-integers, ValueError below 0)."""
    number = _integer(value, what)
    if number < 0:
        raise ValueError(f"{what} must be a non-negative integer, not {number}")
    return number


def _map_values(pfn_to_folio: object) -> list[int]:
    """``pfn_to_folio`` as a list (a sequence of ints, or a 1-D numpy int64 array)."""
    entries = _sequence(pfn_to_folio, "pfn_to_folio", "int64")
    return [_map_entry(k, f"pfn_to_folio[{pfn}]") for pfn, k in enumerate(entries)]


def _map_entry(value: object, what: str) -> int:
    """An entry of ``pfn_to_folio``: -1 (no folio) or a folio index that fits int64."""
    number = _integer(value, what)
    if not -1 <= number < 1 << 63:
        raise ValueError(f"{what} must be -1 or a folio index, not {number}")
    return number


def _check_preconditions(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                         folio_nr_pages: int) -> None:
    """The preconditions of docs/semantics.md §3 (the kernel's VM_WARN_ONs), as ValueErrors."""
    lay = t.layout
    if not 0 <= start < len(t):
        raise ValueError(f"start={start} is not an index of the table (length {len(t)})")
    if not 1 <= max_nr <= len(t) - start:
        raise ValueError(
            f"max_nr={max_nr} must be between 1 and the {len(t) - start} entries "
            f"from start={start} to the end of the table"
        )
    if folio_nr_pages < 2:
        raise ValueError(
            f"folio_nr_pages={folio_nr_pages}: folio_pte_batch only batches large folios (>= 2 pages)"
        )
    _check_folio(folio_pfn, folio_nr_pages, "folio_pfn", "folio_nr_pages")
    first = t.ptep_get(start)
    if not lay.pte_present(first):
        raise ValueError(f"the PTE at start={start} ({first:#x}) is not present")
    pfn = lay.pte_pfn(first)
    if not folio_pfn <= pfn < folio_pfn + folio_nr_pages:
        raise ValueError(
            f"the PTE at start={start} maps pfn {pfn:#x}, outside the folio "
            f"[{folio_pfn:#x}, {folio_pfn + folio_nr_pages:#x})"
        )


# ============================================================================================
# Public API
# ============================================================================================


def folio_pte_batch(
    ptes: Sequence[int],
    start: int | None,
    max_nr: int | None,
    folio_pfn: int,
    folio_nr_pages: int,
    layout: RefLayout,
    kernel: str,
    flags: FpbFlags | int | None = 0,
    first_vpn: int | None = 0,
) -> Batch:
    """Batch the PTEs ``ptes[start:start+max_nr]`` that map consecutive pages of one folio.

    docs/semantics.md §3. ``flags`` must be of the kernel's family (``FPB_IGNORE_*`` up to
    6.16, ``FPB_RESPECT_*`` / ``FPB_MERGE_*`` from 6.17); ``0`` or ``None`` means no flags.
    ``start`` None is 0, ``max_nr`` None the rest of the table, ``first_vpn`` None 0.
    """
    form = _batching_form(kernel)
    layout = _check_layout(layout)
    fpb_flags = _flags_for(form, flags)
    values = _table_values(ptes)
    start = 0 if start is None else _index(start, "start")
    max_nr = max(len(values) - start, 0) if max_nr is None else _index(max_nr, "max_nr")
    folio_pfn = _u64(folio_pfn, "folio_pfn")
    folio_nr_pages = _u64(folio_nr_pages, "folio_nr_pages")
    first_vpn = 0 if first_vpn is None else _u64(first_vpn, "first_vpn")
    t = _PageTable(values, layout, form, first_vpn)
    return _folio_pte_batch(t, start, max_nr, folio_pfn, folio_nr_pages, fpb_flags)


def _folio_pte_batch(t: _PageTable, start: int, max_nr: int, folio_pfn: int,
                     folio_nr_pages: int, flags: FpbFlags) -> Batch:
    _check_preconditions(t, start, max_nr, folio_pfn, folio_nr_pages)
    return _LOOPS[t.form](t, start, max_nr, folio_pfn, folio_nr_pages, flags)


def fork_flags(kernel: str, shared: bool = False, soft_dirty_tracking: bool = False) -> FpbFlags:
    """The flags fork's copy_present_ptes() passes to folio_pte_batch — mm/memory.c

    ``shared``: the source VMA is VM_SHARED. ``soft_dirty_tracking``: soft-dirty tracking is
    on for it (``vma_soft_dirty_enabled()``).
    """
    shared, soft_dirty_tracking = _bool(shared, "shared"), _bool(soft_dirty_tracking, "soft_dirty_tracking")
    form = _batching_form(kernel)
    if family_of(form) == IGNORE:  # seed ... 6.16
        flags = FpbFlags(IGNORE, 0)
        if shared:
            flags = flags | FPB_IGNORE_DIRTY
        if not soft_dirty_tracking:
            flags = flags | FPB_IGNORE_SOFT_DIRTY
        return flags
    flags = FPB_MERGE_WRITE  # 6.17+
    if not shared:
        flags = flags | FPB_RESPECT_DIRTY
    if soft_dirty_tracking:
        flags = flags | FPB_RESPECT_SOFT_DIRTY
    return flags


class _Folios:
    """The folios, sorted and non-overlapping, with an optional pfn -> folio index table."""

    def __init__(self, folio_start: list[int], folio_nr_pages: list[int],
                 pfn_to_folio: list[int] | None) -> None:
        """The arguments are already read (:func:`_table_values`, :func:`_map_values`)."""
        self.starts = folio_start
        self.nr_pages = folio_nr_pages
        if len(self.starts) != len(self.nr_pages):
            raise ValueError(
                f"folio_start has {len(self.starts)} entries but folio_nr_pages has "
                f"{len(self.nr_pages)}"
            )
        for k, n in enumerate(self.nr_pages):
            if n < 1:
                raise ValueError(f"folio_nr_pages[{k}]={n}: a folio has at least one page")
        for k in range(1, len(self.starts)):
            if self.starts[k - 1] + self.nr_pages[k - 1] > self.starts[k]:
                raise ValueError(
                    f"folios {k - 1} and {k} are not sorted by start and non-overlapping: "
                    f"[{self.starts[k - 1]:#x}, +{self.nr_pages[k - 1]}) then "
                    f"[{self.starts[k]:#x}, +{self.nr_pages[k]})"
                )
        for k, (s, n) in enumerate(zip(self.starts, self.nr_pages)):
            if s + n > MASK64:
                raise ValueError(f"folio {k}: start {s:#x} + {n} pages overflows")
            _check_folio(s, n, f"folio_start[{k}]", f"folio_nr_pages[{k}]")
        self.pfn_to_folio = None
        if pfn_to_folio is not None:
            table = pfn_to_folio
            for pfn, k in enumerate(table):
                if k == -1:
                    continue
                if not 0 <= k < len(self.starts):
                    raise ValueError(
                        f"pfn_to_folio[{pfn}]={k} is neither -1 nor a folio index "
                        f"(there are {len(self.starts)} folios)"
                    )
                if not self.starts[k] <= pfn < self.starts[k] + self.nr_pages[k]:
                    raise ValueError(
                        f"pfn_to_folio[{pfn}]={k} but folio {k} is "
                        f"[{self.starts[k]:#x}, +{self.nr_pages[k]}), which does not contain pfn {pfn:#x}"
                    )
            # The map is a lookup table for the folio arrays and must agree with them: a folio
            # only partly in it would be copied page by page from where it is cut.
            for k, (s, n) in enumerate(zip(self.starts, self.nr_pages)):
                for pfn in range(s, s + n):
                    got = table[pfn] if pfn < len(table) else None
                    if got != k:
                        what = (f"pfn_to_folio has only {len(table)} entries" if got is None
                                else f"pfn_to_folio[{pfn:#x}]={got}")
                        raise ValueError(f"{what}, but folio {k} is [{s:#x}, {s + n:#x}): pfn_to_folio "
                                         "must map every page of every folio to its index")
            self.pfn_to_folio = table

    def lookup(self, pfn: int) -> tuple[int, int] | None:
        """``(folio_pfn, folio_nr_pages)`` of the folio holding ``pfn``, or None."""
        if self.pfn_to_folio is not None:
            if pfn >= len(self.pfn_to_folio):
                return None
            k = self.pfn_to_folio[pfn]
            return None if k == -1 else (self.starts[k], self.nr_pages[k])
        k = bisect.bisect_right(self.starts, pfn) - 1
        if k >= 0 and pfn < self.starts[k] + self.nr_pages[k]:
            return (self.starts[k], self.nr_pages[k])
        return None


def _copy_present_ptes_nr(t: _PageTable, i: int, folios: _Folios, flags: FpbFlags | None) -> int:
    """How many entries fork copies at T[i]: copy_pte_range() / copy_present_ptes() — mm/memory.c"""
    lay = t.layout
    v = t.ptep_get(i)
    if lay.pte_none(v) or not lay.pte_present(v) or lay.pte_special(v):
        return 1  # empty, non-present (copy_nonpresent_pte), or no folio (vm_normal_page NULL)
    folio = folios.lookup(lay.pte_pfn(v))
    if folio is None:
        return 1
    folio_pfn, folio_nr_pages = folio
    if folio_nr_pages == 1:
        return 1  # small folio: single-PTE path
    if t.form is None:
        return 1  # 6.8: copy_present_pte(), one PTE at a time
    max_nr = min(lay.ptrs_per_pte - (t.first_vpn + i) % lay.ptrs_per_pte, len(t) - i)
    if max_nr == 1:
        return 1
    return _folio_pte_batch(t, i, max_nr, folio_pfn, folio_nr_pages, flags).nr


def batch_lengths(
    ptes: Sequence[int],
    layout: RefLayout,
    kernel: str,
    folio_start: Sequence[int],
    folio_nr_pages: Sequence[int],
    pfn_to_folio: Sequence[int] | None = None,
    first_vpn: int | None = 0,
    flags: FpbFlags | int | None = None,
    shared: bool = False,
    soft_dirty_tracking: bool = False,
) -> list[int]:
    """The lengths in which fork's PTE loop copies the table ``ptes``, in order (§4).

    The lengths add up to ``len(ptes)``. ``flags``, if not None, replaces the fork flags
    (:func:`fork_flags`); ``shared`` and ``soft_dirty_tracking`` choose those.
    """
    shared, soft_dirty_tracking = _bool(shared, "shared"), _bool(soft_dirty_tracking, "soft_dirty_tracking")
    form = fpb_form(kernel)
    layout = _check_layout(layout)
    if soft_dirty_tracking and not layout.has_soft_dirty:
        raise ValueError(f"soft_dirty_tracking=True, but {layout.name} has no soft-dirty bit")
    if flags is not None:
        # Under 6.8 nothing is batched; the flags are only checked for their type.
        fpb_flags = _flags_for(form, flags, check_family=form is not None)
    elif form is not None:
        fpb_flags = fork_flags(kernel, shared=shared, soft_dirty_tracking=soft_dirty_tracking)
    else:
        fpb_flags = None
    # Every argument is read before any is checked against another, in the binding's order.
    values = _table_values(ptes)
    starts = _table_values(folio_start, "folio_start")
    nr_pages = _table_values(folio_nr_pages, "folio_nr_pages")
    table = None if pfn_to_folio is None else _map_values(pfn_to_folio)
    t = _PageTable(values, layout, form, 0 if first_vpn is None else _u64(first_vpn, "first_vpn"))
    folios = _Folios(starts, nr_pages, table)

    lengths = []
    i = 0
    while i < len(t):
        nr = _copy_present_ptes_nr(t, i, folios, fpb_flags)
        lengths.append(nr)
        i += nr
    return lengths

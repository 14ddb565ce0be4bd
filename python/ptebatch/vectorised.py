"""The fork loop's cut (``pb.batch_lengths``) written as a Python user would write it with numpy.

This is the contender ``ptebatch bench`` times against the Rust core: no Python loop over the
PTEs, only whole-array operations, in the spirit of the kernel's ``tools/mm/thpmaps`` (PFN
differences and masked bits). It gives exactly ``pb.batch_lengths()``'s result (docs/semantics.md
§4; tests/test_vectorised.py checks it with hypothesis) for every layout and kernel, except
``x86-64-xenpv`` (``NotImplementedError``, see :func:`batch_lengths_numpy`).

Why neighbours suffice. With a batch hint of 1 (every layout but arm64, and arm64 without a
valid ``PTE_CONT`` entry or under the seed series), ``folio_pte_batch`` compares entry ``k``
with ``advance(norm(entry k-1), 1)``, and (by induction from the batch's first entry) the folio
of entry ``k-1`` is the folio of the batch: its end test, and v6.15's clamp of ``max_nr`` to
the folio, both say "``pfn(k)`` still inside the folio of entry ``k-1``". So whether the batch
that holds ``k-1`` goes on to ``k`` depends on ``k-1`` and ``k`` alone, and the cut is a
run-length encoding of one boolean array ``link``. arm64 contpte hints skip entries; that case
is two pointer chases (:func:`_contpte_lengths`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import numpy as np

import ptebatch as pb
from ptebatch._flags import (
    FPB_IGNORE_DIRTY,
    FPB_IGNORE_SOFT_DIRTY,
    FPB_RESPECT_DIRTY,
    FPB_RESPECT_SOFT_DIRTY,
    FPB_RESPECT_WRITE,
    IGNORE,
    FpbFlags,
)

U64 = np.uint64


def _bit(n: int) -> np.uint64:
    return U64(1 << n)


def _field(lo: int, hi: int) -> np.uint64:
    """Bits lo..hi inclusive."""
    return U64(((1 << (hi + 1)) - 1) & ~((1 << lo) - 1))


class _Arch(ABC):
    """The accessors the cut needs, on whole arrays (docs/semantics.md §1.2)."""

    shift: int
    fn: np.uint64
    soft_dirty: np.uint64 = U64(0)
    special: np.uint64

    def pfn(self, v: np.ndarray) -> np.ndarray:
        return (v & self.fn) >> U64(self.shift)

    def next_pfn(self, v: np.ndarray) -> np.ndarray:
        return v + U64(1 << self.shift)

    def clear_soft_dirty(self, v: np.ndarray) -> np.ndarray:
        return v & ~self.soft_dirty

    def is_special(self, v: np.ndarray) -> np.ndarray:
        return (v & self.special) != 0

    @abstractmethod
    def none(self, v: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def present(self, v: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def mkclean(self, v: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def wrprotect(self, v: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def mkold(self, v: np.ndarray) -> np.ndarray: ...


class _X86(_Arch):
    shift, fn = 12, _field(12, 51)
    P, RW, A, D, PROTNONE, special, soft_dirty, SAVED = (_bit(0), _bit(1), _bit(5), _bit(6), _bit(8),
                                                        _bit(9), _bit(11), _bit(58))

    def _inverted(self, v):
        return (v != 0) & ((v & self.P) == 0)

    def pfn(self, v):
        inv = np.where(self._inverted(v), ~U64(0), U64(0))
        return ((v ^ inv) & self.fn) >> U64(12)

    def next_pfn(self, v):
        step = U64(1 << 12)
        return np.where(self._inverted(v), v - step, v + step)

    def none(self, v):
        return (v & ~(self.A | self.D)) == 0

    def present(self, v):
        return (v & (self.P | self.PROTNONE)) != 0

    def mkclean(self, v):
        return v & ~(self.D | self.SAVED)

    def wrprotect(self, v):
        v = v & ~self.RW
        return np.where((v & self.D) != 0, (v & ~self.D) | self.SAVED, v)

    def mkold(self, v):
        return v & ~self.A


class _Arm64(_Arch):
    VALID, RDONLY, AF, NG, WRITE, CONT, DIRTY, special = (_bit(0), _bit(7), _bit(10), _bit(11), _bit(51),
                                                          _bit(52), _bit(55), _bit(56))

    def __init__(self, page_shift: int) -> None:
        self.shift, self.fn = page_shift, _field(page_shift, 49)

    def next_pfn(self, v):
        # arm64 rebuilds the PTE from its PFN (pte_advance_pfn, wrapping)
        return (v & ~self.fn) | ((self.pfn(v) + U64(1)) << U64(self.shift))

    def none(self, v):
        return v == 0

    def present(self, v):
        return (v & (self.VALID | self.NG)) != 0

    def mkclean(self, v):
        return (v & ~self.DIRTY) | self.RDONLY

    def wrprotect(self, v):
        hw_dirty = ((v & self.WRITE) != 0) & ((v & self.RDONLY) == 0)
        v = np.where(hw_dirty, v | self.DIRTY, v)
        return (v & ~self.WRITE) | self.RDONLY

    def mkold(self, v):
        return v & ~self.AF


class _Riscv(_Arch):
    shift, fn = 10, _field(10, 53)
    V, W, PROT_NONE, A, D, special = _bit(0), _bit(2), _bit(5), _bit(6), _bit(7), _bit(8)

    def __init__(self, soft_dirty: bool) -> None:
        self.soft_dirty = _bit(59) if soft_dirty else U64(0)

    def none(self, v):
        return v == 0

    def present(self, v):
        return (v & (self.V | self.PROT_NONE)) != 0

    def mkclean(self, v):
        return v & ~self.D

    def wrprotect(self, v):
        return v & ~self.W

    def mkold(self, v):
        return v & ~self.A


class _Ppc64(_Arch):
    WRITE, DIRTY, ACCESSED, soft_dirty, special = _bit(1), _bit(7), _bit(8), _bit(9), _bit(10)
    INVALID, PTE, PRESENT = _bit(61), _bit(62), _bit(63)

    def __init__(self, page_shift: int) -> None:
        self.shift, self.fn = page_shift, _field(page_shift, 52)

    def none(self, v):
        return (v & ~(self.DIRTY | self.ACCESSED)) == 0

    def present(self, v):
        both = self.INVALID | self.PTE
        return ((v & self.PRESENT) != 0) | ((v & both) == both)

    def mkclean(self, v):
        return v & ~self.DIRTY

    def wrprotect(self, v):
        return v & ~self.WRITE

    def mkold(self, v):
        return v & ~self.ACCESSED


class _S390(_Arch):
    shift, fn = 12, _field(12, 63)
    PRESENT, soft_dirty, YOUNG, DIRTY, WRITE, special = _bit(0), _bit(1), _bit(2), _bit(3), _bit(5), _bit(6)
    PROTECT, INVALID = _bit(9), _bit(10)

    def none(self, v):
        return v == _bit(10)

    def present(self, v):
        return (v & self.PRESENT) != 0

    def mkclean(self, v):
        return (v & ~self.DIRTY) | self.PROTECT

    def wrprotect(self, v):
        return (v & ~self.WRITE) | self.PROTECT

    def mkold(self, v):
        return (v & ~self.YOUNG) | self.INVALID


class _Loongarch(_Arch):
    shift, fn = 14, _field(14, 47)
    VALID, DIRTY, GLOBAL, WRITE, MODIFIED, PROTNONE, special = (_bit(0), _bit(1), _bit(6), _bit(8),
                                                                 _bit(9), _bit(10), _bit(11))
    PRESENT = _bit(7)

    def none(self, v):
        return (v & ~self.GLOBAL) == 0

    def present(self, v):
        return (v & (self.PRESENT | self.PROTNONE)) != 0

    def mkclean(self, v):
        return v & ~(self.DIRTY | self.MODIFIED)

    def wrprotect(self, v):
        return v & ~(self.WRITE | self.DIRTY)

    def mkold(self, v):
        return v & ~self.VALID


_ARCHES: dict[str, Callable[[], _Arch]] = {
    "x86-64": _X86,
    "arm64-4k": lambda: _Arm64(12),
    "arm64-16k": lambda: _Arm64(14),
    "arm64-64k": lambda: _Arm64(16),
    "riscv64": lambda: _Riscv(False),
    "riscv64-svrsw60t59b": lambda: _Riscv(True),
    "ppc64-4k": lambda: _Ppc64(12),
    "ppc64-64k": lambda: _Ppc64(16),
    "s390x": _S390,
    "loongarch64": _Loongarch,
}

#: Layouts this module computes exactly; the others raise NotImplementedError.
SUPPORTED_LAYOUTS = tuple(_ARCHES)


def _normalise(a: _Arch, v: np.ndarray, flags: FpbFlags) -> np.ndarray:
    """__pte_batch_clear_ignored() of the flags' family, on a whole array."""
    if flags.family == IGNORE:
        if FPB_IGNORE_DIRTY in flags:
            v = a.mkclean(v)
        if FPB_IGNORE_SOFT_DIRTY in flags:
            v = a.clear_soft_dirty(v)
        return a.wrprotect(a.mkold(v))
    if FPB_RESPECT_DIRTY not in flags:
        v = a.mkclean(v)
    if FPB_RESPECT_SOFT_DIRTY not in flags:
        v = a.clear_soft_dirty(v)
    if FPB_RESPECT_WRITE not in flags:
        v = a.wrprotect(v)
    return a.mkold(v)


def _u64_array(values: object, what: str) -> np.ndarray:
    if not isinstance(values, np.ndarray):
        raise TypeError(f"{what} must be a numpy uint64 array, not {type(values).__name__}")
    if values.dtype != np.uint64 or values.ndim != 1:
        raise TypeError(f"{what} must be a one-dimensional numpy uint64 array, got {values.dtype} "
                        f"with {values.ndim} dimensions")
    return values


def batch_lengths_numpy(ptes: np.ndarray, layout: pb.Layout, kernel: str, folio_start: np.ndarray,
                        folio_nr_pages: np.ndarray, first_vpn: int = 0, flags: FpbFlags | None = None,
                        shared: bool = False, soft_dirty_tracking: bool = False) -> np.ndarray:
    """``pb.batch_lengths(ptes, layout, kernel, folio_start, folio_nr_pages, first_vpn=..., flags=...,
    shared=..., soft_dirty_tracking=...)`` with numpy only: the same int64 array of lengths.

    Arguments are those of ``pb.batch_lengths`` (no ``pfn_to_folio``); the arrays must be
    one-dimensional ``uint64``, the folios sorted and non-overlapping (not checked here: this is
    the contender, the Rust core is the checked API).

    ``NotImplementedError`` for ``x86-64-xenpv``: ``pte_advance_pfn`` of a ballooned PFN gives
    ``pte_none``, so the next expected entry is not the previous one plus a page.

    arm64 tables with valid ``PTE_CONT`` entries under 6.9 and newer, whose batch hints skip to
    the end of each contpte block, take a slower path (:func:`_contpte_lengths`).
    """
    if not isinstance(layout, pb.Layout):
        raise TypeError(f"layout must be a ptebatch Layout (pb.layout(name)), not {type(layout).__name__}")
    name = layout.name
    if name not in _ARCHES:
        raise NotImplementedError(
            f"batch_lengths_numpy does not model {name}: its pte_advance_pfn() is not arithmetic on the "
            "PFN (ballooned PFNs give pte_none), so the cut is not a neighbour test")
    form = pb.fpb_form(kernel)
    v = _u64_array(ptes, "ptes")
    starts = _u64_array(folio_start, "folio_start")
    sizes = _u64_array(folio_nr_pages, "folio_nr_pages")
    if len(starts) != len(sizes):
        raise ValueError(f"folio_start has {len(starts)} entries but folio_nr_pages has {len(sizes)}")
    n = len(v)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if form is None:  # 6.8: one PTE at a time
        return np.ones(n, dtype=np.int64)
    if flags is None:
        flags = pb.fork_flags(kernel, shared=shared, soft_dirty_tracking=soft_dirty_tracking)
    elif not isinstance(flags, FpbFlags) or flags.family != pb.fork_flags(kernel).family:
        raise ValueError(f"flags {flags!r} are not FpbFlags of kernel {kernel}'s family")
    a = _ARCHES[name]()

    # ptep_get(): arm64 from 6.9 ORs the young/dirty state of its contpte block into a valid
    # PTE_CONT entry (contpte_ptep_get); the seed series reads the raw entry.
    hint = None
    if isinstance(a, _Arm64) and form != "seed":
        v, hint = _contpte_ptep_get(a, v, first_vpn, layout.cont_ptes)

    # Eligible first entries of a batch (copy_present_ptes): present, not special, in a large folio.
    pfn = a.pfn(v)
    k = np.searchsorted(starts, pfn, side="right") - 1
    kk = np.maximum(k, 0)
    fstart = starts[kk] if len(starts) else np.zeros(n, dtype=U64)
    fsize = sizes[kk] if len(starts) else np.zeros(n, dtype=U64)
    in_folio = (k >= 0) & (pfn >= fstart) & (pfn - fstart < fsize)
    eligible = a.present(v) & ~a.none(v) & ~a.is_special(v) & in_folio & (fsize > 1)
    norm = _normalise(a, v, flags)
    ptrs = layout.ptrs_per_pte
    if hint is not None:
        assert isinstance(a, _Arm64)
        return _contpte_lengths(a, form, norm, pfn, fstart, fsize, eligible, hint, first_vpn, ptrs)

    # link[k]: the batch that holds entry k-1 goes on to entry k ...
    link = np.zeros(n, dtype=bool)
    link[1:] = (norm[1:] == a.next_pfn(norm[:-1])) & eligible[:-1]
    # ... while its PFN stays in the folio of entry k-1 (end test; v6.15's clamp of max_nr)
    link[1:] &= pfn[1:] - fstart[:-1] < fsize[:-1]
    # No batch crosses a page table (max_nr stops at the PMD boundary).
    vpn_first = first_vpn % ptrs
    link[(ptrs - vpn_first) % ptrs::ptrs] = False

    cuts = np.flatnonzero(~link)
    cuts[0] = 0  # link[0] is False
    return np.diff(np.append(cuts, n)).astype(np.int64)


def _contpte_ptep_get(a: _Arm64, v: np.ndarray, first_vpn: int, cont: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The entries as ptep_get() reads them, as far as the cut can tell, and pte_batch_hint()
    of each (None if all are 1). The block's young state is left out: every form's
    normalisation clears young (pte_mkold), so it never changes a length."""
    valid_cont = (v & (a.VALID | a.CONT)) == (a.VALID | a.CONT)
    if not valid_cont.any():
        return v, None
    n = len(v)
    # Block of each entry, counted from the block of entry 0 (only the part inside the table).
    block = (np.arange(n, dtype=np.int64) + first_vpn % cont) // cont
    heads = np.flatnonzero(np.diff(block, prepend=-1))
    dirty = ((v & a.DIRTY) != 0) | (((v & a.WRITE) != 0) & ((v & a.RDONLY) == 0))
    any_dirty = np.logical_or.reduceat(dirty, heads)[block]
    g = v
    mkdirty = valid_cont & any_dirty  # pte_mkdirty: DIRTY, and hardware-dirty if writable
    g = np.where(mkdirty, g | a.DIRTY, g)
    g = np.where(mkdirty & ((g & a.WRITE) != 0), g & ~a.RDONLY, g)
    idx = (np.arange(n, dtype=np.int64) + first_vpn % cont) % cont
    hint = np.where(valid_cont, cont - idx, 1)
    return g, hint


def _contpte_lengths(a: _Arm64, form: str, norm: np.ndarray, pfn: np.ndarray, fstart: np.ndarray,
                     fsize: np.ndarray, eligible: np.ndarray, hint: np.ndarray, first_vpn: int,
                     ptrs: int) -> np.ndarray:
    """The cut when batch hints skip: two pointer chases, each by doubling (O(n log n)).

    From a read entry p the loop reads p + hint[p] next. Along one batch the limit (PMD boundary,
    end of table, and from v6.15 the folio's last page) is the same for every entry read, so
    where a batch that reaches p stops does not depend on where it began: E(p) is found by
    pointer doubling. Then the batch starts are the entries the walk s -> s + nr(s) reaches
    from 0, found by doubling too."""
    n = len(norm)
    pos = np.arange(n, dtype=np.int64)
    nxt = pos + hint
    # Entries before the next PMD boundary or the end of the table.
    limit = np.minimum(pos + ptrs - (pos + first_vpn % ptrs) % ptrs, n)
    if form in ("v6.15", "v6.17"):  # max_nr clamped to the folio up front
        limit = np.minimum(limit, pos + (fstart + fsize - pfn).astype(np.int64))
    inside = nxt < limit
    q = np.where(inside, nxt, 0)
    expected = (norm & ~a.fn) | ((a.pfn(norm) + hint.astype(U64)) << U64(a.shift))
    ok = inside & eligible & (norm[q] == expected)
    if form in ("v6.9", "v6.10"):  # stop at the first page past the folio
        ok &= pfn[q] - fstart < fsize
    jump = np.where(ok, nxt, pos)
    while True:
        further = jump[jump]
        if np.array_equal(further, jump):
            break
        jump = further
    end = np.minimum(nxt[jump], limit)
    nr = np.where(eligible & (limit - pos > 1), end - pos, 1)

    # The batch starts: reachable from 0 by s -> s + nr[s] (n is the end).
    step = np.append(pos + nr, n)
    on = np.zeros(n + 1, dtype=bool)
    on[0] = True
    while True:
        on[step[on]] = True
        if step[0] == n:
            break
        step = step[step]
    starts = np.flatnonzero(on[:n])
    return nr[starts]

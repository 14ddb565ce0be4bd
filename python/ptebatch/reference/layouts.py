"""PTE layouts of the modelled architectures, written for reading (docs/semantics.md §1).

Every layout class spells out its PTE bits under the kernel's names and has one short method per
kernel accessor. Values are plain Python ints holding a 64-bit PTE in the architecture's own
encoding; arithmetic that can leave 64 bits is wrapped explicitly with ``& MASK64``.

Each public accessor checks its integer arguments: anything outside ``0 .. 2**64 - 1`` is a
``ValueError`` and a non-integer (a float, even ``4096.0``, a string, a bool) a ``TypeError``.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Iterable

#: All 64 bits set; ``x & MASK64`` is ``x`` wrapped to an unsigned 64-bit value.
MASK64 = (1 << 64) - 1


def _bits(lo: int, hi: int) -> int:
    """The mask with bits ``lo`` .. ``hi`` (inclusive) set, like the kernel's GENMASK(hi, lo)."""
    return ((1 << (hi + 1)) - 1) & ~((1 << lo) - 1)


def _is_bool(value: object) -> bool:
    """Python's bool or numpy's ``bool_``: never taken for an integer or read for its truth."""
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")


def _integer(value: object, what: str) -> int:
    """``value`` as an int: a TypeError naming ``what`` for bools and non-integers."""
    if _is_bool(value):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}") from None


def _u64(value: object, what: str) -> int:
    """``value`` as an int in ``0 .. 2**64 - 1`` (TypeError / ValueError otherwise)."""
    number = _integer(value, what)
    if not 0 <= number <= MASK64:
        raise ValueError(f"{what}={number} is outside 0..2**64-1")
    return number


def _u64_args(method):
    """Check every argument of an accessor with :func:`_u64`, naming the parameter."""
    params = tuple(inspect.signature(method).parameters)[1:]

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        args = tuple(_u64(a, p) for a, p in zip(args, params))
        kwargs = {k: _u64(a, k) for k, a in kwargs.items()}
        return method(self, *args, **kwargs)

    return checked


class RefLayout:
    """What every layout has (docs/semantics.md §1), plus the kernel's generic fallbacks.

    Subclasses set the geometry in ``__init__``, the protection templates ``PAGE_READONLY``,
    ``PAGE_READONLY_EXEC`` and ``PAGE_NONE``, and the masks ``SPECIAL``, ``SOFT_DIRTY``,
    ``UFFD_WP`` and ``CONT`` (``None`` where the arch has no such bit), and override the
    accessors. The methods defined here are the include/linux/pgtable.h fallbacks an arch gets
    when it does not define its own.
    """

    # Set by every subclass.
    name: str
    page_shift: int
    ptrs_per_pte: int
    pfn_pte_shift: int | None
    max_pfn: int
    PAGE_READONLY: int
    PAGE_READONLY_EXEC: int
    PAGE_NONE: int
    SPECIAL: int

    cont_ptes = 1
    none_value = 0
    SOFT_DIRTY: int | None = None
    UFFD_WP: int | None = None
    CONT: int | None = None

    def __init__(self) -> None:
        self.page_size = 1 << self.page_shift
        self.has_soft_dirty = self.SOFT_DIRTY is not None
        self.has_uffd_wp = self.UFFD_WP is not None
        self.has_contpte = self.CONT is not None

    def __repr__(self) -> str:
        return f"<RefLayout {self.name}>"

    # -- building a PTE (docs/semantics.md §1.1) ------------------------------------------------

    def mk_pte(
        self,
        pfn: int,
        *,
        present: bool | None = True,
        write: bool | None = False,
        dirty: bool | None = False,
        young: bool | None = False,
        soft_dirty: bool | None = False,
        uffd_wp: bool | None = False,
        exec: bool | None = False,
        special: bool | None = False,
        prot_none: bool | None = False,
        cont: bool | None = False,
    ) -> int:
        """A user PTE for ``pfn``, built with the arch's own accessors in the order of §1.1."""
        pfn = _u64(pfn, "pfn")
        # Each flag is a bool; None stands for its default (present, and nothing else).
        given = {"present": present, "write": write, "dirty": dirty, "young": young,
                 "soft_dirty": soft_dirty, "uffd_wp": uffd_wp, "exec": exec, "special": special,
                 "prot_none": prot_none, "cont": cont}
        for flag, value in given.items():
            if value is None:
                given[flag] = flag == "present"
            elif not _is_bool(value):
                raise TypeError(f"{flag} must be a bool, not {type(value).__name__}")
        present, write, dirty, young, soft_dirty, uffd_wp, exec, special, prot_none, cont = (
            bool(v) for v in given.values())
        # Step 1: a non-present entry is the empty entry, whatever else was asked for.
        if not present:
            return self.none_value
        # Step 2: requests the arch cannot encode.
        if pfn > self.max_pfn:
            raise ValueError(f"pfn={pfn:#x} exceeds max_pfn={self.max_pfn:#x} of {self.name}")
        if prot_none and (write or exec):
            raise ValueError("a PROT_NONE PTE cannot be writable or executable")
        if soft_dirty and not self.has_soft_dirty:
            raise ValueError(f"{self.name} has no soft-dirty PTE bit")
        if uffd_wp and not self.has_uffd_wp:
            raise ValueError(f"{self.name} has no uffd-wp PTE bit")
        if cont and not self.has_contpte:
            raise ValueError(f"{self.name} has no contiguous (PTE_CONT) bit")
        # Step 3: pfn_pte() with the user read-only template (or PAGE_NONE).
        if prot_none:
            prot = self.PAGE_NONE
        elif exec:
            prot = self.PAGE_READONLY_EXEC
        else:
            prot = self.PAGE_READONLY
        v = self.pfn_pte(pfn, prot)
        # Step 4: the accessors, in order.
        if write:
            v = self.pte_mkwrite(v)
        if dirty:
            v = self.pte_mkdirty(v)
        v = self.pte_mkyoung(v) if young else self.pte_mkold(v)
        v = self.pte_mksoft_dirty(v) if soft_dirty else self.pte_clear_soft_dirty(v)
        if uffd_wp:
            v |= self.UFFD_WP  # the bit only: pte_mkuffd_wp() would also write-protect
        if special:
            v |= self.SPECIAL
        if cont:
            v |= self.CONT
        return v

    # -- generic fallbacks (include/linux/pgtable.h, include/asm-generic/pgtable_uffd.h) -------

    @_u64_args
    def pte_soft_dirty(self, v: int) -> bool:
        """pte_soft_dirty() stub without CONFIG_HAVE_ARCH_SOFT_DIRTY — include/linux/pgtable.h"""
        return False

    @_u64_args
    def pte_mksoft_dirty(self, v: int) -> int:
        """pte_mksoft_dirty() stub without CONFIG_HAVE_ARCH_SOFT_DIRTY — include/linux/pgtable.h"""
        return v

    @_u64_args
    def pte_clear_soft_dirty(self, v: int) -> int:
        """pte_clear_soft_dirty() stub without soft-dirty — include/linux/pgtable.h"""
        return v

    @_u64_args
    def pte_uffd_wp(self, v: int) -> bool:
        """pte_uffd_wp() stub without uffd-wp PTE bits — include/asm-generic/pgtable_uffd.h"""
        return False

    @_u64_args
    def pte_cont(self, v: int) -> bool:
        """No contiguous-PTE bit outside arm64 (pte_cont() exists only there)."""
        return False

    @_u64_args
    def pte_advance_pfn(self, v: int, nr: int) -> int:
        """pte_advance_pfn(), generic raw add of nr << PFN_PTE_SHIFT — include/linux/pgtable.h"""
        return (v + (nr << self.pfn_pte_shift)) & MASK64

    @_u64_args
    def pte_batch_hint(self, index: int, v: int) -> int:
        """pte_batch_hint(), generic: always 1 — include/linux/pgtable.h"""
        return 1

    # -- what the simulation builds PTEs with (the Rust PteLayout trait's helpers) ---------------

    def pfn_pte_template(self, pfn: int, exec: bool, prot_none: bool) -> int:
        """pfn_pte(pfn, PAGE_NONE / PAGE_READONLY_EXEC / PAGE_READONLY): the user templates."""
        if prot_none:
            prot = self.PAGE_NONE
        elif exec:
            prot = self.PAGE_READONLY_EXEC
        else:
            prot = self.PAGE_READONLY
        return self.pfn_pte(pfn, prot)

    @_u64_args
    def pte_mkspecial(self, v: int) -> int:
        """pte_mkspecial() — the arch's special bit (include/linux/pgtable.h, arch headers)"""
        return v | self.SPECIAL

    @_u64_args
    def set_uffd_wp_bit(self, v: int) -> int:
        """The arch's uffd-wp bit set, nothing else (identity where the arch has none)."""
        return v | self.UFFD_WP if self.UFFD_WP is not None else v

    @_u64_args
    def clear_uffd_wp_bit(self, v: int) -> int:
        """The arch's uffd-wp bit cleared, nothing else (pte_clear_uffd_wp() without the write side)."""
        return v & ~self.UFFD_WP if self.UFFD_WP is not None else v

    @_u64_args
    def set_cont_bit(self, v: int) -> int:
        """arm64 PTE_CONT set (pte_mkcont()); identity elsewhere."""
        return v

    @_u64_args
    def clear_cont_bit(self, v: int) -> int:
        """arm64 PTE_CONT cleared (pte_mknoncont()); identity elsewhere."""
        return v

    @_u64_args
    def pte_valid(self, v: int) -> bool:
        """pte_valid(): the hardware-valid bit (arm64); elsewhere present and not PROT_NONE."""
        return self.pte_present(v) and not self.pte_protnone(v)


# ============================================================================================
# x86-64
# ============================================================================================


class X86_64(RefLayout):
    """x86-64 with 4 KiB pages (docs/semantics.md §1.2 "x86-64")."""

    # Leaf PTE bits — arch/x86/include/asm/pgtable_types.h
    _PAGE_PRESENT = 1 << 0
    _PAGE_RW = 1 << 1
    _PAGE_USER = 1 << 2
    _PAGE_ACCESSED = 1 << 5
    _PAGE_DIRTY = 1 << 6
    _PAGE_PROTNONE = 1 << 8  # the G bit, read as PROT_NONE while P is clear
    _PAGE_SPECIAL = 1 << 9
    _PAGE_UFFD_WP = 1 << 10
    _PAGE_SOFT_DIRTY = 1 << 11
    _PAGE_SAVED_DIRTY = 1 << 58
    _PAGE_NX = 1 << 63
    PTE_PFN_MASK = _bits(12, 51)
    PFN_PTE_SHIFT = 12

    # Protection templates — arch/x86/include/asm/pgtable_types.h
    PAGE_READONLY = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED | _PAGE_NX
    PAGE_READONLY_EXEC = _PAGE_PRESENT | _PAGE_USER | _PAGE_ACCESSED
    PAGE_NONE = _PAGE_ACCESSED | _PAGE_PROTNONE

    SPECIAL = _PAGE_SPECIAL
    SOFT_DIRTY = _PAGE_SOFT_DIRTY
    UFFD_WP = _PAGE_UFFD_WP

    def __init__(self) -> None:
        self.name = "x86-64"
        self.page_shift = 12
        self.ptrs_per_pte = 512
        self.pfn_pte_shift = self.PFN_PTE_SHIFT
        self.max_pfn = (1 << 40) - 1
        super().__init__()

    # L1TF inversion of the PFN field — arch/x86/include/asm/pgtable-invert.h

    def needs_invert(self, v: int) -> bool:
        """__pte_needs_invert() — arch/x86/include/asm/pgtable-invert.h"""
        return v != 0 and not (v & self._PAGE_PRESENT)

    def protnone_mask(self, v: int) -> int:
        """protnone_mask() — arch/x86/include/asm/pgtable-invert.h"""
        return MASK64 if self.needs_invert(v) else 0

    @_u64_args
    def pfn_pte(self, pfn: int, prot: int) -> int:
        """pfn_pte() — arch/x86/include/asm/pgtable.h (PFN inverted for a non-present prot)"""
        return (((pfn << 12) ^ self.protnone_mask(prot)) & self.PTE_PFN_MASK) | prot

    @_u64_args
    def pte_pfn(self, v: int) -> int:
        """pte_pfn() — arch/x86/include/asm/pgtable.h"""
        return ((v ^ self.protnone_mask(v)) & self.PTE_PFN_MASK) >> 12

    @_u64_args
    def pte_present(self, v: int) -> bool:
        """pte_present() — arch/x86/include/asm/pgtable.h"""
        return bool(v & (self._PAGE_PRESENT | self._PAGE_PROTNONE))

    @_u64_args
    def pte_protnone(self, v: int) -> bool:
        """pte_protnone() — arch/x86/include/asm/pgtable.h"""
        return (v & (self._PAGE_PRESENT | self._PAGE_PROTNONE)) == self._PAGE_PROTNONE

    @_u64_args
    def pte_none(self, v: int) -> bool:
        """pte_none(), ignoring the Knights Landing A/D erratum bits — arch/x86/include/asm/pgtable.h"""
        return (v & ~(self._PAGE_ACCESSED | self._PAGE_DIRTY)) == 0

    @_u64_args
    def pte_write(self, v: int) -> bool:
        """pte_write() without shadow-stack PTEs — arch/x86/include/asm/pgtable.h"""
        return bool(v & self._PAGE_RW)

    @_u64_args
    def pte_dirty(self, v: int) -> bool:
        """pte_dirty(): Dirty or SavedDirty — arch/x86/include/asm/pgtable.h"""
        return bool(v & (self._PAGE_DIRTY | self._PAGE_SAVED_DIRTY))

    @_u64_args
    def pte_young(self, v: int) -> bool:
        """pte_young() — arch/x86/include/asm/pgtable.h"""
        return bool(v & self._PAGE_ACCESSED)

    @_u64_args
    def pte_soft_dirty(self, v: int) -> bool:
        """pte_soft_dirty() — arch/x86/include/asm/pgtable.h"""
        return bool(v & self._PAGE_SOFT_DIRTY)

    @_u64_args
    def pte_uffd_wp(self, v: int) -> bool:
        """pte_uffd_wp() — arch/x86/include/asm/pgtable.h"""
        return bool(v & self._PAGE_UFFD_WP)

    @_u64_args
    def pte_special(self, v: int) -> bool:
        """pte_special() — arch/x86/include/asm/pgtable.h"""
        return bool(v & self._PAGE_SPECIAL)

    @_u64_args
    def pte_exec(self, v: int) -> bool:
        """pte_exec() — arch/x86/include/asm/pgtable.h"""
        return not (v & self._PAGE_NX)

    def _mksaveddirty(self, v: int) -> int:
        """pte_mksaveddirty(): with RW clear, move Dirty into SavedDirty — arch/x86/include/asm/pgtable.h"""
        if not (v & self._PAGE_RW) and (v & self._PAGE_DIRTY):
            v = (v & ~self._PAGE_DIRTY) | self._PAGE_SAVED_DIRTY
        return v

    def _clear_saveddirty(self, v: int) -> int:
        """pte_clear_saveddirty(): with RW set, move SavedDirty into Dirty — arch/x86/include/asm/pgtable.h"""
        if (v & self._PAGE_RW) and (v & self._PAGE_SAVED_DIRTY):
            v = (v & ~self._PAGE_SAVED_DIRTY) | self._PAGE_DIRTY
        return v

    @_u64_args
    def pte_wrprotect(self, v: int) -> int:
        """pte_wrprotect() — arch/x86/include/asm/pgtable.h"""
        return self._mksaveddirty(v & ~self._PAGE_RW)

    @_u64_args
    def pte_mkwrite(self, v: int) -> int:
        """pte_mkwrite() for a non-shadow-stack VMA — arch/x86/mm/pgtable.c"""
        return self._clear_saveddirty(v | self._PAGE_RW)

    @_u64_args
    def pte_mkclean(self, v: int) -> int:
        """pte_mkclean() — arch/x86/include/asm/pgtable.h"""
        return v & ~(self._PAGE_DIRTY | self._PAGE_SAVED_DIRTY)

    @_u64_args
    def pte_mkdirty(self, v: int) -> int:
        """pte_mkdirty() — arch/x86/include/asm/pgtable.h"""
        return self._mksaveddirty(v | self._PAGE_DIRTY | self._PAGE_SOFT_DIRTY)

    @_u64_args
    def pte_mkold(self, v: int) -> int:
        """pte_mkold() — arch/x86/include/asm/pgtable.h"""
        return v & ~self._PAGE_ACCESSED

    @_u64_args
    def pte_mkyoung(self, v: int) -> int:
        """pte_mkyoung() — arch/x86/include/asm/pgtable.h"""
        return v | self._PAGE_ACCESSED

    @_u64_args
    def pte_clear_soft_dirty(self, v: int) -> int:
        """pte_clear_soft_dirty() — arch/x86/include/asm/pgtable.h"""
        return v & ~self._PAGE_SOFT_DIRTY

    @_u64_args
    def pte_mksoft_dirty(self, v: int) -> int:
        """pte_mksoft_dirty() — arch/x86/include/asm/pgtable.h"""
        return v | self._PAGE_SOFT_DIRTY

    @_u64_args
    def pte_advance_pfn(self, v: int, nr: int) -> int:
        """pte_advance_pfn(), downwards on an inverted PFN — arch/x86/include/asm/pgtable.h"""
        step = nr << self.PFN_PTE_SHIFT
        if self.needs_invert(v):
            return (v - step) & MASK64
        return (v + step) & MASK64


class X86_64XenPv(X86_64):
    """x86-64 as a XEN PV guest: a PTE whose PFN is ballooned out cannot be built (§1.2).

    ``ballooned_pfns`` are the PFNs without a machine frame. Advancing a present PTE onto one
    of them yields 0, as ``xen_make_pte()`` does for an invalid MFN (the case behind kernel
    commit 7b08b74f3d99, "mm: fix folio_pte_batch() on XEN PV").
    """

    def __init__(self, ballooned_pfns: Iterable[int] = ()) -> None:
        super().__init__()
        self.name = "x86-64-xenpv"
        self.ballooned_pfns = frozenset(_u64(p, "ballooned pfn") for p in ballooned_pfns)

    @_u64_args
    def pte_advance_pfn(self, v: int, nr: int) -> int:
        """pte_advance_pfn() through xen_make_pte() — arch/x86/include/asm/pgtable.h, arch/x86/xen/mmu_pv.c"""
        advanced = super().pte_advance_pfn(v, nr)
        # xen_make_pte() translates only entries with the hardware _PAGE_PRESENT bit.
        if v & self._PAGE_PRESENT and self.pte_pfn(advanced) in self.ballooned_pfns:
            return 0
        return advanced


# ============================================================================================
# arm64
# ============================================================================================


class Arm64(RefLayout):
    """arm64, 48-bit PA, with a 4, 16 or 64 KiB granule (docs/semantics.md §1.2 "arm64")."""

    # Level-3 page descriptor bits — arch/arm64/include/asm/pgtable-hwdef.h, pgtable-prot.h
    PTE_VALID = 1 << 0
    PTE_TYPE_PAGE = 3 << 0  # bits 0..1 = 0b11 (VALID plus the table/page bit 1)
    PTE_TABLE_BIT = 1 << 1
    PTE_ATTRINDX_NORMAL = 0 << 2  # MAIR index of MT_NORMAL
    PTE_USER = 1 << 6
    PTE_RDONLY = 1 << 7
    PTE_SHARED = 3 << 8
    PTE_AF = 1 << 10
    PTE_NG = 1 << 11
    PTE_PRESENT_INVALID = PTE_NG  # the same bit, meaningful while VALID is clear
    PTE_WRITE = 1 << 51  # = PTE_DBM
    PTE_CONT = 1 << 52
    PTE_PXN = 1 << 53
    PTE_UXN = 1 << 54
    PTE_DIRTY = 1 << 55  # software dirty
    PTE_SPECIAL = 1 << 56
    PTE_UFFD_WP = 1 << 58

    # Protection templates — arch/arm64/include/asm/pgtable-prot.h
    _PROT_DEFAULT = PTE_TABLE_BIT | PTE_AF | PTE_SHARED | PTE_ATTRINDX_NORMAL
    PAGE_READONLY = (
        PTE_VALID | _PROT_DEFAULT | PTE_USER | PTE_RDONLY | PTE_NG | PTE_PXN | PTE_UXN
    )
    PAGE_READONLY_EXEC = PTE_VALID | _PROT_DEFAULT | PTE_USER | PTE_RDONLY | PTE_NG | PTE_PXN
    PAGE_NONE = _PROT_DEFAULT | PTE_PRESENT_INVALID | PTE_RDONLY | PTE_NG | PTE_PXN | PTE_UXN

    SPECIAL = PTE_SPECIAL
    UFFD_WP = PTE_UFFD_WP
    CONT = PTE_CONT

    #: page_shift -> (PTRS_PER_PTE, CONT_PTES) — arch/arm64/include/asm/pgtable-hwdef.h, Kconfig
    GRANULES = {12: (512, 16), 14: (2048, 128), 16: (8192, 32)}

    def __init__(self, granule: int = 4096) -> None:
        page_shift = {4096: 12, 16384: 14, 65536: 16}.get(granule)
        if page_shift is None:
            raise ValueError(f"arm64 granule must be 4096, 16384 or 65536 bytes, got {granule!r}")
        self.name = f"arm64-{granule // 1024}k"
        self.page_shift = page_shift
        self.ptrs_per_pte, self.cont_ptes = self.GRANULES[page_shift]
        self.pfn_pte_shift = None  # arm64 does not define PFN_PTE_SHIFT
        self.max_pfn = (1 << (48 - page_shift)) - 1
        self.PTE_ADDR_LOW = _bits(page_shift, 49)
        super().__init__()

    @_u64_args
    def pfn_pte(self, pfn: int, prot: int) -> int:
        """pfn_pte(), 48-bit PA — arch/arm64/include/asm/pgtable.h"""
        return ((pfn << self.page_shift) & MASK64) | prot

    @_u64_args
    def pte_pfn(self, v: int) -> int:
        """pte_pfn(), 48-bit PA — arch/arm64/include/asm/pgtable.h"""
        return (v & self.PTE_ADDR_LOW) >> self.page_shift

    @_u64_args
    def pte_present(self, v: int) -> bool:
        """pte_present(): valid, or present-invalid — arch/arm64/include/asm/pgtable.h"""
        valid = bool(v & self.PTE_VALID)
        return valid or (bool(v & self.PTE_PRESENT_INVALID) and not valid)

    @_u64_args
    def pte_protnone(self, v: int) -> bool:
        """pte_protnone() — arch/arm64/include/asm/pgtable.h"""
        present_invalid = (v & (self.PTE_VALID | self.PTE_PRESENT_INVALID)) == self.PTE_PRESENT_INVALID
        return present_invalid and not (v & self.PTE_USER) and bool(v & self.PTE_UXN)

    @_u64_args
    def pte_none(self, v: int) -> bool:
        """pte_none() — arch/arm64/include/asm/pgtable.h"""
        return v == 0

    @_u64_args
    def pte_write(self, v: int) -> bool:
        """pte_write() — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_WRITE)

    def _pte_hw_dirty(self, v: int) -> bool:
        """pte_hw_dirty(): writable and not read-only — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_WRITE) and not (v & self.PTE_RDONLY)

    @_u64_args
    def pte_dirty(self, v: int) -> bool:
        """pte_dirty(): software or hardware dirty — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_DIRTY) or self._pte_hw_dirty(v)

    @_u64_args
    def pte_young(self, v: int) -> bool:
        """pte_young() — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_AF)

    @_u64_args
    def pte_uffd_wp(self, v: int) -> bool:
        """pte_uffd_wp() — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_UFFD_WP)

    @_u64_args
    def pte_special(self, v: int) -> bool:
        """pte_special() — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_SPECIAL)

    @_u64_args
    def pte_exec(self, v: int) -> bool:
        """pte_user_exec() — arch/arm64/include/asm/pgtable.h"""
        return not (v & self.PTE_UXN)

    @_u64_args
    def pte_cont(self, v: int) -> bool:
        """pte_cont() — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_CONT)

    @_u64_args
    def pte_wrprotect(self, v: int) -> int:
        """pte_wrprotect(): hardware dirt moves to PTE_DIRTY — arch/arm64/include/asm/pgtable.h"""
        if self._pte_hw_dirty(v):
            v |= self.PTE_DIRTY
        return (v & ~self.PTE_WRITE) | self.PTE_RDONLY

    @_u64_args
    def pte_mkwrite(self, v: int) -> int:
        """pte_mkwrite_novma() — arch/arm64/include/asm/pgtable.h"""
        v |= self.PTE_WRITE
        if v & self.PTE_DIRTY:
            v &= ~self.PTE_RDONLY
        return v

    @_u64_args
    def pte_mkclean(self, v: int) -> int:
        """pte_mkclean() — arch/arm64/include/asm/pgtable.h"""
        return (v & ~self.PTE_DIRTY) | self.PTE_RDONLY

    @_u64_args
    def pte_mkdirty(self, v: int) -> int:
        """pte_mkdirty() — arch/arm64/include/asm/pgtable.h"""
        v |= self.PTE_DIRTY
        if v & self.PTE_WRITE:
            v &= ~self.PTE_RDONLY
        return v

    @_u64_args
    def pte_mkold(self, v: int) -> int:
        """pte_mkold() — arch/arm64/include/asm/pgtable.h"""
        return v & ~self.PTE_AF

    @_u64_args
    def pte_mkyoung(self, v: int) -> int:
        """pte_mkyoung() — arch/arm64/include/asm/pgtable.h"""
        return v | self.PTE_AF

    @_u64_args
    def pte_advance_pfn(self, v: int, nr: int) -> int:
        """pte_advance_pfn(): rebuild from pte_pfn() + nr and pte_pgprot() — arch/arm64/include/asm/pgtable.h"""
        prot = v & ~self.PTE_ADDR_LOW  # pte_pgprot()
        return prot | (((self.pte_pfn(v) + nr) << self.page_shift) & MASK64)

    @_u64_args
    def set_cont_bit(self, v: int) -> int:
        """pte_mkcont() — arch/arm64/include/asm/pgtable.h"""
        return v | self.PTE_CONT

    @_u64_args
    def clear_cont_bit(self, v: int) -> int:
        """pte_mknoncont() — arch/arm64/include/asm/pgtable.h"""
        return v & ~self.PTE_CONT

    @_u64_args
    def pte_valid(self, v: int) -> bool:
        """pte_valid() — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_VALID)

    @_u64_args
    def pte_valid_cont(self, v: int) -> bool:
        """pte_valid_cont(): valid and part of a contpte block — arch/arm64/include/asm/pgtable.h"""
        return bool(v & self.PTE_VALID) and bool(v & self.PTE_CONT)

    @_u64_args
    def pte_batch_hint(self, index: int, v: int) -> int:
        """pte_batch_hint(): the rest of a contpte block — arch/arm64/include/asm/pgtable.h"""
        if not self.pte_valid_cont(v):
            return 1
        return self.cont_ptes - (index % self.cont_ptes)


# ============================================================================================
# riscv64
# ============================================================================================


class Riscv64(RefLayout):
    """riscv64 (Sv39/48/57 leaf PTE, 4 KiB pages) (docs/semantics.md §1.2 "riscv64")."""

    # Leaf PTE bits — arch/riscv/include/asm/pgtable-bits.h
    _PAGE_PRESENT = 1 << 0  # V
    _PAGE_READ = 1 << 1
    _PAGE_WRITE = 1 << 2
    _PAGE_EXEC = 1 << 3
    _PAGE_USER = 1 << 4
    _PAGE_PROT_NONE = 1 << 5  # the G bit, read as PROT_NONE while V is clear
    _PAGE_ACCESSED = 1 << 6
    _PAGE_DIRTY = 1 << 7
    _PAGE_SPECIAL = 1 << 8
    _PAGE_NAPOT = 1 << 63
    _PAGE_PFN_MASK = _bits(10, 53)
    _PAGE_PFN_SHIFT = 10

    # ---- soft-dirty / uffd-wp: absent before v6.19 and on CPUs without Svrsw60t59b. -------
    # Riscv64Svrsw60t59b below sets them (bits 59 and 60, merged for v6.19).
    _PAGE_SOFT_DIRTY: int | None = None
    _PAGE_UFFD_WP: int | None = None

    # Protection templates — arch/riscv/include/asm/pgtable.h
    PAGE_READONLY = _PAGE_PRESENT | _PAGE_READ | _PAGE_USER | _PAGE_ACCESSED  # PAGE_READ
    PAGE_READONLY_EXEC = PAGE_READONLY | _PAGE_EXEC  # PAGE_READ_EXEC
    PAGE_NONE = _PAGE_PROT_NONE | _PAGE_READ

    SPECIAL = _PAGE_SPECIAL
    SOFT_DIRTY = _PAGE_SOFT_DIRTY
    UFFD_WP = _PAGE_UFFD_WP

    def __init__(self) -> None:
        self.name = getattr(self, "name", "riscv64")
        self.page_shift = 12
        self.ptrs_per_pte = 512
        self.pfn_pte_shift = self._PAGE_PFN_SHIFT  # PFN_PTE_SHIFT
        self.max_pfn = (1 << 44) - 1
        super().__init__()

    @_u64_args
    def pfn_pte(self, pfn: int, prot: int) -> int:
        """pfn_pte() — arch/riscv/include/asm/pgtable.h"""
        return ((pfn << self._PAGE_PFN_SHIFT) & MASK64) | prot

    @_u64_args
    def pte_pfn(self, v: int) -> int:
        """pte_pfn() — arch/riscv/include/asm/pgtable.h"""
        return (v & self._PAGE_PFN_MASK) >> self._PAGE_PFN_SHIFT

    @_u64_args
    def pte_present(self, v: int) -> bool:
        """pte_present() — arch/riscv/include/asm/pgtable.h"""
        return bool(v & (self._PAGE_PRESENT | self._PAGE_PROT_NONE))

    @_u64_args
    def pte_protnone(self, v: int) -> bool:
        """pte_protnone() — arch/riscv/include/asm/pgtable.h"""
        return (v & (self._PAGE_PRESENT | self._PAGE_PROT_NONE)) == self._PAGE_PROT_NONE

    @_u64_args
    def pte_none(self, v: int) -> bool:
        """pte_none() — arch/riscv/include/asm/pgtable.h"""
        return v == 0

    @_u64_args
    def pte_write(self, v: int) -> bool:
        """pte_write() — arch/riscv/include/asm/pgtable.h"""
        return bool(v & self._PAGE_WRITE)

    @_u64_args
    def pte_dirty(self, v: int) -> bool:
        """pte_dirty() — arch/riscv/include/asm/pgtable.h"""
        return bool(v & self._PAGE_DIRTY)

    @_u64_args
    def pte_young(self, v: int) -> bool:
        """pte_young() — arch/riscv/include/asm/pgtable.h"""
        return bool(v & self._PAGE_ACCESSED)

    @_u64_args
    def pte_soft_dirty(self, v: int) -> bool:
        """pte_soft_dirty() (stub while the bit is not modelled) — arch/riscv/include/asm/pgtable.h"""
        return self._PAGE_SOFT_DIRTY is not None and bool(v & self._PAGE_SOFT_DIRTY)

    @_u64_args
    def pte_uffd_wp(self, v: int) -> bool:
        """pte_uffd_wp() (stub while the bit is not modelled) — arch/riscv/include/asm/pgtable.h"""
        return self._PAGE_UFFD_WP is not None and bool(v & self._PAGE_UFFD_WP)

    @_u64_args
    def pte_special(self, v: int) -> bool:
        """pte_special() — arch/riscv/include/asm/pgtable.h"""
        return bool(v & self._PAGE_SPECIAL)

    @_u64_args
    def pte_exec(self, v: int) -> bool:
        """pte_exec() — arch/riscv/include/asm/pgtable.h"""
        return bool(v & self._PAGE_EXEC)

    @_u64_args
    def pte_wrprotect(self, v: int) -> int:
        """pte_wrprotect() — arch/riscv/include/asm/pgtable.h"""
        return v & ~self._PAGE_WRITE

    @_u64_args
    def pte_mkwrite(self, v: int) -> int:
        """pte_mkwrite_novma() — arch/riscv/include/asm/pgtable.h"""
        return v | self._PAGE_WRITE

    @_u64_args
    def pte_mkclean(self, v: int) -> int:
        """pte_mkclean() — arch/riscv/include/asm/pgtable.h"""
        return v & ~self._PAGE_DIRTY

    @_u64_args
    def pte_mkdirty(self, v: int) -> int:
        """pte_mkdirty(), also soft-dirty where that bit exists — arch/riscv/include/asm/pgtable.h"""
        return v | self._PAGE_DIRTY | (self._PAGE_SOFT_DIRTY or 0)

    @_u64_args
    def pte_mkold(self, v: int) -> int:
        """pte_mkold() — arch/riscv/include/asm/pgtable.h"""
        return v & ~self._PAGE_ACCESSED

    @_u64_args
    def pte_mkyoung(self, v: int) -> int:
        """pte_mkyoung() — arch/riscv/include/asm/pgtable.h"""
        return v | self._PAGE_ACCESSED

    @_u64_args
    def pte_clear_soft_dirty(self, v: int) -> int:
        """pte_clear_soft_dirty() (identity while the bit is not modelled) — arch/riscv/include/asm/pgtable.h"""
        return v & ~(self._PAGE_SOFT_DIRTY or 0)

    @_u64_args
    def pte_mksoft_dirty(self, v: int) -> int:
        """pte_mksoft_dirty() (identity while the bit is not modelled) — arch/riscv/include/asm/pgtable.h"""
        return v | (self._PAGE_SOFT_DIRTY or 0)


class Riscv64Svrsw60t59b(Riscv64):
    """riscv64 from v6.19 on a CPU with Svrsw60t59b, which frees PTE bits 59..60 for software:
    soft-dirty and uffd-wp ("riscv: mm: Add soft-dirty page tracking support",
    "riscv: mm: Add userfaultfd write-protect support")."""

    name = "riscv64-svrsw60t59b"
    _PAGE_SOFT_DIRTY = 1 << 59
    _PAGE_UFFD_WP = 1 << 60
    SOFT_DIRTY = _PAGE_SOFT_DIRTY
    UFFD_WP = _PAGE_UFFD_WP


# ============================================================================================
# powerpc book3s64 (radix)
# ============================================================================================


class Ppc64(RefLayout):
    """powerpc book3s64, radix MMU, 4 or 64 KiB pages (docs/semantics.md §1.2 "ppc64").

    Values are the CPU-order word, before the big-endian store.
    """

    # PTE bits, LSB numbering — arch/powerpc/include/asm/book3s/64/pgtable.h
    _PAGE_EXEC = 1 << 0
    _PAGE_WRITE = 1 << 1
    _PAGE_READ = 1 << 2
    _PAGE_PRIVILEGED = 1 << 3
    _PAGE_DIRTY = 1 << 7
    _PAGE_ACCESSED = 1 << 8
    _PAGE_SOFT_DIRTY = 1 << 9
    _PAGE_SPECIAL = 1 << 10
    _PAGE_INVALID = 1 << 61
    _PAGE_PTE = 1 << 62
    _PAGE_PRESENT = 1 << 63
    _PAGE_PA_MAX = 53

    # Protection templates — arch/powerpc/include/asm/book3s/64/pgtable.h
    PAGE_READONLY = _PAGE_PRESENT | _PAGE_ACCESSED | _PAGE_READ
    PAGE_READONLY_EXEC = PAGE_READONLY | _PAGE_EXEC
    # Since v6.8 book3s64 takes its permissions from the generic pgtable-masks.h, where
    # PAGE_NONE is the bare base: no _PAGE_PRIVILEGED (it had that before).
    PAGE_NONE = _PAGE_PRESENT | _PAGE_ACCESSED

    SPECIAL = _PAGE_SPECIAL
    SOFT_DIRTY = _PAGE_SOFT_DIRTY

    #: page_shift -> PTRS_PER_PTE with the radix MMU — arch/powerpc/include/asm/book3s/64/radix-*.h
    RADIX_PTRS_PER_PTE = {12: 512, 16: 32}

    def __init__(self, page_shift: int = 12) -> None:
        if page_shift not in self.RADIX_PTRS_PER_PTE:
            raise ValueError(f"ppc64 page_shift must be 12 or 16, got {page_shift!r}")
        self.name = f"ppc64-{(1 << page_shift) // 1024}k"
        self.page_shift = page_shift
        self.ptrs_per_pte = self.RADIX_PTRS_PER_PTE[page_shift]
        self.pfn_pte_shift = page_shift  # PFN_PTE_SHIFT = PTE_RPN_SHIFT = PAGE_SHIFT
        self.max_pfn = (1 << (self._PAGE_PA_MAX - page_shift)) - 1
        self.PTE_RPN_MASK = _bits(page_shift, self._PAGE_PA_MAX - 1)
        super().__init__()

    @_u64_args
    def pfn_pte(self, pfn: int, prot: int) -> int:
        """pfn_pte(), ORs _PAGE_PTE — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return ((pfn << self.page_shift) & MASK64) | prot | self._PAGE_PTE

    @_u64_args
    def pte_pfn(self, v: int) -> int:
        """pte_pfn() — arch/powerpc/include/asm/pgtable.h"""
        return (v & self.PTE_RPN_MASK) >> self.page_shift

    @_u64_args
    def pte_present(self, v: int) -> bool:
        """pte_present(): present, or invalidated-but-present — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        if v & self._PAGE_PRESENT:
            return True
        both = self._PAGE_INVALID | self._PAGE_PTE
        return (v & both) == both

    @_u64_args
    def pte_protnone(self, v: int) -> bool:
        """pte_protnone() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        rwx = self._PAGE_READ | self._PAGE_WRITE | self._PAGE_EXEC
        mask = self._PAGE_PRESENT | self._PAGE_PTE | rwx
        return (v & mask) == (self._PAGE_PRESENT | self._PAGE_PTE)

    @_u64_args
    def pte_none(self, v: int) -> bool:
        """pte_none() (radix: dirty/accessed alone still count as none) — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return (v & ~(self._PAGE_DIRTY | self._PAGE_ACCESSED)) == 0

    @_u64_args
    def pte_write(self, v: int) -> bool:
        """pte_write() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return bool(v & self._PAGE_WRITE)

    @_u64_args
    def pte_dirty(self, v: int) -> bool:
        """pte_dirty() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return bool(v & self._PAGE_DIRTY)

    @_u64_args
    def pte_young(self, v: int) -> bool:
        """pte_young() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return bool(v & self._PAGE_ACCESSED)

    @_u64_args
    def pte_soft_dirty(self, v: int) -> bool:
        """pte_soft_dirty() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return bool(v & self._PAGE_SOFT_DIRTY)

    @_u64_args
    def pte_special(self, v: int) -> bool:
        """pte_special() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return bool(v & self._PAGE_SPECIAL)

    @_u64_args
    def pte_exec(self, v: int) -> bool:
        """pte_exec() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return bool(v & self._PAGE_EXEC)

    @_u64_args
    def pte_wrprotect(self, v: int) -> int:
        """pte_wrprotect() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v & ~self._PAGE_WRITE

    @_u64_args
    def pte_mkwrite(self, v: int) -> int:
        """pte_mkwrite_novma(): sets READ and WRITE — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v | self._PAGE_READ | self._PAGE_WRITE

    @_u64_args
    def pte_mkclean(self, v: int) -> int:
        """pte_mkclean() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v & ~self._PAGE_DIRTY

    @_u64_args
    def pte_mkdirty(self, v: int) -> int:
        """pte_mkdirty(), also soft-dirty — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v | self._PAGE_DIRTY | self._PAGE_SOFT_DIRTY

    @_u64_args
    def pte_mkold(self, v: int) -> int:
        """pte_mkold() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v & ~self._PAGE_ACCESSED

    @_u64_args
    def pte_mkyoung(self, v: int) -> int:
        """pte_mkyoung() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v | self._PAGE_ACCESSED

    @_u64_args
    def pte_clear_soft_dirty(self, v: int) -> int:
        """pte_clear_soft_dirty() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v & ~self._PAGE_SOFT_DIRTY

    @_u64_args
    def pte_mksoft_dirty(self, v: int) -> int:
        """pte_mksoft_dirty() — arch/powerpc/include/asm/book3s/64/pgtable.h"""
        return v | self._PAGE_SOFT_DIRTY


# ============================================================================================
# s390x
# ============================================================================================


class S390x(RefLayout):
    """s390x (docs/semantics.md §1.2 "s390x"): PROTECT and INVALID follow the software bits."""

    # PTE bits, LSB numbering — arch/s390/include/asm/pgtable.h
    _PAGE_PRESENT = 1 << 0
    _PAGE_SOFT_DIRTY = 1 << 1
    _PAGE_YOUNG = 1 << 2
    _PAGE_DIRTY = 1 << 3
    _PAGE_READ = 1 << 4
    _PAGE_WRITE = 1 << 5
    _PAGE_SPECIAL = 1 << 6
    _PAGE_NOEXEC = 1 << 8
    _PAGE_PROTECT = 1 << 9  # hardware: store-protected
    _PAGE_INVALID = 1 << 10  # hardware: not valid for translation
    PAGE_MASK = _bits(12, 63)

    # Protection templates — arch/s390/include/asm/pgtable.h
    PAGE_NONE = _PAGE_PRESENT | _PAGE_INVALID | _PAGE_PROTECT
    PAGE_READONLY = _PAGE_PRESENT | _PAGE_READ | _PAGE_NOEXEC | _PAGE_INVALID | _PAGE_PROTECT  # PAGE_RO
    PAGE_READONLY_EXEC = _PAGE_PRESENT | _PAGE_READ | _PAGE_INVALID | _PAGE_PROTECT  # PAGE_RX

    SPECIAL = _PAGE_SPECIAL
    SOFT_DIRTY = _PAGE_SOFT_DIRTY

    none_value = _PAGE_INVALID  # an empty s390 PTE is 0x400

    def __init__(self) -> None:
        self.name = "s390x"
        self.page_shift = 12
        self.ptrs_per_pte = 256
        self.pfn_pte_shift = 12
        self.max_pfn = (1 << 52) - 1
        super().__init__()

    @_u64_args
    def pfn_pte(self, pfn: int, prot: int) -> int:
        """pfn_pte() — arch/s390/include/asm/pgtable.h"""
        return ((pfn << 12) & MASK64) | prot

    @_u64_args
    def pte_pfn(self, v: int) -> int:
        """pte_pfn() — arch/s390/include/asm/pgtable.h"""
        return v >> 12

    @_u64_args
    def pte_present(self, v: int) -> bool:
        """pte_present() — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_PRESENT)

    @_u64_args
    def pte_protnone(self, v: int) -> bool:
        """pte_protnone(): present but not readable — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_PRESENT) and not (v & self._PAGE_READ)

    @_u64_args
    def pte_none(self, v: int) -> bool:
        """pte_none(): exactly the invalid empty entry — arch/s390/include/asm/pgtable.h"""
        return v == self._PAGE_INVALID

    @_u64_args
    def pte_write(self, v: int) -> bool:
        """pte_write() — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_WRITE)

    @_u64_args
    def pte_dirty(self, v: int) -> bool:
        """pte_dirty() — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_DIRTY)

    @_u64_args
    def pte_young(self, v: int) -> bool:
        """pte_young() — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_YOUNG)

    @_u64_args
    def pte_soft_dirty(self, v: int) -> bool:
        """pte_soft_dirty() — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_SOFT_DIRTY)

    @_u64_args
    def pte_special(self, v: int) -> bool:
        """pte_special() — arch/s390/include/asm/pgtable.h"""
        return bool(v & self._PAGE_SPECIAL)

    @_u64_args
    def pte_exec(self, v: int) -> bool:
        """Executable: NOEXEC clear — arch/s390/include/asm/pgtable.h"""
        return not (v & self._PAGE_NOEXEC)

    @_u64_args
    def pte_wrprotect(self, v: int) -> int:
        """pte_wrprotect() — arch/s390/include/asm/pgtable.h"""
        return (v & ~self._PAGE_WRITE) | self._PAGE_PROTECT

    @_u64_args
    def pte_mkwrite(self, v: int) -> int:
        """pte_mkwrite_novma() — arch/s390/include/asm/pgtable.h"""
        v |= self._PAGE_WRITE
        if v & self._PAGE_DIRTY:
            v &= ~self._PAGE_PROTECT
        return v

    @_u64_args
    def pte_mkclean(self, v: int) -> int:
        """pte_mkclean() — arch/s390/include/asm/pgtable.h"""
        return (v & ~self._PAGE_DIRTY) | self._PAGE_PROTECT

    @_u64_args
    def pte_mkdirty(self, v: int) -> int:
        """pte_mkdirty(), also soft-dirty — arch/s390/include/asm/pgtable.h"""
        v |= self._PAGE_DIRTY | self._PAGE_SOFT_DIRTY
        if v & self._PAGE_WRITE:
            v &= ~self._PAGE_PROTECT
        return v

    @_u64_args
    def pte_mkold(self, v: int) -> int:
        """pte_mkold() — arch/s390/include/asm/pgtable.h"""
        return (v & ~self._PAGE_YOUNG) | self._PAGE_INVALID

    @_u64_args
    def pte_mkyoung(self, v: int) -> int:
        """pte_mkyoung() — arch/s390/include/asm/pgtable.h"""
        v |= self._PAGE_YOUNG
        if v & self._PAGE_READ:
            v &= ~self._PAGE_INVALID
        return v

    @_u64_args
    def pte_clear_soft_dirty(self, v: int) -> int:
        """pte_clear_soft_dirty() — arch/s390/include/asm/pgtable.h"""
        return v & ~self._PAGE_SOFT_DIRTY

    @_u64_args
    def pte_mksoft_dirty(self, v: int) -> int:
        """pte_mksoft_dirty() — arch/s390/include/asm/pgtable.h"""
        return v | self._PAGE_SOFT_DIRTY


# ============================================================================================
# loongarch64
# ============================================================================================


class Loongarch64(RefLayout):
    """loongarch64 with 16 KiB pages (docs/semantics.md §1.2 "loongarch64")."""

    # PTE bits — arch/loongarch/include/asm/pgtable-bits.h
    _PAGE_VALID = 1 << 0  # hardware valid, doubles as "young" (_PAGE_ACCESSED)
    _PAGE_DIRTY = 1 << 1  # hardware write-enable
    _PAGE_PLV_USER = 3 << 2  # PLV3
    _CACHE_CC = 1 << 4  # MAT = coherent cached
    _PAGE_GLOBAL = 1 << 6
    _PAGE_PRESENT = 1 << 7
    _PAGE_WRITE = 1 << 8
    _PAGE_MODIFIED = 1 << 9
    _PAGE_PROTNONE = 1 << 10
    _PAGE_SPECIAL = 1 << 11
    _PAGE_NO_READ = 1 << 61
    _PAGE_NO_EXEC = 1 << 62
    PFN_PTE_SHIFT = 14
    _PFN_MASK = _bits(PFN_PTE_SHIFT, 47)

    # Protection templates — arch/loongarch/include/asm/pgtable-bits.h
    PAGE_READONLY = _PAGE_PRESENT | _PAGE_PLV_USER | _CACHE_CC | _PAGE_NO_EXEC
    PAGE_READONLY_EXEC = _PAGE_PRESENT | _PAGE_PLV_USER | _CACHE_CC
    PAGE_NONE = _PAGE_PROTNONE | _PAGE_PLV_USER | _CACHE_CC | _PAGE_NO_READ | _PAGE_NO_EXEC

    SPECIAL = _PAGE_SPECIAL

    def __init__(self) -> None:
        self.name = "loongarch64"
        self.page_shift = 14
        self.ptrs_per_pte = 2048
        self.pfn_pte_shift = self.PFN_PTE_SHIFT
        self.max_pfn = (1 << 34) - 1
        super().__init__()

    @_u64_args
    def pfn_pte(self, pfn: int, prot: int) -> int:
        """pfn_pte() — arch/loongarch/include/asm/pgtable.h"""
        return ((pfn << self.PFN_PTE_SHIFT) & MASK64) | prot

    @_u64_args
    def pte_pfn(self, v: int) -> int:
        """pte_pfn() — arch/loongarch/include/asm/pgtable.h"""
        return (v & self._PFN_MASK) >> self.PFN_PTE_SHIFT

    @_u64_args
    def pte_present(self, v: int) -> bool:
        """pte_present() — arch/loongarch/include/asm/pgtable.h"""
        return bool(v & (self._PAGE_PRESENT | self._PAGE_PROTNONE))

    @_u64_args
    def pte_protnone(self, v: int) -> bool:
        """pte_protnone() — arch/loongarch/include/asm/pgtable.h"""
        return bool(v & self._PAGE_PROTNONE)

    @_u64_args
    def pte_none(self, v: int) -> bool:
        """pte_none(), ignoring the global bit — arch/loongarch/include/asm/pgtable.h"""
        return (v & ~self._PAGE_GLOBAL) == 0

    @_u64_args
    def pte_write(self, v: int) -> bool:
        """pte_write() — arch/loongarch/include/asm/pgtable.h"""
        return bool(v & self._PAGE_WRITE)

    @_u64_args
    def pte_dirty(self, v: int) -> bool:
        """pte_dirty(): hardware DIRTY or software MODIFIED — arch/loongarch/include/asm/pgtable.h"""
        return bool(v & (self._PAGE_DIRTY | self._PAGE_MODIFIED))

    @_u64_args
    def pte_young(self, v: int) -> bool:
        """pte_young(): the VALID bit — arch/loongarch/include/asm/pgtable.h"""
        return bool(v & self._PAGE_VALID)

    @_u64_args
    def pte_special(self, v: int) -> bool:
        """pte_special() — arch/loongarch/include/asm/pgtable.h"""
        return bool(v & self._PAGE_SPECIAL)

    @_u64_args
    def pte_exec(self, v: int) -> bool:
        """Executable: NO_EXEC clear — arch/loongarch/include/asm/pgtable-bits.h"""
        return not (v & self._PAGE_NO_EXEC)

    @_u64_args
    def pte_wrprotect(self, v: int) -> int:
        """pte_wrprotect(): clears WRITE and hardware DIRTY — arch/loongarch/include/asm/pgtable.h"""
        return v & ~(self._PAGE_WRITE | self._PAGE_DIRTY)

    @_u64_args
    def pte_mkwrite(self, v: int) -> int:
        """pte_mkwrite_novma() — arch/loongarch/include/asm/pgtable.h"""
        v |= self._PAGE_WRITE
        if v & self._PAGE_MODIFIED:
            v |= self._PAGE_DIRTY
        return v

    @_u64_args
    def pte_mkclean(self, v: int) -> int:
        """pte_mkclean() — arch/loongarch/include/asm/pgtable.h"""
        return v & ~(self._PAGE_DIRTY | self._PAGE_MODIFIED)

    @_u64_args
    def pte_mkdirty(self, v: int) -> int:
        """pte_mkdirty() — arch/loongarch/include/asm/pgtable.h"""
        v |= self._PAGE_MODIFIED
        if v & self._PAGE_WRITE:
            v |= self._PAGE_DIRTY
        return v

    @_u64_args
    def pte_mkold(self, v: int) -> int:
        """pte_mkold() — arch/loongarch/include/asm/pgtable.h"""
        return v & ~self._PAGE_VALID

    @_u64_args
    def pte_mkyoung(self, v: int) -> int:
        """pte_mkyoung() — arch/loongarch/include/asm/pgtable.h"""
        return v | self._PAGE_VALID


# ============================================================================================
# The layout table
# ============================================================================================

LAYOUT_NAMES = (
    "x86-64",
    "x86-64-xenpv",
    "arm64-4k",
    "arm64-16k",
    "arm64-64k",
    "riscv64",
    "riscv64-svrsw60t59b",
    "ppc64-4k",
    "ppc64-64k",
    "s390x",
    "loongarch64",
)

_FACTORIES = {
    "x86-64": X86_64,
    "arm64-4k": lambda: Arm64(4096),
    "arm64-16k": lambda: Arm64(16384),
    "arm64-64k": lambda: Arm64(65536),
    "riscv64": Riscv64,
    "riscv64-svrsw60t59b": Riscv64Svrsw60t59b,
    "ppc64-4k": lambda: Ppc64(12),
    "ppc64-64k": lambda: Ppc64(16),
    "s390x": S390x,
    "loongarch64": Loongarch64,
}


def layout(name: str, *, ballooned_pfns: Iterable[int] | None = None) -> RefLayout:
    """The reference layout called ``name`` (one of :data:`LAYOUT_NAMES`).

    ``ballooned_pfns`` is only for ``"x86-64-xenpv"`` (default: none ballooned).
    """
    if not isinstance(name, str) or name not in LAYOUT_NAMES:
        raise ValueError(f"unknown layout {name!r}; the layouts are: {', '.join(LAYOUT_NAMES)}")
    if name == "x86-64-xenpv":
        return X86_64XenPv(() if ballooned_pfns is None else ballooned_pfns)
    if ballooned_pfns is not None:
        raise TypeError(
            f"ballooned_pfns is only for the 'x86-64-xenpv' layout, not {name!r}"
        )
    return _FACTORIES[name]()

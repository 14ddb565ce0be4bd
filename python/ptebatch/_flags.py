"""The ``fpb_t`` flags of ``folio_pte_batch()``, under their kernel names.

The kernel reused bit values when it flipped the flags' sense in v6.17
(``FPB_IGNORE_DIRTY`` and ``FPB_RESPECT_DIRTY`` are both ``BIT(0)``), so a plain int
cannot say which kernel a flag belongs to. Each constant here carries its family, and
``folio_pte_batch`` refuses a family that the chosen kernel does not know.
"""

from __future__ import annotations

from typing import Iterator

#: Flags of the seed series and v6.9 … v6.16 (``mm/memory.c``, then ``mm/internal.h``).
IGNORE = "ignore"
#: Flags of v6.17 and newer (``mm/internal.h``, "mm: folio_pte_batch() improvements").
RESPECT = "respect"

_NAMES = {
    IGNORE: {1: "FPB_IGNORE_DIRTY", 2: "FPB_IGNORE_SOFT_DIRTY"},
    RESPECT: {
        1: "FPB_RESPECT_DIRTY",
        2: "FPB_RESPECT_SOFT_DIRTY",
        4: "FPB_RESPECT_WRITE",
        8: "FPB_MERGE_WRITE",
        16: "FPB_MERGE_YOUNG_DIRTY",
    },
}


class FpbFlags:
    """A set of ``FPB_*`` flags of one family; combine with ``|``."""

    __slots__ = ("_family", "_bits")

    def __init__(self, family: str, bits: int) -> None:
        if not isinstance(family, str):
            raise TypeError(f"family must be {IGNORE!r} or {RESPECT!r}, not {type(family).__name__}")
        if family not in _NAMES:
            raise ValueError(f"unknown FPB flag family {family!r}")
        if not isinstance(bits, int) or isinstance(bits, bool):
            raise TypeError(f"bits must be an int, not {type(bits).__name__}")
        known = sum(_NAMES[family])
        if bits < 0 or bits & ~known:
            raise ValueError(f"bits {bits:#x} are not {family} FPB flags" if bits >= 0 else
                             f"bits must be a non-negative integer, not {bits}")
        self._family = family
        self._bits = bits

    @property
    def family(self) -> str:
        """``"ignore"`` (seed … v6.16) or ``"respect"`` (v6.17+)."""
        return self._family

    def __int__(self) -> int:
        return self._bits

    def __index__(self) -> int:
        return self._bits

    def __bool__(self) -> bool:
        return self._bits != 0

    def __or__(self, other: object) -> FpbFlags:
        if not isinstance(other, FpbFlags):
            return NotImplemented
        if other._family != self._family:
            raise TypeError(
                f"cannot combine {self!r} with {other!r}: the FPB_IGNORE_* flags (seed … 6.16) "
                "and the FPB_RESPECT_*/FPB_MERGE_* flags (6.17+) belong to different kernels"
            )
        return FpbFlags(self._family, self._bits | other._bits)

    def __and__(self, other: object) -> FpbFlags:
        if not isinstance(other, FpbFlags):
            return NotImplemented
        if other._family != self._family:
            return FpbFlags(self._family, 0)
        return FpbFlags(self._family, self._bits & other._bits)

    def __contains__(self, other: object) -> bool:
        return (
            isinstance(other, FpbFlags)
            and other._family == self._family
            and (self._bits & other._bits) == other._bits
        )

    def __iter__(self) -> Iterator[FpbFlags]:
        for bit in sorted(_NAMES[self._family]):
            if self._bits & bit:
                yield FpbFlags(self._family, bit)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, FpbFlags)
            and other._family == self._family
            and other._bits == self._bits
        )

    def __hash__(self) -> int:
        return hash((self._family, self._bits))

    def __repr__(self) -> str:
        names = [_NAMES[self._family][b] for b in sorted(_NAMES[self._family]) if self._bits & b]
        if not names:
            return f"FpbFlags({self._family!r}, 0)"
        return "|".join(names)


FPB_IGNORE_DIRTY = FpbFlags(IGNORE, 1)
FPB_IGNORE_SOFT_DIRTY = FpbFlags(IGNORE, 2)
FPB_RESPECT_DIRTY = FpbFlags(RESPECT, 1)
FPB_RESPECT_SOFT_DIRTY = FpbFlags(RESPECT, 2)
FPB_RESPECT_WRITE = FpbFlags(RESPECT, 4)
FPB_MERGE_WRITE = FpbFlags(RESPECT, 8)
FPB_MERGE_YOUNG_DIRTY = FpbFlags(RESPECT, 16)


def family_of(kernel_form: str) -> str:
    """The flag family used by a ``folio_pte_batch`` form (see docs/semantics.md §2)."""
    return RESPECT if kernel_form == "v6.17" else IGNORE

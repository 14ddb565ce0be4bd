"""Kernel versions and the behaviour switches of each one (mirrors rust/src/kernel.rs)."""

from __future__ import annotations

import dataclasses
import re

#: Mainline releases modelled, oldest first.
RELEASES = ((6, 8), (6, 9), (6, 10), (6, 11), (6, 12), (6, 13), (6, 14), (6, 15), (6, 16),
            (6, 17), (6, 18), (6, 19), (7, 0))

#: wp_can_reuse_anon_folio() rules for a large folio whose faulting page is not exclusive.
REFCOUNT_ONE = "refcount-one"  # v6.5 - v6.8 and the seed series: like a small folio
NEVER = "never"  # v6.9 - v6.14
MM_ID = "mm-id"  # v6.15+: one mm holds every mapping and every reference

#: Which page-cache faults finish_fault() maps a whole folio on (FinishFaultFolio).
FF_PAGE = "page"  # v6.8 - v6.10
FF_ANON_SHMEM = "anon-shmem"  # v6.11 - v6.16: vma_is_anon_shmem()
FF_SHMEM = "shmem"  # v6.17: vma_is_shmem()
FF_ANY_FILE = "any-file"  # v6.18+

#: The shmem order choice (ShmemForm).
SHMEM_PMD_ONLY = "pmd-only"  # v6.8 - v6.10: shmem_is_huge()
SHMEM_ANON_MTHP = "anon-mthp"  # v6.11, v6.12: per-size controls, within_size rounding bug
SHMEM_ANON_MTHP_FIXED = "anon-mthp-fixed"  # v6.13
SHMEM_UNIFIED = "unified"  # v6.14+: shmem_suitable_orders() for tmpfs too

_U16 = re.compile(r"\+?[0-9]+")


def _known() -> str:
    return '"seed", ' + ", ".join(f"{a}.{b}" for a, b in RELEASES)


def _u16(text: str) -> int | None:
    """``text`` read as Rust's ``u16::from_str`` reads it, or None."""
    if not _U16.fullmatch(text):
        return None
    value = int(text)
    return value if value <= 0xFFFF else None


def parse_version(s: str) -> tuple[int, int] | None:
    """KernelVersion::parse(): None for the seed series, else (major, minor); ValueError otherwise."""
    t = s.strip()
    if t == "seed":
        return None
    parts = t.split(".")
    parsed = None
    if len(parts) == 3:
        raise ValueError(
            f"kernel {s!r}: give the mainline release as \"X.Y\" (stable backports are not "
            f"modelled); known: {_known()}"
        )
    if len(parts) == 2:
        major, minor = _u16(parts[0]), _u16(parts[1])
        if major is not None and minor is not None:
            parsed = (major, minor)
    if parsed is None or parsed not in RELEASES:
        raise ValueError(f"unknown kernel version {s!r}; known: {_known()}")
    return parsed


@dataclasses.dataclass(frozen=True)
class KernelProfile:
    """What one kernel version does, as far as the simulation needs to know."""

    version: tuple[int, int] | None  # None: the seed series
    fpb: str | None  # folio_pte_batch form ("seed", "v6.9", "v6.10", "v6.15", "v6.17"); None: 6.8
    fork_batched: bool
    zap_batched: bool
    contpte: bool
    mprotect_batched: bool
    large_mapcount: bool
    mm_id: bool
    large_cow_reuse: str
    pagemap_exclusive_by_folio: bool
    thp_disable_except_advised: bool  # PR_THP_DISABLE_EXCEPT_ADVISED (v6.18, kernel/sys.c)
    # VM_SOFTDIRTY is sticky: a merge of existing VMAs keeps it if any had it (v6.19, mm/vma.c
    # vma_merge_existing_range(), "mm: propagate VM_SOFTDIRTY on merge")
    softdirty_sticky: bool
    # page cache and shmem (filemap.py, shmem.py)
    finish_fault_folio: str
    fault_around_whole_folio: bool  # filemap_map_folio_range() maps whole folios (v6.18)
    set_pte_dirty_folio: bool  # set_pte_range() dirties a writable PTE of a dirty folio (v6.16)
    shmem: str

    @classmethod
    def parse(cls, s: str) -> KernelProfile:
        """KernelProfile::parse()."""
        return cls.new(parse_version(s))

    @classmethod
    def new(cls, version: tuple[int, int] | None) -> KernelProfile:
        """KernelProfile::new(): the switches of ``version`` (None = seed series)."""

        def at_least(major: int, minor: int) -> bool:
            return version is not None and version >= (major, minor)

        if version is None:
            fpb = "seed"
        elif at_least(6, 17):
            fpb = "v6.17"
        elif at_least(6, 15):
            fpb = "v6.15"
        elif at_least(6, 10):
            fpb = "v6.10"
        elif at_least(6, 9):
            fpb = "v6.9"
        else:
            fpb = None
        if at_least(6, 15):
            reuse = MM_ID
        elif at_least(6, 9):
            reuse = NEVER
        else:
            reuse = REFCOUNT_ONE
        return cls(
            version=version,
            fpb=fpb,
            fork_batched=fpb is not None,
            zap_batched=at_least(6, 9),
            contpte=at_least(6, 9),
            mprotect_batched=at_least(6, 17),
            large_mapcount=at_least(6, 10),
            mm_id=at_least(6, 15),
            large_cow_reuse=reuse,
            pagemap_exclusive_by_folio=at_least(7, 0),
            thp_disable_except_advised=at_least(6, 18),
            softdirty_sticky=at_least(6, 19),
            finish_fault_folio=(FF_ANY_FILE if at_least(6, 18) else FF_SHMEM if at_least(6, 17)
                                else FF_ANON_SHMEM if at_least(6, 11) else FF_PAGE),
            fault_around_whole_folio=at_least(6, 18),
            set_pte_dirty_folio=at_least(6, 16),
            shmem=(SHMEM_UNIFIED if at_least(6, 14) else SHMEM_ANON_MTHP_FIXED if at_least(6, 13)
                   else SHMEM_ANON_MTHP if at_least(6, 11) else SHMEM_PMD_ONLY),
        )

    def unbatched(self) -> KernelProfile:
        """The same kernel with fork, zap and mprotect run one PTE at a time."""
        return dataclasses.replace(self, fork_batched=False, zap_batched=False, mprotect_batched=False)

"""shmem folio sizes: the sysfs shmem THP controls, the tmpfs ``huge=`` option and the order a
shmem fault allocates (rust/src/shmem.rs; mm/shmem.c ``shmem_is_huge()`` /
``shmem_huge_global_enabled()``, ``shmem_allowable_huge_orders()``, ``shmem_suitable_orders()``,
``shmem_alloc_and_add_folio()``; include/linux/huge_mm.h ``thp_vma_suitable_order()``)."""

from __future__ import annotations

import dataclasses

from .errors import out_of_memory, value_error
from .mm import NOT_CACHED

#: Top-level shmem_enabled / tmpfs huge= values (SHMEM_HUGE_*), in the kernel's listing order.
HUGE_NAMES = ("always", "within_size", "advise", "never", "deny", "force")
#: Per-size hugepages-<size>kB/shmem_enabled values (v6.11).
SIZE_NAMES = ("always", "inherit", "within_size", "advise", "never")
MAX_XAS_ORDER = 11  # MAX_PAGECACHE_ORDER is at most this


@dataclasses.dataclass
class ShmemPolicy:
    """The sysfs controls: the top level and one value per folio order (index = order)."""

    enabled: str
    sizes: list[str]

    @classmethod
    def new(cls, pmd_order: int) -> ShmemPolicy:
        """Boot defaults: shmem_enabled never, the PMD size "inherit", the others never."""
        sizes = ["never"] * 32
        sizes[pmd_order] = "inherit"
        return cls("never", sizes)

    def mask(self, which: str) -> int:
        """huge_shmem_orders_{always,inherit,madvise,within_size} as a bitmap."""
        return sum(1 << o for o in range(32) if self.sizes[o] == which)

    def updated(self, p, pmd_order: int, enabled: str | None, sizes: list[tuple[int, str]]) -> ShmemPolicy:
        """shmem_enabled_store() / thpsize_shmem_enabled_store(): "force" only while no size
        but the PMD size inherits (v6.11+)."""
        new = ShmemPolicy(self.enabled if enabled is None else enabled, list(self.sizes))
        per_size = p.shmem != "pmd-only"
        if sizes and not per_size:
            raise value_error(f"kernel {_version(p)} has no per-size shmem controls "
                              "(hugepages-<size>kB/shmem_enabled appeared in 6.11)")
        for order, v in sizes:
            if order == 0 or order > pmd_order:
                raise value_error(f"no hugepages-<size>kB/shmem_enabled for folio order {order}: sizes "
                                  "are 2 pages … the PMD size")
            new.sizes[order] = v
        if per_size and new.enabled == "force" and new.mask("inherit") & ~(1 << pmd_order):
            raise value_error('shmem_enabled "force" with a size other than the PMD size set to "inherit": '
                              "the kernel refuses it (EINVAL)")
        return new


def _version(p) -> str:
    return "seed" if p.version is None else f"{p.version[0]}.{p.version[1]}"


@dataclasses.dataclass
class ShmemFault:
    """What a shmem fault's order choice reads (rust ShmemFault)."""

    index: int  # file page of the fault
    i_size: int  # the object's size in pages
    kind: str  # "tmpfs" or "anon"
    huge: str | None  # the tmpfs huge= option
    vm_hugepage: bool
    vm_nohugepage: bool
    vma_start: int
    vma_end: int
    vma_pgoff: int
    vpn: int


def round_up(x: int, y: int) -> int:
    """round_up() — include/linux/math.h (assumes a power-of-two y)."""
    return ((x - 1) | (y - 1)) + 1


def orders_desc(orders: int) -> list[int]:
    """The set bits of ``orders``, highest first (highest_order() / next_order())."""
    return [o for o in range(31, -1, -1) if orders >> o & 1]


def thp_vma_suitable(order: int, f: ShmemFault) -> bool:
    """thp_vma_suitable_order() for a file VMA — include/linux/huge_mm.h"""
    n = 1 << order
    if (f.vma_start - f.vma_pgoff) & (n - 1):
        return False
    base = f.vpn & ~(n - 1)
    return base >= f.vma_start and base + n <= f.vma_end


def max_pagecache_order(st) -> int:
    return min(st.pmd_order, MAX_XAS_ORDER)


def all_file_orders(st) -> int:
    """THP_ORDERS_ALL_FILE_DEFAULT: orders 1 ..= MAX_PAGECACHE_ORDER."""
    return ((1 << (max_pagecache_order(st) + 1)) - 1) & ~1


def maybe_pmd_order(st) -> int:
    return 1 << st.pmd_order if st.pmd_order <= max_pagecache_order(st) else 0


def i_size_covers(f: ShmemFault, order: int) -> bool:
    """within_size: the object reaches past the aligned block of ``order`` holding the fault."""
    return f.i_size >= round_up(f.index + 1, 1 << order)


def huge_global(st, f: ShmemFault) -> int:
    """shmem_huge_global_enabled() (shmem_is_huge() before v6.14) for a fault: the PMD order or 0."""
    pmd = maybe_pmd_order(st)
    top = st.shmem_policy.enabled
    if top == "deny":
        return 0
    if top == "force":
        return pmd
    sb = f.huge if f.kind == "tmpfs" else top  # shm_mnt's superblock follows the top level
    if sb == "always":
        return pmd
    if sb == "within_size" and i_size_covers(f, st.pmd_order):
        return pmd
    if sb in ("within_size", "advise") and f.vm_hugepage:
        return pmd
    return 0


def allowable_orders(st, p, f: ShmemFault) -> int:
    """shmem_allowable_huge_orders() (v6.11+) / shmem_is_huge() (v6.8 - v6.10)."""
    if f.vm_nohugepage:
        return 0
    glob = huge_global(st, f)
    if f.kind != "anon" or p.shmem == "pmd-only":
        return glob
    pol = st.shmem_policy
    if pol.enabled == "deny":
        return 0
    if pol.enabled == "force":
        return pol.mask("inherit")
    mask = pol.mask("always")
    within = pol.mask("within_size")
    first = None
    if p.shmem == "anon-mthp":
        # v6.11, v6.12: rounded to `order`, not 1 << order, and carried to the next order.
        index = f.index
        for o in orders_desc(within):
            index = round_up(index + 1, o)
            if f.i_size >= index:
                first = o
                break
    else:
        first = next((o for o in orders_desc(within) if i_size_covers(f, o)), None)
    if first is not None:
        mask |= within & ((2 << first) - 1)
    if f.vm_hugepage:
        mask |= pol.mask("advise")
    if glob:
        mask |= pol.mask("inherit")
    return mask & all_file_orders(st)


def shmem_alloc_folio(st, p, file: int, f: ShmemFault) -> tuple[int, int, int]:
    """shmem_suitable_orders() + shmem_alloc_and_add_folio(): (head, order, first index)."""
    orders = allowable_orders(st, p, f)
    if p.shmem == "pmd-only":
        vma_checked = False
    elif p.shmem in ("anon-mthp", "anon-mthp-fixed"):
        vma_checked = f.kind == "anon"
    else:
        vma_checked = True
    if vma_checked:
        orders = sum(1 << o for o in orders_desc(orders) if thp_vma_suitable(o, f))
    cache = st.files[file].cache

    def free(o: int) -> bool:
        base = f.index & ~((1 << o) - 1)
        return all(c == NOT_CACHED for c in cache[base:base + (1 << o)])

    first = next((o for o in orders_desc(orders) if free(o)), None)
    if first is None:
        candidates = 0
    elif vma_checked:
        candidates = orders & ((2 << first) - 1)
    else:
        candidates = 1 << first  # a conflicting PMD range means a page (-E2BIG)
    for o in orders_desc(candidates):
        if st.mem.fragmented(o):
            continue
        h = st.mem.alloc(o)
        if h is not None:
            return h, o, f.index & ~((1 << o) - 1)
    h = st.mem.alloc(0)
    if h is None:
        raise out_of_memory()
    return h, 0, f.index


"""The THP policy for anonymous memory as the kernel reads it at a fault (rust/src/policy.rs):
the sysfs controls (``transparent_hugepage/enabled``, ``hugepages-<size>kB/enabled``), the VMA
flags VM_HUGEPAGE / VM_NOHUGEPAGE and PR_SET_THP_DISABLE; include/linux/huge_mm.h and
mm/huge_memory.c, v6.8 – v7.0."""

from __future__ import annotations

import dataclasses

from .errors import value_error
from .kernel import KernelProfile

ENABLED_NAMES = ("always", "madvise", "never")  # the top-level control
SIZE_NAMES = ("always", "inherit", "madvise", "never")  # a per-size control

# PR_SET_THP_DISABLE's state of an mm, as prctl(PR_GET_THP_DISABLE) reports it (kernel/sys.c):
# MMF_DISABLE_THP (MMF_DISABLE_THP_COMPLETELY from v6.18) and MMF_DISABLE_THP_EXCEPT_ADVISED.
THP_DISABLE_NO, THP_DISABLE_COMPLETELY, THP_DISABLE_EXCEPT_ADVISED = 0, 1, 3


def thp_orders_all_anon(pmd_order: int) -> int:
    """THP_ORDERS_ALL_ANON — include/linux/huge_mm.h: orders 2 ..= PMD_ORDER."""
    return ((1 << (pmd_order + 1)) - 1) & ~0b11


@dataclasses.dataclass
class ThpPolicy:
    """The sysfs controls as the kernel keeps them: the top-level mode and one order mask per
    per-size mode (huge_anon_orders_always / _madvise / _inherit; in none of them = never)."""

    enabled: str
    orders_always: int
    orders_madvise: int
    orders_inherit: int

    @classmethod
    def default_for(cls, pmd_order: int) -> ThpPolicy:
        """hugepage_init_sysfs() — mm/huge_memory.c: the PMD size "inherit", the others "never";
        the top level "madvise" (a Kconfig choice; distributions run "madvise")."""
        return cls("madvise", 0, 0, 1 << pmd_order)

    def size_mode(self, order: int) -> str:
        bit = 1 << order
        if self.orders_always & bit:
            return "always"
        if self.orders_inherit & bit:
            return "inherit"
        if self.orders_madvise & bit:
            return "madvise"
        return "never"

    def set_size_mode(self, order: int, mode: str) -> None:
        """thpsize_enabled_store() — mm/huge_memory.c: the order moves to one mask."""
        bit = 1 << order
        self.orders_always &= ~bit
        self.orders_madvise &= ~bit
        self.orders_inherit &= ~bit
        if mode == "always":
            self.orders_always |= bit
        elif mode == "madvise":
            self.orders_madvise |= bit
        elif mode == "inherit":
            self.orders_inherit |= bit

    def sysfs_orders(self, vm_hugepage: bool) -> int:
        """The sysfs part of thp_vma_allowable_orders() — include/linux/huge_mm.h"""
        mask = self.orders_always
        if vm_hugepage:
            mask |= self.orders_madvise
        if self.enabled == "always" or (vm_hugepage and self.enabled != "never"):
            mask |= self.orders_inherit
        return mask


def vma_thp_disabled(vma, thp_disable: int) -> bool:
    """vma_thp_disabled() — include/linux/huge_mm.h (v6.12+; inline before): VM_NOHUGEPAGE,
    PR_SET_THP_DISABLE, or (v6.18+) its "except advised" form for VMAs without VM_HUGEPAGE."""
    if vma.nohugepage:
        return True
    if thp_disable == THP_DISABLE_COMPLETELY:
        return True
    if thp_disable == THP_DISABLE_EXCEPT_ADVISED:
        return not vma.hugepage
    return False


def thp_vma_suitable_orders(vma, vpn: int, orders: int) -> int:
    """thp_vma_suitable_orders() — include/linux/huge_mm.h, anonymous VMA: drops the orders
    whose aligned range around ``vpn`` leaves the VMA."""
    for o in range(31, -1, -1):
        if not orders & (1 << o):
            continue
        n = 1 << o
        base = vpn & ~(n - 1)
        if vma.start <= base and base + n <= vma.end():
            break  # every lower order's range lies inside this one
        orders &= ~(1 << o)
    return orders


def thp_vma_allowable_orders(st, k: int, v: int) -> int:
    """thp_vma_allowable_orders(vma, vm_flags, TVA_PAGEFAULT, orders) — include/linux/huge_mm.h,
    mm/huge_memory.c: the large orders a fault on the anonymous VMA may use, up to and including
    the PMD order. An explicit size list given at mmap (``Vma.mthp``) stands in for the sysfs
    controls; VM_NOHUGEPAGE and PR_SET_THP_DISABLE still apply."""
    vma = st.mms[k].vmas[v]
    if not vma.is_anon() or vma_thp_disabled(vma, st.mms[k].thp_disable):
        return 0
    mask = vma.mthp if vma.mthp else st.thp.sysfs_orders(vma.hugepage)
    return mask & thp_orders_all_anon(st.pmd_order)


def vma_max_order(st, k: int, v: int) -> int:
    """The largest folio order faults on the VMA may allocate (for the worst-case bound)."""
    return (thp_vma_allowable_orders(st, k, v) | 1).bit_length() - 1


def prctl_thp_disable_state(p: KernelProfile, disable: bool, except_advised: bool) -> int:
    """prctl_set_thp_disable() — kernel/sys.c: the mm's new state, or a ValueError for EINVAL."""
    if except_advised and not p.thp_disable_except_advised:
        version = "seed" if p.version is None else f"{p.version[0]}.{p.version[1]}"
        raise value_error(f"PR_THP_DISABLE_EXCEPT_ADVISED is not in kernel {version} (it came in 6.18; "
                          "older kernels return EINVAL)")
    if except_advised and not disable:
        raise value_error("except_advised applies only when disabling THP (the kernel returns EINVAL)")
    if not disable:
        return THP_DISABLE_NO
    return THP_DISABLE_EXCEPT_ADVISED if except_advised else THP_DISABLE_COMPLETELY

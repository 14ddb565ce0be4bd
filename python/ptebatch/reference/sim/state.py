"""The simulated system's state and the helpers every operation shares (the ``State`` half of
rust/src/sim.rs)."""

from __future__ import annotations

from .kernel import KernelProfile
from .memory import Memory
from .mm import FIXED, File, Mm, Pin, Vma
from .policy import ThpPolicy, vma_max_order
from .shmem import ShmemPolicy
from .rmap import Rmap
from .stats import Stats

U32_MASK = (1 << 32) - 1


class State:
    """Physical memory, processes, files, pins and counters."""

    def __init__(self, mem: Memory, zero_pfn: int, page_shift: int, ptrs_per_pte: int,
                 pmd_order: int) -> None:
        self.mem = mem
        self.mms: list[Mm] = []
        self.files: list[File] = []
        self.pins: list[Pin] = []
        self.op = Stats()  # the last operation's counters
        self.total = Stats()  # the whole run's
        self.next_token = 1  # 0 is "zero-filled"
        self.next_anon_vma = 1
        self.zero_pfn = zero_pfn  # one past the end of RAM, never allocated
        self.page_shift = page_shift
        self.ptrs_per_pte = ptrs_per_pte
        self.pmd_order = pmd_order
        self.thp = ThpPolicy.default_for(pmd_order)  # the sysfs THP controls
        self.fault_around_pages = max(65536 >> page_shift, 1)  # mm/memory.c fault_around_pages
        self.shmem_policy = ShmemPolicy.new(pmd_order)  # the sysfs shmem THP controls

    def new_token(self) -> int:
        """The next content token a write stores (u32, wrapping past 0)."""
        t = self.next_token
        self.next_token = max((t + 1) & U32_MASK, 1)
        return t

    def new_anon_vma(self) -> int:
        """anon_vma_prepare(): a new anon_vma id."""
        a = self.next_anon_vma
        self.next_anon_vma += 1
        return a

    def locate(self, k: int, vpn: int) -> tuple[int, int]:
        """(VMA index, entry index) of a vpn the caller checked is mapped."""
        mm = self.mms[k]
        v = mm.find_vma(vpn)
        assert v is not None, "range checked by the caller"
        return v, vpn - mm.vmas[v].start

    def token_at(self, l, k: int, vpn: int) -> int:
        """The content token process ``k`` sees at ``vpn`` (0 for none PTEs and the zero page)."""
        mm = self.mms[k]
        v = mm.find_vma(vpn)
        if v is None:
            return 0
        vma = mm.vmas[v]
        from .huge_memory import huge_pmd_page

        mapped, page = huge_pmd_page(self, l, vma, vpn)
        if mapped:
            return 0 if page is None else self.mem.token[page]
        pte = vma.ptes[vpn - vma.start]
        if l.pte_none(pte):
            return 0
        page = self.vm_normal_page(l, pte)
        return 0 if page is None else self.mem.token[page]

    def worst_case_pages(self, k: int, a: int, b: int) -> int:
        """Pages faults over [a, b) can allocate at most: two per page (page-cache page and private
        copy) plus one largest folio at each end."""
        mm = self.mms[k]
        max_order = 0
        at = a
        while at < b:
            v = mm.find_vma(at)
            if v is None:
                break
            vma = mm.vmas[v]
            max_order = max(max_order, vma_max_order(self, k, v))
            if vma.thp_pmd:
                max_order = max(max_order, self.pmd_order)
            if vma.file is not None:
                f = self.files[vma.file]
                max_order = max(max_order, f.folio_order if f.kind == FIXED else self.pmd_order)
            at = vma.end()
        return 2 * (b - a) + 2 * (1 << max_order)

    def vm_normal_page(self, l, pte: int) -> int | None:
        """vm_normal_page() — mm/memory.c: None for special PTEs and the shared zero page."""
        if l.pte_special(pte):
            return None
        pfn = l.pte_pfn(pte)
        return pfn if pfn != self.zero_pfn else None

    def rmap(self, p: KernelProfile) -> Rmap:
        return Rmap(self.mem, self.op, p)

    def wants_writenotify(self, l, vma: Vma) -> bool:
        """vma_wants_writenotify() for a shared mapping — mm/mmap.c"""
        file_accounts_dirty = vma.file is not None and not self.files[vma.file].shmem
        return file_accounts_dirty or vma.soft_dirty_tracking(l)

    def page_prot_write(self, l, vma: Vma) -> bool:
        """vm_page_prot's write bit: shared mappings without write-notify only — mm/mmap.c"""
        return vma.prot.write and vma.shared and not self.wants_writenotify(l, vma)

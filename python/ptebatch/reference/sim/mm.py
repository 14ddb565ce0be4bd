"""Address spaces: mm_structs with their VMAs (each VMA's PTEs as one list), rss counters, and
the page-cache objects that file-backed VMAs map (rust/src/mm.rs)."""

from __future__ import annotations

import bisect
import dataclasses

from .memory import PG_ANON, PG_SWAPBACKED

MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES = 0, 1, 2  # include/linux/mm_types_task.h
RSS_NAMES = ("file", "anon", "shmem")
NOT_CACHED = (1 << 64) - 1  # a file page that is not in the page cache


def mm_counter(mem, head: int) -> int:
    """mm_counter() — include/linux/mm.h: the rss counter a folio's pages count in."""
    if mem.test(head, PG_ANON):
        return MM_ANONPAGES
    if mem.test(head, PG_SWAPBACKED):
        return MM_SHMEMPAGES
    return MM_FILEPAGES


@dataclasses.dataclass(frozen=True)
class Prot:
    """PROT_READ | PROT_WRITE | PROT_EXEC; all False is PROT_NONE."""

    read: bool = False
    write: bool = False
    exec: bool = False

    @classmethod
    def parse(cls, s: str) -> Prot | None:
        """"rw", "r", "rwx", "none", "" (PROT_NONE), in any letter order; None if malformed."""
        if s == "none":
            return cls()
        read = write = exe = False
        for c in s:
            if c == "r":
                read = True
            elif c == "w":
                write = True
            elif c == "x":
                exe = True
            elif c != "-":
                return None
        return cls(read, write, exe)

    def none(self) -> bool:
        return not (self.read or self.write or self.exec)

    def as_string(self) -> str:
        if self.none():
            return "none"
        return ("r" if self.read else "") + ("w" if self.write else "") + ("x" if self.exec else "")


@dataclasses.dataclass
class Vma:
    """A vm_area_struct; addresses are virtual page numbers, ``ptes[i]`` maps ``start + i``."""

    start: int
    ptes: list[int]
    prot: Prot
    shared: bool  # VM_SHARED (VM_MAYWRITE assumed: a private mapping is a COW mapping)
    file: int | None  # the file or shmem object mapped
    pgoff: int  # the file page of ``start``
    vm_softdirty: bool  # VM_SOFTDIRTY: soft-dirty tracking is on only while it is clear
    uffd_wp: bool  # VM_UFFD_WP
    uffd_event_fork: bool  # UFFD_FEATURE_EVENT_FORK: the child keeps VM_UFFD_WP
    dontfork: bool  # VM_DONTCOPY (MADV_DONTFORK)
    wipeonfork: bool  # VM_WIPEONFORK
    anon_vma: int  # 0 = none yet
    # Orders of an explicit size list given at mmap (bit 0 always set), standing in for the
    # sysfs controls; 0 = follow the THP policy (policy.py).
    mthp: int
    hugepage: bool = False  # VM_HUGEPAGE (MADV_HUGEPAGE)
    nohugepage: bool = False  # VM_NOHUGEPAGE (MADV_NOHUGEPAGE)
    thp_pmd: bool = False  # pmd=True: faults map PMD THPs where they can
    #: huge PMDs: first vpn of the PMD range → PMD entry (a PTE value); their PTEs stay none
    pmds: dict[int, int] = dataclasses.field(default_factory=dict)

    def end(self) -> int:
        return self.start + len(self.ptes)

    def contains(self, vpn: int) -> bool:
        return self.start <= vpn < self.end()

    def is_cow(self) -> bool:
        """is_cow_mapping() — include/linux/mm.h"""
        return not self.shared

    def is_anon(self) -> bool:
        """A private anonymous mapping (shared anonymous memory is a shmem object)."""
        return self.file is None

    def soft_dirty_tracking(self, layout) -> bool:
        """vma_soft_dirty_enabled() — include/linux/mm.h"""
        return layout.has_soft_dirty and not self.vm_softdirty

    def clone_without_ptes(self) -> Vma:
        return dataclasses.replace(self, ptes=[], pmds={})

    def split_off(self, at: int) -> Vma:
        """__split_vma() — mm/vma.c: this VMA keeps [start, at), the returned one is [at, end)."""
        k = at - self.start
        tail = self.clone_without_ptes()
        tail.start = at
        tail.ptes = self.ptes[k:]
        del self.ptes[k:]
        # A huge PMD never straddles ``at``: the caller split it (vma_adjust_trans_huge()).
        tail.pmds = {b: e for b, e in self.pmds.items() if b >= at}
        self.pmds = {b: e for b, e in self.pmds.items() if b < at}
        if tail.file is not None:
            tail.pgoff = self.pgoff + k
        return tail

    def same_flags(self, o: Vma) -> bool:
        """What is_mergeable_vma() — mm/vma.c compares: the flags but VM_SOFTDIRTY, the file,
        and the model's per-mapping settings."""
        return (
            self.prot == o.prot
            and self.shared == o.shared
            and self.file == o.file
            and self.uffd_wp == o.uffd_wp
            and self.uffd_event_fork == o.uffd_event_fork
            and self.dontfork == o.dontfork
            and self.wipeonfork == o.wipeonfork
            and self.mthp == o.mthp
            and self.hugepage == o.hugepage
            and self.nohugepage == o.nohugepage
            and self.thp_pmd == o.thp_pmd
        )

    def can_merge(self, nxt: Vma) -> bool:
        """vma_merge() rules the model has: the same flags but VM_SOFTDIRTY, contiguous file
        offsets, compatible anon_vma."""
        return (
            self.end() == nxt.start
            and self.same_flags(nxt)
            and (self.file is None or self.pgoff + len(self.ptes) == nxt.pgoff)
            and (self.anon_vma == 0 or nxt.anon_vma == 0 or self.anon_vma == nxt.anon_vma)
        )


#: What VM_SOFTDIRTY a merged VMA gets (SoftDirtyMerge): "set" for a new mapping
#: (__mmap_complete() — mm/vma.c); "modified" up to v6.18, where mprotect_fixup() and
#: madvise_update_vma() reset the merged VMA's flags to the changed VMA's, so the last changed
#: VMA of a run decides; "sticky" from v6.19 (VM_STICKY): set if any merged VMA had it.
SD_SET, SD_MODIFIED, SD_STICKY = "set", "modified", "sticky"


def pair_merges(a: Vma, b: Vma, changed: tuple[bool, bool], softdirty: tuple[bool, bool]) -> bool:
    """Whether adjacent VMAs a, b merge: can_merge, and a VMA the operation left alone starts no
    merge (mprotect_fixup() and madvise_update_vma() return early), so two such that differ in
    VM_SOFTDIRTY (``softdirty``: before any merge) stay apart."""
    return a.can_merge(b) and (changed[0] or changed[1] or softdirty[0] == softdirty[1])


@dataclasses.dataclass
class Mm:
    """An mm_struct."""

    pid: int
    mm_id: int  # never 0 (MM_ID_DUMMY)
    vmas: list[Vma]  # sorted by start, non-overlapping
    rss: list[int]  # MM_FILEPAGES, MM_ANONPAGES, MM_SHMEMPAGES
    has_pinned: bool  # MMF_HAS_PINNED
    exited: bool
    next_vpn: int  # where the next mmap without an address goes
    thp_disable: int = 0  # PR_SET_THP_DISABLE (policy.THP_DISABLE_*), inherited at fork

    def find_vma(self, vpn: int) -> int | None:
        """find_vma(), exact: the index of the VMA holding ``vpn``."""
        k = bisect.bisect_right([v.start for v in self.vmas], vpn)  # (no key=: Python 3.9)
        return k - 1 if k > 0 and self.vmas[k - 1].contains(vpn) else None

    def fully_mapped(self, lo: int, hi: int) -> bool:
        """Whether every page of [lo, hi) lies in some VMA."""
        at = lo
        while at < hi:
            k = self.find_vma(at)
            if k is None:
                return False
            at = self.vmas[k].end()
        return True

    def split_at(self, at: int) -> None:
        """Splits the VMA holding ``at`` so that ``at`` is a boundary."""
        k = self.find_vma(at)
        if k is not None and self.vmas[k].start != at:
            self.vmas.insert(k + 1, self.vmas[k].split_off(at))

    def isolate(self, lo: int, hi: int) -> range:
        """Indices of the VMAs inside [lo, hi) after splitting at both ends."""
        self.split_at(lo)
        self.split_at(hi)
        a = bisect.bisect_right([v.end() for v in self.vmas], lo)  # first with end > lo
        b = bisect.bisect_left([v.start for v in self.vmas], hi)  # first with start >= hi
        return range(a, max(a, b))

    def merge_around(self, r: range) -> None:
        """After a new mapping was inserted as the VMAs ``r``: merges it with the neighbours
        Vma.can_merge allows; a merged VMA gets VM_SOFTDIRTY."""
        self.merge_window(r, [True] * len(r), SD_SET)

    def modify(self, p, lo: int, hi: int, change) -> None:
        """vma_modify_flags() — mm/vma.c as mprotect_fixup() and madvise_update_vma() call it:
        ``change`` applied to the VMAs of [lo, hi) after splitting them at both ends, then
        merged with each other and their neighbours."""
        r = self.isolate(lo, hi)
        changed = []
        for v in self.vmas[r.start:r.stop]:
            before = v.clone_without_ptes()
            change(v)
            changed.append(not v.same_flags(before))
        self.merge_window(r, changed, SD_STICKY if p.softdirty_sticky else SD_MODIFIED)

    def merge_window(self, r: range, changed: list[bool], rule: str) -> None:
        """Merges the VMAs ``r`` (``changed[i]``: whether the operation changed VMA
        ``r.start + i``) with each other and their neighbours, right to left."""
        lo = max(r.start - 1, 0)
        hi = min(r.stop + 1, len(self.vmas))
        if hi <= lo + 1:
            return
        sd = [v.vm_softdirty for v in self.vmas]  # before any merge
        ch = [i in r and changed[i - r.start] for i in range(len(self.vmas))]
        run = [hi - 1]  # the VMAs merged into the run at index k so far
        k = hi - 1
        while k > lo:
            prev, nxt = self.vmas[k - 1], self.vmas[k]
            if pair_merges(prev, nxt, (ch[k - 1], ch[k]), (sd[k - 1], sd[k])):
                self.vmas.pop(k)
                if prev.anon_vma == 0:
                    prev.anon_vma = nxt.anon_vma
                prev.ptes.extend(nxt.ptes)
                prev.pmds.update(nxt.pmds)
                run.insert(0, k - 1)
                if rule == SD_SET:
                    prev.vm_softdirty = True
                elif rule == SD_STICKY:
                    prev.vm_softdirty = any(sd[i] for i in run)
                else:
                    last = [sd[i] for i in run if ch[i]]
                    # A run no changed VMA joined has one VM_SOFTDIRTY (pair_merges).
                    prev.vm_softdirty = last[-1] if last else sd[k - 1]
            else:
                run = [k - 1]
            k -= 1

#: How a shmem object chooses its folio sizes (ShmemKind): "fixed" (not shmem, or filled with
#: folios of its folio_order), "tmpfs" (a mount with ``huge``), "anon" (shared anonymous memory).
FIXED, TMPFS, ANON = "fixed", "tmpfs", "anon"


@dataclasses.dataclass
class File:
    """A file or shmem object; ``cache[index]`` is the pfn of that page or NOT_CACHED. A shmem
    object's cache reaches to the next PMD boundary (a huge folio may extend past i_size)."""

    nr_pages: int  # i_size in pages
    folio_order: int  # the order the page cache is filled with where no shmem policy applies
    shmem: bool
    cache: list[int]
    kind: str = FIXED
    huge: str | None = None  # the tmpfs huge= option

    @staticmethod
    def cache_len(nr_pages: int, shmem: bool, pmd_pages: int) -> int:
        return -(-nr_pages // pmd_pages) * pmd_pages if shmem else nr_pages


@dataclasses.dataclass
class Pin:
    """A FOLL_PIN pin of a user range."""

    pfns: list[int]
    write: bool  # FOLL_WRITE: the device may write into the pages
    longterm: bool
    active: bool


def user_pte(l, pfn: int, prot: Prot, page_prot_write: bool, dirty: bool) -> int:
    """mk_pte(page, vm_page_prot), pte_sw_mkyoung(), then pte_mkwrite(pte_mkdirty()) as asked."""
    v = l.pfn_pte_template(pfn, prot.exec, prot.none())
    v = l.pte_mkyoung(v)
    if dirty:
        v = l.pte_mkdirty(v)
    if page_prot_write:
        v = l.pte_mkwrite(v)
    return v

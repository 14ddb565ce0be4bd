"""The public ``Simulation``: argument checks, the all-or-nothing rule, and the operations
(the ``Simulation`` half of rust/src/sim.rs, with the Python binding's argument conversion).

Every operation either succeeds or raises with the state untouched: arguments are checked
first, and an operation that may run out of memory half-way runs on a copy of the state when
free memory is short of its worst case.
"""

from __future__ import annotations

import collections.abc
import copy
import dataclasses
import decimal
import operator
from typing import Sequence

from .. import layouts
from . import check as check_mod
from . import contpte, fault, fork, huge_memory, mprotect, policy, procfs, restore, zap
from .errors import value_error
from .kernel import KernelProfile
from .memory import (
    FREE,
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_FILE,
    PG_MAYBE_SHARED,
    PG_PARTIALLY_MAPPED,
    PG_SWAPBACKED,
    Memory,
)
from . import shmem as shmem_mod
from .mm import ANON, FIXED, NOT_CACHED, RSS_NAMES, TMPFS, File, Mm, Prot, Vma
from .state import State
from .stats import Stats

MMAP_BASE = 0x10_0000_0000  # where the first mmap of a process goes (bytes)
U32_MAX = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
USER_END = 1 << 56
#: The largest mapping the model takes, in pages (rust/src/sim.rs MAX_VMA_PAGES).
MAX_VMA_PAGES = 1 << 31


# ---- argument conversion (what the binding's PyO3 extraction does) ----------------------------

def _not_instance(value: object, expected: str) -> TypeError:
    """PyO3's message for an argument of the wrong type."""
    if value is None:
        return TypeError(f"'None' is not an instance of '{expected}'")
    return TypeError(f"'{type(value).__name__}' object is not an instance of '{expected}'")


def _u32(value: object) -> int:
    """A u32 argument: anything with __index__ (bools too); OverflowError out of range."""
    number = operator.index(value)  # type: ignore[arg-type]
    if number >= 1 << 63 or number < -(1 << 63):
        raise OverflowError("Python int too large to convert to C long")
    if not 0 <= number <= U32_MAX:
        raise OverflowError("out of range integral type conversion attempted")
    return number


def _u64(value: object) -> int:
    """A u64 argument: anything with __index__ (bools too); OverflowError out of range."""
    number = operator.index(value)  # type: ignore[arg-type]
    if number < 0:
        raise OverflowError("can't convert negative int to unsigned")
    if number > U64_MAX:
        raise OverflowError("int too big to convert")
    return number


def _bool(value: object) -> bool:
    """A bool argument: a Python or numpy bool, nothing else."""
    if isinstance(value, bool) or type(value).__name__ == "bool" and type(value).__module__ == "numpy":
        return bool(value)
    raise _not_instance(value, "bool")


def _f64(value: object) -> float:
    """A float argument: anything with __float__ or __index__ (not a str)."""
    cls = type(value)
    if hasattr(cls, "__float__"):
        return cls.__float__(value)  # type: ignore[attr-defined]
    if hasattr(cls, "__index__"):
        return float(operator.index(value))  # type: ignore[arg-type]
    raise TypeError(f"must be real number, not {cls.__name__}")


def _rust_float(x: float) -> str:
    """``x`` as Rust's Display prints an f64 (no exponent, no trailing ".0")."""
    if x != x:
        return "NaN"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    text = format(decimal.Decimal(repr(x)), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise _not_instance(value, "str")
    return value


def _u64_list(value: object) -> list[int]:
    """A Vec<u64> argument: a sequence (not a str) of unsigned integers."""
    if isinstance(value, str):
        raise TypeError("Can't extract `str` to `Vec`")
    if isinstance(value, collections.abc.Mapping) or not hasattr(type(value), "__getitem__") \
            or not hasattr(type(value), "__len__"):
        raise _not_instance(value, "Sequence")
    return [_u64(v) for v in value]  # type: ignore[attr-defined]


def _rust_str(s: str) -> str:
    """``s`` as Rust's ``{:?}`` prints it (for the plain names used here)."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _prot(value: str) -> Prot:
    prot = Prot.parse(value)
    if prot is None:
        raise ValueError(f'prot "{value}": use letters r, w, x (e.g. "rw") or "none"')
    return prot


def order_of_size(size: int, page_shift: int) -> int | None:
    """The folio order of ``size`` bytes, if it is a power of two of at least one page."""
    if size == 0 or size & (size - 1) or size < (1 << page_shift):
        return None
    return (size & -size).bit_length() - 1 - page_shift


class Simulation:
    """A simulated machine: a PTE layout, a kernel version and the whole system state."""

    FREE_ORDER = FREE

    def __init__(self, arch: str, kernel: str, memory: int, seed: int = 0,
                 batching: bool = True) -> None:
        arch, kernel, memory, seed = _str(arch), _str(kernel), _u64(memory), _u64(seed)
        batching = _bool(batching)
        if arch not in layouts.LAYOUT_NAMES:
            raise value_error(f'unknown layout "{arch}"; known layouts: {", ".join(layouts.LAYOUT_NAMES)}')
        profile = KernelProfile.parse(kernel)
        self.arch, self.kernel, self.batching = arch, kernel, batching
        self.layout = layouts.layout(arch)
        self.profile = profile if batching else profile.unbatched()
        l = self.layout
        page = 1 << l.page_shift
        if memory == 0 or memory % page != 0:
            raise value_error(f"memory {memory} bytes is not a positive multiple of the {page}-byte page")
        nr_pages = memory // page
        if nr_pages + 1 > l.max_pfn:
            raise value_error(f"{nr_pages} pages do not fit the {l.name} PFN field")
        pmd_order = l.ptrs_per_pte.bit_length() - 1
        self.st = State(Memory(nr_pages, pmd_order, seed), zero_pfn=nr_pages,
                        page_shift=l.page_shift, ptrs_per_pte=l.ptrs_per_pte, pmd_order=pmd_order)

    def __repr__(self) -> str:
        live = sum(1 for m in self.st.mms if not m.exited)
        return (f'Simulation(arch="{self.arch}", kernel="{self.kernel}", '
                f"memory={self.nr_pages * self.page_size}, batching={str(self.batching).lower()}, "
                f"processes={live})")

    def clone(self) -> Simulation:
        """An independent copy."""
        return copy.deepcopy(self)

    # ---- the all-or-nothing rule ------------------------------------------------------------

    def _begin(self) -> None:
        self.st.op = Stats()

    def _end(self) -> None:
        self.st.total.add(self.st.op)

    def _guarded(self, worst_case: int, f):
        """Runs ``f(state)``; below ``worst_case`` free pages, on a copy kept only on success."""
        self._begin()
        try:
            if self.st.mem.free_pages >= worst_case:
                return f(self.st)
            trial = copy.deepcopy(self.st)
            result = f(trial)
            self.st = trial
            return result
        finally:
            self._end()

    # ---- argument checks ----------------------------------------------------------------

    def _mm_index(self, pid: int) -> int:
        k = pid - 1
        if not 0 <= k < len(self.st.mms):
            raise value_error(f"no process {pid}")
        if self.st.mms[k].exited:
            raise value_error(f"process {pid} has exited")
        return k

    def _mm(self, pid: int) -> Mm:
        """The mm of ``pid``, exited or not."""
        if not 1 <= pid <= len(self.st.mms):
            raise value_error(f"no process {pid}")
        return self.st.mms[pid - 1]

    def _vrange(self, addr: int, length: int) -> tuple[int, int]:
        """A non-empty, page-aligned user range as vpns."""
        ps = self.page_size
        if addr % ps != 0 or length % ps != 0:
            raise value_error(f"range {addr:#x}+{length:#x} is not aligned to the {ps}-byte page")
        if length == 0:
            raise value_error("empty range")
        end = addr + length
        if end > U64_MAX or end > USER_END:
            raise value_error(f"range {addr:#x}+{length:#x} leaves the 56-bit user address space")
        return addr >> self.st.page_shift, end >> self.st.page_shift

    def _mapped_range(self, k: int, addr: int, length: int) -> tuple[int, int]:
        a, b = self._vrange(addr, length)
        if not self.st.mms[k].fully_mapped(a, b):
            raise value_error(f"range {addr:#x}+{length:#x} is not entirely mapped in process "
                              f"{self.st.mms[k].pid}")
        return a, b

    # ---- properties -------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return 1 << self.st.page_shift

    @property
    def zero_pfn(self) -> int:
        return self.st.zero_pfn

    @property
    def nr_pages(self) -> int:
        return self.st.mem.nr_pages()

    @property
    def free_pages(self) -> int:
        return self.st.mem.free_pages

    @property
    def stats(self) -> dict:
        """Counters of the whole run."""
        return self.st.total.as_dict()

    @property
    def last_stats(self) -> dict:
        """Counters of the last operation."""
        return self.st.op.as_dict()

    # ---- configuration, processes and mappings ----------------------------------------------

    def set_fallback(self, order: int, p: float) -> None:
        """Allocations of ``order`` fail with probability ``p``, as if memory were fragmented."""
        order, p = _u32(order), _f64(p)
        if order == 0 or order > self.st.pmd_order:
            raise value_error(f"fragmentation applies to folio orders 1..={self.st.pmd_order}, not {order}")
        if not 0.0 <= p <= 1.0:
            raise value_error(f"fallback probability {_rust_float(p)} is not in [0, 1]")
        self.st.mem.fallback[order] = p

    def spawn(self) -> int:
        """A new process with an empty address space; returns its pid."""
        pid = len(self.st.mms) + 1
        self.st.mms.append(Mm(pid=pid, mm_id=pid, vmas=[], rss=[0, 0, 0], has_pinned=False,
                              exited=False, next_vpn=MMAP_BASE >> self.st.page_shift))
        return pid

    def create_file(self, size: int, folio_size: int, shmem: bool = False, huge: str | None = None) -> int:
        """A file (or shmem object) of ``size`` bytes; returns its id. A regular file's page cache
        is filled with folios of ``folio_size``; a shmem object on a tmpfs mount with ``huge``
        chooses its folio sizes as mm/shmem.c does."""
        size, folio_size, shmem = _u64(size), _u64(folio_size), _bool(shmem)
        huge = None if huge is None else _str(huge)
        ps = self.page_size
        order = order_of_size(folio_size, self.st.page_shift)
        if order is None or order > self.st.pmd_order:
            raise value_error(f"folio size {folio_size} is not a power of two between the page "
                              "size and the PMD size")
        kind = FIXED
        if huge is not None:
            if not shmem:
                raise value_error("huge= is a tmpfs mount option: it needs shmem=True")
            if huge not in ("never", "always", "within_size", "advise"):
                raise value_error(f"huge={_rust_str(huge)}: a tmpfs mount takes never, always, within_size or advise")
            if order != 0:
                raise value_error(f"folio size {folio_size} with huge={_rust_str(huge)}: on a tmpfs mount the "
                                  "shmem policy chooses the folio size (leave folio_size at the page size)")
            kind = TMPFS
        if size == 0 or size % (ps << order) != 0:
            raise value_error(f"file size {size} is not a positive multiple of its folio size {folio_size}")
        nr = size // ps
        n = File.cache_len(nr, shmem, self.st.ptrs_per_pte)
        self.st.files.append(File(nr_pages=nr, folio_order=order, shmem=shmem, cache=[NOT_CACHED] * n,
                                  kind=kind, huge=huge))
        return len(self.st.files) - 1

    # ---- fault-around and the shmem controls (filemap.py, shmem.py) --------------------------

    @property
    def fault_around_bytes(self) -> int:
        return self.st.fault_around_pages * self.page_size

    @fault_around_bytes.setter
    def fault_around_bytes(self, value: int) -> None:
        """Set as the debugfs file is, but strictly: a power of two, page size .. a page table."""
        b = _u64(value)
        ps = self.page_size
        top = ps * self.st.ptrs_per_pte
        if b == 0 or b & (b - 1) or b < ps or b > top:
            raise value_error(f"fault_around_bytes {b} is not a power of two from {ps} to {top} (the kernel "
                              f"rounds other values down and refuses ones above {top})")
        self.st.fault_around_pages = b // ps

    def set_shmem_policy(self, enabled: str | None = None, sizes: Sequence = ()) -> None:
        """The sysfs shmem controls: top-level ``enabled`` and (v6.11+) per size in bytes."""
        enabled = None if enabled is None else _str(enabled)
        if isinstance(sizes, str):
            raise TypeError("Can't extract `str` to `Vec`")
        pairs = [(_u64(a), _str(b)) for a, b in sizes]
        if enabled is not None and enabled not in shmem_mod.HUGE_NAMES:
            raise value_error(f"shmem_enabled {_rust_str(enabled)}; known: {', '.join(shmem_mod.HUGE_NAMES)}")
        per = []
        for size, v in pairs:
            o = order_of_size(size, self.st.page_shift)
            if o is None:
                raise value_error(f"shmem folio size {size} is not a power of two of at least a page")
            if v not in shmem_mod.SIZE_NAMES:
                raise value_error(f"shmem_enabled {_rust_str(v)} for size {size}; known: "
                                  f"{', '.join(shmem_mod.SIZE_NAMES)}")
            per.append((o, v))
        self.st.shmem_policy = self.st.shmem_policy.updated(self.profile, self.st.pmd_order, enabled, per)

    @property
    def shmem_policy(self) -> dict:
        pol = self.st.shmem_policy
        sizes = {}
        if self.profile.shmem != "pmd-only":
            sizes = {self.page_size << o: pol.sizes[o] for o in range(1, self.st.pmd_order + 1)}
        return {"enabled": pol.enabled, "sizes": sizes}

    def mmap(self, pid: int, length: int, prot: str = "rw", shared: bool = False,
             file: int | None = None, offset: int = 0, mthp: Sequence[int] | None = None,
             addr: int | None = None, uffd_wp: bool = False, uffd_event_fork: bool = False,
             pmd: bool = False) -> int:
        """mmap(): returns the start address. ``file`` maps a file object from byte ``offset``; a
        shared anonymous mapping gets its own shmem object; ``mthp``, when given, lists the
        anonymous folio sizes in bytes the mapping may use in place of the THP policy's sysfs
        controls (a model shortcut); None follows the policy. ``pmd`` lets faults map PMD THPs
        whatever the policy says."""
        pid, length, prot, shared = _u32(pid), _u64(length), _str(prot), _bool(shared)
        file = None if file is None else _u32(file)
        offset = _u64(offset)
        sizes = None if mthp is None else _u64_list(mthp)
        addr = None if addr is None else _u64(addr)
        uffd_wp, uffd_event_fork, pmd = _bool(uffd_wp), _bool(uffd_event_fork), _bool(pmd)
        prot_ = _prot(prot)
        return self._mmap(pid, addr, length, prot_, shared,
                          None if file is None else (file, offset), sizes, uffd_wp, uffd_event_fork,
                          pmd)

    def _mmap(self, pid: int, addr: int | None, length: int, prot: Prot, shared: bool,
              file: tuple[int, int] | None, mthp: list[int] | None, uffd_wp: bool,
              uffd_event_fork: bool, pmd: bool = False) -> int:
        """do_mmap() — mm/mmap.c, as the model has it"""
        st, l = self.st, self.layout
        k = self._mm_index(pid)
        ps = self.page_size
        shift = st.page_shift
        orders = 0 if mthp is None else 1
        for size in mthp or ():
            o = order_of_size(size, shift)
            if o is None or o > st.pmd_order or o == 1:
                raise value_error(f"mTHP size {size} is not one of the page size, 4 pages … the PMD size")
            orders |= 1 << o
        if length == 0 or length % ps != 0:
            raise value_error(f"length {length} is not a positive multiple of {ps}")
        nr = length // ps
        if nr > MAX_VMA_PAGES:
            raise value_error(f"a mapping of {nr} pages is beyond the model's {MAX_VMA_PAGES} pages per mapping")
        if file is not None:
            f, off = file
            if f >= len(st.files):
                raise value_error(f"no file {f}")
            if off % ps != 0 or off // ps + nr > st.files[f].nr_pages:
                raise value_error(f"file range {off:#x}+{length:#x} is unaligned or beyond the "
                                  f"file's {st.files[f].nr_pages} pages")
        if uffd_wp and not l.has_uffd_wp:
            raise value_error(f"{l.name} has no uffd-wp PTE bit")
        pmd_pages = st.ptrs_per_pte
        mm = st.mms[k]
        if addr is not None:
            a, b = self._vrange(addr, length)
            if any(v.start < b and a < v.end() for v in mm.vmas):
                raise value_error(f"address {a << shift:#x}+{length:#x} overlaps an existing mapping")
            start = a
        else:
            start = -(-mm.next_vpn // pmd_pages) * pmd_pages
        if (start + nr) << shift > USER_END:
            raise value_error("the address space is full")
        if file is not None:
            file_id, pgoff = file[0], file[1] // ps
        elif shared:
            # Shared anonymous memory is a shmem object of the mapping's size.
            st.files.append(File(nr_pages=nr, folio_order=0, shmem=True,
                                 cache=[NOT_CACHED] * File.cache_len(nr, True, pmd_pages), kind=ANON))
            file_id, pgoff = len(st.files) - 1, 0
        else:
            file_id, pgoff = None, 0
        vma = Vma(start=start, ptes=[l.none_value] * nr, prot=prot, shared=shared, file=file_id,
                  pgoff=pgoff, vm_softdirty=True, uffd_wp=uffd_wp, uffd_event_fork=uffd_event_fork,
                  dontfork=False, wipeonfork=False, anon_vma=0, mthp=orders, thp_pmd=pmd)
        pos = sum(1 for v in mm.vmas if v.start < start)
        mm.vmas.insert(pos, vma)
        mm.merge_around(range(pos, pos + 1))
        mm.next_vpn = max(mm.next_vpn, start + nr + pmd_pages)
        return start << shift

    # ---- accesses ---------------------------------------------------------------------------

    def touch(self, pid: int, addr: int, length: int, write: bool = False) -> None:
        """Reads or writes every page of a range, faulting as the kernel would; a write stores a
        fresh content token in each page."""
        self._touch(_u32(pid), _u64(addr), _u64(length), _bool(write))

    def _touch(self, pid: int, addr: int, length: int, write: bool) -> None:
        k = self._mm_index(pid)
        a, b = self._mapped_range(k, addr, length)
        acc = fault.WRITE if write else fault.READ
        fault.check_access(self.st, self.layout, k, a, b, acc)
        worst = self.st.worst_case_pages(k, a, b)

        def run(st: State) -> None:
            for vpn in range(a, b):
                fault.access(st, self.layout, self.profile, k, vpn, acc)

        self._guarded(worst, run)

    def read(self, pid: int, addr: int) -> int:
        """Reads one page: the content token the process sees there (0 = zero-filled)."""
        return self._access_one(_u32(pid), _u64(addr), False)

    def write(self, pid: int, addr: int) -> int:
        """Writes one page; returns the token written."""
        return self._access_one(_u32(pid), _u64(addr), True)

    def _access_one(self, pid: int, addr: int, write: bool) -> int:
        ps = self.page_size
        self._touch(pid, addr & ~(ps - 1), ps, write)
        k = self._mm_index(pid)
        return self.st.token_at(self.layout, k, addr >> self.st.page_shift)

    # ---- fork, unmapping, madvise, mprotect -------------------------------------------------

    def fork(self, pid: int) -> int:
        """fork(): returns the child's pid."""
        k = self._mm_index(_u32(pid))
        mm = self.st.mms[k]
        # Each copied pinned page needs one page, plus one preallocation that may go unused.
        worst = sum(len(v.ptes) for v in mm.vmas) + 1 if mm.has_pinned else 0
        return self._guarded(worst, lambda st: fork.fork(st, self.layout, self.profile, k))

    def munmap(self, pid: int, addr: int, length: int) -> None:
        """munmap(); unmapped holes inside the range are allowed, as in the kernel."""
        pid, addr, length = _u32(pid), _u64(addr), _u64(length)
        k = self._mm_index(pid)
        a, b = self._vrange(addr, length)
        self._guarded(0, lambda st: zap.munmap(st, self.layout, self.profile, k, a, b))

    def exit(self, pid: int) -> None:
        """exit(): tears the address space down (pins stay until unpinned)."""
        k = self._mm_index(_u32(pid))
        self._guarded(0, lambda st: zap.exit_mm(st, self.layout, self.profile, k))

    def madvise(self, pid: int, addr: int, length: int, advice: str) -> None:
        """madvise(): "dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork", "hugepage",
        "nohugepage"."""
        pid, addr, length, advice = _u32(pid), _u64(addr), _u64(length), _str(advice)
        k = self._mm_index(pid)
        a, b = self._mapped_range(k, addr, length)
        if advice == "dontneed":
            self._guarded(0, lambda st: zap.madv_dontneed(st, self.layout, self.profile, k, a, b))
            return
        if advice not in ("dontfork", "dofork", "wipeonfork", "keeponfork", "hugepage", "nohugepage"):
            raise value_error(f'unknown advice "{advice}"; known: dontneed, dontfork, dofork, '
                              "wipeonfork, keeponfork, hugepage, nohugepage")
        mm = self.st.mms[k]
        if advice == "wipeonfork":
            at = a
            while at < b:
                v = mm.vmas[mm.find_vma(at)]
                if not v.is_anon():
                    raise value_error("MADV_WIPEONFORK applies to private anonymous mappings only")
                at = v.end()
        self._begin()
        # The model keeps contpte blocks inside one VMA: a block a split would cut is unfolded
        # (the kernel may leave it folded across the two VMAs).
        huge_memory.split_huge_pmd_at(self.st, self.layout, self.profile, k, a)
        huge_memory.split_huge_pmd_at(self.st, self.layout, self.profile, k, b)
        contpte.unfold_at_split(self.st, self.layout, self.profile, k, a)
        contpte.unfold_at_split(self.st, self.layout, self.profile, k, b)

        def apply(v):
            if advice in ("dontfork", "dofork"):
                v.dontfork = advice == "dontfork"  # VM_DONTCOPY
            elif advice in ("hugepage", "nohugepage"):
                # hugepage_madvise() — mm/huge_memory.c: each flag clears the other.
                v.hugepage, v.nohugepage = advice == "hugepage", advice == "nohugepage"
            else:
                v.wipeonfork = advice == "wipeonfork"  # VM_WIPEONFORK

        mm.modify(self.profile, a, b, apply)
        self._end()

    def prctl_thp_disable(self, pid: int, disable: bool, except_advised: bool = False) -> None:
        """prctl(PR_SET_THP_DISABLE, disable, except_advised and PR_THP_DISABLE_EXCEPT_ADVISED) —
        kernel/sys.c: every later fault of the process reads the mm flag, for existing and new
        VMAs alike; fork passes it on."""
        pid, disable, except_advised = _u32(pid), _bool(disable), _bool(except_advised)
        k = self._mm_index(pid)
        self.st.mms[k].thp_disable = policy.prctl_thp_disable_state(self.profile, disable, except_advised)

    def prctl_get_thp_disable(self, pid: int) -> int:
        """prctl(PR_GET_THP_DISABLE): 0, 1, or 3 with PR_THP_DISABLE_EXCEPT_ADVISED."""
        return self._mm(_u32(pid)).thp_disable

    def set_thp_policy(self, enabled: str | None = None, sizes: Sequence = ()) -> None:
        """Writes the sysfs THP controls: ``enabled`` (top level) and ``(size in bytes, mode)``
        pairs; all are checked before any is set."""
        enabled = None if enabled is None else _str(enabled)
        pairs = [(_u64(size), _str(mode)) for size, mode in sizes]
        st = self.st
        new = dataclasses.replace(st.thp)
        if enabled is not None:
            if enabled not in policy.ENABLED_NAMES:
                raise value_error(f'enabled "{enabled}" is not one of {", ".join(policy.ENABLED_NAMES)}')
            new.enabled = enabled
        anon = policy.thp_orders_all_anon(st.pmd_order)
        for size, mode in pairs:
            order = order_of_size(size, st.page_shift)
            if order is None or order >= 32 or not anon & (1 << order):
                raise value_error(f"sizes: {size} bytes has no hugepages-<size>kB control for anonymous "
                                  f"memory here (4 pages … the PMD size, {(1 << st.pmd_order) << st.page_shift} "
                                  "bytes, in powers of two)")
            if mode not in policy.SIZE_NAMES:
                raise value_error(f'sizes: "{mode}" for {size} bytes is not one of {", ".join(policy.SIZE_NAMES)}')
            new.set_size_mode(order, mode)
        st.thp = new

    @property
    def thp_policy(self) -> dict:
        """The sysfs THP controls: {"enabled": mode, "sizes": {size in bytes: mode}}."""
        st = self.st
        return {"enabled": st.thp.enabled,
                "sizes": {(1 << o) << st.page_shift: st.thp.size_mode(o) for o in range(2, st.pmd_order + 1)}}

    def mprotect(self, pid: int, addr: int, length: int, prot: str) -> None:
        """mprotect()."""
        pid, addr, length, prot = _u32(pid), _u64(addr), _u64(length), _str(prot)
        prot_ = _prot(prot)
        k = self._mm_index(pid)
        a, b = self._mapped_range(k, addr, length)
        self._guarded(0, lambda st: mprotect.mprotect(st, self.layout, self.profile, k, a, b, prot_))

    def uffd_writeprotect(self, pid: int, addr: int, length: int, enable: bool = True) -> None:
        """ioctl(UFFDIO_WRITEPROTECT) on a range registered in write-protect mode: ``enable``
        write-protects, otherwise resolves (VMAs are not split)."""
        pid, addr, length, enable = _u32(pid), _u64(addr), _u64(length), _bool(enable)
        k = self._mm_index(pid)
        a, b = self._mapped_range(k, addr, length)
        mm = self.st.mms[k]
        at = a
        while at < b:
            v = mm.vmas[mm.find_vma(at)]
            if not v.uffd_wp:
                raise value_error(f"{at << self.st.page_shift:#x} is not registered with "
                                  "userfaultfd in write-protect mode")
            at = v.end()
        self._guarded(0, lambda st: mprotect.uffd_writeprotect(st, self.layout, self.profile, k,
                                                               a, b, enable))

    # ---- pins -------------------------------------------------------------------------------

    def pin(self, pid: int, addr: int, length: int, write: bool = True, longterm: bool = True) -> int:
        """pin_user_pages() with FOLL_PIN (and FOLL_WRITE / FOLL_LONGTERM): returns a pin id."""
        pid, addr, length = _u32(pid), _u64(addr), _u64(length)
        write, longterm = _bool(write), _bool(longterm)
        k = self._mm_index(pid)
        a, b = self._mapped_range(k, addr, length)
        fault.check_access(self.st, self.layout, k, a, b, fault.WRITE if write else fault.READ)
        worst = self.st.worst_case_pages(k, a, b)
        return self._guarded(worst, lambda st: fault.pin_user_pages(
            st, self.layout, self.profile, k, a, b, write, longterm))

    def unpin(self, pin: int) -> None:
        """unpin_user_pages()."""
        pin = _u32(pin)
        if not (pin < len(self.st.pins) and self.st.pins[pin].active):
            raise value_error(f"no active pin {pin}")
        self._begin()
        record = self.st.pins[pin]
        pfns, record.pfns = record.pfns, []
        record.active = False
        r = self.st.rmap(self.profile)
        for pfn in pfns:
            if pfn != self.st.zero_pfn:  # the shared zero page is not reference-counted
                r.unpin(self.st.mem.folio_head(pfn))
        self._end()

    def _pin_page(self, pin: int, index: int) -> int:
        if not (pin < len(self.st.pins) and self.st.pins[pin].active):
            raise value_error(f"no active pin {pin}")
        pfns = self.st.pins[pin].pfns
        if index >= len(pfns):
            raise value_error(f"pin {pin} covers {len(pfns)} pages, not page {index}")
        return pfns[index]

    def pin_read(self, pin: int, index: int) -> int:
        """What a device reading page ``index`` of a pin sees."""
        pfn = self._pin_page(_u32(pin), _u64(index))
        return 0 if pfn == self.st.zero_pfn else self.st.mem.token[pfn]

    def pin_write(self, pin: int, index: int) -> int:
        """A device write (DMA) into page ``index`` of a pin; returns the token written."""
        pin, index = _u32(pin), _u64(index)
        pfn = self._pin_page(pin, index)
        if not self.st.pins[pin].write:
            raise value_error(f"pin {pin} is read-only (taken without FOLL_WRITE)")
        t = self.st.new_token()
        self.st.mem.token[pfn] = t
        return t

    # ---- soft-dirty, /proc, checks ----------------------------------------------------------

    def clear_soft_dirty(self, pid: int) -> None:
        """echo 4 > /proc/<pid>/clear_refs: soft-dirty tracking starts."""
        k = self._mm_index(_u32(pid))
        if not self.layout.has_soft_dirty:
            raise value_error(f"{self.layout.name} has no soft-dirty bit")
        self._guarded(0, lambda st: fault.clear_soft_dirty(st, self.layout, k))

    def pagemap(self, pid: int, addr: int, length: int) -> list[int]:
        """/proc/<pid>/pagemap entries of a range, as root reads them."""
        pid, addr, length = _u32(pid), _u64(addr), _u64(length)
        k = self._mm_index(pid)
        a, b = self._vrange(addr, length)
        return procfs.pagemap(self.st, self.layout, self.profile, k, a, b)

    def kpagecount(self, pfn: int) -> int:
        """/proc/kpagecount of ``pfn``."""
        return procfs.kpagecount(self.st, _u64(pfn))

    def kpageflags(self, pfn: int) -> int:
        """/proc/kpageflags of ``pfn``: the KPF_* bits the model knows."""
        return procfs.kpageflags(self.st, _u64(pfn))

    def check(self) -> None:
        """Raises InvariantError ("rule: ...", ``.rule``) for the first broken invariant."""
        check_mod.check(self.st, self.layout, self.profile)

    # ---- rebuilding captured memory (rust/src/restore.rs) -----------------------------------

    def place_folio(self, head: int, order: int, kind: str, file: int | None = None,
                    index: int = 0, dirty: bool = False) -> None:
        """Places a captured folio at pfn ``head``: ``kind`` "anon", or "file" with ``file`` and
        the file page ``index`` of its first page."""
        head, order, kind = _u64(head), _u32(order), _str(kind)
        file = None if file is None else _u32(file)
        index, dirty = _u64(index), _bool(dirty)
        if kind == "anon" and file is None:
            where = None
        elif kind == "file" and file is not None:
            where = (file, index)
        else:
            raise value_error('kind must be "anon", or "file" with file=<id>')
        restore.place_folio(self.st, head, order, where, dirty)

    @classmethod
    def from_arrays(cls, arch: str, kernel: str, memory: int, seed: int, batching: bool,
                    files: list, folios: dict, processes: list, pins: list, token, anon_exclusive,
                    next_token: int | None, next_anon_vma: int | None) -> Simulation:
        """A simulation built from arrays (``ptebatch.Simulation.from_arrays`` checks types and
        dtypes first); every counter rebuilt, then ``check()``."""
        sim = cls(arch, kernel, memory, seed, batching)
        restore.build(sim.st, sim.layout, sim.profile, sim.spawn, sim.create_file, files, folios,
                      processes, pins, token, anon_exclusive, next_token, next_anon_vma)
        sim.check()
        return sim

    def pins(self) -> list[dict]:
        """The pins, for ``to_arrays``: pfns, write, longterm, active."""
        return [{"pfns": list(p.pfns), "write": p.write, "longterm": p.longterm, "active": p.active}
                for p in self.st.pins]

    def fallback(self) -> list[float]:
        """The simulated-fragmentation probability per folio order."""
        return list(self.st.mem.fallback)

    # ---- inspection (the binding's helpers) -------------------------------------------------

    def state(self) -> dict:
        """The canonical state: everything the simulation holds, as ints and lists."""
        return canonical_state(self.st)

    def vmas(self, pid: int) -> list[dict]:
        """The VMAs of a process, as dicts (addresses in bytes)."""
        mm, shift = self._mm(_u32(pid)), self.st.page_shift
        return [{"start": v.start << shift, "end": v.end() << shift, "prot": v.prot.as_string(),
                 "shared": v.shared, "file": v.file, "offset": v.pgoff << shift,
                 "vm_softdirty": v.vm_softdirty, "uffd_wp": v.uffd_wp, "dontfork": v.dontfork,
                 "wipeonfork": v.wipeonfork, "anon_vma": v.anon_vma,
                 "mthp": [1 << (o + shift) for o in range(32) if v.mthp & (1 << o)] if v.mthp else None,
                 "hugepage": v.hugepage, "nohugepage": v.nohugepage,
                 "pmd": v.thp_pmd}
                for v in mm.vmas]

    def pmds(self, pid: int, addr: int) -> list[tuple[int, int]]:
        """Huge PMDs of the VMA holding ``addr``: (address, PMD entry) pairs in address order."""
        pid, addr = _u32(pid), _u64(addr)
        k = self._mm_index(pid)
        v = self.st.mms[k].find_vma(addr >> self.st.page_shift)
        if v is None:
            raise value_error(f"no mapping at {addr:#x} in process {pid}")
        return [(b << self.st.page_shift, e) for b, e in sorted(self.st.mms[k].vmas[v].pmds.items())]

    def anon_huge_pages(self, pid: int) -> list[int]:
        """smaps' AnonHugePages of every VMA of a process, in bytes."""
        mm = self._mm(_u32(pid))
        return [procfs.anon_huge_pages(self.st, self.layout, v) * self.page_size for v in mm.vmas]

    def ptes(self, pid: int, addr: int) -> list[int]:
        """A copy of the PTE list of the VMA holding ``addr``."""
        pid, addr = _u32(pid), _u64(addr)
        k = self._mm_index(pid)
        v = self.st.mms[k].find_vma(addr >> self.st.page_shift)
        if v is None:
            raise value_error(f"no mapping at {addr:#x} in process {pid}")
        return list(self.st.mms[k].vmas[v].ptes)

    def rss(self, pid: int) -> dict:
        """rss counters of a process: {"file", "anon", "shmem"}."""
        return dict(zip(RSS_NAMES, self._mm(_u32(pid)).rss))

    def page(self, pfn: int) -> dict:
        """One page's state, with the kernel's meaning of every count."""
        pfn = _u64(pfn)
        st, m = self.st, self.st.mem
        if pfn == st.zero_pfn:
            return {"zero_page": True, "free": False, "mapcount": 0}
        if pfn >= m.nr_pages():
            raise value_error(f"pfn {pfn:#x} is beyond the {m.nr_pages()} pages of memory")
        d: dict = {"zero_page": False, "free": m.is_free(pfn)}
        if m.is_free(pfn):
            return d
        head = m.folio_head(pfn)
        d.update(folio=head, order=m.folio_order(head), mapcount=m.mapcount[pfn],
                 anon_exclusive=m.test(pfn, PG_ANON_EXCLUSIVE), token=m.token[pfn],
                 refcount=m.refcount[head], folio_mapcount=m.folio_mapcount(head),
                 anon=m.test(head, PG_ANON), file=m.test(head, PG_FILE),
                 swapbacked=m.test(head, PG_SWAPBACKED), dirty=m.test(head, PG_DIRTY),
                 partially_mapped=m.test(head, PG_PARTIALLY_MAPPED),
                 maybe_mapped_shared=m.test(head, PG_MAYBE_SHARED),
                 maybe_dma_pinned=m.folio_maybe_dma_pinned(head))
        lf = m.large.get(head)
        if lf is not None:
            d.update(large_mapcount=lf.large_mapcount + 1, entire_mapcount=lf.entire_mapcount + 1,
                     nr_pages_mapped=lf.nr_pages_mapped, pincount=lf.pincount,
                     mm_ids=list(lf.mm_id),
                     mm_id_mapcounts=[lf.mm_id_mapcount[0] + 1, lf.mm_id_mapcount[1] + 1])
        return d

    def memory_array(self, name: str) -> list[int]:
        """A copy of one per-page list: "order" (255 = free), "flags", "mapcount", "refcount", "token"."""
        name = _str(name)
        if name not in ("order", "flags", "mapcount", "refcount", "token"):
            raise value_error(f'unknown memory array "{name}"; known: order, flags, mapcount, '
                              "refcount, token")
        return list(getattr(self.st.mem, name))

    def decode_pte(self, pte: int) -> dict:
        """A PTE of this simulation's layout, decoded into its logical bits."""
        pte, l = _u64(pte), self.layout
        return {"none": l.pte_none(pte), "present": l.pte_present(pte), "pfn": l.pte_pfn(pte),
                "write": l.pte_write(pte), "dirty": l.pte_dirty(pte), "young": l.pte_young(pte),
                "soft_dirty": l.pte_soft_dirty(pte), "uffd_wp": l.pte_uffd_wp(pte),
                "special": l.pte_special(pte)}


def canonical_state(st: State) -> dict:
    """The state as plain ints and lists (booleans as 0/1), in the Rust binding's layout."""
    mem = st.mem
    large = [[h, lf.large_mapcount, lf.entire_mapcount, lf.nr_pages_mapped, lf.pincount,
              lf.mm_id[0], lf.mm_id[1], lf.mm_id_mapcount[0], lf.mm_id_mapcount[1]]
             for h, lf in sorted(mem.large.items())]
    vmas, ptes, vma_pmd, pmd_keys, pmds = [], [], [], [], []
    for mm in st.mms:
        for v in mm.vmas:
            vma_pmd.append(int(v.thp_pmd))
            for b in sorted(v.pmds):
                pmd_keys.append([mm.pid, b])
                pmds.append(v.pmds[b])
            vmas.append([mm.pid, v.start, len(v.ptes), int(v.prot.read), int(v.prot.write),
                         int(v.prot.exec), int(v.shared), -1 if v.file is None else v.file,
                         v.pgoff, int(v.vm_softdirty), int(v.uffd_wp), int(v.uffd_event_fork),
                         int(v.dontfork), int(v.wipeonfork), v.anon_vma, v.mthp, int(v.hugepage),
                         int(v.nohugepage)])
            ptes.extend(v.ptes)
    return {
        "order": list(mem.order),
        "flags": list(mem.flags),
        "mapcount": list(mem.mapcount),
        "refcount": list(mem.refcount),
        "token": list(mem.token),
        "large": large,
        "free_blocks": [[pfn, o] for pfn, o in mem.free_blocks()],
        "free_pages": mem.free_pages,
        "next_token": st.next_token,
        "next_anon_vma": st.next_anon_vma,
        "rng": mem.rng.state,
        "mms": [[m.pid, m.mm_id, m.rss[0], m.rss[1], m.rss[2], int(m.has_pinned), int(m.exited),
                 m.next_vpn, m.thp_disable] for m in st.mms],
        "thp": [policy.ENABLED_NAMES.index(st.thp.enabled), st.thp.orders_always, st.thp.orders_madvise,
                st.thp.orders_inherit],
        "vmas": vmas,
        "ptes": ptes,
        "vma_pmd": vma_pmd,
        "pmd_keys": pmd_keys,
        "pmds": pmds,
        "files": [[f.nr_pages, f.folio_order, int(f.shmem),
                   0 if f.kind == "fixed" else 1 if f.kind == "anon"
                   else 2 + ["never", "always", "within_size", "advise"].index(f.huge)] for f in st.files],
        "shmem": [st.shmem_policy.enabled] + st.shmem_policy.sizes[:st.pmd_order + 1],
        "fault_around_pages": st.fault_around_pages,
        "file_cache": [c for f in st.files for c in f.cache],
        "pins": [[int(p.active), int(p.longterm), len(p.pfns)] for p in st.pins],
        "pin_pfns": [pfn for p in st.pins for pfn in p.pfns],
    }

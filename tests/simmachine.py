"""A hypothesis state machine that runs the same random operations on several simulations
at once and compares them after every step. Used by the batched-vs-per-PTE equivalence
tests and by the Rust-vs-reference agreement tests.

Every operation must give the same outcome and the same value (token, pid, address, pin id)
in every simulation. The known, documented deviations between per-PTE and batched kernels
(``DEVIATIONS``) are masked by name, and only where they can have happened: :class:`Drift`
follows the PTEs and folios each deviating operation touched, and what later operations
carry the difference to, until those entries are gone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ptebatch as pb
from ptebatch.simulation import _TABLE_WIDTHS

MEMORY = 8 << 20
VMA_COLUMNS = _TABLE_WIDTHS["vmas"]

# PTE bits a documented deviation may touch, per architecture (docs/semantics.md §1).
BITS = {
    "x86-64": dict(write=1 << 1, young=1 << 5, dirty=(1 << 6) | (1 << 58), soft_dirty=1 << 11, cont=0),
    # arm64: PTE_WRITE (DBM) and PTE_RDONLY carry write and hardware-dirty, PTE_DIRTY is bit 55.
    "arm64": dict(write=(1 << 51) | (1 << 7), young=1 << 10, dirty=(1 << 55) | (1 << 7), soft_dirty=0,
                  cont=1 << 52),
}

# Folio flags (rust/src/memory.rs), kept on the folio's first page.
PG_ANON = 1 << 1
PG_DIRTY = 1 << 4
PG_PARTIALLY_MAPPED = 1 << 5
PG_MAYBE_SHARED = 1 << 6
FREE = 0xFF  # order of a free page

#: Where a batched kernel may differ from the same kernel run per PTE, as the spec documents.
DEVIATIONS = {
    "fork-write-merge-shared": "fork of a shared mapping: if any PTE of a batch is writable the "
                               "child gets all of them writable (kernel-algorithms.md §2.7, §8.6)",
    "soft-dirty-untracked": "fork of a VMA with VM_SOFTDIRTY (soft-dirty not tracked): the child "
                            "takes the first PTE's bit for the batch (§2.4, §8.7)",
    "mprotect-ad-merge": "v6.17+ batched mprotect reads young/dirty of the run into one template "
                         "(modify_prot_start_ptes) and writes it to every PTE (§6); on x86 the "
                         "merging pte_mkdirty() also sets soft-dirty, so with soft-dirty tracking "
                         "can_change_pte_writable() may then make the whole run writable",
    "deferred-split-per-pte": "a per-PTE zap of a whole folio passes through 'partially mapped' "
                              "and queues it for deferred split; one batch does not (§3.3)",
    "contpte-layout": "arm64: per-PTE and batched paths fold and unfold contpte blocks differently "
                      "(per-PTE write-protect unfolds, a per-PTE child refolds); PTE_CONT and the "
                      "young/dirty repaint of folding differ, mappings and counters do not "
                      "(pte-layouts.md §2.5)",
}

# An entry's key: pid << KEY_SHIFT | virtual page number (or contpte block number).
KEY_SHIFT = 40


def arch_bits(arch: str) -> dict[str, int]:
    return BITS["arm64" if arch.startswith("arm64") else arch]


class View:
    """Per-PTE arrays of one state: keys, the folio each entry maps and its VMA's flags."""

    def __init__(self, state: dict[str, Any], layout: pb.Layout):
        self.state, self.layout = state, layout
        vmas = np.asarray(state["vmas"], dtype=np.int64).reshape(-1, VMA_COLUMNS)
        n = vmas[:, 2]
        self.ptes = np.asarray(state["ptes"], dtype=np.uint64)
        first = np.repeat((vmas[:, 0] << KEY_SHIFT) + vmas[:, 1], n)  # VMA start is a page number
        self.keys = (first + np.arange(len(self.ptes)) - np.repeat(np.cumsum(n) - n, n)).astype(np.uint64)
        self.pids = self.keys >> np.uint64(KEY_SHIFT)
        self.shared = np.repeat(vmas[:, 6] != 0, n)
        self.vm_softdirty = np.repeat(vmas[:, 9] != 0, n)
        self.present = ~np.asarray(layout.pte_none(self.ptes), dtype=bool)

    @cached_property
    def folio(self) -> tuple[np.ndarray, np.ndarray]:
        """(head pfn, order) of the folio each entry maps; order -1 where none is mapped."""
        order_of = np.asarray(self.state["order"])
        pfns = np.asarray(self.layout.pte_pfn(self.ptes), dtype=np.int64)
        ok = self.present & (pfns < len(order_of))
        order = np.where(ok, order_of[np.where(ok, pfns, 0)].astype(np.int64), -1)
        order[order == FREE] = -1
        head = pfns & ~((1 << np.maximum(order, 0)) - 1)
        return head, order

    def large(self, min_order: int = 1) -> np.ndarray:
        """Entries that map a folio of at least ``min_order``."""
        return self.folio[1] >= min_order

    def heads(self, sel: np.ndarray, anon_only: bool = False) -> np.ndarray:
        head, order = self.folio
        sel = sel & (order >= 0)
        if anon_only:
            sel &= (np.asarray(self.state["flags"])[np.where(sel, head, 0)] & PG_ANON) != 0
        return head[sel]

    def in_range(self, pid: int, a: int | None = None, n: int | None = None) -> np.ndarray:
        """Entries of ``pid`` in [a, a + n) (bytes), or all of them."""
        sel = self.pids == pid
        if a is not None and n is not None:
            vpn = self.keys & np.uint64((1 << KEY_SHIFT) - 1)
            shift = self.layout.page_shift
            sel &= (vpn >= np.uint64(a >> shift)) & (vpn < np.uint64((a + n) >> shift))
        return sel


class Taint:
    """Bits that may legitimately differ, per key (kept sorted for vectorised lookup)."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.bits = np.zeros(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.keys)

    def add(self, keys: np.ndarray, bits: int | np.ndarray) -> None:
        keys = np.asarray(keys, dtype=np.uint64)
        bits = np.broadcast_to(np.asarray(bits, dtype=np.uint64), keys.shape)
        keep = bits != 0
        if not keep.any():
            return
        k = np.concatenate([self.keys, keys[keep]])
        b = np.concatenate([self.bits, bits[keep]])
        order = np.argsort(k, kind="stable")
        k, b = k[order], b[order]
        self.keys, first = np.unique(k, return_index=True)
        self.bits = np.bitwise_or.reduceat(b, first)

    def get(self, keys: np.ndarray) -> np.ndarray:
        if not len(self.keys):
            return np.zeros(len(keys), dtype=np.uint64)
        i = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        return np.where(self.keys[i] == keys, self.bits[i], np.uint64(0))

    def keep_only(self, live: np.ndarray) -> None:
        sel = np.isin(self.keys, live)
        self.keys, self.bits = self.keys[sel], self.bits[sel]

    def clear(self, pid: int, bits: int) -> None:
        mine = (self.keys >> np.uint64(KEY_SHIFT)) == np.uint64(pid)
        self.bits = np.where(mine, self.bits & ~np.uint64(bits), self.bits)

    def copy(self, src: int, dst: int) -> None:
        """fork: the child's entries start as copies of the parent's."""
        mine = (self.keys >> np.uint64(KEY_SHIFT)) == np.uint64(src)
        low = self.keys[mine] & np.uint64((1 << KEY_SHIFT) - 1)
        self.add(low | np.uint64(dst << KEY_SHIFT), self.bits[mine])


class Drift:
    """Where the named deviations may have made a batched simulation and the same kernel run
    per PTE differ, and in which bits: per PTE, per contpte block (PTE_CONT, young, dirty) and
    per folio (flags). Each deviation is noted only on kernels whose batched path has it and
    only on the entries the deviating operation touched (batches need a large folio); then
    followed where later operations carry it:

    - fork copies the parent's entries, and their differences, to the child;
    - mprotect and uffd-wp decide writability from dirty and soft-dirty
      (``can_change_pte_writable``), so a difference there becomes one in write;
    - a write through a PTE writable on one side only faults on the other, whose
      ``wp_page_shared`` marks the folio dirty now; a zap of a PTE whose dirty bit differs
      marks a file folio dirty on one side only;
    - on arm64 any difference in a contpte-capable block may fold it on one side only.

    Everything about an entry is forgotten once it is none on both sides, and about a folio
    once it is free on both.
    """

    def __init__(self, deviations: set[str], arch: str, kernel: str):
        self.deviations = deviations
        self.bits = arch_bits(arch)
        self.layout = pb.layout(arch)
        form = pb.fpb_form(kernel)
        self.fork_batched = form is not None
        self.zap_batched = form not in (None, "seed")
        self.mprotect_batched = form == "v6.17"
        # contpte from v6.9, as zap batching; a block folds only over a folio at least its size.
        self.cont_order: int | None = None
        if "contpte-layout" in deviations and self.layout.has_contpte and self.zap_batched:
            self.cont_order = self.layout.cont_ptes.bit_length() - 1
        self.ptes = Taint()
        self.blocks = Taint()
        self.folios: dict[int, int] = {}

    # -- what may differ -----------------------------------------------------------------

    def block_bits(self) -> int:
        return self.bits["cont"] | self.bits["young"] | self.bits["dirty"]

    def pte_mask(self, v: View) -> np.ndarray:
        m = self.ptes.get(v.keys)
        if self.cont_order is not None:
            m |= self.blocks.get(v.keys >> np.uint64(self.cont_order))
        return m

    def flag_mask(self, nr_pfns: int) -> np.ndarray:
        m = np.zeros(nr_pfns, dtype=np.uint8)
        for head, bits in self.folios.items():
            m[head] |= bits
        return m

    # -- following operations ------------------------------------------------------------

    def _note(self, v: View, sel: np.ndarray, bits: int) -> None:
        self.ptes.add(v.keys[sel], bits)

    def _note_blocks(self, v: View, sel: np.ndarray) -> None:
        if self.cont_order is not None:
            sel = sel & v.large(self.cont_order)
            self.blocks.add(v.keys[sel] >> np.uint64(self.cont_order), self.block_bits())

    def _note_folios(self, heads: np.ndarray, bits: int) -> None:
        for h in heads.tolist():
            self.folios[h] = self.folios.get(h, 0) | bits

    def track(self, op: tuple, before: list[View], after: list[View]) -> None:
        """Follows one successful operation ``op``: ("fork", parent, child), ("zap", pid, addr,
        length), ("exit", pid), ("write", pid, addr, length), ("protect", pid, addr, length),
        ("clear-soft-dirty", pid), or ("other", 0) for one that cannot deviate; given the
        views of both states before and after it."""
        kind, pid = op[0], op[1]
        dev, b = self.deviations, self.bits
        if kind == "fork":
            child = op[2]
            self.ptes.copy(pid, child)
            self.blocks.copy(pid, child)
            if self.fork_batched:
                for v in after:
                    batched = v.in_range(child) & v.large()
                    if "fork-write-merge-shared" in dev:
                        self._note(v, batched & v.shared, b["write"])
                    if "soft-dirty-untracked" in dev:
                        self._note(v, batched & v.vm_softdirty, b["soft_dirty"])
                    # Per-PTE write-protect unfolds the parent's private blocks; the per-PTE
                    # child refolds at each block's last entry.
                    self._note_blocks(v, v.in_range(child) | (v.in_range(pid) & ~v.shared))
        elif kind in ("zap", "exit", "write"):
            for v in before:
                sel = v.in_range(*op[1:])
                m = self.pte_mask(v)
                if kind == "write":
                    self._note_folios(v.heads(sel & (m & np.uint64(b["write"]) != 0)), PG_DIRTY)
                    continue
                self._note_folios(v.heads(sel & (m & np.uint64(b["dirty"]) != 0)), PG_DIRTY)
                if self.zap_batched and "deferred-split-per-pte" in dev:
                    self._note_folios(v.heads(sel & v.large(), anon_only=True), PG_PARTIALLY_MAPPED)
        elif kind == "protect":
            for v in before:
                sel = v.in_range(*op[1:])
                m = self.pte_mask(v)
                self._note(v, sel & (m & np.uint64(b["dirty"] | b["soft_dirty"]) != 0), b["write"])
                if self.mprotect_batched:
                    if "mprotect-ad-merge" in dev:
                        self._note(v, sel & v.large(), b["dirty"] | b["young"] | b["soft_dirty"] | b["write"])
                    self._note_blocks(v, sel)
            if self.mprotect_batched:
                # A huge PMD the change split has its PTEs only afterwards.
                for v in after:
                    self._note_blocks(v, v.in_range(*op[1:]))
        elif kind == "clear-soft-dirty":
            # Every PTE of the mm is write-protected and loses soft-dirty on both sides.
            self.ptes.clear(pid, b["write"] | b["soft_dirty"])
        if self.cont_order is not None:
            for v in after:
                self._note_blocks(v, self.ptes.get(v.keys) != 0)
        self._forget(after)

    def _forget(self, after: list[View]) -> None:
        self.ptes.keep_only(np.concatenate([v.keys[v.present] for v in after]))
        if self.cont_order is not None:
            self.blocks.keep_only(np.concatenate([v.keys[v.present] >> np.uint64(self.cont_order)
                                                  for v in after]))
        orders = [np.asarray(v.state["order"]) for v in after]
        self.folios = {h: f for h, f in self.folios.items() if any(o[h] != FREE for o in orders)}


def contpte_mask(v: View) -> np.ndarray:
    """Against a kernel without contpte (6.8): PTE_CONT and the young/dirty a fold or unfold
    repaints, on the entries of folios a block can fold over."""
    bits = arch_bits(v.layout.name)
    if not v.layout.has_contpte:
        return np.zeros(len(v.keys), dtype=np.uint64)
    big = v.large(v.layout.cont_ptes.bit_length() - 1)
    return np.where(big, np.uint64(bits["cont"] | bits["young"] | bits["dirty"]), np.uint64(0))


def compare(a: View, b: View, pte_mask: np.ndarray | None, flag_mask: np.ndarray | None,
            same_version: bool) -> list[str]:
    """Differences between two states, after masking what may legitimately differ."""
    sa, sb = dict(a.state), dict(b.state)
    if pte_mask is not None and len(a.ptes) == len(pte_mask) == len(b.ptes):
        sa["ptes"], sb["ptes"] = a.ptes & ~pte_mask, b.ptes & ~pte_mask
    if flag_mask is not None:
        sa["flags"] = np.asarray(sa["flags"]) & ~flag_mask
        sb["flags"] = np.asarray(sb["flags"]) & ~flag_mask
    if not same_version:
        # MM-ID slots and the shared bit exist only from v6.15.
        for s in (sa, sb):
            s["large"] = np.asarray(s["large"]).reshape(-1, 9)[:, :5]
            s["flags"] = np.asarray(s["flags"]) & ~np.uint8(PG_MAYBE_SHARED)
    return pb.state_diff(sa, sb)


@dataclass
class Mapping:
    start: int
    pages: int
    #: A file or shared mapping: its faults follow the page-cache rules, which differ by version.
    pagecache: bool = False


@dataclass
class Proc:
    pid: int
    maps: list[Mapping] = field(default_factory=list)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except (ValueError, TypeError, pb.PtebatchError) as e:
        return (type(e).__name__, None)


# None: the mapping follows the THP policy; a tuple overrides the sysfs controls.
MTHP = st.sampled_from([None, None, (), ("16K",), ("64K",), ("16K", "64K"), ("64K", "2M"), ("16K", "64K", "2M")])
THP_SIZES = st.dictionaries(st.sampled_from(["16K", "32K", "64K", "2M", "8K"]),
                            st.sampled_from(["always", "inherit", "madvise", "never", "sometimes"]), max_size=3)


class SimMachine(RuleBasedStateMachine):
    """Runs every operation on ``self.sims`` (built by :meth:`make_sims`) in lockstep."""

    max_procs = 5
    #: Backends whose check() runs after every step; the others run it at the end of each run.
    check_every_step = ("rust", "reference")

    def make_sims(self) -> list[pb.Simulation]:  # pragma: no cover - overridden
        raise NotImplementedError

    def comparisons(self) -> list[tuple[int, int, set[str], bool]]:  # pragma: no cover
        """(index a, index b, deviations masked, same kernel version)."""
        raise NotImplementedError

    @initialize(pages=st.integers(16, 640), mthp=MTHP, write=st.booleans(),
                shared=st.sampled_from([False, False, False, True]),
                tmpfs_huge=st.sampled_from(["never", "always", "within_size", "advise"]),
                pmd=st.sampled_from([False, False, True]))
    def setup(self, pages: int, mthp: tuple[str, ...] | None, write: bool, shared: bool, tmpfs_huge: str,
              pmd: bool) -> None:
        self.tmpfs_huge = tmpfs_huge
        self.sims = self.make_sims()
        self.pagecache_faulted = False
        self.layouts = [pb.layout(s.arch) for s in self.sims]
        self.page = self.sims[0].page_size
        self.procs: list[Proc] = []
        self.pins: list[int] = []
        self.diverged: set[int] = set()
        self.drifts = {(i, j): Drift(dev, self.sims[i].arch, self.sims[i].kernel)
                       for i, j, dev, same in self.comparisons() if dev and same}
        self._views: list[View] | None = None
        self.procs.append(Proc(self.all(lambda s: s.spawn().pid)))
        self.file = self.all(lambda s: s.create_file("256K", "16K"))
        self.tmpfs = self.all(lambda s: s.create_file("256K", shmem=True, huge=self.tmpfs_huge))
        # Most interesting sequences start from memory that is already faulted in.
        p = self.procs[0]
        if pmd:
            pages = 512 + pages % 129  # room for a huge PMD (on 512-entry page tables)
        start = self.all(lambda s: s.process(p.pid).mmap(pages * self.page, "rw", shared, mthp=mthp, pmd=pmd).start)
        if start is None:
            # An mTHP size this layout has not (its PMD is smaller): plain pages then.
            start = self.all(lambda s: s.process(p.pid).mmap(pages * self.page, "rw", shared).start)
        p.maps.append(Mapping(start, pages, shared))
        self.note_pagecache(p, start, pages * self.page)
        self.all(lambda s: s.process(p.pid).touch(start, pages * self.page, write),
                 ("write", p.pid, start, pages * self.page) if write else None)

    # -- helpers -------------------------------------------------------------------------

    def views(self) -> list[View]:
        """Every simulation's state now (kept until the next operation changes one)."""
        if self._views is None:
            self._views = [View(s.state(), l) for s, l in zip(self.sims, self.layouts)]
        return self._views

    def all(self, fn: Callable[[pb.Simulation], Any], op: tuple | None = None) -> Any:
        """Runs ``fn`` on every simulation; all must give the same outcome and value, and a
        failed call must leave the state as it was. ``op`` tells the deviation tracking what
        a successful call did (see :meth:`Drift.track`)."""
        before = self.views()
        results = [outcome(lambda s=s: fn(s)) for s in self.sims]
        assert all(r == results[0] for r in results), f"simulations disagree: {results}"
        event(f"outcome {results[0][0]}")
        if results[0][0] != "ok":
            for s, b in zip(self.sims, before):
                assert pb.state_diff(b.state, s.state()) == [], "a failed operation changed the state"
            return None
        value = results[0][1]
        self._views = None
        after = self.views()
        if op is not None and op[0] == "fork":
            op = op + (value,)  # the child
        for (i, j), drift in self.drifts.items():
            drift.track(op or ("other", 0), [before[i], before[j]], [after[i], after[j]])
        return value

    def note_pagecache(self, p: Proc, a: int, n: int) -> None:
        """Notes a fault that may touch a file or shared mapping: from there on, kernels of
        different versions may map page-cache folios differently (fault-around and
        finish_fault() whole folios, shmem folio sizes, set_pte_range() dirtiness)."""
        if any(m.pagecache and m.start < a + n and a < m.start + m.pages * self.page for m in p.maps):
            self.pagecache_faulted = True

    def addr(self, data: st.DataObject, pages_max: int = 24) -> tuple[Proc, int, int]:
        p = data.draw(st.sampled_from(self.procs))
        if p.maps and data.draw(st.integers(0, 9)) > 0:
            m = data.draw(st.sampled_from(p.maps))
            first = data.draw(st.integers(0, m.pages - 1))
            n = data.draw(st.integers(1, min(pages_max, m.pages - first)))
            return p, m.start + first * self.page, n * self.page
        # Sometimes a range that is not (entirely) mapped.
        base = p.maps[0].start if p.maps else 0x10_0000_0000
        return p, base + data.draw(st.integers(-4, 600)) * self.page, data.draw(st.integers(1, 8)) * self.page

    # -- operations ------------------------------------------------------------------------

    @precondition(lambda self: len(self.procs[0].maps) < 6)
    @rule(data=st.data(), pages=st.integers(1, 640), mthp=MTHP,
          kind=st.sampled_from(["anon", "anon", "anon", "anon-pmd", "shared-anon", "file-private", "file-shared",
                                "tmpfs-shared", "anon-uffd", "anon-uffd-fork"]),
          prot=st.sampled_from(["rw", "rw", "r"]))
    def mmap(self, data: st.DataObject, pages: int, mthp: tuple[str, ...] | None, kind: str, prot: str) -> None:
        p = data.draw(st.sampled_from(self.procs))
        if kind.startswith("file"):
            pages = min(pages, 64)
            file, shared = self.file, kind == "file-shared"
        elif kind == "tmpfs-shared":
            pages = min(pages, 64)
            file, shared = self.tmpfs, True
        else:
            file, shared = None, kind == "shared-anon"
        uffd, fork_event = kind.startswith("anon-uffd"), kind == "anon-uffd-fork"
        pmd = kind == "anon-pmd"
        if pmd:
            pages = 512 + pages % 129
        start = self.all(lambda s: s.process(p.pid).mmap(pages * self.page, prot, shared, file=file, mthp=mthp,
                                                          uffd_wp=uffd, uffd_event_fork=fork_event, pmd=pmd).start)
        if start is not None:
            p.maps.append(Mapping(start, pages, file is not None or shared))

    @rule(data=st.data(), write=st.booleans())
    def touch(self, data: st.DataObject, write: bool) -> None:
        p, a, n = self.addr(data, pages_max=640)
        self.note_pagecache(p, a, n)
        self.all(lambda s: s.process(p.pid).touch(a, n, write), ("write", p.pid, a, n) if write else None)

    @rule(data=st.data(), write=st.booleans())
    def access(self, data: st.DataObject, write: bool) -> None:
        p, a, _ = self.addr(data)
        self.note_pagecache(p, a, self.page)
        if write:
            self.all(lambda s: s.process(p.pid).write(a), ("write", p.pid, a, self.page))
        else:
            self.all(lambda s: s.process(p.pid).read(a))

    @precondition(lambda self: len(self.procs) < self.max_procs)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.procs))
        child = self.all(lambda s: s.process(p.pid).fork().pid, ("fork", p.pid))
        if child is not None:
            self.procs.append(Proc(child, list(p.maps)))

    @rule(data=st.data())
    def munmap(self, data: st.DataObject) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).munmap(a, n), ("zap", p.pid, a, n))

    @rule(data=st.data(), prot=st.sampled_from(["r", "rw", "none"]))
    def mprotect(self, data: st.DataObject, prot: str) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).mprotect(a, n, prot), ("protect", p.pid, a, n))

    @rule(data=st.data(), advice=st.sampled_from(["dontneed", "dontneed", "dontfork", "wipeonfork", "dofork",
                                                  "hugepage", "nohugepage"]))
    def madvise(self, data: st.DataObject, advice: str) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).madvise(a, n, advice),
                 ("zap", p.pid, a, n) if advice == "dontneed" else None)

    @rule(enabled=st.sampled_from([None, "always", "madvise", "never"]), sizes=THP_SIZES)
    def thp_policy(self, enabled: str | None, sizes: dict[str, str]) -> None:
        """The sysfs THP controls (an unknown size or mode fails and changes nothing)."""
        self.all(lambda s: s.set_thp_policy(enabled, sizes))

    @rule(data=st.data(), disable=st.booleans())
    def prctl_thp_disable(self, data: st.DataObject, disable: bool) -> None:
        p = data.draw(st.sampled_from(self.procs))
        self.all(lambda s: s.process(p.pid).prctl_thp_disable(disable))

    @rule(data=st.data(), write=st.booleans(), longterm=st.booleans())
    def pin(self, data: st.DataObject, write: bool, longterm: bool) -> None:
        p, a, n = self.addr(data, pages_max=4)
        self.note_pagecache(p, a, n)
        pin = self.all(lambda s: s.process(p.pid).pin(a, n, write=write, longterm=longterm).id,
                       ("write", p.pid, a, n) if write else None)
        if pin is not None:
            self.pins.append(pin)

    @precondition(lambda self: self.pins)
    @rule(data=st.data(), index=st.integers(0, 4), write=st.booleans())
    def dma(self, data: st.DataObject, index: int, write: bool) -> None:
        """A device reads or writes a pinned page (index 4 is past every pin)."""
        pin = data.draw(st.sampled_from(self.pins))
        self.all(lambda s: pb.Pin(s, pin).write(index) if write else pb.Pin(s, pin).read(index))

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        pin = data.draw(st.sampled_from(self.pins))
        self.pins.remove(pin)
        self.all(lambda s: pb.Pin(s, pin).unpin())

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.procs[1:]))
        self.procs.remove(p)
        self.all(lambda s: s.process(p.pid).exit(), ("exit", p.pid))

    @rule(data=st.data(), enable=st.booleans())
    def uffd_writeprotect(self, data: st.DataObject, enable: bool) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).uffd_writeprotect(a, n, enable), ("protect", p.pid, a, n))

    @rule(size=st.sampled_from(["4K", "16K", "64K", "128K", "3K", "8M"]))
    def fault_around(self, size: str) -> None:
        """/sys/kernel/debug/fault_around_bytes (a bad value must fail alike and change nothing)."""
        self.all(lambda s: setattr(s, "fault_around_bytes", size))

    @rule(enabled=st.sampled_from([None, "never", "always", "within_size", "advise", "deny", "force"]),
          sizes=st.dictionaries(st.sampled_from(["8K", "16K", "32K", "64K", "2M"]),
                                st.sampled_from(["always", "inherit", "within_size", "advise", "never"]),
                                max_size=3))
    def shmem_policy(self, enabled: str | None, sizes: dict[str, str]) -> None:
        """The sysfs shmem controls, which pick the folio sizes of shared anonymous memory (the
        per-size ones only where every simulated kernel has them, 6.11+)."""
        if not all(s.shmem_policy["sizes"] for s in self.sims):
            sizes = {}
        self.all(lambda s: s.set_shmem_policy(enabled, sizes))

    @rule(data=st.data())
    def clear_soft_dirty(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.procs))
        self.all(lambda s: s.process(p.pid).clear_soft_dirty(), ("clear-soft-dirty", p.pid))

    # -- after every step ------------------------------------------------------------------

    def teardown(self) -> None:
        for s in getattr(self, "sims", []):
            s.check()

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "sims"):
            return
        for s in self.sims:
            if s.backend in self.check_every_step:
                s.check()
        views = self.views()
        for i, j, deviations, same_version in self.comparisons():
            if j in self.diverged:
                continue
            if not same_version:
                # Page-cache faults follow version-specific rules (docs/simulation.md
                # "Fault-around", "shmem and file folios"): from the first one the states part.
                if self.pagecache_faulted:
                    self.diverged.add(j)
                    continue
                # "large-folio COW reuse rules differ by version": once the two kernels took
                # different reuse/copy decisions their states legitimately part.
                si, sj = self.sims[i].stats, self.sims[j].stats
                if (si["cow_copies"], si["cow_reuses"]) != (sj["cow_copies"], sj["cow_reuses"]):
                    self.diverged.add(j)
                    continue
            pte_mask = flag_mask = None
            if (i, j) in self.drifts:
                drift = self.drifts[(i, j)]
                pte_mask = drift.pte_mask(views[i])
                flag_mask = drift.flag_mask(len(views[i].state["flags"]))
            elif "contpte-layout" in deviations:
                pte_mask = contpte_mask(views[i]) | contpte_mask(views[j]) \
                    if len(views[i].keys) == len(views[j].keys) else None
            diff = compare(views[i], views[j], pte_mask, flag_mask, same_version)
            assert diff == [], f"{self.sims[i]!r} vs {self.sims[j]!r}: {diff}"

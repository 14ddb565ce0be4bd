"""A hypothesis state machine that runs the same random operations on several simulations
at once and compares them after every step. Used by the batched-vs-per-PTE equivalence
tests and by the Rust-vs-reference agreement tests.

The known, documented deviations between per-PTE and batched kernels are masked by name
(``DEVIATIONS``) and nothing else is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from hypothesis import event
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ptebatch as pb

MEMORY = 8 << 20

# PTE bits a documented deviation may touch, per architecture (docs/semantics.md §1).
BITS = {
    "x86-64": dict(write=1 << 1, young=1 << 5, dirty=(1 << 6) | (1 << 58), soft_dirty=1 << 11, cont=0),
    # arm64: PTE_WRITE (DBM) and PTE_RDONLY carry write and hardware-dirty, PTE_DIRTY is bit 55.
    "arm64": dict(write=(1 << 51) | (1 << 7), young=1 << 10, dirty=(1 << 55) | (1 << 7), soft_dirty=0,
                  cont=1 << 52),
}

# Folio flags (rust/src/memory.rs).
PG_DIRTY = 1 << 4
PG_PARTIALLY_MAPPED = 1 << 5
PG_MAYBE_SHARED = 1 << 6

#: Where a batched kernel may differ from the same kernel run per PTE, as the spec documents.
DEVIATIONS = {
    "fork-write-merge-shared": "fork of a shared mapping: if any PTE of a batch is writable the "
                               "child gets all of them writable (kernel-algorithms.md §2.7, §8.6)",
    "soft-dirty-untracked": "soft-dirty is not compared while VM_SOFTDIRTY is set; the child takes "
                            "the first PTE's bit for the batch (§2.4, §8.7)",
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


@dataclass
class Mapping:
    start: int
    pages: int


@dataclass
class Proc:
    pid: int
    maps: list[Mapping] = field(default_factory=list)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except (ValueError, TypeError, pb.PtebatchError) as e:
        return (type(e).__name__, None)


def pte_masks(state: dict[str, Any], bits: dict[str, int], deviations: set[str],
              mprotect_merged: bool) -> np.ndarray:
    """Per-PTE masks of the bits the named deviations may change."""
    masks = []
    for row in np.asarray(state["vmas"]).reshape(-1, 16):
        npages, shared, vm_softdirty = int(row[2]), bool(row[6]), bool(row[9])
        m = 0
        if "contpte-layout" in deviations and bits["cont"]:
            m |= bits["cont"] | bits["young"] | bits["dirty"]
        if shared and "fork-write-merge-shared" in deviations:
            m |= bits["write"]
        if vm_softdirty and "soft-dirty-untracked" in deviations:
            m |= bits["soft_dirty"]
        if mprotect_merged:
            m |= bits["dirty"] | bits["young"] | bits["soft_dirty"] | bits["write"]
        masks.append(np.full(npages, m, dtype=np.uint64))
    return np.concatenate(masks) if masks else np.zeros(0, dtype=np.uint64)


def compare(a: dict[str, Any], b: dict[str, Any], *, deviations: set[str], same_version: bool,
            mprotect_merged: bool, arch: str = "x86-64") -> list[str]:
    """Differences between two states after masking the named deviations."""
    a, b = dict(a), dict(b)
    if deviations:
        bits = BITS["arm64" if arch.startswith("arm64") else arch]
        ma = pte_masks(a, bits, deviations, mprotect_merged)
        mb = pte_masks(b, bits, deviations, mprotect_merged)
        if len(ma) == len(a["ptes"]) and len(mb) == len(b["ptes"]):
            a["ptes"] = np.asarray(a["ptes"], dtype=np.uint64) & ~ma
            b["ptes"] = np.asarray(b["ptes"], dtype=np.uint64) & ~mb
        fmask = (PG_PARTIALLY_MAPPED if "deferred-split-per-pte" in deviations else 0) | (PG_DIRTY if mprotect_merged else 0)
        a["flags"] = np.asarray(a["flags"]) & ~np.uint8(fmask)
        b["flags"] = np.asarray(b["flags"]) & ~np.uint8(fmask)
    ignore = []
    if not same_version:
        # MM-ID slots and the shared bit exist only from v6.15.
        a["large"] = np.asarray(a["large"]).reshape(-1, 9)[:, :5]
        b["large"] = np.asarray(b["large"]).reshape(-1, 9)[:, :5]
        a["flags"] = np.asarray(a["flags"]) & ~np.uint8(PG_MAYBE_SHARED)
        b["flags"] = np.asarray(b["flags"]) & ~np.uint8(PG_MAYBE_SHARED)
    return pb.state_diff(a, b, ignore)


MTHP = st.sampled_from([(), ("16K",), ("64K",), ("16K", "64K"), ("64K", "2M"), ("16K", "64K", "2M")])


class SimMachine(RuleBasedStateMachine):
    """Runs every operation on ``self.sims`` (built by :meth:`make_sims`) in lockstep."""

    kernel = "6.18"
    max_procs = 5

    def make_sims(self) -> list[pb.Simulation]:  # pragma: no cover - overridden
        raise NotImplementedError

    def comparisons(self) -> list[tuple[int, int, set[str], bool]]:  # pragma: no cover
        """(index a, index b, deviations masked, same kernel version)."""
        raise NotImplementedError

    @initialize(pages=st.integers(16, 640), mthp=MTHP, write=st.booleans(),
                shared=st.sampled_from([False, False, False, True]))
    def setup(self, pages: int, mthp: tuple[str, ...], write: bool, shared: bool) -> None:
        self.sims = self.make_sims()
        self.page = self.sims[0].page_size
        self.procs: list[Proc] = []
        self.pins: list[int] = []
        self.files: list[int] = []
        self.mprotected = False
        self.diverged: set[int] = set()
        pids = {s.spawn().pid for s in self.sims}
        assert len(pids) == 1
        self.procs.append(Proc(pids.pop()))
        for s in self.sims:
            f = s.create_file("256K", "16K")
        self.files.append(f)
        # Most interesting sequences start from memory that is already faulted in.
        p = self.procs[0]
        start = self.all(lambda s: s.process(p.pid).mmap(pages * self.page, "rw", shared, mthp=mthp).start)
        if start is None:
            # An mTHP size this layout has not (its PMD is smaller): plain pages then.
            start = self.all(lambda s: s.process(p.pid).mmap(pages * self.page, "rw", shared).start)
        p.maps.append(Mapping(start, pages))
        self.all(lambda s: s.process(p.pid).touch(start, pages * self.page, write))

    # -- helpers -------------------------------------------------------------------------

    def all(self, fn: Callable[[pb.Simulation], Any]) -> Any:
        """Runs ``fn`` on every simulation; all must agree on success or the error class,
        and a failed call must leave the state as it was."""
        before = [s.state() for s in self.sims]
        results = [outcome(lambda s=s: fn(s)) for s in self.sims]
        kinds = {r[0] for r in results}
        assert len(kinds) == 1, f"simulations disagree on the outcome: {results}"
        event(f"outcome {results[0][0]}")
        if results[0][0] != "ok":
            for s, b in zip(self.sims, before):
                assert pb.state_diff(b, s.state()) == [], "a failed operation changed the state"
            return None
        values = [r[1] for r in results]
        return values[0]

    def live(self) -> list[Proc]:
        return [p for p in self.procs]

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
          kind=st.sampled_from(["anon", "anon", "anon", "shared-anon", "file-private", "file-shared",
                                "anon-uffd", "anon-uffd-fork"]),
          prot=st.sampled_from(["rw", "rw", "r"]))
    def mmap(self, data: st.DataObject, pages: int, mthp: tuple[str, ...], kind: str, prot: str) -> None:
        p = data.draw(st.sampled_from(self.procs))
        if kind.startswith("file"):
            pages = min(pages, 64)
            file, shared = self.files[0], kind == "file-shared"
        else:
            file, shared = None, kind == "shared-anon"
        uffd, fork_event = kind.startswith("anon-uffd"), kind == "anon-uffd-fork"
        start = self.all(lambda s: s.process(p.pid).mmap(pages * self.page, prot, shared, file=file, mthp=mthp,
                                                          uffd_wp=uffd, uffd_event_fork=fork_event).start)
        if start is not None:
            p.maps.append(Mapping(start, pages))

    @rule(data=st.data(), write=st.booleans())
    def touch(self, data: st.DataObject, write: bool) -> None:
        p, a, n = self.addr(data, pages_max=640)
        self.all(lambda s: s.process(p.pid).touch(a, n, write))

    @rule(data=st.data(), write=st.booleans())
    def access(self, data: st.DataObject, write: bool) -> None:
        p, a, _ = self.addr(data)
        tokens = self.all(lambda s: s.process(p.pid).write(a) if write else s.process(p.pid).read(a))
        del tokens

    @precondition(lambda self: len(self.procs) < 5)
    @rule(data=st.data())
    def fork(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.procs))
        child = self.all(lambda s: s.process(p.pid).fork().pid)
        if child is not None:
            self.procs.append(Proc(child, list(p.maps)))

    @rule(data=st.data())
    def munmap(self, data: st.DataObject) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).munmap(a, n))

    @rule(data=st.data(), prot=st.sampled_from(["r", "rw", "none"]))
    def mprotect(self, data: st.DataObject, prot: str) -> None:
        p, a, n = self.addr(data)
        if self.all(lambda s: s.process(p.pid).mprotect(a, n, prot)) is None:
            self.mprotected = True

    @rule(data=st.data(), advice=st.sampled_from(["dontneed", "dontneed", "dontfork", "wipeonfork", "dofork"]))
    def madvise(self, data: st.DataObject, advice: str) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).madvise(a, n, advice))

    @rule(data=st.data(), write=st.booleans(), longterm=st.booleans())
    def pin(self, data: st.DataObject, write: bool, longterm: bool) -> None:
        p, a, n = self.addr(data, pages_max=4)
        pin = self.all(lambda s: s.process(p.pid).pin(a, n, write=write, longterm=longterm).id)
        if pin is not None:
            self.pins.append(pin)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def unpin(self, data: st.DataObject) -> None:
        pin = data.draw(st.sampled_from(self.pins))
        self.pins.remove(pin)
        self.all(lambda s: s._b.unpin(pin))

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def exit(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.procs[1:]))
        self.procs.remove(p)
        self.all(lambda s: s.process(p.pid).exit())

    @rule(data=st.data(), enable=st.booleans())
    def uffd_writeprotect(self, data: st.DataObject, enable: bool) -> None:
        p, a, n = self.addr(data)
        self.all(lambda s: s.process(p.pid).uffd_writeprotect(a, n, enable))

    @rule(data=st.data())
    def clear_soft_dirty(self, data: st.DataObject) -> None:
        p = data.draw(st.sampled_from(self.procs))
        self.all(lambda s: s.process(p.pid).clear_soft_dirty())

    # -- after every step ------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        if not hasattr(self, "sims"):
            return
        for s in self.sims:
            s.check()
        states = [s.state() for s in self.sims]
        for i, j, deviations, same_version in self.comparisons():
            if j in self.diverged:
                continue
            if not same_version:
                # "large-folio COW reuse rules differ by version": once the two kernels took
                # different reuse/copy decisions their states legitimately part.
                si, sj = self.sims[i].stats, self.sims[j].stats
                if (si["cow_copies"], si["cow_reuses"]) != (sj["cow_copies"], sj["cow_reuses"]):
                    self.diverged.add(j)
                    continue
            mprotect_merged = self.mprotected and "mprotect-ad-merge" in deviations
            diff = compare(states[i], states[j], deviations=deviations, same_version=same_version,
                           mprotect_merged=mprotect_merged, arch=self.sims[i].arch)
            assert diff == [], f"{self.sims[i]!r} vs {self.sims[j]!r}: {diff}"

"""Findings of a hostile review of the zero-copy views (docs/views.md), one test each.

Each test fails on the commit reviewed (b26eb46) and states what docs/views.md promises.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptebatch as pb

PAGE = 4096
BIG = "4GiB"  # 1 Mi pages: munmap / exit / fork of it run on a copy of the state


def _sim(memory: str = "64MiB", **kw) -> pb.Simulation:
    return pb.Simulation("x86-64", kernel="6.18", memory=memory, **kw)


# ---- 1. views of storage a step on a copy dropped go stale --------------------------------


def test_munmap_run_on_a_copy_clears_the_view() -> None:
    """docs/views.md: an unmapped VMA's views "show the entries the unmap cleared (none)".
    A munmap of >= 1 Mi pages runs on a copy; the copy's store is dropped with the VMA, so
    the viewed store is never written back and keeps PTEs of pages that are now free."""
    sim = _sim()
    p = sim.spawn()
    v = p.mmap(BIG)
    p.touch(v.start, 16 * PAGE, write=True)
    t = p.ptes(v)
    pfns = sorted({int(e) >> 12 & ((1 << 40) - 1) for e in t[:16]})
    p.munmap(v.start, v.length)
    order = sim.memory.order
    assert all(order[pf] == 255 for pf in pfns), "the pages were freed"
    assert not t[:16].any(), f"the view still maps freed pages: {int(t[0]):#x}"


def test_exit_run_on_a_copy_clears_the_view() -> None:
    """As above for exit() of a process with >= 1 Mi pages of mappings (the small case is
    test_views.py::test_exit_leaves_a_valid_view)."""
    sim = _sim()
    p = sim.spawn()
    c = p.fork()
    v = c.mmap(BIG)
    c.touch(v.start, 16 * PAGE, write=True)
    t = c.ptes(v)
    c.exit()
    assert int(sim.memory.mapcount.sum()) == 0
    assert not t[:16].any(), f"the view of an exited process still maps pages: {int(t[0]):#x}"


# ---- 3. refusals where nothing would move ------------------------------------------------


def test_mprotect_that_cannot_merge_is_not_refused() -> None:
    """BufferError is for "an operation that might merge" a viewed VMA with a separately
    mapped neighbour. The pre-check refuses any change of a range that touches such a
    boundary, even when the result cannot merge (a different prot, or no change at all)."""
    sim = _sim()
    p = sim.spawn()
    a = p.mmap("64KiB", prot="rw")
    b = p.mmap("64KiB", prot="r", addr=a.end)
    t = p.ptes(a)
    p.mprotect(b.start, PAGE, "r")       # no change at all
    p.mprotect(b.start, PAGE, "none")    # differs from a's "rw": no merge possible
    p.madvise(b.start, PAGE, "dontfork")  # a is not VM_DONTFORK: no merge possible
    assert len(p.vmas()) == 3, "a, b's first page, the rest of b: as without a view"
    del t


def test_file_next_to_anon_is_not_refused() -> None:
    """A file mapping and an anonymous one never merge, whatever their prot."""
    sim = _sim()
    p = sim.spawn()
    f = sim.create_file("64KiB")
    a = p.mmap("64KiB", prot="r", file=f)
    b = p.mmap("64KiB", prot="r", addr=a.end)
    t = p.ptes(b)
    p.mprotect(a.start, a.length, "r")
    assert len(p.vmas()) == 2
    del t


def test_clone_has_views_of_its_own() -> None:
    """Simulation.clone() copies the state with State::try_clone, which shares the view
    counts (Exports::share) and the origin links with the original: a view of the original
    makes the clone refuse a merge, though nothing of the clone is viewed (and the reverse).
    clone() wants counts of its own (an ordinary clone, or try_clone without share/origin)."""
    sim = _sim()
    p = sim.spawn()
    a = p.mmap("64KiB")
    t = p.ptes(a)
    other = sim.clone()
    q = other.process(p.pid)
    q.mmap("64KiB", addr=a.end)
    assert len(q.vmas()) == 1, "the clone's neighbours merge as in an unviewed simulation"
    del t
    gc.collect()
    u = q.ptes(a.start)
    p.mmap("64KiB", addr=a.end)
    assert len(p.vmas()) == 1, "a view of the clone does not bind the original"
    del u


_CHANGES = [("mprotect", x) for x in ("r", "rw", "none")] + [
    ("madvise", x) for x in ("dontfork", "dofork", "wipeonfork", "keeponfork", "hugepage", "nohugepage")
]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prots=st.lists(st.sampled_from(["r", "rw"]), min_size=3, max_size=3),
    viewed=st.integers(0, 2),
    ops=st.lists(
        st.tuples(st.sampled_from(_CHANGES), st.integers(0, 11), st.integers(1, 12)), min_size=1, max_size=6
    ),
)
def test_refused_exactly_when_a_viewed_mapping_would_merge_across_storage(prots, viewed, ops) -> None:
    """Three adjacent 4-page mmaps (separate storage), one viewed; each mprotect / madvise is
    refused with BufferError exactly when, without the view (a clone), a VMA would come to
    span the viewed mapping and pages outside it; otherwise the result is the clone's."""
    sim = _sim("4MiB")
    p = sim.spawn()
    base = p.mmap(12 * PAGE)
    p.munmap(base.start, base.length)
    for i, prot in enumerate(prots):
        p.mmap(4 * PAGE, addr=base.start + 4 * i * PAGE, prot=prot)
    vv = next(v for v in p.vmas() if v["start"] <= base.start + 4 * viewed * PAGE < v["end"])
    lo, hi = vv["start"], vv["end"]
    t = p.ptes(lo)
    for (call, arg), first, n in ops:
        n = min(n, 12 - first)
        other = sim.clone()
        q = other.process(p.pid)
        addr = base.start + first * PAGE
        getattr(q, call)(addr, n * PAGE, arg)
        spans = any(v["start"] < hi and v["end"] > lo and (v["start"] < lo or v["end"] > hi) for v in q.vmas())
        try:
            getattr(p, call)(addr, n * PAGE, arg)
        except BufferError as e:
            assert spans, f"{call}({first}, {n}, {arg}) refused though nothing viewed would move: {e}"
            continue
        assert not spans, f"{call}({first}, {n}, {arg}) merged across storage"
        assert p.vmas() == q.vmas()
        assert np.shares_memory(t, p.ptes(lo))
    del t


# ---- 6. the reference backend ------------------------------------------------------------


def test_reference_copies_cannot_be_made_writeable() -> None:
    """docs/views.md: writing raises, "and so does a.flags.writeable = True". The
    reference backend's copies own their data, so numpy lets them be made writeable; a
    base without a writable buffer (np.frombuffer of bytes) would refuse as the Rust views do."""
    sim = pb.Simulation("x86-64", kernel="6.18", memory="16MiB", backend="reference")
    p = sim.spawn()
    v = p.mmap("64KiB")
    p.touch(v.start, v.length, write=True)
    for a in (sim.memory.mapcount, p.ptes(v)):
        with pytest.raises(ValueError):
            a.flags.writeable = True


# ---- 7. memory and time ------------------------------------------------------------------


def test_unmapped_page_tables_are_freed() -> None:
    """A store never shrinks, so munmap of all but one page of a mapping frees none of its
    page table: 20 such mappings hold 160 MiB of PTEs for 20 pages (before b26eb46,
    split_off shrank the table; the kernel frees page tables in free_pgtables()). Every
    step run on a copy also copies the dead entries. A store that no view holds could be
    compacted when most of it is no longer mapped."""
    sim = _sim()
    p = sim.spawn()
    base = sim._b.state_bytes()
    for _ in range(20):
        v = p.mmap(BIG)
        p.touch(v.start, PAGE, write=True)
        p.munmap(v.start + PAGE, v.length - PAGE)
    grown = sim._b.state_bytes() - base
    assert grown < 1 << 20, f"{grown >> 20} MiB of page tables for 20 mapped pages"


def test_shrunk_page_tables_keep_entries_and_pieces_that_continue() -> None:
    """The store of a mostly unmapped mapping is replaced by one of the mapped windows: the
    entries stay, and pieces split by mprotect still share storage, so merging them back with
    a view is no move (no BufferError) and the view sees the merged VMA."""
    sim = _sim()
    p = sim.spawn()
    v = p.mmap(4096 * PAGE)
    p.touch(v.start, 8 * PAGE, write=True)
    p.mprotect(v.start, 4 * PAGE, "r")
    before = p.ptes(v.start)[:4].copy(), p.ptes(v.start + 4 * PAGE)[:4].copy()
    base = sim._b.state_bytes()
    p.munmap(v.start + 8 * PAGE, v.length - 8 * PAGE)
    assert base - sim._b.state_bytes() >= (4096 - 8) * 8, "the unmapped entries are freed"
    t = p.ptes(v.start)
    assert np.array_equal(t, before[0]) and np.array_equal(p.ptes(v.start + 4 * PAGE), before[1])
    p.mprotect(v.start, 4 * PAGE, "rw")
    assert len(p.vmas()) == 1
    assert np.shares_memory(t, p.ptes(v.start))
    del t


# Findings 6 (adjacent mmaps that merge copy both stores) and 7 (a step on a copy of n stores
# cost O(n^2)) are timings: benches/test_bench_views_scaling.py measures them. What finding
# 7's fix must keep right, at a size a test affords, is below.


def test_step_on_a_copy_of_many_stores_writes_back_into_each() -> None:
    """A fork run on a copy of the state (a pin and 4 MiB of memory make it one) of a process
    with many VMAs in as many stores, each viewed: every view shows the fork's result (the
    parent's PTEs write-protected for COW), through the copy-to-original map. (With a pin,
    fork's worst case is a page per PTE: 201 > the ~150 pages free in 1 MiB.)"""
    sim = _sim("1MiB")
    p = sim.spawn()
    first = p.mmap(PAGE)
    p.touch(first.start, PAGE, write=True)
    p.pin(first.start, PAGE)
    vmas = []
    for i in range(200):
        v = p.mmap(PAGE, prot="r" if i % 2 else "rw")  # alternate, so that none merges
        if i % 2 == 0:
            p.touch(v.start, PAGE, write=True)
        vmas.append(v)
    views = [p.ptes(v) for v in vmas]
    before = [t.copy() for t in views]
    free = int((sim.memory.order == 255).sum())
    assert free < 201, "the fork runs on a copy"
    p.fork()
    changed = 0
    for v, t, b in zip(vmas, views, before):
        assert np.array_equal(t, p.ptes(v)), f"the view of {v.start:#x} is stale"
        assert np.shares_memory(t, p.ptes(v)), "the view and the VMA's storage are one"
        changed += not np.array_equal(t, b)
    assert changed == 100, "the fork write-protected each written private page"

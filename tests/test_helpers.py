"""ptebatch.helpers: the batched helpers over user-owned arrays.

Three kinds of check, each over random simulation states (several layouts, kernel versions,
batched and per-PTE):
- the whole-table loops over numpy copies of a simulation's state give exactly the
  simulation's own fork / munmap / exit end state and counters;
- the single PTE and rmap helpers, composed the way the kernel's per-PTE fork and zap compose
  them, give the simulation's unbatched fork / munmap;
- every helper agrees with its pure-Python twin (ptebatch.reference.helpers);
and the boundary: bad arguments raise TypeError / ValueError naming them, and write nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch import helpers as H
from ptebatch.reference import helpers as R

COUNTERS = ("refcount_atomics", "mapcount_updates", "rmap_calls", "pte_reads", "pte_writes",
            "tlb_flush_ranges", "tlb_flush_pages", "folio_pte_batch_calls", "batches", "pages_copied",
            "folios_allocated", "folios_freed", "deferred_splits")
ARCHES = ("x86-64", "arm64-4k", "arm64-16k", "riscv64")
KERNELS = ("6.8", "seed", "6.9", "6.12", "6.15", "6.18")
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclasses.dataclass
class Scene:
    sim: pb.Simulation
    arch: str
    kernel: str
    batching: bool
    parent: pb.Process


@st.composite
def scenes(draw, arches=ARCHES, kernels=KERNELS, batching=None) -> Scene:
    """A simulation with a parent process whose mappings hold small and large folios,
    anonymous and file-backed, some shared with an earlier child and some partly unmapped."""
    arch = draw(st.sampled_from(arches))
    kernel = draw(st.sampled_from(kernels))
    batched = draw(st.booleans()) if batching is None else batching
    sim = pb.Simulation(arch, kernel, "16M", seed=draw(st.integers(0, 3)), batching=batched)
    ps = sim.page_size
    p = sim.spawn()
    for k in range(draw(st.integers(1, 3))):
        pages = draw(st.integers(16, 96))
        # The first mapping is always written anonymous memory in large folios.
        kind = "anon" if k == 0 else draw(st.sampled_from(("anon", "anon", "file", "shmem")))
        order = 4 if k == 0 else draw(st.sampled_from((0, 2, 4)))
        if kind == "anon":
            m = p.mmap(pages * ps, mthp=() if order == 0 else ps << order)
        else:
            pages = -(-pages >> order) << order  # whole folios
            f = sim.create_file(pages * ps, ps << order, shmem=kind == "shmem")
            m = p.mmap(pages * ps, shared=draw(st.booleans()), file=f)
        a = draw(st.integers(0, pages // 4))
        b = draw(st.integers(pages // 2, pages))
        p.touch(m.start + a * ps, (b - a) * ps, write=k == 0 or draw(st.sampled_from((True, True, False))))
    if draw(st.booleans()):
        c = p.fork()
        if draw(st.booleans()):
            v = c.vmas()[0]
            c.touch(v["start"], ps, write=True)  # a COW break
        if draw(st.booleans()):
            c.exit()
    if draw(st.booleans()):
        v = draw(st.sampled_from(p.vmas()))
        n = (v["end"] - v["start"]) // ps
        if n > 2:
            k = draw(st.integers(1, n - 1))
            p.munmap(v["start"] + k * ps, ps)  # leaves a partly mapped folio behind
    return Scene(sim, arch, kernel, batched, p)


def vma_rows(state: dict, pid: int) -> list[np.ndarray]:
    return [row for row in state["vmas"] if row[0] == pid]


def vma_tables(state: dict, pid: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(vma row, copy of its PTEs) of each VMA of ``pid``, in order."""
    out, at = [], 0
    for row in state["vmas"]:
        n = int(row[2])
        if row[0] == pid:
            out.append((row, np.array(state["ptes"][at:at + n], dtype=np.uint64)))
        at += n
    return out


def mm_row(state: dict, pid: int) -> np.ndarray:
    return next(r for r in state["mms"] if r[0] == pid)


def assert_counts_match(counts: H.FolioCounts, state: dict) -> None:
    for name in ("order", "flags", "mapcount", "refcount"):
        np.testing.assert_array_equal(getattr(counts, name), state[name], err_msg=name)
    # entire_mapcount (column 2) belongs to PMD mappings, which no PTE helper touches.
    np.testing.assert_array_equal(np.delete(counts.large_table(), 2, 1), np.delete(state["large"], 2, 1),
                                  err_msg="large folios")


def add_stats(total: dict, d: dict) -> None:
    for k in COUNTERS:
        total[k] = total.get(k, 0) + d[k]
    h = total.setdefault("batch_histogram", [])
    for n, c in enumerate(d["batch_histogram"]):
        if n >= len(h):
            h.extend([0] * (n + 1 - len(h)))
        h[n] += c


def assert_stats(ours: dict, sim: dict, extra_flush_ranges: int = 0) -> None:
    for k in COUNTERS:
        want = sim[k] - (extra_flush_ranges if k == "tlb_flush_ranges" else 0)
        assert ours.get(k, 0) == want, (k, ours.get(k, 0), want)
    h = list(ours.get("batch_histogram", []))
    s = list(sim["batch_histogram"])
    n = max(len(h), len(s))
    assert h + [0] * (n - len(h)) == s + [0] * (n - len(s))


def lay(arch: str) -> pb.Layout:
    return pb.layout(arch)


def fork_args(sc: Scene, row: np.ndarray, child_pid: int) -> dict:
    l = lay(sc.arch)
    return dict(layout=sc.arch, kernel=sc.kernel, batched=sc.batching, dst_mm_id=child_pid,
                first_vpn=int(row[1]), shared=bool(row[6]),
                soft_dirty_tracking=l.has_soft_dirty and not bool(row[9]), zero_pfn=sc.sim.zero_pfn)


# ---- the whole-table loops match the simulation ------------------------------------------

@SETTINGS
@given(scenes())
def test_copy_pte_range_matches_simulation_fork(sc: Scene) -> None:
    before = sc.sim.state()
    pid = sc.parent.pid
    child_pid = len(before["mms"]) + 1
    counts = H.FolioCounts.from_state(before)
    parents, children = [], []
    total: dict[str, Any] = {}
    for row, src in vma_tables(before, pid):
        # vma_needs_copy(): only VMAs with anonymous pages (no uffd-wp, MADV_DONTFORK here).
        dst = np.full_like(src, lay(sc.arch).none_value)
        if row[14] != 0:
            r = H.copy_pte_range(src, dst, counts, **fork_args(sc, row, child_pid))
            add_stats(total, r)
        parents.append(src)
        children.append(dst)
    child = sc.parent.fork()
    assert child.pid == child_pid
    after = sc.sim.state()
    assert_counts_match(counts, after)
    for (row, ptes), want in zip(vma_tables(after, pid), parents):
        np.testing.assert_array_equal(ptes, want)
    for (row, ptes), want in zip(vma_tables(after, child_pid), children):
        np.testing.assert_array_equal(ptes, want)
    # fork flushes the parent's TLB once for the whole mm, above the per-table loop.
    assert_stats(total, sc.sim.last_stats, extra_flush_ranges=1)


@SETTINGS
@given(scenes(), st.data())
def test_zap_pte_range_matches_simulation_munmap(sc: Scene, data) -> None:
    before = sc.sim.state()
    pid = sc.parent.pid
    tables = vma_tables(before, pid)
    row, ptes = data.draw(st.sampled_from(tables))
    counts = H.FolioCounts.from_state(before)
    mm_id = int(mm_row(before, pid)[1])
    r = H.zap_pte_range(ptes, counts, layout=sc.arch, kernel=sc.kernel, batched=sc.batching, mm_id=mm_id,
                        first_vpn=int(row[1]), zero_pfn=sc.sim.zero_pfn)
    rss_before = sc.parent.rss()
    ps = sc.sim.page_size
    sc.parent.munmap(int(row[1]) * ps, int(row[2]) * ps)
    after = sc.sim.state()
    assert_counts_match(counts, after)
    assert np.all(lay(sc.arch).pte_none(ptes))
    rss_after = sc.parent.rss()
    assert {k: rss_after[k] - rss_before[k] for k in rss_after} == r["rss"]
    assert_stats(r, sc.sim.last_stats)


@SETTINGS
@given(scenes())
def test_zap_full_matches_simulation_exit(sc: Scene) -> None:
    before = sc.sim.state()
    pid = sc.parent.pid
    counts = H.FolioCounts.from_state(before)
    mm_id = int(mm_row(before, pid)[1])
    total: dict = {}
    for row, ptes in vma_tables(before, pid):
        r = H.zap_pte_range(ptes, counts, layout=sc.arch, kernel=sc.kernel, batched=sc.batching,
                            mm_id=mm_id, first_vpn=int(row[1]), full=True, zero_pfn=sc.sim.zero_pfn)
        add_stats(total, r)
    sc.parent.exit()
    assert_counts_match(counts, sc.sim.state())
    assert_stats(total, sc.sim.last_stats)


# ---- the single helpers compose into the simulation's per-PTE paths -----------------------

def per_pte_fork(sc: Scene, src: np.ndarray, dst: np.ndarray, counts: H.FolioCounts, row, child_pid: int) -> None:
    """copy_pte_range() of a per-PTE kernel written with the single helpers (mm/memory.c
    copy_present_ptes() with nr == 1, no uffd-wp, no pins)."""
    l = lay(sc.arch)
    k: dict[str, Any] = dict(layout=sc.arch, kernel=sc.kernel, first_vpn=int(row[1]))
    shared = bool(row[6])
    for i in range(len(src)):
        pte = H.ptep_get(src, i, **k)
        if l.pte_none(pte):
            continue
        pfn = l.pte_pfn(pte)
        if not l.pte_special(pte) and pfn != sc.sim.zero_pfn:
            head = pfn & ~((1 << int(counts.order[pfn])) - 1)
            H.folio_ref_add(counts, head, 1, kernel=sc.kernel)
            if counts.flags[head] & H.PG_ANON:
                assert H.folio_try_dup_anon_rmap_ptes(counts, pfn, 1, kernel=sc.kernel, dst_mm_id=child_pid)
            else:
                H.folio_dup_file_rmap_ptes(counts, pfn, 1, kernel=sc.kernel, dst_mm_id=child_pid)
        t = pte
        if not shared and l.pte_write(t):
            H.wrprotect_ptes(src, i, 1, **k)
            t = l.pte_wrprotect(t)
        if shared:
            t = l.pte_mkclean(t)
        H.set_ptes(dst, i, l.pte_mkold(t), 1, order=counts.order, **k)


@SETTINGS
@given(scenes(arches=("x86-64", "arm64-4k"), kernels=("6.8", "6.18"), batching=False))
def test_single_helpers_compose_into_the_per_pte_fork(sc: Scene) -> None:
    before = sc.sim.state()
    pid = sc.parent.pid
    child_pid = len(before["mms"]) + 1
    counts = H.FolioCounts.from_state(before)
    parents, children = [], []
    for row, src in vma_tables(before, pid):
        dst = np.full_like(src, lay(sc.arch).none_value)
        if row[14] != 0:
            per_pte_fork(sc, src, dst, counts, row, child_pid)
        parents.append(src)
        children.append(dst)
    sc.parent.fork()
    after = sc.sim.state()
    assert_counts_match(counts, after)
    for (row, ptes), want in zip(vma_tables(after, pid), parents):
        np.testing.assert_array_equal(ptes, want)
    for (row, ptes), want in zip(vma_tables(after, child_pid), children):
        np.testing.assert_array_equal(ptes, want)


@SETTINGS
@given(scenes(arches=("x86-64", "arm64-4k"), kernels=("6.8", "6.18"), batching=False), st.data())
def test_single_helpers_compose_into_the_per_pte_zap(sc: Scene, data) -> None:
    before = sc.sim.state()
    pid = sc.parent.pid
    row, ptes = data.draw(st.sampled_from(vma_tables(before, pid)))
    counts = H.FolioCounts.from_state(before)
    mm_id = int(mm_row(before, pid)[1])
    l = lay(sc.arch)
    k: dict[str, Any] = dict(layout=sc.arch, kernel=sc.kernel, first_vpn=int(row[1]))
    gather = []
    for i in range(len(ptes)):
        pte = int(ptes[i])
        if l.pte_none(pte):
            continue
        pfn = l.pte_pfn(pte)
        if l.pte_special(pte) or pfn == sc.sim.zero_pfn:
            H.clear_full_ptes(ptes, i, 1, **k)
            continue
        head = pfn & ~((1 << int(counts.order[pfn])) - 1)
        if counts.flags[head] & H.PG_ANON:
            H.clear_full_ptes(ptes, i, 1, **k)
        elif l.pte_dirty(H.get_and_clear_full_ptes(ptes, i, 1, **k)):
            counts.flags[head] |= H.PG_DIRTY  # folio_mark_dirty()
        H.folio_remove_rmap_ptes(counts, pfn, 1, kernel=sc.kernel, mm_id=mm_id)
        gather.append(head)
    for head in gather:  # tlb_finish_mmu()
        H.folio_put_refs(counts, head, 1, kernel=sc.kernel)
    ps = sc.sim.page_size
    sc.parent.munmap(int(row[1]) * ps, int(row[2]) * ps)
    assert_counts_match(counts, sc.sim.state())


# ---- every helper agrees with its pure-Python twin ---------------------------------------

def same(x, y) -> None:
    if isinstance(x, H.FolioCounts):
        assert x.equal(y)
    elif isinstance(x, np.ndarray):
        np.testing.assert_array_equal(x, y)
    elif isinstance(x, dict):
        for k in COUNTERS:
            assert x[k] == y[k], k
        if "rss" in x:
            assert x["rss"] == y["rss"]
    else:
        assert x == y


@SETTINGS
@given(scenes(), st.data())
def test_loops_agree_with_reference(sc: Scene, data) -> None:
    state = sc.sim.state()
    pid = sc.parent.pid
    row, src = data.draw(st.sampled_from(vma_tables(state, pid)))
    counts = H.FolioCounts.from_state(state)
    dst = np.zeros_like(src)
    a = (src.copy(), dst.copy(), counts.copy())
    b = (src.copy(), dst.copy(), counts.copy())
    kw = fork_args(sc, row, 9)
    same(H.copy_pte_range(*a, **kw), R.copy_pte_range(*b, **kw))
    for x, y in zip(a, b):
        same(x, y)
    full = data.draw(st.booleans())
    zkw: dict[str, Any] = dict(layout=sc.arch, kernel=sc.kernel, batched=sc.batching, mm_id=pid, first_vpn=int(row[1]),
               full=full, zero_pfn=sc.sim.zero_pfn)
    p1, c1 = src.copy(), counts.copy()
    p2, c2 = src.copy(), counts.copy()
    same(H.zap_pte_range(p1, c1, **zkw), R.zap_pte_range(p2, c2, **zkw))
    same(p1, p2)
    same(c1, c2)


@SETTINGS
@given(scenes(), st.data())
def test_rmap_helpers_agree_with_reference(sc: Scene, data) -> None:
    state = sc.sim.state()
    counts = H.FolioCounts.from_state(state)

    def heads() -> list[int]:
        return [int(h) for h in np.flatnonzero(counts.order != H.FREE)
                if h & ((1 << int(counts.order[h])) - 1) == 0]

    assume(heads())  # a scene that mapped only the zero page has no folio
    for _ in range(6):
        if not heads():
            break  # the last folio was freed
        head = data.draw(st.sampled_from(heads()))
        nr_pages = 1 << int(counts.order[head])
        page = head + data.draw(st.integers(0, nr_pages - 1))
        nr = data.draw(st.integers(1, head + nr_pages - page))
        mm_id = data.draw(st.integers(1, 4))
        anon = bool(counts.flags[head] & H.PG_ANON)
        op = data.draw(st.sampled_from(("ref_add", "put", "add_anon", "dup_anon", "dup_file", "remove")))
        c1, c2 = counts.copy(), counts.copy()
        k: dict[str, Any] = dict(kernel=sc.kernel)
        r1: Any
        r2: Any
        if op == "ref_add":
            r1, r2 = H.folio_ref_add(c1, head, nr, **k), R.folio_ref_add(c2, head, nr, **k)
        elif op == "put":
            if counts.refcount[head] < nr:
                continue
            r1, r2 = H.folio_put_refs(c1, head, nr, **k), R.folio_put_refs(c2, head, nr, **k)
        elif op == "add_anon":
            if not anon:
                continue
            ex = data.draw(st.booleans())
            r1 = H.folio_add_anon_rmap_ptes(c1, page, nr, mm_id=mm_id, exclusive=ex, **k)
            r2 = R.folio_add_anon_rmap_ptes(c2, page, nr, mm_id=mm_id, exclusive=ex, **k)
        elif op == "dup_anon":
            if not anon:
                continue
            pinned = data.draw(st.booleans())
            r1 = H.folio_try_dup_anon_rmap_ptes(c1, page, nr, dst_mm_id=mm_id, src_has_pinned=pinned, **k)
            r2 = R.folio_try_dup_anon_rmap_ptes(c2, page, nr, dst_mm_id=mm_id, src_has_pinned=pinned, **k)
        elif op == "dup_file":
            r1 = H.folio_dup_file_rmap_ptes(c1, page, nr, dst_mm_id=mm_id, **k)
            r2 = R.folio_dup_file_rmap_ptes(c2, page, nr, dst_mm_id=mm_id, **k)
        else:
            if np.any(counts.mapcount[page:page + nr] < 1):
                continue
            r1 = H.folio_remove_rmap_ptes(c1, page, nr, mm_id=mm_id, **k)
            r2 = R.folio_remove_rmap_ptes(c2, page, nr, mm_id=mm_id, **k)
        same(r1, r2)
        same(c1, c2)
        counts = c1


@st.composite
def tables(draw):
    """A page table with runs of consecutive pfns (contpte blocks on arm64, set with set_ptes),
    holes, and random dirty/young/write bits."""
    arch = draw(st.sampled_from(("x86-64", "arm64-4k", "arm64-64k", "riscv64", "ppc64-4k", "s390x")))
    kernel = draw(st.sampled_from(("6.8", "6.9", "6.18")))
    l = lay(arch)
    n = draw(st.integers(1, 3 * max(16, l.cont_ptes)))
    first_vpn = draw(st.integers(0, 64))
    ptes = np.full(n, l.none_value, np.uint64)
    i = 0
    while i < n:
        run = draw(st.integers(1, n - i))
        if draw(st.booleans()):
            pfn = draw(st.integers(0, 1 << 12)) * max(1, l.cont_ptes) + (first_vpn + i) % max(1, l.cont_ptes)
            pte = l.mk_pte(pfn, write=draw(st.booleans()), dirty=draw(st.booleans()), young=draw(st.booleans()))
            H.set_ptes(ptes, i, pte, run, layout=arch, kernel=kernel, first_vpn=first_vpn)
            for j in range(i, i + run):
                if draw(st.integers(0, 7)) == 0:
                    ptes[j] = l.pte_mkdirty(int(ptes[j]))
        i += run
    return arch, kernel, first_vpn, ptes


@settings(max_examples=40, deadline=None)
@given(tables(), st.data())
def test_pte_helpers_agree_with_reference(t, data) -> None:
    arch, kernel, first_vpn, ptes = t
    n = len(ptes)
    i = data.draw(st.integers(0, n - 1))
    nr = data.draw(st.integers(1, n - i))
    k: dict[str, Any] = dict(layout=arch, kernel=kernel, first_vpn=first_vpn)
    assert H.ptep_get(ptes, i, **k) == R.ptep_get(ptes, i, **k)
    op = data.draw(st.sampled_from(("set", "set1", "wrprotect", "clear", "get_and_clear")))
    a, b = ptes.copy(), ptes.copy()
    r1: Any
    r2: Any
    if op in ("set", "set1"):
        l = lay(arch)
        nr = 1 if op == "set1" else nr
        pte = l.mk_pte(data.draw(st.integers(0, 1 << 16)), write=True, young=data.draw(st.booleans()))
        order = np.full(1 << 17, 4, np.uint8)  # 16-page folios everywhere
        r1 = H.set_ptes(a, i, pte, nr, order=order, **k)
        r2 = R.set_ptes(b, i, pte, nr, order=order, **k)
    elif op == "wrprotect":
        r1, r2 = H.wrprotect_ptes(a, i, nr, **k), R.wrprotect_ptes(b, i, nr, **k)
    else:
        full = data.draw(st.booleans())
        fn = "clear_full_ptes" if op == "clear" else "get_and_clear_full_ptes"
        r1 = getattr(H, fn)(a, i, nr, full=full, **k)
        r2 = getattr(R, fn)(b, i, nr, full=full, **k)
    same(r1, r2)
    same(a, b)


def test_get_and_clear_full_ptes_gathers_the_run() -> None:
    l = lay("x86-64")
    ptes = l.mk_pte(np.arange(8, 12, dtype=np.uint64))
    ptes[2] = l.pte_mkdirty(int(ptes[2]))
    ptes[3] = l.pte_mkyoung(int(ptes[3]))
    got = H.get_and_clear_full_ptes(ptes, 0, 4, layout="x86-64", kernel="6.18")
    assert l.pte_pfn(got) == 8 and l.pte_dirty(got) and l.pte_young(got)
    assert np.all(l.pte_none(ptes))


def test_contpte_ptep_get_gathers_the_block() -> None:
    l = lay("arm64-4k")
    n = l.cont_ptes
    ptes = np.full(n, l.none_value, np.uint64)
    H.set_ptes(ptes, 0, l.mk_pte(0, write=True), n, layout="arm64-4k", kernel="6.18")
    assert np.all(l.pte_cont(ptes))
    ptes[n - 1] = l.pte_mkdirty(int(ptes[n - 1]))
    got = H.ptep_get(ptes, 0, layout="arm64-4k", kernel="6.18")
    assert l.pte_dirty(got)
    # 6.8 has no contpte: no gather.
    assert not l.pte_dirty(H.ptep_get(ptes, 0, layout="arm64-4k", kernel="6.8"))


# ---- the boundary ------------------------------------------------------------------------

def small_state():
    sim = pb.Simulation("x86-64", "6.18", "4M")
    p = sim.spawn()
    m = p.mmap("256K", mthp="64K")
    p.touch(m.start, "256K", write=True)
    state = sim.state()
    return sim, p, m, state


def test_bad_arguments_raise_and_write_nothing() -> None:
    sim, p, m, state = small_state()
    src = p.ptes(m).copy()
    counts = H.FolioCounts.from_state(state)
    kw: dict[str, Any] = dict(layout="x86-64", kernel="6.18", dst_mm_id=2, first_vpn=m.start >> 12, zero_pfn=sim.zero_pfn)

    def unchanged():
        assert counts.equal(H.FolioCounts.from_state(state))
        np.testing.assert_array_equal(src, p.ptes(m))

    with pytest.raises(TypeError, match="src must be a numpy uint64 array"):
        H.copy_pte_range(src.astype(np.int64), np.zeros_like(src), counts, **kw)
    with pytest.raises(ValueError, match="dst has"):
        H.copy_pte_range(src, np.zeros(3, np.uint64), counts, **kw)
    ro = src.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="src is read-only"):
        H.copy_pte_range(ro, np.zeros_like(src), counts, **kw)
    with pytest.raises(ValueError, match="C-contiguous"):
        H.copy_pte_range(np.repeat(src, 2)[::2], np.zeros_like(src), counts, **kw)
    with pytest.raises(ValueError, match="same array passed twice"):
        H.copy_pte_range(src, src, counts, **kw)
    bad = counts.copy()
    bad.mapcount = bad.mapcount.astype(np.int64)
    with pytest.raises(TypeError, match="counts.mapcount must be a numpy int32 array"):
        H.copy_pte_range(src, np.zeros_like(src), bad, **kw)
    with pytest.raises(TypeError, match="counts must be a ptebatch.helpers.FolioCounts"):
        H.copy_pte_range(src, np.zeros_like(src), object(), **kw)  # type: ignore[arg-type]
    short = counts.copy()
    short.flags = short.flags[:-1].copy()
    with pytest.raises(ValueError, match="flags has"):
        H.copy_pte_range(src, np.zeros_like(src), short, **kw)
    beyond = src.copy()
    beyond[0] = lay("x86-64").mk_pte(sim.nr_pages + 5)
    with pytest.raises(ValueError, match=r"src\[0\].*beyond"):
        H.copy_pte_range(beyond, np.zeros_like(src), counts, **kw)
    torn = counts.copy()
    torn.order[int(lay("x86-64").pte_pfn(int(src[0])))] = 0  # the folio's first page
    with pytest.raises(ValueError, match="every page of a folio carries its order"):
        H.copy_pte_range(src.copy(), np.zeros_like(src), torn, **kw)
    with pytest.raises(ValueError, match="dst_mm_id=0"):
        H.copy_pte_range(src, np.zeros_like(src), counts, **{**kw, "dst_mm_id": 0})
    with pytest.raises(ValueError, match="unknown kernel"):
        H.copy_pte_range(src, np.zeros_like(src), counts, **{**kw, "kernel": "5.4"})
    unchanged()
    head = int(lay("x86-64").pte_pfn(int(src[0])))
    with pytest.raises(ValueError, match="not the first page"):
        H.folio_ref_add(counts, head + 1, 1, kernel="6.18")
    with pytest.raises(ValueError, match="stay inside its folio"):
        H.folio_remove_rmap_ptes(counts, head + 8, 9, kernel="6.18", mm_id=1)
    with pytest.raises(ValueError, match="below nr"):
        H.folio_put_refs(counts, head, 1000, kernel="6.18")
    with pytest.raises(ValueError, match="not anonymous"):
        file_counts = counts.copy()
        file_counts.flags[head] &= 0xFF & ~H.PG_ANON
        H.folio_try_dup_anon_rmap_ptes(file_counts, head, 1, kernel="6.18", dst_mm_id=2)
    with pytest.raises(ValueError, match="does not fit the table"):
        H.wrprotect_ptes(src, len(src) - 1, 2, layout="x86-64", kernel="6.18")
    with pytest.raises(TypeError, match="index must be an integer"):
        H.clear_full_ptes(src, 1.0, 1, layout="x86-64", kernel="6.18")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="largest pfn"):
        H.set_ptes(src, 0, lay("x86-64").mk_pte(lay("x86-64").max_pfn), 2, layout="x86-64", kernel="6.18")
    unchanged()


def test_helpers_update_in_place_and_free_the_last_reference() -> None:
    sim, p, m, state = small_state()
    counts = H.FolioCounts.from_state(state)
    ptes = p.ptes(m).copy()
    r = H.zap_pte_range(ptes, counts, layout="x86-64", kernel="6.18", mm_id=1, first_vpn=m.start >> 12,
                        zero_pfn=sim.zero_pfn)
    assert r["folios_freed"] == 4 and r["rss"]["anon"] == -64
    assert np.all(counts.order == H.FREE) and not counts.refcount.any() and not counts.mapcount.any()

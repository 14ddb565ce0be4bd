"""PMD-mapped THP (rust/src/huge_memory.rs, python/ptebatch/reference/sim/huge_memory.py): the
huge PMD fault, fork, COW, zap and split with the kernel's accounting, on both backends; and
the live kernel as oracle (``ptebatch.oracle_pmd``), skipped without root or with
PTEBATCH_SKIP_LIVE=1."""

from __future__ import annotations

import os

import numpy as np
import pytest

import ptebatch as pb

PAGE = 4096
PMD = 2 << 20
NR = PMD // PAGE
PM_PRESENT = 1 << 63
PM_EXCL = 1 << 56
PFN = (1 << 55) - 1
KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_THP = 1 << 15, 1 << 16, 1 << 22

BACKENDS = ["rust", "reference"]


def setup(backend: str = "rust", kernel: str = "6.18", batching: bool = True, write: bool = True):
    s = pb.Simulation("x86-64", kernel, "8M", backend=backend, batching=batching)
    p = s.spawn()
    m = p.mmap("4M", pmd=True)
    p.touch(m.start, "4M", write=write)
    s.check()
    return s, p, m


def head_of(p, m, i: int = 0) -> int:
    return int(p.pagemap(m.page(i), PAGE)[0]) & PFN


@pytest.mark.parametrize("backend", BACKENDS)
def test_fault_maps_a_pmd_with_entire_mapcount(backend: str) -> None:
    s, p, m = setup(backend)
    assert len(p.pmds(m)) == 2 and not np.any(p.ptes(m))
    assert p.rss()["anon"] == 2 * NR and p.vmas()[0]["anon_huge_pages"] == 4 << 20
    assert s.stats["faults"] == 2 and s.stats["alloc_by_order"][9] == 2
    h = head_of(p, m)
    head, tail = s.page(h), s.page(h + 7)
    assert (head["entire_mapcount"], head["large_mapcount"], head["nr_pages_mapped"]) == (1, 1, 0)
    assert head["refcount"] == 1 and head["anon_exclusive"] and not tail["anon_exclusive"]
    assert s.kpagecount(h + 7) == 1
    assert s.kpageflags(h) & (KPF_THP | KPF_COMPOUND_HEAD) == KPF_THP | KPF_COMPOUND_HEAD
    assert s.kpageflags(h + 7) & (KPF_THP | KPF_COMPOUND_TAIL) == KPF_THP | KPF_COMPOUND_TAIL
    pm = p.pagemap(m.start, "4M")
    assert np.all(pm & np.uint64(PM_EXCL)) and np.all((pm & np.uint64(PFN))[:NR] == np.arange(h, h + NR))
    # A mapping without pmd=True keeps the explicit "2M" meaning: PTE-mapped at fault.
    q = s.spawn()
    m2 = q.mmap("2M", mthp=["2M"])
    q.touch(m2.start, "2M", write=True)
    assert q.pmds(m2) == [] and s.page(head_of(q, m2))["nr_pages_mapped"] == NR


@pytest.mark.parametrize("backend", BACKENDS)
def test_fork_copies_pmds_and_child_write_splits_the_childs(backend: str) -> None:
    s, p, m = setup(backend)
    c = p.fork()
    s.check()
    assert s.last_stats["pmd_copies"] == 2 and s.last_stats["pte_reads"] == 0
    h = head_of(p, m)
    pg = s.page(h)
    assert (pg["entire_mapcount"], pg["refcount"], pg["anon_exclusive"]) == (2, 2, False)
    for proc in (p, c):
        for _, e in proc.pmds(m):
            assert not s._b.decode_pte(e)["write"]
    assert not s._b.decode_pte(c.pmds(m)[0][1])["young"]
    c.write(m.page(5))
    s.check()
    st = s.last_stats
    assert (st["pmd_splits"], st["cow_copies"], st["pages_copied"]) == (1, 1, 1)
    assert len(c.pmds(m)) == 1 and len(p.pmds(m)) == 2
    pg = s.page(h)
    # The child's PTEs: one mapping per page but the copied one, plus the parent's PMD.
    assert (pg["entire_mapcount"], pg["nr_pages_mapped"], pg["large_mapcount"], pg["refcount"]) == (1, NR - 1, NR, NR)
    assert s.kpagecount(h + 5) == 1 and s.kpagecount(h + 6) == 2
    assert not pg["partially_mapped"]
    # 6.18 judges PM_MMAP_EXCLUSIVE of a PMD-mapped page by the head's precise mapcount (2).
    assert not np.any(p.pagemap(m.start, PMD) & np.uint64(PM_EXCL))
    c.exit()
    s.check()
    p.write(m.page(3))  # the folio's only reference is the parent's PMD: reused in place
    s.check()
    assert s.last_stats["cow_reuses"] == 1 and s.last_stats["pmd_splits"] == 0
    assert s._b.decode_pte(p.pmds(m)[0][1])["write"] and s.page(h)["anon_exclusive"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_partial_munmap_splits_and_queues_deferred_split(backend: str) -> None:
    s, p, m = setup(backend)
    h = head_of(p, m)
    p.munmap(m.page(10), 3 * PAGE)
    s.check()
    assert s.last_stats["pmd_splits"] == 1 and s.last_stats["deferred_splits"] == 1
    pg = s.page(h)
    assert (pg["entire_mapcount"], pg["nr_pages_mapped"], pg["refcount"]) == (0, NR - 3, NR - 3)
    assert pg["partially_mapped"] and all(s.page(h + i)["anon_exclusive"] for i in (0, 9, 13, 511))
    assert len(p.pmds(p.vmas()[0]["start"])) == 0 and len(p.pmds(p.vmas()[1]["start"])) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_mprotect_whole_pmd_keeps_it_partial_splits(backend: str) -> None:
    s, p, m = setup(backend)
    p.mprotect(m.start, PMD, "r")
    s.check()
    assert s.last_stats["pmd_splits"] == 0 and not s._b.decode_pte(p.pmds(m)[0][1])["write"]
    p.mprotect(m.start, PMD, "rw")  # the head is exclusive: writable again
    assert s._b.decode_pte(p.pmds(m)[0][1])["write"]
    p.mprotect(m.page(NR + 1), PAGE, "r")
    s.check()
    assert s.last_stats["pmd_splits"] == 1 and s.last_stats["deferred_splits"] == 0
    ptes = p.ptes(m.page(NR + 2))
    assert s._b.decode_pte(int(ptes[0]))["write"] and s._b.decode_pte(int(ptes[0]))["dirty"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_dontneed_and_exit_zap_pmds(backend: str) -> None:
    s, p, m = setup(backend)
    free = s.free_pages
    p.madvise(m.start, PMD, "dontneed")
    s.check()
    assert s.last_stats["pmd_zaps"] == 1 and s.free_pages == free + NR and p.rss()["anon"] == NR
    p.madvise(m.page(NR), PAGE, "dontneed")
    s.check()
    assert s.last_stats["pmd_splits"] == 1 and s.last_stats["deferred_splits"] == 1
    p.exit()
    s.check()
    assert s.free_pages == s.nr_pages


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", ["6.12", "6.13"])
def test_huge_zero_page(backend: str, kernel: str) -> None:
    s, p, m = setup(backend, kernel, write=False)
    assert [s._b.decode_pte(e)["pfn"] for _, e in p.pmds(m)] == [s.zero_pfn] * 2
    assert p.rss()["anon"] == 0 and p.vmas()[0]["anon_huge_pages"] == 0 and p.read(m.page(3)) == 0
    p.write(m.page(3))
    s.check()
    if kernel == "6.13":  # do_huge_zero_wp_pmd(): a PMD THP replaces the huge zero page
        assert s.last_stats["alloc_by_order"][9] == 1 and len(p.pmds(m)) == 2 and p.rss()["anon"] == NR
    else:  # split into zero-page PTEs, one page copied
        assert s.last_stats["pmd_splits"] == 1 and s.last_stats["alloc_by_order"] == [1]
        assert len(p.pmds(m)) == 1 and p.rss()["anon"] == 1


def test_fork_of_a_pinned_pmd_splits_and_copies() -> None:
    s, p, m = setup()
    p.pin(m.start, 2 * PAGE)
    c = p.fork()
    s.check()
    st = s.last_stats
    # folio_try_dup_anon_rmap_pmd() fails: the parent's PMD is split, its exclusive pages of
    # the maybe-pinned folio are copied for the child; the other PMD is copied.
    assert (st["pmd_splits"], st["pmd_copies"], st["pages_copied"]) == (1, 1, NR)
    assert len(p.pmds(m)) == 1 and len(c.pmds(m)) == 1


def scripted(backend: str, kernel: str, batching: bool) -> pb.Simulation:
    s, p, m = setup(backend, kernel, batching)
    c = p.fork()
    c.write(m.page(7))
    p.mprotect(m.page(NR + 5), 3 * PAGE, "r")
    d = c.fork()
    c.munmap(m.page(20), 40 * PAGE)
    d.madvise(m.start, PMD, "dontneed")
    p.write(m.page(NR + 100))
    q = s.spawn()
    z = q.mmap("2M", pmd=True)
    q.read(z.start)
    q.write(z.page(9))
    c.exit()
    s.check()
    return s


@pytest.mark.parametrize("kernel", ["6.8", "6.12", "6.18", "7.0"])
def test_backends_and_batching_agree_on_a_scripted_run(kernel: str) -> None:
    a = scripted("rust", kernel, True)
    assert pb.state_diff(a.state(), scripted("reference", kernel, True).state()) == []
    assert a.stats == scripted("reference", kernel, True).stats
    assert pb.state_diff(a.state(), scripted("rust", kernel, False).state(), ignore=["flags"]) == []


@pytest.mark.parametrize("kernel,after_child_write", [("6.10", 0), ("6.12", 1), ("6.18", 0), ("7.0", 0)])
def test_pagemap_exclusive_rule_per_version(kernel: str, after_child_write: int) -> None:
    """The parent's PMD-mapped pages once the child PTE-maps all but one of them: ≤ v6.10 and
    from v6.15 the head page decides (mapped twice), v6.11 – v6.14 each page (the copied one is
    mapped once), the newest tree the folio's "maybe mapped shared" bit."""
    s, p, m = setup("rust", kernel)
    c = p.fork()
    c.write(m.page(5))
    pm = p.pagemap(m.start, 8 * PAGE)
    excl = ((pm & np.uint64(PM_EXCL)) != 0).astype(int).tolist()
    assert excl[5] == after_child_write and sum(excl) == after_child_write


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_from_arrays_round_trip_keeps_huge_pmds(backend: str) -> None:
    """A state with huge PMDs (shared after fork, and one split by a COW write) rebuilds
    exactly through to_arrays / from_arrays; bad PMDs are refused."""
    s, p, m = setup(backend=backend)
    c = p.fork()
    c.write(m.page(1))
    args = s.to_arrays()
    assert any(v["pmds"] for proc in args["processes"] for v in proc["vmas"])
    r = pb.Simulation.from_arrays(**args)
    assert pb.state_diff(s.state(), r.state()) == []
    h = head_of(p, m)
    for pfn in (h, h + 1, h + 2):
        assert r.page(pfn) == s.page(pfn)
    # A PMD over PTEs, and one that is not PMD-aligned, are refused.
    vma = args["processes"][0]["vmas"][0]
    addr, e = vma["pmds"][0]
    bad = dict(vma, pmds=[(addr + 4096, e)])
    with pytest.raises(ValueError, match="PMD-aligned"):
        pb.Simulation.from_arrays(**dict(args, processes=[dict(args["processes"][0], vmas=[bad])] + args["processes"][1:]))


def test_pmd_argument_is_checked() -> None:
    s = pb.Simulation("x86-64", "6.18", "8M")
    with pytest.raises(TypeError, match="pmd"):
        s.spawn().mmap("2M", pmd=1)  # type: ignore[arg-type]


def test_replay_keeps_pmd_mappings() -> None:
    """A capture's PMD-mapped THPs (AnonHugePages, aligned whole runs of one PMD-sized folio)
    come back as huge PMDs; the PTE-mapped THP beside them stays PTE-mapped."""
    from ptebatch.replay import pmd_mappings
    from ptebatch.thpmaps import snapshot_of

    s, p, m = setup()
    c = p.fork()
    c.write(m.page(5))  # the child's first PMD is split, one page copied
    q = p.mmap("2M", mthp=["2M"])  # a whole, in-order PTE-mapped THP: AnonHugePages says no
    p.touch(q.start, "2M", write=True)
    snap = snapshot_of(s, [p, c])
    found = pmd_mappings(snap)
    assert sorted(len(v) for v in found.values()) == [1, 2]
    r, procs = pb.Simulation.from_snapshot(snap, "6.18")
    r.check()
    rp, rc = procs[p.pid], procs[c.pid]
    assert len(rp.pmds(m)) == 2 and len(rc.pmds(m)) == 1 and rp.pmds(q.start) == []
    for orig, new in ((p, rp), (c, rc)):
        for start, length in ((m.start, m.length), (q.start, q.length)):
            assert np.array_equal(orig.pagemap(start, length), new.pagemap(start, length))
        assert orig.rss() == new.rss()
    h = head_of(p, m)
    for pfn in (h, h + 5, h + 6):
        assert r.kpagecount(pfn) == s.kpagecount(pfn)
        for key in ("entire_mapcount", "large_mapcount", "nr_pages_mapped", "refcount", "anon_exclusive"):
            assert r.page(pfn)[key] == s.page(pfn)[key], key
    # The replayed machine forks the PMDs as the kernel would: copied, not walked.
    rp.fork()
    assert r.last_stats["pmd_copies"] == 2


# ---- the live kernel ---------------------------------------------------------------------------

def _live_skip() -> str | None:
    if os.environ.get("PTEBATCH_SKIP_LIVE") == "1":
        return "PTEBATCH_SKIP_LIVE=1"
    from ptebatch.oracle import missing_requirements

    return missing_requirements()


@pytest.mark.skipif(_live_skip() is not None, reason=str(_live_skip()))
def test_live_kernel_oracle_pmd_scenarios() -> None:
    from ptebatch import oracle_pmd

    for name, run in oracle_pmd.SCENARIOS.items():
        steps = run()
        assert steps and sum(st.pages for st in steps) > 0, name
        bad = [m for st in steps for m in st.mismatches]
        assert bad == [], f"{name}: {bad[:10]}"

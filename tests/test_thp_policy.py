"""The THP policy for anonymous memory: the sysfs controls, MADV_HUGEPAGE / MADV_NOHUGEPAGE,
PR_SET_THP_DISABLE and the folio order chosen at fault, on both backends; the Rust path held
to the reference; and the live kernel as oracle (``ptebatch.oracle_policy``)."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch.snapshot import PM_PFN_MASK, PM_PRESENT

BACKENDS = ["rust", "reference"]
K, M = 1 << 10, 1 << 20


def new_sim(backend: str, kernel: str = "6.18", arch: str = "x86-64") -> pb.Simulation:
    return pb.Simulation(arch, kernel, "64M", backend=backend)


def folio_pages(sim: pb.Simulation, p: pb.Process, addr: int) -> int:
    """Pages in the folio mapped at ``addr`` (0 when nothing, 1 for the zero page)."""
    e = int(p.pagemap(addr, sim.page_size)[0])
    if not e & PM_PRESENT:
        return 0
    pg = sim.page(e & PM_PFN_MASK)
    return 1 if pg["zero_page"] else 1 << pg["order"]


def write_folio(sim: pb.Simulation, p: pb.Process, addr: int) -> int:
    p.write(addr)
    return folio_pages(sim, p, addr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_is_the_kernels(backend: str) -> None:
    sim = new_sim(backend)
    sizes = {"16K": "never", "32K": "never", "64K": "never", "128K": "never", "256K": "never",
             "512K": "never", "1M": "never", "2M": "inherit"}
    assert sim.thp_policy == {"enabled": "madvise", "sizes": sizes}
    p = sim.spawn()
    m = p.mmap("4M")  # 2M-aligned
    assert write_folio(sim, p, m.start) == 1
    p.madvise(m.start + 2 * M, 2 * M, "hugepage")
    assert write_folio(sim, p, m.start + 2 * M + 5 * sim.page_size) == 512
    assert [v["hugepage"] for v in p.vmas()] == [False, True]
    assert p.vmas()[0]["mthp"] is None
    sim.check()


# (top-level enabled, hugepages-64kB/enabled, VM_HUGEPAGE) -> pages of the folio a write maps.
MODES = [
    ("never", "always", False, 16), ("madvise", "always", False, 16),
    ("always", "inherit", False, 16), ("madvise", "inherit", False, 1), ("madvise", "inherit", True, 16),
    ("never", "inherit", True, 1),
    ("never", "madvise", True, 16), ("always", "madvise", False, 1),
    ("always", "never", True, 1),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("enabled,mode,hugepage,pages", MODES)
def test_modes(backend: str, enabled: str, mode: str, hugepage: bool, pages: int) -> None:
    sim = new_sim(backend)
    sim.set_thp_policy(enabled, {"64K": mode, "2M": "never"})
    p = sim.spawn()
    m = p.mmap("1M")
    if hugepage:
        p.madvise(m.start, m.length, "hugepage")
    assert write_folio(sim, p, m.start + 3 * sim.page_size) == pages


@pytest.mark.parametrize("backend", BACKENDS)
def test_largest_suitable_order_then_smaller_ones(backend: str) -> None:
    """Several sizes at once: the largest whose aligned range lies in the VMA and is all none."""
    sim = new_sim(backend)
    sim.set_thp_policy("never", {"16K": "always", "64K": "always", "2M": "always"})
    p = sim.spawn()
    page = sim.page_size
    base = p.mmap("4M").start  # a 2M-aligned hole to map into
    p.munmap(base, 4 * M)
    # [base + 16K, base + 144K): too small for 2M, and its first 64K block is cut by the start.
    m = p.mmap("128K", addr=base + 16 * K)
    assert write_folio(sim, p, m.start) == 4          # 64K block starts before the VMA
    assert write_folio(sim, p, base + 64 * K) == 16   # [64K, 128K) lies inside
    assert write_folio(sim, p, base + 128 * K + page) == 4  # 64K block runs past the end
    # PTEs already present in the 2M and 64K ranges: 16K (whose own range is none) instead.
    q = p.mmap("4M")
    sim.set_thp_policy(sizes={"64K": "never", "2M": "never"})
    assert write_folio(sim, p, q.start + 40 * K) == 4
    sim.set_thp_policy(sizes={"64K": "always", "2M": "always"})
    assert write_folio(sim, p, q.start) == 4
    assert write_folio(sim, p, q.start + 64 * K) == 16
    assert write_folio(sim, p, q.start + 2 * M) == 512
    sim.check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_fallback_when_allocation_fails(backend: str) -> None:
    sim = pb.Simulation("x86-64", "6.18", "64M", backend=backend, fragmentation={"2M": 1.0, "64K": 1.0})
    sim.set_thp_policy("always", {"16K": "always", "64K": "always"})
    p = sim.spawn()
    m = p.mmap("4M")
    assert write_folio(sim, p, m.start) == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_list_overrides_sysfs_but_not_nohugepage(backend: str) -> None:
    sim = new_sim(backend)
    sim.set_thp_policy("never", {"2M": "never"})
    p = sim.spawn()
    m = p.mmap("1M", mthp=["64K"])
    assert p.vmas()[0]["mthp"] == [4096, 64 * K]
    assert write_folio(sim, p, m.start) == 16
    p.madvise(m.start + 512 * K, 512 * K, "nohugepage")
    assert write_folio(sim, p, m.start + 512 * K) == 1
    assert write_folio(sim, p, m.start + 128 * K) == 16
    # Explicitly no large folios: [] is pages only, whatever the controls say.
    sim.set_thp_policy("always", {"64K": "always"})
    q = p.mmap("1M", mthp=[])
    assert write_folio(sim, p, q.start) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_madvise_flags_split_merge_and_exclude_each_other(backend: str) -> None:
    sim = new_sim(backend)
    p = sim.spawn()
    m = p.mmap("1M")
    ps = sim.page_size
    p.madvise(m.start + 4 * ps, 4 * ps, "hugepage")
    assert [(v["hugepage"], v["nohugepage"]) for v in p.vmas()] == [(False, False), (True, False), (False, False)]
    p.madvise(m.start + 4 * ps, 4 * ps, "nohugepage")
    assert [(v["hugepage"], v["nohugepage"]) for v in p.vmas()] == [(False, False), (False, True), (False, False)]
    p.madvise(m.start, m.length, "hugepage")
    assert [(v["hugepage"], v["nohugepage"]) for v in p.vmas()] == [(True, False)]
    child = p.fork()
    assert [v["hugepage"] for v in child.vmas()] == [True]
    sim.check()


@pytest.mark.parametrize("backend", BACKENDS)
def test_prctl_thp_disable(backend: str) -> None:
    sim = new_sim(backend)
    sim.set_thp_policy("always", {"64K": "always"})
    p = sim.spawn()
    m = p.mmap("4M")
    p.prctl_thp_disable(True)
    assert p.thp_disable == 1
    assert write_folio(sim, p, m.start) == 1  # an existing VMA too
    child = p.fork()
    assert child.thp_disable == 1  # MMF_INIT_MASK
    c = child.mmap("4M")
    assert write_folio(sim, child, c.start) == 1
    p.prctl_thp_disable(False)
    assert write_folio(sim, p, m.start + 2 * M) == 512
    assert child.thp_disable == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_prctl_except_advised_is_618(backend: str) -> None:
    sim = new_sim(backend, "6.18")
    sim.set_thp_policy("always", {"64K": "always"})
    p = sim.spawn()
    m = p.mmap("4M")
    p.madvise(m.start, 2 * M, "hugepage")
    p.prctl_thp_disable(True, except_advised=True)
    assert p.thp_disable == 3
    assert write_folio(sim, p, m.start) == 512
    assert write_folio(sim, p, m.start + 2 * M) == 1
    with pytest.raises(ValueError, match="except_advised"):
        p.prctl_thp_disable(False, except_advised=True)
    old = new_sim(backend, "6.17")
    q = old.spawn()
    before = old.state()
    with pytest.raises(ValueError, match="6.18"):
        q.prctl_thp_disable(True, except_advised=True)
    assert pb.state_diff(before, old.state()) == []
    with pytest.raises(TypeError, match="except_advised"):
        q.prctl_thp_disable(True, except_advised=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_policy_values_change_nothing(backend: str) -> None:
    sim = new_sim(backend)
    before = sim.thp_policy
    with pytest.raises(ValueError, match="enabled"):
        sim.set_thp_policy("sometimes")
    with pytest.raises(ValueError, match="sizes"):
        sim.set_thp_policy("always", {"16K": "always", "64K": "maybe"})
    with pytest.raises(ValueError, match="sizes"):
        sim.set_thp_policy(sizes={"16K": "always", "8K": "always"})  # order 1: no anon control
    with pytest.raises(ValueError, match="sizes"):
        sim.set_thp_policy(sizes={"4M": "always"})
    with pytest.raises(ValueError, match="sizes"):
        sim.set_thp_policy(sizes={"64Q": "always"})
    with pytest.raises(TypeError, match="sizes"):
        sim.set_thp_policy(sizes=["64K"])
    with pytest.raises(TypeError, match="enabled"):
        sim.set_thp_policy(enabled=1)
    with pytest.raises(TypeError, match="sizes"):
        sim.set_thp_policy(sizes={"64K": True})
    assert sim.thp_policy == before
    p = sim.spawn()
    m = p.mmap("64K")
    with pytest.raises(ValueError, match="advice"):
        p.madvise(m.start, m.length, "hugepages")


def test_other_page_sizes_name_their_own_controls() -> None:
    sim = pb.Simulation("arm64-64k", "6.18", "1G")
    sizes = sim.thp_policy["sizes"]
    assert list(sizes) == ["256K", "512K", "1M", "2M", "4M", "8M", "16M", "32M", "64M", "128M", "256M", "512M"]
    assert sizes["512M"] == "inherit"
    with pytest.raises(ValueError, match="sizes"):
        sim.set_thp_policy(sizes={"128K": "always"})
    sim.set_thp_policy(sizes={"2M": "always"})
    p = sim.spawn()
    m = p.mmap("4M")
    assert write_folio(sim, p, m.start) == 32


@pytest.mark.parametrize("kernel", ["6.8", "6.12", "6.17", "7.0"])
def test_policy_holds_on_every_kernel(kernel: str) -> None:
    sim = new_sim("rust", kernel)
    sim.set_thp_policy("madvise", {"64K": "madvise", "2M": "never"})
    p = sim.spawn()
    m = p.mmap("1M")
    assert write_folio(sim, p, m.start) == 1
    p.madvise(m.start, m.length, "hugepage")
    assert write_folio(sim, p, m.start + 64 * K) == 16
    p.prctl_thp_disable(True)
    assert write_folio(sim, p, m.start + 128 * K) == 1


SIZES = ["16K", "32K", "64K", "256K", "2M"]


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(enabled=st.sampled_from(["always", "madvise", "never"]),
       modes=st.lists(st.sampled_from(["always", "inherit", "madvise", "never"]), min_size=5, max_size=5),
       advice=st.sampled_from([None, "hugepage", "nohugepage"]),
       prctl=st.sampled_from([None, "disable", "except_advised"]),
       offset=st.integers(0, 600), pages=st.integers(1, 1200),
       writes=st.lists(st.integers(0, 1199), min_size=1, max_size=12))
def test_rust_agrees_with_reference(enabled, modes, advice, prctl, offset, pages, writes) -> None:
    """The order choice, for random controls, flags, prctl modes, VMA placement and writes."""
    sims = [pb.Simulation("x86-64", "6.18", "32M", backend=b, fragmentation={"64K": 0.3}) for b in BACKENDS]
    for s in sims:
        s.set_thp_policy(enabled, dict(zip(SIZES, modes)))
        p = s.spawn()
        base = p.mmap("8M").start
        p.munmap(base, 8 * M)
        m = p.mmap(pages * s.page_size, addr=base + offset * s.page_size)
        if advice:
            p.madvise(m.start, m.length, advice)
        if prctl:
            p.prctl_thp_disable(True, except_advised=prctl == "except_advised")
        for w in writes:
            p.write(m.start + (w % pages) * s.page_size)
    a, b = (s.state() for s in sims)
    assert pb.state_diff(a, b) == []
    assert sims[0].stats == sims[1].stats
    sims[0].check()


# ---- snapshots: the captured policy, replayed -------------------------------------------------

def _with_policy(snap, **header):
    from ptebatch.snapshot import VMA_HUGEPAGE, Snapshot, validate

    arrays = dict(snap.arrays)
    arrays["vma_flags"] = arrays["vma_flags"] | np.uint32(VMA_HUGEPAGE)
    out = Snapshot(dict(snap.header, **header), arrays, list(snap.vma_names))
    validate(out.header, out.arrays)
    return out


def test_replay_takes_the_captured_policy() -> None:
    from ptebatch.thpmaps import snapshot_of

    sim = pb.Simulation("x86-64", "6.18", "64M")
    p = sim.spawn()
    v = p.mmap("4M")
    p.write(v.start)
    policy = {"enabled": "never", "defrag": "madvise", "use_zero_page": "1", "shmem_enabled": "never",
              "sizes": {"16K": "never", "64K": "madvise", "2M": "always"},
              "shmem_sizes": {"8K": "never", "2M": "inherit"}}
    snap = _with_policy(snapshot_of(sim, [p]), thp_policy=policy, thp_enabled=[1])
    rsim, procs = pb.Simulation.from_snapshot(snap)
    assert rsim.thp_policy["enabled"] == "never"
    assert {k: rsim.thp_policy["sizes"][k] for k in ("16K", "64K", "2M", "32K")} == \
        {"16K": "never", "64K": "madvise", "2M": "always", "32K": "never"}
    rp = procs[p.pid]
    assert [x["hugepage"] for x in rp.vmas()] == [True]
    # The replayed VMA follows the policy: 2M is "always", but its first 2M is in use.
    assert write_folio(rsim, rp, v.start + 64 * K) == 16
    assert write_folio(rsim, rp, v.start + 2 * M) == 512
    # PR_SET_THP_DISABLE as /proc/<pid>/status showed it.
    rsim2, procs2 = pb.Simulation.from_snapshot(_with_policy(snapshot_of(sim, [p]), thp_policy=policy,
                                                             thp_enabled=[0]))
    assert procs2[p.pid].thp_disable == 1
    assert write_folio(rsim2, procs2[p.pid], v.start + 2 * M) == 1
    # An explicit size list overrides the captured sysfs controls.
    rsim3, procs3 = pb.Simulation.from_snapshot(snap, mthp=["16K"])
    assert write_folio(rsim3, procs3[p.pid], v.start + 2 * M) == 4


def test_bad_policy_records_are_snapshot_errors() -> None:
    from ptebatch.snapshot import validate
    from ptebatch.thpmaps import snapshot_of

    sim = pb.Simulation("x86-64", "6.18", "64M")
    p = sim.spawn()
    p.mmap("64K")
    snap = snapshot_of(sim, [p])
    for bad in ({"thp_policy": {"enabled": 1}}, {"thp_policy": {"sizes": ["64K"]}}, {"thp_policy": "madvise"},
                {"thp_enabled": [1, 1]}, {"thp_enabled": [True]}):
        with pytest.raises(pb.SnapshotError, match="thp_"):
            validate(dict(snap.header, **bad), snap.arrays)
    arrays = dict(snap.arrays, vma_flags=snap.arrays["vma_flags"] | np.uint32(128))
    with pytest.raises(pb.SnapshotError, match="vma_flags"):
        validate(snap.header, arrays)
    odd = _with_policy(snap, thp_policy={"enabled": "sometimes"})
    with pytest.raises(pb.SnapshotError, match="THP policy"):
        pb.Simulation.from_snapshot(odd)


# ---- the live kernel ------------------------------------------------------------------------

def _live_skip() -> str | None:
    if os.environ.get("PTEBATCH_SKIP_LIVE") == "1":
        return "PTEBATCH_SKIP_LIVE=1"
    from ptebatch.oracle import missing_requirements

    return missing_requirements()


@pytest.mark.skipif(_live_skip() is not None, reason=str(_live_skip()))
def test_live_kernel_policy_scenarios() -> None:
    """Every scenario of ``ptebatch.oracle_policy`` against the running kernel: 0 mismatches,
    and the sysfs controls as they were."""
    from ptebatch import oracle_policy
    from ptebatch.oracle import thp_lock

    # Read under the lock: other tools on the machine change the controls only while holding it.
    with thp_lock():
        before = oracle_policy.read_policy()
    results = oracle_policy.run_all()
    with thp_lock():
        assert oracle_policy.read_policy() == before
    assert set(results) == set(oracle_policy.SCENARIOS)
    for name, steps in results.items():
        assert sum(s.pages for s in steps) > 0, name
        bad = [m for s in steps for m in s.mismatches]
        assert bad == [], f"{name}: {bad[:5]}"
    # The comparisons are not vacuous: the kernel chose each size where the scenario expects it.
    def sizes(name: str) -> set[str]:
        return {x for st_ in results[name] for x in re.findall(r"\b\d+[KMG]\b", st_.step.partition("(")[2])}

    assert sizes("several sizes, alignment and fallback") == {"2M", "64K", "16K"}
    assert sizes("madvise-mode, MADV_HUGEPAGE") == {"2M", "4K"}
    assert sizes("madvise-mode, no advice") == {"4K"}
    assert sizes("PR_SET_THP_DISABLE") == {"2M", "64K", "4K"}


@pytest.mark.skipif(_live_skip() is not None, reason=str(_live_skip()))
def test_live_capture_records_the_policy() -> None:
    """A capture holds the live controls, VM_HUGEPAGE and PR_SET_THP_DISABLE; replay uses them."""
    from ptebatch.capture import capture, read_thp_policy
    from ptebatch.oracle import Worker, thp_lock

    with thp_lock():
        w = Worker()
        try:
            addr = int(w("tmap", 4 * M, 2 * M, 0)[0])
            w("tmadvise", addr, 2 * M, "hugepage")
            w("tmadvise", addr + 2 * M, 2 * M, "nohugepage")
            w("tprctl", 1, 0)
            w("twrite", addr)
            snap = capture(w.proc.pid, ranges=[(addr, addr + 4 * M)])
            live = read_thp_policy()
        finally:
            w.close()
    assert snap.header["thp_policy"] == live
    assert snap.header["thp_enabled"] == [0]
    sim, procs = pb.Simulation.from_snapshot(snap)
    rp = procs[snap.pids[0]]
    assert [(v["hugepage"], v["nohugepage"]) for v in rp.vmas()] == [(True, False), (False, True)]
    assert rp.thp_disable == 1
    assert sim.thp_policy["enabled"] == live["enabled"]
    assert all(sim.thp_policy["sizes"][s] == m for s, m in live["sizes"].items() if s in sim.thp_policy["sizes"])

"""Zero-copy views of the simulation's state (issue: state as shared numpy buffers).

``sim.memory.<array>`` and ``p.ptes(addr)`` are read-only numpy views of the Rust
simulation's own storage. These tests hold them to the copies ``state()`` makes, through
every kind of step (including steps run on a copy of the state, which must write back into
viewed storage), and check the safety rules: no writes, no dangling after ``del sim``, and
``BufferError`` (state unchanged) for the one change that would move viewed PTEs.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptebatch as pb

PAGE = 4096
FIELDS = ("order", "flags", "mapcount", "refcount", "token")


def _sim(memory: str = "256MiB", **kw) -> pb.Simulation:
    return pb.Simulation("x86-64", kernel="6.18", memory=memory, **kw)


def _vma_ptes(sim: pb.Simulation, pid: int, start: int, end: int) -> np.ndarray:
    """The PTEs of ``[start, end)`` as ``state()`` copies them."""
    s = sim.state()
    out = []
    off = 0
    # state()["vmas"] rows start with pid, first vpn, pages; "ptes" is every table in turn.
    ptes = s["ptes"]
    for row in s["vmas"]:
        vpid, vstart, vlen = int(row[0]), int(row[1]), int(row[2])
        if vpid == pid:
            lo, hi = max(vstart * PAGE, start), min((vstart + vlen) * PAGE, end)
            if lo < hi:
                out.append(ptes[off + (lo // PAGE - vstart): off + (hi // PAGE - vstart)])
        off += vlen
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def test_views_share_memory_and_refuse_writes() -> None:
    sim = _sim()
    p = sim.spawn()
    v = p.mmap("4MiB", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    for name in FIELDS:
        a, b = getattr(sim.memory, name), getattr(sim.memory, name)
        assert np.shares_memory(a, b), name
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0] = 1
        with pytest.raises(ValueError):
            a.flags.writeable = True
        assert np.array_equal(a, sim.state()[name]), name
    t = p.ptes(v)
    assert np.shares_memory(t, p.ptes(v.start + v.length - PAGE))
    with pytest.raises(ValueError):
        t[:] = 0
    assert t.dtype == np.uint64 and t.shape == (v.length // PAGE,)


def test_tail_pages_have_no_refcount() -> None:
    """The per-page refcount reads as the kernel's: a large folio's tail pages hold 0."""
    sim = _sim()
    p = sim.spawn()
    v = p.mmap("2MiB", mthp=["2M"])
    p.touch(v.start, v.length, write=True)
    rc, order = sim.memory.refcount, sim.memory.order
    heads = np.flatnonzero(order == 9)
    assert len(heads) == 512
    head = int(heads[0])
    assert rc[head] == 512 and not rc[head + 1:head + 512].any()


def test_views_follow_steps() -> None:
    sim = _sim()
    p = sim.spawn()
    v = p.mmap("2MiB", mthp=["64K"])
    mc, t = sim.memory.mapcount, p.ptes(v)
    assert not mc.any() and not t.any()
    p.touch(v.start, v.length, write=True)
    assert int(mc.sum()) == 512 and t.all()
    c = p.fork()
    assert int(mc.sum()) == 1024
    assert np.array_equal(t, _vma_ptes(sim, p.pid, v.start, v.end))
    c.write(v.start)
    c.exit()
    assert np.array_equal(mc, sim.state()["mapcount"])


def test_split_and_merge_keep_the_view_live() -> None:
    sim = _sim()
    p = sim.spawn()
    v = p.mmap("1MiB")
    t = p.ptes(v)
    p.touch(v.start, v.length, write=True)
    p.mprotect(v.start + 16 * PAGE, 16 * PAGE, "r")
    assert len(p.vmas()) == 3
    p.write(v.start + 40 * PAGE)
    p.mprotect(v.start + 16 * PAGE, 16 * PAGE, "rw")
    assert len(p.vmas()) == 1, "the three pieces merge back"
    p.munmap(v.start, 8 * PAGE)
    assert np.array_equal(t[8:], p.ptes(v.start + 8 * PAGE))
    assert not t[:8].any(), "unmapped entries read none"


def test_merge_across_stores_is_refused_while_viewed() -> None:
    """Two mappings made separately have their own stores; merging them would move entries."""
    sim = _sim()
    p = sim.spawn()
    a = p.mmap("64KiB", prot="r")
    b = p.mmap("64KiB", addr=a.end)
    p.touch(a.start, a.length)
    p.touch(b.start, b.length, write=True)
    t = p.ptes(b)
    before = sim.state()
    with pytest.raises(BufferError, match="del it"):
        p.mprotect(a.start, a.length, "rw")
    assert pb.state_diff(before, sim.state()) == []
    with pytest.raises(BufferError):
        p.mmap("64KiB", addr=b.end)
    del t
    gc.collect()
    p.mprotect(a.start, a.length, "rw")
    assert len(p.vmas()) == 1
    t = p.ptes(a)
    assert t.shape == (32,)


def test_view_outlives_simulation() -> None:
    sim = _sim()
    p = sim.spawn()
    v = p.mmap("1MiB")
    p.touch(v.start, v.length, write=True)
    mc, t = sim.memory.mapcount, p.ptes(v)
    want_mc, want_t = mc.copy(), t.copy()
    del sim, p, v
    gc.collect()
    assert np.array_equal(mc, want_mc) and np.array_equal(t, want_t)


def test_exit_leaves_a_valid_view() -> None:
    sim = _sim()
    p = sim.spawn()
    v = p.mmap("1MiB")
    p.touch(v.start, v.length, write=True)
    c = p.fork()
    t = c.ptes(v)
    c.exit()
    assert not t.any(), "exit zapped every entry; the store stays alive for the view"
    sim.check()


def test_steps_run_on_a_copy_write_back_into_views() -> None:
    """A step of 1 Mi pages with a progress callback runs on a copy of the state; the
    viewed storage must get its result. An abandoned step leaves views as they were."""
    sim = _sim("8GiB")
    p = sim.spawn()
    v = p.mmap("4GiB", mthp=["2M"])
    calls = []
    sim.set_progress(lambda done, total: calls.append(done))
    mc, t = sim.memory.mapcount, p.ptes(v)
    p.touch(v.start, v.length, write=True)
    assert calls, "the step was watched, so it ran on a copy"
    assert np.shares_memory(mc, sim.memory.mapcount)
    assert int(mc.sum()) == v.length // PAGE and t.all()
    assert np.array_equal(t, p.ptes(v))

    def stop(done, total):
        raise RuntimeError("stop")

    sim.set_progress(stop)
    before = t.copy(), mc.copy()
    with pytest.raises(RuntimeError):
        p.fork()
    assert np.array_equal(t, before[0]) and np.array_equal(mc, before[1])
    sim.set_progress(None)
    p.fork()
    assert int(mc.sum()) == 2 * v.length // PAGE
    assert not (t & np.uint64(2)).any(), "fork write-protected the parent's PTEs in the view"


def test_reference_backend_gives_readonly_copies() -> None:
    sim = pb.Simulation("x86-64", kernel="6.18", memory="16MiB", backend="reference")
    p = sim.spawn()
    v = p.mmap("64KiB")
    p.touch(v.start, v.length, write=True)
    for a in (sim.memory.mapcount, p.ptes(v)):
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[0] = 1


OPS = st.lists(
    st.tuples(st.sampled_from(["touch", "fork", "munmap", "mprotect", "dontneed", "cow", "exit", "mmap"]),
              st.integers(0, 63), st.integers(1, 64)),
    min_size=1, max_size=12)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, mthp=st.sampled_from([[], ["16K"], ["64K"], ["2M"]]))
def test_views_equal_copies_after_any_steps(ops, mthp) -> None:
    """Views taken once stay equal to fresh copies after every step."""
    sim = _sim("64MiB")
    p = sim.spawn()
    v = p.mmap("256KiB", mthp=mthp)
    mem = {n: getattr(sim.memory, n) for n in FIELDS}
    t = p.ptes(v)
    kids = []
    for op, a, n in ops:
        n = min(n, 64 - a)
        addr, length = v.start + a * PAGE, n * PAGE
        try:
            if op == "touch":
                p.touch(addr, length, write=bool(a % 2))
            elif op == "fork":
                kids.append(p.fork())
            elif op == "munmap":
                p.munmap(addr, length)
            elif op == "mprotect":
                p.mprotect(addr, length, "r" if a % 2 else "rw")
            elif op == "dontneed":
                p.madvise(addr, length, "dontneed")
            elif op == "cow" and kids:
                kids[-1].write(addr)
            elif op == "exit" and kids:
                kids.pop().exit()
            elif op == "mmap":
                p.mmap(length)
        except (ValueError, pb.AccessFault, BufferError):
            pass
        state = sim.state()
        for name, view in mem.items():
            assert np.array_equal(view, state[name]), name
        for i in range(64):
            at = v.start + i * PAGE
            vm = [m for m in p.vmas() if m["start"] <= at < m["end"]]
            if vm:
                assert t[i] == p.ptes(at)[(at - vm[0]["start"]) // PAGE]
            else:
                assert t[i] == 0, "an unmapped entry reads none"
    sim.check()

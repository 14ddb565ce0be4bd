"""When a long step runs on a copy of the state (``Simulation.step_copy_limit``), and what a
step that runs in place promises: it cannot be abandoned, but a stop asked meanwhile is raised
when it has finished; and a step that may run out of simulated memory still fails whole."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import ptebatch as pb
from ptebatch.simulation import state_diff

#: Pages from which a step can be interrupted (sim.rs INTERRUPTIBLE_WORK).
INTERRUPTIBLE = 1 << 20


class Stop(Exception):
    pass


def _setup(memory: int | None = None) -> tuple[pb.Simulation, pb.Process, pb.Mapping]:
    size = 2 * INTERRUPTIBLE * 4096
    sim = pb.Simulation("x86-64", "6.18", memory or size + (64 << 20))
    p = sim.spawn()
    return sim, p, p.mmap(size, mthp=["64K"])


def test_default_limit_and_argument_checks() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    assert sim.step_copy_limit == 64 << 20
    sim.step_copy_limit = "1G"
    assert sim.step_copy_limit == 1 << 30
    sim.step_copy_limit = 0
    assert sim.step_copy_limit == 0
    with pytest.raises(ValueError, match="step_copy_limit"):
        sim.step_copy_limit = -1
    with pytest.raises(TypeError, match="step_copy_limit"):
        sim.step_copy_limit = 1.5  # type: ignore[assignment]
    assert sim.step_copy_limit == 0
    assert sim.clone().step_copy_limit == 0


def test_within_the_limit_a_stop_abandons_the_step_whole() -> None:
    sim, p, v = _setup()
    before = sim.state()

    def stop(done: int, total: int) -> None:
        raise Stop

    sim.set_progress(stop)
    with pytest.raises(Stop):
        p.touch(v.start, v.length, write=True)
    sim.set_progress(None)
    assert state_diff(before, sim.state()) == []


@pytest.mark.parametrize("step", ["touch", "fork", "exit"])
def test_beyond_the_limit_the_step_runs_in_place_then_raises(step: str) -> None:
    """With the limit below the state, a stop cannot abandon the step: the step finishes
    (whole: check() holds and every page is done) and the exception follows it."""
    sim, p, v = _setup()
    if step != "touch":
        p.touch(v.start, v.length, write=True)
    sim.step_copy_limit = 1 << 20
    calls: list[int] = []

    def stop(done: int, total: int) -> None:
        calls.append(done)
        raise Stop

    sim.set_progress(stop)
    with pytest.raises(Stop):
        {"touch": lambda: p.touch(v.start, v.length, write=True), "fork": p.fork, "exit": p.exit}[step]()
    sim.set_progress(None)
    assert len(calls) == 1, "asked once, then left to finish"
    if step == "touch":
        assert p.rss()["anon"] == v.length // 4096
    elif step == "fork":
        child = pb.Process(sim, p.pid + 1)
        assert child.rss()["anon"] == v.length // 4096
    else:
        assert sim.free_pages == sim.nr_pages
    sim.check()


def test_progress_keeps_coming_in_place() -> None:
    """A step run in place still reports progress all along (the CLI's bar)."""
    sim, p, v = _setup()
    sim.step_copy_limit = 0
    seen: list[int] = []
    sim.set_progress(lambda done, total: seen.append(done))
    p.touch(v.start, v.length, write=True)
    sim.set_progress(None)
    assert seen and seen == sorted(seen)
    assert p.rss()["anon"] == v.length // 4096


def test_out_of_simulated_memory_fails_whole_whatever_the_limit() -> None:
    """Memory for half the region: the touch runs out half-way, on a copy, and leaves the state
    as it was, although the limit says no copy for interruptibility."""
    size = 2 * INTERRUPTIBLE * 4096
    sim, p, v = _setup(memory=size // 2)
    sim.step_copy_limit = 0
    before = sim.state()
    with pytest.raises(pb.OutOfMemoryError):
        p.touch(v.start, v.length, write=True)
    assert state_diff(before, sim.state()) == []
    # A touch that fits runs, and a second touch of the same (now written) range allocates
    # nothing, so it is not short of memory although the free pages are few.
    p.touch(v.start, size // 4, write=True)
    p.touch(v.start, size // 4, write=True)
    sim.check()


_PEAK = textwrap.dedent("""
    import sys
    import ptebatch as pb

    def kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10

    size = 4 << 30
    # Free memory just above the region: a worst case of two pages per page (private file
    # pages) would be short of it and copy the state.
    sim = pb.Simulation("x86-64", "6.18", size + (16 << 20))
    sim.step_copy_limit = 0
    sim.set_progress(lambda done, total: None)
    p = sim.spawn()
    v = p.mmap(size, mthp=["64K"])
    out = []
    for step in ("touch", "fork"):
        open("/proc/self/clear_refs", "w").write("5")
        before = kb("VmRSS")
        p.touch(v.start, v.length, write=True) if step == "touch" else p.fork()
        out.append((kb("VmHWM") - before) / (size // 4096))
    print(*out)
""")


def test_large_steps_do_not_copy_the_state() -> None:
    """Host bytes a step adds at its peak, per page of a 4 GiB region: a touch adds the
    large-folio records (~2 B a page for 64K folios), a fork the child's table (8 B a page).
    A copy of the state would add ~26 (touch) and ~34 (fork)."""
    r = subprocess.run([sys.executable, "-c", _PEAK], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    touch, fork = map(float, r.stdout.split())
    assert touch < 6, touch
    assert fork < 12, fork

"""Simulation.from_arrays / to_arrays (issue 12 item 3): a state built from arrays a user
prepared, every counter rebuilt and check() run; the round trip reproduces state() exactly on
both backends, which agree; every inconsistency is refused with a typed error."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

import ptebatch as pb
from ptebatch.simulation import state_diff

from simmachine import SimMachine

BACKENDS = ["rust", "reference"]
BASE = 0x10_0000_0000


def round_trip(sim: pb.Simulation, backends: list[str] = BACKENDS) -> None:
    """from_arrays(**to_arrays()) gives back the same state, on either backend."""
    want = sim.state()
    arrays = sim.to_arrays()
    for backend in backends:
        again = pb.Simulation.from_arrays(**{**arrays, "backend": backend})
        assert state_diff(want, again.state()) == [], f"{sim.backend} -> {backend}"
        assert again.to_arrays()["pages"]["token"].tobytes() == arrays["pages"]["token"].tobytes()


# ---- the round trip over random histories (fork, partial munmap, mprotect, COW, pins, ...) --

CASES = [("x86-64", "6.8"), ("x86-64", "6.18"), ("arm64-4k", "6.18"), ("ppc64-4k", "6.16"), ("s390x", "6.12")]


def machine_for(arch: str, kernel: str) -> type[SimMachine]:
    class Machine(SimMachine):
        max_procs = 4

        def make_sims(self) -> list[pb.Simulation]:
            return [pb.Simulation(arch, kernel, 4 << 20, seed=3, fragmentation={"64K": 0.25}),
                    pb.Simulation(arch, kernel, 4 << 20, seed=3, fragmentation={"64K": 0.25},
                                  backend="reference")]

        def comparisons(self):
            return [(0, 1, set(), True)]

        check_every_step = ("rust",)

        @invariant()
        def rebuilt_from_arrays(self) -> None:
            if hasattr(self, "sims"):
                round_trip(self.sims[0], ["rust"])

        def teardown(self) -> None:
            super().teardown()
            if hasattr(self, "sims"):
                round_trip(self.sims[0])
                round_trip(self.sims[1])
                # The rebuilt simulation goes on like the original.
                again = pb.Simulation.from_arrays(**self.sims[0].to_arrays())
                outcomes = []
                for s in (self.sims[0], again):
                    p = s.process(self.procs[0].pid)
                    if p.vmas():
                        try:  # a pinned page (or PMD) copied at fork may not fit a small memory
                            p.fork()
                            outcomes.append("forked")
                        except pb.OutOfMemoryError:
                            outcomes.append("out of memory")
                        s.check()
                assert len(set(outcomes)) <= 1, outcomes
                assert state_diff(self.sims[0].state(), again.state()) == []

    Machine.__name__ = f"FromArrays_{arch.replace('-', '_')}_{kernel.replace('.', '_')}"
    return Machine


@pytest.mark.parametrize("arch,kernel", CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_round_trip_of_random_histories(arch: str, kernel: str) -> None:
    m = machine_for(arch, kernel)
    m.TestCase.settings = settings(max_examples=int(os.environ.get("PTEBATCH_FROM_ARRAYS_EXAMPLES", 5)),
                                   stateful_step_count=10, deadline=None,
                                   suppress_health_check=list(HealthCheck))
    m.TestCase().runTest()


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_after_fork_cow_munmap_mprotect(backend: str) -> None:
    for arch in ("x86-64", "arm64-4k", "riscv64", "loongarch64"):
        sim = pb.Simulation(arch, "6.18", "16M", backend=backend)
        p = sim.spawn()
        m = p.mmap("1M", mthp=["64K"])
        p.touch(m.start, "1M", write=True)
        f = sim.create_file("256K", "16K")
        fm = p.mmap("256K", "r", file=f)
        p.touch(fm.start, "128K")
        sh = p.mmap("64K", shared=True)
        p.touch(sh.start, "64K", write=True)
        z = p.mmap("64K")
        p.touch(z.start, "64K")  # the zero page
        c = p.fork()
        c.write(m.start)  # COW of one page of a large folio
        ps = sim.page_size
        p.munmap(m.start + 5 * ps, 2 * ps)  # partially unmapped: deferred split
        p.mprotect(m.start + 16 * ps, 4 * ps, "none")
        c.mprotect(m.start + 32 * ps, 4 * ps, "r")
        pin = c.pin(m.start + 48 * ps, 2 * ps)
        c.exit()
        round_trip(sim)
        pin.unpin()
        round_trip(sim)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["x86-64", "s390x"])
def test_round_trip_of_a_huge_folio_past_i_size(backend: str, arch: str) -> None:
    """tmpfs huge=always puts a PMD-sized folio at index 0 of a one-page file
    (shmem_alloc_and_add_folio() rounds the index down to the PMD, whatever i_size), so the
    folio reaches past the file's end; the rebuilt state must take it."""
    sim = pb.Simulation(arch, "6.12", "4M", seed=3, backend=backend)
    p = sim.spawn()
    f = sim.create_file(sim.page_size, shmem=True, huge="always")
    m = p.mmap(sim.page_size, "r", shared=True, file=f)
    p.touch(m.start, sim.page_size)
    arrays = sim.to_arrays()
    assert arrays["folios"]["order"].tolist() == [pb.layout(arch).ptrs_per_pte.bit_length() - 1]
    round_trip(sim)


# ---- a state written by hand ----------------------------------------------------------------

def test_inferred_counters_of_a_hand_written_fork() -> None:
    """Only folio placement and page tables given: the counters come out as a real fork left
    them (exclusive bits, MM-ID slots, shared bit, rss, anon_vmas); tokens were not given."""
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    m = p.mmap("256K", mthp=["64K"])
    p.touch(m.start, "256K", write=True)
    p.fork()
    want = sim.state()
    heads = np.flatnonzero(want["order"] == 4)[::16].astype(np.uint64)
    assert len(heads) == 4
    built = pb.Simulation.from_arrays(
        "x86-64", "6.18", "16M",
        folios={"pfn": heads, "order": np.full(len(heads), 4), "kind": "anon"},
        processes=[{"vmas": [{"start": m.start, "ptes": p.ptes(m), "mthp": ["64K"]}]},
                   {"vmas": [{"start": m.start, "ptes": sim.process(2).ptes(m), "mthp": ["64K"]}]}])
    assert state_diff(want, built.state(), ignore=["token", "next_token", "vmas"]) == []
    # anon_vma numbering aside (fork gives the child its own), the VMAs are the same.
    assert np.array_equal(np.delete(want["vmas"], 14, axis=1), np.delete(built.state()["vmas"], 14, axis=1))
    page = built.page(int(heads[0]))
    assert page["mm_ids"] == [1, 2] and page["maybe_mapped_shared"] and not page["anon_exclusive"]


def test_page_tables_are_borrowed_and_copied_once() -> None:
    lay = pb.layout("x86-64")
    table = lay.mk_pte(np.arange(16, 32, dtype=np.uint64), write=True, dirty=True, young=True)
    table.flags.writeable = False  # a read-only array is fine: it is only read
    spec = {"folios": {"pfn": [16], "order": [4]}, "processes": [{"vmas": [{"start": BASE, "ptes": table}]}]}
    for backend in BACKENDS:
        sim = pb.Simulation.from_arrays(memory="4M", backend=backend, **spec)
        got = sim.process(1).ptes(BASE)
        assert np.array_equal(got, table)
        sim.process(1).munmap(BASE, 4096)
        assert np.array_equal(table, lay.mk_pte(np.arange(16, 32, dtype=np.uint64), write=True, dirty=True, young=True))
        assert sim.page(17)["anon_exclusive"] and sim.page(16)["mapcount"] == 0


# ---- refusals -------------------------------------------------------------------------------

def valid() -> dict[str, Any]:
    """One process: 16 anonymous pages (a 64K folio at pfn 16, written) and 4 pages of a file
    (order-0 page-cache folios at pfns 40..43) mapped privately read-only."""
    lay = pb.layout("x86-64")
    anon = lay.mk_pte(np.arange(16, 32, dtype=np.uint64), write=True, dirty=True, young=True)
    filep = lay.mk_pte(np.arange(40, 44, dtype=np.uint64), young=True)
    return {
        "arch": "x86-64", "kernel": "6.18", "memory": "4M",
        "files": [{"size": "16K"}],
        "folios": {"pfn": np.array([16, 40, 41, 42, 43], np.uint64), "order": np.array([4, 0, 0, 0, 0], np.uint8),
                   "kind": ["anon", "file", "file", "file", "file"], "file": [-1, 0, 0, 0, 0], "index": [0, 0, 1, 2, 3],
                   "dirty": [True, False, False, False, False]},
        "processes": [{"vmas": [{"start": BASE, "ptes": anon},
                                {"start": BASE + (1 << 20), "ptes": filep, "prot": "r", "file": 0}]}],
    }


def vma(d: dict[str, Any], i: int = 0) -> dict[str, Any]:
    return d["processes"][0]["vmas"][i]


def pte(pfn: int, **bits: bool) -> int:
    return int(pb.layout("x86-64").mk_pte(pfn, young=True, **bits))


def _set(d: dict[str, Any], i: int, pfn: int, **bits: bool) -> None:
    t = vma(d)["ptes"].copy()
    t[i] = pte(pfn, **bits)
    vma(d)["ptes"] = t


def bad_free_pfn(d):  # a PTE at a pfn no folio holds
    _set(d, 3, 100, write=True, dirty=True)


def bad_beyond_memory(d):
    _set(d, 3, 5000, write=True, dirty=True)


def bad_overlapping_vmas(d):
    d["processes"][0]["vmas"].append({"start": BASE + 8 * 4096, "ptes": np.zeros(16, np.uint64)})


def bad_misaligned_folio(d):
    d["folios"]["pfn"] = np.array([17, 40, 41, 42, 43], np.uint64)


def bad_overlapping_folios(d):
    d["folios"] = {k: list(v) + [v[0]] for k, v in d["folios"].items()}
    d["folios"]["pfn"][-1] = 24
    d["folios"]["order"][-1] = 2


def bad_file_page_in_anon_vma(d):
    _set(d, 3, 40)


def bad_anon_page_in_shared_vma(d):
    vma(d, 1).update(shared=True, prot="r")
    t = vma(d, 1)["ptes"].copy()
    t[0] = pte(16)
    vma(d, 1)["ptes"] = t


def bad_file_page_at_wrong_offset(d):
    t = vma(d, 1)["ptes"][::-1].copy()
    vma(d, 1)["ptes"] = t


def bad_write_in_read_only_vma(d):
    t = vma(d, 1)["ptes"].copy()
    t[0] = pte(40, write=True)
    vma(d, 1)["ptes"] = t


def bad_stray_bits(d):
    t = vma(d)["ptes"].copy()
    t[0] |= np.uint64(1 << 57)  # a software bit the model never sets
    vma(d)["ptes"] = t


def bad_zero_page_in_file_vma(d):
    t = vma(d, 1)["ptes"].copy()
    t[0] = pte(1024, special=True)  # 4M of memory: the zero page is pfn 1024
    vma(d, 1)["ptes"] = t


def bad_unreferenced_folio(d):
    d["folios"] = {k: list(v) + [v[0]] for k, v in d["folios"].items()}
    d["folios"]["pfn"][-1] = 64


def bad_shmem_kind_of_a_file(d):
    d["folios"]["kind"] = ["anon", "shmem", "file", "file", "file"]


def bad_exited_with_vmas(d):
    d["processes"][0]["exited"] = True


def bad_pmds(d):
    vma(d)["pmds"] = [(vma(d)["start"] + 4096, int(vma(d)["ptes"][0]))]  # not PMD-aligned


def bad_unknown_key(d):
    vma(d)["softdirty"] = False


def bad_pid(d):
    d["processes"][0]["pid"] = 2


def bad_token_on_free_page(d):
    t = np.zeros(1024, np.uint32)
    t[100] = 7
    d["pages"] = {"token": t}


def bad_exclusive_file_page(d):
    x = np.zeros(1024, bool)
    x[40] = True
    d["pages"] = {"anon_exclusive": x}


def bad_pages_length(d):
    d["pages"] = {"token": np.zeros(1000, np.uint32)}


def bad_slots_on_small_folio(d):
    d["folios"]["mm_ids"] = np.array([[1, 0]] * 5)
    d["folios"]["mm_id_mapcounts"] = np.array([[16, 0]] + [[1, 0]] * 4)


def bad_next_token(d):
    d["next_token"] = 0


def bad_folio_column_length(d):
    d["folios"]["dirty"] = [False] * 4


def bad_unaligned_start(d):
    vma(d)["start"] = BASE + 100


def bad_vma_beyond_file(d):
    vma(d, 1)["offset"] = 4096


def bad_end(d):
    vma(d)["end"] = BASE + 4096


VALUE_ERRORS = {
    bad_free_pfn: "in no folio", bad_beyond_memory: "in no folio", bad_overlapping_vmas: "overlaps",
    bad_misaligned_folio: "unaligned", bad_overlapping_folios: "not free",
    bad_file_page_in_anon_vma: "page-cache pfn", bad_anon_page_in_shared_vma: "shared mapping",
    bad_file_page_at_wrong_offset: "not file 0's page", bad_write_in_read_only_vma: "protection",
    bad_stray_bits: "not an entry", bad_zero_page_in_file_vma: "zero page",
    bad_unreferenced_folio: "neither mapped", bad_shmem_kind_of_a_file: "shmem",
    bad_exited_with_vmas: "exited", bad_pmds: "PMD", bad_unknown_key: "no key 'softdirty'",
    bad_pid: "pid 1", bad_token_on_free_page: "in no folio", bad_exclusive_file_page: "anonymous folio",
    bad_pages_length: "1000 entries", bad_slots_on_small_folio: "small folio", bad_next_token: "next_token",
    bad_folio_column_length: "shape", bad_unaligned_start: "multiples of the 4096-byte page",
    bad_vma_beyond_file: "beyond file 0", bad_end: "does not match",
}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_valid_base_builds(backend: str) -> None:
    sim = pb.Simulation.from_arrays(backend=backend, **valid())
    assert sim.process(1).rss() == {"file": 4, "anon": 16, "shmem": 0}
    assert sim.page(16)["anon_exclusive"] and sim.page(40)["refcount"] == 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spoil", list(VALUE_ERRORS), ids=[f.__name__ for f in VALUE_ERRORS])
def test_inconsistent_input_is_a_value_error(spoil, backend: str) -> None:
    d = copy.deepcopy(valid())
    spoil(d)
    before = {id(v["ptes"]): v["ptes"].copy() for v in d["processes"][0]["vmas"]}
    with pytest.raises(ValueError, match=VALUE_ERRORS[spoil]):
        pb.Simulation.from_arrays(backend=backend, **d)
    for v in d["processes"][0]["vmas"]:
        assert np.array_equal(v["ptes"], before[id(v["ptes"])]), "the input was changed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_broken_invariants_are_invariant_errors(backend: str) -> None:
    # A second process maps the written page writable: not exclusive, so no writable PTE.
    d = valid()
    d["processes"].append({"vmas": [{"start": BASE, "ptes": vma(d)["ptes"].copy()}]})
    with pytest.raises(pb.InvariantError, match="writable"):
        pb.Simulation.from_arrays(backend=backend, **d)
    # MM-ID slots that claim more mappings than the page tables hold.
    d = valid()
    d["folios"]["mm_ids"] = np.array([[1, 0]] + [[0, 0]] * 4)
    d["folios"]["mm_id_mapcounts"] = np.array([[17, 0]] + [[0, 0]] * 4)
    with pytest.raises(pb.InvariantError, match="mm-id-slot"):
        pb.Simulation.from_arrays(backend=backend, **d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_array_types_are_type_or_value_errors(backend: str) -> None:
    t = vma(valid())["ptes"]
    for ptes, err, msg in [(t.astype(np.int64), TypeError, "uint64"), (list(t), TypeError, "numpy uint64 array"),
                           (np.repeat(t, 2)[::2], ValueError, "C-contiguous"),
                           (t.reshape(4, 4), ValueError, "one-dimensional")]:
        d = valid()
        vma(d)["ptes"] = ptes
        with pytest.raises(err, match=msg):
            pb.Simulation.from_arrays(backend=backend, **d)
    for key, value, err in [("order", [4.0, 0, 0, 0, 0], TypeError), ("dirty", [1, 0, 0, 0, 0], TypeError),
                            ("order", [4, 0, 0, 0, 256], ValueError), ("kind", ["anon", "file", "file", "file", "page"], ValueError),
                            ("file", [0, 0, 0, 0, 0], ValueError)]:
        d = valid()
        d["folios"][key] = value
        with pytest.raises(err):
            pb.Simulation.from_arrays(backend=backend, **d)
    for bad, err in [({"folios": [], "processes": []}, TypeError), ({"folios": {"pfn": []}, "processes": []}, ValueError),
                     ({"folios": {"pfn": [], "order": []}, "processes": {}}, TypeError)]:
        with pytest.raises(err):
            pb.Simulation.from_arrays(backend=backend, **bad)


def test_empty_and_minimal_states() -> None:
    for backend in BACKENDS:
        sim = pb.Simulation.from_arrays(memory="1M", folios={"pfn": [], "order": []}, processes=[{}], backend=backend)
        assert sim.state_equal(_spawned(backend))


def _spawned(backend: str) -> pb.Simulation:
    sim = pb.Simulation(memory="1M", backend=backend)
    sim.spawn()
    return sim


@pytest.mark.parametrize("backend", BACKENDS)
def test_process_vmas_with_their_ptes_are_vma_arguments(backend: str) -> None:
    sim = pb.Simulation("arm64-4k", "6.18", "16M", backend=backend)
    p = sim.spawn()
    m = p.mmap("512K", mthp=["64K"])
    p.touch(m.start, "512K", write=True)
    p.madvise(m.start, "64K", "dontfork")
    arrays = sim.to_arrays()
    arrays["processes"] = [{"vmas": [{**v, "ptes": p.ptes(v["start"])} for v in p.vmas()]}]
    again = pb.Simulation.from_arrays(**arrays)
    assert state_diff(sim.state(), again.state()) == []
    assert again.process(1).vmas() == p.vmas()


def test_ctrl_c_during_a_build_is_a_keyboard_interrupt() -> None:
    """SIGINT while the core builds (GIL released) raises KeyboardInterrupt from the call and
    returns nothing (the core's watch runs the handler and abandons the build)."""
    import signal
    import sys
    import threading
    import time

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signals reach the main thread only")
    sim = pb.Simulation("x86-64", "6.18", "300M")
    p = sim.spawn()
    m = p.mmap("256M")
    p.touch(m.start, "256M", write=True)
    arrays = sim.to_arrays()
    main = threading.main_thread().ident
    source = Path(pb.simulation.__file__).read_text().splitlines()
    call_line = next(i for i, line in enumerate(source, 1) if "_core.Simulation.from_arrays(*args)" in line)

    def interrupt() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            frame = sys._current_frames().get(main)
            while frame is not None and frame.f_code.co_name != "from_arrays":
                frame = frame.f_back
            if frame is not None and frame.f_lineno == call_line:
                signal.pthread_kill(main, signal.SIGINT)
                return
            time.sleep(0.0005)

    t = threading.Thread(target=interrupt)
    t.start()
    built = None
    try:
        with pytest.raises(KeyboardInterrupt):
            built = pb.Simulation.from_arrays(**arrays)
    finally:
        t.join()
    assert built is None


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_round_trip_keeps_the_thp_and_shmem_controls(backend: str) -> None:
    """The THP policy, the shmem controls, fault-around, MADV_(NO)HUGEPAGE, PR_SET_THP_DISABLE,
    explicit and policy-following mTHP lists and the kinds of shmem objects survive
    ``from_arrays(**to_arrays())``, and later faults follow them."""
    sim = pb.Simulation("x86-64", "6.18", "64M", backend=backend)
    sim.set_thp_policy("never", {"64K": "madvise", "16K": "always"})
    sim.set_shmem_policy("advise", {"32K": "always"})
    sim.fault_around_bytes = 32 << 10
    p = sim.spawn()
    a = p.mmap("1M")
    p.madvise(a.start + (256 << 10), 256 << 10, "hugepage")
    b = p.mmap("256K", mthp=[])
    s = p.mmap("256K", shared=True)
    f = sim.create_file("512K", shmem=True, huge="within_size")
    t = p.mmap("512K", shared=True, file=f)
    q = sim.spawn()
    q.prctl_thp_disable(True)
    for m in (a, b, s, t):
        p.touch(m.start, m.length, write=True)
    again = pb.Simulation.from_arrays(**sim.to_arrays())
    assert pb.state_diff(sim.state(), again.state()) == []
    assert again.thp_policy == sim.thp_policy and again.shmem_policy == sim.shmem_policy
    assert again.fault_around_bytes == 32 << 10
    for one in (sim, again):  # the same next faults in both
        r = one.process(1).mmap("1M")
        one.process(1).madvise(r.start, r.length, "hugepage")
        one.process(1).touch(r.start, r.length, write=True)
        one.process(2).mmap("64K")
    assert pb.state_diff(sim.state(), again.state()) == []

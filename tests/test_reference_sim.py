"""Scenario tests of the pure-Python simulation twin (``ptebatch.reference.sim``) on its own.

Every step is followed by ``check()``, which recomputes the kernel's accounting from the page
tables. No compiled core is needed for these (the exception classes come from it when built).
"""

from __future__ import annotations

import pytest

from ptebatch.reference.sim import AccessFault, InvariantError, OutOfMemoryError, Simulation
from ptebatch.reference.sim.memory import Memory, SplitMix64

KIB = 1024
PFN_MASK = (1 << 55) - 1


# arm64 PTE bits (rust/src/arch/arm64.rs).
ARM64_RDONLY = 1 << 7
ARM64_AF = 1 << 10
ARM64_CONT = 1 << 52
ARM64_DIRTY = 1 << 55


def checked(sim: Simulation):
    """Wraps ``sim`` so that every mutating call is followed by ``check()``."""

    class Checked:
        inner = sim

        def __getattr__(self, name):
            attr = getattr(sim, name)
            if not callable(attr) or name in ("state", "check", "page", "ptes", "decode_pte"):
                return attr

            def call(*args, **kwargs):
                try:
                    return attr(*args, **kwargs)
                finally:
                    sim.check()

            return call

    return Checked()


def pfn_at(sim, pid: int, addr: int) -> int:
    return sim.pagemap(pid, addr, sim.page_size)[0] & PFN_MASK


def pte_at(sim, pid: int, addr: int) -> dict:
    vma = next(v for v in sim.vmas(pid) if v["start"] <= addr < v["end"])
    return sim.decode_pte(sim.ptes(pid, addr)[(addr - vma["start"]) // sim.page_size])


def written_mthp(kernel: str, size: int = 64 * KIB, memory: int = 4 << 20):
    """A process with a written region of ``size`` bytes of 64K mTHPs, and the region's address."""
    sim = checked(Simulation("x86-64", kernel, memory, seed=7))
    pid = sim.spawn()
    addr = sim.mmap(pid, size, "rw", mthp=[64 * KIB])
    sim.touch(pid, addr, size, write=True)
    return sim, pid, addr


# ---- building blocks ---------------------------------------------------------------------------


def test_splitmix64_reference_vector():
    r = SplitMix64(0)
    assert r.next_u64() == 0xE220A8397B1DCDAF
    assert r.next_u64() == 0x6E789E6AA1B965F4


def test_buddy_allocates_lowest_aligned_and_merges_back():
    m = Memory(1024, 9, 1)
    assert m.free_blocks() == [(0, 9), (512, 9)]
    a, b, c = m.alloc(0), m.alloc(4), m.alloc(0)
    assert (a, b, c) == (0, 16, 1)
    assert m.free_pages == 1024 - 18
    for head in (b, a, c):
        m.free(head)
    assert m.free_blocks() == [(0, 9), (512, 9)]
    assert m.free_pages == 1024


def test_odd_memory_sizes_and_exhaustion():
    m = Memory(5, 9, 1)
    assert m.free_blocks() == [(0, 2), (4, 0)]
    assert m.alloc(3) is None
    assert (m.alloc(2), m.alloc(0), m.alloc(0)) == (0, 4, None)


def test_write_fault_maps_one_aligned_mthp():
    sim, pid, addr = written_mthp("6.18")
    head = pfn_at(sim, pid, addr)
    assert sim.page(head)["order"] == 4
    assert [pfn_at(sim, pid, addr + i * 4096) for i in range(16)] == list(range(head, head + 16))
    assert sim.stats["alloc_by_order"] == [0, 0, 0, 0, 1]
    assert pte_at(sim, pid, addr)["write"] and pte_at(sim, pid, addr)["dirty"]


# ---- fork and COW ------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["6.8", "6.9", "6.12", "6.15", "6.18"])
def test_fork_of_written_mthp_shares_every_page_read_only(kernel):
    sim, parent, addr = written_mthp(kernel)
    child = sim.fork(parent)
    for i in range(16):
        a = addr + i * 4096
        pfn = pfn_at(sim, parent, a)
        assert pfn_at(sim, child, a) == pfn
        page = sim.page(pfn)
        assert page["mapcount"] == 2 and not page["anon_exclusive"]
        assert not pte_at(sim, parent, a)["write"] and not pte_at(sim, child, a)["write"]
        assert not pte_at(sim, child, a)["young"]  # __copy_present_ptes() makes the copy old
    expected = [0] * 16 + [1] if kernel != "6.8" else [0, 16]  # one batch of 16, or 16 of one
    assert sim.last_stats["batch_histogram"] == expected
    assert sim.page(pfn_at(sim, parent, addr))["refcount"] == 32


@pytest.mark.parametrize("kernel", ["6.8", "6.12", "6.18"])
def test_child_write_copies_into_a_new_order0_folio(kernel):
    sim, parent, addr = written_mthp(kernel)
    child = sim.fork(parent)
    a = addr + 5 * 4096
    before = sim.read(parent, a)
    old = pfn_at(sim, parent, a)
    token = sim.write(child, a)
    assert sim.last_stats["cow_copies"] == 1 and sim.last_stats["pages_copied"] == 1
    new = pfn_at(sim, child, a)
    assert new != old and sim.page(new)["order"] == 0 and sim.page(new)["anon_exclusive"]
    assert sim.read(child, a) == token and sim.read(parent, a) == before
    assert sim.page(old)["mapcount"] == 1


@pytest.mark.parametrize("kernel, reuses_after_exit", [("6.12", False), ("6.18", True)])
def test_parent_write_copies_while_child_maps_the_folio(kernel, reuses_after_exit):
    sim, parent, addr = written_mthp(kernel)
    child = sim.fork(parent)
    sim.write(child, addr + 5 * 4096)  # the child now maps 15 pages of the folio
    a = addr + 6 * 4096
    old = pfn_at(sim, parent, a)
    sim.write(parent, a)
    assert pfn_at(sim, parent, a) != old, "copy while the child still maps the folio"
    sim.exit(child)
    a = addr + 7 * 4096
    old = pfn_at(sim, parent, a)
    token = sim.write(parent, a)
    assert (pfn_at(sim, parent, a) == old) == reuses_after_exit
    assert sim.last_stats["cow_reuses"] == int(reuses_after_exit)
    assert sim.read(parent, a) == token


def test_batched_and_per_pte_fork_give_the_same_state():
    def run(batching):
        sim = checked(Simulation("arm64-4k", "6.16", 8 << 20, seed=3, batching=batching))
        p = sim.spawn()
        a = sim.mmap(p, 1 << 20, "rw", mthp=[16 * KIB, 64 * KIB])
        sim.touch(p, a, 512 * KIB, write=True)
        sim.touch(p, a + 512 * KIB, 256 * KIB)
        c = sim.fork(p)
        sim.write(c, a + 3 * 4096)
        sim.munmap(p, a + 600 * KIB, 7 * 4096)
        sim.madvise(c, a + 256 * KIB, 256 * KIB, "dontneed")
        sim.mprotect(p, a, 256 * KIB, "r")
        sim.mprotect(p, a, 256 * KIB, "rw")
        sim.exit(c)
        return sim

    batched, per_pte = run(True), run(False)
    assert batched.stats["folio_pte_batch_calls"] > 0 == per_pte.stats["folio_pte_batch_calls"]
    a, b = batched.state(), per_pte.state()
    # The documented "contpte-layout" deviation: per-PTE and batched paths fold and unfold
    # contpte blocks differently, so PTE_CONT and the young/dirty repaint may differ.
    mask = ~(ARM64_CONT | ARM64_AF | ARM64_DIRTY | ARM64_RDONLY) & ((1 << 64) - 1)
    assert [x & mask for x in a.pop("ptes")] == [x & mask for x in b.pop("ptes")]
    assert a == b


# ---- pins --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kernel", ["6.8", "6.18"])
def test_longterm_pin_before_fork_gives_the_child_copies(kernel):
    sim, parent, addr = written_mthp(kernel)
    pin = sim.pin(parent, addr + 4096, 4096, write=True, longterm=True)
    child = sim.fork(parent)
    # folio_needs_cow_for_dma() looks at the whole folio: all 16 exclusive pages are copied.
    assert sim.last_stats["pages_copied"] == 16
    for i in range(16):
        assert pfn_at(sim, child, addr + i * 4096) != pfn_at(sim, parent, addr + i * 4096)
    token = sim.write(parent, addr + 4096)
    assert sim.last_stats["cow_reuses"] == 0 and sim.last_stats["cow_copies"] == 0
    assert sim.pin_read(pin, 0) == token, "the pin sees the parent's write"
    assert sim.read(child, addr + 4096) != token
    dma = sim.pin_write(pin, 0)
    assert sim.read(parent, addr + 4096) == dma and sim.read(child, addr + 4096) != dma
    sim.unpin(pin)


def test_readonly_longterm_pin_unshares_a_cow_shared_page():
    sim, parent, addr = written_mthp("6.18")
    child = sim.fork(parent)
    a = addr + 2 * 4096
    shared = pfn_at(sim, parent, a)
    pin = sim.pin(parent, a, 4096, write=False, longterm=True)
    pinned = pfn_at(sim, parent, a)
    assert pinned != shared and sim.page(pinned)["anon_exclusive"]
    assert not pte_at(sim, parent, a)["write"], "an unshare does not make the PTE writable"
    token = sim.write(parent, a)  # reuses the exclusive page: the pin stays coherent
    assert pfn_at(sim, parent, a) == pinned and sim.pin_read(pin, 0) == token
    sim.write(child, a)
    assert sim.pin_read(pin, 0) == token
    with pytest.raises(ValueError):
        sim.pin_write(pin, 0)  # taken without FOLL_WRITE
    sim.unpin(pin)


def test_readonly_longterm_pin_of_untouched_memory_gets_a_real_page():
    sim = checked(Simulation("x86-64", "6.18", 1 << 20))
    pid = sim.spawn()
    addr = sim.mmap(pid, 8 * 4096, "rw")
    pin = sim.pin(pid, addr, 4096, write=False, longterm=True)
    assert pfn_at(sim, pid, addr) != sim.zero_pfn
    token = sim.write(pid, addr)
    assert sim.pin_read(pin, 0) == token
    short = sim.pin(pid, addr + 4096, 4096, write=False, longterm=False)
    assert pfn_at(sim, pid, addr + 4096) == sim.zero_pfn  # a short-term pin may hold the zero page
    assert sim.pin_read(short, 0) == 0
    sim.unpin(short)
    sim.unpin(pin)


def test_uffd_writeprotect_blocks_writes_until_resolved():
    sim = checked(Simulation("x86-64", "6.18", 1 << 20))
    pid = sim.spawn()
    addr = sim.mmap(pid, 4 * 4096, "rw", uffd_wp=True, uffd_event_fork=True)
    sim.touch(pid, addr, 4 * 4096, write=True)
    sim.uffd_writeprotect(pid, addr, 2 * 4096)
    assert sim.pagemap(pid, addr, 4096)[0] & (1 << 57)  # PM_UFFD_WP
    assert not pte_at(sim, pid, addr)["write"] and pte_at(sim, pid, addr)["uffd_wp"]
    with pytest.raises(AccessFault):
        sim.write(pid, addr)
    child = sim.fork(pid)  # UFFD_FEATURE_EVENT_FORK: the child keeps the bits
    assert pte_at(sim, child, addr)["uffd_wp"] and not pte_at(sim, child, addr + 2 * 4096)["uffd_wp"]
    sim.uffd_writeprotect(pid, addr, 2 * 4096, enable=False)
    assert not pte_at(sim, pid, addr)["uffd_wp"]
    sim.write(pid, addr)
    with pytest.raises(ValueError):
        sim.uffd_writeprotect(sim.spawn(), addr, 4096)  # not mapped there


# ---- errors leave the state untouched ----------------------------------------------------------


def test_bad_input_raises_and_leaves_state_unchanged():
    sim = Simulation("x86-64", "6.18", 1 << 20, seed=7)
    pid = sim.spawn()
    ro = sim.mmap(pid, 16 * 4096, "r")
    big = sim.mmap(pid, 2 << 20, "rw", mthp=[64 * KIB])
    sim.touch(pid, big, 64 * KIB, write=True)
    gone = sim.spawn()
    sim.exit(gone)
    before = sim.state()
    bad = [
        (ValueError, lambda: sim.touch(pid, big + 1, 4096)),  # unaligned
        (ValueError, lambda: sim.touch(pid, big, 0)),  # empty
        (ValueError, lambda: sim.touch(pid, 0x1234000, 4096)),  # not mapped
        (ValueError, lambda: sim.touch(99, big, 4096)),  # no such process
        (ValueError, lambda: sim.fork(gone)),  # exited
        (ValueError, lambda: sim.mmap(pid, 4096, "rwq")),
        (ValueError, lambda: sim.mmap(pid, 4096, mthp=[8 * KIB])),  # order 1 is not an mTHP size
        (ValueError, lambda: sim.mmap(pid, 4096, addr=big)),  # overlaps
        (ValueError, lambda: sim.madvise(pid, big, 4096, "bogus")),
        (ValueError, lambda: sim.unpin(0)),
        (ValueError, lambda: sim.set_fallback(0, 0.5)),
        (ValueError, lambda: sim.kpagecount(sim.nr_pages + 5)),
        (TypeError, lambda: sim.touch(pid, big, 4096, write=1)),
        (TypeError, lambda: sim.mprotect(pid, big, 4096, None)),
        (OverflowError, lambda: sim.touch(-1, big, 4096)),
        (AccessFault, lambda: sim.touch(pid, ro, 4096, write=True)),
        (OutOfMemoryError, lambda: sim.touch(pid, big, 2 << 20, write=True)),
    ]
    for exc, op in bad:
        with pytest.raises(exc):
            op()
        assert sim.state() == before, exc
        sim.check()
    with pytest.raises(ValueError):
        Simulation("x86-65", "6.18", 1 << 20)
    with pytest.raises(ValueError):
        Simulation("x86-64", "6.18.1", 1 << 20)
    with pytest.raises(ValueError):
        Simulation("x86-64", "6.18", 4097)


def test_out_of_memory_after_partial_progress_keeps_the_old_state():
    sim = Simulation("x86-64", "6.18", 256 * 4096, seed=1)
    pid = sim.spawn()
    addr = sim.mmap(pid, 2 << 20, "rw")
    sim.touch(pid, addr, 200 * 4096, write=True)
    before, stats = sim.state(), sim.stats
    with pytest.raises(OutOfMemoryError):
        sim.touch(pid, addr, 2 << 20, write=True)  # faults 56 pages, then runs dry
    assert sim.state() == before and sim.stats == stats
    assert sim.last_stats["faults"] == 0
    sim.check()


def test_check_names_the_broken_rule():
    sim, pid, addr = written_mthp("6.18")
    sim.check()
    inner = sim.inner
    inner.st.mem.refcount[pfn_at(sim, pid, addr)] += 1
    with pytest.raises(InvariantError) as e:
        inner.check()
    assert e.value.rule == "refcount" and str(e.value).startswith("refcount: ")


# ---- determinism -------------------------------------------------------------------------------


def test_fragmentation_is_deterministic_per_seed():
    def run(seed):
        sim = Simulation("x86-64", "6.18", 4 << 20, seed=seed)
        sim.set_fallback(4, 0.5)
        pid = sim.spawn()
        addr = sim.mmap(pid, 1 << 20, "rw", mthp=[16 * KIB, 64 * KIB])
        sim.touch(pid, addr, 1 << 20, write=True)
        sim.check()
        return sim.state(), sim.stats["alloc_by_order"]

    (s1, orders1), (s2, _), (s3, orders3) = run(5), run(5), run(6)
    assert s1 == s2 and s1["rng"] != 5
    assert orders1[2] > 0 and orders1[4] > 0  # some 64K allocations fell back to 16K
    assert s1 != s3 or orders1 == orders3


# ---- arm64 contpte -----------------------------------------------------------------------------


def cont_flags(sim, pid: int, addr: int) -> list[bool]:
    return [bool(x & ARM64_CONT) for x in sim.ptes(pid, addr)]


@pytest.mark.parametrize("kernel, folds", [("6.8", False), ("seed", False), ("6.9", True), ("7.0", True)])
def test_arm64_mthp_fault_folds_whole_blocks_from_6_9(kernel, folds):
    sim = checked(Simulation("arm64-4k", kernel, 4 << 20, seed=1))
    pid = sim.spawn()
    addr = sim.mmap(pid, 128 * KIB, "rw", mthp=[64 * KIB])
    sim.touch(pid, addr, 128 * KIB, write=True)
    assert cont_flags(sim, pid, addr) == [folds] * 32
    # contpte_set_ptes() folds without a repaint: one write per entry.
    assert sim.stats["pte_writes"] == 32


def test_arm64_partial_mprotect_unfolds_one_block_and_keeps_the_other():
    sim = checked(Simulation("arm64-4k", "6.12", 4 << 20, seed=1))
    pid = sim.spawn()
    addr = sim.mmap(pid, 128 * KIB, "rw", mthp=[64 * KIB])
    sim.touch(pid, addr, 128 * KIB, write=True)
    sim.mprotect(pid, addr + 4 * 4096, 4096, "r")
    flags = [f for v in sim.vmas(pid) for f in cont_flags(sim, pid, v["start"])]
    assert flags == [False] * 16 + [True] * 16
    # The unfold repaints the block (16 writes, one flush of 16 pages).
    assert sim.last_stats["tlb_flush_pages"] >= 16
    # Back to one protection: the VMAs merge, but only a commit of a block's last entry folds.
    sim.mprotect(pid, addr + 4 * 4096, 4096, "rw")
    assert cont_flags(sim, pid, addr) == [False] * 16 + [True] * 16
    sim.mprotect(pid, addr, 64 * KIB, "rw")
    assert cont_flags(sim, pid, addr) == [True] * 32


def test_arm64_file_faults_fold_on_the_last_entry_of_a_block():
    sim = checked(Simulation("arm64-4k", "6.12", 4 << 20, seed=1))
    sim.inner.fault_around_bytes = 4096  # one PTE per fault (fault-around would map a run at once)
    pid = sim.spawn()
    f = sim.create_file(64 * KIB, 64 * KIB)
    addr = sim.mmap(pid, 64 * KIB, "r", file=f)
    for i in range(15):
        sim.touch(pid, addr + i * 4096, 4096)
    assert not any(cont_flags(sim, pid, addr))
    sim.touch(pid, addr + 15 * 4096, 4096)
    assert cont_flags(sim, pid, addr) == [True] * 16
    assert sim.last_stats["pte_writes"] == 1 + 16  # the entry, then the fold's repaint
    young = [pte_at(sim, pid, addr + i * 4096)["young"] for i in range(16)]
    assert all(young)


def test_arm64_munmap_inside_a_block_unfolds_it_first():
    sim = checked(Simulation("arm64-4k", "6.17", 4 << 20, seed=1))
    pid = sim.spawn()
    addr = sim.mmap(pid, 64 * KIB, "rw", mthp=[64 * KIB])
    sim.touch(pid, addr, 64 * KIB, write=True)
    sim.munmap(pid, addr + 3 * 4096, 2 * 4096)
    assert not any(cont_flags(sim, pid, addr))
    assert not any(cont_flags(sim, pid, addr + 5 * 4096))

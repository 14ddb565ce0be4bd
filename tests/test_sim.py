"""The simulation against the outcomes the kernel and its selftests (tools/testing/selftests/mm/
cow.c) establish, and its API and error behaviour."""

from __future__ import annotations

import numpy as np
import pytest

import ptebatch as pb

KERNELS = ["6.8", "6.12", "6.18", "7.0"]
SIZES = ["4K", "16K", "64K", "2M"]
PM_PRESENT, PM_FILE, PM_EXCLUSIVE = 1 << 63, 1 << 61, 1 << 56
PFN_MASK = (1 << 55) - 1


def written(kernel: str, size: str, length: str = "2M", **kw) -> tuple[pb.Simulation, pb.Process, pb.Mapping]:
    sim = pb.Simulation("x86-64", kernel, "64M", **kw)
    p = sim.spawn()
    v = p.mmap(length, mthp=[] if size == "4K" else [size])
    p.touch(v.start, v.length, write=True)
    sim.check()
    return sim, p, v


def pfn(p: pb.Process, addr: int) -> int:
    return int(p.pagemap(addr, 4096)[0]) & PFN_MASK


def pte(sim: pb.Simulation, p: pb.Process, addr: int) -> dict:
    vma = next(v for v in p.vmas() if v["start"] <= addr < v["end"])
    return sim._b.decode_pte(int(p.ptes(addr)[(addr - vma["start"]) // 4096]))


# -- known outcomes ------------------------------------------------------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("size", SIZES)
def test_after_fork_every_page_is_shared_and_read_only(kernel: str, size: str) -> None:
    sim, p, v = written(kernel, size)
    order = sim.page(pfn(p, v.start))["order"]
    assert 4096 << order == pb.parse_size(size)
    c = p.fork()
    sim.check()
    for i in range(0, v.length // 4096, 7):
        a = v.page(i)
        page = sim.page(pfn(p, a))
        assert page["mapcount"] == 2 and sim.kpagecount(pfn(p, a)) == 2
        assert not page["anon_exclusive"]
        assert pfn(c, a) == pfn(p, a)
        assert not pte(sim, p, a)["write"] and not pte(sim, c, a)["write"]
        assert not pte(sim, c, a)["young"], "the child's copy is old"
    assert not np.any(p.pagemap(v.start, v.length) & np.uint64(PM_EXCLUSIVE))


@pytest.mark.parametrize("kernel", KERNELS)
def test_cow_on_a_large_folio_per_version(kernel: str) -> None:
    sim, p, v = written(kernel, "64K")
    c = p.fork()
    a5 = v.page(5)
    old = pfn(p, a5)
    c.write(a5)
    assert pfn(c, a5) != old and sim.page(pfn(c, a5))["order"] == 0, "child write copies to order 0"
    assert pfn(p, a5) == old
    a6 = v.page(6)
    before = pfn(p, a6)
    p.write(a6)
    assert pfn(p, a6) != before, "a parent write while the child maps the folio copies"
    assert not sim.page(before)["partially_mapped"], "every page is still mapped by someone"
    c.exit()
    assert sim.page(before)["partially_mapped"], "page 6 lost its last mapping with the child"
    sim.check()
    a7 = v.page(7)
    before = pfn(p, a7)
    p.write(a7)
    reused = pfn(p, a7) == before
    assert reused is (kernel in ("6.18", "7.0")), "only MM-ID kernels reuse a large folio"
    assert sim.last_stats["cow_reuses" if reused else "cow_copies"] == 1
    sim.check()


def test_fork_stats_batch_per_folio() -> None:
    for kernel, want in (("6.8", {1: 512}), ("6.18", {16: 32})):
        sim, p, v = written(kernel, "64K")
        p.fork()
        hist = {n: c for n, c in enumerate(sim.last_stats["batch_histogram"]) if c}
        assert hist == want, kernel
        assert sim.last_stats["refcount_atomics"] == sum(want.values())


def test_batching_off_gives_the_same_fork() -> None:
    a, pa, v = written("6.18", "64K")
    b, pb_, _ = written("6.18", "64K", batching=False)
    pa.fork()
    pb_.fork()
    assert a.last_stats["batches"] == 32 and b.last_stats["batches"] == 512
    assert a.state_equal(b)


# -- COW isolation, as tools/testing/selftests/mm/cow.c checks it ---------------------------

@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("size", SIZES)
def test_cow_isolation(kernel: str, size: str) -> None:
    sim, p, v = written(kernel, size)
    a = v.page(3)
    old = p.read(a)
    c = p.fork()
    # Basic COW after fork(): no leak from parent into child, nor the other way.
    p.write(a)
    assert c.read(a) == old
    t = c.write(v.page(4))
    assert p.read(v.page(4)) != t
    # ... with the mprotect() optimization: RO→RW must not make a COW-shared page writable.
    b = v.page(9)
    old_b = c.read(b)
    p.mprotect(v.start, v.length, "r")
    p.mprotect(v.start, v.length, "rw")
    sim.check()
    p.write(b)
    assert c.read(b) == old_b
    sim.check()


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("size", SIZES)
def test_longterm_pin_before_fork_is_copied_for_the_child(kernel: str, size: str) -> None:
    """cow.c "fork() with an iouring fixed buffer": the pinned page is not shared."""
    sim, p, v = written(kernel, size)
    a = v.page(1)
    pin = p.pin(a, 4096, write=True, longterm=True)
    c = p.fork()
    sim.check()
    assert pfn(c, a) != pfn(p, a)
    assert sim.last_stats["fork_eagain_retries"] >= 1
    t = p.write(a)
    assert pin.read() == t, "the pin keeps seeing the parent's writes"
    assert c.read(a) != t
    t2 = pin.write()
    assert p.read(a) == t2 and c.read(a) != t2
    pin.unpin()
    sim.check()


@pytest.mark.parametrize("kernel", KERNELS)
def test_read_only_pins_are_reliable(kernel: str) -> None:
    sim, p, v = written(kernel, "64K")
    c = p.fork()
    # R/O pin of a page COW-shared with a live child: GUP unshares; later writes show.
    a = v.page(2)
    pin = p.pin(a, 4096, write=False, longterm=True)
    assert sim.page(pfn(p, a))["anon_exclusive"]
    t = p.write(a)
    assert pin.read() == t
    # vmsplice() + unmap in child: the child's R/O pin keeps the old data.
    b = v.page(3)
    old = c.read(b)
    cpin = c.pin(b, 4096, write=False, longterm=False)
    c.munmap(v.start, v.length)
    p.write(b)
    assert cpin.read() == old
    # R/O pin on a previously shared page (the child has exited).
    c.exit()
    d = v.page(8)
    pin2 = p.pin(d, 4096, write=False, longterm=True)
    t = p.write(d)
    assert pin2.read() == t
    for x in (pin, cpin, pin2):
        x.unpin()
    sim.check()


def test_private_file_mapping_cow() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    f = sim.create_file("64K", "16K")
    shared = p.mmap("64K", "rw", shared=True, file=f)
    private = p.mmap("64K", "rw", shared=False, file=f)
    t = p.write(shared.page(1))
    assert p.read(private.page(1)) == t, "a private mapping sees the file until it writes"
    mine = p.write(private.page(1))
    assert p.read(shared.page(1)) == t != mine
    # R/O longterm pin of a page-cache page in a private mapping: unshared into anon.
    pin = p.pin(private.page(2), 4096, write=False, longterm=True)
    t3 = p.write(private.page(2))
    assert pin.read() == t3
    assert sim.page(pfn(p, shared.page(1)))["dirty"]
    # 6.18 maps the 16K folio whole on the shared write (finish_fault()) and fault-around maps
    # it into the private mapping on the read; two of those pages became anonymous copies.
    assert p.rss() == {"file": 6, "anon": 2, "shmem": 0}
    pin.unpin()
    sim.check()


def test_fork_of_file_mapping_without_anon_pages_copies_nothing() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    f = sim.create_file("64K", "16K")
    v = p.mmap("64K", "rw", shared=True, file=f)
    p.touch(v.start, v.length, write=True)
    c = p.fork()
    assert sim.last_stats["batches"] == 0 and c.rss()["file"] == 0
    assert p.read(v.page(3)) == c.read(v.page(3)), "the child faults the shared file in lazily"
    sim.check()


def test_shared_anonymous_memory_is_shared_after_fork() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    v = p.mmap("64K", "rw", shared=True)
    p.touch(v.start, v.length, write=True)
    c = p.fork()
    t = c.write(v.page(2))
    assert p.read(v.page(2)) == t
    assert p.rss()["shmem"] == 16
    assert p.pagemap(v.page(2), 4096)[0] & np.uint64(PM_FILE)
    sim.check()


def test_zero_page_and_pagemap() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    v = p.mmap("16K", mthp=["16K"])
    assert p.read(v.start) == 0
    e = int(p.pagemap(v.start, 4096)[0])
    assert e & PM_PRESENT and not e & (PM_EXCLUSIVE | PM_FILE) and e & PFN_MASK == sim.zero_pfn
    assert sim.kpagecount(sim.zero_pfn) == 0
    p.write(v.start)
    e = int(p.pagemap(v.start, 4096)[0])
    assert e & PM_EXCLUSIVE and sim.page(e & PFN_MASK)["order"] == 0, "the zero page blocks the 16K fault range"
    assert not p.pagemap(v.start + 4096, 4096)[0] & np.uint64(PM_PRESENT)
    sim.check()


def test_dontfork_and_wipeonfork() -> None:
    sim, p, v = written("6.18", "64K", length="256K")
    p.madvise(v.start, "64K", "dontfork")
    p.madvise(v.start + (128 << 10), "64K", "wipeonfork")
    c = p.fork()
    starts = [m["start"] for m in c.vmas()]
    assert v.start not in starts
    assert c.read(v.page(40)) == 0, "wiped"
    assert c.read(v.page(20)) == p.read(v.page(20))
    assert len(p.vmas()) == 4
    p.madvise(v.start, "64K", "dofork")
    assert len(p.vmas()) == 3, "VMAs merge back when their flags match again"
    sim.check()


def test_partial_munmap_queues_deferred_split() -> None:
    sim, p, v = written("6.18", "64K", length="64K")
    head = pfn(p, v.start)
    p.munmap(v.page(4), "8K")
    page = sim.page(head)
    assert page["partially_mapped"] and page["nr_pages_mapped"] == 14 and page["refcount"] == 14
    with pytest.raises(ValueError, match="not entirely mapped"):
        p.madvise(v.start, "64K", "dontneed")
    p.madvise(v.start, "16K", "dontneed")
    assert not sim.page(head)["free"]
    p.madvise(v.page(6), "40K", "dontneed")
    assert sim.page(head)["free"]
    assert sim.free_pages == sim.nr_pages
    sim.check()


def test_fragmentation_falls_back_to_smaller_folios() -> None:
    sim = pb.Simulation("x86-64", "6.18", "256M", fragmentation={"64K": 0.3}, seed=11)
    p = sim.spawn()
    v = p.mmap("64M", mthp=["16K", "64K"])
    p.touch(v.start, v.length, write=True)
    by_order = sim.stats["alloc_by_order"]
    n64, n16 = by_order[4], by_order[2]
    frac = n64 * 16 / (v.length // 4096)
    assert 0.6 < frac < 0.8, frac
    assert n16 == 4 * (1024 - n64)
    sim.check()


def test_memory_arrays() -> None:
    sim, p, v = written("6.18", "64K", length="256K")
    p.fork()
    mc = sim.memory.mapcount
    assert mc.dtype == np.int32 and int((mc == 2).sum()) == 64
    assert int(sim.memory.refcount.sum()) == 4 * 32
    with pytest.raises(AttributeError):
        sim.memory.nope


def test_clone_and_state_equal() -> None:
    sim, p, v = written("6.18", "64K")
    other = sim.clone()
    assert sim.state_equal(other)
    other.process(p.pid).write(v.start)
    assert not sim.state_equal(other)


@pytest.mark.parametrize("backend", ["rust"])
def test_memory_per_page(backend: str) -> None:
    """Bytes of state per simulated 4 KiB page for a process plus its child."""
    for size, limit in (("4K", 40), ("64K", 40), ("2M", 40)):
        sim = pb.Simulation("x86-64", "6.18", "64M")
        p = sim.spawn()
        v = p.mmap("64M", mthp=[] if size == "4K" else [size])
        p.touch(v.start, v.length, write=True)
        p.fork()
        per_page = sim._b.state_bytes() / (v.length // 4096)
        assert per_page < limit, (size, per_page)


# -- errors leave the state unchanged --------------------------------------------------------

def test_bad_input_raises_and_changes_nothing() -> None:
    sim, p, v = written("6.18", "64K", length="256K")
    huge = p.mmap("128M")
    before = sim.state()
    cases = [
        (ValueError, lambda: p.touch(v.start + 1, 4096)),
        (ValueError, lambda: p.touch(v.start, 4097)),
        (ValueError, lambda: p.touch(v.end, 4096)),
        (ValueError, lambda: p.munmap(v.start, 0)),
        (ValueError, lambda: p.mmap("64K", addr=v.start)),
        (ValueError, lambda: p.mmap("64K", prot="rq")),
        (ValueError, lambda: p.mmap("64K", mthp=["8K"])),
        (ValueError, lambda: p.mmap("64K", mthp=["48K"])),
        (ValueError, lambda: p.madvise(v.start, 4096, "cold")),
        (ValueError, lambda: p.mprotect(v.start, v.length + 4096, "r")),
        (ValueError, lambda: sim.process(99).fork()),
        (ValueError, lambda: sim.page(sim.nr_pages + 5)),
        (pb.OutOfMemoryError, lambda: p.touch(huge.start, huge.length, write=True)),
        (TypeError, lambda: pb.parse_size(True)),
    ]
    for exc, fn in cases:
        with pytest.raises(exc):
            fn()
        assert pb.state_diff(before, sim.state()) == [], fn
    c = p.fork()
    c.exit()
    before = sim.state()
    for fn in (lambda: c.write(v.start), lambda: c.fork(), lambda: c.exit(), lambda: c.munmap(v.start, 4096)):
        with pytest.raises(ValueError, match="exited"):
            fn()
    assert pb.state_diff(before, sim.state()) == []


def test_access_faults() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    r = p.mmap("64K", "r")
    with pytest.raises(pb.AccessFault):
        p.write(r.start)
    n = p.mmap("64K", "none")
    with pytest.raises(pb.AccessFault):
        p.read(n.start)
    with pytest.raises(pb.AccessFault):
        p.pin(r.start, 4096, write=True)
    sim.check()


def test_unknown_arch_and_kernel() -> None:
    with pytest.raises(ValueError):
        pb.Simulation("vax", "6.18", "16M")
    with pytest.raises(ValueError):
        pb.Simulation("x86-64", "5.4", "16M")
    with pytest.raises(ValueError):
        pb.Simulation("x86-64", "6.18", "1000")
    with pytest.raises(ValueError):
        pb.Simulation("x86-64", "6.18", "16M", fragmentation={"4K": 0.5})


@pytest.mark.parametrize("arch", ["arm64-4k", "arm64-64k", "riscv64", "ppc64-64k", "s390x", "loongarch64"])
def test_other_architectures(arch: str) -> None:
    sim = pb.Simulation(arch, "6.18", "256M")
    p = sim.spawn()
    page = sim.page_size
    v = p.mmap(64 * page, mthp=[16 * page])
    p.touch(v.start, v.length, write=True)
    c = p.fork()
    assert sim.last_stats["batches"] == 4
    c.write(v.start)
    sim.check()


@pytest.mark.parametrize("event_fork", [False, True])
def test_uffd_wp_protect_fork_and_resolve(event_fork: bool) -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    v = p.mmap("64K", mthp=["16K"], uffd_wp=True, uffd_event_fork=event_fork)
    p.touch(v.start, v.length, write=True)
    assert sim.page(pfn(p, v.start))["order"] == 0, "userfaultfd-armed VMAs fault order 0"
    p.uffd_writeprotect(v.start, "32K")
    with pytest.raises(pb.AccessFault, match="uffd-wp"):
        p.write(v.page(1))
    p.read(v.page(1))
    assert pte(sim, p, v.page(1))["uffd_wp"] and not pte(sim, p, v.page(1))["write"]
    assert p.pagemap(v.page(1), 4096)[0] & np.uint64(1 << 57)
    c = p.fork()
    assert c.vmas()[0]["uffd_wp"] is event_fork
    assert pte(sim, c, v.page(1))["uffd_wp"] is event_fork, "the child keeps uffd-wp only with EVENT_FORK"
    c.exit()
    p.uffd_writeprotect(v.start, "32K", enable=False)
    before = pfn(p, v.page(1))
    p.write(v.page(1))
    assert pfn(p, v.page(1)) == before
    with pytest.raises(ValueError, match="not registered"):
        p.uffd_writeprotect(p.mmap("4K").start, 4096)
    sim.check()


def _cont(sim: pb.Simulation, p: pb.Process, v: pb.Mapping) -> list[bool]:
    L = pb.layout(sim.arch)
    return [bool(x) for x in L.pte_cont(p.ptes(v))]


def test_arm64_contpte_fold_fork_cow_and_zap() -> None:
    """arm64 v6.9+: 64K folios are mapped as contpte blocks; fork keeps whole blocks folded in
    parent and child; a COW write unfolds only the written block; 6.8 never folds."""
    sim = pb.Simulation("arm64-4k", "6.18", "64M")
    p = sim.spawn()
    v = p.mmap("256K", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    assert all(_cont(sim, p, v))
    c = p.fork()
    assert all(_cont(sim, p, v)) and all(_cont(sim, c, v))
    assert sim.last_stats["batches"] == 4
    c.write(v.page(3))
    cc = _cont(sim, c, v)
    assert not any(cc[:16]) and all(cc[16:]), "only the written block unfolds"
    assert all(_cont(sim, p, v))
    p.munmap(v.page(20), 4096)
    pc = _cont(sim, p, v)
    assert all(pc[:16]) and not any(pc[16:20]), "a partial munmap unfolds the cut block"
    sim.check()
    old = pb.Simulation("arm64-4k", "6.8", "64M")
    q = old.spawn()
    w = q.mmap("256K", mthp=["64K"])
    q.touch(w.start, w.length, write=True)
    assert not any(_cont(old, q, w))
    old.check()


def test_arm64_contpte_refolds_after_mprotect() -> None:
    for kernel in ("6.12", "6.18"):
        sim = pb.Simulation("arm64-4k", kernel, "64M")
        p = sim.spawn()
        v = p.mmap("128K", mthp=["64K"])
        p.touch(v.start, v.length, write=True)
        p.mprotect(v.start, v.length, "r")
        assert all(_cont(sim, p, v)), kernel
        p.mprotect(v.page(2), 4096, "rw")
        cont = _cont(sim, p, v)
        assert not any(cont[:16]) and all(cont[16:]), kernel
        p.mprotect(v.start, v.length, "rw")
        cont = _cont(sim, p, v)
        if kernel == "6.12":
            # Per entry: the commit of a block's last entry (set_pte_at) folds it again.
            assert all(cont), kernel
        else:
            # v6.17+ batches by equal write bit ([0,2), [2,3), [3,16)); set_ptes() of a part of a
            # block never folds, and the last entry is not a one-entry commit.
            assert not any(cont[:16]) and all(cont[16:]), kernel
        sim.check()

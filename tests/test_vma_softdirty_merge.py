"""VM_SOFTDIRTY and VMA merging: the kernel merges VMAs whatever their VM_SOFTDIRTY
(is_mergeable_vma()); a new mapping's merge sets it (__mmap_complete()); a merge of existing
VMAs by mprotect or madvise gives the merged VMA the changed VMA's flag up to 6.18 and keeps it
if any merged VMA had it from 6.19 (sticky VMA flags). Pagemap reports PM_SOFT_DIRTY for every
page of a VMA with VM_SOFTDIRTY. Both backends, and the running kernel where it can run."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys

import pytest

import ptebatch as pb

PAGE = 4096
PM_SOFT_DIRTY = 1 << 55
BASE = 0x7F00_0000_0000
BACKENDS = ["rust", "reference"]
STICKY = {"6.8": False, "6.18": False, "6.19": True, "7.0": True}


def _state(p: pb.Process, pages: int) -> dict:
    """The VMAs of [BASE, BASE + pages) as (page offset, length, VM_SOFTDIRTY), and the
    PM_SOFT_DIRTY bit of each page."""
    end = BASE + pages * PAGE
    vmas = [((v["start"] - BASE) // PAGE, (v["end"] - v["start"]) // PAGE, v["vm_softdirty"])
            for v in p.vmas() if v["start"] < end and v["end"] > BASE]
    bits = [bool(int(e) & PM_SOFT_DIRTY) for e in p.pagemap(BASE, pages * PAGE)]
    return {"vmas": vmas, "softdirty": bits}


def scenario(p, remerge: str) -> list[dict]:
    """Maps A (4 pages, written), clears soft-dirty, maps B right after A (the two merge),
    clears soft-dirty again, changes B alone (mprotect "r" or MADV_DONTFORK: a split), maps C
    right after B, then changes B back, which merges A, B and C. ``p`` has mmap(addr, pages,
    prot), touch, clear_soft_dirty, mprotect, madvise and state(pages): the simulation's
    process or the live one. Returns the state after each step."""
    out = []
    p.mmap(BASE, 4, "rw")
    p.touch(BASE, 4)
    p.clear_soft_dirty()
    out.append(p.state(4))
    p.mmap(BASE + 4 * PAGE, 4, "rw")
    out.append(p.state(8))
    p.clear_soft_dirty()
    if remerge == "mprotect":
        p.mprotect(BASE + 4 * PAGE, 4, "r")
    else:
        p.madvise(BASE + 4 * PAGE, 4, "dontfork")
    p.mmap(BASE + 8 * PAGE, 4, "rw")
    out.append(p.state(12))
    if remerge == "mprotect":
        p.mprotect(BASE + 4 * PAGE, 4, "rw")
    else:
        p.madvise(BASE + 4 * PAGE, 4, "dofork")
    out.append(p.state(12))
    return out


def expected(sticky: bool) -> list[dict]:
    clear, dirty = [False] * 4, [True] * 4
    return [
        {"vmas": [(0, 4, False)], "softdirty": clear},
        # The new mapping merged into A, and the merged VMA has VM_SOFTDIRTY: A's pages too.
        {"vmas": [(0, 8, True)], "softdirty": dirty * 2},
        # B was split off A clear; C is new.
        {"vmas": [(0, 4, False), (4, 4, False), (8, 4, True)], "softdirty": clear * 2 + dirty},
        # B, changed back, merges with A and C: up to 6.18 the merged VMA takes B's clear
        # flag (C's soft-dirty state is lost), from 6.19 it keeps C's.
        {"vmas": [(0, 12, sticky)], "softdirty": [sticky] * 12},
    ]


class SimProcess:
    def __init__(self, kernel: str, backend: str):
        self.p = pb.Simulation("x86-64", kernel, "16M", backend=backend).spawn()

    def mmap(self, addr: int, pages: int, prot: str) -> None:
        self.p.mmap(pages * PAGE, prot, addr=addr)

    def touch(self, addr: int, pages: int) -> None:
        self.p.touch(addr, pages * PAGE, write=True)

    def clear_soft_dirty(self) -> None:
        self.p.clear_soft_dirty()

    def mprotect(self, addr: int, pages: int, prot: str) -> None:
        self.p.mprotect(addr, pages * PAGE, prot)

    def madvise(self, addr: int, pages: int, advice: str) -> None:
        self.p.madvise(addr, pages * PAGE, advice)

    def state(self, pages: int) -> dict:
        return _state(self.p, pages)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kernel", list(STICKY))
@pytest.mark.parametrize("remerge", ["mprotect", "madvise"])
def test_merge_and_softdirty(kernel: str, backend: str, remerge: str) -> None:
    assert scenario(SimProcess(kernel, backend), remerge) == expected(STICKY[kernel])


@pytest.mark.parametrize("backend", BACKENDS)
def test_changed_vma_with_softdirty_keeps_it_in_every_version(backend: str) -> None:
    """The mirror case: the changed VMA has VM_SOFTDIRTY, its clear neighbour merges into it."""
    for kernel in STICKY:
        p = SimProcess(kernel, backend)
        p.mmap(BASE, 4, "rw")
        p.touch(BASE, 4)
        p.clear_soft_dirty()
        p.mmap(BASE + 4 * PAGE, 4, "r")  # apart from A by its protection; VM_SOFTDIRTY set
        p.mprotect(BASE + 4 * PAGE, 4, "rw")
        assert p.state(8) == {"vmas": [(0, 8, True)], "softdirty": [True] * 8}, kernel


def test_unchanged_vmas_apart_only_by_softdirty_stay_apart() -> None:
    """mprotect to the protection they already have starts no merge (mprotect_fixup() returns
    early), so two VMAs that differ only in VM_SOFTDIRTY stay two; a VMA split by a no-op
    change re-merges (the reference's Mm, as rust/src/mm.rs tests the Rust one)."""
    from ptebatch.reference.sim.kernel import KernelProfile
    from ptebatch.reference.sim.mm import Mm, Prot, Vma

    def vma(start: int, n: int, softdirty: bool) -> Vma:
        return Vma(start=start, ptes=[0] * n, prot=Prot(True, True), shared=False, file=None, pgoff=0,
                   vm_softdirty=softdirty, uffd_wp=False, uffd_event_fork=False, dontfork=False,
                   wipeonfork=False, anon_vma=0, mthp=0)

    def rw(v: Vma) -> None:
        v.prot = Prot(True, True)

    p = KernelProfile.parse("6.18")
    m = Mm(pid=1, mm_id=1, vmas=[vma(0, 4, False), vma(4, 4, True)], rss=[0, 0, 0], has_pinned=False,
           exited=False, next_vpn=0)
    m.modify(p, 0, 8, rw)
    assert [(v.start, v.end(), v.vm_softdirty) for v in m.vmas] == [(0, 4, False), (4, 8, True)]
    m.vmas = [vma(0, 12, False)]
    m.modify(p, 4, 8, rw)
    assert [(v.start, v.end(), v.vm_softdirty) for v in m.vmas] == [(0, 12, False)]


# ---- the running kernel ------------------------------------------------------------------

LIVE_SCRIPT = r"""
import ctypes, json, mmap, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
PAGE, PM_SOFT_DIRTY = 4096, 1 << 55
PROT = {"none": 0, "r": 1, "rw": 3}
MAP_FIXED_NOREPLACE = 0x100000

def check(ok, what):
    if not ok:
        raise OSError(ctypes.get_errno(), what)

# PROT_NONE guards on both sides keep other mappings from merging in.
guard = libc.mmap(None, 16 * PAGE, 0, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
check(guard not in (None, ctypes.c_void_p(-1).value), "mmap guard")
base = guard + 2 * PAGE
# A fresh mapping has VM_SOFTDIRTY ("sd") only where the kernel has CONFIG_MEM_SOFT_DIRTY.
flags = open("/proc/self/smaps").read().split("%x-" % guard, 1)[1].split("VmFlags:", 1)[1].split("\n", 1)[0]
has_soft_dirty = "sd" in flags.split()
check(libc.munmap(ctypes.c_void_p(base), 12 * PAGE) == 0, "munmap")

def state(pages):
    vmas = []
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and len(head) >= 5 and ":" not in head[0]:
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            cur = [lo, hi]
            if lo < base + pages * PAGE and hi > base:
                vmas.append(cur)
        elif line.startswith("VmFlags:") and vmas and vmas[-1] is cur:
            cur.append("sd" in line.split()[1:])
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(base // PAGE * 8)
        raw = f.read(pages * 8)
    bits = [bool(int.from_bytes(raw[i:i + 8], "little") & PM_SOFT_DIRTY) for i in range(0, len(raw), 8)]
    return {"vmas": [((lo - base) // PAGE, (hi - lo) // PAGE, sd) for lo, hi, sd in vmas], "softdirty": bits}

out = []
def clear():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("4")
def mm(off, pages, prot):
    got = libc.mmap(ctypes.c_void_p(base + off * PAGE), pages * PAGE, PROT[prot],
                    mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
    check(got == base + off * PAGE, "mmap")
def mp(off, pages, prot):
    check(libc.mprotect(ctypes.c_void_p(base + off * PAGE), pages * PAGE, PROT[prot]) == 0, "mprotect")
def ma(off, pages, advice):
    check(libc.madvise(ctypes.c_void_p(base + off * PAGE), pages * PAGE, advice) == 0, "madvise")

remerge = sys.argv[1]
mm(0, 4, "rw")
ctypes.memset(base, 1, 4 * PAGE)
clear()
out.append(state(4))
mm(4, 4, "rw")
out.append(state(8))
clear()
if remerge == "mprotect":
    mp(4, 4, "r")
else:
    ma(4, 4, 10)  # MADV_DONTFORK
mm(8, 4, "rw")
out.append(state(12))
if remerge == "mprotect":
    mp(4, 4, "rw")
else:
    ma(4, 4, 11)  # MADV_DOFORK
out.append(state(12))
print(json.dumps({"has_soft_dirty": has_soft_dirty, "steps": out}))
"""


def _live_kernel() -> tuple[str | None, str]:
    """The modelled kernel whose VMA merge rules the running kernel follows, or None and why not."""
    if os.environ.get("PTEBATCH_SKIP_LIVE"):
        return None, "PTEBATCH_SKIP_LIVE is set"
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return None, "needs Linux on x86-64 (soft-dirty PTE bits)"
    if not (os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/pagemap")):
        return None, "no /proc/self/clear_refs or pagemap"
    release = platform.release()
    try:
        kernel = pb.kernel_from_release(release)
    except ValueError as e:
        return None, str(e)
    # 6.18.37 took the sticky VMA flags series ("mm: propagate VM_SOFTDIRTY on merge") from
    # 6.19 as a stable backport; stable releases are not modelled, so compare with 6.19.
    sub = release.split("-", 1)[0].split(".")
    if kernel == "6.18" and len(sub) > 2 and sub[2].isdigit() and int(sub[2]) >= 37:
        kernel = "6.19"
    return kernel, ""


@functools.lru_cache(maxsize=None)
def _live_run(remerge: str) -> tuple[bool, list[dict]]:
    run = subprocess.run([sys.executable, "-c", LIVE_SCRIPT, remerge], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    steps = [{"vmas": [tuple(v) for v in s["vmas"]], "softdirty": s["softdirty"]} for s in out["steps"]]
    return out["has_soft_dirty"], steps


@pytest.mark.parametrize("remerge", ["mprotect", "madvise"])
def test_live_kernel_merges_alike(remerge: str) -> None:
    """The VMA boundaries after each step match the kernel's, with or without soft-dirty
    support (the old model kept the two mappings of step 2 apart)."""
    kernel, why = _live_kernel()
    if kernel is None:
        pytest.skip(f"live-kernel test: {why}")
    _, live = _live_run(remerge)
    sim = scenario(SimProcess(kernel, "rust"), remerge)
    assert [[v[:2] for v in s["vmas"]] for s in live] == [[v[:2] for v in s["vmas"]] for s in sim]


@pytest.mark.parametrize("remerge", ["mprotect", "madvise"])
def test_live_kernel_softdirty_agrees(remerge: str) -> None:
    """VM_SOFTDIRTY (smaps "sd") and pagemap's PM_SOFT_DIRTY after each step match the kernel's."""
    kernel, why = _live_kernel()
    if kernel is None:
        pytest.skip(f"live-kernel test: {why}")
    has_soft_dirty, live = _live_run(remerge)
    if not has_soft_dirty:
        pytest.skip("live-kernel test: the running kernel has no CONFIG_MEM_SOFT_DIRTY")
    assert live == scenario(SimProcess(kernel, "rust"), remerge)


# ---- random sequences: the Rust path against the reference --------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

WINDOW = 8  # pages
# Spans on a 2-page grid, so that mappings abut and merge often.
_span = st.tuples(st.sampled_from(range(0, WINDOW, 2)), st.sampled_from([2, 4]))
OPS = st.one_of(
    st.tuples(st.just("mmap"), _span, st.sampled_from(["rw", "r"])),
    st.tuples(st.just("munmap"), _span),
    st.tuples(st.just("mprotect"), _span, st.sampled_from(["rw", "r"])),
    st.tuples(st.just("madvise"), _span, st.sampled_from(["dontfork", "dofork", "hugepage", "nohugepage"])),
    st.tuples(st.just("touch"), _span, st.booleans()),
    st.tuples(st.just("clear_soft_dirty"),),
)


def _apply(p: pb.Process, op: tuple) -> object:
    """Runs ``op``; returns the exception type it raised, or None."""
    try:
        if op[0] == "clear_soft_dirty":
            p.clear_soft_dirty()
            return None
        (off, n), arg = op[1], op[2] if len(op) > 2 else None
        addr, length = BASE + off * PAGE, n * PAGE
        if op[0] == "mmap":
            p.mmap(length, arg, addr=addr)
        elif op[0] == "munmap":
            p.munmap(addr, length)
        elif op[0] == "mprotect":
            p.mprotect(addr, length, arg)
        elif op[0] == "madvise":
            p.madvise(addr, length, arg)
        else:
            p.touch(addr, length, write=arg)
    except (ValueError, pb.AccessFault) as e:
        return type(e)
    return None


SLOTS = WINDOW // 2
# The window mapped two pages at a time in any order, each mapping in either protection,
# written or not, after a soft-dirty clear or not: abutting VMAs of every mix.
LAYOUT = st.tuples(st.permutations(range(SLOTS)),
                   st.lists(st.tuples(st.sampled_from(["rw", "r"]), st.booleans(), st.booleans()),
                            min_size=SLOTS, max_size=SLOTS))


@settings(max_examples=150, deadline=None)
@given(kernel=st.sampled_from(["6.18", "6.19"]), layout=LAYOUT, ops=st.lists(OPS, min_size=1, max_size=8))
def test_rust_and_reference_merge_alike(kernel: str, layout: tuple, ops: list) -> None:
    """Abutting mappings, soft-dirty clears, mprotect and madvise in any order: the two backends
    keep the same VMAs (with VM_SOFTDIRTY) and report the same pagemap soft-dirty bits."""
    rust = pb.Simulation("x86-64", kernel, "16M").spawn()
    ref = pb.Simulation("x86-64", kernel, "16M", backend="reference").spawn()
    order, slots = layout
    steps = []
    for i in order:
        prot, clear, write = slots[i]
        steps += [("clear_soft_dirty",)] * clear + [("mmap", (2 * i, 2), prot)]
        steps += [("touch", (2 * i, 2), True)] * (write and prot == "rw")
    for op in steps + ops:
        assert _apply(rust, op) == _apply(ref, op), op
        assert rust.vmas() == ref.vmas(), op
        bits = [[bool(int(e) & PM_SOFT_DIRTY) for e in p.pagemap(BASE, WINDOW * PAGE)] for p in (rust, ref)]
        assert bits[0] == bits[1], op

"""Against the running kernel: capture, replay, thpmaps and the oracle. These need root and the
/proc and sysfs files; where they are missing, or PTEBATCH_SKIP_LIVE is set, the tests skip and
say why."""

from __future__ import annotations

import ctypes
import mmap
import os
import subprocess
import sys

import numpy as np
import pytest

import ptebatch as pb
from ptebatch import capture as cap
from ptebatch import oracle
from ptebatch.thpmaps import vma_stats

WHY = "PTEBATCH_SKIP_LIVE is set" if os.environ.get("PTEBATCH_SKIP_LIVE") else oracle.missing_requirements()
live = pytest.mark.skipif(WHY is not None, reason=f"live-kernel test: {WHY}")
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _region(size: int, align: int) -> tuple[mmap.mmap, int, int]:
    m = mmap.mmap(-1, size + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(m))
    off = (-base) % align
    libc.madvise(base + off, size, 14)  # MADV_HUGEPAGE
    for i in range(0, size, 4096):
        m[off + i] = 1  # store only: a load first would map the zero page
    return m, off, base + off


@live
@pytest.mark.parametrize("size", ["4K", "16K", "64K", "128K", "2M"])
def test_kernel_oracle(size: str) -> None:
    """The model agrees with the running kernel on every page after every scripted step."""
    n = pb.parse_size(size)
    r = oracle.run_retrying(n)
    print(f"\noracle {size} under {r.kernel}: {r.pages} pages compared, {r.mismatches} mismatches, "
          f"{r.attempts} run(s); folios seen {r.folio_pages} pages")
    assert r.folio_pages == [n // 4096], "the kernel did not use the requested folio size"
    assert r.mismatches == 0, [m for s in r.steps for m in s.mismatches][:20]


@live
def test_thp_controls_are_restored() -> None:
    def read_all() -> dict[str, str]:
        out = {}
        for p in oracle._size_dirs().values():
            with open(p) as f:
                out[p] = f.read()
        return out

    before = read_all()
    with pytest.raises(RuntimeError):
        with oracle.thp_only(64 << 10):
            assert "[always]" in open_read(f"{oracle.THP}/hugepages-64kB/enabled")
            raise RuntimeError("boom")
    assert read_all() == before


def open_read(path: str) -> str:
    with open(path) as f:
        return f.read()


@live
def test_thpmaps_agrees_with_smaps_anonhugepages() -> None:
    with oracle.thp_only(2 << 20):
        m, off, a = _region(8 << 20, 2 << 20)
        snap = cap.capture(os.getpid(), ranges=[(a, a + (8 << 20))])
        vma = next(v for v in cap.read_vmas(os.getpid()) if v["start"] <= a < v["end"])
        st = vma_stats(snap, 0)
        assert vma["AnonHugePages"] == 8192
        assert st["anon-thp-pmd-aligned-2048kB"] == vma["AnonHugePages"]
        # PTE-map one of them: smaps no longer counts it, the PTE counters do.
        libc.mprotect(a, 4096, mmap.PROT_READ)
        libc.mprotect(a, 4096, mmap.PROT_READ | mmap.PROT_WRITE)
        snap = cap.capture(os.getpid(), ranges=[(a, a + (8 << 20))])
        vma = next(v for v in cap.read_vmas(os.getpid()) if v["start"] <= a < v["end"])
        st = vma_stats(snap, 0)
        assert st["anon-thp-pmd-aligned-2048kB"] == vma["AnonHugePages"] == 6144
        assert st["anon-thp-pte-aligned-2048kB"] == 2048
        m.close()


@live
def test_capture_and_replay_of_a_live_process() -> None:
    with oracle.thp_only(64 << 10):
        m, off, a = _region(1 << 20, 64 << 10)
        snap = cap.capture(os.getpid(), ranges=[(a, a + (1 << 20))])
    heads, lens = snap.folio_of(snap.vma_pages(0) & np.uint64((1 << 55) - 1))
    assert set(lens.tolist()) == {16}
    sim, procs = pb.Simulation.from_snapshot(snap)
    p = procs[os.getpid()]
    got = p.pagemap(a, 1 << 20) & np.uint64((1 << 55) - 1)
    assert np.array_equal(got, snap.vma_pages(0) & np.uint64((1 << 55) - 1)), "folios keep their pfns"
    assert sim.page(int(got[0]))["order"] == 4
    c = p.fork()
    assert sim.last_stats["batches"] == 16
    sim.check()
    m.close()


@live
def test_capture_errors() -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    with pytest.raises(pb.CaptureError, match="does not exist|exited"):
        cap.capture(gone.pid)
    with pytest.raises(pb.CaptureError, match="does not exist"):
        cap._open("/proc/no-such-file-kpageflags")


def test_capture_without_root(monkeypatch) -> None:
    """kpageflags unreadable (not root): CaptureError says so."""
    real_open = os.open

    def deny(path, *a, **kw):
        if str(path).startswith("/proc/kpage"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *a, **kw)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(pb.CaptureError, match="root"):
        cap.capture(os.getpid())


def test_capture_reports_hidden_pfns(monkeypatch) -> None:
    """A pagemap whose present entries all read pfn 0 (no CAP_SYS_ADMIN) is refused."""
    monkeypatch.setattr(cap, "_open", lambda path, pid=None: os.open("/dev/null", os.O_RDONLY))
    monkeypatch.setattr(cap, "read_vmas", lambda pid: [dict(start=0x1000, end=0x3000, read=True, write=True,
                                                             exec=False, shared=False, offset=0, inode=0, name="",
                                                             file=False, AnonHugePages=0, THPeligible=0)])
    monkeypatch.setattr(cap, "_pread_u64", lambda fd, first, count, path, pid=None:
                        np.full(count, 1 << 63, dtype=np.uint64))
    monkeypatch.setattr(os.path, "exists", lambda p: True)
    with pytest.raises(pb.CaptureError, match="hidden"):
        cap.capture(os.getpid())  # a live pid: capture checks /proc/<pid>/stat before and after

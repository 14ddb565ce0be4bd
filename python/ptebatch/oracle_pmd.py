"""The running kernel as oracle for PMD-mapped THP (docs/simulation.md, "PMD-mapped THP").

Each scenario has the worker (``ptebatch._oracle_worker``) map an aligned region with only
PMD-sized anonymous THPs enabled (``oracle.thp_only``: the sysfs controls are set for the run
and always restored, under ``oracle.thp_lock``), write every page so that each 2M range faults
in one PMD-mapped THP, then fork and run a scripted sequence. The simulation starts from the
pre-fork capture replayed with its huge PMDs (``replay.pmd_mappings``), runs the same steps
under the running kernel's profile, and after each step is compared with the kernel page by
page (``oracle._compare``: present, mapcount, exclusive bit, moved pfn, folio size of new
pages, partially mapped folios), plus the THP flag of every page (kpageflags) and each
process's smaps AnonHugePages (which PMDs are still PMD-mapped).

``SCENARIOS`` maps a name to a callable returning the compared steps
(``list[oracle.StepResult]``).
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Callable

import numpy as np

from .capture import capture
from .oracle import StepResult, Worker, _compare, _only, _view, thp_only
from .snapshot import PM_PFN_MASK, Snapshot

KPF_THP = 1 << 22

#: (label, worker command) steps; commands: ("fork",), ("cwrite", page), ("pwrite", page),
#: ("cexit",), ("munmap", page, pages), ("dontneed", page, pages), ("mprotect", page, pages, prot).
Script = list[tuple[str, tuple]]


def _scripts(n: int) -> dict[str, Script]:
    """The scenarios for PMDs of ``n`` pages (two PMDs: pages 0 … 2n-1)."""
    mid = n // 2
    return {
        "pmd-fork-child-write-exit": [
            ("fork", ("fork",)),
            ("child writes a page of PMD 0 (splits the child's PMD)", ("cwrite", mid)),
            ("parent writes a page of PMD 0 (splits the parent's PMD)", ("pwrite", mid + 1)),
            ("parent writes a page of PMD 1 (splits it, the child's stays)", ("pwrite", n + 3)),
            ("child exits", ("cexit",)),
            ("parent writes another page of PMD 0", ("pwrite", mid + 2)),
        ],
        "pmd-partial-munmap-dontneed": [
            ("munmap of part of PMD 1 (split, deferred split)", ("munmap", n + n // 4, n // 4)),
            ("MADV_DONTNEED of all of PMD 0 (zap_huge_pmd)", ("dontneed", 0, n)),
            ("fork", ("fork",)),
            ("child writes a page of the split PMD 1", ("cwrite", n + 1)),
            ("child exits", ("cexit",)),
        ],
        "pmd-mprotect-split": [
            ("mprotect of one page of PMD 0 read-only (split)", ("mprotect", 7, 1, "r")),
            ("mprotect of all of PMD 1 read-only (stays a PMD)", ("mprotect", n, n, "r")),
            ("fork", ("fork",)),
            ("mprotect of all of PMD 1 back to rw", ("mprotect", n, n, "rw")),
            ("parent writes a page of PMD 1 (splits it)", ("pwrite", n + 9)),
            ("child writes a page of PMD 0", ("cwrite", 3)),
            ("child exits", ("cexit",)),
        ],
    }


def _huge_kb(snap: Snapshot, pid: int) -> int:
    a = snap.arrays
    return int(a["vma_anon_huge_kb"][a["vma_pid"] == pid].sum())


def _extra(res: StepResult, snap: Snapshot, sim, live, addr: int, npages: int) -> None:
    """The THP flag of every present page, and each process's AnonHugePages."""
    page = snap.page_size
    for kpid, proc in live:
        one = snap.__class__(dict(snap.header, pids=[kpid]), _only(snap, kpid), [])
        kpres, kpfn, _, _ = _view(one, addr, npages)
        pm = proc.pagemap(addr, npages * page)
        spfn = pm & np.uint64(PM_PFN_MASK)
        if kpres.any():
            kflags, _ = snap.frame_info(kpfn[kpres])
            for j, kf, sp in zip(np.flatnonzero(kpres), kflags, spfn[kpres]):
                kthp, sthp = bool(int(kf) & KPF_THP), bool(sim.kpageflags(int(sp)) & KPF_THP)
                if kthp != sthp:
                    res.mismatches.append(f"pid {kpid} page {j}: THP flag kernel={kthp} sim={sthp}")
        khuge = _huge_kb(snap, kpid)
        shuge = sum(v["anon_huge_pages"] for v in proc.vmas()) // 1024
        if khuge != shuge:
            res.mismatches.append(f"pid {kpid}: AnonHugePages kernel={khuge} kB sim={shuge} kB")


def run(name: str, *, kernel: str | None = None) -> list[StepResult]:
    """Runs scenario ``name`` against the live kernel and the model; the compared steps."""
    from . import kernel_from_release
    from .capture import _pmd_pages
    from .simulation import Simulation

    page = os.sysconf("SC_PAGE_SIZE")
    n = _pmd_pages(page)
    size = n * page
    region = 2 * size
    npages = region // page
    script = _scripts(n)[name]
    kernel = kernel or kernel_from_release(platform.release())
    with thp_only(size):
        w = Worker()
        try:
            pid_s, addr_s = w("setup", region, size, 0)
            ppid, addr = int(pid_s), int(addr_s)
            rng = [(addr, addr + region)]
            pre = capture(ppid, ranges=rng)
            sim, procs = Simulation.from_snapshot(pre, kernel)
            sp = procs[ppid]
            first = StepResult("after the first write of every page")
            _extra(first, pre, sim, [(ppid, sp)], addr, npages)
            if _huge_kb(pre, ppid) != region // 1024:
                first.mismatches.append(f"the kernel mapped {_huge_kb(pre, ppid)} kB of the region by PMD, "
                                        f"not all {region // 1024} kB (THP allocation fell back)")
            first.pages = npages
            kprev = {ppid: _view(pre, addr, npages)[1]}
            sprev = {ppid: sp.pagemap(addr, region) & np.uint64(PM_PFN_MASK)}
            child: tuple[int, object] | None = None
            steps = [first]
            for label, cmd in script:
                op = cmd[0]
                if op == "fork":
                    cpid = int(w("fork")[0])
                    child = (cpid, sp.fork())
                    kprev[cpid] = kprev[ppid].copy()
                    sprev[cpid] = sprev[ppid].copy()
                else:
                    w(*cmd)
                    a = addr + int(cmd[1]) * page if len(cmd) > 1 else addr
                    if op == "cwrite":
                        child[1].write(a)  # type: ignore[index, union-attr]
                    elif op == "pwrite":
                        sp.write(a)
                    elif op == "cexit":
                        child[1].exit()  # type: ignore[index, union-attr]
                        child = None
                    elif op == "munmap":
                        sp.munmap(a, int(cmd[2]) * page)
                    elif op == "dontneed":
                        sp.madvise(a, int(cmd[2]) * page, "dontneed")
                    elif op == "mprotect":
                        sp.mprotect(a, int(cmd[2]) * page, cmd[3])
                live = [(ppid, sp)] + ([child] if child else [])  # type: ignore[list-item]
                snap = capture([p for p, _ in live], ranges=rng)
                res = _compare(label, snap, sim, live, addr, npages, kprev, sprev)
                _extra(res, snap, sim, live, addr, npages)
                steps.append(res)
            return steps
        finally:
            w.close()


def run_retrying(name: str, attempts: int = 3, **kw) -> list[StepResult]:
    """``run``, repeated while it finds mismatches (DAMON's transient references, see
    ``oracle.run_retrying``; a fragmented machine's THP allocation fallback)."""
    steps: list[StepResult] = []
    for _ in range(attempts):
        steps = run(name, **kw)
        if not any(s.mismatches for s in steps):
            break
    return steps


SCENARIOS: dict[str, Callable[[], list[StepResult]]] = {name: functools.partial(run_retrying, name)
                                                       for name in _scripts(512)}

__all__ = ["SCENARIOS", "run", "run_retrying"]

"""The running kernel as oracle for PMD-mapped THP (docs/simulation.md, "PMD-mapped THP").

Each scenario has the worker (``ptebatch._oracle_worker``) map an aligned region with only
PMD-sized anonymous THPs enabled (``oracle.thp_only``: the sysfs controls are set for the run
and always restored, under ``oracle.thp_lock``), write every page so that each 2M range faults
in one PMD-mapped THP, then fork and run a scripted sequence. The simulation starts from the
pre-fork capture replayed with its huge PMDs (``replay.pmd_mappings``), runs the same steps
under the running kernel's profile, and after each step is compared with the kernel page by
page (the facts of ``oracle._compare``: present, mapcount, exclusive bit, moved pfn, folio size
of new pages, partially mapped folios), plus the THP flag of every page (kpageflags; for the
zero page, that both map it: the model shows one zero pfn for the huge zero page) and each
process's smaps AnonHugePages (which PMDs are still PMD-mapped). The scenarios: fork, child
write and exit; partial munmap and MADV_DONTNEED; the huge zero page (read faults, then
writes); mprotect of part of a PMD (split) and of a whole one (kept).

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
from .oracle import StepResult, Worker, _only, _view, thp_only
from .snapshot import PM_PFN_MASK, Snapshot

KPF_THP, KPF_ZERO_PAGE = 1 << 22, 1 << 24
#: The "pfn" of a page that is not present, so that a page faulted in at pfn 0 (the model's
#: allocator may use it, the kernel's does not) does not count as having kept its pfn.
ABSENT = np.uint64((1 << 64) - 1)

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
            ("parent writes a page of PMD 0 (a new PMD)", ("pwrite", 3)),
            ("fork", ("fork",)),
            ("child writes a page of the split PMD 1", ("cwrite", n + 1)),
            ("child exits", ("cexit",)),
        ],
        "pmd-huge-zero-page": [
            ("parent writes a page of huge zero PMD 0 (a new PMD THP from v6.13)", ("pwrite", mid)),
            ("fork (the child copies the huge zero PMD)", ("fork",)),
            ("child writes a page of huge zero PMD 1", ("cwrite", n + 5)),
            ("parent writes a page of its THP (split, copy)", ("pwrite", mid + 1)),
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
            ("MADV_DONTNEED of all of the split PMD 0 (its empty page table is freed)", ("dontneed", 0, n)),
            ("parent writes a page of PMD 0 (a PMD fault again)", ("pwrite", 4)),
        ],
    }


def _huge_kb(snap: Snapshot, pid: int) -> int:
    a = snap.arrays
    return int(a["vma_anon_huge_kb"][a["vma_pid"] == pid].sum())


def _compare(label: str, snap: Snapshot, sim, live, addr: int, npages: int, kprev: dict, sprev: dict) -> StepResult:
    """``oracle._compare``'s page facts (present, mapcount, exclusive bit, kept pfn, folio size
    of a new page, partially mapped folios), with the partially-mapped test run on each side's
    own folio: a new THP has a different pfn in the kernel and in the model, and a page keeps its
    pfn only if it was present before."""
    res = StepResult(label)
    page = snap.page_size
    folio_state: dict[int, tuple[bool, bool]] = {}
    for kpid, proc in live:
        one = snap.__class__(dict(snap.header, pids=[kpid]), _only(snap, kpid), [])
        kpres, kpfn, kexcl, kcount = _view(one, addr, npages)
        pm = proc.pagemap(addr, npages * page)
        spres = (pm & np.uint64(1 << 63)) != 0
        spfn = np.where(spres, pm & np.uint64(PM_PFN_MASK), 0)
        sexcl = (pm & np.uint64(1 << 56)) != 0
        kpfn = np.where(kpres, kpfn, ABSENT)
        spfn_now = np.where(spres, spfn, ABSENT)
        for j in range(npages):
            res.pages += 1
            where = f"pid {kpid} page {j}"
            if kpres[j] != spres[j]:
                res.mismatches.append(f"{where}: present kernel={kpres[j]} sim={spres[j]}")
                continue
            if not kpres[j]:
                continue
            scount = sim.kpagecount(int(spfn[j]))
            if kcount[j] != scount:
                res.mismatches.append(f"{where}: mapcount kernel={kcount[j]} sim={scount}")
            if kexcl[j] != sexcl[j]:
                res.mismatches.append(f"{where}: exclusive kernel={kexcl[j]} sim={sexcl[j]}")
            kkept, skept = kpfn[j] == kprev[kpid][j], spfn_now[j] == sprev[kpid][j]
            if kkept != skept:
                res.mismatches.append(f"{where}: kept its pfn kernel={kkept} sim={skept}")
            elif not kkept:
                _, klen = snap.folio_of(np.array([kpfn[j]], dtype=np.uint64))
                sorder = sim.page(int(spfn[j]))["order"]
                if int(klen[0]) != 1 << sorder:
                    res.mismatches.append(f"{where}: new folio pages kernel={int(klen[0])} sim={1 << sorder}")
            if int(spfn[j]) == sim.zero_pfn:
                continue
            heads, lens = snap.folio_of(np.array([kpfn[j]], dtype=np.uint64))
            h, ln = int(heads[0]), int(lens[0])
            if ln > 1 and h not in folio_state:
                _, kc = snap.frame_info(np.arange(h, h + ln, dtype=np.uint64))
                sh = sim.page(int(spfn[j]))["folio"]
                sc = [sim.kpagecount(x) for x in range(sh, sh + ln)]
                folio_state[h] = (bool(np.any(kc == 0)), 0 in sc)
        kprev[kpid] = kpfn
        sprev[kpid] = spfn_now
    for h, (kp, sp_) in folio_state.items():
        if kp != sp_:
            res.mismatches.append(f"folio {h:#x}: partially mapped kernel={kp} sim={sp_}")
    return res


def _extra(res: StepResult, snap: Snapshot, sim, live, addr: int, npages: int) -> None:
    """The THP flag of every present page (the zero page: that both map it), and each
    process's AnonHugePages."""
    page = snap.page_size
    for kpid, proc in live:
        one = snap.__class__(dict(snap.header, pids=[kpid]), _only(snap, kpid), [])
        kpres, kpfn, _, _ = _view(one, addr, npages)
        pm = proc.pagemap(addr, npages * page)
        spfn = pm & np.uint64(PM_PFN_MASK)
        if kpres.any():
            kflags, _ = snap.frame_info(kpfn[kpres])
            for j, kf, sp in zip(np.flatnonzero(kpres), kflags, spfn[kpres]):
                kzero, szero = bool(int(kf) & KPF_ZERO_PAGE), int(sp) == sim.zero_pfn
                if kzero or szero:
                    if kzero != szero:
                        res.mismatches.append(f"pid {kpid} page {j}: zero page kernel={kzero} sim={szero}")
                    continue
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
            zero = name == "pmd-huge-zero-page"
            pid_s, addr_s = w("zsetup", region, size) if zero else w("setup", region, size, 0)
            ppid, addr = int(pid_s), int(addr_s)
            rng = [(addr, addr + region)]
            pre = capture(ppid, ranges=rng)
            sim, procs = Simulation.from_snapshot(pre, kernel)
            sp = procs[ppid]
            first = StepResult("after the first read of every page" if zero else "after the first write of every page")
            _extra(first, pre, sim, [(ppid, sp)], addr, npages)
            if len(sp.pmds(addr)) != 2:
                first.mismatches.append(f"the kernel mapped {len(sp.pmds(addr))} of the 2 PMDs "
                                        "(THP allocation fell back)")
            if not zero and _huge_kb(pre, ppid) != region // 1024:
                first.mismatches.append(f"the kernel mapped {_huge_kb(pre, ppid)} kB of the region by PMD, "
                                        f"not all {region // 1024} kB (THP allocation fell back)")
            first.pages = npages
            kpres0, kpfn0, _, _ = _view(pre, addr, npages)
            spm0 = sp.pagemap(addr, region)
            kprev = {ppid: np.where(kpres0, kpfn0, ABSENT)}
            sprev = {ppid: np.where((spm0 & np.uint64(1 << 63)) != 0, spm0 & np.uint64(PM_PFN_MASK), ABSENT)}
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

"""The running kernel as a test oracle.

A worker process (``ptebatch._oracle_worker``) maps anonymous memory with one folio size
enabled (the sysfs mTHP controls are set for the run and always restored), writes it, forks a
child that waits on a pipe, and performs a scripted sequence of writes, an exit, a partial
munmap and a MADV_DONTNEED. After each step both processes are captured from /proc. The
simulation starts from the pre-fork capture (folios at their real pfns), runs the same steps
under the running kernel's profile, and is compared with the kernel page by page: mapcount
(kpagecount), the exclusively-mapped bit, whether the page kept its pfn, the folio order of
new pages, and which folios are partially mapped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from ._core import CaptureError
from .capture import capture
from .snapshot import PM_MMAP_EXCLUSIVE, PM_PFN_MASK, PM_PRESENT, Snapshot

THP = "/sys/kernel/mm/transparent_hugepage"


def missing_requirements() -> str | None:
    """Why the oracle cannot run here, or None."""
    if platform.system() != "Linux":
        return "not Linux"
    if os.geteuid() != 0:
        return "not root: /proc/kpageflags and real PFNs need CAP_SYS_ADMIN"
    for p in ("/proc/kpageflags", "/proc/kpagecount", "/proc/self/pagemap"):
        if not os.path.exists(p):
            return f"{p} does not exist on this kernel"
    if not os.path.exists(f"{THP}/hugepages-2048kB/enabled"):
        return f"no per-size mTHP controls under {THP}"
    return None


def _size_dirs() -> dict[int, str]:
    out = {}
    for name in os.listdir(THP):
        if name.startswith("hugepages-") and os.path.exists(f"{THP}/{name}/enabled"):
            out[int(name[len("hugepages-"):-2]) * 1024] = f"{THP}/{name}/enabled"
    return out


def _current(path: str) -> str:
    with open(path) as f:
        text = f.read()
    return text[text.index("[") + 1:text.index("]")]


_lock_depth = threading.local()


@contextlib.contextmanager
def thp_lock(waiting: Callable[[str], None] | None = None) -> Iterator[None]:
    """An exclusive flock on the sysfs THP directory while this process owns the controls, so
    that two tools (the oracle, ``ptebatch calibrate``, tests) do not change them under each
    other. Re-entrant within a thread; ``waiting`` is told when another process holds it."""
    depth = getattr(_lock_depth, "n", 0)
    if depth:
        _lock_depth.n = depth + 1
        try:
            yield
        finally:
            _lock_depth.n -= 1
        return
    fd = os.open(THP, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting is not None:
                waiting(f"waiting for another process holding the lock on {THP}")
            fcntl.flock(fd, fcntl.LOCK_EX)
        _lock_depth.n = 1
        try:
            yield
        finally:
            _lock_depth.n = 0
    finally:
        os.close(fd)


@contextlib.contextmanager
def thp_only(size: int) -> Iterator[None]:
    """Enables anonymous folios of ``size`` only ("always"), restoring every control after;
    holds :func:`thp_lock` meanwhile."""
    dirs = _size_dirs()
    if size != os.sysconf("SC_PAGE_SIZE") and size not in dirs:
        raise CaptureError(f"this kernel has no mTHP control for {size} bytes")
    with thp_lock():
        saved = {p: _current(p) for p in dirs.values()}
        try:
            for s, p in dirs.items():
                with open(p, "w") as f:
                    f.write("always" if s == size else "never")
            yield
        finally:
            for p, v in saved.items():
                with open(p, "w") as f:
                    f.write(v)


class Worker:
    """The driven process (see ``ptebatch._oracle_worker``)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "ptebatch._oracle_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def __call__(self, *cmd: object) -> list[str]:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(" ".join(map(str, cmd)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ok":
            raise RuntimeError(f"worker failed on {cmd}: {line}")
        return line[1:]

    def close(self) -> None:
        """Tells the worker to quit and waits for it."""
        with contextlib.suppress(Exception):
            self("quit")
        for f in (self.proc.stdin, self.proc.stdout):
            if f:
                f.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class StepResult:
    """One scripted step compared: pages compared and the mismatches found."""

    step: str
    pages: int = 0
    mismatches: list[str] = field(default_factory=list)


@dataclass
class OracleReport:
    """The oracle's result for one folio size: every step's comparison."""

    size: int
    kernel: str
    steps: list[StepResult]
    #: Sizes (pages) of the folios the kernel mapped the region with before the fork.
    folio_pages: list[int] = field(default_factory=list)
    #: Runs needed: a rare transient reference (DAMON) can make one reuse a copy; see run_retrying.
    attempts: int = 1

    @property
    def pages(self) -> int:
        return sum(s.pages for s in self.steps)

    @property
    def mismatches(self) -> int:
        return sum(len(s.mismatches) for s in self.steps)


def _view(snap: Snapshot, addr: int, npages: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(present, pfn, exclusive, mapcount) per page of ``[addr, addr + npages pages)``."""
    page = snap.page_size
    a = snap.arrays
    out = np.zeros(npages, dtype=np.uint64)
    for i in range(len(a["vma_start"])):
        s, e = int(a["vma_start"][i]), int(a["vma_end"][i])
        lo, hi = max(s, addr), min(e, addr + npages * page)
        if lo < hi:
            out[(lo - addr) // page:(hi - addr) // page] = snap.vma_pages(i)[(lo - s) // page:(hi - s) // page]
    present = (out & np.uint64(PM_PRESENT)) != 0
    pfn = np.where(present, out & np.uint64(PM_PFN_MASK), 0)
    excl = (out & np.uint64(PM_MMAP_EXCLUSIVE)) != 0
    count = np.zeros(npages, dtype=np.uint64)
    if present.any():
        _, count[present] = snap.frame_info(pfn[present])
    return present, pfn, excl, count


def run(size: int, *, folios: int = 4, kernel: str | None = None) -> OracleReport:
    """Runs the scripted sequence for one folio size against the live kernel and the model."""
    from . import kernel_from_release
    from .simulation import Simulation

    from .capture import _pmd_pages

    page = os.sysconf("SC_PAGE_SIZE")
    pmd = _pmd_pages(page) * page
    n = size // page
    region = max(folios * size, 4 * page * max(n, 1))
    kernel = kernel or kernel_from_release(platform.release())
    split = size == pmd
    with thp_only(size):
        w = Worker()
        try:
            pid_s, addr_s = w("setup", region, max(size, page), 1 if split else 0)
            ppid, addr = int(pid_s), int(addr_s)
            npages = region // page
            rng = [(addr, addr + region)]
            pre = capture(ppid, ranges=rng)
            pm = pre.arrays["pagemap"]
            pres = pm[(pm & np.uint64(PM_PRESENT)) != 0] & np.uint64(PM_PFN_MASK)
            folio_pages = sorted({int(x) for x in pre.folio_of(pres)[1]}) if len(pres) else []
            sim, procs = Simulation.from_snapshot(pre, kernel, mthp=[size] if size > page else [])
            sp = procs[ppid]
            mid = n // 2
            others = [(mid + 1) % n, (mid + 2) % n] if n > 2 else [1, 2]
            f1, f2 = n, 2 * n
            script: list[tuple[str, tuple]] = [
                ("fork", ()),
                ("child writes a page in the middle of folio 0", ("cwrite", mid)),
                ("parent writes that page", ("pwrite", mid)),
                ("parent writes another page of folio 0", ("pwrite", others[0])),
                ("child exits", ("cexit",)),
                ("parent writes a third page of folio 0", ("pwrite", others[1])),
                ("munmap of part of folio 1", ("munmap", f1 + max(n // 4, 1) if n > 1 else f1, max(n // 4, 1))),
                ("MADV_DONTNEED of half of folio 2", ("dontneed", f2, max(n // 2, 1))),
            ]
            kprev = {ppid: _view(pre, addr, npages)[1]}
            sprev = {ppid: sim.process(sp.pid).pagemap(addr, region) & np.uint64(PM_PFN_MASK)}
            child: tuple[int, object] | None = None
            steps: list[StepResult] = []
            for label, cmd in script:
                if label == "fork":
                    cpid = int(w("fork")[0])
                    sc = sp.fork()
                    child = (cpid, sc)
                    kprev[cpid] = kprev[ppid].copy()
                    sprev[cpid] = sprev[ppid].copy()
                else:
                    w(*cmd)
                    op = cmd[0]
                    a = addr + int(cmd[1]) * page if len(cmd) > 1 else None
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
                live = [(ppid, sp)] + ([child] if child else [])  # type: ignore[list-item]
                snap = capture([p for p, _ in live], ranges=rng)
                steps.append(_compare(label, snap, sim, live, addr, npages, kprev, sprev))
            return OracleReport(size, kernel, steps, folio_pages)
        finally:
            w.close()


#: Modules with more oracle scenarios, each exposing ``SCENARIOS`` (name -> a callable that runs
#: it against the live kernel and returns the compared steps).
SCENARIO_MODULES = ("oracle_policy", "oracle_filemap", "oracle_pmd")


def scenarios() -> dict[str, tuple[str, Callable[[], list[StepResult]]]]:
    """Every named oracle scenario: name -> (topic, runner)."""
    import importlib

    out: dict[str, tuple[str, Callable[[], list[StepResult]]]] = {}
    for mod in SCENARIO_MODULES:
        try:
            m = importlib.import_module(f"ptebatch.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"ptebatch.{mod}":
                raise
            continue
        topic = mod.removeprefix("oracle_")
        for name, fn in m.SCENARIOS.items():
            # A name to type on a command line: "madvise-mode, no advice" -> "madvise-mode-no-advice".
            slug = "-".join("".join(c if c.isalnum() or c == "_" else " " for c in name).split())
            out[slug] = (topic, fn)
    return out


def run_retrying(size: int, attempts: int = 3, **kw) -> OracleReport:
    """``run``, repeated up to ``attempts`` times while it finds mismatches: DAMON on the
    machines may hold a transient reference that turns one in-place reuse into a copy
    (damon_get_folio(), mm/damon/ops-common.c). Every attempt is reported; the last one is returned."""
    for i in range(1, attempts + 1):
        r = run(size, **kw)
        r.attempts = i
        if r.mismatches == 0:
            break
    return r


def _compare(label: str, snap: Snapshot, sim, live, addr: int, npages: int, kprev: dict, sprev: dict) -> StepResult:
    res = StepResult(label)
    page = snap.page_size
    folio_state: dict[int, tuple[bool, bool]] = {}
    for kpid, proc in live:
        kpres, kpfn, kexcl, kcount = _view(snap.__class__(dict(snap.header, pids=[kpid]),
                                                          _only(snap, kpid), []), addr, npages)
        pm = proc.pagemap(addr, npages * page)
        spres = (pm & np.uint64(PM_PRESENT)) != 0
        spfn = np.where(spres, pm & np.uint64(PM_PFN_MASK), 0)
        sexcl = (pm & np.uint64(PM_MMAP_EXCLUSIVE)) != 0
        scount = np.array([sim.kpagecount(int(p)) if ok else 0 for p, ok in zip(spfn, spres)], dtype=np.uint64)
        for j in range(npages):
            res.pages += 1
            where = f"pid {kpid} page {j}"
            if kpres[j] != spres[j]:
                res.mismatches.append(f"{where}: present kernel={kpres[j]} sim={spres[j]}")
                continue
            if not kpres[j]:
                continue
            if kcount[j] != scount[j]:
                res.mismatches.append(f"{where}: mapcount kernel={kcount[j]} sim={scount[j]}")
            if kexcl[j] != sexcl[j]:
                res.mismatches.append(f"{where}: exclusive kernel={kexcl[j]} sim={sexcl[j]}")
            kkept = kpfn[j] == kprev[kpid][j]
            skept = spfn[j] == sprev[kpid][j]
            if kkept != skept:
                res.mismatches.append(f"{where}: kept its pfn kernel={kkept} sim={skept}")
            elif not kkept:
                _, klen = snap.folio_of(np.array([kpfn[j]], dtype=np.uint64))
                sorder = sim.page(int(spfn[j]))["order"]
                if int(klen[0]) != 1 << sorder:
                    res.mismatches.append(f"{where}: new folio pages kernel={int(klen[0])} sim={1 << sorder}")
            # Partially mapped: a folio some of whose pages no page table maps (old folios
            # keep their pfns in both, so they are identified by pfn).
            if kkept:
                heads, lens = snap.folio_of(np.array([kpfn[j]], dtype=np.uint64))
                h, ln = int(heads[0]), int(lens[0])
                if ln > 1 and h not in folio_state:
                    _, kc = snap.frame_info(np.arange(h, h + ln, dtype=np.uint64))
                    sc = np.array([sim.kpagecount(p) for p in range(h, h + ln)])
                    folio_state[h] = (bool(np.any(kc == 0)), bool(np.any(sc == 0)))
        kprev[kpid] = kpfn
        sprev[kpid] = spfn
    for h, (kp, sp_) in folio_state.items():
        if kp != sp_:
            res.mismatches.append(f"folio {h:#x}: partially mapped kernel={kp} sim={sp_}")
    return res


def _only(snap: Snapshot, pid: int) -> dict[str, np.ndarray]:
    a = snap.arrays
    keep = np.flatnonzero(a["vma_pid"] == pid)
    off = a["vma_page_offset"]
    pages = [a["pagemap"][off[i]:off[i + 1]] for i in keep]
    out = {k: a[k][keep] for k in ("vma_pid", "vma_start", "vma_end", "vma_flags", "vma_pgoff", "vma_anon_huge_kb")}
    out["pagemap"] = np.concatenate(pages) if pages else np.zeros(0, np.uint64)
    out["vma_page_offset"] = np.concatenate([[0], np.cumsum([len(p) for p in pages])]).astype(np.int64)
    for k in ("win_start", "kpageflags", "kpagecount"):
        out[k] = a[k]
    return out


__all__ = ["run", "run_retrying", "thp_only", "missing_requirements", "OracleReport"]

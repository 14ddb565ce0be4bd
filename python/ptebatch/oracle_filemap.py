"""The running kernel as oracle for shared and file mappings: fault-around and shmem folio sizes.

Each scenario maps one MAP_SHARED region in a worker process (``ptebatch._oracle_worker``):
shared anonymous memory, or a file on a tmpfs mounted for the run in a temporary directory
(always unmounted after). The simulation starts empty as the kernel's page cache does, maps the
same region at the same virtual address, with the live kernel's ``fault_around_bytes`` and
shmem controls, and runs the same accesses. After every step both are compared page by page:
present, mapcount (kpagecount), the exclusively-mapped bit, whether the page kept its pfn since
the last step, the folio size and the THP flag. Every sysfs value a scenario changes is restored
afterwards (under :func:`ptebatch.oracle.thp_lock`), also on failure and Ctrl-C.

``SCENARIOS`` maps a name to a callable returning the compared steps (``oracle.StepResult``).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import tempfile
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from ._core import CaptureError
from .capture import capture
from .oracle import THP, StepResult, Worker, _only, _view, thp_lock
from .snapshot import KPF_THP, PM_MMAP_EXCLUSIVE, PM_PFN_MASK, PM_PRESENT, Snapshot

DEBUGFS_KNOB = "fault_around_bytes"
#: Where a scenario's region starts: this many pages before a PMD boundary, so that it
#: crosses a page table and its first fault-around windows are clamped by the VMA.
SKEW = -11


def _arch(page: int) -> str:
    m = platform.machine()
    if m == "x86_64":
        return "x86-64"
    if m == "aarch64" and page in (4096, 16384, 65536):
        return f"arm64-{page // 1024}k"
    raise CaptureError(f"no simulated layout for {m} with {page}-byte pages")


def _read_value(path: str) -> str:
    with open(path) as f:
        text = f.read().strip()
    return text[text.index("[") + 1:text.index("]")] if "[" in text else text


def _write_value(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def live_fault_around_bytes() -> int:
    """The live ``fault_around_bytes`` from debugfs (mounted for the read if it is not); the
    kernel's default, 64K, where debugfs cannot be read (lockdown): the scenarios then test
    that default too."""
    default = 65536
    p = os.path.join("/sys/kernel/debug", DEBUGFS_KNOB)
    try:
        if os.path.exists(p):
            return int(_read_value(p))
        with _mounted("debugfs", "debugfs", "") as d:
            return int(_read_value(os.path.join(d, DEBUGFS_KNOB)))
    except (OSError, CaptureError, ValueError):
        return default


@contextlib.contextmanager
def _mounted(fstype: str, source: str, options: str) -> Iterator[str]:
    """A mount of ``fstype`` in a new temporary directory, unmounted and removed after."""
    d = tempfile.mkdtemp(prefix="ptebatch-oracle-")
    try:
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [source, d]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise CaptureError(f"cannot mount {fstype} ({options or 'defaults'}): {r.stderr.strip()}")
        try:
            yield d
        finally:
            r = subprocess.run(["umount", d], capture_output=True, text=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", d], capture_output=True, text=True)
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(d)


def _shmem_paths() -> dict[str, str]:
    """The shmem controls: "enabled" and one per folio size in bytes (as str keys)."""
    out = {"enabled": f"{THP}/shmem_enabled"}
    for name in os.listdir(THP):
        p = f"{THP}/{name}/shmem_enabled"
        if name.startswith("hugepages-") and os.path.exists(p):
            out[str(int(name[len("hugepages-"):-2]) * 1024)] = p
    return out


def live_shmem_policy() -> dict[str, Any]:
    """The live shmem controls in the form ``Simulation.set_shmem_policy(**policy)`` takes (the
    form for a snapshot header's "shmem_policy" key): ``{"enabled": str, "sizes": {bytes: str}}``."""
    paths = _shmem_paths()
    top = paths.pop("enabled")
    return {"enabled": _read_value(top), "sizes": {int(k): _read_value(p) for k, p in paths.items()}}


@contextlib.contextmanager
def shmem_controls(enabled: str | None, sizes: dict[int, str]) -> Iterator[dict[str, str]]:
    """Sets the shmem controls (sizes not named: "never"; the PMD size keeps "inherit" when
    not named) for the block, under :func:`thp_lock`; restores every value after. Yields the
    values in force."""
    paths = _shmem_paths()
    page = os.sysconf("SC_PAGE_SIZE")
    from .capture import _pmd_pages

    pmd = _pmd_pages(page) * page
    with thp_lock():
        saved = {k: _read_value(p) for k, p in paths.items()}
        try:
            want = {k: ("inherit" if int(k) == pmd else "never") for k in paths if k != "enabled"}
            want.update({str(k): v for k, v in sizes.items()})
            # "force" refuses non-PMD "inherit" sizes: the sizes go first, the top level last.
            _write_value(paths["enabled"], "never")
            for k, v in want.items():
                _write_value(paths[k], v)
            _write_value(paths["enabled"], enabled or "never")
            yield {k: _read_value(p) for k, p in paths.items()}
        finally:
            # Top level to "never" first, so that any restored "inherit" is accepted.
            _write_value(paths["enabled"], "never")
            for k, p in paths.items():
                if k != "enabled":
                    _write_value(p, saved[k])
            _write_value(paths["enabled"], saved["enabled"])


def _sim_facts(sim, proc, addr: int, npages: int) -> tuple[np.ndarray, ...]:
    page = sim.page_size
    pm = proc.pagemap(addr, npages * page)
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pfn = np.where(present, pm & np.uint64(PM_PFN_MASK), 0)
    excl = (pm & np.uint64(PM_MMAP_EXCLUSIVE)) != 0
    count = np.zeros(npages, dtype=np.uint64)
    size = np.zeros(npages, dtype=np.uint64)
    thp = np.zeros(npages, dtype=bool)
    for j in np.flatnonzero(present):
        count[j] = sim.kpagecount(int(pfn[j]))
        order = sim.page(int(pfn[j]))["order"]
        size[j] = 1 << order
        thp[j] = order > 0
    return present, pfn, excl, count, size, thp


def _kernel_facts(snap: Snapshot, pid: int, addr: int, npages: int) -> tuple[np.ndarray, ...]:
    one = snap.__class__(dict(snap.header, pids=[pid]), _only(snap, pid), [])
    present, pfn, excl, count = _view(one, addr, npages)
    size = np.zeros(npages, dtype=np.uint64)
    thp = np.zeros(npages, dtype=bool)
    if present.any():
        _, lens = snap.folio_of(pfn[present])
        size[present] = lens
        flags, _ = snap.frame_info(pfn[present])
        thp[present] = (flags & np.uint64(KPF_THP)) != 0
    return present, pfn, excl, count, size, thp


def compare_step(label: str, snap: Snapshot, sim: Any, live: Sequence[tuple[int, Any]], addr: int, npages: int,
                 kprev: dict, sprev: dict) -> StepResult:
    """Every page fact of every live process in ``[addr, addr + npages pages)``."""
    res = StepResult(label)
    for kpid, proc in live:
        k = _kernel_facts(snap, kpid, addr, npages)
        s = _sim_facts(sim, proc, addr, npages)
        kp, sp = kprev.get(kpid), sprev.get(kpid)
        for j in range(npages):
            res.pages += 1
            where = f"pid {kpid} page {j}"
            if k[0][j] != s[0][j]:
                res.mismatches.append(f"{where}: present kernel={bool(k[0][j])} sim={bool(s[0][j])}")
                continue
            if not k[0][j]:
                continue
            for name, i in (("mapcount", 3), ("exclusive", 2), ("folio pages", 4), ("THP", 5)):
                if k[i][j] != s[i][j]:
                    res.mismatches.append(f"{where}: {name} kernel={k[i][j]} sim={s[i][j]}")
            if kp is not None and sp is not None:
                # Kept: present at the last step too, at the same pfn.
                kkept = bool(kp[0][j]) and k[1][j] == kp[1][j]
                skept = bool(sp[0][j]) and s[1][j] == sp[1][j]
                if kkept != skept:
                    res.mismatches.append(f"{where}: kept its pfn kernel={kkept} sim={skept}")
        kprev[kpid], sprev[kpid] = (k[0], k[1]), (s[0], s[1])
    return res


def _close(w: Worker) -> None:
    """Ends the worker, also one that died (its pipes are then broken)."""
    try:
        w.close()
    except OSError:
        w.proc.kill()
        w.proc.wait()


#: A scenario's script: (label, op, page, count). Ops: read / write (parent; ``count`` pages
#: from ``page``, at least one), cread / cwrite (child), fork, cexit, dontneed (page, count).
Script = list[tuple[str, str, int, int]]


def run_script(npages: int, script: Script, *, skew: int = SKEW, tmpfs_huge: str | None = None,
               shmem_enabled: str | None = None, shmem_sizes: dict[int, str] | None = None,
               kernel: str | None = None) -> list[StepResult]:
    """Runs ``script`` on a MAP_SHARED region of ``npages`` starting ``skew`` pages from a PMD
    boundary (shared anonymous memory, or with ``tmpfs_huge`` a file on a tmpfs mounted with
    that ``huge=``) in the live kernel and in the simulation, comparing after every step."""
    from . import kernel_from_release
    from .capture import _pmd_pages
    from .simulation import Simulation

    page = os.sysconf("SC_PAGE_SIZE")
    pmd = _pmd_pages(page) * page
    kernel = kernel or kernel_from_release(platform.release())
    fab = live_fault_around_bytes()
    with contextlib.ExitStack() as stack:
        values = stack.enter_context(shmem_controls(shmem_enabled, shmem_sizes or {}))
        path = "-"
        if tmpfs_huge is not None:
            d = stack.enter_context(_mounted("tmpfs", "ptebatch-oracle", f"size={4 * npages * page},huge={tmpfs_huge}"))
            path = os.path.join(d, "file")
        w = Worker()
        stack.callback(_close, w)  # before the unmount: the worker holds the file
        pid_s, addr_s = w("fm_map", npages, pmd, skew, path)
        ppid, addr = int(pid_s), int(addr_s)
        sim = Simulation(_arch(page), kernel, "256M")
        sim.fault_around_bytes = fab
        sizes: dict[int | str, str] = {int(k): v for k, v in values.items() if k != "enabled" and int(k) <= pmd}
        sim.set_shmem_policy(values["enabled"], sizes if sim.shmem_policy["sizes"] else None)
        sp = sim.spawn()
        if tmpfs_huge is None:
            sp.mmap(npages * page, "rw", shared=True, addr=addr)
        else:
            fid = sim.create_file(npages * page, shmem=True, huge=tmpfs_huge)
            sp.mmap(npages * page, "rw", shared=True, file=fid, addr=addr)
        rng = [(addr, addr + npages * page)]
        kprev: dict = {}
        sprev: dict = {}
        child = None
        steps: list[StepResult] = []
        for label, op, pg, n in script:
            a = addr + pg * page
            if op == "fork":
                cpid = int(w("fm_fork")[0])
                child = (cpid, sp.fork())
            elif op == "cexit":
                w("fm_cexit")
                child[1].exit()  # type: ignore[index, union-attr]
                kprev.pop(child[0], None)  # type: ignore[index]
                sprev.pop(child[0], None)  # type: ignore[index]
                child = None
            elif op in ("read", "write"):
                for q in range(pg, pg + max(n, 1)):
                    w(f"fm_{op}", q)
                    (sp.read if op == "read" else sp.write)(addr + q * page)
            elif op in ("cread", "cwrite"):
                w(f"fm_{op}", pg)
                (child[1].read if op == "cread" else child[1].write)(a)  # type: ignore[index, union-attr]
            elif op == "dontneed":
                w("fm_dontneed", pg, n)
                sp.madvise(a, n * page, "dontneed")
            else:
                raise ValueError(f"unknown scenario op {op!r}")
            live = [(ppid, sp)] + ([child] if child else [])  # type: ignore[list-item]
            snap = capture([p for p, _ in live], ranges=rng)
            steps.append(compare_step(label, snap, sim, live, addr, npages, kprev, sprev))
        sim.check()
        return steps


# Region: 64 pages starting 11 pages before a PMD boundary: page 11 begins a new page table.
_EDGES: Script = [
    ("parent writes every page (do_shared_fault, no fault-around)", "write", 0, 64),
    ("fork (shared VMA without anon_vma: nothing copied)", "fork", 0, 0),
    ("child reads page 5: window clamped to the VMA start", "cread", 5, 0),
    ("child reads page 9: window clamped to the page-table end", "cread", 9, 0),
    ("child reads page 12: window [11, 27) of the next table", "cread", 12, 0),
    ("child reads page 60: window clamped to the VMA end", "cread", 60, 0),
    ("MADV_DONTNEED of parent pages 30..46", "dontneed", 30, 16),
    ("parent reads page 40: fault-around maps the cached pages back", "read", 40, 0),
    ("child exits", "cexit", 0, 0),
]

_SPARSE: Script = [
    *[(f"parent writes page {p}", "write", p, 0) for p in range(0, 64, 3)],
    ("fork", "fork", 0, 0),
    ("child reads page 19 (cached): fault-around maps the cached pages of its window", "cread", 19, 0),
    ("child reads page 20 (not cached): fault-around, then shmem_fault allocates it", "cread", 20, 0),
    ("child writes page 50 (do_shared_fault)", "cwrite", 50, 0),
    ("parent reads page 49", "read", 49, 0),
    ("child exits", "cexit", 0, 0),
]

# From a PMD boundary: with 64K folios, folio 1 is pages 16..32; with 128K, folio 1 is 32..64.
_MTHP: Script = [
    ("parent writes page 20: a large folio, mapped whole by finish_fault()", "write", 20, 0),
    ("parent writes page 40", "write", 40, 0),
    ("fork", "fork", 0, 0),
    ("child reads page 21: fault-around over the folio", "cread", 21, 0),
    ("child reads page 44: fault-around over part of a folio larger than the window", "cread", 44, 0),
    ("child reads page 70: a new folio, mapped whole", "cread", 70, 0),
    ("MADV_DONTNEED of parent pages 24..32", "dontneed", 24, 8),
    ("parent reads page 26: fault-around maps the folio's pages back", "read", 26, 0),
    ("child reads page 3: the first folio", "cread", 3, 0),
    ("child exits", "cexit", 0, 0),
]


def _sizes_available() -> set[int]:
    return {int(k) for k in _shmem_paths() if k != "enabled"}


def _mthp(size: int, value: str, enabled: str = "never") -> Callable[..., list[StepResult]]:
    def run(kernel: str | None = None) -> list[StepResult]:
        if size not in _sizes_available():
            raise CaptureError(f"this kernel has no hugepages-{size // 1024}kB/shmem_enabled")
        return run_script(128, _MTHP, skew=0, shmem_enabled=enabled, shmem_sizes={size: value}, kernel=kernel)
    return run


def _mthp_misaligned(kernel: str | None = None) -> list[StepResult]:
    """64K "always" on a region 11 pages before a PMD boundary: the VMA's start is not 64K
    aligned, so thp_vma_suitable_order() refuses the order and every folio is a page."""
    return run_script(64, _SPARSE, shmem_sizes={65536: "always"}, kernel=kernel)


#: Scenario name -> callable(kernel=None) returning the compared steps.
SCENARIOS: dict[str, Callable[..., list[StepResult]]] = {
    "faultaround-shared-anon": lambda kernel=None: run_script(64, _EDGES, kernel=kernel),
    "faultaround-shared-anon-sparse": lambda kernel=None: run_script(64, _SPARSE, kernel=kernel),
    "faultaround-tmpfs": lambda kernel=None: run_script(64, _SPARSE, tmpfs_huge="never", kernel=kernel),
    "faultaround-tmpfs-edges": lambda kernel=None: run_script(64, _EDGES, tmpfs_huge="never", kernel=kernel),
    "tmpfs-huge-always-small-vma": lambda kernel=None: run_script(64, _SPARSE, tmpfs_huge="always", kernel=kernel),
    "shmem-mthp-64K-always": _mthp(65536, "always"),
    "shmem-mthp-128K-always": _mthp(131072, "always"),
    "shmem-mthp-64K-inherit-enabled-always": _mthp(65536, "inherit", "always"),
    "shmem-mthp-64K-inherit-enabled-never": _mthp(65536, "inherit", "never"),
    "shmem-mthp-32K-within_size": _mthp(32768, "within_size"),
    "shmem-mthp-64K-advise-no-madvise": _mthp(65536, "advise"),
    "shmem-mthp-64K-misaligned-vma": _mthp_misaligned,
}


def missing_requirements() -> str | None:
    """Why these scenarios cannot run here, or None."""
    from .oracle import missing_requirements as base

    why = base()
    if why:
        return why
    if not os.path.exists(f"{THP}/shmem_enabled"):
        return f"no {THP}/shmem_enabled"
    return None


__all__ = ["SCENARIOS", "run_script", "compare_step", "shmem_controls", "live_fault_around_bytes", "live_shmem_policy",
           "missing_requirements"]

"""The running kernel as oracle for the THP policy: which folio a first-touch fault maps.

Each scenario sets the sysfs controls (``transparent_hugepage/enabled`` and the per-size
``hugepages-<size>kB/enabled``), has the oracle worker (``ptebatch._oracle_worker``) map
anonymous memory at chosen alignments between guard pages, apply MADV_HUGEPAGE /
MADV_NOHUGEPAGE or PR_SET_THP_DISABLE and touch chosen pages; a simulation of the running
kernel, given the policy read back from sysfs, does the same at the same addresses. Then
every page of every mapping is compared: present, shared zero page, folio size, the page's
index in its folio (the folio's alignment), the THP flag of /proc/kpageflags, the mapcount
(/proc/kpagecount) and pagemap's exclusively-mapped bit.

Every sysfs control a scenario writes is saved first and restored afterwards, also when the
scenario fails or is interrupted (Ctrl-C), under :func:`ptebatch.oracle.thp_lock`. A scenario
whose large-folio allocation fell back in the kernel (memory fragmentation: the per-size
``stats/anon_fault_fallback`` counters moved) or that found mismatches is run again, up to
three times; the last run is reported.

``SCENARIOS`` maps each scenario's name to a callable returning its ``StepResult`` list.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .capture import THP_SYSFS, _arch, capture, read_thp_policy
from .oracle import StepResult, Worker, thp_lock
from .snapshot import KPF_THP, KPF_ZERO_PAGE, PM_MMAP_EXCLUSIVE, PM_PFN_MASK, PM_PRESENT, Snapshot

K, M = 1 << 10, 1 << 20
PR_THP_DISABLE_EXCEPT_ADVISED = 1 << 1


@dataclass
class Scenario:
    """A THP policy (top-level mode; per-size modes, every size not named "never") and steps:
    ("map", name, length, align, offset), ("madvise", name, offset, length, advice),
    ("prctl", disable, except_advised), ("write", name, offset), ("read", name, offset),
    ("policy", enabled, sizes) to change the controls between faults."""

    enabled: str
    sizes: dict[str, str]
    steps: list[tuple]
    #: The kernel feature the scenario needs (checked against the simulated profile).
    needs_except_advised: bool = False
    description: str = ""
    #: Runs used (see the module docstring).
    attempts: int = field(default=0, compare=False)


def _scenarios() -> dict[str, Scenario]:
    def touch(name: str, *offsets: int) -> list[tuple]:
        return [("write", name, o) for o in offsets]

    pmd_only = {"2M": "inherit"}
    return {
        "madvise-mode, no advice": Scenario(
            "madvise", pmd_only, [("map", "a", 4 * M, 2 * M, 0)] + touch("a", 0, 600 << 12, 2 * M + 4096),
            description="top-level madvise: a VMA without MADV_HUGEPAGE gets pages"),
        "madvise-mode, MADV_HUGEPAGE": Scenario(
            "madvise", pmd_only, [("map", "a", 4 * M, 2 * M, 0), ("madvise", "a", 0, 2 * M, "hugepage")]
            + touch("a", 12 << 12, 2 * M + (12 << 12)),
            description="the advised half gets a PMD-sized THP, the other half pages"),
        "always-mode": Scenario(
            "always", pmd_only, [("map", "a", 4 * M, 2 * M, 0)] + touch("a", 0, 3 * M),
            description="top-level always: PMD-sized THP without advice"),
        "never-mode, MADV_HUGEPAGE": Scenario(
            "never", pmd_only, [("map", "a", 4 * M, 2 * M, 0), ("madvise", "a", 0, 4 * M, "hugepage")]
            + touch("a", 0, 3 * M),
            description="top-level never: 'inherit' sizes stay off even with MADV_HUGEPAGE"),
        "per-size madvise": Scenario(
            "never", {"64K": "madvise", "2M": "never"},
            [("map", "a", 1 * M, 2 * M, 0), ("map", "b", 1 * M, 2 * M, 0), ("madvise", "b", 0, 1 * M, "hugepage")]
            + touch("a", 0, 200 << 12) + touch("b", 0, 200 << 12),
            description="a per-size 'madvise' needs MADV_HUGEPAGE, whatever the top level"),
        "per-size always, top-level never": Scenario(
            "never", {"64K": "always", "2M": "never"}, [("map", "a", 1 * M, 2 * M, 0)] + touch("a", 0, 100 << 12),
            description="a per-size 'always' ignores the top level"),
        "MADV_NOHUGEPAGE": Scenario(
            "always", {"64K": "always", "2M": "inherit"},
            [("map", "a", 4 * M, 2 * M, 0), ("madvise", "a", 2 * M, 2 * M, "nohugepage")]
            + touch("a", 0, 2 * M, 3 * M + 64 * K),
            description="VM_NOHUGEPAGE: pages only, the rest of the VMA THP"),
        "several sizes, alignment and fallback": Scenario(
            "never", {"16K": "always", "64K": "always", "2M": "always"},
            [("map", "big", 4 * M, 2 * M, 0), ("map", "small", 128 * K, 2 * M, 16 * K),
             ("map", "shifted", 2 * M, 2 * M, 64 * K)]
            # "small" is [16K, 144K) past a 2M boundary: too small for 2M, its first 64K block cut
            # by its start, its last by its end; "shifted" cannot hold an aligned 2M.
            + touch("small", 0, 48 * K, 112 * K + 4096) + touch("shifted", 0, 1 * M + 8 * K)
            # A 16K folio under the next fault's 64K and 2M ranges: the fault falls back to 16K.
            + [("policy", "never", {"16K": "always", "64K": "never", "2M": "never"})] + touch("big", 40 * K)
            + [("policy", "never", {"16K": "always", "64K": "always", "2M": "always"})]
            + touch("big", 0, 64 * K, 2 * M + 4096),
            description="the largest allowed order whose aligned range lies in the VMA and is all none"),
        "PR_SET_THP_DISABLE": Scenario(
            "always", {"64K": "always", "2M": "inherit"},
            [("map", "a", 4 * M, 2 * M, 0), ("madvise", "a", 0, 4 * M, "hugepage"), ("prctl", 1, 0)]
            + touch("a", 0, 64 * K) + [("prctl", 0, 0)] + touch("a", 2 * M, 256 * K),
            description="disabled for the whole process (existing VMAs too, MADV_HUGEPAGE or not), then re-enabled"),
        "PR_THP_DISABLE_EXCEPT_ADVISED": Scenario(
            "always", {"64K": "always", "2M": "inherit"},
            [("map", "a", 4 * M, 2 * M, 0), ("madvise", "a", 0, 2 * M, "hugepage"), ("prctl", 1, 1)]
            + touch("a", 4096, 2 * M, 3 * M + 128 * K),
            needs_except_advised=True,
            description="6.18: disabled except in MADV_HUGEPAGE VMAs"),
        "read fault: zero page": Scenario(
            "never", {"64K": "always", "2M": "never"},
            [("map", "a", 1 * M, 2 * M, 0), ("read", "a", 0), ("read", "a", 8 * K)] + touch("a", 8 * K, 512 * K),
            description="a read maps the shared zero page, its write then a copied page; elsewhere a write maps 64K"),
    }


# ---- the sysfs controls -----------------------------------------------------------------------

def _size_dirs() -> dict[str, str]:
    """"64K" → the hugepages-<size>kB directory, for the sizes with an anonymous control."""
    from .simulation import format_size

    out = {}
    for name in os.listdir(THP_SYSFS):
        if name.startswith("hugepages-") and os.path.exists(f"{THP_SYSFS}/{name}/enabled"):
            out[format_size(int(name[len("hugepages-"):-2]) << 10)] = f"{THP_SYSFS}/{name}"
    return out


def read_policy() -> dict[str, Any]:
    """The anonymous controls now: {"enabled": ..., "sizes": {"64K": ..., ...}}."""
    pol = read_thp_policy() or {}
    return {"enabled": pol.get("enabled"), "sizes": dict(pol.get("sizes", {}))}


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _set_policy(enabled: str, sizes: dict[str, str]) -> None:
    dirs = _size_dirs()
    unknown = set(sizes) - set(dirs)
    if unknown:
        raise ValueError(f"this kernel has no anonymous THP control for {sorted(unknown)}")
    _write(f"{THP_SYSFS}/enabled", enabled)
    for size, d in dirs.items():
        _write(f"{d}/enabled", sizes.get(size, "never"))


def _restore(saved: dict[str, Any]) -> None:
    dirs = _size_dirs()
    for size, mode in saved["sizes"].items():
        if size in dirs:
            _write(f"{dirs[size]}/enabled", str(mode))
    _write(f"{THP_SYSFS}/enabled", str(saved["enabled"]))


def _fallbacks() -> int:
    """Sum of the per-size anon_fault_fallback counters (0 where the kernel has none)."""
    total = 0
    for d in _size_dirs().values():
        try:
            with open(f"{d}/stats/anon_fault_fallback") as f:
                total += int(f.read())
        except FileNotFoundError:
            pass
    return total


# ---- one scenario -------------------------------------------------------------------------------

def _kernel() -> str:
    from . import kernel_from_release

    return kernel_from_release(platform.release())


def _run_once(sc: Scenario, kernel: str) -> tuple[list[StepResult], bool]:
    """Runs ``sc`` once (the caller holds the lock and restores sysfs); returns the comparison
    and whether a large-folio allocation fell back in the kernel."""
    from .replay import layout_for
    from .simulation import Simulation

    page = os.sysconf("SC_PAGE_SIZE")
    _set_policy(sc.enabled, sc.sizes)
    sim = Simulation(layout_for(_arch(), page), kernel, "256M")
    live = read_thp_policy() or {}
    sim.set_thp_policy(live.get("enabled"), {s: m for s, m in live.get("sizes", {}).items()
                                             if s in sim.thp_policy["sizes"]})
    maps: dict[str, tuple[int, int]] = {}
    fell_back = _fallbacks()
    w = Worker()
    try:
        sp = sim.spawn()
        for step in sc.steps:
            op = step[0]
            if op == "map":
                _, name, length, align, offset = step
                addr = int(w("tmap", length, align, offset)[0])
                sp.mmap(length, addr=addr)
                maps[name] = (addr, length)
            elif op == "madvise":
                _, name, off, length, advice = step
                w("tmadvise", maps[name][0] + off, length, advice)
                sp.madvise(maps[name][0] + off, length, advice)
            elif op == "prctl":
                _, disable, except_advised = step
                w("tprctl", disable, PR_THP_DISABLE_EXCEPT_ADVISED if except_advised else 0)
                sp.prctl_thp_disable(bool(disable), except_advised=bool(except_advised))
            elif op in ("write", "read"):
                _, name, off = step
                w("t" + op, maps[name][0] + off)
                (sp.write if op == "write" else sp.read)(maps[name][0] + off)
            elif op == "policy":
                _, enabled, sizes = step
                _set_policy(enabled, sizes)
                live = read_thp_policy() or {}
                sim.set_thp_policy(live.get("enabled"), {s: m for s, m in live.get("sizes", {}).items()
                                                         if s in sim.thp_policy["sizes"]})
            else:  # pragma: no cover - scenario tables are fixed
                raise ValueError(f"unknown scenario step {op!r}")
        fell_back = _fallbacks() != fell_back
        snap = capture(w.proc.pid, ranges=[(a, a + n) for a, n in maps.values()])
        results = [_compare(name, snap, sim, sp, a, n // page) for name, (a, n) in maps.items()]
    finally:
        w.close()
    sim.check()
    return results, fell_back


def _kernel_facts(snap: Snapshot, addr: int, npages: int) -> dict[str, np.ndarray]:
    """Per page of ``[addr, addr + npages pages)``: present, pfn, exclusive, mapcount, kpageflags,
    folio pages and index in the folio, from the captured process."""
    page = snap.page_size
    a = snap.arrays
    pm = np.zeros(npages, dtype=np.uint64)
    for i in range(len(a["vma_start"])):
        s, e = int(a["vma_start"][i]), int(a["vma_end"][i])
        lo, hi = max(s, addr), min(e, addr + npages * page)
        if lo < hi:
            pm[(lo - addr) // page:(hi - addr) // page] = snap.vma_pages(i)[(lo - s) // page:(hi - s) // page]
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pfn = np.where(present, pm & np.uint64(PM_PFN_MASK), 0)
    flags = np.zeros(npages, dtype=np.uint64)
    count = np.zeros(npages, dtype=np.uint64)
    heads = np.zeros(npages, dtype=np.uint64)
    lens = np.zeros(npages, dtype=np.int64)
    if present.any():
        flags[present], count[present] = snap.frame_info(pfn[present])
        heads[present], lens[present] = snap.folio_of(pfn[present])
    return {"present": present, "pfn": pfn, "exclusive": (pm & np.uint64(PM_MMAP_EXCLUSIVE)) != 0,
            "mapcount": count, "flags": flags, "folio": lens, "index": (pfn - heads).astype(np.int64)}


def _compare(name: str, snap: Snapshot, sim, proc, addr: int, npages: int) -> StepResult:
    from .simulation import format_size

    k = _kernel_facts(snap, addr, npages)
    large = k["present"] & ((k["flags"] & np.uint64(KPF_ZERO_PAGE)) == 0)
    seen = sorted({int(x) for x in k["folio"][large]}, reverse=True)
    res = StepResult(f"mapping {name} (kernel folios: {', '.join(format_size(x * sim.page_size) for x in seen) or 'none'})")
    pm = proc.pagemap(addr, npages * sim.page_size)
    zero_pfn = sim.zero_pfn
    for j in range(npages):
        res.pages += 1
        where = f"{name} page {j}"
        spres = bool(pm[j] & np.uint64(PM_PRESENT))
        if bool(k["present"][j]) != spres:
            res.mismatches.append(f"{where}: present kernel={bool(k['present'][j])} sim={spres}")
            continue
        if not spres:
            continue
        spfn = int(pm[j] & np.uint64(PM_PFN_MASK))
        kzero = bool(k["flags"][j] & np.uint64(KPF_ZERO_PAGE))
        szero = spfn == zero_pfn
        facts: list[tuple[str, object, object]] = [("zero page", kzero, szero)]
        if not (kzero or szero):
            info = sim.page(spfn)
            sorder = int(info["order"])
            facts += [
                ("folio pages", int(k["folio"][j]), 1 << sorder),
                ("index in folio", int(k["index"][j]), spfn - int(info["folio"])),
                ("THP flag", bool(k["flags"][j] & np.uint64(KPF_THP)), sorder > 0),
                ("mapcount", int(k["mapcount"][j]), sim.kpagecount(spfn)),
                ("exclusive", bool(k["exclusive"][j]), bool(pm[j] & np.uint64(PM_MMAP_EXCLUSIVE))),
            ]
        for what, kv, sv in facts:
            if kv != sv:
                res.mismatches.append(f"{where}: {what} kernel={kv} sim={sv}")
    return res


def run_scenario(name: str, attempts: int = 3, kernel: str | None = None) -> list[StepResult]:
    """Runs one scenario against the live kernel (see the module docstring)."""
    sc = _scenarios()[name]
    kernel = kernel or _kernel()
    from .simulation import Simulation

    if sc.needs_except_advised:
        probe = Simulation("x86-64", kernel, "1M").spawn()
        try:
            probe.prctl_thp_disable(True, except_advised=True)
        except ValueError:
            return [StepResult(f"skipped: kernel {kernel} has no PR_THP_DISABLE_EXCEPT_ADVISED")]
    with thp_lock():
        saved = read_policy()
        try:
            for i in range(1, attempts + 1):
                results, fell_back = _run_once(sc, kernel)
                sc.attempts = i
                if not fell_back and not any(r.mismatches for r in results):
                    break
            if fell_back:
                results.append(StepResult("a large-folio allocation fell back in the kernel (fragmented memory)",
                                          0, ["allocation fallback in every attempt"]))
            return results
        finally:
            _restore(saved)


def run_all(kernel: str | None = None) -> dict[str, list[StepResult]]:
    """Every scenario, in order."""
    return {name: fn() if kernel is None else run_scenario(name, kernel=kernel) for name, fn in SCENARIOS.items()}


def table(results: dict[str, list[StepResult]]) -> str:
    """A Markdown table: scenario, pages compared, mismatches."""
    rows = ["| scenario | pages compared | mismatches |", "| --- | ---: | ---: |"]
    for name, steps in results.items():
        rows.append(f"| {name} | {sum(s.pages for s in steps)} | {sum(len(s.mismatches) for s in steps)} |")
    return "\n".join(rows)


def _runner(name: str) -> Callable[[], list[StepResult]]:
    return lambda: run_scenario(name)


#: Scenario name → a callable running it against the live kernel.
SCENARIOS: dict[str, Callable[[], list[StepResult]]] = {name: _runner(name) for name in _scenarios()}

__all__ = ["SCENARIOS", "run_scenario", "run_all", "read_policy", "table"]


if __name__ == "__main__":  # pragma: no cover - a manual run
    out = run_all()
    print(table(out))
    for n, steps in out.items():
        for s in steps:
            for m in s.mismatches[:5]:
                print(f"{n}: {s.step}: {m}")

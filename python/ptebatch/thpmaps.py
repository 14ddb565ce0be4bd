"""A thpmaps-style report: how THP and mTHP memory is mapped, per VMA and rolled up.

The counters carry the names of the kernel's tools/mm/thpmaps: ``anon-thp-pmd-aligned-<size>kB``,
``anon-thp-pte-aligned-<size>kB``, ``anon-thp-pte-unaligned-<size>kB``, ``anon-thp-pte-partial``
and the ``file-`` twins, plus
``anon|file-cont-pte-aligned-<size>kB`` and ``-cont-pmd-aligned-`` for each ``--cont`` size.
They are computed the same way: over runs of pages of THP folios whose virtual and physical
frame numbers both advance by one, a folio counts as aligned or unaligned (by its virtual
address) when the run maps all of it, and its pages count as partial otherwise; PMD-mapped
memory comes from smaps' AnonHugePages (the only place user space sees PMD mappings) and is
taken out of the PTE-mapped PMD-order counter. The input is a snapshot, so the same report
works on a live process, a saved capture and a simulated process (:func:`snapshot_of`).
"""

from __future__ import annotations

import collections
import time
from typing import Any, Iterable

import numpy as np

from .snapshot import (KPF_ANON, KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL, KPF_DIRTY, KPF_SWAPBACKED, KPF_THP,
                       KPF_ZERO_PAGE, PM_PFN_MASK, PM_PRESENT, SCHEMA_VERSION, VMA_EXEC, VMA_FILE, VMA_READ,
                       VMA_SHARED, VMA_WRITE, Snapshot)


def _kb(pages: int, page: int) -> int:
    return pages * page // 1024


def thp_sizes(page: int, pmd_pages: int) -> list[int]:
    """THP sizes in pages: order 2 up to PMD order."""
    out, n = [], 4
    while n <= pmd_pages:
        out.append(n)
        n *= 2
    return out


def check_cont_sizes(cont: Iterable[int], page_size: int, pmd_pages: int) -> list[int]:
    """``cont`` as a list if every block size (bytes) is a power of two from 2 pages to the
    PMD size, as thpmaps' --cont requires; else ValueError naming the size."""
    out = []
    for c in cont:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"a contiguous block size must be an int, not {type(c).__name__}")
        c = int(c)
        if c <= 0 or c & (c - 1) or not 2 * page_size <= c <= page_size * pmd_pages:
            raise ValueError(f"contiguous block size {c} is not a power of two from 2 pages "
                             f"({2 * page_size}) to the PMD size ({page_size * pmd_pages})")
        out.append(c)
    return out


def vma_stats(snap: Snapshot, i: int, cont: Iterable[int] = ()) -> dict[str, int]:
    """Counters of VMA ``i`` of ``snap`` in kB; ``cont`` lists block sizes in bytes."""
    a = snap.arrays
    page, pmd = snap.page_size, snap.pmd_pages
    cont = check_cont_sizes(cont, page, pmd)
    entries = snap.vma_pages(i)
    start_vfn = int(a["vma_start"][i]) // page
    present = (entries & np.uint64(PM_PRESENT)) != 0
    idx = np.flatnonzero(present)
    pfns = entries[idx] & np.uint64(PM_PFN_MASK)
    # Any folio size may come up, also without a preset counter (order 1 in the page cache,
    # or impossible flags in a corrupt capture): counters start at 0 when first counted.
    stats: dict[str, int] = collections.defaultdict(int)
    sizes = thp_sizes(page, pmd)
    for kind in ("anon", "file"):
        for n in sizes:
            kb = _kb(n, page)
            for what in ("pmd-aligned", "pte-aligned", "pte-unaligned"):
                stats[f"{kind}-thp-{what}-{kb}kB"] = 0
        stats[f"{kind}-thp-pte-partial"] = 0
        for c in cont:
            ckb = c // 1024
            stats[f"{kind}-cont-pmd-aligned-{ckb}kB"] = 0
            stats[f"{kind}-cont-pte-aligned-{ckb}kB"] = 0
    if len(idx):
        flags, _ = snap.frame_info(pfns)
        thp = (flags & np.uint64(KPF_THP)) != 0
        idx, pfns, flags = idx[thp], pfns[thp], flags[thp]
    anon_pmd_pages = int(a["vma_anon_huge_kb"][i]) * 1024 // page
    if len(idx):
        vfns = (idx + start_vfn).astype(np.int64)
        p = pfns.astype(np.int64)
        anon = (flags & np.uint64(KPF_ANON)) != 0
        head = (flags & np.uint64(KPF_COMPOUND_HEAD)) != 0
        # Runs where both frame numbers advance by one.
        brk = np.flatnonzero((np.diff(vfns) != 1) | (np.diff(p) != 1)) + 1
        for run in np.split(np.arange(len(idx)), brk):
            _runs(stats, snap, run, vfns, p, anon, head, page, pmd, cont)
    # PMD mappings: only smaps knows; they are fully mapped, aligned PMD-order folios.
    pmd_kb = _kb(pmd, page)
    if anon_pmd_pages:
        stats[f"anon-thp-pmd-aligned-{pmd_kb}kB"] = _kb(anon_pmd_pages, page)
        stats[f"anon-thp-pte-aligned-{pmd_kb}kB"] -= _kb(anon_pmd_pages, page)
        for c in cont:
            ckb = c // 1024
            stats[f"anon-cont-pmd-aligned-{ckb}kB"] = _kb(anon_pmd_pages, page)
            stats[f"anon-cont-pte-aligned-{ckb}kB"] -= _kb(anon_pmd_pages, page)
    for k in stats:
        stats[k] = max(stats[k], 0)  # a capture races with the process; never report < 0
    return dict(stats)


def _runs(stats, snap, run, vfns, pfns, anon, head, page, pmd, cont) -> None:
    first, last = int(run[0]), int(run[-1])
    end = last + 1
    heads = run[head[run]]
    kind = lambda j: "anon" if anon[j] else "file"
    # Tail pages before the run's first head belong to a folio the run does not hold whole.
    lead = (int(heads[0]) if len(heads) else end) - first
    if lead:
        stats[f"{kind(first)}-thp-pte-partial"] += _kb(lead, page)
    if len(heads):
        # The frame after the run: if it is a tail, the last folio continues elsewhere.
        nxt, _ = snap.frame_info(np.array([pfns[last] + 1], dtype=np.uint64)) if _in_windows(snap, pfns[last] + 1) else (np.array([0], np.uint64), None)
        if int(nxt[0]) & KPF_COMPOUND_TAIL:
            tail = end - int(heads[-1])
            stats[f"{kind(int(heads[-1]))}-thp-pte-partial"] += _kb(tail, page)
            end = int(heads[-1])
            heads = heads[:-1]
    if len(heads):
        bounds = np.append(heads, end)
        for h, e in zip(bounds[:-1], bounds[1:]):
            n = int(e - h)
            if n & (n - 1):
                stats[f"{kind(int(h))}-thp-pte-partial"] += _kb(n, page)
                continue
            aligned = vfns[h] % n == 0
            stats[f"{kind(int(h))}-thp-pte-{'aligned' if aligned else 'unaligned'}-{_kb(n, page)}kB"] += _kb(n, page)
    for c in cont:
        nc = c // page
        v0, p0 = int(vfns[first]), int(pfns[first])
        if (v0 - p0) % nc:
            continue
        j = first + (-v0) % nc
        while j + nc <= last + 1:
            # A block must lie in one folio: no head inside it after its first page.
            if not head[j + 1:j + nc].any():
                stats[f"{kind(j)}-cont-pte-aligned-{c // 1024}kB"] += _kb(nc, page)
            j += nc


def _in_windows(snap: Snapshot, pfn: int) -> bool:
    n = snap.pmd_pages
    return bool(np.isin(np.uint64(pfn - pfn % n), snap.arrays["win_start"]))


def report(snap: Snapshot, *, cont: Iterable[int] = (), rollup: bool = False, inc_empty: bool = False) -> str:
    """The report as text, in thpmaps' layout: a smaps-like header per VMA, then counters."""
    cont = check_cont_sizes(cont, snap.page_size, snap.pmd_pages)
    a = snap.arrays
    page = snap.page_size
    lines = []
    total: dict[str, int] = {}
    for i in range(len(a["vma_start"])):
        st = vma_stats(snap, i, cont)
        for k, v in st.items():
            total[k] = total.get(k, 0) + v
        if rollup:
            continue
        f = int(a["vma_flags"][i])
        perms = "".join(c if f & b else "-" for c, b in (("r", VMA_READ), ("w", VMA_WRITE), ("x", VMA_EXEC)))
        perms += "s" if f & VMA_SHARED else "p"
        lines.append(f"{int(a['vma_pid'][i]):<10} {int(a['vma_start'][i]):016x}-{int(a['vma_end'][i]):016x} "
                     f"{perms} {int(a['vma_pgoff'][i]) * page:08x} {snap.vma_names[i] if snap.vma_names else ''}")
        lines += _counter_lines(st, inc_empty, snap, i)
    if rollup:
        lines.append(f"rollup of {len(set(int(p) for p in a['vma_pid']))} process(es)")
        lines += _counter_lines(total, inc_empty, snap, None)
    return "\n".join(lines)


def _counter_lines(st: dict[str, int], inc_empty: bool, snap: Snapshot, i: int | None) -> list[str]:
    out = []
    denom = {"anon": 0, "file": 0}
    for k, v in st.items():
        if "-cont-" not in k:
            denom[k.split("-")[0]] += v
    for k, v in st.items():
        if v == 0 and not inc_empty:
            continue
        d = denom[k.split("-")[0]]
        pct = f" ({100 * v / d:.0f}%)" if d else ""
        out.append(f"{k + ':':<40} {v:>10} kB{pct}")
    return out


# Page flags of the simulation's memory array "flags" (rust/src/memory.rs).
_PG_ANON, _PG_SWAPBACKED, _PG_DIRTY = 1 << 1, 1 << 2, 1 << 4


def snapshot_of(sim: Any, processes: Iterable[Any] | None = None) -> Snapshot:
    """A snapshot of simulated processes, with the pagemap, kpageflags and kpagecount the
    simulated kernel would show, so that reports and comparisons work on it like on a capture;
    replaying it (``Simulation.from_snapshot``) rebuilds the same page facts. Each file (and
    shmem object) gets its own VMA name, which is how replay tells files apart."""
    from ._core import layout

    procs = list(processes) if processes is not None else []
    page = sim.page_size
    pmd = layout(sim.arch).ptrs_per_pte
    cols: dict[str, list] = {k: [] for k in ("vma_pid", "vma_start", "vma_end", "vma_flags", "vma_pgoff",
                                             "vma_anon_huge_kb")}
    maps, names = [], []
    for p in procs:
        for v in p.vmas():
            n = (v["end"] - v["start"]) // page
            maps.append(np.asarray(p.pagemap(v["start"], n * page), dtype=np.uint64))
            cols["vma_pid"].append(p.pid)
            cols["vma_start"].append(v["start"])
            cols["vma_end"].append(v["end"])
            prot = v["prot"]
            cols["vma_flags"].append((VMA_READ if "r" in prot else 0) | (VMA_WRITE if "w" in prot else 0)
                                     | (VMA_EXEC if "x" in prot else 0) | (VMA_SHARED if v["shared"] else 0)
                                     | (VMA_FILE if v["file"] is not None else 0))
            cols["vma_pgoff"].append(v["offset"] // page)
            cols["vma_anon_huge_kb"].append(v.get("anon_huge_pages", 0) // 1024)
            names.append(f"[sim file {v['file']}]" if v["file"] is not None else f"[sim pid {p.pid}]")
    pagemap = np.concatenate(maps) if maps else np.zeros(0, np.uint64)
    pres = pagemap[(pagemap & np.uint64(PM_PRESENT)) != 0] & np.uint64(PM_PFN_MASK)
    wins = np.unique(pres - pres % np.uint64(pmd))
    flags = np.zeros(len(wins) * pmd, np.uint64)
    counts = np.zeros(len(wins) * pmd, np.uint64)
    order = sim._b.memory_array("order")
    mflags = sim._b.memory_array("flags")
    mcount = sim._b.memory_array("mapcount")
    zero_pfn = sim.zero_pfn
    for k, w in enumerate(wins.astype(np.int64)):
        pf = np.arange(w, w + pmd)
        inside = pf < len(order)
        pf_in = pf[inside]
        o = order[pf_in].astype(np.int64)
        alloc = o != 255
        ord_ = np.where(alloc, o, 0)
        heads = pf_in & ~((1 << ord_) - 1)
        hf = mflags[heads]
        f = np.zeros(len(pf_in), np.uint64)
        f[alloc & (hf & _PG_ANON != 0)] |= np.uint64(KPF_ANON)
        f[alloc & (hf & _PG_SWAPBACKED != 0)] |= np.uint64(KPF_SWAPBACKED)
        f[alloc & (hf & _PG_DIRTY != 0)] |= np.uint64(KPF_DIRTY)
        large = alloc & (ord_ > 0)
        f[large & (heads == pf_in)] |= np.uint64(KPF_COMPOUND_HEAD | KPF_THP)
        f[large & (heads != pf_in)] |= np.uint64(KPF_COMPOUND_TAIL | KPF_THP)
        flags[k * pmd:k * pmd + len(pf_in)] = f
        c = np.where(alloc, mcount[pf_in], 0).astype(np.uint64)
        # kpagecount adds the folio's huge PMD mappings (entire mapcount).
        for h in np.unique(heads[alloc & (ord_ == pmd.bit_length() - 1)]).tolist():
            c[(heads == h) & alloc] += np.uint64(sim._b.page(h).get("entire_mapcount", 0))
        counts[k * pmd:k * pmd + len(pf_in)] = c
        if w <= zero_pfn < w + pmd:
            # The shared zero page: flagged as such, and the rmap does not count it.
            flags[k * pmd + zero_pfn - w] = np.uint64(KPF_ZERO_PAGE)
            counts[k * pmd + zero_pfn - w] = 0
    offsets = np.zeros(len(maps) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(m) for m in maps])
    header = {"schema_version": SCHEMA_VERSION, "kernel_release": f"simulated {sim.kernel}",
              "arch": sim.arch.split("-")[0] if sim.arch.startswith(("arm64", "ppc64")) else sim.arch,
              "page_size": page, "pmd_pages": pmd, "capture_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "pids": [p.pid for p in procs], "inferred": [], "source": "simulation"}
    arrays: dict[str, np.ndarray] = {
        "vma_pid": np.asarray(cols["vma_pid"], np.int64), "vma_start": np.asarray(cols["vma_start"], np.uint64),
        "vma_end": np.asarray(cols["vma_end"], np.uint64), "vma_flags": np.asarray(cols["vma_flags"], np.uint32),
        "vma_pgoff": np.asarray(cols["vma_pgoff"], np.uint64),
        "vma_anon_huge_kb": np.asarray(cols["vma_anon_huge_kb"], np.int64), "vma_page_offset": offsets,
        "pagemap": pagemap, "win_start": wins.astype(np.uint64), "kpageflags": flags, "kpagecount": counts,
    }
    return Snapshot(header, arrays, names)


__all__ = ["check_cont_sizes", "vma_stats", "report", "snapshot_of", "thp_sizes"]

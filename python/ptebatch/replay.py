"""Replay: a :class:`~ptebatch.Simulation` built from a :class:`~ptebatch.snapshot.Snapshot`.

Every captured process becomes a simulated process with the same VMAs at the same addresses;
every mapped folio is placed at its captured pfns with its captured order; every present PTE
maps the captured pfn. What /proc does not show is inferred, and the snapshot lists it
(``INFERRED``): a private anonymous PTE is writable when the page is exclusively mapped and
the VMA writable, anonymous pages are dirty, file pages dirty when their folio is, PTEs young,
and PageAnonExclusive is set on anonymous pages mapped once. Then every counter is recomputed
from the page tables and ``check()`` runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ._core import SnapshotError
from .snapshot import (KPF_ANON, KPF_DIRTY, KPF_HUGE, KPF_ZERO_PAGE, PM_MMAP_EXCLUSIVE,
                       PM_PFN_MASK, PM_PRESENT, PM_SOFT_DIRTY, PM_UFFD_WP, VMA_EXEC, VMA_FILE, VMA_READ,
                       VMA_SHARED, VMA_WRITE, Snapshot)

if TYPE_CHECKING:
    from .simulation import Process, Simulation


def layout_for(arch: str, page_size: int) -> str:
    """The layout name for a captured machine."""
    if arch == "arm64":
        return {4096: "arm64-4k", 16384: "arm64-16k", 65536: "arm64-64k"}[page_size]
    if arch == "ppc64":
        return {4096: "ppc64-4k", 65536: "ppc64-64k"}[page_size]
    return arch


def from_snapshot(snap: Snapshot, kernel: str | None = None, *, memory: int | None = None,
                  mthp: list[int] | None = None) -> tuple["Simulation", dict[int, "Process"]]:
    """Builds the simulated state of ``snap``; returns the simulation and a map from captured
    pid to simulated process. ``kernel`` defaults to the captured kernel's release."""
    from . import kernel_from_release
    from .simulation import Simulation

    page = snap.page_size
    try:
        arch = layout_for(snap.header["arch"], page)
    except KeyError as e:
        raise SnapshotError(f"no layout for {snap.header['arch']} with {page}-byte pages") from e
    kernel = kernel or kernel_from_release(snap.header["kernel_release"])
    a = snap.arrays
    pm = a["pagemap"]
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pfns_all = pm & np.uint64(PM_PFN_MASK)
    flags_all = np.zeros(len(pm), dtype=np.uint64)
    if present.any():
        flags_all[present], _ = snap.frame_info(pfns_all[present])
    usable = present & ((flags_all & np.uint64(KPF_HUGE)) == 0)
    zero = usable & ((flags_all & np.uint64(KPF_ZERO_PAGE)) != 0)
    normal = usable & ~zero
    pmd = snap.pmd_pages
    top = int(pfns_all[normal].max()) + 1 if normal.any() else 0
    nr = max(memory // page if memory else 0, ((top + pmd - 1) // pmd + 64) * pmd)
    sim = Simulation(arch, kernel, nr * page)
    sizes = mthp if mthp is not None else []

    # One file object per distinct file name (shared by the processes that map it); each
    # shared anonymous VMA gets its own shmem object.
    nv = len(a["vma_start"])
    file_of: dict[int, int] = {}
    file_pages: dict[str, int] = {}
    for i in range(nv):
        if a["vma_flags"][i] & VMA_FILE:
            name = snap.vma_names[i]
            end = int(a["vma_pgoff"][i]) + int((a["vma_end"][i] - a["vma_start"][i]) // np.uint64(page))
            file_pages[name] = max(file_pages.get(name, 0), end)
    fids: dict[str, int] = {}
    for name, n in file_pages.items():
        n = (n + pmd - 1) // pmd * pmd + pmd
        fids[name] = sim.create_file(n * page, page)
    procs: dict[int, Process] = {pid: sim.spawn() for pid in snap.pids}
    for i in range(nv):
        f = int(a["vma_flags"][i])
        start, end = int(a["vma_start"][i]), int(a["vma_end"][i])
        prot = "".join(c for c, bit in (("r", VMA_READ), ("w", VMA_WRITE), ("x", VMA_EXEC)) if f & bit) or "none"
        shared = bool(f & VMA_SHARED)
        if f & VMA_FILE:
            fid = fids[snap.vma_names[i]]
        elif shared:
            fid = sim.create_file(end - start, page, shmem=True)
        else:
            fid = None
        if fid is not None:
            file_of[i] = fid
        off = int(a["vma_pgoff"][i]) * page if f & VMA_FILE else 0
        procs[int(a["vma_pid"][i])].mmap(end - start, prot, shared, file=fid, offset=off, addr=start,
                                          mthp=sizes if fid is None else ())

    # Folios, each placed once, from its first mapping seen.
    vma_of_page = np.repeat(np.arange(nv), np.diff(a["vma_page_offset"]))
    idx = np.flatnonzero(normal)
    heads, lengths = snap.folio_of(pfns_all[idx])
    uniq, first = np.unique(heads, return_index=True)
    lens = lengths[first]
    if np.any(lens & (lens - 1)):
        bad = int(uniq[np.flatnonzero(lens & (lens - 1))[0]])
        raise SnapshotError(f"folio at pfn {bad:#x} is not a power-of-two number of pages")
    orders = np.log2(lens).astype(np.uint8)
    hflags, _ = snap.frame_info(uniq) if len(uniq) else (np.zeros(0, np.uint64), None)
    is_anon = (hflags & np.uint64(KPF_ANON)) != 0
    dirty = (hflags & np.uint64(KPF_DIRTY)) != 0
    sim._b.place_anon_folios(uniq[is_anon].astype(np.uint64), orders[is_anon], dirty[is_anon])
    for k in np.flatnonzero(~is_anon):
        head, page_i = int(uniq[k]), int(idx[first[k]])
        v = int(vma_of_page[page_i])
        fid = file_of.get(v)
        if fid is None:
            raise SnapshotError(f"page-cache folio {head:#x} is mapped by an anonymous VMA")
        in_vma = page_i - int(a["vma_page_offset"][v])
        base = int(a["vma_pgoff"][v]) if a["vma_flags"][v] & VMA_FILE else 0
        index = base + in_vma - (int(pfns_all[page_i]) - head)
        sim._b.place_folio(head, int(orders[k]), "file", file=fid, index=max(index, 0), dirty=bool(dirty[k]))

    # PTEs, one bulk call per process.
    sel = np.flatnonzero(usable)
    v_of = vma_of_page[sel]
    addrs = a["vma_start"][v_of] + (sel - a["vma_page_offset"][v_of]).astype(np.uint64) * np.uint64(page)
    e = pm[sel]
    fl = flags_all[sel]
    vf = a["vma_flags"][v_of]
    anon = (fl & np.uint64(KPF_ANON)) != 0
    shared = (vf & VMA_SHARED) != 0
    excl = (e & np.uint64(PM_MMAP_EXCLUSIVE)) != 0
    write = ((vf & VMA_WRITE) != 0) & (shared | (anon & excl))
    dirty_pte = anon | ((fl & np.uint64(KPF_DIRTY)) != 0) | (shared & write)
    bits = (write.astype(np.uint8) | (dirty_pte.astype(np.uint8) << 1) | np.uint8(4)
            | (((e & np.uint64(PM_SOFT_DIRTY)) != 0).astype(np.uint8) << 3)
            | (((e & np.uint64(PM_UFFD_WP)) != 0).astype(np.uint8) << 4))
    pfn = np.where(zero[sel], np.uint64(sim.zero_pfn), e & np.uint64(PM_PFN_MASK)).astype(np.uint64)
    owner = a["vma_pid"][v_of]
    for pid, proc in procs.items():
        m = owner == pid
        sim._b.place_ptes(proc.pid, addrs[m].astype(np.uint64), pfn[m], bits[m].astype(np.uint8))
    sim._b.rebuild_accounting()
    return sim, procs


__all__ = ["from_snapshot", "layout_for"]

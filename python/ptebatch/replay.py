"""Replay: a :class:`~ptebatch.Simulation` built from a :class:`~ptebatch.snapshot.Snapshot`.

Every captured process becomes a simulated process with the same VMAs at the same addresses;
every mapped folio is placed with its captured order; every present PTE maps the captured
page. What /proc does not show is inferred, and the snapshot lists it (``INFERRED``): a
private anonymous PTE is writable when the page is exclusively mapped and the VMA writable,
anonymous pages are dirty, file pages dirty when their folio is, PTEs young, and
PageAnonExclusive is set on anonymous pages mapped once. Then every counter is recomputed
from the page tables and ``check()`` runs.

PMD-mapped THPs stay PMD-mapped (:func:`pmd_mappings` gives the rule): in a private anonymous
VMA whose smaps AnonHugePages is non-zero, a PMD-aligned run of ``pmd_pages`` present entries
mapping consecutive pfns from the first page of one anonymous folio of exactly ``pmd_pages``
pages is a huge PMD, up to as many as AnonHugePages counts, in address order; an aligned run
of the huge zero page (KPF_ZERO_PAGE and KPF_THP, consecutive pfns) is a huge zero PMD. Such a
VMA is replayed with ``pmd=True``, so its later faults map PMDs too.

Frames keep their captured pfns while the highest one fits a machine of
``MAX_IDENTITY_FRAMES`` frames. Beyond that (a capture of a big machine, where mapped pfns
are sparse), the PMD-sized frame windows that hold mapped pages are packed into a dense
range in pfn order: a folio never leaves its window, so every folio stays naturally aligned
and every frame keeps its offset inside its PMD. :func:`replayed_pfns` gives the pfn a
captured page gets. The machine is sized by the frames actually used, never by the largest
captured pfn alone.

A snapshot that cannot be rebuilt (overlapping folios, a page-cache folio in an anonymous
VMA, VMAs beyond the address space, ...) raises ``SnapshotError``; bad arguments raise
``ValueError``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable

import numpy as np

from ._core import KERNEL_VERSIONS, InvariantError, SnapshotError
from .snapshot import (KPF_ANON, KPF_DIRTY, KPF_HUGE, KPF_SWAPBACKED, KPF_THP, KPF_ZERO_PAGE, PM_MMAP_EXCLUSIVE,
                       PM_PFN_MASK, PM_PRESENT, PM_SOFT_DIRTY, PM_UFFD_WP, VMA_EXEC, VMA_FILE, VMA_HUGEPAGE,
                       VMA_NOHUGEPAGE, VMA_READ, VMA_SHARED, VMA_WRITE, Snapshot)

if TYPE_CHECKING:
    from .simulation import Process, Simulation

#: Largest machine, in frames, a replay builds with the captured pfns unchanged (64 GiB of
#: 4 KiB pages; the simulation keeps about 14 bytes per frame).
MAX_IDENTITY_FRAMES = 1 << 24
#: Free PMD windows a replayed machine has beyond its highest used frame, for later faults.
SPARE_WINDOWS = 64


def layout_for(arch: str, page_size: int) -> str:
    """The layout name for a captured machine."""
    if arch == "arm64":
        return {4096: "arm64-4k", 16384: "arm64-16k", 65536: "arm64-64k"}[page_size]
    if arch == "ppc64":
        return {4096: "ppc64-4k", 65536: "ppc64-64k"}[page_size]
    return arch


def kernel_of(snap: Snapshot) -> str:
    """The modelled kernel version of the snapshot's kernel (``"simulated 6.18"`` included)."""
    from . import kernel_from_release

    release = snap.header["kernel_release"]
    try:
        return kernel_from_release(release.removeprefix("simulated "))
    except ValueError as e:
        raise SnapshotError(f"{e}; pass the kernel to replay it under") from None


def _usable(snap: Snapshot) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(present, pfn, kpageflags, usable) per pagemap entry; usable pages are the ones replay
    maps: present, not hugetlb (the simulation has no hugetlb)."""
    pm = snap.arrays["pagemap"]
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pfns = pm & np.uint64(PM_PFN_MASK)
    flags = np.zeros(len(pm), dtype=np.uint64)
    if present.any():
        flags[present], _ = snap.frame_info(pfns[present])
    return present, pfns, flags, present & ((flags & np.uint64(KPF_HUGE)) == 0)


def _frame_map(snap: Snapshot, compact: bool | None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """(used windows, their new starts or None for identity, frames needed)."""
    _, pfns, flags, usable = _usable(snap)
    normal = usable & ((flags & np.uint64(KPF_ZERO_PAGE)) == 0)
    pmd = np.uint64(snap.pmd_pages)
    used = pfns[normal]
    wins = np.unique(used - used % pmd)
    top = int(used.max()) + 1 if len(used) else 0
    if compact is None:
        compact = top > MAX_IDENTITY_FRAMES
    if not compact:
        if top > MAX_IDENTITY_FRAMES:
            raise SnapshotError(f"pfn {top - 1:#x} needs a machine of {top} frames, more than "
                                f"{MAX_IDENTITY_FRAMES}; replay with compact=True")
        return wins, None, top
    new = np.arange(len(wins), dtype=np.uint64) * pmd
    return wins, new, len(wins) * snap.pmd_pages


def replayed_pfns(snap: Snapshot, pfns: Iterable[int] | np.ndarray, *, compact: bool | None = None) -> np.ndarray:
    """The pfn that :func:`from_snapshot` (with the same ``compact``) gives each captured pfn of
    a mapped page (not the zero page, which becomes the simulation's own)."""
    p = np.asarray(pfns, dtype=np.uint64)
    wins, new, _ = _frame_map(snap, compact)
    if new is None:
        return p.copy()
    pmd = np.uint64(snap.pmd_pages)
    k = np.searchsorted(wins, p - p % pmd)
    if np.any(k >= len(wins)) or np.any(wins[np.minimum(k, len(wins) - 1)] != p - p % pmd):
        raise ValueError("a pfn that no replayed page uses was asked for")
    return new[k] + p % pmd


def pmd_mappings(snap: Snapshot) -> dict[int, list[int]]:
    """The huge PMDs of a capture: VMA index → indices (into the VMA's pagemap entries) of the
    first page of each PMD-mapped range.

    pagemap cannot tell a PMD mapping from a PTE-mapped THP mapped whole and in order; smaps'
    AnonHugePages of the VMA says how many PMD mappings it holds. Every run that could be one
    (PMD-aligned address, ``pmd_pages`` present entries, consecutive pfns from the first page of
    an anonymous folio of exactly ``pmd_pages`` pages) is taken, in address order, until that
    count is reached: where a VMA holds both kinds, a whole in-order PTE-mapped THP before a
    PMD-mapped one would be taken for it (AnonHugePages does not say which ranges it counts).
    A PMD-aligned run of ``pmd_pages`` consecutive pages of the huge zero folio (KPF_ZERO_PAGE
    and KPF_THP) is a huge zero PMD (AnonHugePages does not count those); PTEs of the small zero
    page never look like that.
    """
    a = snap.arrays
    page, pmd = snap.page_size, snap.pmd_pages
    pm = a["pagemap"]
    off = a["vma_page_offset"]
    out: dict[int, list[int]] = {}
    for i in np.flatnonzero((a["vma_flags"] & np.uint32(VMA_FILE | VMA_SHARED)) == 0):
        want = int(a["vma_anon_huge_kb"][i]) * 1024 // (pmd * page)
        lo, hi = int(off[i]), int(off[i + 1])
        start = int(a["vma_start"][i]) // page
        found: list[int] = []
        # Aligned runs whose first entry maps an aligned pfn and whose last the pfn pmd - 1 on.
        js = np.arange((-start) % pmd, hi - lo - pmd + 1, pmd)
        if not len(js):
            continue
        first, last = pm[lo + js], pm[lo + js + pmd - 1]
        mask = np.uint64(PM_PFN_MASK)
        cand = (((first & last & np.uint64(PM_PRESENT)) != 0) & ((first & mask) % np.uint64(pmd) == 0)
                & ((last & mask) == (first & mask) + np.uint64(pmd - 1)))
        taken = 0
        for j in js[cand].tolist():
            run = pm[lo + j:lo + j + pmd]
            pfns = run & mask
            head = pfns[0]
            if not (np.all(run & np.uint64(PM_PRESENT)) and np.array_equal(pfns, head + np.arange(pmd, dtype=np.uint64))):
                continue
            fl, _ = snap.frame_info(np.array([head], dtype=np.uint64))
            flags = int(fl[0])
            if flags & KPF_ZERO_PAGE:
                if flags & KPF_THP:
                    found.append(j)
                continue
            if taken == want or flags & KPF_HUGE or not flags & KPF_ANON:
                continue
            heads, lens = snap.folio_of(np.array([head], dtype=np.uint64))
            if int(heads[0]) == int(head) and int(lens[0]) == pmd:
                found.append(j)
                taken += 1
        if found:
            out[int(i)] = found
    return out


def from_snapshot(snap: Snapshot, kernel: str | None = None, *, memory: int | str | None = None,
                  mthp: list[int | str] | None = None,
                  compact: bool | None = None) -> tuple["Simulation", dict[int, "Process"]]:
    """Builds the simulated state of ``snap``; returns the simulation and a map from captured
    pid to simulated process. ``kernel`` defaults to the captured kernel's release; ``memory``
    is a lower bound on the machine's size; ``compact`` packs sparse pfns (None: only when
    the captured pfns need more than ``MAX_IDENTITY_FRAMES`` frames). The simulation gets the
    captured THP policy (the sysfs controls, each VMA's MADV_HUGEPAGE / MADV_NOHUGEPAGE, and
    PR_SET_THP_DISABLE where /proc/<pid>/status shows it), which later faults follow; ``mthp``
    (sizes) overrides the sysfs controls for the anonymous VMAs."""
    from .simulation import Simulation, parse_size

    if not isinstance(snap, Snapshot):
        raise TypeError(f"from_snapshot needs a Snapshot, not {type(snap).__name__}")
    if kernel is not None and kernel not in KERNEL_VERSIONS:
        raise ValueError(f"kernel {kernel!r} is not modelled; known: {KERNEL_VERSIONS}")
    min_bytes = parse_size(memory) if memory is not None else 0
    if isinstance(mthp, (str, int)):
        mthp = [mthp]  # one size
    sizes = [parse_size(s) for s in mthp] if mthp is not None else None
    page = snap.page_size
    try:
        arch = layout_for(snap.header["arch"], page)
    except KeyError:
        raise SnapshotError(f"no layout for {snap.header['arch']} with {page}-byte pages") from None
    kernel = kernel or kernel_of(snap)
    wins, new, frames = _frame_map(snap, compact)
    pmd = snap.pmd_pages
    nr = max(min_bytes // page, ((frames + pmd - 1) // pmd + SPARE_WINDOWS) * pmd)
    from . import layout

    try:
        max_pfn = layout(arch).max_pfn
    except ValueError as e:
        raise SnapshotError(f"no simulation for this snapshot: {e}") from e
    if nr + 1 > max_pfn:
        raise SnapshotError(f"no simulation for this snapshot: {nr} pages do not fit the {arch} PFN field")
    try:
        sim = Simulation.from_arrays(arch, kernel, nr * page, **_arrays(snap, arch, nr, sizes, wins, new))
    except (ValueError, InvariantError) as e:
        raise SnapshotError(f"the snapshot cannot be replayed: {e}") from e
    _apply_thp_policy(sim, snap)
    return sim, {pid: sim.process(k + 1) for k, pid in enumerate(snap.pids)}


def _file_groups(snap: Snapshot, normal: np.ndarray, flags: np.ndarray,
                 pfns: np.ndarray) -> dict[int, tuple[str, int, bool]]:
    """The file object (name, number, shmem) each file VMA maps. VMAs of one name map one
    object unless their page cache disagrees (one file page at two pfns, one pfn at two file
    pages, swap-backed pages and others): two unrelated shared anonymous mappings are both
    "/dev/zero (deleted)"."""
    a = snap.arrays
    off = a["vma_page_offset"]
    groups: dict[str, list[tuple[np.ndarray, np.ndarray, bool | None]]] = {}
    out: dict[int, tuple[str, int, bool]] = {}
    for i in np.flatnonzero(a["vma_flags"] & np.uint32(VMA_FILE)):
        lo, hi = int(off[i]), int(off[i + 1])
        sel = np.flatnonzero(normal[lo:hi] & ((flags[lo:hi] & np.uint64(KPF_ANON)) == 0))
        shmem = bool(np.any(flags[lo:hi][sel] & np.uint64(KPF_SWAPBACKED))) if len(sel) else None
        # Every page of every page-cache folio the VMA maps: (file page, pfn).
        p = pfns[lo:hi][sel]
        heads, lens = snap.folio_of(p) if len(p) else (p, np.zeros(0, np.int64))
        first_index = int(a["vma_pgoff"][i]) + sel.astype(np.int64) - (p - heads).astype(np.int64)
        uh, k = np.unique(heads, return_index=True)
        n = lens[k]
        rep = np.repeat(np.arange(len(uh)), n)
        step = np.arange(len(rep)) - np.repeat(np.cumsum(n) - n, n)
        index, pfn = first_index[k][rep] + step, uh[rep] + step.astype(np.uint64)
        name = snap.vma_names[i]
        found = groups.setdefault(name, [])
        for g, (gi, gp, gs) in enumerate(found):
            if shmem is not None and gs is not None and shmem != gs:
                continue
            _, x, y = np.intersect1d(gi, index, assume_unique=True, return_indices=True)
            _, u, w = np.intersect1d(gp, pfn, assume_unique=True, return_indices=True)
            if np.array_equal(gp[x], pfn[y]) and np.array_equal(gi[u], index[w]):
                merged, at = np.unique(np.concatenate([gi, index]), return_index=True)
                found[g] = (merged, np.concatenate([gp, pfn])[at], gs if shmem is None else shmem)
                break
        else:
            g = len(found)
            found.append((index, pfn, shmem))
        out[int(i)] = (name, g, False)
    # A group is shmem when any of its pages is swap-backed.
    return {i: (name, g, bool(groups[name][g][2])) for i, (name, g, _) in out.items()}


def _apply_thp_policy(sim: "Simulation", snap: Snapshot) -> None:
    """Gives the simulation the captured sysfs THP controls (the anonymous ones; sizes the
    simulated layout has no control for are left out)."""
    pol = snap.header.get("thp_policy")
    if not pol:
        return
    known = sim.thp_policy["sizes"]
    sizes = {s: m for s, m in pol.get("sizes", {}).items() if s in known}
    try:
        sim.set_thp_policy(pol.get("enabled"), sizes)
    except (ValueError, TypeError) as e:
        raise SnapshotError(f"the snapshot's THP policy cannot be replayed: {e}") from e


def _arrays(snap: Snapshot, arch: str, nr_pages: int, sizes: list[int] | None, wins: np.ndarray,
            new: np.ndarray | None) -> dict:
    """The arguments of ``Simulation.from_arrays`` (but arch, kernel and memory) for ``snap``
    on a machine of ``nr_pages`` frames: files, VMAs (merged as mmap would merge them), folios
    at their (moved) pfns and page tables with the inferred bits (see the module's doc)."""
    from . import layout

    page, pmd = snap.page_size, snap.pmd_pages
    lay = layout(arch)
    zero_pfn = nr_pages  # one past the end of RAM
    a = snap.arrays
    pm = a["pagemap"]
    _, pfns_all, flags_all, usable = _usable(snap)
    zero = usable & ((flags_all & np.uint64(KPF_ZERO_PAGE)) != 0)
    normal = usable & ~zero

    def moved(p: np.ndarray) -> np.ndarray:
        if new is None:
            return p
        k = np.searchsorted(wins, p - p % np.uint64(pmd))
        return new[k] + p % np.uint64(pmd)

    # One file object per distinct file (see _file_groups); each shared anonymous VMA
    # without a file gets its own shmem object.
    nv = len(a["vma_start"])
    vma_of_page = np.repeat(np.arange(nv), np.diff(a["vma_page_offset"]))
    group = _file_groups(snap, normal, flags_all, pfns_all)
    file_pages: dict[tuple[str, int, bool], int] = {}
    for i, key in group.items():
        end = int(a["vma_pgoff"][i]) + int((a["vma_end"][i] - a["vma_start"][i]) // np.uint64(page))
        file_pages[key] = max(file_pages.get(key, 0), end)
    files: list[dict] = []
    fids: dict[tuple[str, int, bool], int] = {}
    for key, n in file_pages.items():
        n = (n + pmd - 1) // pmd * pmd + pmd
        if n > MAX_IDENTITY_FRAMES:
            raise SnapshotError(f"file {key[0]!r} is mapped {n} pages deep; replay models files of up to "
                                f"{MAX_IDENTITY_FRAMES} pages")
        fids[key] = len(files)
        files.append({"size": n * page, "folio_size": page, "shmem": key[2]})
    pid_index = {pid: k for k, pid in enumerate(snap.pids)}
    huge = pmd_mappings(snap)
    # VMAs, as mmap at each captured address makes them: neighbours with the same attributes
    # merge (vma_merge()).
    vmas: list[list[dict[str, Any]]] = [[] for _ in snap.pids]
    merged_of = np.zeros(nv, np.int64)  # captured VMA -> index in its process's list
    file_of: dict[int, int] = {}
    for i in range(nv):
        f = int(a["vma_flags"][i])
        start, end = int(a["vma_start"][i]), int(a["vma_end"][i])
        prot = "".join(c for c, bit in (("r", VMA_READ), ("w", VMA_WRITE), ("x", VMA_EXEC)) if f & bit) or "none"
        shared = bool(f & VMA_SHARED)
        if f & VMA_FILE:
            fid: int | None = fids[group[i]]
        elif shared:
            fid = len(files)
            files.append({"size": end - start, "folio_size": page, "shmem": True, "anon": True})
        else:
            fid = None
        if fid is not None:
            file_of[i] = fid
        off = int(a["vma_pgoff"][i]) * page if f & VMA_FILE else 0
        m: dict[str, Any] = {"start": start, "end": end, "prot": prot, "shared": shared, "file": fid,
                             "offset": off, "mthp": sizes if fid is None else None,
                             "hugepage": bool(f & VMA_HUGEPAGE), "nohugepage": bool(f & VMA_NOHUGEPAGE),
                             "pmd": i in huge, "pmds": []}
        own = vmas[pid_index[int(a["vma_pid"][i])]]
        last = own[-1] if own else None
        if (last is not None and last["end"] == start
                and all(last[k] == m[k] for k in ("prot", "shared", "file", "mthp", "hugepage", "nohugepage", "pmd"))
                and (fid is None or last["offset"] + (last["end"] - last["start"]) == off)):
            last["end"] = end
        else:
            own.append(m)
        merged_of[i] = len(own) - 1

    # Folios, each placed once, from its first mapping seen.
    idx = np.flatnonzero(normal)
    heads, lengths = snap.folio_of(pfns_all[idx])
    uniq, first = np.unique(heads, return_index=True)
    lens = lengths[first]
    if np.any(lens & (lens - 1)):
        bad = int(uniq[np.flatnonzero(lens & (lens - 1))[0]])
        raise SnapshotError(f"folio at pfn {bad:#x} is not a power-of-two number of pages")
    if np.any(uniq % lens.astype(np.uint64)):
        bad = int(uniq[np.flatnonzero(uniq % lens.astype(np.uint64))[0]])
        raise SnapshotError(f"folio at pfn {bad:#x} is not naturally aligned")
    orders = np.log2(lens).astype(np.uint8)
    hflags, _ = snap.frame_info(uniq) if len(uniq) else (np.zeros(0, np.uint64), None)
    is_anon = (hflags & np.uint64(KPF_ANON)) != 0
    kind = np.full(len(uniq), "anon", dtype=object)
    file_col = np.full(len(uniq), -1, np.int64)
    index_col = np.zeros(len(uniq), np.uint64)
    for k in np.flatnonzero(~is_anon):
        head, page_i = int(uniq[k]), int(idx[first[k]])
        v = int(vma_of_page[page_i])
        fid = file_of.get(v)
        if fid is None:
            raise SnapshotError(f"page-cache folio {head:#x} is mapped by an anonymous VMA")
        in_vma = page_i - int(a["vma_page_offset"][v])
        base = int(a["vma_pgoff"][v]) if a["vma_flags"][v] & VMA_FILE else 0
        index = base + in_vma - (int(pfns_all[page_i]) - head)
        if index < 0:
            raise SnapshotError(f"page-cache folio {head:#x} would start before its file")
        kind[k] = "shmem" if files[fid]["shmem"] else "file"
        file_col[k], index_col[k] = fid, index
    folios = {"pfn": moved(uniq), "order": orders, "kind": kind, "file": file_col, "index": index_col,
              "dirty": (hflags & np.uint64(KPF_DIRTY)) != 0}

    # Huge PMDs, in the layout's PTE encoding; PTEs for the rest, with the bits /proc does not
    # show inferred: a private PTE (or PMD) is writable only on an exclusive anonymous page
    # (mapped once), as the kernel's COW rules require.
    as_pmd = np.zeros(len(pm), dtype=bool)
    for i, starts in huge.items():
        base = int(a["vma_page_offset"][i])
        f = int(a["vma_flags"][i])
        prot_none = (f & (VMA_READ | VMA_WRITE | VMA_EXEC)) == 0
        own = vmas[pid_index[int(a["vma_pid"][i])]][merged_of[i]]
        for j in starts:
            entry = int(pm[base + j])
            as_pmd[base + j:base + j + pmd] = True
            is_zero = bool(zero[base + j])
            head = zero_pfn if is_zero else int(moved(np.array([entry & PM_PFN_MASK], np.uint64))[0])
            e = lay.mk_pte(np.array([head], np.uint64),
                           write=bool(f & VMA_WRITE) and not is_zero and not prot_none and bool(entry & PM_MMAP_EXCLUSIVE),
                           dirty=not is_zero, young=True,
                           soft_dirty=bool(entry & PM_SOFT_DIRTY) and lay.has_soft_dirty,
                           uffd_wp=bool(entry & PM_UFFD_WP) and lay.has_uffd_wp,
                           exec=bool(f & VMA_EXEC) and not prot_none, special=is_zero, prot_none=prot_none)
            own["pmds"].append((int(a["vma_start"][i]) + j * page, int(e[0])))
    sel = np.flatnonzero(usable & ~as_pmd)
    v_of = vma_of_page[sel]
    e = pm[sel]
    fl = flags_all[sel]
    vf = a["vma_flags"][v_of]
    anon = (fl & np.uint64(KPF_ANON)) != 0
    shared = (vf & VMA_SHARED) != 0
    excl = (e & np.uint64(PM_MMAP_EXCLUSIVE)) != 0
    keep = normal[sel]
    pfn = np.full(len(sel), zero_pfn, dtype=np.uint64)
    pfn[keep] = moved(e[keep] & np.uint64(PM_PFN_MASK))
    _, inverse, counts = np.unique(np.where(keep, pfn, np.uint64(zero_pfn)), return_inverse=True, return_counts=True)
    mapped_once = keep & anon & (counts[inverse] == 1)
    prot_none = (vf & (VMA_READ | VMA_WRITE | VMA_EXEC)) == 0
    write = ((vf & VMA_WRITE) != 0) & (shared | (anon & excl)) & keep & (shared | mapped_once)
    dirty = (anon | ((fl & np.uint64(KPF_DIRTY)) != 0) | (shared & write)) & keep
    ptes = lay.mk_pte(pfn, write=write, dirty=dirty, young=True,
                      soft_dirty=((e & np.uint64(PM_SOFT_DIRTY)) != 0) & lay.has_soft_dirty,
                      uffd_wp=((e & np.uint64(PM_UFFD_WP)) != 0) & lay.has_uffd_wp,
                      exec=((vf & VMA_EXEC) != 0) & ~prot_none, special=~keep, prot_none=prot_none)
    owner = np.array([pid_index[int(p)] for p in a["vma_pid"]], dtype=np.int64)[v_of] if nv else np.zeros(0, np.int64)
    where = merged_of[v_of]
    addrs = a["vma_start"][v_of] + (sel - a["vma_page_offset"][v_of]).astype(np.uint64) * np.uint64(page)
    processes = []
    # PR_SET_THP_DISABLE as /proc/<pid>/status showed it.
    thp_enabled = snap.header.get("thp_enabled") or [1] * len(snap.pids)
    for pk, own in enumerate(vmas):
        mine = owner == pk
        out = []
        for j, vm in enumerate(own):
            table = np.full((vm["end"] - vm["start"]) // page, lay.none_value, dtype=np.uint64)
            here = mine & (where == j)
            table[((addrs[here] - np.uint64(vm["start"])) // np.uint64(page)).astype(np.int64)] = ptes[here]
            out.append({**{key: val for key, val in vm.items() if key != "end"}, "ptes": table})
        processes.append({"vmas": out, "thp_disable": 0 if thp_enabled[pk] else 1})
    return {"folios": folios, "processes": processes, "files": files}


__all__ = ["from_snapshot", "layout_for", "kernel_of", "replayed_pfns", "pmd_mappings", "MAX_IDENTITY_FRAMES"]

"""The fork study: what batching saves when fork() copies memory mapped by large folios.

For each folio size, a process writes a region of anonymous memory (so every page is an
exclusive, dirty, PTE-mapped page of a folio of that size) and forks, once per kernel. The
counters of the fork alone are compared per PTE: batches, refcount atomics, rmap calls, PTE
writes. ``sim.check()`` runs after every fork.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ._core import PtebatchError, layout
from .simulation import Process, Simulation, format_size, parse_size
from .snapshot import PM_PFN_MASK

#: Largest region the study forks: the simulated RAM grows with it.
MAX_REGION = 64 << 30


@dataclass
class ForkRow:
    size: int
    kernel: str
    ptes: int
    batches: int
    refcount_atomics: int
    rmap_calls: int
    pte_writes: int
    folio_pte_batch_calls: int
    seconds: float
    #: Batches of the fork by length: ``batch_histogram[n]`` batches of ``n`` PTEs.
    batch_histogram: list[int] = field(default_factory=list)

    def per_pte(self, field: str) -> float:
        return getattr(self, field) / self.ptes


def pmd_size(arch: str) -> int:
    """Bytes one page table maps on ``arch`` (the PMD size): page size × PTRS_PER_PTE."""
    lay = layout(arch)
    return lay.page_size * lay.ptrs_per_pte


def folio_sizes(arch: str) -> list[int]:
    """The page size (order 0) and every anonymous mTHP size of ``arch``: order 2 up to PMD
    order (order 1 is not an anonymous mTHP order: THP_ORDERS_ALL_ANON in
    include/linux/huge_mm.h, v6.8 on)."""
    page, pmd = layout(arch).page_size, pmd_size(arch)
    sizes = [page]
    s = page * 4
    while s <= pmd:
        sizes.append(s)
        s *= 2
    return sizes


def check_folio_size(size: int | str, arch: str) -> int:
    """``size`` in bytes if a private anonymous folio can have it on ``arch``, else ValueError."""
    n = parse_size(size)
    sizes = folio_sizes(arch)
    if n not in sizes:
        raise ValueError(f"{format_size(n)} is not an anonymous folio size on {arch} "
                         f"(the page size or a power of two from 4 pages to the PMD size: "
                         f"{', '.join(map(format_size, sizes))})")
    return n


def check_region(region: int | str, arch: str) -> int:
    """``region`` in bytes if it is a positive multiple of the page size up to ``MAX_REGION``."""
    n = parse_size(region)
    page = layout(arch).page_size
    if n <= 0 or n % page:
        raise ValueError(f"region {format_size(n)} is not a positive multiple of the {format_size(page)} page")
    if n > MAX_REGION:
        raise ValueError(f"region {format_size(n)} is larger than {format_size(MAX_REGION)}")
    return n


class Progress:
    """A one-line progress bar on stderr (quiet when stderr is not a terminal)."""

    def __init__(self, total: int, label: str, stream=sys.stderr):
        self.total, self.done, self.label, self.stream = total, 0, label, stream
        self.tty = getattr(stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        if not self.tty:
            return
        width = 30
        fill = width * self.done // self.total
        elapsed = time.perf_counter() - self.t0
        self.stream.write(f"\r{self.label} [{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                          f"{elapsed:5.1f}s {what:<24}")
        if self.done == self.total:
            self.stream.write("\n")
        self.stream.flush()


def fork_study(region: int | str = "1GiB", sizes: Sequence[int | str] | None = None,
               kernels: Sequence[str] = ("6.8", "7.0"), arch: str = "x86-64",
               progress: Callable[[str], None] | None = None) -> list[ForkRow]:
    """Forks a written region of ``region`` bytes once per folio size and kernel. ``sizes``
    defaults to every folio size that divides the region; each must divide it."""
    n = check_region(region, arch)
    if sizes:
        sizes_b = [check_folio_size(s, arch) for s in sizes]
    else:
        sizes_b = [s for s in folio_sizes(arch) if n % s == 0]
    for size in sizes_b:
        if n % size:
            raise ValueError(f"folio size {format_size(size)} does not divide the {format_size(n)} region")
    if not kernels:
        raise ValueError("no kernel to fork under")
    rows = []
    for size in sizes_b:
        for kernel in kernels:
            # Room for the region, its folios' alignment and the page tables' neighbours.
            memory = n + n // 4 + (64 << 20)
            sim = Simulation(arch, kernel, -(-memory // size) * size)
            p = sim.spawn()
            mthp = [size] if size > sim.page_size else []
            v = p.mmap(n, mthp=mthp)
            p.touch(v.start, v.length, write=True)
            _check_folios(sim, p, v.start, n, size)
            t0 = time.perf_counter()
            p.fork()
            dt = time.perf_counter() - t0
            st = sim.last_stats
            sim.check()
            rows.append(ForkRow(size, kernel, n // sim.page_size, st["batches"], st["refcount_atomics"],
                                st["rmap_calls"], st["pte_writes"], st["folio_pte_batch_calls"], dt,
                                list(st["batch_histogram"])))
            if progress:
                progress(f"{format_size(size)} {kernel}")
    return rows


def _check_folios(sim: Simulation, p: Process, start: int, length: int, size: int) -> None:
    """The row is labelled with ``size``: every page of the region must be in such a folio."""
    pfns = (p.pagemap(start, length) & np.uint64(PM_PFN_MASK)).astype(np.int64)
    orders = sim.memory.order[pfns]
    want = size.bit_length() - sim.page_size.bit_length()
    if np.any(orders != want):
        got = sorted({format_size(sim.page_size << int(o)) for o in np.unique(orders)})
        raise PtebatchError(f"the region was faulted in with {', '.join(got)} folios, not only "
                            f"{format_size(size)}; the study cannot label it")


def format_fork_study(rows: list[ForkRow], kernels: Sequence[str]) -> str:
    """The study as a table: per size and kernel, operations per PTE, and the ratio old/new."""
    base, new = kernels[0], kernels[-1]
    lines = [f"{'folio':>6} {'kernel':>6} {'PTEs':>8} {'batches':>8} {'refcount/PTE':>12} "
             f"{'rmap/PTE':>9} {'PTE writes/PTE':>14} {'sim ms':>8}"]
    by = {(r.size, r.kernel): r for r in rows}
    for size in sorted({r.size for r in rows}):
        for k in kernels:
            r = by[(size, k)]
            lines.append(f"{format_size(size):>6} {k:>6} {r.ptes:>8} {r.batches:>8} "
                         f"{r.per_pte('refcount_atomics'):>12.4f} {r.per_pte('rmap_calls'):>9.4f} "
                         f"{r.per_pte('pte_writes'):>14.3f} {r.seconds * 1e3:>8.1f}")
        a, b = by[(size, base)], by[(size, new)]
        lines.append(f"{'':>6} {'ratio':>6} {'':>8} {a.batches / b.batches:>7.0f}x "
                     f"{a.refcount_atomics / b.refcount_atomics:>11.0f}x {a.rmap_calls / b.rmap_calls:>8.0f}x "
                     f"{a.pte_writes / b.pte_writes:>13.2f}x {a.seconds / max(b.seconds, 1e-9):>7.1f}x")
    return "\n".join(lines)

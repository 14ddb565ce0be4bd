"""The fork study: what batching saves when fork() copies memory mapped by large folios.

For each folio size, a process writes a region of anonymous memory (so every page is an
exclusive, dirty, PTE-mapped page of a folio of that size) and forks, once per kernel. The
counters of the fork alone are compared per PTE: batches, refcount atomics, rmap calls, PTE
writes. ``sim.check()`` runs after every fork.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from .simulation import Simulation, format_size, parse_size


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

    def per_pte(self, field: str) -> float:
        return getattr(self, field) / self.ptes


def folio_sizes(arch: str) -> list[int]:
    """4K (order 0) and every mTHP size from 4 pages up to the PMD size of ``arch``."""
    sim = Simulation(arch, "6.18", "4M")
    page = sim.page_size
    pmd = page * (page // 8)
    sizes = [page]
    s = page * 4
    while s <= pmd:
        sizes.append(s)
        s *= 2
    return sizes


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
    """Forks a written region of ``region`` bytes once per folio size and kernel."""
    n = parse_size(region)
    sizes_b = [parse_size(s) for s in sizes] if sizes else folio_sizes(arch)
    rows = []
    for size in sizes_b:
        for kernel in kernels:
            # Room for the region, its folios' alignment and the page tables' neighbours.
            sim = Simulation(arch, kernel, n + (n // 4) + (64 << 20))
            p = sim.spawn()
            mthp = [size] if size > sim.page_size else []
            v = p.mmap(n, mthp=mthp)
            p.touch(v.start, v.length, write=True)
            t0 = time.perf_counter()
            p.fork()
            dt = time.perf_counter() - t0
            st = sim.last_stats
            sim.check()
            rows.append(ForkRow(size, kernel, n // sim.page_size, st["batches"], st["refcount_atomics"],
                                st["rmap_calls"], st["pte_writes"], st["folio_pte_batch_calls"], dt))
            if progress:
                progress(f"{format_size(size)} {kernel}")
    return rows


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

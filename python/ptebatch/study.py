"""The fork study: what batching saves when fork() copies memory mapped by large folios.

For each folio size, a process writes a region of anonymous memory (so every page is an
exclusive, dirty, PTE-mapped page of a folio of that size) and forks, once per kernel. The
counters of the fork alone are compared per PTE: batches, refcount atomics, rmap calls, PTE
writes. With ``pmd=True`` one more row maps the region with PMD THPs (the THP default most
machines run), which fork copies one PMD at a time (``copy_huge_pmd()``) under every kernel.
``sim.check()`` runs after every fork.
"""

from __future__ import annotations

import contextlib
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping, Sequence, TextIO

import numpy as np

from . import seed
from ._core import KERNEL_VERSIONS, PtebatchError, layout
from .simulation import Process, Simulation, format_size, parse_size
from .snapshot import PM_PFN_MASK

NEWEST_KERNEL = KERNEL_VERSIONS[-1]

#: Largest region the study forks: the simulated RAM grows with it.
MAX_REGION = 64 << 30


@dataclass
class ForkRow:
    """One fork of the study: folio size, kernel and the kernel's work in the fork."""

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
    #: The region was mapped by PMD THPs (of the PMD size) instead of by PTEs.
    pmd: bool = False
    #: PMD mappings the fork copied (``copy_huge_pmd()``).
    pmd_copies: int = 0

    def per_pte(self, field: str) -> float:
        """Counter ``field`` divided by the pages forked (PTEs, or pages under the PMDs)."""
        return getattr(self, field) / self.ptes

    @property
    def key(self) -> tuple[int, bool]:
        """Orders and tells apart the rows of one kernel: a PMD row follows the PTE rows of its size."""
        return (self.size, self.pmd)

    @property
    def label(self) -> str:
        """The folio column: the size, with "-pmd" for a PMD-mapped row."""
        return format_size(self.size) + ("-pmd" if self.pmd else "")

    @property
    def cost_counters(self) -> dict[str, int]:
        """The counters the cost model's fork term reads."""
        return {"pte_writes": self.pte_writes, "batches": self.batches, "pmd_copies": self.pmd_copies}


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
    """Progress of a long command on stderr. On a terminal, a bar redrawn in place (and erased
    at the end); otherwise one line every few seconds. Nothing shows for the first second (on a
    terminal) or the first few seconds (otherwise), so quick commands stay silent. A thread
    redraws it, so a step that reports nothing itself (a capture, a snapshot load) still shows
    the time running. Use it as a context manager, or call ``close()``; it also closes when
    ``step()`` reaches ``total``."""

    def __init__(self, total: float, label: str, stream: TextIO | None = None, *, enabled: bool = True,
                 delay: float | None = None, every: float | None = None):
        self.total, self.label = max(float(total), 1e-9), label
        self.stream = sys.stderr if stream is None else stream
        try:
            self.tty = bool(self.stream.isatty())
        except (AttributeError, OSError, ValueError):
            self.tty = False
        self.enabled = enabled
        self.every = every if every is not None else (0.1 if self.tty else 5.0)
        self.delay = delay if delay is not None else (1.0 if self.tty else self.every)
        self.done, self.what = 0.0, ""
        self.t0 = time.monotonic()
        self._width = 0  # of the bar on screen; 0 when none is
        self._shown = ""
        self._lines = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Progress":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self.enabled and self._thread is None and not self._stop.is_set():
            self._thread = threading.Thread(target=self._tick, name=f"progress: {self.label}", daemon=True)
            self._thread.start()

    def update(self, done: float, what: str | None = None) -> None:
        """``done`` of ``total`` finished (fractions welcome), now running ``what``."""
        self.done = min(max(float(done), 0.0), self.total)
        if what is not None:
            self.what = what
        self.start()

    def step(self, what: str = "") -> None:
        """One more of ``total`` finished; ``what`` is what finished."""
        self.update(math.floor(self.done) + 1, what)
        if self.done >= self.total:
            self.close()

    def within(self, step: float, width: float = 1.0) -> Callable[[int, int], None]:
        """A ``Simulation.set_progress`` callback that moves the bar from ``step`` to
        ``step + width`` as the simulation's long step advances."""
        def callback(done: int, total: int) -> None:
            self.update(step + width * done / max(total, 1))
        return callback

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Erases the bar while the caller prints to stdout, which shares the terminal."""
        with self._lock:
            self._erase()
            yield
            sys.stdout.flush()

    def close(self) -> None:
        """Stops the thread; erases the bar on a terminal, says how long it took otherwise."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            self._erase()
            if self._lines:
                self._lines = 0
                try:
                    self.stream.write(f"{self.label}: finished after {self._elapsed()}\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass

    def _erase(self) -> None:
        if self._width:
            try:
                self.stream.write("\r" + " " * self._width + "\r")
                self.stream.flush()
            except (OSError, ValueError):
                pass
            self._width = 0

    def _elapsed(self) -> str:
        s = int(time.monotonic() - self.t0)
        return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"

    def _tick(self) -> None:
        if self._stop.wait(self.delay):
            return
        while True:
            with self._lock:
                if self._stop.is_set():
                    return
                try:
                    self._draw()
                except (OSError, ValueError):
                    return  # stderr went away: the command goes on without it
            if self._stop.wait(self.every):
                return

    def _draw(self) -> None:
        frac = self.done / self.total
        what = f" {self.what}" if self.what else ""
        if not self.tty:
            self.stream.write(f"{self.label}: {frac:.0%} after {self._elapsed()}{what}\n")
            self._lines += 1
            self.stream.flush()
            return
        fill = int(24 * frac)
        text = f"{self.label} [{'#' * fill}{'.' * (24 - fill)}] {frac:4.0%} {self._elapsed():>6}{what}"
        text = text[:79]
        if self._width and text == self._shown:
            return
        self._shown = text
        self.stream.write("\r" + text.ljust(self._width))
        self._width = max(self._width, len(text))
        self.stream.flush()


def fork_study(region: int | str = "1GiB", sizes: Sequence[int | str] | None = None,
               kernels: Sequence[str] = ("6.8", NEWEST_KERNEL), arch: str = "x86-64",
               progress: Progress | None = None, pmd: bool = False) -> list[ForkRow]:
    """Forks a written region of ``region`` bytes once per folio size and kernel. ``sizes``
    defaults to every folio size that divides the region; each must divide it. ``pmd``: also
    the region mapped by PMD THPs (it must be a multiple of the PMD size), after the PTE-mapped
    rows. ``progress`` counts one per fork, its total being ``(len(sizes) + pmd) *
    len(kernels)``; it moves during the writes and the fork too."""
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
    cases = [(size, False) for size in sizes_b]
    if pmd:
        if n % pmd_size(arch):
            raise ValueError(f"the {format_size(n)} region is not a multiple of the "
                             f"{format_size(pmd_size(arch))} PMD size, so PMD THPs cannot map it")
        cases.append((pmd_size(arch), True))
    rows: list[ForkRow] = []
    for size, huge in cases:
        for kernel in kernels:
            step = len(rows)
            if progress:
                progress.update(step, f"{format_size(size)} {'PMD THPs' if huge else 'folios'}, {kernel}")
            # Room for the region, its folios' alignment and the page tables' neighbours.
            memory = n + n // 4 + (64 << 20)
            sim = Simulation(arch, kernel, -(-memory // size) * size)
            p = sim.spawn()
            if huge:
                v = p.mmap(n, pmd=True)
            else:
                v = p.mmap(n, mthp=[size] if size > sim.page_size else [])
            # Writing the region takes about as long as forking it.
            if progress:
                sim.set_progress(progress.within(step, 0.5))
            p.touch(v.start, v.length, write=True)
            _check_folios(sim, p, v.start, n, size)
            if huge and p.vmas()[0].get("anon_huge_pages", 0) != n:
                raise PtebatchError(f"only {p.vmas()[0].get('anon_huge_pages', 0)} bytes of the region "
                                    f"were mapped by PMDs; the study cannot label it")
            if progress:
                sim.set_progress(progress.within(step + 0.5, 0.5))
            t0 = time.perf_counter()
            p.fork()
            dt = time.perf_counter() - t0
            sim.set_progress(None)
            st = sim.last_stats
            sim.check()
            rows.append(ForkRow(size, kernel, n // sim.page_size, st["batches"], st["refcount_atomics"],
                                st["rmap_calls"], st["pte_writes"], st["folio_pte_batch_calls"], dt,
                                list(st["batch_histogram"]), huge, st["pmd_copies"]))
            if progress:
                progress.update(len(rows))
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


def per_pte(x: float) -> str:
    """``x`` with 4 decimals, more when small: at least 4 significant digits (1/8192 of a
    refcount update per PTE for 512M folios of 64K pages is 0.0001221, not 0.0001)."""
    if x <= 0 or not math.isfinite(x):
        return f"{x:.4f}"
    return f"{x:.{max(4, 3 - math.floor(math.log10(x)))}f}"


def ratio_cell(a: float, b: float, digits: int = 0) -> str:
    """``a / b`` as "12x", or "-" where ``b`` is 0 (a PMD row has no batches)."""
    return f"{a / b:.{digits}f}x" if b else "-"


def format_fork_study(rows: list[ForkRow], kernels: Sequence[str],
                      predicted_ns: Mapping[tuple[tuple[int, bool], str], float | None] | None = None) -> str:
    """The study as a table: per folio (``ForkRow.key``) and kernel, operations per PTE, and with
    two kernels or more the ratio of the first (the baseline) to the last. ``predicted_ns`` (per
    row key and kernel, from the cost model) adds the predicted kernel time per GiB and its
    ratio to 4K."""
    base, new = kernels[0], kernels[-1]
    pred = predicted_ns or {}
    page = min(r.size for r in rows) if rows else 1
    head = (f"{'folio':>6} {'kernel':>6} {'PTEs':>8} {'batches':>8} {'refcount/PTE':>12} "
            f"{'rmap/PTE':>9} {'PTE writes/PTE':>14} {'sim ms':>8}")
    if predicted_ns is not None:
        head += f" {'kernel ms/GiB*':>14} {'vs 4K*':>7} {'seed ms/GiB+':>12} {'seed /4K+':>9}"
    lines = [head]
    by = {(r.key, r.kernel): r for r in rows}

    def ms_per_gib(key: tuple[int, bool], k: str) -> float | None:
        ns, r = pred.get((key, k)), by[(key, k)]
        return None if ns is None else ns / 1e6 * (1 << 30) / (r.ptes * page)

    for key in sorted({r.key for r in rows}):
        for k in kernels:
            r = by[(key, k)]
            line = (f"{r.label:>6} {k:>6} {r.ptes:>8} {r.batches:>8} "
                    f"{per_pte(r.per_pte('refcount_atomics')):>12} {per_pte(r.per_pte('rmap_calls')):>9} "
                    f"{per_pte(r.per_pte('pte_writes')):>14} {r.seconds * 1e3:>8.1f}")
            if predicted_ns is not None:
                small = (page, False)
                t, t4 = ms_per_gib(key, k), ms_per_gib(small, k) if (small, k) in by else None
                line += f" {t:>14.2f}" if t is not None else f" {'-':>14}"
                line += f" {t / t4:>6.2f}x" if t is not None and t4 else f" {'-':>7}"
                ms, to4k = _seed_fork(r, k, page)
                line += f" {ms:>12.2f} {to4k:>8.2f}x" if ms is not None and to4k is not None else ""
            lines.append(line.rstrip())
        if base == new:
            continue
        a, b = by[(key, base)], by[(key, new)]
        line = (f"{'':>6} {'ratio':>6} {'':>8} {ratio_cell(a.batches, b.batches):>8} "
                f"{ratio_cell(a.refcount_atomics, b.refcount_atomics):>12} {ratio_cell(a.rmap_calls, b.rmap_calls):>9} "
                f"{ratio_cell(a.pte_writes, b.pte_writes, 2):>14} {a.seconds / max(b.seconds, 1e-9):>7.1f}x")
        if predicted_ns is not None:
            ta, tb = ms_per_gib(key, base), ms_per_gib(key, new)
            line += f" {ta / tb:>13.2f}x" if ta is not None and tb else f" {'-':>14}"
            sa, sb = _seed_fork(a, base, page)[0], _seed_fork(b, new, page)[0]
            line += f" {'':>7} {sa / sb:>11.2f}x" if sa is not None and sb else ""
        lines.append(line.rstrip())
    return "\n".join(lines)


def _seed_fork(r: ForkRow, kernel: str, page: int) -> tuple[float | None, float | None]:
    """The seed series' published fork time of 1 GiB (ms) and its ratio to 4K, for a row the
    seed measured (x86-64, 4 KiB pages, PTE-mapped): before the series for a kernel without
    fork batching (up to 6.8), with it for later kernels."""
    if page != 4096 or r.pmd:
        return None, None
    before = tuple(int(x) for x in kernel.split(".")[:2]) < (6, 9)
    t = seed.FORK_S.get(format_size(r.size))
    to4k = seed.ratio_to_4k("fork", format_size(r.size), before=before)
    return (None, None) if t is None else (t[0 if before else 1] * 1e3, to4k)


def fork_study_legend(kernels: Sequence[str]) -> str:
    """What each column of ``format_fork_study`` means."""
    base, new = kernels[0], kernels[-1]
    ratio = (f"  ratio           {base} / {new}: how many times the work of {new} the baseline {base} does\n"
             if base != new else "")
    return (
        "columns:\n"
        "  folio           size of every folio of the region, mapped by PTEs, one per page; \"-pmd\":\n"
        "                  PMD THPs, one PMD per folio, copied by copy_huge_pmd() (no PTE, no batch)\n"
        "  kernel          the kernel version whose fork() is modelled\n"
        "  PTEs            PTEs the fork copies: one per page of the region (pages, for -pmd)\n"
        "  batches         runs of PTEs copy_present_ptes() handles at once: one per PTE without\n"
        "                  PTE batching (6.8), one per folio with it\n"
        "  refcount/PTE    atomic updates of a folio's reference count (folio_ref_add) per PTE\n"
        "  rmap/PTE        rmap calls (folio_try_dup_anon_rmap_pte[s]) per PTE\n"
        "  PTE writes/PTE  PTE stores per PTE: 2 with or without batching, since fork write-protects\n"
        "                  the parent's PTE (for copy-on-write) and sets the child's (set_ptes);\n"
        "                  batching cuts the calls, not the stores\n"
        "  sim ms          the simulator's own time for the fork: how fast the model runs, not the kernel\n"
        + ratio
    ).rstrip("\n")


def predicted_legend(provenance: str) -> str:
    """What the predicted columns of ``format_fork_study`` mean."""
    return (
        "  kernel ms/GiB*  the kernel's fork time per GiB that the cost model predicts from these\n"
        "                  counters: a linear model fitted to a calibration, not a measurement\n"
        "                  (its held-out error: ptebatch predict --held-out; docs/cost-model.md)\n"
        "  vs 4K*          that prediction over the 4K folio's under the same kernel\n"
        f"  * calibration: {provenance}\n"
        "  seed ms/GiB+    the seed series' measured fork of 1 GiB, before it (v6.8-rc1) on the rows\n"
        "                  of kernels without fork batching, with it on the others; on the ratio\n"
        "                  row, before / with\n"
        "  seed /4K+       that time over the seed's 4K time\n"
        "  + measured, not modelled: the seed series' cover letters (D. Hildenbrand, January\n"
        "    2024; Intel Xeon Silver 4210R, 1 GiB of PTE-mapped folios); other hardware, so\n"
        "    compare the ratios"
    )

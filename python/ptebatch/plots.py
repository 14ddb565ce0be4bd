"""Plots (PNG) of what the package measures: batch-length histograms, operations per PTE,
and a map of a process's page tables coloured by folio order and batch.

Each plot has a data function (plain numbers, tested on their own) and a drawing function
that takes those data and a path, writes a PNG and returns the path. matplotlib is imported
inside the drawing functions, so ``import ptebatch`` does not need it (``pip install
ptebatch[plot]``; docs/reports.md). They use matplotlib's object API (``Figure``, saved by the
Agg renderer), never pyplot: no window opens, and the backend and rcParams of the program that
calls them are left alone.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ._core import batch_lengths, layout
from .simulation import Process, Simulation, format_size

#: The counters the operations plot shows, per PTE: (row field, panel title).
OPS_FIELDS = (("refcount_atomics", "folio refcount atomics"), ("rmap_calls", "rmap calls"),
              ("pte_writes", "PTE writes"), ("batches", "PTE batches"))

#: Codes of PageTableMap.order that are not folio orders.
NONE, NO_VMA, ZERO_PAGE = -1, -2, -3
ZERO_COLOUR, NO_VMA_GREY = (0.95, 0.6, 0.6), 0.85

#: Rows a page-table map shows at most (one row = one page table).
MAP_MAX_ROWS = 1024


_STYLE = {"font.size": 11, "axes.titlesize": 12, "figure.titlesize": 14}


def _matplotlib() -> Any:
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plots need matplotlib: pip install 'ptebatch[plot]' (or matplotlib>=3.7)") from e
    return matplotlib


def _drawing(fn: Callable[..., str]) -> Callable[..., str]:
    """Runs a drawing function with the plots' font sizes, leaving the caller's rcParams as they were."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> str:
        with _matplotlib().rc_context(_STYLE):
            return fn(*args, **kwargs)

    return wrapper


def _figure(figsize: tuple[float, float], nrows: int = 1, ncols: int = 1) -> tuple[Any, Any]:
    """A Figure of matplotlib's object API, drawn by Agg when saved: no pyplot, so no window
    and no change to the backend of a notebook or script that embeds ptebatch."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _cmap(name: str) -> Any:
    return _matplotlib().colormaps[name]


def _swatch(color: Any) -> Any:
    from matplotlib.patches import Rectangle

    return Rectangle((0, 0), 1, 1, color=color)


def _save(fig: Any, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    fig.savefig(path, dpi=100)
    return path


def _grid(n: int, cols: int = 3) -> tuple[int, int]:
    c = min(n, cols)
    return -(-n // c), c


def _spans_decades(values: Sequence[float]) -> bool:
    pos = [v for v in values if v > 0]
    return len(pos) > 1 and max(pos) / min(pos) >= 20


# -- batch-length histograms ------------------------------------------------------------------

def histogram_data(hist: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The batch lengths that occur and how many batches had each: ``hist[n]`` is the number
    of batches of ``n`` PTEs (``Simulation.stats["batch_histogram"]``)."""
    h = np.asarray(hist, dtype=np.int64)
    if h.ndim != 1 or np.any(h < 0):
        raise ValueError("a batch histogram is a list of counts >= 0 indexed by batch length")
    lengths = np.nonzero(h)[0]
    lengths = lengths[lengths > 0]
    return lengths, h[lengths]


def fork_histograms(rows: Sequence[Any]) -> dict[str, dict[str, list[int]]]:
    """The fork study's histograms (``study.ForkRow.batch_histogram``) as
    ``{folio size: {kernel: histogram}}``, sizes in increasing order."""
    out: dict[str, dict[str, list[int]]] = {}
    for r in sorted(rows, key=lambda r: r.key):
        if r.pmd:
            continue  # one PMD per folio: no PTE batch to show
        out.setdefault(r.label, {})[r.kernel] = list(r.batch_histogram)
    return out


@_drawing
def batch_histogram(panels: Mapping[str, Mapping[str, Sequence[int]]], path: str | os.PathLike,
                    title: str = "PTE batches by length") -> str:
    """One panel per key of ``panels`` (a folio size, a case), bars per series (a kernel):
    how many batches of each length (PTEs per batch) were formed. Both axes are log2/log10."""
    if not panels:
        raise ValueError("no histogram to plot")
    from matplotlib.ticker import FixedLocator, NullLocator

    nrows, ncols = _grid(len(panels))
    fig, axes = _figure((max(9.0, 4.6 * ncols), 3.4 * nrows + 1.4), nrows, ncols)
    series = list(dict.fromkeys(s for p in panels.values() for s in p))
    colors = {s: _cmap("tab10")(i % 10) for i, s in enumerate(series)}
    for ax, (label, hists) in zip(axes.flat, panels.items()):
        top = 1
        for i, s in enumerate(series):
            if s not in hists:
                continue
            lengths, counts = histogram_data(hists[s])
            # Bars side by side around each length, on a log2 axis: edges in log space.
            k = len(series)
            left = lengths * 2.0 ** (-0.4 + 0.8 * i / k)
            right = lengths * 2.0 ** (-0.4 + 0.8 * (i + 1) / k)
            ax.bar(left, counts, width=right - left, align="edge", color=colors[s], label=s)
            if len(lengths):
                top = max(top, int(lengths.max()))
        ax.set_xscale("log", base=2)
        ticks = [2 ** e for e in range(0, max(1, math.ceil(math.log2(top))) + 1)]
        if len(ticks) > 8:
            ticks = sorted({1, *ticks[::-2]} - {2})  # every other power from the top, and 1
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlim(0.5, top * 2)
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.set_title(label)
        ax.set_xlabel("batch length (PTEs)")
        ax.set_ylabel("batches")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    handles = [_swatch(colors[s]) for s in series]
    fig.legend(handles, series, loc="outside lower center", title="kernel", ncols=min(len(series), 6))
    fig.suptitle(title)
    return _save(fig, path)


# -- operations per PTE -----------------------------------------------------------------------

@dataclass
class OpsData:
    """Operations per PTE: ``values[series][field][i]`` for category ``categories[i]``
    (NaN where the series has no such category)."""

    categories: list[str]
    values: dict[str, dict[str, list[float]]]


def fork_ops_data(rows: Sequence[Any]) -> OpsData:
    """The fork study's rows per folio size (categories) and kernel (series)."""
    keys = sorted({r.key for r in rows})
    kernels = list(dict.fromkeys(r.kernel for r in rows))
    by = {(r.key, r.kernel): r for r in rows}
    labels = {r.key: r.label for r in rows}
    values = {k: {f: [by[(s, k)].per_pte(f) if (s, k) in by else math.nan for s in keys]
                  for f, _ in OPS_FIELDS} for k in kernels}
    return OpsData([labels[s] for s in keys], values)


def _series(r: Mapping[str, Any]) -> str:
    return r["kernel"] + ("" if r["batching"] else " per-PTE")


def _step_key(r: Mapping[str, Any]) -> str:
    return r["step"] + (f" x{r['iteration']}" if r["iteration"] else "")


def scenario_ops_data(rows: Sequence[Mapping[str, Any]], *, case: str | None = None,
                      step: str | None = None) -> OpsData:
    """Scenario rows (``scenario.run()``) per PTE. With ``case``: that case's steps are the
    categories. With ``step`` (a step label, "5.2 x3" inside a repeat): that step in every
    case. Steps that cover no PTE (``ptes == 0``) and totals are left out."""
    if (case is None) == (step is None):
        raise ValueError("give exactly one of case and step")
    keep = [r for r in rows if r["step"] != "total" and r["ptes"]
            and (r["case"] == case if case is not None else _step_key(r) == step)]

    def cat(r: Mapping[str, Any]) -> str:
        if case is not None:
            where = "/".join(x for x in (r["process"], r["vma"]) if x)
            return f"{_step_key(r)} {r['op']}\n{where}"
        return r["case"] or "(no sweep)"

    cats = list(dict.fromkeys(cat(r) for r in keep))
    series = list(dict.fromkeys(_series(r) for r in keep))
    values = {s: {f: [math.nan] * len(cats) for f, _ in OPS_FIELDS} for s in series}
    for r in keep:
        i = cats.index(cat(r))
        for f, _ in OPS_FIELDS:
            values[_series(r)][f][i] = r[f] / r["ptes"]
    return OpsData(cats, values)


@_drawing
def ops_per_pte(data: OpsData, path: str | os.PathLike, title: str = "operations per PTE",
                xlabel: str = "folio size") -> str:
    """Four panels (refcount atomics, rmap calls, PTE writes, batches, each per PTE), grouped
    bars per category and series; a log scale where a panel's values span decades."""
    if not data.categories:
        raise ValueError("no row covers a PTE: nothing to plot")
    n, series = len(data.categories), list(data.values)
    width = max(8.0, min(22.0, 1.6 + n * (0.5 + 0.22 * len(series))))
    fig, axes = _figure((width, 7.8), 2, 2)
    colors = {s: _cmap("tab10")(i % 10) for i, s in enumerate(series)}
    bw = 0.8 / len(series)
    x = np.arange(n)
    for ax, (f, name) in zip(axes.flat, OPS_FIELDS):
        vals = [v for s in series for v in data.values[s][f] if not math.isnan(v)]
        log = _spans_decades(vals)
        for i, s in enumerate(series):
            ys = np.array(data.values[s][f], dtype=float)
            xs = x - 0.4 + bw * (i + 0.5)
            shown = ~np.isnan(ys) & ((ys > 0) if log else True)
            ax.bar(xs[shown], ys[shown], width=bw, color=colors[s], label=s)
            for xx, yy in zip(xs, ys):
                if yy == 0:  # an empty bar is not a missing one
                    ax.annotate("0", (xx, 0), xytext=(0, 2), textcoords="offset points", ha="center",
                                va="bottom", fontsize=8, color=colors[s], xycoords=("data", "axes fraction"))
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0, top=None if any(v > 0 for v in vals) else 1)
        ax.set_title(f"{name} per PTE" + (" (log scale)" if log else ""))
        ax.set_ylabel("per PTE")
        ax.set_xticks(x)
        flat = n * max(len(c) for c in data.categories) <= 6 * width
        ax.set_xticklabels(data.categories, fontsize=9 if flat else 8,
                           rotation=0 if flat else 30, ha="center" if flat else "right")
        ax.set_xlabel(xlabel)
        ax.grid(True, axis="y", alpha=0.3)
    handles = [_swatch(colors[s]) for s in series]
    fig.legend(handles, series, loc="outside lower center", title="kernel", ncols=min(len(series), 6))
    fig.suptitle(title)
    return _save(fig, path)


# -- the page-table map -----------------------------------------------------------------------

@dataclass
class PageTableMap:
    """A process's page tables as an image: row ``i`` is the page table that maps from
    ``table_addrs[i]``, column ``j`` its ``j``-th entry. ``order`` is the folio order of the
    page mapped there, ``NONE`` (-1) for pte_none inside a VMA, ``NO_VMA`` (-2) outside every
    VMA, ``ZERO_PAGE`` (-3) for the shared zero page; ``batch`` counts
    the batches ``folio_pte_batch()`` cuts (for fork, under ``kernel``) along the VMA,
    -1 where no page is mapped."""

    arch: str
    kernel: str
    page_size: int
    table_addrs: np.ndarray
    order: np.ndarray
    batch: np.ndarray
    nr_tables: int

    @property
    def pmd_order(self) -> int:
        return self.order.shape[1].bit_length() - 1


def page_table_map_data(sim: Simulation, process: Process, kernel: str | None = None,
                        max_rows: int = MAP_MAX_ROWS) -> PageTableMap:
    """The map of ``process``'s VMAs (``process.ptes``), folio orders from ``sim.memory.order``
    and batches from ``batch_lengths()`` with the folios of the mapped pages."""
    kernel = kernel or sim.kernel
    lay = layout(sim.arch)
    ptrs, shift = lay.ptrs_per_pte, lay.page_shift
    vmas = process.vmas()
    tables = sorted({vpn // ptrs for v in vmas
                     for vpn in range(v["start"] >> shift, v["end"] >> shift, ptrs)}
                    | {((v["end"] >> shift) - 1) // ptrs for v in vmas})
    nr_tables = len(tables)
    tables = tables[:max_rows]
    tarr = np.array(tables, dtype=np.int64)
    order = np.full((len(tables), ptrs), NO_VMA, dtype=np.int16)
    batch = np.full((len(tables), ptrs), -1, dtype=np.int64)
    orders = sim.memory.order
    nbatch = 0
    for v in vmas:
        ptes = process.ptes(v["start"])
        first = v["start"] >> shift
        present = lay.pte_present(ptes)
        pfns = lay.pte_pfn(ptes).astype(np.int64)
        o = np.full(len(ptes), NONE, dtype=np.int16)
        ok = present & (pfns < len(orders))
        o[ok] = orders[pfns[ok]]
        o[present & (pfns == sim.zero_pfn)] = ZERO_PAGE
        folio = o >= 0
        heads = np.unique(pfns[folio] & ~((np.int64(1) << o[folio].astype(np.int64)) - 1))
        nr = (np.int64(1) << orders[heads].astype(np.int64)) if len(heads) else heads
        lengths = batch_lengths(ptes, layout=lay, kernel=kernel, folio_start=heads.astype(np.uint64),
                                folio_nr_pages=nr.astype(np.uint64), first_vpn=first, shared=v["shared"])
        b = np.repeat(np.arange(nbatch, nbatch + len(lengths)), lengths.astype(np.int64))
        nbatch += len(lengths)
        b[o == NONE] = -1
        vpns = np.arange(first, first + len(ptes))
        t = vpns // ptrs
        rows = np.minimum(np.searchsorted(tarr, t), len(tarr) - 1)
        sel = tarr[rows] == t
        order[rows[sel], vpns[sel] % ptrs] = o[sel]
        batch[rows[sel], vpns[sel] % ptrs] = b[sel]
    addrs = np.array(tables, dtype=np.int64) * ptrs << shift
    return PageTableMap(sim.arch, kernel, lay.page_size, addrs, order, batch, nr_tables)


@_drawing
def page_table_map(data: PageTableMap, path: str | os.PathLike, title: str | None = None) -> str:
    """Draws the map: colour = folio order, consecutive batches in alternating shades (the
    darker one every other batch), white = pte_none, light grey = no VMA."""
    if not len(data.table_addrs):
        raise ValueError("the process maps nothing: no page table to draw")
    from matplotlib.patches import Patch

    rows, ptrs = data.order.shape
    cmap = _cmap("viridis")
    top = max(data.pmd_order, 1)
    palette = {o: np.array(cmap(0.1 + 0.85 * o / top)[:3]) for o in range(top + 1)}
    img = np.ones((rows, ptrs, 3))
    img[data.order == NO_VMA] = NO_VMA_GREY
    img[data.order == ZERO_PAGE] = ZERO_COLOUR
    for o in np.unique(data.order[data.order >= 0]).tolist():
        img[data.order == o] = palette[o]
    odd = (data.batch >= 0) & (data.batch % 2 == 1)
    img[odd] = img[odd] * 0.6
    height = min(12.0, max(3.2, 1.8 + rows * 0.12))
    fig, axes = _figure((12, height))
    ax = axes[0, 0]
    ax.imshow(img, aspect="auto", interpolation="nearest", extent=(0, ptrs, rows, 0))
    step = max(1, -(-rows // 16))
    ax.set_yticks(np.arange(0, rows, step) + 0.5)
    ax.set_yticklabels([f"{a:#x}" for a in data.table_addrs[::step].tolist()], fontsize=9)
    # A line where consecutive rows are not consecutive page tables (a gap in the address space).
    span = ptrs * data.page_size
    for i in np.nonzero(np.diff(data.table_addrs) != span)[0].tolist():
        ax.axhline(i + 1, color="black", linewidth=0.8)
    xt = np.linspace(0, ptrs, 9)
    ax.set_xticks(xt)
    ax.set_xticklabels([f"+{format_size(int(t) * data.page_size)}" if t else "+0" for t in xt])
    ax.set_xlabel(f"offset in the page table ({ptrs} entries of {format_size(data.page_size)} pages)")
    ax.set_ylabel("page table's virtual address")
    present = sorted(set(np.unique(data.order[data.order >= 0]).tolist()))
    handles = [Patch(facecolor=palette[o], label=f"{format_size(data.page_size << o)} folio (order {o})")
               for o in present]
    handles.append(Patch(facecolor=palette[present[0]] * 0.6 if present else (0.5, 0.5, 0.5),
                         label="every other batch: darker"))
    if np.any(data.order == ZERO_PAGE):
        handles.append(Patch(facecolor=ZERO_COLOUR, label="shared zero page"))
    handles.append(Patch(facecolor="white", edgecolor="black", label="pte_none"))
    handles.append(Patch(facecolor=(NO_VMA_GREY,) * 3, edgecolor="black", label="no VMA"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    more = f" (first {rows} of {data.nr_tables} page tables)" if data.nr_tables > rows else ""
    ax.set_title((title or f"page tables on {data.arch}") + f"; batches as fork cuts them under {data.kernel}{more}")
    return _save(fig, path)


__all__ = ["OPS_FIELDS", "OpsData", "PageTableMap", "batch_histogram", "fork_histograms", "fork_ops_data",
           "histogram_data", "ops_per_pte", "page_table_map", "page_table_map_data", "scenario_ops_data"]


# -- predicted vs measured kernel time ----------------------------------------------------------

@dataclass
class TimeComparison:
    """Per operation, per folio size (in calibration order): the kernel's measured and the cost
    model's predicted ns per PTE, and whether the size was held out of the fit."""

    operations: dict[str, tuple[list[str], list[float], list[float], list[bool]]]


def predicted_vs_measured_data(rows: Sequence[Any]) -> TimeComparison:
    """``rows``: ``ptebatch.cost.HeldOutRow``s (``cost.held_out()``'s second value)."""
    ops: dict[str, tuple[list[str], list[float], list[float], list[bool]]] = {}
    for r in rows:
        sizes, meas, pred, held = ops.setdefault(r.operation, ([], [], [], []))
        sizes.append(r.folio_size)
        meas.append(float(r.measured_ns_per_pte))
        pred.append(float(r.predicted_ns_per_pte))
        held.append(bool(r.held_out))
    return TimeComparison(ops)


@_drawing
def predicted_vs_measured(data: TimeComparison, path: str | os.PathLike,
                          title: str = "kernel time per PTE: measured vs the cost model") -> str:
    """One panel per operation: measured and predicted ns per PTE per folio size; sizes held
    out of the fit are marked with an asterisk and hatched bars."""
    if not data.operations:
        raise ValueError("no measurement to compare")
    nrows, ncols = _grid(len(data.operations), 2)
    fig, axes = _figure((6.2 * ncols, 3.6 * nrows + 1.2), nrows, ncols)
    colors = {"measured": _cmap("tab10")(0), "predicted": _cmap("tab10")(1)}
    for ax, (op, (sizes, meas, pred, held)) in zip(axes.flat, data.operations.items()):
        x = np.arange(len(sizes))
        for off, (label, vals) in zip((-0.2, 0.2), (("measured", meas), ("predicted", pred))):
            bars = ax.bar(x + off, vals, width=0.4, color=colors[label], label=label)
            for b, h in zip(bars, held):
                if h:
                    b.set_hatch("//")
        ax.set_xticks(x, [f"{s}*" if h else s for s, h in zip(sizes, held)], rotation=30)
        if _spans_decades(meas + pred):
            ax.set_yscale("log")
        ax.set_title(op)
        ax.set_xlabel("folio size (* held out of the fit)")
        ax.set_ylabel("ns per PTE")
        ax.grid(True, axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(data.operations):]:
        ax.set_visible(False)
    fig.legend([_swatch(colors["measured"]), _swatch(colors["predicted"])], ["measured", "predicted"],
               loc="outside lower center", ncols=2)
    fig.suptitle(title)
    return _save(fig, path)

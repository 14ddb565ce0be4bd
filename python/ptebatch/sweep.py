"""Sweeps: scenario files and snapshots run over a grid of layouts × kernels × folio sizes, one
task per grid point, on Dask (``ptebatch sweep``; docs/sweeps.md).

>>> points = plan(["examples/fork-munmap-matrix.toml"], kernels=["6.8", "7.0"],
...               arches=["x86-64", "arm64-4k"], sizes=["64K", "2M"])      # doctest: +SKIP
>>> rows = run(points, workers=4)                                         # doctest: +SKIP
>>> rows == run(points, engine="serial")                                  # doctest: +SKIP
True

A grid point is a :class:`Point`; :func:`run_point` runs it: a pure function of the point that
loads the scenario (or the snapshot) and builds its own ``Simulation``, so points are independent
and their rows deterministic. A point that fails gives one row with ``status == "error"`` and the
error, instead of stopping the sweep. :func:`run` gathers the rows in grid order, whatever the
order the tasks complete in. ``dask.distributed`` is imported only when the Dask engine is used.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from . import KERNEL_VERSIONS, LAYOUT_NAMES, NEWEST_KERNEL
from . import scenario
from .scenario import COUNTERS, ROW_FIELDS, ScenarioError
from .simulation import Simulation, format_size, parse_size

#: The grid coordinates and the point's outcome, then the fields of ``ptebatch run``'s rows
#: (which carry the kernel). ``folio_size`` is in bytes, empty for a source without one.
SWEEP_FIELDS = ("source", "arch", "folio_size", "status", "error", *ROW_FIELDS)

#: The ``[params]`` names ``--size`` sets, first found wins: the examples call the folio size
#: ``folio_size`` (fork-munmap-matrix.toml) or ``thp`` (the cow-*.toml files).
SIZE_PARAMS = ("folio_size", "thp")

#: The ``[params]`` name ``--arch`` sets when a scenario declares it; otherwise ``--arch``
#: replaces ``[machine] arch``.
ARCH_PARAM = "arch"

#: Kernels of a snapshot when none are given (as ``ptebatch replay``).
SNAPSHOT_KERNELS = ("6.8", NEWEST_KERNEL)

ENGINES = ("dask", "serial")


@dataclass(frozen=True)
class Point:
    """One grid point: everything its task needs, so that it runs anywhere the files can be read."""

    #: The source as given (the ``source`` field of the rows) and its absolute path.
    source: str
    path: str
    #: ``"scenario"`` (a TOML file) or ``"snapshot"`` (.npz, replayed and forked).
    kind: str
    #: The scenario's name (the ``scenario`` field), also for a point that fails to load.
    name: str
    arch: str
    kernel: str
    #: Bytes, set as the scenario's ``size_param``; None: the source has no folio-size axis.
    folio_size: int | None = None
    size_param: str | None = None
    #: Whether the arch is set as the scenario's ``arch`` parameter rather than ``[machine] arch``.
    arch_param: bool = False
    #: ``--set`` values the scenario declares, as sorted (name, value) pairs.
    params: tuple[tuple[str, Any], ...] = ()

    @property
    def coordinates(self) -> dict[str, Any]:
        return {"source": self.source, "arch": self.arch,
                "folio_size": "" if self.folio_size is None else self.folio_size}


# -- the grid ----------------------------------------------------------------------------------

def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, list) else [v]


def _size_bytes(v: Any, where: str = "") -> int:
    prefix = f"{where}: " if where else ""
    try:
        n = parse_size(v)
    except (TypeError, ValueError) as e:
        raise ScenarioError(f"{prefix}{e}") from None
    if n == 0:
        raise ScenarioError(f"{prefix}size {v!r} is zero")
    if n & (n - 1):
        raise ScenarioError(f"{prefix}size {v!r} is not a power of two")
    return n


def plan(sources: Sequence[str | os.PathLike[str]], *, kernels: Sequence[str] | None = None,
         arches: Sequence[str] | None = None, sizes: Sequence[int | str] | None = None,
         size_param: str | None = None, params: dict[str, Any] | None = None,
         notes: list[str] | None = None) -> list[Point]:
    """The grid points, in order: per source (as given), per arch, per kernel, per folio size.

    A scenario file (``.toml``) runs under ``kernels`` (default: its own), ``arches`` (default:
    its own) and ``sizes`` (default: the values of its folio-size parameter, ``size_param`` or
    the first of :data:`SIZE_PARAMS` it declares); ``params`` are ``--set`` values, each given
    to the scenarios that declare it. A snapshot (``.npz``) replays on its own layout, with no
    size axis, under ``kernels`` (default 6.8 and the newest). Each file is read and checked
    here: a bad scenario raises :class:`ScenarioError`, a bad snapshot ``SnapshotError``.
    Where a coordinate does not apply to a source, a line is added to ``notes``."""
    if not sources:
        raise ValueError("no source to sweep: give scenario files (.toml) or snapshots (.npz)")
    for k in kernels or ():
        if k not in KERNEL_VERSIONS:
            raise ValueError(f"unknown kernel {k!r}; known: {', '.join(KERNEL_VERSIONS)}")
    for a in arches or ():
        if a not in LAYOUT_NAMES:
            raise ValueError(f"unknown arch {a!r}; known: {', '.join(LAYOUT_NAMES)}")
    size_list = [_size_bytes(s) for s in sizes or ()]
    params = dict(params or {})
    notes = [] if notes is None else notes
    used: set[str] = set()
    points: list[Point] = []
    for src in dict.fromkeys(os.fspath(s) for s in sources):
        path = os.path.abspath(src)
        if src.endswith(".npz"):
            points += _snapshot_points(src, path, kernels, arches, size_list, notes)
        else:
            points += _scenario_points(src, path, kernels, arches, size_list, size_param, params,
                                       used, notes)
    unused = [k for k in params if k not in used]
    if unused:
        raise ScenarioError(f"argument --set: no scenario declares parameter {unused[0]!r}")
    return points


def _snapshot_points(src: str, path: str, kernels, arches, sizes, notes) -> list[Point]:
    from .errors import SnapshotError
    from .replay import layout_for
    from .snapshot import Snapshot

    snap = Snapshot.load(path)
    try:
        arch = layout_for(snap.header["arch"], snap.page_size)
    except KeyError:
        raise SnapshotError(f"{src}: no layout for {snap.header['arch']} with "
                            f"{format_size(snap.page_size)} pages") from None
    if arches and arch not in arches:
        notes.append(f"{src}: a snapshot replays only on its own layout, {arch}")
    if sizes:
        notes.append(f"{src}: a snapshot has no folio-size axis (its folios are captured)")
    name = os.path.splitext(os.path.basename(src))[0]
    return [Point(src, path, "snapshot", name, arch, k) for k in kernels or SNAPSHOT_KERNELS]


def _scenario_points(src: str, path: str, kernels, arches, sizes, size_param, params, used,
                     notes) -> list[Point]:
    doc = scenario._read_toml(path)
    declared = doc.get("params", {})
    declared = declared if isinstance(declared, dict) else {}
    mine = {k: v for k, v in params.items() if k in declared}
    used.update(mine)
    values = {**declared, **mine}
    arch_param = ARCH_PARAM in declared
    # Check the file as it stands (one arch: a scenario may not mix them).
    check = dict(mine)
    if arch_param:
        check[ARCH_PARAM] = _as_list(values[ARCH_PARAM])[0]
    sc = scenario.load(path, check)
    names = [size_param] if size_param else list(SIZE_PARAMS)
    sparam = next((n for n in names if n in declared), None)
    if sparam is None:
        axis: list[int | None] = [None]
        if sizes:
            notes.append(f"{src}: no folio-size parameter ({' or '.join(names)} in [params]): "
                         f"runs once per arch and kernel")
    elif sizes:
        axis = list(sizes)
    else:
        axis = list(dict.fromkeys(_size_bytes(v, f"{src}: [params] {sparam}")
                                  for v in _as_list(values[sparam])))
    own = [str(a) for a in _as_list(values[ARCH_PARAM])] if arch_param else [sc.arch]
    rest = tuple(sorted((k, v) for k, v in mine.items() if k not in (sparam, ARCH_PARAM)))
    return [Point(src, path, "scenario", sc.name, a, k, s, sparam, arch_param, rest)
            for a in (arches or own) for k in (kernels or sc.kernels) for s in axis]


# -- one grid point ----------------------------------------------------------------------------

def run_point(p: Point) -> list[dict[str, Any]]:
    """The rows (fields :data:`SWEEP_FIELDS`) of one grid point: those ``ptebatch run`` gives
    for the scenario under the point's kernel (every case and batching mode), or, for a
    snapshot, a fork of each process. Never raises for an error of the point: it is returned
    as one row with ``status == "error"``."""
    try:
        rows = _scenario_rows(p) if p.kind == "scenario" else _snapshot_rows(p)
    except Exception as e:
        return [error_row(p, e)]
    return [{**p.coordinates, "status": "ok", "error": "", **r} for r in rows]


def error_row(p: Point, e: BaseException, message: str | None = None) -> dict[str, Any]:
    """The row of a point that failed with ``e`` (or ``message`` about it): its coordinates,
    and empty counters."""
    row: dict[str, Any] = {k: "" for k in SWEEP_FIELDS}
    text = " ".join((message or str(e)).split()) or ("out of memory" if isinstance(e, MemoryError) else "")
    # Name the file as the user gave it, as the rest of the row does.
    text = text.replace(p.path, p.source)
    row.update(p.coordinates, status="error", error=f"{type(e).__name__}: {text}".rstrip(": "),
               scenario=p.name, kernel=p.kernel)
    return row


def _scenario_rows(p: Point) -> list[dict[str, Any]]:
    params = dict(p.params)
    if p.size_param is not None:
        params[p.size_param] = p.folio_size
    if p.arch_param:
        params[ARCH_PARAM] = p.arch
    sc = scenario.load(p.path, params, arch=None if p.arch_param else p.arch)
    return scenario.run(sc, [p.kernel])


def _snapshot_rows(p: Point) -> list[dict[str, Any]]:
    """``ptebatch replay``: the snapshot rebuilt under the kernel, and each process forked."""
    sim, procs = Simulation.from_snapshot(p.path, p.kernel)
    if sim.arch != p.arch:
        raise ValueError(f"{p.source}: replays on {sim.arch}, not {p.arch}")
    rows = []
    page = sim.page_size
    for i, pid in enumerate(sorted(procs), 1):
        proc = procs[pid]
        mapped = sum((m["end"] - m["start"]) // page for m in proc.vmas())
        before, free = sim.stats, sim.free_pages
        proc.fork()
        sim.check()
        after = sim.stats
        row: dict[str, Any] = {"scenario": p.name, "case": "", "kernel": p.kernel, "batching": True,
                               "step": str(i), "iteration": 0, "op": "fork", "process": f"pid{pid}",
                               "vma": "", "ptes": mapped}
        for k in COUNTERS:
            row[k] = int(after[k]) - int(before[k])
        hist = [a - b for a, b in itertools.zip_longest(after["batch_histogram"],
                                                        before["batch_histogram"], fillvalue=0)]
        row["batched_ptes"] = sum(n * h for n, h in enumerate(hist))
        row["free_pages"] = sim.free_pages
        row["pages_freed"] = sim.free_pages - free
        rows.append(row)
    total: dict[str, Any] = {k: "" for k in ROW_FIELDS}
    total.update(scenario=p.name, case="", kernel=p.kernel, batching=True, step="total",
                 iteration=0, op="total", free_pages=sim.free_pages)
    for k in ("ptes", *COUNTERS, "batched_ptes", "pages_freed"):
        total[k] = sum(r[k] for r in rows)
    return rows + [total]


# -- running the grid --------------------------------------------------------------------------

def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@contextlib.contextmanager
def dask_client(workers: int | None = None, threads_per_worker: int = 1,
                scheduler: str | None = None) -> Iterator[Any]:
    """A ``distributed.Client`` of the cluster at ``scheduler``, or of a ``LocalCluster`` of
    ``workers`` processes (default: one per core) on 127.0.0.1 without a dashboard, closed on
    exit."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError as e:
        from .errors import PtebatchError

        raise PtebatchError(f"the Dask engine needs dask.distributed ({e}): pip install "
                            f"'dask[distributed]', or run the grid in this process (--sequential)") from None
    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if threads_per_worker < 1:
        raise ValueError(f"threads_per_worker must be at least 1, not {threads_per_worker}")
    # A task that kills its worker (the host out of memory) fails its point after one retry,
    # not three: it would kill more workers. (A point queued on the same worker is retried too.)
    with dask.config.set({"distributed.scheduler.allowed-failures": 1}):
        with LocalCluster(n_workers=workers or default_workers(), threads_per_worker=threads_per_worker,
                          processes=True, host="127.0.0.1", dashboard_address=None,
                          # The scheduler's HTTP server (health checks) on a free port, not
                          # 8787, which another cluster may hold.
                          scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
                          silence_logs=logging.CRITICAL) as cluster, Client(cluster) as client:
            yield client


def run(points: Sequence[Point], *, engine: str = "dask", client: Any = None, workers: int | None = None,
        threads_per_worker: int = 1, scheduler: str | None = None,
        progress: Callable[[int, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Runs every point and returns their rows in grid order (the order of ``points``).

    ``engine="serial"`` runs :func:`run_point` here, one point after the other; ``"dask"``
    submits one task per point to ``client``, or to a cluster :func:`dask_client` makes from
    ``workers``, ``threads_per_worker`` and ``scheduler``. ``progress(done, total, failed)``
    is called as points complete."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    results: list[list[dict[str, Any]]] = [[] for _ in points]
    failed = 0

    def done(i: int, rows: list[dict[str, Any]], n: int) -> None:
        nonlocal failed
        results[i] = rows
        failed += rows[0]["status"] != "ok"
        if progress:
            progress(n, len(points), failed)

    if engine == "serial":
        for i, p in enumerate(points):
            done(i, run_point(p), i + 1)
    elif client is not None:
        _run_dask(client, points, done)
    else:
        # A local cluster never has more workers than points: each would only sit idle (and a
        # mistyped --workers 100000 would start that many processes).
        n = min(workers or default_workers(), max(len(points), 1))
        with dask_client(n, threads_per_worker, scheduler) as c:
            _run_dask(c, points, done)
    return [r for rows in results for r in rows]


def _run_dask(client: Any, points: Sequence[Point], done: Callable[[int, list, int], None]) -> None:
    from distributed import KilledWorker, as_completed

    futures = [client.submit(run_point, p, pure=False) for p in points]
    index = {f.key: i for i, f in enumerate(futures)}
    try:
        for n, f in enumerate(as_completed(futures), 1):
            i = index[f.key]
            try:
                rows = f.result()
            except KilledWorker as e:
                rows = [error_row(points[i], e, "its worker process died running it (out of host "
                                  "memory? a local cluster gives each worker an equal share of the RAM)")]
            except Exception as e:
                # Not the point's error (run_point returns those) but the task's: a worker
                # that could not run it.
                rows = [error_row(points[i], e)]
            f.release()
            done(i, rows, n)
    finally:
        client.cancel(futures)


# -- output ------------------------------------------------------------------------------------

_TABLE = (("PTEs", "ptes"), ("batches", "batches"), ("refcount", "refcount_atomics"),
          ("rmap", "rmap_calls"), ("PTE rd", "pte_reads"), ("PTE wr", "pte_writes"),
          ("TLB", "tlb_flush_ranges"), ("faults", "faults"), ("COW cp", "cow_copies"),
          ("copied", "pages_copied"))


def failures(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["status"] != "ok"]


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """One line per grid point, case and batching mode: the run's totals; then the errors."""
    shown = [r for r in rows if r["status"] != "ok" or r["step"] == "total"]
    width = max([len(r["source"]) for r in shown] + [6])
    head = (f"{'source':<{width}} {'arch':<12} {'kernel':<12} {'size':>5} {'case':<16} {'status':<6}"
            + "".join(f" {h:>9}" for h, _ in _TABLE))
    out = [head]
    for r in shown:
        size = format_size(r["folio_size"]) if r["folio_size"] != "" else "-"
        kernel = r["kernel"] + ("" if r["batching"] is not False else " per-PTE")
        ok = r["status"] == "ok"
        out.append(f"{r['source']:<{width}} {r['arch']:<12} {kernel:<12} {size:>5} {r['case'][:16]:<16} "
                   f"{r['status']:<6}" + "".join(f" {r[f] if ok else '':>9}" for _, f in _TABLE))
    bad = failures(rows)
    if bad:
        out += ["", "errors:"]
        for r in bad:
            size = f" {format_size(r['folio_size'])}" if r["folio_size"] != "" else ""
            out.append(f"  {r['source']} {r['arch']} {r['kernel']}{size}: {r['error']}")
    points = len({(r["source"], r["arch"], r["kernel"], r["folio_size"]) for r in rows})
    out += ["", f"{points} grid points, {len({(r['source'], r['arch'], r['kernel'], r['folio_size']) for r in bad})} "
                f"failed; totals per run (--json or --csv give every step and counter; "
                f"the columns: ptebatch run's legend, docs/scenarios.md)"]
    return "\n".join(out)


def to_json(rows: Sequence[dict[str, Any]]) -> str:
    points = {(r["source"], r["arch"], r["kernel"], r["folio_size"]) for r in rows}
    bad = {(r["source"], r["arch"], r["kernel"], r["folio_size"]) for r in failures(rows)}
    doc = {"format": "ptebatch-sweep-results", "version": 1, "fields": list(SWEEP_FIELDS),
           "points": len(points), "failed": len(bad), "rows": list(rows)}
    return json.dumps(doc, indent=1) + "\n"


def to_csv(rows: Sequence[dict[str, Any]]) -> str:
    return scenario.to_csv(rows, SWEEP_FIELDS)


# -- the `ptebatch sweep` command --------------------------------------------------------------

def _list_of(parse: Callable[[str], Any]) -> Callable[[str], list]:
    def parse_list(text: str) -> list:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError("nothing given")
        return [v for t in items for v in _as_list(parse(t))]

    return parse_list


def _arch(text: str) -> list[str] | str:
    if text == "all":
        return list(LAYOUT_NAMES)
    if text not in LAYOUT_NAMES:
        raise argparse.ArgumentTypeError(f"unknown arch {text!r}; expected \"all\" or some of "
                                         f"{', '.join(LAYOUT_NAMES)}")
    return text


def _kernel(text: str) -> list[str] | str:
    if text == "all":
        return list(KERNEL_VERSIONS)
    if text not in KERNEL_VERSIONS:
        raise argparse.ArgumentTypeError(f"unknown kernel {text!r}; expected \"all\" or some of "
                                         f"{', '.join(KERNEL_VERSIONS)}")
    return text


def _folio_size(text: str) -> int:
    try:
        return _size_bytes(text)
    except ScenarioError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is out of range (must be at least 1)")
    return n


def add_parser(sub: Any, parents: list) -> None:
    """Registers ``ptebatch sweep`` on the CLI's subparsers."""
    s = sub.add_parser("sweep", parents=parents,
                       help="run scenarios or snapshots over kernels × arches × folio sizes, on Dask",
                       description="Runs each source (a scenario file, .toml, or a snapshot, .npz) once "
                                   "per grid point (arch × kernel × folio size), one Dask task per point, "
                                   "and prints one table of the results; docs/sweeps.md.")
    s.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="scenario files (.toml) and snapshots (.npz, replayed and forked)")
    s.add_argument("--kernel", type=_list_of(_kernel), action="append",
                   help="kernels: \"all\" or a comma-separated list (repeatable; default: each "
                        "scenario's own, 6.8 and the newest for a snapshot)")
    s.add_argument("--arch", type=_list_of(_arch), action="append",
                   help="layouts: \"all\" or a comma-separated list (repeatable; default: each "
                        "scenario's own; a snapshot replays on its own)")
    s.add_argument("--size", type=_list_of(_folio_size), action="append",
                   help="folio sizes, comma-separated (repeatable): set as each scenario's "
                        f"{' or '.join(SIZE_PARAMS)} parameter (default: the values in its file)")
    s.add_argument("--size-param", metavar="NAME",
                   help=f"the [params] name --size sets (default: {', then '.join(SIZE_PARAMS)})")
    s.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="set a [params] value in the scenarios that declare it, e.g. --set region=16MiB")
    where = s.add_mutually_exclusive_group()
    where.add_argument("--workers", type=_positive, metavar="N",
                       help=f"worker processes of the local cluster (default: the cores, {default_workers()})")
    where.add_argument("--scheduler", metavar="ADDRESS",
                       help="the scheduler of an existing Dask cluster, e.g. tcp://10.0.0.1:8786 "
                            "(its workers need ptebatch and the source files at the same paths)")
    where.add_argument("--sequential", action="store_true",
                       help="run the grid in this process, one point after the other (no Dask)")
    s.add_argument("--threads-per-worker", type=_positive, default=1, metavar="N",
                   help="threads per worker process of the local cluster (default 1)")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON: {fields, rows, ...} (docs/sweeps.md)")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header line")
    s.add_argument("-o", "--output", help="write to this file instead of stdout")
    s.set_defaults(run=sweep_cmd, sweep_parser=s)


class _Progress:
    """A line on stderr every ``interval`` seconds while points complete, and one at the end."""

    def __init__(self, stream: Any = None, interval: float = 3.0):
        self.stream, self.interval = stream or sys.stderr, interval
        self.t0 = self.last = time.monotonic()

    def __call__(self, done: int, total: int, failed: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= self.interval:
            self.last = now
            fail = f", {failed} failed" if failed else ""
            print(f"ptebatch sweep: {done}/{total} grid points done{fail}, {now - self.t0:.1f} s",
                  file=self.stream, flush=True)


def sweep_cmd(args: argparse.Namespace) -> int:
    notes: list[str] = []
    flat = lambda lists: list(dict.fromkeys(v for vs in lists for v in vs)) if lists else None  # noqa: E731
    try:
        points = plan(args.sources, kernels=flat(args.kernel), arches=flat(args.arch), sizes=flat(args.size),
                      size_param=args.size_param, params=scenario.parse_set(args.set), notes=notes)
    except ScenarioError as e:
        args.sweep_parser.error(str(e))
    if args.output:
        from .report import check_writable

        check_writable(args.output)
    if not getattr(args, "quiet", False):
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    engine = "serial" if args.sequential else "dask"
    rows = run(points, engine=engine, workers=args.workers, threads_per_worker=args.threads_per_worker,
               scheduler=args.scheduler, progress=None if getattr(args, "quiet", False) else _Progress())
    text = to_json(rows) if args.json else to_csv(rows) if args.csv else format_table(rows) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    bad = {(r["source"], r["arch"], r["kernel"], r["folio_size"]) for r in failures(rows)}
    if bad:
        sys.stdout.flush()
        print(f"ptebatch sweep: error: {len(bad)} of {len(points)} grid points failed "
              f"(status \"error\" in the output)", file=sys.stderr)
        return 1
    return 0


__all__ = ["ENGINES", "Point", "SIZE_PARAMS", "SWEEP_FIELDS", "dask_client", "error_row", "failures",
           "format_table", "plan", "run", "run_point", "to_csv", "to_json"]

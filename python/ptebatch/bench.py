"""``ptebatch bench``: what batching costs, in ns per PTE, for each implementation (docs/benchmarks.md).

One table per operation (``cut``: ``folio_pte_batch`` over a whole table, i.e. fork's cut;
``fork``, ``exit``, ``munmap`` and write ``faults`` of a region on the simulated machine), one
row per folio size: the Rust core, the pure-Python reference (on a smaller size, scaled per PTE),
the numpy-vectorised cut (:mod:`ptebatch.vectorised`, the cut only), the real kernel (from a
calibration file, docs/calibration.md) and a same-run baseline: a numpy copy of as many
``uint64`` as the row has PTEs, read from an array much larger than the cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

import ptebatch as pb
from ptebatch import reference as ref
from ptebatch.study import Progress, check_folio_size, check_region, folio_sizes
from ptebatch.tables import uniform_table
from ptebatch.vectorised import batch_lengths_numpy

SCHEMA, SCHEMA_VERSION = "ptebatch-bench", 1

#: The simulated machine: the architecture of the calibration shipped with the package.
LAYOUT = "x86-64"
OPERATIONS = ("cut", "fork", "exit", "munmap", "faults")
#: The calibration's operation for each simulated one (docs/calibration.md): the exit round
#: times the child's exit while the parent still maps the folios, then the parent's munmap,
#: which frees them, as the simulated rounds here do.
KERNEL_OPERATION = {"fork": "fork", "exit": "child-exit", "munmap": "parent-munmap", "faults": "faults"}
IMPLEMENTATIONS = ("copy", "rust", "numpy", "reference")

DEFAULT_CALIBRATION = Path(__file__).parent / "data" / "calibration-rust-pyo3.json"
#: Elements of the copy baseline's source: 256 MiB, well beyond any last-level cache.
COPY_SOURCE = 32 << 20


@dataclass(frozen=True)
class Settings:
    """What one run measures. ``repeat`` rounds of each timing (``ref_repeat`` for the
    reference); the reference runs on ``ref_ptes`` PTEs and a ``ref_region``."""

    kernel: str = pb.NEWEST_KERNEL
    sizes: tuple[int, ...] = tuple(folio_sizes(LAYOUT))
    ptes: int = 4 << 20
    region: int = 1 << 30
    ref_ptes: int = 4096
    ref_region: int = 8 << 20
    repeat: int = 5
    ref_repeat: int = 3
    #: Also the region mapped by PMD THPs (row "2M-pmd"; fork, exit, munmap and faults only).
    pmd: bool = True

    @classmethod
    def quick(cls, **kw: Any) -> "Settings":
        base: dict[str, Any] = dict(ptes=1 << 16, region=8 << 20, ref_ptes=1024, ref_region=2 << 20, repeat=3, ref_repeat=2)
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


class _Copy:
    """The baseline: ``np.copyto`` of ``n`` uint64 from a 256 MiB source, at a new offset each
    time so the source is not in the cache."""

    def __init__(self, largest: int) -> None:
        self.src = np.arange(max(largest, COPY_SOURCE), dtype=np.uint64)
        self.offset = 0

    def samples(self, n: int, repeat: int) -> list[int]:
        dst = np.zeros(n, dtype=np.uint64)
        out = []
        for _ in range(repeat):
            if self.offset + n > len(self.src):
                self.offset = 0
            chunk = self.src[self.offset:self.offset + n]
            self.offset += n
            t0 = time.perf_counter_ns()
            np.copyto(dst, chunk)
            out.append(time.perf_counter_ns() - t0)
        return out


def _timed(fn: Callable[[], Any], repeat: int) -> tuple[list[int], Any]:
    out, result = [], None
    for _ in range(repeat):
        t0 = time.perf_counter_ns()
        result = fn()
        out.append(time.perf_counter_ns() - t0)
    return out, result


def _sim_round(kernel: str, region: int, size: int, backend: str, pmd: bool = False) -> dict[str, int]:
    """One round as calibrate's exit round: write faults of a fresh region, fork, the child's
    exit, the parent's munmap; ns of each call. ``pmd``: the region mapped by PMD THPs."""
    sim = pb.Simulation(LAYOUT, kernel, region + region // 4 + (8 << 20), backend=backend)
    p = sim.spawn()
    if pmd:
        v = p.mmap(region, pmd=True)
    else:
        v = p.mmap(region, mthp=[size] if size > sim.page_size else [])
    t = [time.perf_counter_ns()]
    p.touch(v.start, v.length, write=True)
    t.append(time.perf_counter_ns())
    child = p.fork()
    t.append(time.perf_counter_ns())
    child.exit()
    t.append(time.perf_counter_ns())
    p.munmap(v.start, v.length)
    t.append(time.perf_counter_ns())
    return {op: t[i + 1] - t[i] for i, op in enumerate(("faults", "fork", "exit", "munmap"))}


# -- the calibration ----------------------------------------------------------------------------

def load_calibration(path: str | Path) -> dict[str, Any]:
    """A calibration file (docs/calibration.md); ValueError naming the file if it is not one."""
    with open(path, encoding="utf-8") as f:
        try:
            cal = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a calibration file (bad JSON: {e.msg}, line {e.lineno})") from None
    if not isinstance(cal, dict) or cal.get("schema") != "ptebatch-calibration":
        raise ValueError(f"{path}: not a calibration file (schema is not 'ptebatch-calibration')")
    if not isinstance(cal.get("measurements"), list):
        raise ValueError(f"{path}: calibration file without a 'measurements' list")
    # The same checks as the cost model's (types, finite non-negative times).
    from .cost import check_calibration

    check_calibration(cal, str(path))
    return cal


def kernel_folio_size(size: int, pmd: int, pmd_mapped: bool = False) -> str:
    """The calibration's name for a folio size: ``2M-pte`` for PMD-sized folios mapped by PTEs,
    ``2M-pmd`` for PMD THPs (the calibration times 2M faults only as those)."""
    name = pb.format_size(size)
    if size == pmd:
        return f"{name}-pmd" if pmd_mapped else f"{name}-pte"
    return name


def provenance_line(cal: dict[str, Any], path: str | Path) -> str:
    prov = cal.get("provenance") or {}
    load = cal.get("loadavg") or {}
    parts = [f"{Path(path).name}: kernel {cal.get('kernel_release', '?')}",
             f"{cal.get('cpu_model', '?')}, {cal.get('cpus', '?')} CPUs", str(cal.get("date", "?"))]
    if load.get("start") and load.get("end"):
        parts.append(f"load average {load['start'][0]} to {load['end'][0]}")
    if prov.get("machine"):
        parts.append(str(prov["machine"]))
    return "; ".join(parts)


# -- the run ------------------------------------------------------------------------------------

def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def run(settings: Settings, calibration: dict[str, Any] | None = None,
        calibration_path: str | Path | None = None, progress: Progress | None = None) -> dict[str, Any]:
    """Measures every operation and folio size; the dict ``--json`` prints (docs/benchmarks.md)."""
    pb.fpb_form(settings.kernel)  # ValueError for an unknown kernel
    L, R = pb.layout(LAYOUT), ref.layout(LAYOUT)
    pmd = L.page_size * L.ptrs_per_pte
    page = L.page_size
    for s in settings.sizes:
        check_folio_size(s, LAYOUT)
        for what, region in (("region", settings.region), ("ref_region", settings.ref_region)):
            if region <= 0 or region % s:
                raise ValueError(f"{what}={pb.format_size(region)} is not a multiple of the "
                                 f"{pb.format_size(s)} folio size")
    if not settings.sizes:
        raise ValueError("sizes is empty")
    if settings.pmd:
        for what, region in (("region", settings.region), ("ref_region", settings.ref_region)):
            if region % pmd:
                raise ValueError(f"{what}={pb.format_size(region)} is not a multiple of the "
                                 f"{pb.format_size(pmd)} PMD size (pmd=True maps it with PMD THPs)")
    copy = _Copy(max(settings.ptes, settings.region // page))
    measured = {(m["folio_size"], m["operation"]): m for m in (calibration or {}).get("measurements", [])}
    rows: list[dict[str, Any]] = []
    step = 0

    def advance(what: str) -> None:
        nonlocal step
        step += 1
        if progress is not None:
            progress.update(step, what)

    def row(operation: str, size: int, n: int, samples: dict[str, list[int]], n_ref: int,
            pmd_mapped: bool = False) -> dict[str, Any]:
        per = {"reference": n_ref}
        ns = {k: statistics.median(v) / per.get(k, n) if v else None for k, v in samples.items()}
        out: dict[str, Any] = {
            "operation": operation, "folio_size": pb.format_size(size) + ("-pmd" if pmd_mapped else ""),
            "folio_bytes": size, "pmd_mapped": pmd_mapped, "ptes": n, "reference_ptes": n_ref,
        }
        for impl in IMPLEMENTATIONS:
            out[f"{impl}_ns_per_pte"] = ns.get(impl)
        k = measured.get((kernel_folio_size(size, pmd, pmd_mapped), KERNEL_OPERATION.get(operation)))
        out["kernel_folio_size"] = k["folio_size"] if k else None
        out["kernel_operation"] = KERNEL_OPERATION.get(operation)
        out["kernel_ns_per_pte"] = k["ns_per_pte"] if k else None
        out["kernel_ns_per_pte_min"] = k.get("ns_per_pte_min") if k else None
        for impl in ("rust", "numpy", "reference", "kernel"):
            out[f"{impl}_over_copy"] = _ratio(out[f"{impl}_ns_per_pte"], out["copy_ns_per_pte"])
        for impl in ("numpy", "reference", "kernel"):
            out[f"{impl}_over_rust"] = _ratio(out[f"{impl}_ns_per_pte"], out["rust_ns_per_pte"])
        out["samples_ns"] = {k: v for k, v in samples.items() if v}
        return out

    for size in settings.sizes:
        name = pb.format_size(size)
        pages = size // page
        # The cut: folio_pte_batch over a whole table of PTE-mapped folios of this size.
        t = uniform_table(L, settings.ptes, pages)
        kw: dict[str, Any] = dict(kernel=settings.kernel, folio_start=t.folio_start, folio_nr_pages=t.folio_nr_pages)
        samples: dict[str, list[int]] = {"copy": copy.samples(settings.ptes, settings.repeat)}
        samples["rust"], fast = _timed(lambda: pb.batch_lengths(t.ptes, layout=L, **kw), settings.repeat)
        advance(f"cut {name}: rust")
        samples["numpy"], vec = _timed(lambda: batch_lengths_numpy(t.ptes, L, settings.kernel, t.folio_start,
                                                                   t.folio_nr_pages), settings.repeat)
        if not np.array_equal(fast, vec):
            raise pb.InvariantError(f"the numpy-vectorised cut differs from pb.batch_lengths for {name} "
                                    f"folios under {settings.kernel}", "bench: numpy == rust")
        advance(f"cut {name}: numpy")
        del t, fast, vec
        small = uniform_table(L, settings.ref_ptes, pages)
        values = small.ptes.tolist()
        starts, sizes = small.folio_start.tolist(), small.folio_nr_pages.tolist()
        samples["reference"], _ = _timed(lambda: ref.batch_lengths(values, R, settings.kernel, starts, sizes),
                                         settings.ref_repeat)
        advance(f"cut {name}: reference")
        rows.append(row("cut", size, settings.ptes, samples, settings.ref_ptes))

        # fork, exit, munmap, write faults of a region on the simulated machine.
        n, n_ref = settings.region // page, settings.ref_region // page
        copies = copy.samples(n, settings.repeat)
        fast_rounds = []
        for _ in range(settings.repeat):
            fast_rounds.append(_sim_round(settings.kernel, settings.region, size, "rust"))
        advance(f"{name}: simulation")
        ref_rounds = []
        for _ in range(settings.ref_repeat):
            ref_rounds.append(_sim_round(settings.kernel, settings.ref_region, size, "reference"))
        advance(f"{name}: reference simulation")
        for op in OPERATIONS[1:]:
            rows.append(row(op, size, n, {"copy": copies, "rust": [r[op] for r in fast_rounds],
                                          "reference": [r[op] for r in ref_rounds]}, n_ref))

    if settings.pmd:
        # PMD THPs: no PTE, so no cut; "per PTE" is per page the PMDs map.
        n, n_ref = settings.region // page, settings.ref_region // page
        copies = copy.samples(n, settings.repeat)
        fast_rounds = [_sim_round(settings.kernel, settings.region, pmd, "rust", True) for _ in range(settings.repeat)]
        advance("2M-pmd: simulation")
        ref_rounds = [_sim_round(settings.kernel, settings.ref_region, pmd, "reference", True)
                      for _ in range(settings.ref_repeat)]
        advance("2M-pmd: reference simulation")
        for op in OPERATIONS[1:]:
            rows.append(row(op, pmd, n, {"copy": copies, "rust": [r[op] for r in fast_rounds],
                                         "reference": [r[op] for r in ref_rounds]}, n_ref, True))

    rows.sort(key=lambda r: (OPERATIONS.index(r["operation"]), r["folio_bytes"], r["pmd_mapped"]))
    cal_info = None
    if calibration is not None:
        cal_info = {"file": str(calibration_path) if calibration_path is not None else None,
                    "kernel_release": calibration.get("kernel_release"), "date": calibration.get("date"),
                    "cpu_model": calibration.get("cpu_model"), "cpus": calibration.get("cpus"),
                    "provenance": calibration.get("provenance"),
                    "summary": provenance_line(calibration, calibration_path or "calibration")}
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "layout": LAYOUT,
            "settings": {**asdict(settings), "sizes": [pb.format_size(s) for s in settings.sizes]},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "loadavg": _loadavg(), "calibration": cal_info, "rows": rows}


def steps(settings: Settings) -> int:
    return 5 * len(settings.sizes) + 2 * settings.pmd


def _loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


# -- the tables ---------------------------------------------------------------------------------

def _num(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 10 else f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _times(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.0f}x"


TITLES = {
    "cut": "cut: folio_pte_batch over a whole table of PTE-mapped folios (fork's batch lengths)",
    "fork": "fork: the parent's fork() of a written private anonymous region",
    "exit": "exit: the child's exit while the parent still maps every folio",
    "munmap": "munmap: the parent's munmap() after the child is gone (frees the folios)",
    "faults": "faults: first-touch write faults of the region",
}


def format_tables(result: dict[str, Any]) -> str:
    from ptebatch.cli import _legend

    s = result["settings"]
    out = [f"ptebatch bench: {result['layout']}, kernel {s['kernel']} simulated, ns per PTE "
           f"(medians of {s['repeat']}; reference: {s['ref_repeat']}), load average "
           f"{' '.join(map(str, result['loadavg'] or ['?']))}"]
    cal = result["calibration"]
    out.append(f"real kernel: {cal['summary']}" if cal else "real kernel: no calibration")
    for op in OPERATIONS:
        rows = [r for r in result["rows"] if r["operation"] == op]
        if not rows:
            continue
        n, n_ref = rows[0]["ptes"], rows[0]["reference_ptes"]
        what = (f"{n} PTEs, reference on {n_ref}" if op == "cut" else
                f"{pb.format_size(n * 4096)} region = {n} PTEs, reference on {pb.format_size(n_ref * 4096)}")
        out += ["", f"{TITLES[op]}; {what}"]
        cols = [("size", lambda r: r["folio_size"]), ("copy", lambda r: _num(r["copy_ns_per_pte"])),
                ("rust", lambda r: _num(r["rust_ns_per_pte"])), ("rust/copy", lambda r: _times(r["rust_over_copy"]))]
        if op == "cut":
            cols += [("numpy", lambda r: _num(r["numpy_ns_per_pte"])),
                     ("numpy/rust", lambda r: _times(r["numpy_over_rust"]))]
        cols += [("reference", lambda r: _num(r["reference_ns_per_pte"])),
                 ("ref/rust", lambda r: _times(r["reference_over_rust"]))]
        if op != "cut":
            cols += [("kernel", lambda r: _num(r["kernel_ns_per_pte"])),
                     ("kernel min", lambda r: _num(r["kernel_ns_per_pte_min"])),
                     ("kernel/rust", lambda r: _times(r["kernel_over_rust"])),
                     ("kernel/copy", lambda r: _times(r["kernel_over_copy"]))]
        cells = [[name for name, _ in cols]] + [[f(r) for _, f in cols] for r in rows]
        widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
        for c in cells:
            out.append("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
        legend = [("size", "folio size (all folios of the table or region have it); 2M is mapped by PTEs, "
                           "2M-pmd by PMDs (the THP default: one PMD per folio, per PTE = per page)"
                           if op != "cut" else "folio size (all folios of the table have it)"),
                  ("copy", "same-run baseline: np.copyto of as many uint64 as PTEs, from a 256 MiB array "
                           "(not in the cache)"),
                  ("rust", "the Rust core: pb.batch_lengths" if op == "cut" else
                           "the Rust core: pb.Simulation, the one call timed, divided by the PTEs"),
                  ("rust/copy", "rust over copy: how many copies of the table the work costs")]
        if op == "cut":
            legend += [("numpy", "ptebatch.vectorised.batch_lengths_numpy: pfn differences and masked "
                                 "bits, checked equal to rust"),
                       ("numpy/rust", "numpy over rust")]
        legend += [("reference", "the pure-Python reference (ptebatch.reference"
                                 + (".batch_lengths" if op == "cut" else ', backend="reference"')
                                 + f"), on {n_ref} PTEs, scaled per PTE"),
                   ("ref/rust", "reference over rust")]
        if op != "cut":
            legend += [("kernel", f"the real kernel's {KERNEL_OPERATION[op]} from the calibration (median"
                                  + (" less the bare process's" if op in ("fork", "exit") else "")
                                  + ", per PTE; 2M is 2M-pte"
                                  + (" (not measured: 2M faults map PMDs)" if op == "faults" else "") + ")"),
                       ("kernel min", "the same from the fastest sample (the least disturbed)"),
                       ("kernel/rust", "kernel over rust: the model against the thing modelled"),
                       ("kernel/copy", "kernel over copy (copy of this run, kernel of the calibration's)")]
        else:
            legend += [("(kernel)", "the kernel does the cut inside fork(): see the fork table")]
        out.append(_legend(*legend))
    return "\n".join(out)


# -- the command --------------------------------------------------------------------------------

def add_parser(sub: Any, parents: Sequence, size_type: Callable[[str], int], int_type: Callable) -> None:
    """Registers ``ptebatch bench`` on the CLI's subparsers."""
    p = sub.add_parser(
        "bench", parents=list(parents),
        help="ns per PTE of the Rust core, the Python reference, numpy and the real kernel, per operation",
        description="Times what batching costs, per operation (the whole-table folio_pte_batch cut, "
                    "fork, exit, munmap, write faults) and folio size, in ns per PTE: the Rust core, the "
                    "pure-Python reference (smaller, scaled), a numpy-vectorised cut, and the real kernel "
                    "from a calibration file, with a numpy copy of as many uint64 measured in the same run "
                    "as the baseline (docs/benchmarks.md).")
    p.add_argument("--ptes", type=int_type(2, 1 << 28), default=None,
                   help="PTEs of the cut's table (default 4194304; --quick 65536)")
    p.add_argument("--region", type=size_type, default=None,
                   help="bytes of the simulated region (default 1GiB; --quick 8MiB)")
    p.add_argument("--sizes", default=None,
                   help="comma-separated folio sizes, e.g. 4K,64K,2M (default every x86-64 anonymous size)")
    p.add_argument("--kernel", default=pb.NEWEST_KERNEL, help=f"simulated kernel (default {pb.NEWEST_KERNEL})")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration JSON of the real kernel (default: the one shipped, "
                        "calibration-rust-pyo3.json); 'none' for no kernel column")
    p.add_argument("--pmd", action=argparse.BooleanOptionalAction, default=None,
                   help="also the region mapped by PMD THPs, row 2M-pmd (default: yes when the region is a "
                        "multiple of the PMD size)")
    p.add_argument("--json", action="store_true", help="print every number as JSON instead of tables")
    p.add_argument("--quick", action="store_true", help="tiny sizes and fewer repetitions (a smoke run)")
    p.set_defaults(run=run_cmd)


def run_cmd(args: Any) -> int:
    from ptebatch.cli import UsageError

    def bad(option: str, message: str) -> UsageError:
        return UsageError(f"ptebatch bench: error: argument {option}: {message}")

    try:
        pb.fpb_form(args.kernel)
    except ValueError as e:
        raise bad("--kernel", str(e)) from None
    sizes = None
    if args.sizes is not None:
        try:
            sizes = tuple(dict.fromkeys(check_folio_size(s.strip(), LAYOUT) for s in args.sizes.split(",")))
        except ValueError as e:
            raise bad("--sizes", str(e)) from None
    if args.region is not None:
        try:
            check_region(args.region, LAYOUT)
        except ValueError as e:
            raise bad("--region", str(e)) from None
        for s in sizes or folio_sizes(LAYOUT):
            if args.region % s:
                raise bad("--region", f"the {pb.format_size(args.region)} region is not a multiple of the "
                                      f"{pb.format_size(s)} folio size")
    kw = dict(kernel=args.kernel, sizes=sizes, ptes=args.ptes, region=args.region)
    if args.quick:
        settings = Settings.quick(**kw)
    else:
        settings = Settings(**{k: v for k, v in kw.items() if v is not None})
    L = pb.layout(LAYOUT)
    pmd_bytes = L.page_size * L.ptrs_per_pte
    pmd = args.pmd if args.pmd is not None else settings.region % pmd_bytes == 0
    if pmd and settings.region % pmd_bytes:
        raise bad("--pmd", f"the {pb.format_size(settings.region)} region is not a multiple of the "
                           f"{pb.format_size(pmd_bytes)} PMD size")
    # The reference runs on less, but on at least one folio of the largest size.
    ref_region = min(max(settings.ref_region, max(settings.sizes), pmd_bytes if pmd else 0), settings.region)
    settings = Settings(**{**asdict(settings), "ref_ptes": min(settings.ref_ptes, settings.ptes),
                           "ref_region": ref_region, "pmd": pmd})

    path: str | Path | None = DEFAULT_CALIBRATION if args.calibration is None else args.calibration
    cal = None
    if path is not None and path != "none":
        cal = load_calibration(path)
    with Progress(steps(settings), "bench", enabled=not args.quiet) as progress:
        result = run(settings, cal, path if cal is not None else None, progress)
    if args.json:
        json.dump(result, sys.stdout, indent=1)
        print()
    else:
        print(format_tables(result))
    return 0

"""What batching costs: a linear model from the simulation's counters to nanoseconds.

The simulation counts the kernel's work (PTE writes, batches, folios freed, faults); a
calibration (``ptebatch calibrate``, docs/calibration.md) times the running kernel per folio
size. ``fit()`` simulates every calibrated case (same folio size, region, operation and kernel)
and regresses the measured time on the counters by non-negative least squares, per operation,
with the few features the calibration can tell apart (docs/cost-model.md). ``Model.predict()``
turns any run's counters into predicted nanoseconds, for any modelled kernel: the per-unit
costs are the calibrated machine's, the counts are the kernel's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from . import seed as _seed
from .errors import PtebatchError
from .simulation import Simulation, format_size

#: The calibration shipped with the package (a noisy run: see its ``provenance``).
SHIPPED_CALIBRATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                   "calibration-rust-pyo3.json")

#: Per model: the counters it is linear in, and the calibrated operations it is fitted to. With
#: a batching kernel every large folio is one batch, one refcount atomic, one rmap call and one
#: folio_pte_batch() call, so those counters are collinear: ``batches`` stands for them all.
#: Per PTE, ``pte_writes`` stands for the reads, the writes and the per-page mapcounts. A fault's
#: zeroing is per page allocated, which only a PMD fault (no PTE written) tells apart from the
#: PTE writes, so the faults model is fitted to PTE- and PMD-mapped cases together.
MODELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fork": (("pte_writes", "batches"), ("fork",)),
    # The child's munmap frees nothing, the parent's frees every folio: fitted together, they
    # tell the zap's own cost from the freeing's.
    "munmap": (("pte_writes", "batches", "folios_freed", "pages_freed"), ("child-munmap", "parent-munmap")),
    "exit": (("pte_writes", "batches"), ("child-exit",)),
    "faults": (("pte_writes", "faults", "pages_allocated"), ("faults",)),
}

#: The PMD term of a model, fitted in a second stage, with the PTE-mapped costs fixed, on the
#: PMD-mapped cases of the operations that hold that term and nothing else new: a PMD zap is
#: costed on the child's munmap (nothing freed), so the parent's munmap of PMD THPs, which
#: adds the freeing, is predicted, not fitted.
PMD_TERMS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fork": ("pmd_copies", ("fork",)),
    "munmap": ("pmd_zaps", ("child-munmap",)),
    "exit": ("pmd_zaps", ("child-exit",)),
}

#: What each model predicts, in the words of the legend.
MODEL_TEXT = {
    "fork": "fork() of the process's mappings",
    "munmap": "munmap() (zap, plus freeing the folios whose last mapping goes)",
    "exit": "exit_mmap() of a process whose folios stay mapped elsewhere (the freeing part from munmap)",
    "faults": "first-touch write faults (allocation and zeroing included)",
}

#: Which statistic of a calibration row is fitted: the fastest sample (the least disturbed on a
#: loaded machine, as the shipped file's provenance says) or the median.
ESTIMATORS = {"min": "ns_per_pte_min", "median": "ns_per_pte"}

#: The last kernel without PTE batching of fork and zap.
PER_PTE_KERNEL = "6.8"

#: The held-out check: fit on these folio sizes, predict the others. 2M-pmd, the only PMD-mapped
#: case, is always fitted: it alone sets the PMD terms.
FIT_SIZES = ("4K", "32K", "128K", "512K", "2M-pte", "2M-pmd")
HELD_OUT_SIZES = ("16K", "64K", "256K", "1M")

#: The seed series' published changes (fork and munmap of PTE-mapped THPs, per folio size):
#: see docs/cost-model.md for the source and how sure the figures are.
SEED_PUBLISHED = {"fork": "-2 % (order 0-ish) to -30 % (2M)", "munmap": "-1 % to -58 % (2M)"}

_ARCH_OF_MACHINE = {"x86_64": "x86-64", "aarch64": "arm64", "riscv64": "riscv64", "s390x": "s390x",
                    "ppc64le": "ppc64", "ppc64": "ppc64", "loongarch64": "loongarch64"}


class CalibrationFileError(PtebatchError, ValueError):
    """Raised by :func:`load_calibration` for a file that is not a usable calibration (also a
    ``ValueError``: the file is a bad argument)."""


# -- non-negative least squares ----------------------------------------------------------------

def nnls(A: np.ndarray, b: np.ndarray, *, max_iter: int | None = None) -> np.ndarray:
    """``x >= 0`` minimising ``||A x - b||``: the active-set method of Lawson and Hanson
    (Solving Least Squares Problems, 1974, ch. 23)."""
    A = np.asarray(A, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if A.ndim != 2 or b.ndim != 1 or A.shape[0] != b.shape[0]:
        raise ValueError(f"nnls: A must be m×n and b of length m (got {A.shape} and {b.shape})")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(b))):
        raise ValueError("nnls: A and b must be finite")
    m, n = A.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(A).max(initial=0.0), 1.0) * max(np.abs(b).max(initial=0.0), 1.0)
    for _ in range(max_iter or 3 * n + 10):
        w = A.T @ (b - A @ x)
        if passive.all() or not np.any(w[~passive] > tol):
            break
        j = int(np.argmax(np.where(passive, -np.inf, w)))
        passive[j] = True
        first = True
        while True:
            z = np.zeros(n)
            z[passive] = np.linalg.lstsq(A[:, passive], b, rcond=None)[0]
            if first and z[j] <= 0:
                # Only rounding can make the new variable's step non-positive: x is optimal.
                passive[j] = False
                return x
            first = False
            if np.all(z[passive] > 0):
                x = z
                break
            # Step back to the boundary and drop the variables that reached zero.
            neg = passive & (z <= 0)
            alpha = np.min(x[neg] / (x[neg] - z[neg]))
            x = x + alpha * (z - x)
            passive &= x > tol
            x[~passive] = 0.0
    return x


# -- the calibration and its simulated counterpart -------------------------------------------

def load_calibration(path: str | os.PathLike[str] | None = None) -> dict:
    """The calibration file at ``path`` (default: the shipped one), checked."""
    path = SHIPPED_CALIBRATION if path is None else os.fspath(path)
    with open(path, encoding="utf-8") as f:
        try:
            cal = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CalibrationFileError(f"{path}: not a JSON calibration file ({e})") from None
    return check_calibration(cal, path)


def check_calibration(cal: Any, path: str = "calibration") -> dict:
    """``cal`` (a dict as ``ptebatch calibrate`` writes it) if usable, else
    CalibrationFileError naming the field; ``path`` names it in messages and in the model."""
    if not isinstance(cal, dict) or cal.get("schema") != "ptebatch-calibration":
        raise CalibrationFileError(f"{path}: not a calibration file (no schema \"ptebatch-calibration\"; "
                                   f"'ptebatch calibrate' writes one)")
    if cal.get("schema_version") != 1:
        raise CalibrationFileError(f"{path}: calibration schema_version {cal.get('schema_version')!r} is not 1")
    kind: Any
    for key, kind in (("kernel_release", str), ("machine", str), ("page_size", int),
                      ("region_bytes", int), ("measurements", list)):
        if not isinstance(cal.get(key), kind) or isinstance(cal.get(key), bool):
            raise CalibrationFileError(f"{path}: calibration field {key!r} is missing or not a {kind.__name__}")
    for i, m in enumerate(cal["measurements"]):
        if not isinstance(m, dict):
            raise CalibrationFileError(f"{path}: measurements[{i}] is not an object")
        for key, kind in (("folio_size", str), ("folio_bytes", int), ("mapping", str), ("operation", str),
                          ("ptes", int), ("ns_per_pte", (int, float)), ("ns_per_pte_min", (int, float))):
            v: Any = m.get(key)
            if not isinstance(v, kind) or isinstance(v, bool):
                raise CalibrationFileError(f"{path}: measurements[{i}] field {key!r} is missing or of the wrong type")
            if kind != str and not (math.isfinite(v) and v >= 0 if key.startswith("ns") else v > 0):
                raise CalibrationFileError(f"{path}: measurements[{i}] field {key!r} is {v!r}")
    return dict(cal, _path=cal.get("_path", path))


def calibration_arch(cal: dict) -> str:
    """The layout name of the calibrated machine (``x86-64``, ``arm64-4k``, ...)."""
    import ptebatch as pb

    arch = _ARCH_OF_MACHINE.get(cal["machine"])
    if arch in ("arm64", "ppc64"):
        arch = f"{arch}-{cal['page_size'] // 1024}k"
    if arch is None or arch not in pb.LAYOUT_NAMES:
        raise CalibrationFileError(f"{cal['_path']}: machine {cal['machine']!r} (page {cal['page_size']}) "
                                   f"is not a modelled layout")
    return arch


def calibration_kernel(cal: dict) -> str:
    import ptebatch as pb

    try:
        return pb.kernel_from_release(cal["kernel_release"])
    except ValueError as e:
        raise CalibrationFileError(f"{cal['_path']}: {e}") from None


#: Counters of one simulated calibration case come from a region of this many PMDs (or the
#: whole region if smaller), scaled: every feature is linear in the region (docs/cost-model.md).
SIM_PMDS = 4


def simulate_case(arch: str, kernel: str, folio_bytes: int, region: int, pmd: bool = False) -> dict[str, dict[str, int]]:
    """Per calibrated operation, the counters the simulation gives for it: ``region`` bytes of
    written private anonymous memory in folios of ``folio_bytes`` (PTE-mapped, or with ``pmd``
    PMD-mapped THPs), as the calibration's worker does it."""
    out: dict[str, dict[str, int]] = {}

    def counters(sim: Simulation, before_free: int) -> dict[str, int]:
        st = sim.last_stats
        c = {k: int(v) for k, v in st.items() if isinstance(v, int)}
        c["pages_freed"] = sim.free_pages - before_free
        c["pages_allocated"] = max(0, before_free - sim.free_pages)
        return c

    memory = 3 * region + (16 << 20)
    for round_ in ("exit", "munmap"):
        sim = Simulation(arch, kernel, -(-memory // folio_bytes) * folio_bytes)
        p = sim.spawn()
        if pmd:
            v = p.mmap(region, pmd=True)
        else:
            v = p.mmap(region, mthp=[folio_bytes] if folio_bytes > sim.page_size else [])
        free = sim.free_pages
        p.touch(v.start, v.length, write=True)
        out["faults"] = counters(sim, free)
        free = sim.free_pages
        c = p.fork()
        out["fork"] = counters(sim, free)
        free = sim.free_pages
        if round_ == "exit":
            c.exit()
            out["child-exit"] = counters(sim, free)
        else:
            c.munmap(v.start, v.length)
            out["child-munmap"] = counters(sim, free)
            c.exit()
        free = sim.free_pages
        p.munmap(v.start, v.length)
        out["parent-munmap"] = counters(sim, free)
    return out


def _proportional(arch: str, kernel: str, folio_bytes: int, region: int, pmd: bool = False) -> dict[str, dict[str, int]]:
    """``simulate_case`` with only the counters that double when the region does (fork's one
    TLB flush does not), so that scaling them to the calibrated region is exact; every
    feature must be among them."""
    one = simulate_case(arch, kernel, folio_bytes, region, pmd)
    two = simulate_case(arch, kernel, folio_bytes, 2 * region, pmd)
    out = {}
    for op, counters in one.items():
        out[op] = {k: v for k, v in counters.items() if 2 * v == two[op][k]}
        for name, (features, ops) in MODELS.items():
            lost = [f for f in features if op in ops and f not in out[op]]
            if lost:
                raise PtebatchError(f"{kernel} {format_size(folio_bytes)} {op}: counters {', '.join(lost)} "
                                    f"are not proportional to the region; the {name} model cannot scale them")
    return out


@dataclass
class Case:
    """One calibrated measurement with the simulation's counters for it, per PTE."""
    folio_size: str
    operation: str
    ptes: int
    ns_per_pte: float
    features: dict[str, float]
    #: "pte" or "pmd": how the calibrated region was mapped.
    mapping: str = "pte"


def cases(cal: dict, estimator: str = "min", kernel: str | None = None) -> tuple[list[Case], list[str]]:
    """The calibration's measurements (PTE- and PMD-mapped) with their simulated counters
    (under ``kernel``, default the calibrated one), and notes on what was left out."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator {estimator!r}: choose from {', '.join(ESTIMATORS)}")
    arch, kernel = calibration_arch(cal), kernel or calibration_kernel(cal)
    pmd = int(cal.get("pmd_size") or 0) or 512 * cal["page_size"]
    region = cal["region_bytes"]
    sim_region = min(region, SIM_PMDS * pmd)
    notes = []
    if region % sim_region:
        sim_region = region
    scale = region / sim_region
    by_size: dict[tuple[int, bool], dict[str, dict[str, int]]] = {}
    out: list[Case] = []
    skipped = sorted({f"{m['folio_size']} ({m['mapping']})" for m in cal["measurements"]
                      if m["mapping"] not in ("pte", "pmd") or m["mapping"] == "pmd" and m["folio_bytes"] != pmd})
    if skipped:
        notes.append(f"left out {', '.join(skipped)}: only PTE mappings and PMD mappings of the PMD size are modelled")
    ops = {op for _, fitted in MODELS.values() for op in fitted}
    for m in cal["measurements"]:
        if m["mapping"] not in ("pte", "pmd") or m["operation"] not in ops:
            continue
        if m["mapping"] == "pmd" and m["folio_bytes"] != pmd:
            continue
        if m.get("folios_verified") is False:
            notes.append(f"left out {m['folio_size']} {m['operation']}: its folios were not verified")
            continue
        key = (m["folio_bytes"], m["mapping"] == "pmd")
        if key not in by_size:
            by_size[key] = _proportional(arch, kernel, key[0], sim_region, key[1])
        counters = by_size[key][m["operation"]]
        ptes = m["ptes"]
        feats = {k: v * scale / ptes for k, v in counters.items()}
        out.append(Case(m["folio_size"], m["operation"], ptes, float(m[ESTIMATORS[estimator]]), feats, m["mapping"]))
    return out, notes


# -- the model ---------------------------------------------------------------------------------

@dataclass
class OpFit:
    """One operation's fitted costs."""
    name: str
    features: tuple[str, ...]
    coef_ns: dict[str, float]
    fitted_on: list[str]
    #: Condition number of the design matrix with unit-norm columns: large means the features
    #: are nearly collinear in the calibration, so their split is not determined.
    condition: float
    rms_ns_per_pte: float
    #: Counters exactly in the span of the features over the fit data: their costs are folded in.
    aliases: list[str]


@dataclass
class Model:
    """Per-unit costs per operation, fitted to one calibration."""
    ops: dict[str, OpFit]
    calibration: dict[str, Any]
    estimator: str
    notes: list[str] = field(default_factory=list)

    def predict(self, model: str, counters: Mapping[str, float]) -> float | None:
        """Predicted nanoseconds of one step with these counters, or None if ``model`` was not
        fitted. ``pages_freed`` defaults to 0 when absent."""
        fit = self.ops.get(model)
        if fit is None:
            return None
        return float(sum(fit.coef_ns[f] * float(counters.get(f, 0)) for f in fit.features))

    def to_json(self) -> dict[str, Any]:
        return {"calibration": self.calibration, "estimator": self.estimator, "notes": self.notes,
                "operations": {k: {"features": list(v.features), "coefficients_ns": v.coef_ns,
                                   "fitted_on": v.fitted_on, "condition": v.condition,
                                   "rms_ns_per_pte": v.rms_ns_per_pte, "collinear_counters": v.aliases}
                               for k, v in self.ops.items()}}


def _design(rows: Sequence[Case], features: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    A = np.array([[c.features.get(f, 0.0) for f in features] for c in rows], dtype=np.float64)
    b = np.array([c.ns_per_pte for c in rows], dtype=np.float64)
    return A, b


def fit_cases(all_cases: Sequence[Case], sizes: Iterable[str] | None = None) -> dict[str, OpFit]:
    """Fits every model whose operations have cases (of ``sizes`` only, if given)."""
    keep = None if sizes is None else set(sizes)
    fits = {}
    for name, (features, ops) in MODELS.items():
        rows = [c for c in all_cases if c.operation in ops and (keep is None or c.folio_size in keep)]
        pmd_rows: list[Case] = []
        if name in PMD_TERMS:
            pmd_rows = [c for c in rows if c.mapping == "pmd" and c.operation in PMD_TERMS[name][1]]
            rows = [c for c in rows if c.mapping == "pte"]
        if not rows:
            continue
        A, b = _design(rows, features)
        norms = np.linalg.norm(A, axis=0)
        used = norms > 0
        x = np.zeros(len(features))
        An = A[:, used] / norms[used]
        x[used] = nnls(An, b) / norms[used]
        s = np.linalg.svd(An, compute_uv=False) if An.size else np.array([1.0])
        cond = float(s[0] / s[-1]) if s[-1] > 0 else math.inf
        rms = float(np.sqrt(np.mean((A @ x - b) ** 2)))
        aliases = []
        for k in sorted(rows[0].features):
            if k in features:
                continue
            col = np.array([c.features.get(k, 0.0) for c in rows])
            if not col.any() or (col < 0).any():  # pages_freed of a fault is pages taken
                continue
            r = np.linalg.lstsq(A, col, rcond=None)[0]
            if np.allclose(A @ r, col, rtol=1e-9, atol=1e-9 * np.abs(col).max()):
                aliases.append(k)
        coef = {f: float(v) for f, v in zip(features, x)}
        if name in PMD_TERMS:
            term = PMD_TERMS[name][0]
            features = (*features, term)
            coef[term] = 0.0
            if pmd_rows:
                # One unknown: least squares of the PMD rows' residuals on the term, kept >= 0.
                A2, b2 = _design(pmd_rows, features)
                col = A2[:, -1]
                resid = b2 - A2[:, :-1] @ x
                coef[term] = max(0.0, float(col @ resid / (col @ col))) if col.any() else 0.0
                rows = rows + pmd_rows
        fits[name] = OpFit(name, features, coef, sorted({f"{c.folio_size} {c.operation}" for c in rows}),
                           cond, rms, aliases)
    return fits


def fit(calibration: str | os.PathLike[str] | dict | None = None, *, estimator: str = "min",
        sizes: Iterable[str] | None = None) -> Model:
    """The model fitted to ``calibration`` (a path, a loaded dict, or None for the shipped
    file), on the folio sizes ``sizes`` (default: every calibrated one)."""
    cal = check_calibration(calibration) if isinstance(calibration, dict) else load_calibration(calibration)
    cs, notes = cases(cal, estimator)
    keep = None if sizes is None else list(sizes)
    if not any(c.mapping == "pte" and (keep is None or c.folio_size in keep) for c in cs):
        raise CalibrationFileError(f"{cal['_path']}: no PTE-mapped measurement to fit")
    ops = fit_cases(cs, keep)
    info = {"file": cal["_path"], "kernel_release": cal["kernel_release"], "kernel": calibration_kernel(cal),
            "arch": calibration_arch(cal), "date": cal.get("date"), "cpu_model": cal.get("cpu_model"),
            "region_bytes": cal["region_bytes"]}
    return Model(ops, info, estimator, notes)


# -- the held-out check ------------------------------------------------------------------------

@dataclass
class HeldOutRow:
    model: str
    operation: str
    folio_size: str
    held_out: bool
    measured_ns_per_pte: float
    predicted_ns_per_pte: float
    ptes: int
    #: The same case predicted under 6.8 (no PTE batching), to compare with the seed's figures.
    predicted_per_pte_kernel_ns_per_pte: float

    @property
    def error(self) -> float:
        return self.predicted_ns_per_pte / self.measured_ns_per_pte - 1 if self.measured_ns_per_pte else math.inf


def held_out(calibration: str | os.PathLike[str] | dict | None = None, *, estimator: str = "min",
             fit_sizes: Sequence[str] = FIT_SIZES) -> tuple[Model, list[HeldOutRow]]:
    """Fits on ``fit_sizes`` only and predicts every case of the calibration."""
    cal = check_calibration(calibration) if isinstance(calibration, dict) else load_calibration(calibration)
    model = fit(cal, estimator=estimator, sizes=fit_sizes)
    cs, _ = cases(cal, estimator)
    old, _ = cases(cal, estimator, PER_PTE_KERNEL)
    rows = []
    for c, o in zip(cs, old):
        for name, (_, ops) in MODELS.items():
            if c.operation in ops and name in model.ops:
                pred, pred_old = model.predict(name, c.features), model.predict(name, o.features)
                assert pred is not None and pred_old is not None
                held = f"{c.folio_size} {c.operation}" not in model.ops[name].fitted_on
                rows.append(HeldOutRow(name, c.operation, c.folio_size, held,
                                       c.ns_per_pte, pred, c.ptes, pred_old))
    return model, rows


def format_held_out(rows: Sequence[HeldOutRow], *, limit: float = 0.05) -> str:
    """Per operation and folio size: measured and predicted ms and ns/PTE, the error, and the
    ratio to 4K measured and predicted; held-out sizes are marked."""
    out = []
    for op in dict.fromkeys(r.operation for r in rows):
        mine = [r for r in rows if r.operation == op]
        base = next((r for r in mine if r.folio_size == "4K"), None)
        out.append(f"== {op} (model {mine[0].model})")
        has_seed = op in _seed.TABLES
        out.append(f"{'folio':>7} {'meas ms':>8} {'pred ms':>8} {'meas ns/PTE':>11} {'pred ns/PTE':>11} "
                   f"{'error':>6} {'meas /4K':>8} {'pred /4K':>8} {'diff':>6} {'vs 6.8':>7}"
                   + (f" {'seed /4K':>8} {'seed chg':>8}" if has_seed else ""))
        misses = 0
        for r in mine:
            line = (f"{r.folio_size + ('*' if r.held_out else ''):>7} {r.measured_ns_per_pte * r.ptes / 1e6:>8.2f} "
                    f"{r.predicted_ns_per_pte * r.ptes / 1e6:>8.2f} {r.measured_ns_per_pte:>11.1f} "
                    f"{r.predicted_ns_per_pte:>11.1f} {r.error:>+6.0%}")
            if base is not None and base.measured_ns_per_pte and base.predicted_ns_per_pte:
                mr = r.measured_ns_per_pte / base.measured_ns_per_pte
                pr = r.predicted_ns_per_pte / base.predicted_ns_per_pte
                line += f" {mr:>8.2f} {pr:>8.2f} {pr - mr:>+6.2f}"
                if r.held_out and abs(pr - mr) > limit:
                    misses += 1
            else:
                line += f" {'':>8} {'':>8} {'':>6}"
            if r.predicted_per_pte_kernel_ns_per_pte:
                line += f" {r.predicted_ns_per_pte / r.predicted_per_pte_kernel_ns_per_pte - 1:>+7.0%}"
            else:
                line += f" {'':>7}"
            if has_seed:
                sr, sc = _seed.ratio_to_4k(op, r.folio_size), _seed.change(op, r.folio_size)
                line += f" {sr:>8.2f}" if sr is not None else f" {'':>8}"
                line += f" {sc:>+8.0%}" if sc is not None else ""
            out.append(line.rstrip())
        seed = SEED_PUBLISHED.get("munmap" if op == "parent-munmap" else op)
        if seed:
            out.append(f"   the seed series' published change for {op.split('-')[-1]} (Xeon, their cover "
                       f"letters): {seed}")
        held = [r for r in mine if r.held_out]
        if held and base is not None:
            out.append(f"   held-out ratios within {limit}: {len(held) - misses} of {len(held)}"
                       + (" (target met)" if not misses else " (target missed)"))
        out.append("")
    return "\n".join(out).rstrip("\n")


# -- predicting runs ---------------------------------------------------------------------------

def model_for(op: str, counters: Mapping[str, float]) -> tuple[str | None, str | None]:
    """Which fitted model a step of operation ``op`` (a scenario row's op) is predicted with, or
    (None, why not)."""
    if op == "fork":
        return "fork", None
    if op == "munmap":
        return "munmap", None
    if op == "exit":
        return "exit", None
    if op in ("touch", "write"):
        f = counters.get("faults", 0)
        if f and f == counters.get("folios_allocated", 0) and not counters.get("cow_copies", 0) \
                and not counters.get("cow_reuses", 0) and not counters.get("pages_copied", 0):
            return "faults", None
        if not f:
            return None, "no fault: nothing calibrated happens in it"
        return None, "faults other than first-touch allocations (COW, zero page) are not calibrated"
    return None, f"{op} is not calibrated"


def predict_row(model: Model, op: str, counters: Mapping[str, float]) -> tuple[float | None, str | None]:
    """Predicted ns of one step (and None with the reason when it cannot be predicted)."""
    name, why = model_for(op, counters)
    if name is None:
        return None, why
    if name not in model.ops:
        return None, f"the calibration has no {name} measurement to fit"
    if "pages_freed" not in counters and counters.get("folios_freed", 0):
        return None, "pages freed unknown (no pages_freed among the counters)"
    if name == "faults" and "pages_allocated" not in counters:
        if "pages_freed" not in counters:
            return None, "pages allocated unknown (no pages_freed among the counters)"
        counters = dict(counters, pages_allocated=max(0, -counters["pages_freed"]))
    ns = model.predict(name, counters)
    if name == "exit" and counters.get("folios_freed", 0) and "munmap" in model.ops:
        # The exit model is fitted to exits that free nothing: freeing costs as in munmap.
        z = model.ops["munmap"].coef_ns
        ns = (ns or 0.0) + z["folios_freed"] * counters.get("folios_freed", 0) + \
            z["pages_freed"] * counters.get("pages_freed", 0)
    return ns, None


@dataclass
class Prediction:
    source: str
    step: str
    op: str
    where: str
    kernel: str
    ptes: int
    ns: float | None
    model: str | None
    note: str | None


def predict_scenario_rows(model: Model, rows: Sequence[Mapping[str, Any]]) -> list[Prediction]:
    """Predictions for ``scenario.run()`` rows (totals left out), with each step's
    ``pages_freed`` (the change of free pages over the step; negative when it allocated)."""
    out = []
    for r in rows:
        if r["step"] == "total":
            continue
        counters = dict(r)
        ns, why = predict_row(model, r["op"], counters)
        step = r["step"] + (f" x{r['iteration']}" if r["iteration"] else "")
        where = "/".join(x for x in (r["process"], r["vma"]) if x)
        kernel = r["kernel"] + ("" if r["batching"] else " per-PTE")
        out.append(Prediction(r["case"], step, r["op"], where, kernel, r["ptes"], ns,
                              model_for(r["op"], counters)[0] if ns is not None else None, why))
    return out


def predict_snapshot(model: Model, snapshot: Any, kernels: Sequence[str], label: str) -> list[Prediction]:
    """Each captured process forked once under each kernel (as ``ptebatch replay`` does)."""
    from .snapshot import Snapshot

    snap = Snapshot.load(snapshot) if isinstance(snapshot, (str, os.PathLike)) else snapshot
    out = []
    for k in kernels:
        try:
            sim, procs = Simulation.from_snapshot(snap, k)
        except ValueError as e:
            raise PtebatchError(f"cannot replay {label}: {e}") from e
        for pid, p in procs.items():
            mapped = sum((m["end"] - m["start"]) // sim.page_size for m in p.vmas())
            p.fork()
            counters = {kk: v for kk, v in sim.last_stats.items() if isinstance(v, int)}
            ns, why = predict_row(model, "fork", counters)
            out.append(Prediction(label, f"pid {pid}", "fork", "", k, mapped, ns, "fork" if ns is not None else None, why))
    return out


def predict_demo(model: Model, region: int, kernels: Sequence[str], arch: str, progress: Any = None) -> list[Prediction]:
    """The demo's fork study (``study.fork_study``, with its PMD row where the PMD size divides
    the region), one prediction per folio size and kernel."""
    from .study import fork_study

    out = []
    from .study import pmd_size

    pmd = region % pmd_size(arch) == 0
    for r in fork_study(region, None, kernels, arch, progress=progress, pmd=pmd):
        ns, why = predict_row(model, "fork", r.cost_counters)
        out.append(Prediction(f"fork study: {format_size(region)} written, one folio size at a time", r.label,
                              "fork", "", r.kernel, r.ptes, ns, "fork" if ns is not None else None, why))
    return out


def format_predictions(preds: Sequence[Prediction], model: Model, kernels: Sequence[str]) -> str:
    """One line per step, one column per kernel (ms), and a legend."""
    cols = list(dict.fromkeys(p.kernel for p in preds)) or list(kernels)
    by = {(p.source, p.step, p.op, p.where, p.kernel): p for p in preds}
    keys = list(dict.fromkeys((p.source, p.step, p.op, p.where) for p in preds))
    cal = model.calibration
    out = [f"predicted kernel time (ms) from the calibration of {cal['kernel_release']} on {cal['cpu_model']} "
           f"({cal['date']}), {model.estimator} estimator"]
    head = f"{'step':<10} {'op':<8} {'where':<18} {'PTEs':>9}" + "".join(f" {k:>10}" for k in cols)
    notes: dict[str, None] = {}
    source = None
    for key in keys:
        if key[0] != source:
            source = key[0]
            out.append("")
            if source:
                out.append(f"== {source}")
            out.append(head)
        cells = []
        ptes = 0
        for k in cols:
            p = by.get((*key, k))
            if p is None:
                cells.append(f" {'':>10}")
                continue
            ptes = p.ptes
            if p.ns is None:
                cells.append(f" {'-':>10}")
                notes[f"{key[2]}: {p.note}"] = None
            else:
                cells.append(f" {p.ns / 1e6:>10.3f}")
        out.append(f"{key[1]:<10} {key[2]:<8} {key[3][:18]:<18} {ptes:>9}" + "".join(cells))
    out.append("")
    for n in notes:
        out.append(f"- = not predicted: {n}")
    out.append(LEGEND)
    return "\n".join(out)


HELD_OUT_LEGEND = """
* = held out (not fitted)
columns:
  meas, pred  measured (the calibration's statistic; fork and child-exit less the bare
              process's) and predicted, for the calibrated region: ms and ns per PTE
  error       pred / meas - 1
  /4K         ns per PTE over the 4K row's; diff = pred /4K - meas /4K
  vs 6.8      the prediction from this kernel's counters over the one from 6.8's (no PTE
              batching), with the same per-unit costs
  seed /4K    fork and the parent's munmap (the only mapper: the memory is freed): the
              seed series' published time for the size over its 4K time, with the series
  seed chg    the seed's published change for the size: with the series / before - 1
              (the fork and zap series' cover letters, D. Hildenbrand, January 2024: Intel
              Xeon Silver 4210R, 1 GiB of PTE-mapped folios; sources in ptebatch.seed)"""

LEGEND = """\
columns:
  step, op, where  the step of the run (scenario step, captured pid, or the demo's folio size)
  PTEs             page-table entries the step covers
  <kernel>         predicted time of the step in that kernel, in ms: the kernel's counters (from
                   the simulation) times the per-unit costs fitted to the calibration (the
                   calibrated kernel's costs applied to every kernel's counts); fitted for fork,
                   munmap, exit and first-touch faults of private anonymous memory mapped by PTEs
                   or by PMDs (a PMD THP's terms rest on the calibration's one PMD-mapped case);
                   see docs/cost-model.md for the fit and its error"""


# -- the `ptebatch predict` command ------------------------------------------------------------

def add_parser(sub: Any, parents: list) -> None:
    """Registers ``ptebatch predict`` on the CLI's subparsers."""
    from .cli import _kernels, _size

    p = sub.add_parser(
        "predict", parents=parents, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="predicted kernel time of a scenario, a snapshot or the demo, per kernel",
        description="Turns a run's counters into predicted kernel time per step and kernel, with a "
                    "linear cost model fitted to a calibration (docs/cost-model.md).",
        epilog="examples:\n  ptebatch predict examples/fork-munmap-matrix.toml\n"
               "  ptebatch predict --snapshot snap.npz --kernel 6.8,6.18\n"
               "  ptebatch predict --demo --region 64MiB\n  ptebatch predict --held-out\n")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("scenario", nargs="?", help="a scenario file (.toml, docs/scenarios.md)")
    src.add_argument("--snapshot", metavar="SNAP", help="a snapshot: each process forked under each kernel")
    src.add_argument("--demo", action="store_true", help="the demo's fork study (--region, every folio size)")
    src.add_argument("--held-out", action="store_true",
                     help=f"the model's check: fit on {', '.join(FIT_SIZES)}, predict {', '.join(HELD_OUT_SIZES)}")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a scenario's [params] value, as for 'ptebatch run'")
    p.add_argument("--kernel", type=_kernels, action="extend", metavar="KERNELS",
                   help="kernels, comma-separated or 'all' (default: the scenario's; 6.8 and the newest otherwise)")
    p.add_argument("--calibration", metavar="FILE", help="a calibration from 'ptebatch calibrate' "
                                                          "(default: the shipped one)")
    p.add_argument("--estimator", choices=tuple(ESTIMATORS), default="min",
                   help="fit the fastest sample (min, default) or the median of each calibrated case")
    p.add_argument("--region", type=_size, metavar="SIZE", help="--demo's region (default 1GiB)")
    p.add_argument("--json", action="store_true", help="JSON: the model and the predictions")
    p.add_argument("--plot", metavar="DIR", help="with --held-out: also write a PNG of measured vs "
                                                 "predicted time per folio size into DIR (needs matplotlib)")
    p.set_defaults(run=predict_cmd, predict_parser=p)


def predict_cmd(args: argparse.Namespace) -> int:
    from . import scenario as scn
    from .cli import COMPARED_KERNELS, _progress

    if args.region is not None and not args.demo:
        args.predict_parser.error("argument --region: only with --demo")
    if args.set and not args.scenario:
        args.predict_parser.error("argument --set: only with a scenario file")
    kernels = list(dict.fromkeys(args.kernel or ()))
    if args.plot and not args.held_out:
        args.predict_parser.error("argument --plot: only with --held-out")
    if args.held_out:
        if args.plot:
            from .report import check_plot_dir, need_matplotlib

            need_matplotlib()
            check_plot_dir(args.plot)
        check, held = held_out(args.calibration, estimator=args.estimator)
        if args.plot:
            from . import plots

            png = plots.predicted_vs_measured(plots.predicted_vs_measured_data(held),
                                              os.path.join(args.plot, "predicted-vs-measured.png"))
            print(f"plot: {png}", file=sys.stderr if args.json else sys.stdout)
        if args.json:
            doc = {"format": "ptebatch-cost-held-out", "version": 1, "model": check.to_json(),
                   "fit_sizes": list(FIT_SIZES), "rows": [dict(vars(r), error=r.error) for r in held]}
            sys.stdout.write(json.dumps(doc, indent=1) + "\n")
        else:
            print(format_held_out(held))
            print(HELD_OUT_LEGEND)
            for note in check.notes:
                print(f"note: {note}")
        return 0
    model = fit(args.calibration, estimator=args.estimator)
    if args.scenario:
        try:
            sc = scn.load(args.scenario, scn.parse_set(args.set))
        except scn.ScenarioError as e:
            args.predict_parser.error(str(e))
        with _progress(args, len(sc.cases) * len(kernels or sc.kernels) * len(sc.batching), "predict") as bar:
            rows = scn.run(sc, kernels or None, progress=bar.step)
        preds = predict_scenario_rows(model, rows)
        arch = sc.arch
    elif args.snapshot:
        kernels = kernels or list(COMPARED_KERNELS)
        with _progress(args, 1, "predict"):
            preds = predict_snapshot(model, args.snapshot, kernels, args.snapshot)
        arch = None
    else:
        kernels = kernels or list(COMPARED_KERNELS)
        arch = model.calibration["arch"]
        from .study import check_region, folio_sizes, pmd_size
        try:
            region = check_region(args.region or 1 << 30, arch)
        except ValueError as e:
            args.predict_parser.error(f"argument --region: {e}")
        forks = (sum(1 for s in folio_sizes(arch) if region % s == 0) + (region % pmd_size(arch) == 0)) * len(kernels)
        with _progress(args, forks, "predict") as bar:
            preds = predict_demo(model, region, kernels, arch, progress=bar)
    notes = list(model.notes)
    if arch is not None and arch != model.calibration["arch"]:
        notes.append(f"the run is on {arch}, the calibration on {model.calibration['arch']}: its costs are applied")
    if args.json:
        doc = {"format": "ptebatch-prediction", "version": 1, "model": model.to_json(), "notes": notes,
               "rows": [vars(p) for p in preds]}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        print(format_predictions(preds, model, kernels))
        for note in notes:
            print(f"note: {note}")
    return 0


__all__ = ["ESTIMATORS", "MODELS", "Model", "OpFit", "SHIPPED_CALIBRATION", "CalibrationFileError", "check_calibration", "fit",
           "fit_cases", "format_held_out", "held_out", "load_calibration", "nnls", "predict_row",
           "predict_scenario_rows", "predict_snapshot", "predict_demo", "simulate_case"]

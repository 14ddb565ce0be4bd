"""Reports: the fork study or a scenario as plots (``--plot DIR``) and as one Markdown or HTML
file with its tables and plots (``ptebatch report``; docs/reports.md)."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import LAYOUT_NAMES, NEWEST_KERNEL, __version__, plots
from . import scenario as scen
from .errors import PtebatchError
from .simulation import format_size
from .study import (ForkRow, Progress, check_folio_size, check_region, folio_sizes, fork_study, pmd_size,
                    ratio_cell)


# -- running, keeping what the plots need -----------------------------------------------------

@dataclass
class ScenarioResult:
    """``scenario.run()``'s rows, plus per case the batch histogram of each run (fork, zap and
    mprotect over the whole run) and the page-table maps of the processes just before the
    first fork (or at the end, without a fork)."""

    sc: Any
    rows: list[dict[str, Any]]
    histograms: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    maps: list[tuple[str, str, plots.PageTableMap]] = field(default_factory=list)


def run_scenario(sc: Any, kernels: Sequence[str] | None = None,
                 progress: Callable[[str], None] | None = None) -> ScenarioResult:
    """Runs ``sc`` as ``scenario.run()`` does (same rows, same order), one run at a time."""
    kernels = list(kernels or sc.kernels)
    res = ScenarioResult(sc, [])
    for i, case in enumerate(sc.cases):
        label = case.label or sc.name
        for kernel in kernels:
            for batching in sc.batching:
                sim, rows = scen.execute(sc, kernel, batching=batching, case=i)
                res.rows.extend(rows)
                series = kernel + ("" if batching else " per-PTE")
                res.histograms.setdefault(label, {})[series] = list(sim.stats["batch_histogram"])
                if progress:
                    progress(f"{case.label} {series}")
        res.maps.extend((label, name, m) for name, m in _maps(sc, i, kernels[-1]))
    return res


def _maps(sc: Any, i: int, kernel: str) -> list[tuple[str, plots.PageTableMap]]:
    """The page tables just before the case's first fork (a top-level step): what fork batches."""
    case = sc.cases[i]
    forks = [k for k, s in enumerate(case.steps) if s.op == "fork"]
    if forks:
        case = dataclasses.replace(case, steps=case.steps[:forks[0]])
    one = dataclasses.replace(sc, cases=[case])
    sim, _ = scen.execute(one, kernel, batching=True in sc.batching)
    # Processes of a fresh scenario are spawned in file order (pids from 1); before the first
    # fork no other process exists. A snapshot's processes are named by pid.
    names = {} if sc.snapshot is not None else {n + 1: name for n, name in enumerate(case.processes)}
    out = []
    pid = 1
    while True:
        try:
            p = sim.process(pid)
            vmas = p.vmas()
        except ValueError:
            break
        if vmas:
            out.append((names.get(pid, f"pid {pid}"), plots.page_table_map_data(sim, p, kernel)))
        pid += 1
    return out


# -- plots into a directory -------------------------------------------------------------------

@dataclass
class Plot:
    path: str
    caption: str


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "x"


def fork_study_plots(rows: Sequence[ForkRow], outdir: str, region: int, arch: str) -> list[Plot]:
    """The fork study's batch histograms and operations per PTE, as PNGs in ``outdir``."""
    os.makedirs(outdir, exist_ok=True)
    kernels = list(dict.fromkeys(r.kernel for r in rows))
    what = f"fork() of {format_size(region)} of written anonymous memory on {arch}"
    out = [
        Plot(plots.batch_histogram(plots.fork_histograms(rows), os.path.join(outdir, "fork-batch-histogram.png"),
                                   title=f"{what}: PTE batches by length, per folio size"),
             f"Batches of the fork by length (PTEs per batch), one panel per folio size, bars per kernel "
             f"({', '.join(kernels)})."),
        Plot(plots.ops_per_pte(plots.fork_ops_data(rows), os.path.join(outdir, "fork-ops-per-pte.png"),
                               title=f"{what}: operations per PTE"),
             "Refcount atomics, rmap calls, PTE writes and batches of the fork, per PTE, by folio size and kernel."),
    ]
    return out


def scenario_plots(res: ScenarioResult, outdir: str) -> list[Plot]:
    """A scenario's batch histograms, operations per PTE and page-table maps, as PNGs in ``outdir``."""
    os.makedirs(outdir, exist_ok=True)
    sc, name = res.sc, _slug(res.sc.name)
    out = [Plot(plots.batch_histogram(res.histograms, os.path.join(outdir, f"{name}-batch-histogram.png"),
                                      title=f"{sc.name} on {sc.arch}: PTE batches by length over each run"),
                "Batches formed by fork, zap and mprotect over each whole run, by length, "
                "one panel per case, bars per kernel.")]
    cases = list(dict.fromkeys(r["case"] for r in res.rows))
    if len(cases) == 1:
        data = plots.scenario_ops_data(res.rows, case=cases[0])
        if data.categories:
            out.append(Plot(plots.ops_per_pte(data, os.path.join(outdir, f"{name}-ops-per-pte.png"),
                                              title=f"{sc.name} on {sc.arch}: operations per PTE, per step",
                                              xlabel="step, process/VMA"),
                            "Refcount atomics, rmap calls, PTE writes and batches per PTE the step covers, "
                            "per step and kernel."))
    else:
        steps = list(dict.fromkeys(plots._step_key(r) for r in res.rows if r["step"] != "total" and r["ptes"]))
        for step in steps:
            data = plots.scenario_ops_data(res.rows, step=step)
            op = next(r["op"] for r in res.rows if plots._step_key(r) == step)
            out.append(Plot(plots.ops_per_pte(data, os.path.join(outdir, f"{name}-ops-per-pte-step{_slug(step)}.png"),
                                              title=f"{sc.name} on {sc.arch}: step {step} ({op}), operations per PTE",
                                              xlabel="case"),
                            f"Step {step} ({op}): refcount atomics, rmap calls, PTE writes and batches per PTE, "
                            f"per case and kernel."))
    for case, proc, m in res.maps:
        title = f"{case}: {proc}" if case != proc else proc
        out.append(Plot(plots.page_table_map(m, os.path.join(outdir, f"{name}-ptmap-{_slug(case)}-{_slug(proc)}.png"),
                                             title=f"{title} before the first fork"),
                        f"The page tables of {proc} ({case}) just before the first fork (at the end without one): "
                        f"one row per page table, colour = folio order, alternating shades = the batches fork "
                        f"forms under {m.kernel}."))
    return out


def need_matplotlib() -> None:
    """For the command line: no matplotlib is a one-line error, not a traceback."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PtebatchError("plots need matplotlib: pip install 'ptebatch[plot]' (or matplotlib>=3.7)") from None


def check_plot_dir(path: str) -> None:
    """Creates ``path`` if needed and checks a file can be written there, before a long run."""
    need_matplotlib()
    os.makedirs(path, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path, prefix=".plot-probe-"):
        pass


def print_plots(out: Sequence[Plot], stream: Any = None) -> None:
    stream = stream or sys.stdout
    for p in out:
        print(f"plot: {p.path}", file=stream)


# -- the document ---------------------------------------------------------------------------

@dataclass
class Table:
    head: list[str]
    rows: list[list[str]]
    title: str = ""


def fork_study_tables(rows: Sequence[ForkRow]) -> list[Table]:
    """The columns of ``study.format_fork_study``, with its ratio rows."""
    kernels = list(dict.fromkeys(r.kernel for r in rows))
    base, new = kernels[0], kernels[-1]
    by = {(r.key, r.kernel): r for r in rows}
    t = Table(["folio", "kernel", "PTEs", "batches", "refcount/PTE", "rmap/PTE", "PTE writes/PTE", "sim ms"], [])
    for key in sorted({r.key for r in rows}):
        for k in kernels:
            r = by[(key, k)]
            t.rows.append([r.label, k, str(r.ptes), str(r.batches), f"{r.per_pte('refcount_atomics'):.4f}",
                           f"{r.per_pte('rmap_calls'):.4f}", f"{r.per_pte('pte_writes'):.3f}", f"{r.seconds * 1e3:.1f}"])
        a, b = by[(key, base)], by[(key, new)]
        t.rows.append(["", "ratio", "", ratio_cell(a.batches, b.batches),
                       ratio_cell(a.refcount_atomics, b.refcount_atomics), ratio_cell(a.rmap_calls, b.rmap_calls),
                       ratio_cell(a.pte_writes, b.pte_writes, 2), f"{a.seconds / max(b.seconds, 1e-9):.1f}x"])
    return [t]


FORK_LEGEND = """\
columns (the kernel work of the fork alone):
  folio           the folio size the region was faulted in with (PTE-mapped); "-pmd": PMD
                  THPs, one PMD per folio, which fork copies whole (copy_huge_pmd())
  PTEs            page-table entries fork copied (pages, for -pmd)
  batches         PTE batches fork formed (one per folio_pte_batch() run or single PTE)
  refcount/PTE    folio refcount atomic operations per PTE
  rmap/PTE        rmap calls (folio_try_dup_anon_rmap_*) per PTE
  PTE writes/PTE  PTE writes per PTE (the child's entry, and the parent's write-protect)
  sim ms          host time of the simulated fork
  ratio           the first kernel's count divided by the last kernel's
sim.check() passed after every fork."""


def scenario_tables(res: ScenarioResult) -> list[Table]:
    """The columns of ``scenario.format_table``, one table per case."""
    out = []
    for case in dict.fromkeys(r["case"] for r in res.rows):
        t = Table(["step", "op", "where", "kernel", *(h for h, _ in scen._TABLE)], [], case)
        mine = [r for r in res.rows if r["case"] == case]
        for key in dict.fromkeys((r["step"], r["iteration"]) for r in mine):
            for r in (r for r in mine if (r["step"], r["iteration"]) == key):
                t.rows.append([plots._step_key(r), r["op"], "/".join(x for x in (r["process"], r["vma"]) if x),
                               plots._series(r), *(str(r[f]) for _, f in scen._TABLE)])
        out.append(t)
    return out


@dataclass
class Document:
    title: str
    intro: list[str]
    tables: list[Table]
    legend: str
    plots: list[Plot]
    notes: list[str] = field(default_factory=list)


def _md_cell(s: str) -> str:
    return html.escape(s, quote=False).replace("|", "\\|") or " "


def _md_text(text: str) -> str:
    """``text`` for Markdown prose: HTML special characters escaped."""
    return html.escape(str(text), quote=False)


def to_markdown(doc: Document, files_dir: str, rel: str) -> str:
    """Markdown; the plots are referenced as ``rel/<file>`` (they are in ``files_dir``)."""
    # Text from a scenario file is escaped: a shared file must not put live HTML into a
    # rendered report.
    out = [f"# {_md_text(doc.title)}", ""]
    out += [*(f"{_md_text(p)}  " for p in doc.intro), ""]
    out += ["## Results", ""]
    for t in doc.tables:
        if t.title:
            out += [f"### {_md_text(t.title)}", ""]
        out.append("| " + " | ".join(map(_md_cell, t.head)) + " |")
        out.append("|" + "|".join("---" if h in _TEXT_COLUMNS else "---:" for h in t.head) + "|")
        out += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in t.rows]
        out.append("")
    out += ["```", doc.legend, "```", "", "## Plots", ""]
    for p in doc.plots:
        name = os.path.basename(p.path)
        assert os.path.dirname(os.path.abspath(p.path)) == os.path.abspath(files_dir)
        out += [f"![{_md_text(p.caption)}]({rel}/{name})", "", _md_text(p.caption), ""]
    out += [*(f"*{_md_text(n)}*" for n in doc.notes)]
    return "\n".join(out).rstrip() + "\n"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:90%}th,td{border:1px solid #ccc;padding:2px 8px}
th{background:#f0f0f0}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f7f7f7;padding:.8em;overflow-x:auto}img{max-width:100%;border:1px solid #ddd}
figure{margin:1.5em 0}figcaption{color:#555}"""


def to_html(doc: Document) -> str:
    """One standalone HTML5 document: the plots embedded as base64 data URIs."""
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{e(doc.title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
           f"<h1>{e(doc.title)}</h1>", *(f"<p>{e(p)}</p>" for p in doc.intro), "<h2>Results</h2>"]
    for t in doc.tables:
        if t.title:
            out.append(f"<h3>{e(t.title)}</h3>")
        out.append("<table>")
        out.append("<tr>" + "".join(f"<th>{e(h)}</th>" for h in t.head) + "</tr>")
        for r in t.rows:
            out.append("<tr>" + "".join(f"<td{'' if h in _TEXT_COLUMNS else _NUM}>{e(c)}</td>"
                                        for h, c in zip(t.head, r)) + "</tr>")
        out.append("</table>")
    out += [f"<pre>{e(doc.legend)}</pre>", "<h2>Plots</h2>"]
    for p in doc.plots:
        with open(p.path, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
        out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{e(p.caption)}">'
                   f"<figcaption>{e(p.caption)}</figcaption></figure>")
    out += [*(f"<p><em>{e(n)}</em></p>" for n in doc.notes), "</body>", "</html>"]
    return "\n".join(out) + "\n"


_NUM = ' class="n"'
_TEXT_COLUMNS = ("step", "op", "where", "kernel", "folio")


PREDICTED_NOTE = ("Predicted against measured kernel time is not plotted yet: it will come with the cost model.")


def fork_study_document(rows: Sequence[ForkRow], region: int, arch: str, outdir: str) -> Document:
    kernels = list(dict.fromkeys(r.kernel for r in rows))
    return Document(
        f"ptebatch fork study: {format_size(region)} on {arch}",
        [f"ptebatch {__version__}: fork() of {format_size(region)} of written private anonymous memory on {arch}, "
         f"one folio size at a time (PTE-mapped), under {' and '.join(kernels)}.",
         f"ratio = {kernels[0]} / {kernels[-1]}."],
        fork_study_tables(rows), FORK_LEGEND, fork_study_plots(rows, outdir, region, arch), [PREDICTED_NOTE])


def scenario_document(res: ScenarioResult, outdir: str) -> Document:
    sc = res.sc
    kernels = list(dict.fromkeys(r["kernel"] for r in res.rows))
    intro = [f"ptebatch {__version__}: scenario {sc.name} ({sc.path}) on {sc.arch}, under {', '.join(kernels)}."]
    if sc.description:
        intro.append(sc.description)
    return Document(f"ptebatch scenario report: {sc.name}", intro, scenario_tables(res), scen.LEGEND,
                    scenario_plots(res, outdir), [PREDICTED_NOTE])


def write_report(make: Callable[[str], Document], path: str, fmt: str) -> tuple[str, list[Plot]]:
    """Writes the report to ``path``: Markdown with its PNGs in ``<stem>_files/`` next to it,
    or HTML with them embedded. Returns the path and the plots written to disk (none for HTML)."""
    path = os.fspath(path)
    if fmt == "md":
        stem = os.path.splitext(os.path.basename(path))[0]
        rel = f"{stem}_files"
        files = os.path.join(os.path.dirname(os.path.abspath(path)), rel)
        doc = make(files)
        text = to_markdown(doc, files, rel)
        kept = doc.plots
    else:
        with tempfile.TemporaryDirectory(prefix="ptebatch-report-") as tmp:
            doc = make(tmp)
            text = to_html(doc)
        kept = []
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path, kept


# -- the command line -----------------------------------------------------------------------

def add_plot_options(sub: Any) -> None:
    """``--plot DIR`` on ``demo`` and ``run`` (``run`` then runs through :func:`run_cmd`)."""
    for name in ("demo", "run"):
        p = sub.choices[name]
        p.add_argument("--plot", metavar="DIR",
                       help="also write the plots (PNG) into DIR (created if needed) and print their paths")
    sub.choices["run"].set_defaults(run=run_cmd)


def _kernels(args: argparse.Namespace) -> list[str] | None:
    if not args.kernel:
        return None
    return list(dict.fromkeys(k for text in args.kernel for k in scen.parse_kernels(text)))


def run_cmd(args: argparse.Namespace) -> int:
    """``ptebatch run``, with the plots when ``--plot`` is given."""
    if not args.plot:
        return scen.run_cmd(args)
    try:
        sc = scen.load(args.scenario, scen.parse_set(args.set))
        kernels = _kernels(args)
    except scen.ScenarioError as e:
        args.scenario_parser.error(str(e))
    check_plot_dir(args.plot)
    n = len(sc.cases) * len(kernels or sc.kernels) * len(sc.batching)
    res = run_scenario(sc, kernels, progress=Progress(n, "scenario", enabled=not getattr(args, "quiet", False)).step)
    rows = res.rows
    text = (scen.to_json(sc, rows) if args.json else scen.to_csv(rows) if args.csv
            else scen.format_table(sc, rows) + "\n")
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    # Keep stdout machine-readable when it carries JSON or CSV.
    print_plots(scenario_plots(res, args.plot),
                sys.stderr if (args.json or args.csv) and not args.output else sys.stdout)
    return 0


def add_parser(sub: Any, parents: list) -> None:
    r = sub.add_parser("report", parents=parents,
                       help="run a scenario (or the demo's fork study) into one Markdown or HTML report",
                       description="Runs a scenario file, or the fork study (--demo), and writes one report "
                                   "with its tables and plots (docs/reports.md).")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("scenario", nargs="?", help="the scenario file (.toml)")
    src.add_argument("--demo", action="store_true", help="the fork study of `ptebatch demo` instead")
    r.add_argument("--format", choices=("md", "html"),
                   help="md (PNGs in <name>_files/ next to it) or html (standalone, images embedded); "
                        "default: from the -o suffix (.html, .htm), else md")
    r.add_argument("-o", "--output", metavar="FILE",
                   help="the report file (default: <scenario name>-report.<format>, fork-study-report.<format> "
                        "with --demo, in the current directory)")
    r.add_argument("--kernel", action="append",
                   help='kernels: "all" or a comma-separated list (repeatable); with --demo the first is '
                        f"the baseline (default 6.8,{NEWEST_KERNEL})")
    r.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="a scenario: override a [params] value; --demo: region=SIZE, size=SIZE[,SIZE...], "
                        "arch=LAYOUT")
    r.set_defaults(run=report_cmd, report_parser=r, scenario_parser=r)


def _demo_settings(args: argparse.Namespace) -> tuple[int, list[int], str, bool]:
    bad = args.report_parser.error
    opts: dict[str, str] = {}
    for item in args.set:
        name, eq, value = item.partition("=")
        if not eq or name not in ("region", "size", "arch"):
            bad(f"argument --set: {item!r}: with --demo, expected region=SIZE, size=SIZE[,SIZE...] or arch=LAYOUT")
        opts[name] = value
    arch = opts.get("arch", "x86-64")
    if arch not in LAYOUT_NAMES:
        bad(f"argument --set: arch {arch!r}; expected one of {', '.join(LAYOUT_NAMES)}")
    try:
        region = check_region(opts.get("region", "1GiB"), arch)
        if "size" in opts:
            sizes = list(dict.fromkeys(check_folio_size(s.strip(), arch) for s in opts["size"].split(",")))
        else:
            sizes = [s for s in folio_sizes(arch) if region % s == 0]
        for s in sizes:
            if region % s:
                raise ValueError(f"folio size {format_size(s)} does not divide the {format_size(region)} region")
    except ValueError as e:
        bad(f"argument --set: {e}")
    # The PMD THP row comes with the default sizes, as in the demo.
    return region, sizes, arch, "size" not in opts and region % pmd_size(arch) == 0


def report_cmd(args: argparse.Namespace) -> int:
    need_matplotlib()
    fmt = args.format or ("html" if args.output and args.output.lower().endswith((".html", ".htm")) else "md")
    if args.demo:
        if args.scenario:
            args.report_parser.error("give a scenario file or --demo, not both")
        region, sizes, arch, pmd = _demo_settings(args)
        try:
            kernels = _kernels(args) or ["6.8", NEWEST_KERNEL]
        except scen.ScenarioError as e:
            args.report_parser.error(f"argument --kernel: {e}")
        path = args.output or f"fork-study-report.{fmt}"
        check_writable(path)
        with Progress((len(sizes) + pmd) * len(kernels), "fork study", enabled=not getattr(args, "quiet", False)) as bar:
            rows = fork_study(region, sizes, kernels, arch, progress=bar, pmd=pmd)
        out, kept = write_report(lambda d: fork_study_document(rows, region, arch, d), path, fmt)
    else:
        try:
            sc = scen.load(args.scenario, scen.parse_set(args.set))
            kernels = _kernels(args)
        except scen.ScenarioError as e:
            args.report_parser.error(str(e))
        path = args.output or f"{_slug(sc.name)}-report.{fmt}"
        check_writable(path)
        n = len(sc.cases) * len(kernels or sc.kernels) * len(sc.batching)
        res = run_scenario(sc, kernels, progress=Progress(n, "scenario").step)
        out, kept = write_report(lambda d: scenario_document(res, d), path, fmt)
    print(f"report: {out}")
    print_plots(kept)
    return 0


def check_writable(path: str) -> None:
    """Fails before a long run, not after it, when its output file cannot be written (an
    OSError naming ``path``); only a regular file is ever replaced."""
    import errno
    import stat

    if os.path.isdir(path):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise OSError(errno.EEXIST, "exists and is not a regular file, which is never replaced", path)
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(path)), prefix=".ptebatch-probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e


__all__ = ["Document", "Plot", "ScenarioResult", "Table", "add_parser", "add_plot_options", "check_plot_dir",
           "fork_study_document", "fork_study_plots", "fork_study_tables", "run_scenario", "scenario_document",
           "scenario_plots", "scenario_tables", "to_html", "to_markdown", "write_report"]

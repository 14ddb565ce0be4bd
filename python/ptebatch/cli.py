"""The ``ptebatch`` command (also ``python -m ptebatch``).

Every error is one line on stderr: a bad argument is a usage error (exit 2), a failure while
running (a missing or unwritable file, a process that cannot be captured, a bad snapshot, the
simulated machine out of memory) exits 1 and Ctrl-C exits 130. ``--debug`` shows the traceback.
Steps that can take more than a second show their progress on stderr (``--quiet`` hides it).
Each subcommand is a function taking the parsed arguments, registered in ``_parser()``.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
import textwrap
import time
from collections import Counter
from typing import Callable, NoReturn, Sequence

import numpy as np

import ptebatch as pb
from ptebatch import report
from ptebatch.study import (MAX_REGION, Progress, check_folio_size, check_region, folio_sizes,
                            fork_study, pmd_size, fork_study_legend, format_fork_study, predicted_legend)
from ptebatch.tables import mixed_table, unbacked_pfns

#: 6.8 (per-PTE fork), one kernel per folio_pte_batch() form, and the newest (the reference the
#: others are compared with).
BATCHES_KERNELS = tuple(dict.fromkeys(("6.8", "seed", "6.9", "6.12", "6.15", "6.18", pb.NEWEST_KERNEL)))

#: What demo and replay compare by default: the last kernel without PTE batching on fork, and
#: the newest.
COMPARED_KERNELS = ("6.8", pb.NEWEST_KERNEL)

#: PID_MAX_LIMIT on 64-bit kernels (include/linux/threads.h).
PID_MAX = 1 << 22

#: Largest PMD order of any layout (arm64 with 64K pages: 8192 PTEs per table).
MAX_ORDER = max(pb.layout(n).ptrs_per_pte for n in pb.LAYOUT_NAMES).bit_length() - 1

#: Generated tables stay below this virtual page: the end of a 64-bit space of 64K pages.
VPN_LIMIT = 1 << 48

EXIT_RUNTIME, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UsageError(Exception):
    """A bad argument, found by argparse or after parsing (when it needs the arch or the snapshot)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line ("ptebatch demo: error: argument --size: ..."),
    raised so that main() returns the exit code instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: error: {message}")


def _bad(args: argparse.Namespace, option: str, message: str) -> NoReturn:
    raise UsageError(f"ptebatch {args.command}: error: argument {option}: {message}")


# -- argument types: a bad value is a usage error naming the option -------------------------

def _size(text: str) -> int:
    try:
        n = pb.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if n == 0:
        raise argparse.ArgumentTypeError(f"size {text!r} is zero")
    return n


def _path(text: str) -> str:
    """A file name: not empty."""
    if not text:
        raise argparse.ArgumentTypeError("an empty file name")
    return text


def _pow2_size(text: str) -> int:
    n = _size(text)
    if n & (n - 1):
        raise argparse.ArgumentTypeError(f"size {text!r} is not a power of two")
    return n


def _int_in(least: int, most: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if n < least or (most is not None and n > most):
            bound = f"from {least} to {most}" if most is not None else f"at least {least}"
            raise argparse.ArgumentTypeError(f"{n} is out of range (must be {bound})")
        return n

    return parse


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(p) and 0 <= p <= 1):
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return p


def _order(text: str) -> int:
    o = _int_in(0, MAX_ORDER)(text)
    if o == 1:
        raise argparse.ArgumentTypeError("order 1 is not an anonymous mTHP order (orders 0 and 2 up)")
    return o


_pid = _int_in(1, PID_MAX)


def _kernels(text: str) -> list[str]:
    """``6.8,7.0`` or ``all``; used with action="extend", so the option also repeats."""
    if text.strip() == "all":
        return list(pb.KERNEL_VERSIONS)
    names = [k.strip() for k in text.split(",")]
    for k in names:
        if k not in pb.KERNEL_VERSIONS:
            raise argparse.ArgumentTypeError(f"invalid choice: {k!r} (choose from {', '.join(pb.KERNEL_VERSIONS)}, "
                                             f"or all; several are separated by commas)")
    return names


def _unique(items: Sequence) -> list:
    return list(dict.fromkeys(items))


# -- commands ---------------------------------------------------------------------------------

def _runs(lengths: np.ndarray) -> str:
    """Compact run-length text: 16x3 1x2 8 ..."""
    out: list[str] = []
    prev, count = None, 0
    for n in lengths.tolist() + [None]:
        if n == prev:
            count += 1
            continue
        if prev is not None:
            out.append(f"{prev}x{count}" if count > 1 else str(prev))
        prev, count = n, 1
    return " ".join(out)


def demo(args: argparse.Namespace) -> int:
    """The main job: the fork study (``ptebatch.study``)."""
    try:
        region = check_region(args.region, args.arch)
    except ValueError as e:
        _bad(args, "--region", str(e))
    kernels = _unique(args.kernel or COMPARED_KERNELS)
    notes = []
    if len(kernels) == 1:
        notes.append(f"one kernel, so no ratio rows: give two or more to compare, e.g. "
                     f"--kernel 6.8,{kernels[0] if kernels[0] != '6.8' else pb.NEWEST_KERNEL} "
                     f"(the first is the baseline)")
    if args.size:
        sizes = _unique(args.size)
        for size in sizes:
            try:
                check_folio_size(size, args.arch)
            except ValueError as e:
                _bad(args, "--size", str(e))
            if region % size:
                _bad(args, "--size", f"{pb.format_size(size)} does not divide the "
                                     f"{pb.format_size(region)} region")
    else:
        every = folio_sizes(args.arch)
        sizes = [s for s in every if region % s == 0]
        skipped = [pb.format_size(s) for s in every if region % s]
        if skipped:
            notes.append(f"skipped folio sizes that do not divide the region: {', '.join(skipped)}")
    pmd = args.pmd
    if pmd is None:
        # By default as every folio size: where it divides the region, unless --size chose.
        pmd = not args.size and region % pmd_size(args.arch) == 0
    elif pmd and region % pmd_size(args.arch):
        _bad(args, "--pmd", f"the {pb.format_size(region)} region is not a multiple of the "
                            f"{pb.format_size(pmd_size(args.arch))} PMD size")
    if args.plot:
        report.check_plot_dir(args.plot)
    print(f"ptebatch {pb.__version__}: fork() of {pb.format_size(region)} of written private anonymous "
          f"memory on {args.arch}, one folio size at a time (PTE-mapped"
          f"{', then PMD THPs' if pmd else ''}), under {', '.join(kernels)}")
    for note in notes:
        print(f"note: {note}")
    print("the counters are the kernel's work in the fork alone\n")
    sys.stdout.flush()
    t0 = time.perf_counter()
    with _progress(args, (len(sizes) + pmd) * len(kernels), "fork study") as bar:
        rows = fork_study(region, sizes, kernels, args.arch, progress=bar, pmd=pmd)
    predicted, provenance = _fork_predictions(rows, args.arch)
    if provenance is None and predicted is None:
        notes_after = ["no predicted kernel time: the shipped calibration is of another architecture"]
    else:
        notes_after = []
    print(format_fork_study(rows, kernels, predicted))
    print()
    print(fork_study_legend(kernels))
    if predicted is not None and provenance is not None:
        print(predicted_legend(provenance))
    for note in notes_after:
        print(f"note: {note}")
    print(f"\nsim.check() passed after each of the {len(rows)} forks; "
          f"{time.perf_counter() - t0:.2f} s in all")
    if args.measure:
        _measure_forks(args, region, sizes, pmd)
    if args.plot:
        report.print_plots(report.fork_study_plots(rows, args.plot, region, args.arch))
    return 0


def _measure_forks(args: argparse.Namespace, region: int, sizes: list[int], pmd_row: bool = False) -> None:
    """``demo --measure``: the running kernel's fork per folio size, timed as ``ptebatch
    calibrate`` times it, beside what the cost model predicts for that kernel's counters."""
    from ptebatch import calibrate, cost

    why = calibrate.missing_requirements()
    if why:
        raise pb.CaptureError(f"cannot measure the running kernel: {why}")
    running = pb.kernel_from_release(os.uname().release)
    pmd = calibrate._pmd_size()
    offered = {s.label: s for s in calibrate.available_sizes()}
    want = [offered.get(pb.format_size(n) + ("-pte" if n == pmd else "")) for n in sizes]
    if pmd_row:
        want.append(offered.get(pb.format_size(pmd) + "-pmd"))
    folios = [f for f in want if f is not None]
    if not folios:
        raise pb.CaptureError("the running kernel offers none of these folio sizes")
    with _progress(args, 1, "measuring the running kernel") as bar:
        cal = calibrate.calibrate(region, args.measure, folios, progress=lambda line: bar.update(0, line))
        rows = fork_study(region, [f.bytes for f in folios if not f.pmd], [running], args.arch,
                          pmd=any(f.pmd for f in folios))
    model = cost.fit()
    fork = {(r["folio_bytes"], r["mapping"] == "pmd"): r for r in cal["measurements"] if r["operation"] == "fork"}
    gib = (1 << 30) / region
    print(f"\nmeasured: fork() on this machine's kernel {os.uname().release} ({running}), median of "
          f"{args.measure}, bare fork subtracted; predicted: the cost model on {running}'s counters")
    print(f"{'folio':>6} {'measured ms/GiB':>15} {'vs 4K':>7} {'predicted ms/GiB':>16} {'vs 4K':>7}")
    def cell(v: float | None, base: float | None, width: int) -> str:
        return (f"{v:>{width}.2f}" if v is not None else f"{'-':>{width}}") + \
            (f" {v / base:>6.2f}x" if v is not None and base else f" {'-':>7}")

    base_m = base_p = None
    for r in rows:
        m = fork.get(r.key)
        meas = (m["median_ns"] - m["baseline_ns"]) / 1e6 * gib if m else None
        ns, _ = cost.predict_row(model, "fork", r.cost_counters)
        pred = ns / 1e6 * gib if ns is not None else None
        base_m = meas if base_m is None else base_m
        base_p = pred if base_p is None else base_p
        print(f"{r.label:>6} {cell(meas, base_m, 15)} {cell(pred, base_p, 16)}")
    unverified = [m["folio_size"] for m in fork.values() if not m.get("folios_verified", True)]
    if unverified:
        print(f"note: the folio sizes of {', '.join(unverified)} could not be verified; those rows are doubtful")


def _fork_predictions(rows: list, arch: str) -> tuple[dict | None, str | None]:
    """The cost model's predicted kernel time (ns) of each fork of the study, fitted to the
    shipped calibration; (None, None) where that calibration is of another architecture."""
    from ptebatch import cost

    model = cost.fit()
    cal = model.calibration
    if cal.get("arch") != arch:
        return None, None
    pred = {(r.key, r.kernel): cost.predict_row(model, "fork", r.cost_counters)[0] for r in rows}
    return pred, f"{cal.get('kernel_release')} on {cal.get('cpu_model')}, {cal.get('date')} (shipped; noisy)"


def batches(args: argparse.Namespace) -> int:
    """Cuts a generated mTHP page table into fork batches for every layout and kernel."""
    layouts = _unique(args.layout or list(pb.LAYOUT_NAMES))
    kernels = _unique(args.kernel or BATCHES_KERNELS)
    if args.first_vpn + args.ptes > VPN_LIMIT:
        _bad(args, "--first-vpn", f"the table would end past virtual page {VPN_LIMIT:#x}")
    pmd_order = {name: pb.layout(name).ptrs_per_pte.bit_length() - 1 for name in layouts}
    top = max(pmd_order.values())
    for o in args.orders:
        if o > top:
            _bad(args, "--orders", f"order {o} is above the PMD order of every layout chosen "
                                   f"(the largest is {top})")
    print(f"ptebatch {pb.__version__}: the batches copy_pte_range() forms on fork "
          f"(private anonymous VMA, soft-dirty tracking off)")
    print(f"table: {args.ptes} PTEs, folio orders {' '.join(map(str, args.orders))}, seed {args.seed}, "
          f"starting at virtual page {args.first_vpn}\n")
    sys.stdout.flush()
    with _progress(args, len(layouts), "batches") as bar:
        for i, name in enumerate(layouts):
            bar.update(i, name)
            text = _batches_of_layout(args, name, pmd_order[name], kernels)
            with bar.paused():
                print(text)
    print(_legend(("*", f"the cut differs from the last kernel's ({kernels[-1]})"),
                  ("form", "the folio_pte_batch() form of the kernel; none: fork copies PTE by PTE"),
                  ("batches", "runs of PTEs fork copies at once"),
                  ("mean, max", "their length in PTEs"),
                  ("batch lengths", "the runs in table order; NxM is M runs of N PTEs")))
    return 0


def _batches_of_layout(args: argparse.Namespace, name: str, pmd_order: int, kernels: list[str]) -> str:
    """The text of one layout's section."""
    # A folio is never larger than one page table maps.
    orders = [o for o in args.orders if o <= pmd_order]
    dropped = [o for o in args.orders if o > pmd_order]
    if not orders:
        return f"== {name}: skipped, every order asked for is above its PMD order {pmd_order}\n"
    layout = pb.layout("x86-64" if name == "x86-64-xenpv" else name)
    t = mixed_table(layout, args.ptes, seed=args.seed, folio_orders=tuple(orders),
                    first_vpn=args.first_vpn, hole_rate=args.holes)
    if name == "x86-64-xenpv":
        # The frames between folios are ballooned out: advancing onto one gives pte_none.
        layout = pb.layout(name, ballooned_pfns=unbacked_pfns(t).tolist())
    present = int(np.count_nonzero(layout.pte_present(t.ptes)))
    cont = int(np.count_nonzero(layout.pte_cont(t.ptes)))
    extra = f", {cont} contpte entries" if layout.has_contpte else ""
    out = [f"== {name}: page {layout.page_size // 1024} KiB, {layout.ptrs_per_pte} PTEs per "
           f"table, {len(t.folio_start)} folios, {present} present PTEs{extra}"]
    if dropped:
        out.append(f"   orders {' '.join(map(str, dropped))} left out: above the PMD order {pmd_order}")
    out.append(f"   {'kernel':<6} {'form':<6} {'batches':>7} {'mean':>6} {'max':>4}  batch lengths"
               f" (* = cut differs from {kernels[-1]})")
    cuts = {}
    times = {}
    for k in kernels:
        t0 = time.perf_counter()
        cuts[k] = pb.batch_lengths(t.ptes, layout=layout, kernel=k, folio_start=t.folio_start,
                                   folio_nr_pages=t.folio_nr_pages, first_vpn=t.first_vpn)
        times[k] = time.perf_counter() - t0
    for k in kernels:
        lengths, dt = cuts[k], times[k]
        mark = "*" if not np.array_equal(lengths, cuts[kernels[-1]]) else " "
        text = _runs(lengths)
        if len(text) > args.width:
            text = text[: args.width - 3] + "..."
        out.append(f" {mark} {k:<6} {pb.fpb_form(k) or 'none':<6} {len(lengths):>7} "
                   f"{lengths.mean():>6.2f} {lengths.max():>4}  {text}")
        if args.verbose:
            hist = Counter(lengths.tolist())
            out.append(f"          histogram {dict(sorted(hist.items()))}, {dt * 1e6:.0f} us")
    return "\n".join(out) + "\n"


def _capture(pids: list[int]):
    from ptebatch.capture import capture

    try:
        return capture(pids)
    except ProcessLookupError as e:
        # capture.py does not yet turn this into CaptureError: /proc/<pid>/pagemap of a
        # kernel thread or a zombie cannot be opened (it has no mm).
        raise pb.CaptureError(f"cannot capture {e.filename}: {e.strerror} (a kernel thread or a "
                              f"zombie has no address space)") from e


def capture_cmd(args: argparse.Namespace) -> int:
    """Captures live processes into a snapshot file."""
    pids = _unique(args.pid)
    # Fail before the capture, not after it, when the file cannot be written.
    if os.path.isdir(args.output):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), args.output)
    try:
        with tempfile.NamedTemporaryFile(dir=os.path.dirname(os.path.abspath(args.output)),
                                         prefix=".snapshot-probe-"):
            pass
    except OSError as e:
        raise OSError(e.errno, e.strerror, args.output) from e
    t0 = time.perf_counter()
    with _progress(args, 2, "capture") as bar:
        bar.update(0, "reading /proc")
        snap = _capture(pids)
        bar.update(1, f"writing {args.output}")
        snap.save(args.output)
    pm = snap.arrays["pagemap"]
    present = int(np.count_nonzero(pm >> np.uint64(63)))
    print(f"captured {len(snap.arrays['vma_start'])} VMAs, {len(pm)} pages ({present} present) of "
          f"pid {', '.join(map(str, pids))} in {time.perf_counter() - t0:.2f} s -> {args.output}")
    print(f"inferred (not visible from user space): {', '.join(snap.inferred)}")
    return 0


def thpmaps_cmd(args: argparse.Namespace) -> int:
    """thpmaps-style report of a live process or a snapshot."""
    from ptebatch.snapshot import Snapshot
    from ptebatch.thpmaps import check_cont_sizes, report

    with _progress(args, 1, "thpmaps"):
        snap = Snapshot.load(args.snapshot) if args.snapshot else _capture(_unique(args.pid))
    try:
        cont = check_cont_sizes(_unique(args.cont or []), snap.page_size, snap.pmd_pages)
    except ValueError as e:
        _bad(args, "--cont", str(e))
    print(report(snap, cont=cont, rollup=args.rollup, inc_empty=args.inc_empty))
    return 0


def replay_cmd(args: argparse.Namespace) -> int:
    """Replays a snapshot and forks every process under each kernel, printing the counters."""
    from ptebatch.snapshot import Snapshot

    kernels = _unique(args.kernel or COMPARED_KERNELS)
    rows = []
    with _progress(args, len(kernels) + 1, "replay") as bar:
        bar.update(0, f"loading {args.snapshot}")
        snap = Snapshot.load(args.snapshot)
        for i, k in enumerate(kernels, 1):
            bar.update(i, f"{k}: rebuilding the processes")
            try:
                sim, procs = pb.Simulation.from_snapshot(snap, k)
            except ValueError as e:
                # replay.py does not yet raise SnapshotError for every defect (an unknown
                # layout, overlapping VMAs): the simulation's own checks reject them.
                raise pb.SnapshotError(f"cannot replay {args.snapshot}: {e}") from e
            bar.update(i + 0.5, f"{k}: forking")
            for pid, p in procs.items():
                p.fork()
                st = sim.last_stats
                copied = sum(st["batch_histogram"][n] * n for n in range(len(st["batch_histogram"])))
                rows.append((k, pid, copied, st["batches"], st["refcount_atomics"], st["rmap_calls"]))
            sim.check()
    print(f"snapshot of pid {snap.pids} ({snap.header['kernel_release']}, {snap.header['arch']}, "
          f"captured {snap.header['capture_time']}); inferred: {', '.join(snap.inferred) or 'nothing'}")
    thp_kb = int(snap.arrays["vma_anon_huge_kb"].clip(min=0).sum())
    if thp_kb:
        print(f"note: {thp_kb} kB of the capture were PMD-mapped THPs, replayed as huge PMDs: fork copies "
              "each as one PMD (counted in pmd_copies, not in the PTE columns below)")
    print(f"{'kernel':>7} {'pid':>8} {'PTEs copied':>11} {'batches':>8} {'refcount ops':>12} {'rmap calls':>10}")
    for k, pid, copied, nb, refs, rmaps in rows:
        print(f"{k:>7} {pid:>8} {copied:>11} {nb:>8} {refs:>12} {rmaps:>10}")
    print()
    print(_legend(("kernel, pid", "each captured process forks once under each kernel"),
                  ("PTEs copied", "present PTEs the fork copied"),
                  ("batches", "runs of PTEs the fork copied at once"),
                  ("refcount ops", "atomic updates of folio reference counts (folio_ref_add)"),
                  ("rmap calls", "calls into the reverse map (folio_try_dup_anon_rmap_pte[s] and the like)")))
    return 0


def oracle_cmd(args: argparse.Namespace) -> int:
    """Runs the scripted sequence against the live kernel and the model, per folio size."""
    from ptebatch import oracle

    if args.scenario:
        known = oracle.scenarios()
        if "list" in args.scenario:
            for n, (topic, _) in known.items():
                print(f"{topic:<8} {n}")
            return 0
        names = list(known) if "all" in args.scenario else _unique(args.scenario)
        for n in names:
            if n not in known:
                _bad(args, "--scenario", f"unknown scenario {n!r}; known: all, list, " + " ".join(known))
    why = oracle.missing_requirements()
    if why:
        raise pb.PtebatchError(f"cannot run the kernel oracle here: {why}")
    if args.scenario:
        return _oracle_scenarios(args, [(n, *known[n]) for n in names])
    page = os.sysconf("SC_PAGE_SIZE")
    offered = sorted({page, *oracle._size_dirs()})
    sizes = _unique(args.size or [s for s in (4 << 10, 16 << 10, 64 << 10, 128 << 10, 2 << 20) if s in offered])
    for size in sizes:
        if size not in offered:
            _bad(args, "--size", f"{pb.format_size(size)} is not a folio size this kernel offers "
                                 f"({', '.join(map(pb.format_size, offered))})")
    print(f"{'size':>6} {'kernel':>6} {'folio pages seen':>16} {'steps':>5} {'pages compared':>14} {'mismatches':>10} {'runs':>4}")
    sys.stdout.flush()
    bad = 0
    with _progress(args, len(sizes), "oracle") as bar:
        for i, size in enumerate(sizes):
            bar.update(i, f"{pb.format_size(size)} folios")
            r = oracle.run_retrying(size)
            bad += r.mismatches
            with bar.paused():
                print(f"{pb.format_size(size):>6} {r.kernel:>6} {str(r.folio_pages):>16} {len(r.steps):>5} "
                      f"{r.pages:>14} {r.mismatches:>10} {r.attempts:>4}")
                for s in r.steps:
                    for m in s.mismatches[:5]:
                        print(f"       {s.step}: {m}")
    print()
    print(_legend(("size", "the one mTHP size enabled for the run"),
                  ("kernel", "the running kernel, as the version modelled"),
                  ("folio pages seen", "sizes, in pages, of the folios the kernel mapped the region with"),
                  ("steps", "scripted steps; kernel and model are compared after each"),
                  ("pages compared", "page states compared, over all steps"),
                  ("mismatches", "pages where kernel and model differ (exit status 1 if any)"),
                  ("runs", "runs needed: a transient page reference (DAMON) can spoil one")))
    return 1 if bad else 0


def _oracle_scenarios(args: argparse.Namespace, todo: list) -> int:
    """Runs named oracle scenarios (THP policy, PMD-mapped THP, fault-around, shmem)."""
    width = max(len(n) for n, _, _ in todo)
    print(f"{'topic':<8} {'scenario':<{width}} {'steps':>5} {'pages compared':>14} {'mismatches':>10}")
    sys.stdout.flush()
    bad = 0
    with _progress(args, len(todo), "oracle") as bar:
        for i, (name, topic, run) in enumerate(todo):
            bar.update(i, name)
            steps = run()
            miss = sum(len(s.mismatches) for s in steps)
            bad += miss
            with bar.paused():
                print(f"{topic:<8} {name:<{width}} {len(steps):>5} {sum(s.pages for s in steps):>14} {miss:>10}")
                for s in steps:
                    for m in s.mismatches[:5]:
                        print(f"       {s.step}: {m}")
    print()
    print(_legend(("topic", "what the scenario checks: policy (THP sysfs controls, MADV_HUGEPAGE, prctl), "
                            "filemap (fault-around, shmem and file folios), pmd (PMD-mapped THP)"),
                  ("scenario", "the scripted sequence run on the live kernel and on the model"),
                  ("steps", "scripted steps; kernel and model are compared after each"),
                  ("pages compared", "page states compared, over all steps"),
                  ("mismatches", "page facts where kernel and model differ (exit status 1 if any)")))
    return 1 if bad else 0


# -- the parser and the one place errors are reported ----------------------------------------

def _para(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), width=78)


def _legend(*rows: tuple[str, str]) -> str:
    """What the columns of a table mean, one column a line."""
    width = max(len(name) for name, _ in rows) + 2
    out = ["columns:"]
    for name, text in rows:
        lines = textwrap.wrap(text, width=76 - width) or [""]
        out.append(f"  {name:<{width}}{lines[0]}")
        out.extend(f"  {'':<{width}}{line}" for line in lines[1:])
    return "\n".join(out)


def _progress(args: argparse.Namespace, total: float, label: str) -> Progress:
    return Progress(total, label, enabled=not args.quiet)


KERNELS_HELP = "comma-separated versions or 'all' (repeatable)"

DEMO_EPILOG = f"""\
examples:
  ptebatch demo                                   every folio size of x86-64, 6.8 vs {pb.NEWEST_KERNEL}
  ptebatch demo --region 4GiB --size 64K --size 2M
  ptebatch demo --kernel 6.8,6.12,{pb.NEWEST_KERNEL} --arch arm64-4k   ratio of the first to the last
"""

BATCHES_EPILOG = """\
examples:
  ptebatch batches --layout arm64-4k --kernel 6.9,6.15
  ptebatch batches --kernel all --ptes 4096 --orders 2 4 -v
"""


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ptebatch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_para("Exact models of Linux page tables and PTE batching (folio_pte_batch): how fork() "
                    "copies memory mapped by large folios, kernel version by kernel version, on a "
                    "simulated machine or on real processes' page tables. Start with 'ptebatch demo'; "
                    "'ptebatch COMMAND --help' explains each command."),
        epilog="exit status: 0 done, 1 runtime error (or oracle mismatches), 2 usage error, 130 interrupted;\n"
               "an error prints one line on stderr (the traceback with --debug).")
    parser.add_argument("--version", action="version", version=f"ptebatch {pb.__version__}",
                        help="print the version and exit")
    debug_help = "on an error, show the Python traceback instead of one line"
    quiet_help = "no progress on stderr (it shows for steps over a second)"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    parser.add_argument("-q", "--quiet", action="store_true", help=quiet_help)
    # Also accepted after the command; SUPPRESS keeps the subcommand from resetting them.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=quiet_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def command(name: str, run: Callable[[argparse.Namespace], int], summary: str, description: str,
                epilog: str | None = None) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=summary, description=_para(description), epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(run=run)
        return p

    f = command("demo", demo, f"the main job: fork study of 1 GiB per folio size, 6.8 vs {pb.NEWEST_KERNEL}",
                "A process writes a region of private anonymous memory, so that it is mapped by folios of "
                "one size (PTE-mapped), and forks, once per folio size and kernel. Prints the kernel's "
                "work in each fork per PTE, the ratio of the first kernel to the last, and what each "
                "column means.", DEMO_EPILOG)
    f.add_argument("--region", type=_size, default="1GiB", metavar="SIZE",
                   help=f"bytes of written anonymous memory: a multiple of every folio size studied, "
                        f"at most {pb.format_size(MAX_REGION)} (default 1GiB)")
    f.add_argument("--size", type=_pow2_size, action="append",
                   help="folio size: the page size or an anonymous mTHP size of the arch, 4 pages to the "
                        "PMD size (repeatable; default: every one that divides the region)")
    f.add_argument("--kernel", type=_kernels, action="extend", metavar="KERNELS",
                   help=f"kernels to fork under, {KERNELS_HELP}; the first is the baseline of the ratio "
                        f"(default 6.8,{pb.NEWEST_KERNEL})")
    f.add_argument("--arch", default="x86-64", choices=pb.LAYOUT_NAMES, metavar="LAYOUT",
                   help=f"page table layout of the simulated machine: {', '.join(pb.LAYOUT_NAMES)} "
                        f"(default x86-64)")
    f.add_argument("--pmd", action=argparse.BooleanOptionalAction, default=None,
                   help="also fork the region mapped by PMD THPs, the THP default (default: yes "
                        "when --size is not given and the PMD size divides the region)")
    f.add_argument("--measure", type=_int_in(1, 100), nargs="?", const=3, metavar="REPEAT",
                   help="also time the running kernel's fork per folio size (root; sets the mTHP "
                        "controls and restores them, as 'ptebatch calibrate'), REPEAT times (default 3), "
                        "and print measured beside predicted")

    d = command("batches", batches, "fork batches of a generated page table per layout and kernel",
                "Generates a page table of mTHP folios (random sizes, holes between them) and prints how"
                "copy_pte_range() cuts it into batches on fork, for each layout and kernel: where the "
                "folio_pte_batch() forms differ, the cuts do.", BATCHES_EPILOG)
    d.add_argument("--layout", action="append", choices=pb.LAYOUT_NAMES, metavar="LAYOUT",
                   help=f"page table layout (repeatable; default all: {', '.join(pb.LAYOUT_NAMES)})")
    d.add_argument("--kernel", type=_kernels, action="extend", metavar="KERNELS",
                   help=f"kernel versions, {KERNELS_HELP}; cuts are compared with the last "
                        f"(default {','.join(BATCHES_KERNELS)})")
    d.add_argument("--ptes", type=_int_in(1, 1 << 24), default=1024, metavar="N",
                   help="PTEs in the table, 1 to 16M (default 1024)")
    d.add_argument("--orders", type=_order, nargs="+", default=[0, 2, 4, 9], metavar="ORDER",
                   help="folio orders to draw from: 0 or 2 up to the PMD order; a layout leaves out "
                        "those above its own (default 0 2 4 9)")
    d.add_argument("--first-vpn", type=_int_in(0), default=480, metavar="VPN",
                   help="virtual page number of the first PTE (default 480, so folios straddle "
                        "a PMD boundary)")
    d.add_argument("--seed", type=_int_in(0), default=1, metavar="N",
                   help="seed of the random table: the same seed gives the same table (default 1)")
    d.add_argument("--holes", type=_probability, default=0.15, metavar="P",
                   help="chance, in [0, 1], of a run of empty PTEs between folios (default 0.15)")
    d.add_argument("--width", type=_int_in(4), default=100, metavar="N",
                   help="cut batch lists to this many characters (at least 4; default 100)")
    d.add_argument("-v", "--verbose", action="store_true",
                   help="also print each cut's histogram of batch lengths and the time it took")

    c = command("capture", capture_cmd, "capture live processes' page tables into a snapshot (root)",
                "Reads the page tables of running processes (/proc/PID/maps and pagemap, "
                "/proc/kpageflags and kpagecount) into a snapshot file, for thpmaps and replay. "
                "Needs root.",
                "example:\n  ptebatch capture --pid 1234 --pid 1240 -o snap.npz\n")
    c.add_argument("--pid", type=_pid, action="append", required=True, help="process id (repeatable)")
    c.add_argument("-o", "--output", required=True, metavar="FILE", help="snapshot file to write (.npz)")

    t = command("thpmaps", thpmaps_cmd, "thpmaps-style report of a live process or a snapshot",
                "Counts how a process's memory is mapped by THPs and mTHPs, as the kernel's "
                "tools/mm/thpmaps does: per VMA (or summed, --rollup), anonymous and file folios of "
                "each size, PMD- or PTE-mapped, aligned or not.",
                "examples:\n  ptebatch thpmaps --pid 1234 --rollup\n"
                "  ptebatch thpmaps --snapshot snap.npz --cont 64K\n")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--pid", type=_pid, action="append", help="process id (repeatable; needs root)")
    src.add_argument("--snapshot", metavar="FILE", type=_path, help="a snapshot file instead of a live process")
    t.add_argument("--cont", type=_pow2_size, action="append", metavar="SIZE",
                   help="also count contiguous aligned blocks of SIZE, a power of two from 2 pages to "
                        "the PMD size (repeatable)")
    t.add_argument("--rollup", action="store_true", help="sum over all VMAs")
    t.add_argument("--inc-empty", action="store_true", help="print zero counters too")

    r = command("replay", replay_cmd, "replay a snapshot and fork it under each kernel",
                "Rebuilds the captured processes in the simulation (folios at their real frames) and "
                "forks each once under each kernel, printing the kernel's work in the fork.",
                f"example:\n  ptebatch replay snap.npz --kernel 6.8,6.12,{pb.NEWEST_KERNEL}\n")
    r.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot file written by 'ptebatch capture'")
    r.add_argument("--kernel", type=_kernels, action="extend", metavar="KERNELS",
                   help=f"kernels to fork under, {KERNELS_HELP} (default 6.8,{pb.NEWEST_KERNEL})")

    o = command("oracle", oracle_cmd,
                "compare the model with the running kernel (root; sets mTHP controls, restores them)",
                "Runs a scripted sequence (write, fork, COW writes, exit, partial munmap, "
                "MADV_DONTNEED) on the running kernel with one mTHP size enabled, captures it after "
                "every step, and compares it page by page with the model of the same kernel. Needs "
                "root; sets the sysfs mTHP controls and restores them.")
    o.add_argument("--size", type=_pow2_size, action="append",
                   help="folio size the kernel offers (repeatable; default those of 4K 16K 64K 128K 2M it offers)")
    o.add_argument("--scenario", action="append", metavar="NAME",
                   help="run a named scenario instead (repeatable; 'all' for every one): THP policy modes, "
                        "PMD-mapped THP, fault-around and shmem folio sizes; 'ptebatch oracle --scenario list' "
                        "names them")

    from ptebatch import scenario  # ptebatch run: the scenario files (docs/scenarios.md)
    scenario.add_parser(sub, [common])
    report.add_plot_options(sub)  # --plot DIR on demo and run
    report.add_parser(sub, [common])
    from ptebatch import calibrate  # ptebatch calibrate: timing the live kernel (docs/calibration.md)
    calibrate.add_parser(sub, [common], _size, _int_in)
    from ptebatch import sweep  # ptebatch sweep: grids of runs on Dask (docs/sweeps.md)
    sweep.add_parser(sub, [common])
    from ptebatch import cost  # ptebatch predict: counters to kernel time (docs/cost-model.md)
    cost.add_parser(sub, [common])
    from ptebatch import bench  # ptebatch bench: ns per PTE of each implementation (docs/benchmarks.md)
    bench.add_parser(sub, [common], _size, _int_in)
    return parser


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename is not None else e.strerror
    if isinstance(e, MemoryError) and not str(e):
        return "out of memory"
    return " ".join(str(e).split()) or type(e).__name__


def _stdout_gone() -> None:
    """The reader of stdout went away (``ptebatch ... | head``). Point stdout at /dev/null so the
    interpreter's flush at exit does not fail again (Python's signal docs, "Note on SIGPIPE")."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``ptebatch`` command: runs ``argv`` (default ``sys.argv[1:]``); returns the exit code
    (0, 1 for a runtime error, 2 for a usage error, 130 for Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # A closed stdout or stderr (`>&-`): output goes nowhere rather than into a traceback.
    if sys.stdout is None:
        sys.stdout = open(os.devnull, "w")
    if sys.stderr is None:
        sys.stderr = open(os.devnull, "w")
    parser = _parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            # Bare "ptebatch" teaches rather than starts a minute of work.
            parser.print_help()
            return 0
        code = args.run(args)
        sys.stdout.flush()
        return code
    except UsageError as e:
        print(e, file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:
        _stdout_gone()
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        if getattr(args, "debug", False):
            raise
        print("ptebatch: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (pb.PtebatchError, ValueError, TypeError, OSError, MemoryError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"ptebatch: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())

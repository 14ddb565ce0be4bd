"""The ``ptebatch`` command.

Every error is one line on stderr: a bad argument is a usage error (exit 2), a failure while
running (a missing or unwritable file, a process that cannot be captured, a bad snapshot, the
simulated machine out of memory) exits 1 and Ctrl-C exits 130. ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
import tempfile
import time
from collections import Counter
from typing import Callable, NoReturn, Sequence

import numpy as np

import ptebatch as pb
from ptebatch import report
from ptebatch.study import (MAX_REGION, Progress, check_folio_size, check_region, folio_sizes,
                            fork_study, format_fork_study)
from ptebatch.tables import mixed_table, unbacked_pfns

#: One kernel per folio_pte_batch() form, plus 6.8 (per-PTE fork).
DEMO_KERNELS = ("6.8", "seed", "6.9", "6.12", "6.15", "6.18")

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
    kernels = _unique(args.kernel or ["6.8", pb.NEWEST_KERNEL])
    notes = []
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
    if args.plot:
        report.check_plot_dir(args.plot)
    print(f"ptebatch {pb.__version__}: fork() of {pb.format_size(region)} of written private anonymous "
          f"memory on {args.arch}, one folio size at a time (PTE-mapped), under {' and '.join(kernels)}")
    for note in notes:
        print(f"note: {note}")
    print("counters are the kernel work of the fork alone; sim.check() passed after every fork\n")
    bar = Progress(len(sizes) * len(kernels), "fork study")
    t0 = time.perf_counter()
    rows = fork_study(region, sizes, kernels, args.arch, progress=bar.step)
    print(format_fork_study(rows, kernels))
    print(f"\nratio = {kernels[0]} / {kernels[-1]}; total {time.perf_counter() - t0:.1f} s")
    if args.plot:
        report.print_plots(report.fork_study_plots(rows, args.plot, region, args.arch))
    return 0


def batches(args: argparse.Namespace) -> int:
    """Cuts a generated mTHP page table into fork batches for every layout and kernel."""
    layouts = _unique(args.layout or list(pb.LAYOUT_NAMES))
    kernels = _unique(args.kernel or list(DEMO_KERNELS))
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
    for name in layouts:
        # A folio is never larger than one page table maps.
        orders = [o for o in args.orders if o <= pmd_order[name]]
        dropped = [o for o in args.orders if o > pmd_order[name]]
        layout = pb.layout("x86-64" if name == "x86-64-xenpv" else name)
        if not orders:
            print(f"== {name}: skipped, every order asked for is above its PMD order {pmd_order[name]}\n")
            continue
        t = mixed_table(layout, args.ptes, seed=args.seed, folio_orders=tuple(orders),
                        first_vpn=args.first_vpn, hole_rate=args.holes)
        if name == "x86-64-xenpv":
            # The frames between folios are ballooned out: advancing onto one gives pte_none.
            layout = pb.layout(name, ballooned_pfns=unbacked_pfns(t).tolist())
        present = int(np.count_nonzero(layout.pte_present(t.ptes)))
        cont = int(np.count_nonzero(layout.pte_cont(t.ptes)))
        extra = f", {cont} contpte entries" if layout.has_contpte else ""
        print(f"== {name}: page {layout.page_size // 1024} KiB, {layout.ptrs_per_pte} PTEs per "
              f"table, {len(t.folio_start)} folios, {present} present PTEs{extra}")
        if dropped:
            print(f"   orders {' '.join(map(str, dropped))} left out: above the PMD order {pmd_order[name]}")
        print(f"   {'kernel':<6} {'form':<6} {'batches':>7} {'mean':>6} {'max':>4}  batch lengths"
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
            print(f" {mark} {k:<6} {pb.fpb_form(k) or 'none':<6} {len(lengths):>7} "
                  f"{lengths.mean():>6.2f} {lengths.max():>4}  {text}")
            if args.verbose:
                hist = Counter(lengths.tolist())
                print(f"          histogram {dict(sorted(hist.items()))}, {dt * 1e6:.0f} us")
        print()
    return 0


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
    snap = _capture(pids)
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

    snap = Snapshot.load(args.snapshot)
    kernels = _unique(args.kernel or ["6.8", pb.NEWEST_KERNEL])
    rows = []
    for k in kernels:
        try:
            sim, procs = pb.Simulation.from_snapshot(snap, k)
        except ValueError as e:
            # replay.py does not yet raise SnapshotError for every defect (an unknown
            # layout, overlapping VMAs): the simulation's own checks reject them.
            raise pb.SnapshotError(f"cannot replay {args.snapshot}: {e}") from e
        for pid, p in procs.items():
            p.fork()
            st = sim.last_stats
            copied = sum(st["batch_histogram"][n] * n for n in range(len(st["batch_histogram"])))
            rows.append((k, pid, copied, st["batches"], st["refcount_atomics"], st["rmap_calls"]))
        sim.check()
    print(f"snapshot of pid {snap.pids} ({snap.header['kernel_release']}, {snap.header['arch']}, "
          f"captured {snap.header['capture_time']}); inferred: {', '.join(snap.inferred) or 'nothing'}")
    print(f"{'kernel':>7} {'pid':>8} {'PTEs copied':>11} {'batches':>8} {'refcount ops':>12} {'rmap calls':>10}")
    for k, pid, copied, nb, refs, rmaps in rows:
        print(f"{k:>7} {pid:>8} {copied:>11} {nb:>8} {refs:>12} {rmaps:>10}")
    return 0


def oracle_cmd(args: argparse.Namespace) -> int:
    """Runs the scripted sequence against the live kernel and the model, per folio size."""
    from ptebatch import oracle

    why = oracle.missing_requirements()
    if why:
        raise pb.PtebatchError(f"cannot run the kernel oracle here: {why}")
    page = os.sysconf("SC_PAGE_SIZE")
    offered = sorted({page, *oracle._size_dirs()})
    sizes = _unique(args.size or [s for s in (4 << 10, 16 << 10, 64 << 10, 128 << 10, 2 << 20) if s in offered])
    for size in sizes:
        if size not in offered:
            _bad(args, "--size", f"{pb.format_size(size)} is not a folio size this kernel offers "
                                 f"({', '.join(map(pb.format_size, offered))})")
    print(f"{'size':>6} {'kernel':>6} {'folio pages seen':>16} {'steps':>5} {'pages compared':>14} {'mismatches':>10} {'runs':>4}")
    bad = 0
    for size in sizes:
        r = oracle.run_retrying(size)
        bad += r.mismatches
        print(f"{pb.format_size(size):>6} {r.kernel:>6} {str(r.folio_pages):>16} {len(r.steps):>5} {r.pages:>14} "
              f"{r.mismatches:>10} {r.attempts:>4}")
        for s in r.steps:
            for m in s.mismatches[:5]:
                print(f"       {s.step}: {m}")
    return 1 if bad else 0


# -- the parser and the one place errors are reported ----------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ptebatch", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Exact models of Linux page tables and PTE batching. Without a command, runs demo.",
        epilog="exit status: 0 done, 1 runtime error (or oracle mismatches), 2 usage error, 130 interrupted;\n"
               "an error prints one line on stderr (the traceback with --debug).")
    debug_help = "on an error, show the Python traceback instead of one line"
    parser.add_argument("--debug", action="store_true", help=debug_help)
    # Also accepted after the command; SUPPRESS keeps the subcommand from resetting it.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser("demo", parents=[common],
                       help="the main job: fork study of 1 GiB per folio size, 6.8 vs newest")
    f.add_argument("--region", type=_size, default="1GiB",
                   help=f"bytes of written anonymous memory: a multiple of every folio size studied, "
                        f"at most {pb.format_size(MAX_REGION)} (default 1GiB)")
    f.add_argument("--size", type=_pow2_size, action="append",
                   help="folio size: the page size or an anonymous mTHP size of the arch, 4 pages to the "
                        "PMD size (repeatable; default: every one that divides the region)")
    f.add_argument("--kernel", action="append", choices=pb.KERNEL_VERSIONS,
                   help=f"kernel (repeatable; default 6.8 and {pb.NEWEST_KERNEL}; the first is the baseline)")
    f.add_argument("--arch", default="x86-64", choices=pb.LAYOUT_NAMES)
    f.set_defaults(run=demo)

    d = sub.add_parser("batches", parents=[common],
                       help="fork batches of a generated page table per layout and kernel")
    d.add_argument("--layout", action="append", choices=pb.LAYOUT_NAMES,
                   help="layout (repeatable; default: all)")
    d.add_argument("--kernel", action="append", choices=pb.KERNEL_VERSIONS,
                   help=f"kernel version (repeatable; default: {' '.join(DEMO_KERNELS)})")
    d.add_argument("--ptes", type=_int_in(1, 1 << 24), default=1024,
                   help="PTEs in the table, 1 to 16M (default 1024)")
    d.add_argument("--orders", type=_order, nargs="+", default=[0, 2, 4, 9],
                   help="folio orders to draw from: 0 or 2 up to the PMD order; a layout leaves out "
                        "those above its own (default 0 2 4 9)")
    d.add_argument("--first-vpn", type=_int_in(0), default=480,
                   help="virtual page number of the first PTE (default 480, so folios straddle "
                        "a PMD boundary)")
    d.add_argument("--seed", type=_int_in(0), default=1)
    d.add_argument("--holes", type=_probability, default=0.15,
                   help="chance, in [0, 1], of a run of empty PTEs between folios (default 0.15)")
    d.add_argument("--width", type=_int_in(4), default=100, help="cut batch lists to this width (at least 4)")
    d.add_argument("-v", "--verbose", action="store_true", help="also print histograms and times")
    d.set_defaults(run=batches)

    c = sub.add_parser("capture", parents=[common],
                       help="capture live processes' page tables into a snapshot (root)")
    c.add_argument("--pid", type=_pid, action="append", required=True, help="process id (repeatable)")
    c.add_argument("-o", "--output", required=True, help="snapshot file (.npz)")
    c.set_defaults(run=capture_cmd)

    t = sub.add_parser("thpmaps", parents=[common],
                       help="thpmaps-style report of a live process or a snapshot")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--pid", type=_pid, action="append", help="process id (repeatable)")
    src.add_argument("--snapshot", help="a snapshot file instead of a live process")
    t.add_argument("--cont", type=_pow2_size, action="append",
                   help="also count contiguous aligned blocks of SIZE, a power of two from 2 pages to "
                        "the PMD size (repeatable)")
    t.add_argument("--rollup", action="store_true", help="sum over all VMAs")
    t.add_argument("--inc-empty", action="store_true", help="print zero counters too")
    t.set_defaults(run=thpmaps_cmd)

    r = sub.add_parser("replay", parents=[common], help="replay a snapshot and fork it under each kernel")
    r.add_argument("snapshot")
    r.add_argument("--kernel", action="append", choices=pb.KERNEL_VERSIONS,
                   help=f"kernel (repeatable; default 6.8 and {pb.NEWEST_KERNEL})")
    r.set_defaults(run=replay_cmd)

    o = sub.add_parser("oracle", parents=[common],
                       help="compare the model with the running kernel (root; sets mTHP controls, restores them)")
    o.add_argument("--size", type=_pow2_size, action="append",
                   help="folio size the kernel offers (repeatable; default those of 4K 16K 64K 128K 2M it offers)")
    o.set_defaults(run=oracle_cmd)

    from ptebatch import scenario  # ptebatch run: the scenario files (docs/scenarios.md)
    scenario.add_parser(sub, [common])
    report.add_plot_options(sub)  # --plot DIR on demo and run
    report.add_parser(sub, [common])
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = None
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            args = parser.parse_args([*argv, "demo"])
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

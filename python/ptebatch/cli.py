"""The ``ptebatch`` command."""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from typing import Sequence

import numpy as np

import ptebatch as pb
from ptebatch.study import Progress, folio_sizes, fork_study, format_fork_study
from ptebatch.tables import mixed_table, unbacked_pfns

#: One kernel per folio_pte_batch() form, plus 6.8 (per-PTE fork).
DEMO_KERNELS = ("6.8", "seed", "6.9", "6.12", "6.15", "6.18")


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
    kernels = args.kernel or ["6.8", pb.NEWEST_KERNEL]
    sizes = args.size or None
    n_sizes = len(sizes) if sizes else len(folio_sizes(args.arch))
    print(f"ptebatch {pb.__version__}: fork() of {args.region} of written private anonymous memory "
          f"on {args.arch}, one folio size at a time (PTE-mapped), under {' and '.join(kernels)}")
    print("counters are the kernel work of the fork alone; sim.check() passed after every fork\n")
    bar = Progress(n_sizes * len(kernels), "fork study")
    t0 = time.perf_counter()
    rows = fork_study(args.region, sizes, kernels, args.arch, progress=bar.step)
    print(format_fork_study(rows, kernels))
    print(f"\nratio = {kernels[0]} / {kernels[-1]}; total {time.perf_counter() - t0:.1f} s")
    return 0


def batches(args: argparse.Namespace) -> int:
    """Cuts a generated mTHP page table into fork batches for every layout and kernel."""
    layouts = args.layout or list(pb.LAYOUT_NAMES)
    kernels = args.kernel or list(DEMO_KERNELS)
    print(f"ptebatch {pb.__version__}: the batches copy_pte_range() forms on fork "
          f"(private anonymous VMA, soft-dirty tracking off)")
    print(f"table: {args.ptes} PTEs, folio orders {args.orders}, seed {args.seed}, "
          f"starting at virtual page {args.first_vpn}\n")
    for name in layouts:
        layout = pb.layout("x86-64" if name == "x86-64-xenpv" else name)
        t = mixed_table(layout, args.ptes, seed=args.seed, folio_orders=tuple(args.orders),
                        first_vpn=args.first_vpn, hole_rate=args.holes)
        if name == "x86-64-xenpv":
            # The frames between folios are ballooned out: advancing onto one gives pte_none.
            layout = pb.layout(name, ballooned_pfns=unbacked_pfns(t).tolist())
        present = int(np.count_nonzero(layout.pte_present(t.ptes)))
        cont = int(np.count_nonzero(layout.pte_cont(t.ptes)))
        extra = f", {cont} contpte entries" if layout.has_contpte else ""
        print(f"== {name}: page {layout.page_size // 1024} KiB, {layout.ptrs_per_pte} PTEs per "
              f"table, {len(t.folio_start)} folios, {present} present PTEs{extra}")
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


def capture_cmd(args: argparse.Namespace) -> int:
    """Captures live processes into a snapshot file."""
    from ptebatch.capture import capture

    t0 = time.perf_counter()
    snap = capture(args.pid)
    snap.save(args.output)
    pm = snap.arrays["pagemap"]
    present = int(np.count_nonzero(pm >> np.uint64(63)))
    print(f"captured {len(snap.arrays['vma_start'])} VMAs, {len(pm)} pages ({present} present) of "
          f"pid {', '.join(map(str, args.pid))} in {time.perf_counter() - t0:.2f} s -> {args.output}")
    print(f"inferred (not visible from user space): {', '.join(snap.inferred)}")
    return 0


def thpmaps_cmd(args: argparse.Namespace) -> int:
    """thpmaps-style report of a live process or a snapshot."""
    from ptebatch.capture import capture
    from ptebatch.snapshot import Snapshot
    from ptebatch.thpmaps import report

    snap = Snapshot.load(args.snapshot) if args.snapshot else capture(args.pid)
    cont = [pb.parse_size(c) for c in args.cont or []]
    print(report(snap, cont=cont, rollup=args.rollup, inc_empty=args.inc_empty))
    return 0


def replay_cmd(args: argparse.Namespace) -> int:
    """Replays a snapshot and forks every process under each kernel, printing the counters."""
    from ptebatch.snapshot import Snapshot

    snap = Snapshot.load(args.snapshot)
    kernels = args.kernel or ["6.8", pb.NEWEST_KERNEL]
    print(f"snapshot of pid {snap.pids} ({snap.header['kernel_release']}, {snap.header['arch']}, "
          f"captured {snap.header['capture_time']}); inferred: {', '.join(snap.inferred)}")
    print(f"{'kernel':>7} {'pid':>8} {'PTEs copied':>11} {'batches':>8} {'refcount ops':>12} {'rmap calls':>10}")
    for k in kernels:
        sim, procs = pb.Simulation.from_snapshot(snap, k)
        for pid, p in procs.items():
            p.fork()
            st = sim.last_stats
            copied = sum(st["batch_histogram"][n] * n for n in range(len(st["batch_histogram"])))
            print(f"{k:>7} {pid:>8} {copied:>11} {st['batches']:>8} {st['refcount_atomics']:>12} {st['rmap_calls']:>10}")
        sim.check()
    return 0


def oracle_cmd(args: argparse.Namespace) -> int:
    """Runs the scripted sequence against the live kernel and the model, per folio size."""
    from ptebatch import oracle

    why = oracle.missing_requirements()
    if why:
        print(f"cannot run the kernel oracle here: {why}")
        return 1
    sizes = [pb.parse_size(s) for s in (args.size or ["4K", "16K", "64K", "128K", "2M"])]
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ptebatch", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    f = sub.add_parser("demo", help="the main job: fork study of 1 GiB per folio size, 6.8 vs newest")
    f.add_argument("--region", default="1GiB", help="bytes of written anonymous memory (default 1GiB)")
    f.add_argument("--size", action="append", help="folio size (repeatable; default 4K and every mTHP size)")
    f.add_argument("--kernel", action="append", choices=pb.KERNEL_VERSIONS,
                   help=f"kernel (repeatable; default 6.8 and {pb.NEWEST_KERNEL}; the first is the baseline)")
    f.add_argument("--arch", default="x86-64", choices=pb.LAYOUT_NAMES)
    d = sub.add_parser("batches", help="fork batches of a generated page table per layout and kernel")
    d.add_argument("--layout", action="append", choices=pb.LAYOUT_NAMES,
                   help="layout (repeatable; default: all)")
    d.add_argument("--kernel", action="append", choices=pb.KERNEL_VERSIONS,
                   help=f"kernel version (repeatable; default: {' '.join(DEMO_KERNELS)})")
    d.add_argument("--ptes", type=int, default=1024, help="PTEs in the table (default 1024)")
    d.add_argument("--orders", type=int, nargs="+", default=[0, 2, 4, 9],
                   help="folio orders to draw from (default 0 2 4 9)")
    d.add_argument("--first-vpn", type=int, default=480,
                   help="virtual page number of the first PTE (default 480, so folios straddle "
                        "a PMD boundary)")
    d.add_argument("--seed", type=int, default=1)
    d.add_argument("--holes", type=float, default=0.15,
                   help="chance of a run of empty PTEs between folios (default 0.15)")
    d.add_argument("--width", type=int, default=100, help="cut batch lists to this width")
    d.add_argument("-v", "--verbose", action="store_true", help="also print histograms and times")
    c = sub.add_parser("capture", help="capture live processes' page tables into a snapshot (root)")
    c.add_argument("--pid", type=int, action="append", required=True, help="process id (repeatable)")
    c.add_argument("-o", "--output", required=True, help="snapshot file (.npz)")
    t = sub.add_parser("thpmaps", help="thpmaps-style report of a live process or a snapshot")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--pid", type=int, action="append", help="process id (repeatable)")
    src.add_argument("--snapshot", help="a snapshot file instead of a live process")
    t.add_argument("--cont", action="append", help="also count contiguous aligned blocks of SIZE (repeatable)")
    t.add_argument("--rollup", action="store_true", help="sum over all VMAs")
    t.add_argument("--inc-empty", action="store_true", help="print zero counters too")
    r = sub.add_parser("replay", help="replay a snapshot and fork it under each kernel")
    r.add_argument("snapshot")
    r.add_argument("--kernel", action="append", choices=pb.KERNEL_VERSIONS)
    o = sub.add_parser("oracle", help="compare the model with the running kernel (root; sets mTHP controls, restores them)")
    o.add_argument("--size", action="append", help="folio size (repeatable; default 4K 16K 64K 128K 2M)")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    if args.command == "demo":
        return demo(args)
    try:
        if args.command == "capture":
            return capture_cmd(args)
        if args.command == "thpmaps":
            return thpmaps_cmd(args)
        if args.command == "replay":
            return replay_cmd(args)
        if args.command == "oracle":
            return oracle_cmd(args)
    except (pb.CaptureError, pb.SnapshotError) as e:
        print(f"ptebatch {args.command}: {e}", file=sys.stderr)
        return 1
    if args.command == "batches":
        if args.ptes < 1:
            parser.error("--ptes must be at least 1")
        return batches(args)
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())

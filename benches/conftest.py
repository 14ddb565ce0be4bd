"""Collects the benchmark medians and prints ns/PTE and ratios to the baselines of the same run."""

from __future__ import annotations

import os

RESULTS: dict[tuple[str, str], tuple[float, int]] = {}

#: PTEs per table; the issue's figure is 16 Mi. Set PTEBATCH_BENCH_PTES for a quick smoke run.
N_PTES = int(os.environ.get("PTEBATCH_BENCH_PTES", 16 << 20))
#: The pure-Python reference runs on a smaller table and is scaled per PTE.
N_REF = int(os.environ.get("PTEBATCH_BENCH_REF_PTES", min(N_PTES, 1 << 15)))
#: Bytes of written anonymous memory the fork benchmark forks (the main job's 1 GiB).
FORK_BYTES = int(os.environ.get("PTEBATCH_BENCH_FORK_BYTES", 1 << 30))
#: ... and for the pure-Python reference simulation, scaled per PTE.
FORK_REF_BYTES = int(os.environ.get("PTEBATCH_BENCH_FORK_REF_BYTES", min(FORK_BYTES, 8 << 20)))


def record(benchmark, group: str, what: str, n: int) -> None:
    if benchmark.disabled or benchmark.stats is None:
        return
    RESULTS[(group, what)] = (benchmark.stats.stats.median, n)


def pytest_terminal_summary(terminalreporter):
    if not RESULTS:
        return
    w = terminalreporter
    w.section("ptebatch: ns per PTE (medians) and ratios to baselines measured in this run")
    groups = sorted({g for g, _ in RESULTS})
    w.write_line("rust = batch_lengths, or the simulated fork() for the 'fork' rows")
    w.write_line(f"{'table':<28} {'rust':>14} {'numpy copy':>11} {'ratio':>6} "
                 f"{'reference':>11} {'speedup':>9}")
    for g in groups:
        ns = {what: t / n * 1e9 for (gg, what), (t, n) in RESULTS.items() if gg == g}
        fast, copy, ref = ns.get("rust"), ns.get("numpy_copy"), ns.get("reference")
        fmt = lambda x: f"{x:.3f}" if x is not None else "-"
        ratio = f"{fast / copy:.2f}x" if fast and copy else "-"
        speed = f"{ref / fast:.0f}x" if fast and ref else "-"
        w.write_line(f"{g:<28} {fmt(fast):>14} {fmt(copy):>11} {ratio:>6} {fmt(ref):>11} {speed:>9}")

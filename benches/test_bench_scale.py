"""The simulation at scale (issue targets as ratios to a DRAM copy): touch, fork, check(), the
child's exit and the parent's munmap of one written region per folio size, on 6.18, against
``np.copyto`` of as many uint64 as the region has PTEs, copied between arrays of at least
64 MiB so that the baseline runs from DRAM, not from the cache (a smaller region's copy is
scaled per PTE from the 64 MiB one), measured in the same run.

``PTEBATCH_BENCH_SCALE_BYTES`` sets the region (default 16 GiB; the issue's figures are at
1 TiB, where one process per size is kinder to the host: ``scripts/scale.py --region 1T``).
Each step's peak host memory per page goes into the benchmark's ``extra_info``.

    PTEBATCH_BENCH_SCALE_BYTES=$((64 << 30)) .venv/bin/python -m pytest -q benches/test_bench_scale.py \\
        --benchmark-only -p no:cacheprovider
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import record

import ptebatch as pb

REGION = int(os.environ.get("PTEBATCH_BENCH_SCALE_BYTES", 16 << 30))
NPTE = REGION // 4096
SIZES = ("4K", "64K", "2M")
STEPS = ("touch", "fork", "check", "exit", "munmap")
#: The copy baseline's arrays: at least 64 MiB, beyond any last-level cache we run on.
COPY_ENTRIES = max(NPTE, 8 << 20)


def _kb(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def test_dram_copy(benchmark):
    src = np.arange(COPY_ENTRIES, dtype=np.uint64)
    dst = np.empty_like(src)
    benchmark.pedantic(np.copyto, args=(dst, src), rounds=5, iterations=1, warmup_rounds=1)
    for size in SIZES:
        for step in STEPS:
            record(benchmark, f"scale {step} {size}", "numpy_copy", COPY_ENTRIES)


def _before(step: str, size: str) -> tuple[pb.Simulation, dict]:
    """A simulation one step short of ``step``: the region mapped, written, forked as needed."""
    sim = pb.Simulation("x86-64", "6.18", REGION + REGION // 64 + (64 << 20))
    p = sim.spawn()
    v = p.mmap(REGION, mthp=[] if size == "4K" else [size])
    ctx = {"p": p, "v": v}
    if step != "touch":
        p.touch(v.start, v.length, write=True)
    if step in ("check", "exit", "munmap"):
        ctx["child"] = p.fork()
    if step == "munmap":
        ctx["child"].exit()
    return sim, ctx


def _run(step: str, sim: pb.Simulation, ctx: dict) -> None:
    p, v = ctx["p"], ctx["v"]
    if step == "touch":
        p.touch(v.start, v.length, write=True)
    elif step == "fork":
        p.fork()
    elif step == "check":
        sim.check()
    elif step == "exit":
        ctx["child"].exit()
    else:
        p.munmap(v.start, v.length)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("step", STEPS)
def test_scale(benchmark, step: str, size: str):
    peaks: list[float] = []
    # The simulation of the last round stays alive until the next setup replaces it.
    held: list[pb.Simulation] = []

    def setup():
        held.clear()
        sim, ctx = _before(step, size)
        held.append(sim)
        _reset_peak()
        ctx["rss"] = _kb("VmRSS")
        return (sim, ctx), {}

    def target(sim: pb.Simulation, ctx: dict) -> None:
        _run(step, sim, ctx)
        peaks.append((_kb("VmHWM") - ctx["rss"]) / NPTE)

    benchmark.pedantic(target, setup=setup, rounds=3 if REGION >= 1 << 30 else 1, iterations=1)
    if peaks:
        benchmark.extra_info["peak_added_bytes_per_page"] = max(peaks)
    record(benchmark, f"scale {step} {size}", "rust", NPTE)

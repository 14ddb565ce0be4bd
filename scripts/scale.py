"""Speed and host memory of the simulation at scale: touch, fork, check(), the child's exit and
the parent's munmap of one region, per folio size, each case in a process of its own.

Times are ns per PTE of the region and ratios to a DRAM baseline measured in the same process
just before: ``np.copyto`` between two uint64 arrays of min(PTEs, 64 Mi) entries (512 MiB each,
far beyond the cache), scaled per PTE. Memory is the step's peak resident set (VmHWM, reset
before each step through /proc/self/clear_refs) less the resident set before the simulation
was made, in bytes per page of the region.

    .venv/bin/python scripts/scale.py --region 64G --sizes 4K,64K,2M --kernel 6.18
    .venv/bin/python scripts/scale.py --region 1T --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
STEPS = ("touch", "fork", "check", "exit", "munmap")


def parse_size(s: str) -> int:
    s = s.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(s[:-1]) * UNITS[s[-1]]) if s and s[-1] in UNITS else int(s)


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) << 10
    raise RuntimeError(field)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _copy_ns_per_pte(n: int) -> float:
    import numpy as np

    m = min(n, 64 << 20)
    src = np.arange(m, dtype=np.uint64)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    best = []
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        best.append(time.perf_counter() - t)
    best.sort()
    return best[len(best) // 2] / m * 1e9


def run_case(region: int, size: str, kernel: str, arch: str) -> dict:
    """One case, in this process."""
    import ptebatch as pb

    page = 4096 if arch in ("x86-64", "arm64-4k") else None
    copy = _copy_ns_per_pte(region // (page or 4096))
    base = _kb("VmRSS")
    sim = pb.Simulation(arch, kernel, region + region // 64 + (64 << 20))
    npte = region // sim.page_size
    p = sim.spawn()
    v = p.mmap(region, mthp=[] if size == "4K" else [size])
    out: dict = {"region": region, "size": size, "kernel": kernel, "arch": arch, "ptes": npte,
                 "copy_ns_per_pte": copy, "steps": {}}
    child = None
    for step in STEPS:
        _reset_peak()
        t = time.perf_counter()
        if step == "touch":
            p.touch(v.start, v.length, write=True)
        elif step == "fork":
            child = p.fork()
        elif step == "check":
            sim.check()
        elif step == "exit":
            child.exit()
        elif step == "munmap":
            p.munmap(v.start, v.length)
        dt = time.perf_counter() - t
        peak = _kb("VmHWM") - base
        out["steps"][step] = {"seconds": dt, "ns_per_pte": dt / npte * 1e9,
                              "ratio_to_copy": dt / npte * 1e9 / copy,
                              "peak_bytes_per_page": peak / npte}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--region", default="16G", help="bytes of the region (K/M/G/T suffixes)")
    ap.add_argument("--sizes", default="4K,64K,2M", help="folio sizes, comma-separated")
    ap.add_argument("--kernel", default="6.18")
    ap.add_argument("--arch", default="x86-64")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    region = parse_size(a.region)
    if a.one:
        json.dump(run_case(region, a.sizes, a.kernel, a.arch), sys.stdout)
        return 0
    rows = []
    print(f"region {a.region}, kernel {a.kernel}, {a.arch}: ns/PTE (ratio to the DRAM copy) "
          f"and peak host bytes per page")
    for size in a.sizes.split(","):
        r = subprocess.run([sys.executable, __file__, "--region", a.region, "--sizes", size,
                            "--kernel", a.kernel, "--arch", a.arch, "--one"],
                           capture_output=True, text=True, env=os.environ)
        if r.returncode:
            print(f"{size}: failed\n{r.stderr}", file=sys.stderr)
            return 1
        res = json.loads(r.stdout)
        rows.append(res)
        cells = "  ".join(f"{s} {d['ns_per_pte']:.2f} ({d['ratio_to_copy']:.1f}x, {d['peak_bytes_per_page']:.0f} B)"
                          for s, d in res["steps"].items())
        print(f"{size:>4}: copy {res['copy_ns_per_pte']:.2f}  {cells}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

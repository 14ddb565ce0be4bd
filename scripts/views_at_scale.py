"""Time and host memory to obtain the zero-copy views of a simulation of SIZE_GIB (default
1024, i.e. 1 TiB) of written anonymous memory in 2M folios, against a numpy copy of each.

    .venv/bin/python scripts/views_at_scale.py [SIZE_GIB]

Prints, per array: entries, the time to obtain the view (median of 101), the growth of the
process's resident memory while 100 views are held, and the time of one np.copy of it.
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import numpy as np

import ptebatch as pb


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    gib = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    size = gib << 30
    t0 = time.perf_counter()
    sim = pb.Simulation("x86-64", kernel="6.18", memory=size + (1 << 30))
    p = sim.spawn()
    v = p.mmap(size, mthp=["2M"])
    p.touch(v.start, v.length, write=True)
    print(f"{gib} GiB simulated and written in {time.perf_counter() - t0:.1f} s; "
          f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    print(f"{'array':<18} {'entries':>12} {'view (us)':>10} {'RSS growth, 100 views':>22} {'np.copy (ms)':>13}")
    getters = {f"memory.{n}": (lambda n=n: getattr(sim.memory, n)) for n in ("mapcount", "refcount", "order", "flags", "token")}
    getters["p.ptes(v)"] = lambda: p.ptes(v)
    for name, get in getters.items():
        times = []
        for _ in range(101):
            t = time.perf_counter()
            a = get()
            times.append(time.perf_counter() - t)
            del a
        before = rss_bytes()
        held = [get() for _ in range(100)]
        grown = rss_bytes() - before
        t = time.perf_counter()
        c = np.copy(held[0])
        copy_s = time.perf_counter() - t
        del c
        print(f"{name:<18} {len(held[0]):>12} {statistics.median(times) * 1e6:>10.1f} {grown / 1024:>19.0f} KiB {copy_s * 1e3:>13.0f}")
        del held


if __name__ == "__main__":
    main()

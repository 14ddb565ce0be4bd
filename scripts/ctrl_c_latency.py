"""How long Ctrl-C takes to stop a long simulation step: touches, forks and checks a region of
SIZE GiB written in 64K folios, sends SIGINT to itself 0.3 s into each step, and prints the time
from the signal to the KeyboardInterrupt (and that the state was left as it was).

    .venv/bin/python scripts/ctrl_c_latency.py 128
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import ptebatch as pb


def main() -> None:
    size = int(sys.argv[1] if len(sys.argv) > 1 else 64) << 30
    sim = pb.Simulation(memory=size + (1 << 30))
    p = sim.spawn()
    v = p.mmap(size, mthp=["64K"])
    sent: dict[str, float] = {}

    def later() -> None:
        time.sleep(0.3)
        sent["t"] = time.perf_counter()
        os.kill(os.getpid(), signal.SIGINT)

    for step in ("touch", "fork", "check"):
        if step == "fork":
            p.touch(v.start, v.length, write=True)
        free = sim.free_pages
        threading.Thread(target=later).start()
        t0 = time.perf_counter()
        try:
            {"touch": lambda: p.touch(v.start, v.length, write=True), "fork": p.fork, "check": sim.check}[step]()
            print(f"{step}: finished before the signal ({time.perf_counter() - t0:.2f} s); use a larger SIZE")
            time.sleep(0.5)
        except KeyboardInterrupt:
            t1 = time.perf_counter()
            print(f"{step}: KeyboardInterrupt {1e3 * (t1 - sent['t']):.0f} ms after SIGINT "
                  f"(the step ran {t1 - t0:.2f} s); state unchanged: {sim.free_pages == free}")


if __name__ == "__main__":
    main()

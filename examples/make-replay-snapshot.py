"""Makes examples/replay-snapshot.npz, the snapshot examples/replay-snapshot.toml starts from.

A simulated process, not a captured one (so the file is small and the same everywhere): a
"server" with a 4 MiB heap of 64K mTHPs of which a quarter was unmapped with MADV_DONTNEED, a
2 MiB region of 2M folios, and a read-only 1 MiB region never touched. (No zero-page PTEs:
snapshot_of() does not mark the zero page in kpageflags, so replay would take it for a
page-cache page.) It is saved by ptebatch.thpmaps.snapshot_of(), as `ptebatch capture` would save a real process.

    .venv/bin/python examples/make-replay-snapshot.py
"""

import os

import ptebatch as pb
from ptebatch.thpmaps import snapshot_of

sim = pb.Simulation("x86-64", "6.18", "64MiB", seed=5)
server = sim.spawn()
heap = server.mmap("4M", mthp=["64K"])
server.touch(heap.start, heap.length, write=True)
server.madvise(heap.start + (1 << 20), "1M", "dontneed")
big = server.mmap("2M", mthp=["2M"], addr=heap.start + (16 << 20))
server.touch(big.start, big.length, write=True)
ro = server.mmap("1M", prot="r", addr=heap.start + (32 << 20))
sim.check()
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "replay-snapshot.npz")
snapshot_of(sim, [server]).save(out)
print(f"{out}: {os.path.getsize(out)} bytes")

"""Scaling of the view-aware page-table storage (findings 6 and 7 of the views review, moved
here from tests/test_views_review.py because they are timings).

- Growing a mapping by adjacent mmaps that merge, against as many that do not merge (the
  control): a merge of two stores copies both (`PteTable::join`), so the merging series may
  be quadratic.
- A fork run on a copy of the state (a pinned page and little free memory make it one) of a
  process with many VMAs in as many stores, against the same fork in place: the copy looks up
  each store's copy (`StoreCopies`, a hash map) and should stay linear.
"""

from __future__ import annotations

import pytest

import ptebatch as pb

PAGE = 4096
N_MMAPS = 6000
N_VMAS = 16000


def _grow(alternate: bool) -> None:
    sim = pb.Simulation("x86-64", kernel="6.18", memory="4MiB")
    p = sim.spawn()
    at = p.mmap(16 * PAGE).end
    for i in range(N_MMAPS):
        p.mmap(32 * PAGE, addr=at, prot="r" if alternate and i % 2 == 0 else "rw")
        at += 32 * PAGE
    assert len(p.vmas()) == (N_MMAPS + 1 if alternate else 1)


@pytest.mark.parametrize("merging", [True, False], ids=["merging", "control"])
def test_adjacent_mmaps(benchmark, merging):
    benchmark.group = "adjacent mmaps"
    benchmark.pedantic(_grow, args=(not merging,), rounds=3)


def _many_vmas(pinned: bool) -> tuple[tuple[pb.Process], dict]:
    sim = pb.Simulation("x86-64", kernel="6.18", memory="4MiB")
    p = sim.spawn()
    first = p.mmap(PAGE)
    p.touch(first.start, PAGE, write=True)
    if pinned:
        p.pin(first.start, PAGE)
    for _ in range(N_VMAS):
        p.mmap(PAGE)
    return (p,), {}


@pytest.mark.parametrize("on_copy", [True, False], ids=["on-a-copy", "in-place"])
def test_fork_of_many_stores(benchmark, on_copy):
    benchmark.group = "fork of many stores"
    benchmark.pedantic(lambda p: p.fork(), setup=lambda: _many_vmas(on_copy), rounds=3)

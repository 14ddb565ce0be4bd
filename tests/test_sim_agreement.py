"""The Rust simulation and the pure-Python reference simulation agree exactly — every PTE,
counter, token, free block and statistic — after every step of the same random sequences."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

import ptebatch as pb

from simmachine import SimMachine

CASES = [("6.8", True), ("6.12", True), ("6.16", True), ("6.18", True), ("7.0", True), ("6.18", False)]
MEMORY = 4 << 20


def machine_for(kernel: str, batching: bool) -> type[SimMachine]:
    class Machine(SimMachine):
        def make_sims(self) -> list[pb.Simulation]:
            return [
                pb.Simulation("x86-64", kernel, MEMORY, seed=5, batching=batching),
                pb.Simulation("x86-64", kernel, MEMORY, seed=5, batching=batching, backend="reference"),
            ]

        def comparisons(self):
            return [(0, 1, set(), True)]

        @invariant()
        def same_statistics(self) -> None:
            if hasattr(self, "sims"):
                a, b = (s.stats for s in self.sims)
                assert a == b, f"statistics differ: {a} vs {b}"

    Machine.__name__ = f"Agreement_{kernel.replace('.', '_')}_{'batched' if batching else 'per_pte'}"
    return Machine


@pytest.mark.parametrize("kernel,batching", CASES, ids=[f"{k}-{'batched' if b else 'per-pte'}" for k, b in CASES])
def test_rust_agrees_with_reference(kernel: str, batching: bool) -> None:
    m = machine_for(kernel, batching)
    m.TestCase.settings = settings(max_examples=int(os.environ.get("PTEBATCH_AGREE_EXAMPLES", 12)),
                                   stateful_step_count=20, deadline=None,
                                   suppress_health_check=list(HealthCheck))
    m.TestCase().runTest()

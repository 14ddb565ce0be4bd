"""The Rust simulation and the pure-Python reference simulation agree exactly — every PTE,
counter, token, free block and statistic, and every value an operation returns — after every
step of the same random sequences."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import invariant

import ptebatch as pb

from simmachine import SimMachine

CASES = [("x86-64", "6.8", True), ("x86-64", "6.12", True), ("x86-64", "6.16", True), ("x86-64", "6.18", True),
         ("x86-64", "7.0", True), ("x86-64", "6.18", False), ("arm64-4k", "6.18", True), ("s390x", "6.12", True),
         ("riscv64-svrsw60t59b", "7.0", True), ("ppc64-4k", "6.16", True), ("loongarch64", "6.9", True)]
MEMORY = 4 << 20


def machine_for(arch: str, kernel: str, batching: bool) -> type[SimMachine]:
    class Machine(SimMachine):
        def make_sims(self) -> list[pb.Simulation]:
            return [
                pb.Simulation(arch, kernel, MEMORY, seed=5, batching=batching),
                pb.Simulation(arch, kernel, MEMORY, seed=5, batching=batching, backend="reference"),
            ]

        def comparisons(self):
            return [(0, 1, set(), True)]

        # The states are compared exactly after every step, so the reference's own (slow)
        # check() need only run on each end state; the Rust one runs every step.
        check_every_step = ("rust",)

        @invariant()
        def same_statistics(self) -> None:
            if hasattr(self, "sims"):
                a, b = (s.stats for s in self.sims)
                assert a == b, f"statistics differ: {a} vs {b}"

    Machine.__name__ = f"Agreement_{arch.replace('-', '_')}_{kernel.replace('.', '_')}_{'batched' if batching else 'per_pte'}"
    return Machine


@pytest.mark.parametrize("arch,kernel,batching", CASES,
                         ids=[f"{a}-{k}-{'batched' if b else 'per-pte'}" for a, k, b in CASES])
def test_rust_agrees_with_reference(arch: str, kernel: str, batching: bool) -> None:
    m = machine_for(arch, kernel, batching)
    m.TestCase.settings = settings(max_examples=int(os.environ.get("PTEBATCH_AGREE_EXAMPLES", 25)),
                                   stateful_step_count=20, deadline=None,
                                   suppress_health_check=list(HealthCheck))
    m.TestCase().runTest()

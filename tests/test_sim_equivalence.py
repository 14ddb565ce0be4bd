"""Batched and per-PTE paths give the same end state (hypothesis stateful testing).

Three simulations run every random sequence in lockstep: kernel K with its batched fork, zap
and mprotect; the same K with every path per PTE; and 6.8. After each step all three pass
``check()``; K batched equals K per-PTE except for the deviations the spec documents
(``simmachine.DEVIATIONS``, masked by name); K per-PTE equals 6.8 except for the fields 6.8
does not have (MM-ID) and from the first write fault where their large-folio reuse rules
decide differently.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

import ptebatch as pb

from simmachine import DEVIATIONS, MEMORY, SimMachine

KERNELS = ["6.9", "6.12", "6.15", "6.17", "7.0", "arm64-4k:6.12", "arm64-4k:7.0"]


def machine_for(case: str) -> type[SimMachine]:
    arch, kernel = case.split(":") if ":" in case else ("x86-64", case)

    class Machine(SimMachine):
        def make_sims(self) -> list[pb.Simulation]:
            return [
                pb.Simulation(arch, kernel, MEMORY, seed=3),
                pb.Simulation(arch, kernel, MEMORY, seed=3, batching=False),
                pb.Simulation(arch, "6.8", MEMORY, seed=3),
            ]

        def comparisons(self):
            # 6.8 has no contpte: on arm64 only that deviation is masked against it.
            old = {"contpte-layout"} if arch.startswith("arm64") else set()
            return [(0, 1, set(DEVIATIONS), True), (1, 2, old, False)]

    Machine.__name__ = f"Equivalence_{arch.replace('-', '_')}_{kernel.replace('.', '_')}"
    return Machine


@pytest.mark.parametrize("kernel", KERNELS)
def test_batched_equals_per_pte(kernel: str) -> None:
    m = machine_for(kernel)
    m.TestCase.settings = settings(max_examples=int(os.environ.get("PTEBATCH_SIM_EXAMPLES", 40)), stateful_step_count=30, deadline=None,
                                   suppress_health_check=list(HealthCheck))
    m.TestCase().runTest()

"""The pure-Python reference of ``ptebatch``: the readable specification the Rust core is tested against.

Everything here follows docs/semantics.md bit for bit and is written to be read next to it and
next to the kernel: one class per architecture with its PTE bits under the kernel's names
(:mod:`.layouts`), the kernel versions and their ``folio_pte_batch`` forms (:mod:`.kernel`), and
one small function per form of the batching loop (:mod:`.batch`). It favours clarity over
speed; the property tests check that the Rust core computes the same values.
"""

from .batch import Batch, batch_lengths, folio_pte_batch, fork_flags
from .kernel import FPB_FORMS, KERNEL_VERSIONS, fpb_form
from .layouts import (
    LAYOUT_NAMES,
    MASK64,
    X86_64,
    Arm64,
    Loongarch64,
    Ppc64,
    RefLayout,
    Riscv64,
    Riscv64Svrsw60t59b,
    S390x,
    X86_64XenPv,
    layout,
)

__all__ = [
    "LAYOUT_NAMES",
    "layout",
    "RefLayout",
    "X86_64",
    "X86_64XenPv",
    "Arm64",
    "Riscv64",
    "Riscv64Svrsw60t59b",
    "Ppc64",
    "S390x",
    "Loongarch64",
    "MASK64",
    "KERNEL_VERSIONS",
    "FPB_FORMS",
    "fpb_form",
    "Batch",
    "folio_pte_batch",
    "fork_flags",
    "batch_lengths",
]

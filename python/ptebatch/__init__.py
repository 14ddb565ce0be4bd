"""ptebatch: exact, fast models of Linux page tables and PTE batching.

>>> import numpy as np
>>> import ptebatch as pb
>>> L = pb.layout("arm64-4k")
>>> ptes = L.mk_pte(np.arange(0x1000, 0x1010, dtype=np.uint64), write=True, young=True)
>>> pb.folio_pte_batch(ptes, folio_pfn=0x1000, folio_nr_pages=16, layout=L, kernel="6.18").nr
16

``ptebatch.reference`` holds the same algorithms in plain Python, written for reading.
"""

from __future__ import annotations

from ptebatch import _core
from ptebatch.errors import (
    AccessFault,
    CaptureError,
    InvariantError,
    OutOfMemoryError,
    PtebatchError,
    SnapshotError,
)
from ptebatch._core import (
    KERNEL_VERSIONS,
    LAYOUT_NAMES,
    Batch,
    Layout,
    batch_lengths,
    folio_pte_batch,
    fpb_form,
    layout,
)
from ptebatch import helpers
from ptebatch.simulation import Mapping, Pin, Process, Simulation, format_size, parse_size, state_diff
from ptebatch._flags import (
    FPB_IGNORE_DIRTY,
    FPB_IGNORE_SOFT_DIRTY,
    FPB_MERGE_WRITE,
    FPB_MERGE_YOUNG_DIRTY,
    FPB_RESPECT_DIRTY,
    FPB_RESPECT_SOFT_DIRTY,
    FPB_RESPECT_WRITE,
    FpbFlags,
)

#: Cargo's version of the crate the extension was built from (the one version source;
#: pyproject.toml takes it too).
__version__: str = _core.__version__

#: The newest kernel version modelled.
NEWEST_KERNEL: str = KERNEL_VERSIONS[-1]


def fork_flags(kernel: str, shared: bool = False, soft_dirty_tracking: bool = False) -> FpbFlags:
    """The ``fpb_t`` flags ``copy_present_ptes()`` (mm/memory.c) passes on fork.

    Dirty is respected unless the VMA is shared, soft-dirty only while the VMA tracks it, and
    from 6.17 the write bit is merged into the child's template (``FPB_MERGE_WRITE``).
    """
    family, bits = _core.fork_flag_bits(kernel, shared, soft_dirty_tracking)
    return FpbFlags(family, bits)


def kernel_from_release(release: str) -> str:
    """Maps a ``uname -r`` string such as ``"6.18.44-fc"`` to the modelled ``"6.18"``."""
    if not isinstance(release, str):
        raise TypeError(f"release must be a str such as '6.18.44', not {type(release).__name__}")
    parts = release.split("-", 1)[0].split(".")
    if len(parts) < 2 or not (parts[0].isdigit() and parts[1].isdigit()):
        raise ValueError(f"not a kernel release: {release!r}")
    version = f"{int(parts[0])}.{int(parts[1])}"
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"kernel {version} (from {release!r}) is not modelled; known: {KERNEL_VERSIONS}")
    return version


__all__ = [
    "KERNEL_VERSIONS",
    "LAYOUT_NAMES",
    "NEWEST_KERNEL",
    "Batch",
    "CaptureError",
    "AccessFault",
    "OutOfMemoryError",
    "Simulation",
    "Process",
    "Mapping",
    "Pin",
    "parse_size",
    "format_size",
    "state_diff",
    "FPB_IGNORE_DIRTY",
    "FPB_IGNORE_SOFT_DIRTY",
    "FPB_MERGE_WRITE",
    "FPB_MERGE_YOUNG_DIRTY",
    "FPB_RESPECT_DIRTY",
    "FPB_RESPECT_SOFT_DIRTY",
    "FPB_RESPECT_WRITE",
    "FpbFlags",
    "InvariantError",
    "Layout",
    "PtebatchError",
    "SnapshotError",
    "batch_lengths",
    "folio_pte_batch",
    "fork_flags",
    "fpb_form",
    "helpers",
    "kernel_from_release",
    "layout",
]

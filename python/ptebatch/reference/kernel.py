"""Kernel versions and the ``folio_pte_batch`` form each one uses (docs/semantics.md §2)."""

from __future__ import annotations

import re

#: Every accepted ``kernel=`` value: the posted seed series, then mainline releases 6.8 … 7.0.
KERNEL_VERSIONS = (
    "seed",
    "6.8",
    "6.9",
    "6.10",
    "6.11",
    "6.12",
    "6.13",
    "6.14",
    "6.15",
    "6.16",
    "6.17",
    "6.18",
    "6.19",
    "7.0",
)

#: The ``folio_pte_batch`` forms, oldest first.
FPB_FORMS = ("seed", "v6.9", "v6.10", "v6.15", "v6.17")

_FORM_OF = {
    "seed": "seed",  # v3 of the fork series, patches 13-15, as posted (mm/memory.c)
    "6.8": None,  # no folio_pte_batch: fork copies one PTE at a time
    "6.9": "v6.9",  # pte_batch_hint steps, end test >=, any_writable
    "6.10": "v6.10",  # + any_young, any_dirty (mm/internal.h)
    "6.11": "v6.10",
    "6.12": "v6.10",
    "6.13": "v6.10",
    "6.14": "v6.10",
    "6.15": "v6.15",  # XEN PV fix 7b08b74f3d99: max_nr clamped up front
    "6.16": "v6.15",
    "6.17": "v6.17",  # FPB_RESPECT_* / FPB_MERGE_*
    "6.18": "v6.17",
    "6.19": "v6.17",
    "7.0": "v6.17",
}

_RANGE = "'seed' or a mainline release 'X.Y' from '6.8' to '7.0'"


def fpb_form(kernel: str) -> str | None:
    """The ``folio_pte_batch`` form of ``kernel``; ``None`` for ``"6.8"``, which has none.

    Raises ``ValueError`` for anything not in :data:`KERNEL_VERSIONS`, saying what to pass.
    """
    if isinstance(kernel, str) and kernel in _FORM_OF:
        return _FORM_OF[kernel]
    raise ValueError(_explain(kernel))


def _explain(kernel: object) -> str:
    """A message telling why ``kernel`` is not accepted and what to pass instead."""
    if not isinstance(kernel, str):
        return (
            f"kernel must be a string, {_RANGE} (e.g. '6.12'), "
            f"got {type(kernel).__name__} {kernel!r}"
        )
    text = kernel.strip()
    if text in FPB_FORMS:
        return (
            f"kernel {kernel!r} is a folio_pte_batch form name; pass a release instead, "
            f"{_RANGE} (e.g. {text[1:]!r})"
        )
    match = re.fullmatch(r"[vV]?(\d+)\.(\d+)(?:\.(\d+))?(-rc\d+)?(\S*)", text)
    if match is None:
        return f"kernel {kernel!r} is not a kernel version; pass {_RANGE}"
    major_minor = f"{int(match.group(1))}.{int(match.group(2))}"
    if major_minor not in _FORM_OF:
        return (
            f"kernel {kernel!r} is out of range: ptebatch models {_RANGE} "
            "(no folio_pte_batch before 6.9; nothing newer than 7.0 was read)"
        )
    if match.group(3) is not None:
        return (
            f"kernel {kernel!r} is a stable release; pass the mainline release 'X.Y', "
            f"here {major_minor!r} (stable backports, such as the XEN PV clamp in late 6.12.y, "
            "are not modelled)"
        )
    return f"kernel {kernel!r} is not accepted; pass the release exactly as 'X.Y', here {major_minor!r}"

"""The seed series' published measurements, to print beside the simulation's and the cost
model's figures.

Both series are David Hildenbrand's, measured on an Intel Xeon Silver 4210R with a 1 GiB region
of private anonymous memory backed by PTE-mapped folios of one size (standard deviation under
1 %, as the cover letters say), in seconds:

- fork(): "mm/memory: optimize fork() with PTE-mapped THP", v2 cover letter (lore Message-ID
  ``20240125193227.444072-1-david@redhat.com``; v3 reused these figures). Before: v6.8-rc1.
- munmap() of memory the process alone maps (so it is freed too): "mm/memory: optimize
  unmap/zap with PTE-mapped THP", v1 cover letter (``20240129143221.263763-1-david@redhat.com``;
  v3, ``20240214204435.167852-1-david@redhat.com``, says a re-run showed no significant
  change). Before: mm-unstable of late January 2024, with the fork series.
"""

from __future__ import annotations

#: Where the figures come from, for legends.
SOURCE = ("the seed series' cover letters (D. Hildenbrand, January 2024; Intel Xeon Silver 4210R, "
          "1 GiB of PTE-mapped folios)")

#: fork(): folio size -> (seconds before the series, seconds with it).
FORK_S: dict[str, tuple[float, float]] = {
    "4K": (0.014328, 0.014035),
    "16K": (0.014263, 0.01196),
    "32K": (0.014334, 0.01094),
    "64K": (0.014046, 0.010444),
    "128K": (0.014011, 0.010063),
    "256K": (0.013993, 0.009938),
    "512K": (0.013983, 0.00985),
    "1M": (0.013986, 0.00982),
    "2M": (0.014305, 0.010076),
}

#: munmap() of memory only this process maps: folio size -> (seconds before, seconds with).
MUNMAP_S: dict[str, tuple[float, float]] = {
    "4K": (0.058110, 0.057715),
    "16K": (0.044198, 0.035469),
    "32K": (0.034216, 0.023522),
    "64K": (0.029207, 0.018434),
    "128K": (0.026579, 0.014026),
    "256K": (0.025130, 0.011756),
    "512K": (0.024292, 0.010703),
    "1M": (0.023812, 0.010294),
    "2M": (0.023785, 0.009910),
}

#: Which table holds an operation's figures (calibration operation names and "fork"/"munmap").
TABLES = {"fork": FORK_S, "munmap": MUNMAP_S, "parent-munmap": MUNMAP_S}


def _key(folio_size: str) -> str:
    """"2M-pte" is the seed's 2M (PTE-mapped); PMD-mapped sizes are not in the seed's tables."""
    return folio_size.removesuffix("-pte")


def change(op: str, folio_size: str) -> float | None:
    """The seed's published change for ``op`` at ``folio_size``: with / before - 1."""
    t = TABLES.get(op, {}).get(_key(folio_size))
    return None if t is None else t[1] / t[0] - 1


def ratio_to_4k(op: str, folio_size: str, *, before: bool = False) -> float | None:
    """The seed's time for ``op`` at ``folio_size`` over its 4K time, with the series (or
    before it)."""
    table = TABLES.get(op, {})
    t, t4 = table.get(_key(folio_size)), table.get("4K")
    if t is None or t4 is None:
        return None
    i = 0 if before else 1
    return t[i] / t4[i]

"""Snapshots of real page tables: a versioned .npz file with a JSON header.

A snapshot holds, per captured process, its VMAs and the /proc/<pid>/pagemap entry of every
page of them, plus /proc/kpageflags and /proc/kpagecount for every PMD-sized, naturally
aligned window of page frames that contains a mapped page (a large folio never leaves its
window, so every folio can be rebuilt from its compound head and tail flags).

Files are written atomically (a temporary file in the same directory, then ``os.replace``)
and validated on load: a corrupt, truncated or future-version file raises
``ptebatch.SnapshotError`` and yields nothing.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._core import SnapshotError

SCHEMA_VERSION = 1

# pagemap bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PFN_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF_REFERENCED = 1 << 2
KPF_DIRTY = 1 << 4
KPF_LRU = 1 << 5
KPF_ANON = 1 << 12
KPF_SWAPBACKED = 1 << 14
KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16
KPF_HUGE = 1 << 17
KPF_NOPAGE = 1 << 20
KPF_KSM = 1 << 21
KPF_THP = 1 << 22
KPF_ZERO_PAGE = 1 << 24

# VMA flag bits of the snapshot's vma_flags column.
VMA_READ, VMA_WRITE, VMA_EXEC, VMA_SHARED, VMA_FILE = 1, 2, 4, 8, 16

#: Arrays a snapshot must hold, with their dtypes; every one is one-dimensional.
ARRAYS = {
    "vma_pid": np.int64,
    "vma_start": np.uint64,
    "vma_end": np.uint64,
    "vma_flags": np.uint32,
    "vma_pgoff": np.uint64,
    "vma_anon_huge_kb": np.int64,
    "vma_page_offset": np.int64,
    "pagemap": np.uint64,
    "win_start": np.uint64,
    "kpageflags": np.uint64,
    "kpagecount": np.uint64,
}

#: PTE bits user space cannot see; replay infers them (see ``Snapshot.inferred``).
INFERRED = ["write", "dirty", "young", "cont", "anon_exclusive"]


@dataclass
class Snapshot:
    """Captured page tables of one or more processes."""

    header: dict[str, Any]
    arrays: dict[str, np.ndarray]
    vma_names: list[str] = field(default_factory=list)

    # -- views -----------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return int(self.header["page_size"])

    @property
    def pmd_pages(self) -> int:
        return int(self.header["pmd_pages"])

    @property
    def pids(self) -> list[int]:
        return [int(p) for p in self.header["pids"]]

    @property
    def inferred(self) -> list[str]:
        return list(self.header["inferred"])

    def vma_pages(self, i: int) -> np.ndarray:
        """pagemap entries of VMA ``i``."""
        o = self.arrays["vma_page_offset"]
        return self.arrays["pagemap"][o[i]:o[i + 1]]

    def frame_info(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(kpageflags, kpagecount) of each pfn; the pfns must lie in captured windows."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        n = np.uint64(self.pmd_pages)
        win = self.arrays["win_start"]
        k = np.searchsorted(win, pfns - pfns % n)
        if len(win) == 0 or np.any(k >= len(win)) or np.any(win[np.minimum(k, len(win) - 1)] != pfns - pfns % n):
            raise SnapshotError("a pfn outside the captured frame windows was asked for")
        idx = k.astype(np.int64) * int(n) + (pfns % n).astype(np.int64)
        return self.arrays["kpageflags"][idx], self.arrays["kpagecount"][idx]

    def folio_of(self, pfns: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(first pfn, number of pages) of the folio holding each pfn, from the compound
        head/tail flags; a page that is not compound is a folio of one page."""
        pfns = np.asarray(pfns, dtype=np.uint64)
        n = self.pmd_pages
        flags = self.arrays["kpageflags"].reshape(-1, n)
        tail = (flags & np.uint64(KPF_COMPOUND_TAIL)) != 0
        pos = np.arange(n)
        # Head of each frame: the last non-tail frame at or before it in its window.
        head_pos = np.maximum.accumulate(np.where(~tail, pos, 0), axis=1)
        # Folio length: from each head, the run of tails that follows.
        nxt = np.where(~tail, pos, n)[:, ::-1]
        next_head = np.minimum.accumulate(nxt, axis=1)[:, ::-1]
        # next non-tail strictly after position i
        after = np.concatenate([next_head[:, 1:], np.full((flags.shape[0], 1), n)], axis=1)
        win = self.arrays["win_start"]
        nn = np.uint64(n)
        k = np.searchsorted(win, pfns - pfns % nn).astype(np.int64)
        off = (pfns % nn).astype(np.int64)
        hp = head_pos[k, off]
        length = after[k, hp] - hp
        return win[k] + hp.astype(np.uint64), length.astype(np.int64)

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the snapshot atomically."""
        path = os.fspath(path)
        validate(self.header, self.arrays)
        header = dict(self.header, vma_names=self.vma_names)
        blob = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".snapshot-", suffix=".npz", dir=d)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez_compressed(f, header=blob, **self.arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Snapshot":
        """Reads and validates a snapshot; any defect raises ``SnapshotError``."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SnapshotError(f"cannot read snapshot {os.fspath(path)!r}: {e.strerror}") from e
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            raise SnapshotError(f"{os.fspath(path)!r} is not a readable snapshot (corrupt or truncated): {e}") from e
        blob = arrays.pop("header", None)
        if blob is None or blob.dtype != np.uint8 or blob.ndim != 1:
            raise SnapshotError(f"{os.fspath(path)!r} has no snapshot header")
        try:
            header = json.loads(blob.tobytes().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SnapshotError(f"{os.fspath(path)!r}: the header is not valid JSON: {e}") from e
        if not isinstance(header, dict):
            raise SnapshotError(f"{os.fspath(path)!r}: the header is not a JSON object")
        names = header.pop("vma_names", [])
        validate(header, arrays)
        if not isinstance(names, list) or len(names) != len(arrays["vma_start"]):
            raise SnapshotError("vma_names does not list one name per VMA")
        return cls(header, arrays, [str(n) for n in names])


def validate(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Checks a snapshot's header and arrays for consistency; raises ``SnapshotError``."""
    v = header.get("schema_version")
    if not isinstance(v, int):
        raise SnapshotError("the header has no integer schema_version")
    if v > SCHEMA_VERSION:
        raise SnapshotError(f"snapshot schema version {v} is newer than this ptebatch reads ({SCHEMA_VERSION})")
    if v < 1:
        raise SnapshotError(f"snapshot schema version {v} is not valid")
    for key, typ in (("kernel_release", str), ("arch", str), ("page_size", int), ("pmd_pages", int),
                     ("capture_time", str), ("pids", list), ("inferred", list)):
        if not isinstance(header.get(key), typ):
            raise SnapshotError(f"header field {key!r} is missing or not a {typ.__name__}")
    ps, pmd = header["page_size"], header["pmd_pages"]
    if ps <= 0 or ps & (ps - 1) or pmd <= 0 or pmd & (pmd - 1):
        raise SnapshotError(f"page_size {ps} / pmd_pages {pmd} are not powers of two")
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise SnapshotError(f"snapshot arrays missing: {sorted(missing)}")
    extra = set(arrays) - set(ARRAYS)
    if extra:
        raise SnapshotError(f"unknown snapshot arrays: {sorted(extra)}")
    for k, typ in ARRAYS.items():
        a = arrays[k]
        if a.dtype != np.dtype(typ) or a.ndim != 1:
            raise SnapshotError(f"array {k!r} must be one-dimensional {np.dtype(typ)}, not {a.ndim}-d {a.dtype}")
    nv = len(arrays["vma_start"])
    for k in ("vma_pid", "vma_end", "vma_flags", "vma_pgoff", "vma_anon_huge_kb"):
        if len(arrays[k]) != nv:
            raise SnapshotError(f"array {k!r} has {len(arrays[k])} entries for {nv} VMAs")
    off = arrays["vma_page_offset"]
    if len(off) != nv + 1 or (nv + 1 and off[0] != 0) or np.any(np.diff(off) < 0) or off[-1] != len(arrays["pagemap"]):
        raise SnapshotError("vma_page_offset does not partition the pagemap array")
    pages = (arrays["vma_end"] - arrays["vma_start"]) // np.uint64(ps)
    if np.any(arrays["vma_end"] <= arrays["vma_start"]) or not np.array_equal(np.diff(off), pages.astype(np.int64)):
        raise SnapshotError("VMA sizes and pagemap entries disagree")
    nw = len(arrays["win_start"])
    if len(arrays["kpageflags"]) != nw * pmd or len(arrays["kpagecount"]) != nw * pmd:
        raise SnapshotError("kpageflags/kpagecount do not cover the frame windows")
    if np.any(arrays["win_start"] % np.uint64(pmd)) or np.any(np.diff(arrays["win_start"].astype(np.int64)) <= 0):
        raise SnapshotError("frame windows are not sorted, distinct and PMD-aligned")
    if set(header["pids"]) != set(int(p) for p in np.unique(arrays["vma_pid"])) and nv:
        raise SnapshotError("header pids and VMA pids disagree")
    pm = arrays["pagemap"]
    present = pm[(pm & np.uint64(PM_PRESENT)) != 0] & np.uint64(PM_PFN_MASK)
    if len(present):
        wins = present - present % np.uint64(pmd)
        if not np.all(np.isin(wins, arrays["win_start"])):
            raise SnapshotError("a mapped pfn lies outside the captured frame windows")


__all__ = ["Snapshot", "SCHEMA_VERSION", "INFERRED", "validate"]

"""The simulation's Python face: ``Simulation``, ``Process``, ``Mapping`` and ``Pin``.

The work happens in the Rust core (``ptebatch._core.Simulation``); the pure-Python twin
(``ptebatch.reference.sim.Simulation``) has the same low-level API, so ``backend="reference"``
runs the same script on the readable model. These classes only add names and sizes.
"""

from __future__ import annotations

import operator
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from . import _core
from .errors import OutOfMemoryError

_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20, "MB": 1 << 20,
          "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30, "T": 1 << 40, "TB": 1 << 40,
          "TIB": 1 << 40}


def _int_text(n: int) -> str:
    """``n`` for a message (Python refuses to print ints of more than 4300 digits)."""
    return str(n) if n.bit_length() <= 128 else f"an integer of {'-' if n < 0 else ''}{n.bit_length()} bits"


def _int_arg(value: object, name: str, bits: int = 64) -> int:
    """``value`` as an int in ``0 .. 2**bits - 1``: a TypeError for anything but an int (bools,
    floats such as 4096.0 and strings included), a ValueError naming ``name`` when out of range."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, not bool")
    try:
        n = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an integer, not {type(value).__name__}") from None
    if n < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {_int_text(n)}")
    if n >> bits:
        raise ValueError(f"{name} must be below 2**{bits}, not {_int_text(n)}")
    return n


def _bool_arg(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
    return bool(value)


def _str_arg(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, not {type(value).__name__}")
    return value


def parse_size(size: int | str, name: str = "size") -> int:
    """Bytes in ``size``: an int, or a string such as ``"64K"``, ``"2MiB"``, ``"16GiB"``.

    Units are binary whatever their spelling (``K``, ``KB``, ``KiB`` and ``k`` all mean 1024,
    as the kernel's ``kB`` does), up to ``T``; spaces around the number and unit are ignored.
    A size is a whole number of bytes below 2**64: fractions (``"1.5G"``), signs, ``"nan"``,
    floats (even ``4096.0``) and bools are errors naming ``name``. ``0`` is a size of zero,
    which the operations taking a size refuse themselves.
    """
    if isinstance(size, str):
        m = re.fullmatch(r"\s*([0-9]+)\s*([A-Za-z]*)\s*", size)
        if not m or m.group(2).upper() not in _UNITS:
            if re.fullmatch(r"\s*-.*", size):
                why = "a size cannot be negative"
            elif re.fullmatch(r"\s*[0-9]*\.[0-9]*\s*[A-Za-z]*\s*", size):
                why = "a size is a whole number of bytes (write '1536M', not '1.5G')"
            else:
                why = "use e.g. 4096, '64K', '2M' or '16GiB' (binary units B, K, M, G, T)"
            raise ValueError(f"cannot read {name} {size!r}: {why}")
        digits = m.group(1).lstrip("0") or "0"
        if len(digits) > 20:  # beyond 2**64 whatever the unit (and int() refuses 4300 digits)
            raise ValueError(f"{name} {size!r} is not below 2**64 bytes")
        n = int(digits) * _UNITS[m.group(2).upper()]
        if n >> 64:
            raise ValueError(f"{name} {size!r} is not below 2**64 bytes")
        return n
    if isinstance(size, (bool, np.bool_)) or not isinstance(size, (int, np.integer)):
        raise TypeError(f"{name} must be an int or a string such as '64K', not {type(size).__name__}")
    return _int_arg(size, name)


def _sizes(sizes: object, name: str) -> list[int]:
    """One size or several (any iterable of sizes but a mapping), each read by parse_size."""
    if isinstance(sizes, (str, int, np.integer)) and not isinstance(sizes, (bool, np.bool_)):
        return [parse_size(sizes, name)]  # type: ignore[arg-type]
    if isinstance(sizes, (bytes, bytearray, dict)) or not hasattr(sizes, "__iter__"):
        raise TypeError(f"{name} must be a size or a list of sizes such as ['16K', '64K'], "
                        f"not {type(sizes).__name__}")
    return [parse_size(s, f"{name}[{i}]") for i, s in enumerate(sizes)]  # type: ignore[attr-defined]


def format_size(n: int) -> str:
    """``65536`` → ``"64K"``: the kernel's hugepages-<size>kB style, shortened."""
    for unit, mult in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


# ---- Simulation.from_arrays: argument checks (docs/from-arrays.md) ---------------------------

#: ``folios["kind"]`` values, in the order of the core's kind codes.
FOLIO_KINDS = ("anon", "file", "shmem")
# The model's page flags (rust/src/memory.rs), for to_arrays.
_PG_ANON_EXCLUSIVE, _PG_ANON, _PG_SWAPBACKED, _PG_DIRTY = 1 << 0, 1 << 1, 1 << 2, 1 << 4
_PG_PARTIALLY_MAPPED, _PG_MAYBE_SHARED = 1 << 5, 1 << 6
_FREE_ORDER = 255
#: Keys of one VMA (``Process.vmas()`` gives all but ``ptes``), with their defaults (those of
#: ``mmap``); ``end``, when given, must agree with the page table's length; ``anon_huge_pages``
#: (what ``Process.vmas()`` reports) is derived from ``pmds`` and ignored. ``pmds`` is
#: reserved for PMD-mapped THPs and must be None for now.
_VMA_DEFAULTS: dict[str, Any] = {"prot": "rw", "shared": False, "file": None, "offset": 0,
                                 "vm_softdirty": True, "uffd_wp": False, "uffd_event_fork": False,
                                 "dontfork": False, "wipeonfork": False, "anon_vma": 0, "mthp": None,
                                 "hugepage": False, "nohugepage": False, "pmd": False, "end": None, "pmds": (),
                                 "anon_huge_pages": None}
_PROCESS_KEYS = ("vmas", "pid", "exited", "has_pinned", "next_mmap", "thp_disable")
_FOLIO_KEYS = ("pfn", "order", "kind", "file", "index", "dirty", "partially_mapped", "maybe_shared",
               "mm_ids", "mm_id_mapcounts")
_PIN_KEYS = ("pfns", "write", "longterm", "active")
_FILE_KEYS = ("size", "folio_size", "shmem", "huge", "anon")
#: state()["files"] kind column: 0 file or fixed-order shmem, 1 shared anonymous, 2 + i tmpfs huge=_FILE_HUGE[i].
_FILE_HUGE = ("never", "always", "within_size", "advise")


def _keys(d: object, name: str, known: Iterable[str], required: Iterable[str] = ()) -> dict[str, Any]:
    """``d`` as a dict of known keys (a TypeError if it is no mapping, a ValueError naming an
    unknown or missing key)."""
    if not isinstance(d, dict):
        raise TypeError(f"{name} must be a dict, not {type(d).__name__}")
    known = tuple(known)
    for k in d:
        if k not in known:
            raise ValueError(f"{name} has no key {k!r}; known: {', '.join(known)}")
    for k in required:
        if k not in d:
            raise ValueError(f"{name} needs the key {k!r}")
    return d


def _list(v: object, name: str) -> list[Any]:
    if isinstance(v, (str, bytes, dict)) or not isinstance(v, (list, tuple)):
        raise TypeError(f"{name} must be a list, not {type(v).__name__}")
    return list(v)


def _table_column(v: object, name: str, dtype: Any, n: int | None, width: int = 1) -> np.ndarray:
    """An integer or bool column of a table, converted exactly to ``dtype`` (small: a copy is
    cheap): a TypeError for other dtypes, a ValueError for a wrong length or values out of
    range."""
    want_bool = np.dtype(dtype) == np.bool_
    if isinstance(v, np.ndarray):
        a = v
    else:
        # Element by element: numpy would make floats of a list mixing uint64 and int.
        items = np.asarray(v, dtype=object)
        for x in items.reshape(-1):
            if isinstance(x, (bool, np.bool_)) != want_bool or not isinstance(x, (int, np.integer, np.bool_)):
                raise TypeError(f"{name} must hold {'bools' if want_bool else 'integers'}, not {type(x).__name__}")
        flat = [int(x) for x in items.reshape(-1)]
        if not want_bool and flat and (min(flat) < np.iinfo(dtype).min or max(flat) > np.iinfo(dtype).max):
            bad = min(flat) if min(flat) < np.iinfo(dtype).min else max(flat)
            raise ValueError(f"{name} holds {bad}, outside {np.iinfo(dtype).min}..{np.iinfo(dtype).max}")
        a = np.array(flat, dtype=dtype).reshape(items.shape)
    if a.size and a.dtype.kind not in ("b" if want_bool else "iu"):
        raise TypeError(f"{name} must hold {'bools' if want_bool else 'integers'}, not {a.dtype}")
    shape = (n,) if width == 1 else (n, width)
    if n is not None and (a.shape != shape and not (a.size == 0 and n == 0)):
        raise ValueError(f"{name} has shape {a.shape}, {shape} expected")
    if a.ndim != (1 if width == 1 else 2) and a.size:
        raise ValueError(f"{name} must be {'one' if width == 1 else 'two'}-dimensional, not of shape {a.shape}")
    if not want_bool and a.size:
        info = np.iinfo(dtype)
        lo, hi = int(a.min()), int(a.max())
        if lo < info.min or hi > info.max:
            bad = lo if lo < info.min else hi
            raise ValueError(f"{name} holds {bad}, outside {info.min}..{info.max}")
    return np.ascontiguousarray(a.astype(dtype, copy=False).reshape(-1))


def _pte_array(v: object, name: str) -> np.ndarray:
    """A page table: a one-dimensional, C-contiguous numpy uint64 array, borrowed as it is."""
    if not isinstance(v, np.ndarray):
        raise TypeError(f"{name} must be a numpy uint64 array (as Process.ptes() returns), not {type(v).__name__}")
    if v.dtype != np.uint64:
        raise TypeError(f"{name} must have dtype uint64 (the layout's PTE encoding), not {v.dtype}")
    if v.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, not of shape {v.shape}")
    if not v.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (pass np.ascontiguousarray(...))")
    return v


def _folio_table(folios: object) -> dict[str, np.ndarray | None]:
    f = _keys(folios, "folios", _FOLIO_KEYS, ("pfn", "order"))
    pfn = _table_column(f["pfn"], 'folios["pfn"]', np.uint64, None)
    n = len(pfn)
    order = _table_column(f["order"], 'folios["order"]', np.uint8, n)
    kind_in = f.get("kind", "anon")
    kinds = np.asarray([kind_in] * n if isinstance(kind_in, str) else kind_in)
    if kinds.size and kinds.dtype.kind not in "UO":
        raise TypeError(f'folios["kind"] must hold strings ({", ".join(FOLIO_KINDS)}), not {kinds.dtype}')
    if kinds.shape != (n,) and not (n == 0 and kinds.size == 0):
        raise ValueError(f'folios["kind"] has shape {kinds.shape}, ({n},) expected')
    kind = np.full(n, 255, np.uint8)
    for code, k in enumerate(FOLIO_KINDS):
        kind[kinds == k] = code
    if np.any(kind == 255):
        i = int(np.flatnonzero(kind == 255)[0])
        raise ValueError(f'folios["kind"][{i}] is {kinds[i]!r}; known: {", ".join(FOLIO_KINDS)}')
    file = _table_column(f.get("file", np.full(n, -1)), 'folios["file"]', np.int64, n)
    cached = kind != 0
    if np.any(cached & (file < 0)) or np.any(~cached & (file >= 0)):
        i = int(np.flatnonzero((cached & (file < 0)) | (~cached & (file >= 0)))[0])
        raise ValueError(f'folios[{i}]: a {FOLIO_KINDS[kind[i]]} folio with file {file[i]} '
                         "(page-cache folios name their file, anonymous ones have -1)")
    if np.any(file > 0xFFFF_FFFF):
        raise ValueError('folios["file"] holds a file id beyond 2**32 - 1')
    out: dict[str, np.ndarray | None] = {
        "pfn": pfn, "order": order, "kind": kind,
        "file": np.where(cached, file, 0).astype(np.uint32),
        "index": _table_column(f.get("index", np.zeros(n, np.uint64)), 'folios["index"]', np.uint64, n),
        "dirty": _table_column(f.get("dirty", np.zeros(n, bool)), 'folios["dirty"]', np.bool_, n),
    }
    for k in ("partially_mapped", "maybe_shared"):
        out[k] = None if f.get(k) is None else _table_column(f[k], f'folios["{k}"]', np.bool_, n)
    out["mm_ids"] = None if f.get("mm_ids") is None else _table_column(f["mm_ids"], 'folios["mm_ids"]', np.uint32, n, 2)
    out["mm_id_mapcounts"] = (None if f.get("mm_id_mapcounts") is None else
                              _table_column(f["mm_id_mapcounts"], 'folios["mm_id_mapcounts"]', np.int32, n, 2))
    return out


def _vma_arg(v: object, name: str, page_size: int) -> dict[str, Any]:
    d = {**_VMA_DEFAULTS, **_keys(v, name, ("start", "ptes", *_VMA_DEFAULTS), ("start", "ptes"))}
    pmds = []
    for j, pair in enumerate(_list(d["pmds"], f'{name}["pmds"]')):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f'{name}["pmds"][{j}] must be an (address, PMD entry) pair')
        pmds.append((_int_arg(pair[0], f'{name}["pmds"][{j}] address'), _int_arg(pair[1], f'{name}["pmds"][{j}] entry')))
    ptes = _pte_array(d["ptes"], f'{name}["ptes"]')
    start = _int_arg(d["start"], f'{name}["start"]')
    if d["end"] is not None and _int_arg(d["end"], f'{name}["end"]') != start + len(ptes) * page_size:
        raise ValueError(f'{name}: end {d["end"]:#x} does not match start {start:#x} plus {len(ptes)} PTEs')
    return {
        "start": start, "ptes": ptes, "prot": _str_arg(d["prot"], f'{name}["prot"]'),
        "shared": _bool_arg(d["shared"], f'{name}["shared"]'),
        "file": None if d["file"] is None else _int_arg(d["file"], f'{name}["file"]', 32),
        "offset": parse_size(d["offset"], f'{name}["offset"]'),
        **{k: _bool_arg(d[k], f'{name}["{k}"]') for k in ("vm_softdirty", "uffd_wp", "uffd_event_fork", "dontfork", "wipeonfork")},
        "anon_vma": _int_arg(d["anon_vma"], f'{name}["anon_vma"]', 32),
        "mthp": None if d["mthp"] is None else _sizes(d["mthp"], f'{name}["mthp"]'),
        **{k: _bool_arg(d[k], f'{name}["{k}"]') for k in ("hugepage", "nohugepage", "pmd")},
        "pmds": pmds,
    }


def _process_arg(p: object, k: int, page_size: int) -> dict[str, Any]:
    name = f"processes[{k}]"
    d = _keys(p, name, _PROCESS_KEYS)
    if "pid" in d and _int_arg(d["pid"], f'{name}["pid"]', 32) != k + 1:
        raise ValueError(f"{name} has pid {d['pid']}, but process {k} of the list gets pid {k + 1}")
    vmas = _list(d.get("vmas", []), f'{name}["vmas"]')
    return {
        "vmas": [_vma_arg(v, f'{name}["vmas"][{i}]', page_size) for i, v in enumerate(vmas)],
        "exited": _bool_arg(d.get("exited", False), f'{name}["exited"]'),
        "has_pinned": _bool_arg(d.get("has_pinned", False), f'{name}["has_pinned"]'),
        "next_mmap": None if d.get("next_mmap") is None else _int_arg(d["next_mmap"], f'{name}["next_mmap"]'),
        "thp_disable": _int_arg(d.get("thp_disable", 0), f'{name}["thp_disable"]', 32),
    }



class _Backend(Protocol):
    """The low-level API both the Rust core and the reference implement."""

    page_size: int

    def spawn(self) -> int: ...
    def state(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Mapping:
    """One mmap: its process, start address and length in bytes."""

    process: "Process"
    start: int
    length: int

    def __post_init__(self) -> None:
        _int_arg(self.start, "start")
        _int_arg(self.length, "length")

    @property
    def end(self) -> int:
        return self.start + self.length

    def page(self, i: int) -> int:
        """Address of page ``i`` of the mapping."""
        i = _int_arg(i, "i")
        if not i < self.length // self.process.sim.page_size:
            raise ValueError(f"page {i} is outside the mapping's {self.length // self.process.sim.page_size} pages")
        return self.start + i * self.process.sim.page_size


@dataclass(frozen=True)
class Pin:
    """A FOLL_PIN of a user range: what a device doing DMA into it sees."""

    sim: "Simulation"
    id: int

    def __post_init__(self) -> None:
        _int_arg(self.id, "id", 32)

    def read(self, index: int = 0) -> int:
        """What a device reading page ``index`` of the pin sees (a content token)."""
        return self.sim._b.pin_read(self.id, _int_arg(index, "index"))

    def write(self, index: int = 0) -> int:
        """A device write (DMA) into page ``index`` of a FOLL_WRITE pin; returns the token."""
        return self.sim._b.pin_write(self.id, _int_arg(index, "index"))

    def unpin(self) -> None:
        """``unpin_user_pages()``: drops the pin's references."""
        self.sim._b.unpin(self.id)


def _readonly(a: np.ndarray) -> np.ndarray:
    """A copy of `a` over immutable bytes, so that, as with the Rust backend's views,
    ``flags.writeable = True`` raises too."""
    a = np.ascontiguousarray(a)
    return np.frombuffer(a.tobytes(), a.dtype).reshape(a.shape)


class MemoryArrays:
    """The simulation's per-pfn arrays, indexed by pfn: ``order`` (uint8, 255 = free),
    ``flags`` (uint8, the model's page flags), ``mapcount`` (int32, mappings of the page: the
    kernel's ``_mapcount + 1``), ``refcount`` (int32, ``folio->_refcount`` on a folio's first
    page, 0 on tail pages), ``token`` (uint32, page contents).

    With the Rust backend each is a read-only view of the simulation's own memory, O(1) to
    obtain at any size, which follows every later step (see ``docs/views.md``); the
    reference backend gives read-only copies."""

    FIELDS = ("order", "flags", "mapcount", "refcount", "token")

    def __init__(self, sim: "Simulation"):
        self._sim = sim

    def __getattr__(self, name: str) -> np.ndarray:
        if name not in MemoryArrays.FIELDS:
            raise AttributeError(f"no memory array {name!r}; known: {', '.join(MemoryArrays.FIELDS)}")
        if self._sim.backend == "reference":
            return _readonly(np.array(self._sim.state()[name]))
        return self._sim._b.memory_array(name)


class Process:
    """A simulated process (its mm). Addresses are bytes; sizes take ints or ``"64K"``-style strings.

    Every argument is checked here, the same way for both backends: integers must be ints in
    ``0 .. 2**64-1`` (a ValueError naming the argument otherwise; a TypeError for floats,
    bools and strings), flags bools, names strings.
    """

    def __init__(self, sim: "Simulation", pid: int):
        self.sim = sim
        self.pid = _int_arg(pid, "pid", 32)

    def __repr__(self) -> str:
        return f"Process(pid={self.pid})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Process) and other.sim is self.sim and other.pid == self.pid

    def __hash__(self) -> int:
        return hash((id(self.sim), self.pid))

    def mmap(self, length: int | str, prot: str = "rw", shared: bool = False, *, file: int | None = None,
             offset: int | str = 0, mthp: int | str | Iterable[int | str] | None = None,
             addr: int | None = None, uffd_wp: bool = False, uffd_event_fork: bool = False,
             pmd: bool = False) -> Mapping:
        """``mmap()``: anonymous private by default. Faults choose folio sizes by the THP policy
        (``Simulation.set_thp_policy``, ``madvise(..., "hugepage")``, ``prctl_thp_disable``),
        mapping PMD THPs with one PMD where the policy allows the PMD size; ``mthp``, a size or
        a list of sizes (``[]`` for pages only), overrides the sysfs controls for this mapping
        (a model shortcut; a "2M" in the list is mapped by PTEs at fault: a PTE-mapped THP).
        ``pmd=True``: faults map PMD THPs where a whole aligned PMD range lies in the mapping
        and its page table is empty, whatever the policy (the huge zero page on a read fault);
        they are split into PTEs by a partial munmap, mprotect or MADV_DONTNEED."""
        n = parse_size(length, "length")
        prot = _str_arg(prot, "prot")
        shared = _bool_arg(shared, "shared")
        file = None if file is None else _int_arg(file, "file", 32)
        offset_b = parse_size(offset, "offset")
        sizes = None if mthp is None else _sizes(mthp, "mthp")
        addr = None if addr is None else _int_arg(addr, "addr")
        uffd_wp = _bool_arg(uffd_wp, "uffd_wp")
        uffd_event_fork = _bool_arg(uffd_event_fork, "uffd_event_fork")
        pmd = _bool_arg(pmd, "pmd")
        start = self.sim._b.mmap(self.pid, n, prot, shared, file, offset_b, sizes, addr,
                                 uffd_wp, uffd_event_fork, pmd)
        return Mapping(self, start, n)

    def touch(self, addr: int, length: int | str, write: bool = False) -> None:
        """Reads or writes every page of the range (faulting as the kernel would)."""
        self.sim._b.touch(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"),
                          _bool_arg(write, "write"))

    def read(self, addr: int) -> int:
        """The content token this process sees at ``addr`` (0 = zero-filled)."""
        return self.sim._b.read(self.pid, _int_arg(addr, "addr"))

    def write(self, addr: int) -> int:
        """Writes the page at ``addr``; returns the new token."""
        return self.sim._b.write(self.pid, _int_arg(addr, "addr"))

    def fork(self) -> "Process":
        """``fork()``: the child, with the page tables the kernel profile copies (batched from 6.9)."""
        return Process(self.sim, self.sim._b.fork(self.pid))

    def munmap(self, addr: int, length: int | str) -> None:
        """``munmap()``: VMAs split at the ends, zapped and removed; holes are allowed."""
        self.sim._b.munmap(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"))

    def mprotect(self, addr: int, length: int | str, prot: str) -> None:
        """``mprotect()`` of an entirely mapped range; ``prot`` is letters of "rwx" or "none"."""
        self.sim._b.mprotect(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"),
                             _str_arg(prot, "prot"))

    def madvise(self, addr: int, length: int | str, advice: str) -> None:
        """``advice``: "dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork", "hugepage"
        (VM_HUGEPAGE), "nohugepage" (VM_NOHUGEPAGE)."""
        self.sim._b.madvise(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"),
                            _str_arg(advice, "advice"))

    def prctl_thp_disable(self, disable: bool = True, *, except_advised: bool = False) -> None:
        """``prctl(PR_SET_THP_DISABLE, disable)``: no THP for any fault of this process, in its
        existing and later mappings, until cleared; its children inherit it.
        ``except_advised=True`` (PR_THP_DISABLE_EXCEPT_ADVISED, 6.18+) spares MADV_HUGEPAGE
        mappings."""
        self.sim._b.prctl_thp_disable(self.pid, _bool_arg(disable, "disable"),
                                      _bool_arg(except_advised, "except_advised"))

    @property
    def thp_disable(self) -> int:
        """``prctl(PR_GET_THP_DISABLE)``: 0, 1, or 3 (disabled except MADV_HUGEPAGE mappings)."""
        return int(self.sim._b.prctl_get_thp_disable(self.pid))

    def pin(self, addr: int, length: int | str, *, write: bool = True, longterm: bool = True) -> Pin:
        """``pin_user_pages(FOLL_PIN [| FOLL_WRITE] [| FOLL_LONGTERM])``."""
        return Pin(self.sim, self.sim._b.pin(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"),
                                             _bool_arg(write, "write"), _bool_arg(longterm, "longterm")))

    def exit(self) -> None:
        """``exit()``: the address space is torn down (pins stay until unpinned)."""
        self.sim._b.exit(self.pid)

    def uffd_writeprotect(self, addr: int, length: int | str, enable: bool = True) -> None:
        """``UFFDIO_WRITEPROTECT`` on a range mapped with ``uffd_wp=True``; a write to a protected
        page then raises ``AccessFault`` (it would wait for the monitor)."""
        self.sim._b.uffd_writeprotect(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"),
                                      _bool_arg(enable, "enable"))

    def clear_soft_dirty(self) -> None:
        """``echo 4 > /proc/<pid>/clear_refs``."""
        self.sim._b.clear_soft_dirty(self.pid)

    def pagemap(self, addr: int, length: int | str) -> np.ndarray:
        """/proc/<pid>/pagemap entries (uint64) of the range, as root reads them."""
        return np.asarray(self.sim._b.pagemap(self.pid, _int_arg(addr, "addr"), parse_size(length, "length")),
                          dtype=np.uint64)

    def ptes(self, mapping: Mapping | int) -> np.ndarray:
        """The PTE array (uint64, the layout's encoding) of the VMA holding the mapping's start
        (or an address). With the Rust backend: a read-only view of the simulation's page
        table, O(1) at any size, that follows every later step while the VMA lives (see
        ``docs/views.md``); the reference backend gives a read-only copy."""
        addr = mapping.start if isinstance(mapping, Mapping) else _int_arg(mapping, "mapping")
        a = self.sim._b.ptes(self.pid, addr)
        return _readonly(np.array(a, dtype=np.uint64)) if self.sim.backend == "reference" else a

    def vmas(self) -> list[dict[str, Any]]:
        """The VMAs, as dicts (start, end, prot, shared, file, offset, flags, ``hugepage`` and
        ``nohugepage`` (VM_HUGEPAGE / VM_NOHUGEPAGE), ``mthp``: the explicit size list, or None
        where the THP policy applies, ``pmd``), each with ``anon_huge_pages``: smaps'
        AnonHugePages in bytes (anonymous memory mapped by huge PMDs)."""
        out = [dict(v) for v in self.sim._b.vmas(self.pid)]
        for v, huge in zip(out, self.sim._b.anon_huge_pages(self.pid)):
            v["anon_huge_pages"] = int(huge)
        return out

    def pmds(self, mapping: Mapping | int) -> list[tuple[int, int]]:
        """The huge PMDs of the VMA holding the mapping's start (or an address): (address, PMD
        entry) pairs; the entry decodes like a PTE (``Simulation.decode_pte``)."""
        addr = mapping.start if isinstance(mapping, Mapping) else _int_arg(mapping, "mapping")
        return [(int(a), int(e)) for a, e in self.sim._b.pmds(self.pid, addr)]

    def rss(self) -> dict[str, int]:
        """The rss counters in pages: ``{"file", "anon", "shmem"}``."""
        return dict(self.sim._b.rss(self.pid))


#: Columns of the state's two-dimensional tables (see ``Simulation.state``).
_TABLE_WIDTHS = {"large": 9, "free_blocks": 2, "mms": 9, "vmas": 18, "files": 4, "pins": 3, "pmd_keys": 2}


class _Serialised:
    """The reference backend behind a lock, so that threads sharing a simulation take turns as
    they do on the Rust backend (whose binding holds a mutex); a ``MemoryError`` of the host
    becomes ``OutOfMemoryError(host=True)``, as the Rust backend raises it."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self._lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._backend, name)
        if not callable(attr):
            with self._lock:
                return getattr(self._backend, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            with self._lock:
                try:
                    out = attr(*args, **kwargs)
                except MemoryError as e:
                    if isinstance(e, OutOfMemoryError):
                        raise
                    raise OutOfMemoryError(f"the host cannot allocate what the model needs ({e or 'no memory'})",
                                           True) from None
            return _Serialised(out) if type(out) is type(self._backend) else out

        return call


class Simulation:
    """A simulated machine: ``arch`` (a PTE layout), ``kernel`` ("6.8" … newest; by default the
    newest, ``pb.NEWEST_KERNEL``), ``memory`` of RAM.

    ``batching=False`` runs the same kernel with fork, zap and mprotect per PTE, the
    baseline that batching must equal. ``fragmentation`` maps folio sizes to the fraction of
    their allocations that fail as if memory were fragmented (``{"64K": 0.3}``).
    """

    def __init__(self, arch: str = "x86-64", kernel: str = _core.KERNEL_VERSIONS[-1], memory: int | str = "1GiB", *,
                 seed: int = 0, batching: bool = True, fragmentation: dict[int | str, float] | None = None,
                 backend: str = "rust"):
        arch, kernel = _str_arg(arch, "arch"), _str_arg(kernel, "kernel")
        nbytes, seed = parse_size(memory, "memory"), _int_arg(seed, "seed")
        batching = _bool_arg(batching, "batching")
        if fragmentation is not None and not isinstance(fragmentation, dict):
            raise TypeError(f"fragmentation must be a dict of folio size to probability, "
                            f"not {type(fragmentation).__name__}")
        if backend == "rust":
            self._b: Any = _core.Simulation(arch, kernel, nbytes, seed, batching)
        elif backend == "reference":
            from .reference.sim import Simulation as RefSimulation

            self._b = _Serialised(RefSimulation(arch, kernel, nbytes, seed, batching))
        else:
            raise ValueError(f"backend must be 'rust' or 'reference', not {backend!r}")
        self.arch, self.kernel, self.batching, self.backend = arch, kernel, batching, backend
        self._set_fragmentation(fragmentation)

    def _set_fragmentation(self, fragmentation: dict[int | str, float] | None) -> None:
        for size, p in (fragmentation or {}).items():
            n = parse_size(size, "fragmentation")
            order = n.bit_length() - 1 - (self.page_size.bit_length() - 1)
            if n != self.page_size << max(order, 0) or order < 1:
                raise ValueError(f"fragmentation size {size!r} is not a large folio size")
            if isinstance(p, (bool, np.bool_)) or not isinstance(p, (int, float, np.integer, np.floating)):
                raise TypeError(f"fragmentation[{size!r}] must be a probability, not {type(p).__name__}")
            try:
                prob = float(p)
            except OverflowError:
                raise ValueError(f"fragmentation[{size!r}] must be a probability in [0, 1], not {_int_text(int(p))}") from None
            self._b.set_fallback(order, prob)

    @classmethod
    def from_snapshot(cls, snap: Any, kernel: str | None = None, **kw: Any) -> tuple["Simulation", dict[int, Process]]:
        """The simulated state of a captured snapshot (``ptebatch.replay.from_snapshot``): returns
        the simulation and a map from captured pid to simulated process. ``snap`` is a
        ``ptebatch.snapshot.Snapshot`` or the path of a snapshot file."""
        from .replay import from_snapshot
        from .snapshot import Snapshot

        if isinstance(snap, (str, os.PathLike)):
            snap = Snapshot.load(snap)
        elif not isinstance(snap, Snapshot):
            raise TypeError(f"snap must be a ptebatch.snapshot.Snapshot or the path of a snapshot file, "
                            f"not {type(snap).__name__}")
        if kernel is not None:
            _str_arg(kernel, "kernel")
        return from_snapshot(snap, kernel, **kw)

    @classmethod
    def from_arrays(cls, arch: str = "x86-64", kernel: str = _core.KERNEL_VERSIONS[-1], memory: int | str = "1GiB", *,
                    folios: dict[str, Any], processes: list[dict[str, Any]], files: list[dict[str, Any]] = (),  # type: ignore[assignment]
                    pins: list[dict[str, Any]] = (), pages: dict[str, Any] | None = None,  # type: ignore[assignment]
                    next_token: int | None = None, next_anon_vma: int | None = None, seed: int = 0,
                    batching: bool = True, fragmentation: dict[int | str, float] | None = None,
                    thp_policy: dict[str, Any] | None = None, shmem_policy: dict[str, Any] | None = None,
                    fault_around_bytes: int | str | None = None, backend: str = "rust") -> "Simulation":
        """A simulation in the state the arrays describe, every counter rebuilt from them and
        ``check()`` run (docs/from-arrays.md): the general form of replay.

        ``folios``: a table of equal-length columns, one row per folio: ``pfn`` (first page),
        ``order``, ``kind`` ("anon", "file", "shmem"), ``file`` (id, -1 for anon), ``index``
        (file page of the first page), ``dirty``; optionally ``partially_mapped``,
        ``maybe_shared``, ``mm_ids`` and ``mm_id_mapcounts`` (two columns) where history, not
        the page tables, decided them. ``processes``: one dict per process (pid = position + 1)
        with ``vmas``, each a dict with ``start`` (bytes), ``ptes`` (uint64, the layout's
        encoding: exactly what ``Process.ptes()`` returns), and optionally the other keys
        ``Process.vmas()`` lists (``mthp``: an explicit size list, or None to follow the THP
        policy; ``hugepage`` / ``nohugepage``), and ``thp_disable`` (PR_GET_THP_DISABLE's
        0, 1 or 3). ``files``: ``{"size", "folio_size", "shmem", "huge", "anon"}`` per file id
        (``huge``: a tmpfs file's ``huge=``; ``anon``: shared anonymous memory, under the shmem
        controls). ``thp_policy`` / ``shmem_policy`` (as :attr:`thp_policy` and
        :attr:`shmem_policy` read them) and ``fault_around_bytes`` set the controls.
        ``pins``: ``{"pfns", "write", "longterm", "active"}``. ``pages``: per-pfn ``token``
        (uint32) and ``anon_exclusive`` (bool; otherwise an anonymous page mapped exactly
        once is exclusive). Bad input raises TypeError/ValueError (or InvariantError from
        ``check()``) and builds nothing. Page tables are borrowed, copied once.
        """
        arch, kernel = _str_arg(arch, "arch"), _str_arg(kernel, "kernel")
        nbytes, seed = parse_size(memory, "memory"), _int_arg(seed, "seed")
        batching = _bool_arg(batching, "batching")
        if backend not in ("rust", "reference"):
            raise ValueError(f"backend must be 'rust' or 'reference', not {backend!r}")
        if fragmentation is not None and not isinstance(fragmentation, dict):
            raise TypeError(f"fragmentation must be a dict of folio size to probability, "
                            f"not {type(fragmentation).__name__}")
        page_size = _core.layout(arch).page_size if arch in _core.LAYOUT_NAMES else 4096
        file_args = []
        for i, fl in enumerate(_list(files, "files")):
            d = _keys(fl, f"files[{i}]", _FILE_KEYS, ("size",))
            file_args.append({"size": parse_size(d["size"], f'files[{i}]["size"]'),
                              "folio_size": parse_size(d.get("folio_size", page_size), f'files[{i}]["folio_size"]'),
                              "shmem": _bool_arg(d.get("shmem", False), f'files[{i}]["shmem"]'),
                              "huge": None if d.get("huge") is None else _str_arg(d["huge"], f'files[{i}]["huge"]'),
                              "anon": _bool_arg(d.get("anon", False), f'files[{i}]["anon"]')})
        for name, pol in (("thp_policy", thp_policy), ("shmem_policy", shmem_policy)):
            if pol is not None:
                _keys(pol, name, ("enabled", "sizes"))
        folio_args = _folio_table(folios)
        proc_args = [_process_arg(p, k, page_size) for k, p in enumerate(_list(processes, "processes"))]
        pin_args = []
        for i, pn in enumerate(_list(pins, "pins")):
            d = _keys(pn, f"pins[{i}]", _PIN_KEYS, ("pfns",))
            pin_args.append({"pfns": _table_column(d["pfns"], f'pins[{i}]["pfns"]', np.uint64, None),
                             **{k: _bool_arg(d.get(k, True), f'pins[{i}]["{k}"]')
                                for k in ("write", "longterm", "active")}})
        pg = _keys({} if pages is None else pages, "pages", ("token", "anon_exclusive"))
        token = None if pg.get("token") is None else _table_column(pg["token"], 'pages["token"]', np.uint32, None)
        excl = (None if pg.get("anon_exclusive") is None else
                _table_column(pg["anon_exclusive"], 'pages["anon_exclusive"]', np.bool_, None))
        nt = None if next_token is None else _int_arg(next_token, "next_token", 32)
        na = None if next_anon_vma is None else _int_arg(next_anon_vma, "next_anon_vma", 32)
        args = (arch, kernel, nbytes, seed, batching, file_args, folio_args, proc_args, pin_args, token, excl, nt, na)
        if backend == "rust":
            b: Any = _core.Simulation.from_arrays(*args)
        else:
            from .reference.sim import Simulation as RefSimulation

            b = _Serialised(RefSimulation.from_arrays(*args))
        sim = cls.__new__(cls)
        sim._b = b
        sim.arch, sim.kernel, sim.batching, sim.backend = arch, kernel, batching, backend
        sim._set_fragmentation(fragmentation)
        if thp_policy is not None:
            sim.set_thp_policy(thp_policy.get("enabled"), thp_policy.get("sizes") or {})
        if shmem_policy is not None:
            sim.set_shmem_policy(shmem_policy.get("enabled"), shmem_policy.get("sizes") or {})
        if fault_around_bytes is not None:
            sim.fault_around_bytes = parse_size(fault_around_bytes, "fault_around_bytes")
        return sim

    def to_arrays(self) -> dict[str, Any]:
        """The state as the arguments of :meth:`from_arrays`:
        ``Simulation.from_arrays(**sim.to_arrays())`` rebuilds a simulation whose ``state()``
        equals this one's. The page tables are views into one copy of all of them."""
        s = self.state()
        for k in ("ptes", "file_cache"):  # exact: a list of Python ints may not become uint64
            s[k] = np.asarray(self._b.state()[k], dtype=np.uint64) if self.backend == "reference" else s[k]
        page, n = self.page_size, self.nr_pages
        order, flags = s["order"].astype(np.int64), s["flags"]
        pfns = np.arange(n, dtype=np.uint64)
        alloc = order != _FREE_ORDER
        heads = np.flatnonzero(alloc & (pfns % (np.uint64(1) << np.where(alloc, order, 0).astype(np.uint64)) == 0))
        hf = flags[heads]
        kind = np.where(hf & _PG_ANON, "anon", np.where(hf & _PG_SWAPBACKED, "shmem", "file"))
        # The page cache: which file page each cached pfn is.
        file_of = np.full(n, -1, np.int64)
        index_of = np.zeros(n, np.uint64)
        cache, at = s["file_cache"], 0
        pmd_pages = 1 << (len(s["shmem"]) - 2)  # "shmem": the top level, then orders 0 ..= PMD order
        for fid, (nr, _, shmem, _) in enumerate(s["files"]):
            nr = -(-nr // pmd_pages) * pmd_pages if shmem else nr  # File::cache_len
            c = cache[at:at + nr]
            hit = np.flatnonzero(c != np.uint64((1 << 64) - 1))
            file_of[c[hit].astype(np.int64)] = fid
            index_of[c[hit].astype(np.int64)] = hit
            at += nr
        mm_ids = np.zeros((len(heads), 2), np.uint32)
        mm_counts = np.zeros((len(heads), 2), np.int32)
        if len(s["large"]):
            k = np.searchsorted(heads, s["large"][:, 0])
            mm_ids[k] = s["large"][:, 5:7]
            mm_counts[k] = s["large"][:, 7:9] + 1
        folios = {"pfn": heads.astype(np.uint64), "order": order[heads].astype(np.uint8), "kind": kind,
                  "file": file_of[heads], "index": index_of[heads], "dirty": (hf & _PG_DIRTY) != 0,
                  "partially_mapped": (hf & _PG_PARTIALLY_MAPPED) != 0,
                  "maybe_shared": (hf & _PG_MAYBE_SHARED) != 0, "mm_ids": mm_ids,
                  "mm_id_mapcounts": mm_counts}
        shift = page.bit_length() - 1
        vma_rows, ptes = s["vmas"], s["ptes"]
        ends = np.cumsum(vma_rows[:, 2]) if len(vma_rows) else np.zeros(0, np.int64)
        processes: list[dict[str, Any]] = []
        for pid, _mm_id, _a, _b, _c, has_pinned, exited, next_vpn, thp_disable in s["mms"].tolist():
            processes.append({"pid": pid, "exited": bool(exited), "has_pinned": bool(has_pinned),
                              "next_mmap": next_vpn << shift, "thp_disable": thp_disable, "vmas": []})
        huge: dict[int, list[tuple[int, int]]] = {}  # pid -> (first vpn, PMD entry)
        for (ppid, base), e in zip(np.asarray(s["pmd_keys"]).reshape(-1, 2).tolist(), np.asarray(s["pmds"], dtype=np.uint64).tolist()):
            huge.setdefault(ppid, []).append((base, e))
        for j, row in enumerate(vma_rows.tolist()):
            pid, start, nr, r, w, x, shared, fid, pgoff, sd, uwp, uef, dontfork, wipe, anon_vma, mthp, hp, nhp = row
            prot = "".join(c for c, on in zip("rwx", (r, w, x)) if on) or "none"
            end = int(ends[j])
            processes[pid - 1]["vmas"].append({
                "start": start << shift, "ptes": ptes[end - nr:end], "prot": prot, "shared": bool(shared),
                "file": None if fid < 0 else fid, "offset": pgoff << shift if fid >= 0 else 0,
                "vm_softdirty": bool(sd), "uffd_wp": bool(uwp), "uffd_event_fork": bool(uef),
                "dontfork": bool(dontfork), "wipeonfork": bool(wipe), "anon_vma": anon_vma,
                "mthp": [page << o for o in range(32) if mthp >> o & 1] if mthp else None,
                "hugepage": bool(hp), "nohugepage": bool(nhp), "pmd": bool(s["vma_pmd"][j]),
                "pmds": [(b << shift, e) for b, e in huge.get(pid, []) if start <= b < start + nr]})
        files = [{"size": nr * page, "folio_size": page << fo, "shmem": bool(sh), "anon": kind == 1,
                  "huge": _FILE_HUGE[kind - 2] if kind >= 2 else None} for nr, fo, sh, kind in s["files"].tolist()]
        pins = [{**p, "pfns": np.asarray(p["pfns"], dtype=np.uint64)} for p in self._b.pins()]
        fallback = self._b.fallback()
        return {"arch": self.arch, "kernel": self.kernel, "memory": n * page, "folios": folios,
                "processes": processes, "files": files, "pins": pins,
                "pages": {"token": s["token"].astype(np.uint32), "anon_exclusive": (flags & _PG_ANON_EXCLUSIVE) != 0},
                "next_token": int(s["next_token"]), "next_anon_vma": int(s["next_anon_vma"]),
                "seed": int(s["rng"]), "batching": self.batching,
                "fragmentation": {page << o: p for o, p in enumerate(fallback) if p > 0} or None,
                "thp_policy": self.thp_policy, "shmem_policy": self.shmem_policy,
                "fault_around_bytes": self.fault_around_bytes, "backend": self.backend}

    @classmethod
    def _wrap(cls, backend: Any, like: "Simulation") -> "Simulation":
        sim = cls.__new__(cls)
        sim._b = backend
        sim.arch, sim.kernel, sim.batching, sim.backend = like.arch, like.kernel, like.batching, like.backend
        return sim

    def __repr__(self) -> str:
        return (f"Simulation(arch={self.arch!r}, kernel={self.kernel!r}, memory={format_size(self.nr_pages * self.page_size)!r}, "
                f"batching={self.batching}, backend={self.backend!r})")

    @property
    def page_size(self) -> int:
        return int(self._b.page_size)

    @property
    def nr_pages(self) -> int:
        return int(self._b.nr_pages)

    @property
    def free_pages(self) -> int:
        return int(self._b.free_pages)

    @property
    def zero_pfn(self) -> int:
        return int(self._b.zero_pfn)

    def spawn(self) -> Process:
        """A new process with an empty address space."""
        return Process(self, self._b.spawn())

    def process(self, pid: int) -> Process:
        """The process ``pid`` (e.g. of a replayed snapshot)."""
        return Process(self, pid)

    def create_file(self, size: int | str, folio_size: int | str | None = None, *, shmem: bool = False,
                    huge: str | None = None) -> int:
        """A file, or with ``shmem=True`` a shmem (tmpfs) object, of ``size`` bytes; returns its id.

        ``folio_size`` (default: the page size) is the size of the folios the file's page cache
        is filled with: a regular file's readahead / large-folio size, or for a shmem object
        without ``huge`` a fixed size. ``huge`` ("never", "always", "within_size", "advise") is
        the ``huge=`` option of the tmpfs mount the object lives on: its folio sizes are then
        chosen at fault as mm/shmem.c chooses them (``set_shmem_policy`` sets the controls the
        kernel reads besides)."""
        fsize = self.page_size if folio_size is None else parse_size(folio_size, "folio_size")
        if huge is not None:
            _str_arg(huge, "huge")
        return self._b.create_file(parse_size(size, "size"), fsize, _bool_arg(shmem, "shmem"), huge)

    # ---- fault-around and the shmem controls --------------------------------------------------

    @property
    def fault_around_bytes(self) -> int:
        """``/sys/kernel/debug/fault_around_bytes``: read faults on file and shared mappings map
        the cached pages of this window around the fault (64K by default; the page size turns
        fault-around off). Settable to a power of two from the page size to a page table's worth."""
        return int(self._b.fault_around_bytes)

    @fault_around_bytes.setter
    def fault_around_bytes(self, value: int | str) -> None:
        n = parse_size(value, "fault_around_bytes")
        if isinstance(self._b, _Serialised):  # the reference: set on the wrapped object
            with self._b._lock:
                self._b._backend.fault_around_bytes = n
        else:
            self._b.fault_around_bytes = n

    @property
    def step_copy_limit(self) -> int:
        """The largest state, in host bytes, whose long steps (about a million pages or PTEs and
        more) run on a copy of the state, so that Ctrl-C or an exception from the
        :meth:`set_progress` callback abandons them whole. 64 MiB by default, a state of about
        8 GiB of simulated memory. A larger state runs its steps in place, so that no step needs
        twice the host memory; a stop asked meanwhile is raised when the step has finished (its
        changes stay). ``0`` runs every step in place; a step that may run out of simulated
        memory half-way runs on a copy whatever the limit. The reference backend ignores it."""
        if isinstance(self._b, _Serialised):
            return 0
        return int(self._b.step_copy_limit)

    @step_copy_limit.setter
    def step_copy_limit(self, value: int | str) -> None:
        n = parse_size(value, "step_copy_limit")
        if not isinstance(self._b, _Serialised):
            self._b.step_copy_limit = n

    def set_shmem_policy(self, enabled: str | None = None, sizes: dict[int | str, str] | None = None) -> None:
        """Sets the sysfs shmem THP controls: ``enabled`` is the top-level
        ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` (always, within_size, advise,
        never, deny, force); ``sizes`` maps folio sizes ("64K") to their
        ``hugepages-<size>kB/shmem_enabled`` (always, inherit, within_size, advise, never; kernels
        6.11+). Controls not named keep their values; the defaults are the kernel's (never, and
        "inherit" for the PMD size only). They decide the folio sizes of shared anonymous
        memory (MAP_SHARED|MAP_ANONYMOUS, memfd); "deny" and "force" also bind tmpfs mounts."""
        if enabled is not None:
            _str_arg(enabled, "enabled")
        if sizes is not None and not isinstance(sizes, dict):
            raise TypeError(f"sizes must be a dict of folio size to value, not {type(sizes).__name__}")
        pairs = [(parse_size(k, "sizes key"), _str_arg(v, f"sizes[{k!r}]")) for k, v in (sizes or {}).items()]
        self._b.set_shmem_policy(enabled, pairs)

    @property
    def shmem_policy(self) -> dict[str, Any]:
        """The shmem controls: ``{"enabled": str, "sizes": {bytes: str}}`` (sizes from 6.11)."""
        d = self._b.shmem_policy
        return {"enabled": d["enabled"], "sizes": {int(k): v for k, v in d["sizes"].items()}}

    def set_thp_policy(self, enabled: str | None = None, sizes: dict[int | str, str] | None = None) -> None:
        """Writes the simulated sysfs THP controls for anonymous memory: ``enabled`` is the
        top-level ``transparent_hugepage/enabled`` ("always", "madvise", "never"); ``sizes`` maps
        folio sizes to their ``hugepages-<size>kB/enabled`` ("always", "inherit", "madvise",
        "never"). Controls not named keep their value; a bad value changes none. The default is
        the kernel's: the PMD size "inherit", the other sizes "never", the top level "madvise"."""
        if enabled is not None:
            enabled = _str_arg(enabled, "enabled")
        if sizes is None:
            sizes = {}
        if not isinstance(sizes, dict):
            raise TypeError(f"sizes must be a dict of folio size to mode such as {{'64K': 'always'}}, "
                            f"not {type(sizes).__name__}")
        pairs = [(parse_size(k, f"sizes key {k!r}"), _str_arg(v, f"sizes[{k!r}]")) for k, v in sizes.items()]
        self._b.set_thp_policy(enabled, pairs)

    @property
    def thp_policy(self) -> dict[str, Any]:
        """The simulated sysfs THP controls, in ``set_thp_policy``'s shape:
        ``{"enabled": "madvise", "sizes": {"16K": "never", ..., "2M": "inherit"}}``."""
        p = self._b.thp_policy
        return {"enabled": p["enabled"], "sizes": {format_size(int(s)): m for s, m in sorted(p["sizes"].items())}}

    def check(self) -> None:
        """Recomputes every invariant from the page tables; raises ``InvariantError`` naming the rule."""
        self._b.check()

    @property
    def stats(self) -> dict[str, Any]:
        """Counters since the start."""
        return dict(self._b.stats)

    @property
    def last_stats(self) -> dict[str, Any]:
        """Counters of the last operation."""
        return dict(self._b.last_stats)

    def page(self, pfn: int) -> dict[str, Any]:
        """One page's state with the kernel's meaning of every count (mapcount, refcount of its
        folio, anon_exclusive, order, large/entire mapcount, MM-ID slots, ...)."""
        return dict(self._b.page(_int_arg(pfn, "pfn")))

    @property
    def memory(self) -> "MemoryArrays":
        """Per-pfn arrays (copies): ``order`` (255 = free), ``flags``, ``mapcount``, ``refcount``,
        ``token``."""
        return MemoryArrays(self)

    def kpagecount(self, pfn: int) -> int:
        """/proc/kpagecount of ``pfn``: the page's mapcount as the kernel reports it (PTE
        mappings plus the folio's huge PMD mappings)."""
        return self._b.kpagecount(_int_arg(pfn, "pfn"))

    def kpageflags(self, pfn: int) -> int:
        """/proc/kpageflags of ``pfn``, the bits the model knows: KPF_ANON, KPF_MMAP,
        KPF_COMPOUND_HEAD / KPF_COMPOUND_TAIL and KPF_THP (large folios), KPF_ZERO_PAGE."""
        return self._b.kpageflags(_int_arg(pfn, "pfn"))

    def state(self) -> dict[str, Any]:
        """The whole state in canonical form (numpy arrays and ints)."""
        out = {}
        for k, v in self._b.state().items():
            if isinstance(v, (list, np.ndarray)):
                v = np.asarray(v)
                if k in _TABLE_WIDTHS:
                    v = v.reshape(-1, _TABLE_WIDTHS[k])
            out[k] = v
        return out

    def clone(self) -> "Simulation":
        """An independent copy, for A/B experiments."""
        return Simulation._wrap(self._b.clone(), self)

    def set_progress(self, callback: Callable[[int, int], object] | None) -> None:
        """Calls ``callback(done, total)`` about every 50 ms while a long step runs (work in
        pages or PTEs). An exception it raises abandons the step, which leaves the state
        unchanged, and propagates; so does Ctrl-C. ``None`` removes it. The reference backend
        runs Python code throughout and never calls it."""
        if self.backend == "rust":
            self._b.set_progress(callback)

    def state_equal(self, other: "Simulation") -> bool:
        """Whether the two simulations are in exactly the same state (see ``state_diff``)."""
        if not isinstance(other, Simulation):
            raise TypeError(f"state_equal compares with a Simulation, not {type(other).__name__}")
        return state_diff(self.state(), other.state()) == []


def state_diff(a: dict[str, Any], b: dict[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """Names of the state fields that differ (with a short description), skipping ``ignore``."""
    out = []
    skip = set(ignore)
    for key in sorted(set(a) | set(b)):
        if key in skip:
            continue
        if key not in a or key not in b:
            out.append(f"{key}: present on one side only")
            continue
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.shape != y.shape:
            out.append(f"{key}: shape {x.shape} vs {y.shape}")
        elif not np.array_equal(x, y):
            idx = np.argwhere(x != y)
            out.append(f"{key}: {len(idx)} element(s) differ, first at {tuple(idx[0])}: {x[tuple(idx[0])]} vs {y[tuple(idx[0])]}")
    return out


__all__ = ["Simulation", "Process", "Mapping", "Pin", "parse_size", "format_size", "state_diff", "FOLIO_KINDS"]

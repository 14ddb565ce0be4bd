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


class MemoryArrays:
    """Numpy copies of the simulation's per-pfn arrays, read on attribute access."""

    FIELDS = ("order", "flags", "mapcount", "refcount", "token")

    def __init__(self, sim: "Simulation"):
        self._sim = sim

    def __getattr__(self, name: str) -> np.ndarray:
        if name not in MemoryArrays.FIELDS:
            raise AttributeError(f"no memory array {name!r}; known: {', '.join(MemoryArrays.FIELDS)}")
        return np.asarray(self._sim.state()[name]) if self._sim.backend == "reference" else self._sim._b.memory_array(name)


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
             offset: int | str = 0, mthp: int | str | Iterable[int | str] = (), addr: int | None = None,
             uffd_wp: bool = False, uffd_event_fork: bool = False, pmd: bool = False) -> Mapping:
        """``mmap()``: anonymous private by default; ``mthp`` is the enabled anonymous folio size,
        or a list of them (a "2M" in the list is mapped by PTEs at fault: a PTE-mapped THP).
        ``pmd=True``: faults map PMD THPs where a whole aligned PMD range lies in the mapping
        and its page table is empty, as with THP ``enabled=always`` (the huge zero page on a
        read fault); they are split into PTEs by a partial munmap, mprotect or MADV_DONTNEED."""
        n = parse_size(length, "length")
        prot = _str_arg(prot, "prot")
        shared = _bool_arg(shared, "shared")
        file = None if file is None else _int_arg(file, "file", 32)
        offset_b = parse_size(offset, "offset")
        sizes = _sizes(mthp, "mthp")
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
        """``advice``: "dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork"."""
        self.sim._b.madvise(self.pid, _int_arg(addr, "addr"), parse_size(length, "length"),
                            _str_arg(advice, "advice"))

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
        """A copy of the PTE array of the VMA holding the mapping's start (or an address)."""
        addr = mapping.start if isinstance(mapping, Mapping) else _int_arg(mapping, "mapping")
        return np.asarray(self.sim._b.ptes(self.pid, addr), dtype=np.uint64)

    def vmas(self) -> list[dict[str, Any]]:
        """The VMAs, as dicts (start, end, prot, shared, file, offset, flags, mthp sizes, pmd),
        each with ``anon_huge_pages``: smaps' AnonHugePages in bytes (anonymous memory mapped
        by huge PMDs)."""
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
_TABLE_WIDTHS = {"large": 9, "free_blocks": 2, "mms": 8, "vmas": 16, "files": 3, "pins": 3, "pmd_keys": 2}


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

    def create_file(self, size: int | str, folio_size: int | str = 4096, *, shmem: bool = False) -> int:
        """A file (or shmem object) whose page cache uses folios of ``folio_size``; returns its id."""
        return self._b.create_file(parse_size(size, "size"), parse_size(folio_size, "folio_size"),
                                   _bool_arg(shmem, "shmem"))

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


__all__ = ["Simulation", "Process", "Mapping", "Pin", "parse_size", "format_size", "state_diff"]

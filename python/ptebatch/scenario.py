"""Scenario files: a machine, processes, VMAs and a sequence of steps, in TOML, run once per
kernel (``ptebatch run SCENARIO.toml``; the format and the output fields: docs/scenarios.md).

>>> sc = load("examples/fork-munmap-matrix.toml")          # doctest: +SKIP
>>> rows = run(sc, kernels=["6.8", "7.0"])                  # doctest: +SKIP

:func:`load` reads and checks the whole file (every case of every parameter sweep) before
anything runs; a mistake raises :class:`ScenarioError` naming the file, the table and the key.
:func:`run` gives a list of rows (plain dicts with the fields of :data:`ROW_FIELDS`): one per
step executed and one total per run, per kernel, per parameter case and per batching mode.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import math
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NoReturn, Sequence

import numpy as np

from . import KERNEL_VERSIONS, LAYOUT_NAMES, NEWEST_KERNEL
from .simulation import Simulation, format_size, parse_size
from .study import check_folio_size, folio_sizes, pmd_size

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python < 3.11
    import tomli as tomllib


class ScenarioError(ValueError):
    """A scenario file that cannot be read or is not valid: the message is one line naming the
    file, the table and the key, and what was expected."""


#: Counters of ``Simulation.stats`` a row carries (the work of the step alone).
COUNTERS = ("refcount_atomics", "mapcount_updates", "rmap_calls", "pte_reads", "pte_writes",
            "tlb_flush_ranges", "tlb_flush_pages", "folio_pte_batch_calls", "batches", "pages_copied",
            "folios_allocated", "folios_freed", "faults", "cow_copies", "cow_reuses",
            "fork_eagain_retries", "pins", "deferred_splits", "pmd_copies", "pmd_zaps", "pmd_splits")

#: The fields of every result row, in this order (JSON keys, CSV columns).
ROW_FIELDS = ("scenario", "case", "kernel", "batching", "step", "iteration", "op", "process", "vma",
              "ptes", *COUNTERS, "batched_ptes", "free_pages", "pages_freed")

OPS = ("touch", "write", "read", "fork", "pin", "unpin", "munmap", "mprotect", "madvise", "exit",
       "check", "repeat")
ADVICE = ("dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork")
_PROT = re.compile(r"none|r?w?x?")
_PARAM_REF = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)(?:\s*([*/])\s*(\d+))?")

# Keys per table: required ones first, then optional ones.
_TOP = ("scenario", "machine", "params", "snapshot", "file", "process", "vma", "step")
_SCENARIO_KEYS = ((), ("name", "description"))
_MACHINE_KEYS = ((), ("arch", "kernels", "memory", "seed", "batching", "fragmentation"))
_SNAPSHOT_KEYS = (("path",), ("names",))
_FILE_KEYS = (("name", "size"), ("folio_size", "shmem"))
_PROCESS_KEYS = (("name",), ())
_VMA_KEYS = (("name", "process", "size"), ("prot", "shared", "file", "offset", "mthp", "align"))
_RANGE = ("offset", "length")
_PATTERN = ("every", "first", "random", "pages")
_STEP_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "touch": (("vma",), ("process", "write", *_RANGE)),
    "write": (("vma",), ("process", *_RANGE, *_PATTERN)),
    "read": (("vma",), ("process", *_RANGE, *_PATTERN)),
    "fork": (("process",), ("as",)),
    "pin": (("vma",), ("process", *_RANGE, "write", "longterm", "as")),
    "unpin": (("pin",), ()),
    "munmap": (("vma",), ("process", *_RANGE)),
    "mprotect": (("vma", "prot"), ("process", *_RANGE)),
    "madvise": (("vma", "advice"), ("process", *_RANGE)),
    "exit": (("process",), ()),
    "check": ((), ()),
    "repeat": (("count", "steps"), ()),
}


# -- the checked, resolved form ---------------------------------------------------------------

@dataclass
class FileSpec:
    name: str
    size: int
    folio_size: int
    shmem: bool


@dataclass
class VmaSpec:
    name: str
    process: str
    size: int
    prot: str = "rw"
    shared: bool = False
    file: str | None = None
    offset: int = 0
    mthp: list[int] = field(default_factory=list)
    align: int | None = None
    #: Set for a VMA of a snapshot: its captured start address.
    start: int | None = None


@dataclass
class Step:
    """One operation, resolved: ``label`` is its number ("3", or "5.2" inside a repeat)."""

    label: str
    op: str
    where: str
    process: str | None = None
    vma: str | None = None
    offset: int = 0
    length: int = 0
    args: dict[str, Any] = field(default_factory=dict)
    body: list["Step"] = field(default_factory=list)


@dataclass
class Case:
    """The scenario with one value for each parameter: what one run executes."""

    params: dict[str, Any]
    label: str
    #: Bytes of simulated RAM (None: what the snapshot needs).
    memory: int | None
    files: list[FileSpec]
    processes: list[str]
    vmas: list[VmaSpec]
    steps: list[Step]


@dataclass
class Scenario:
    path: str
    name: str
    description: str
    arch: str
    kernels: list[str]
    seed: int
    batching: list[bool]
    fragmentation: dict[int | str, float]
    snapshot: Any | None
    snapshot_names: dict[str, int]
    cases: list[Case]


# -- reading ----------------------------------------------------------------------------------

class _Checker:
    """Raises ScenarioError with the file name and the table being read."""

    def __init__(self, path: str):
        self.path = path

    def fail(self, where: str, message: str) -> NoReturn:
        raise ScenarioError(f"{self.path}: {where}: {message}" if where else f"{self.path}: {message}")

    def keys(self, where: str, table: Any, spec: tuple[tuple[str, ...], tuple[str, ...]]) -> dict:
        if not isinstance(table, dict):
            self.fail(where, f"must be a table, not {_kind(table)}")
        required, optional = spec
        known = (*required, *optional)
        for k in table:
            if k not in known:
                self.fail(where, f"unknown key {k!r}; expected one of {', '.join(known) or 'none'}")
        for k in required:
            if k not in table:
                self.fail(where, f"missing key {k!r}")
        return table

    def typed(self, where: str, table: dict, key: str, kind: type | tuple, default: Any = None) -> Any:
        if key not in table:
            return default
        v = table[key]
        ok = isinstance(v, kind) and not (isinstance(v, bool) and kind in (int, float, (int, float)))
        if not ok:
            names = {str: "a string", bool: "a boolean (true or false)", int: "an integer",
                     list: "an array", dict: "a table", (int, float): "a number"}
            self.fail(where, f"key {key!r} must be {names.get(kind, kind)}, not {_kind(v)}")
        return v

    def size(self, where: str, table: dict, key: str, default: Any = None, *, zero: bool = False) -> int:
        if key not in table:
            return default
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            self.fail(where, f"key {key!r} must be a size (an integer or a string such as '64K'), not {_kind(v)}")
        try:
            n = parse_size(v)
        except ValueError as e:
            self.fail(where, f"key {key!r}: {e}")
        if n == 0 and not zero:
            self.fail(where, f"key {key!r}: size {v!r} is zero")
        return n


def _kind(v: Any) -> str:
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, (int, float)):
        return f"number {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "a table"
    return type(v).__name__


#: Names of processes, VMAs, files and pins (they end up in reports, so no markup).
_NAME = re.compile(r"[A-Za-z0-9_.\-]+")
#: Bounds that keep a scenario's run finite and its results in memory.
MAX_REPEAT = 1_000_000
MAX_CASES = 10_000


def _read_toml(path: str) -> dict:
    try:
        # O_NONBLOCK: a FIFO must not hang the open; only a regular file is read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ScenarioError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None
    except UnicodeDecodeError as e:
        raise ScenarioError(f"{path}: not valid TOML: {e}") from None


def parse_set(items: Sequence[str]) -> dict[str, Any]:
    """``--set NAME=VALUE`` options: VALUE is read as a TOML value (``true``, ``3``,
    ``["4K", "2M"]``), else as a comma-separated list of strings, else as a string."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name.strip()):
            raise ScenarioError(f"argument --set: {item!r} is not NAME=VALUE")
        text = text.strip()
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            parts = [p.strip() for p in text.split(",")]
            value = parts if len(parts) > 1 else text
        out[name.strip()] = value
    return out


def load(path: str | os.PathLike[str], params: dict[str, Any] | None = None, *,
         arch: str | None = None) -> Scenario:
    """Reads and checks the scenario at ``path``; ``params`` overrides values of its
    ``[params]`` table (a list sweeps), ``arch`` its ``[machine] arch`` (``ptebatch sweep``).
    Raises :class:`ScenarioError`; an unreadable file raises ``OSError``."""
    path = os.fspath(path)
    doc = _read_toml(path)
    if arch is not None and isinstance(doc.get("machine"), dict):
        doc["machine"]["arch"] = arch
    c = _Checker(path)
    for k in doc:
        if k not in _TOP:
            c.fail("", f"unknown table [{k}]; expected {', '.join(f'[{t}]' for t in _TOP)}")
    meta = c.keys("[scenario]", doc.get("scenario", {}), _SCENARIO_KEYS)
    name = c.typed("[scenario]", meta, "name", str, os.path.splitext(os.path.basename(path))[0])
    description = c.typed("[scenario]", meta, "description", str, "")

    declared = c.typed("", doc, "params", dict, {})
    for k, v in declared.items():
        if isinstance(v, dict) or (isinstance(v, list) and not v):
            c.fail("[params]", f"key {k!r} must be a value or a non-empty array of values to sweep")
    for k, v in (params or {}).items():
        if k not in declared:
            c.fail("--set", f"no parameter {k!r} in [params]; known: {', '.join(declared) or 'none'}")
        if isinstance(v, dict) or (isinstance(v, list) and not v):
            c.fail("--set", f"parameter {k!r} must be a value or a non-empty array of values to sweep")
    values = {**declared, **(params or {})}
    swept = [k for k, v in values.items() if isinstance(v, list)]
    n_cases = math.prod(len(values[k]) for k in swept)
    if n_cases > MAX_CASES:
        c.fail("[params]", f"the swept parameters make {n_cases} cases; at most {MAX_CASES} "
                           "(split the sweep, or use ptebatch sweep)")
    combos = [dict(zip(swept, vs)) for vs in itertools.product(*(values[k] for k in swept))]

    if "machine" not in doc:
        c.fail("", "missing table [machine] (at least: kernels = [\"6.8\", \"7.0\"])")
    # Parameters may appear in [machine] too (e.g. a memory size): check it per case, keep the first.
    machines = []
    for combo in combos:
        case_values = {**values, **combo}
        m = _subst(c, "[machine]", doc["machine"], case_values)
        machines.append(_machine(c, m))
    arch, kernels, seed, batching, fragmentation, _ = machines[0]
    if any(m[:5] != machines[0][:5] for m in machines):
        c.fail("[machine]", "only 'memory' may change with a swept parameter (one arch, kernel list, "
                            "seed, batching and fragmentation per scenario)")

    snapshot, names = None, {}
    if "snapshot" in doc:
        snapshot, names = _snapshot(c, doc["snapshot"], arch if "arch" in doc["machine"] else None)
        arch = _snapshot_arch(snapshot)
        if batching != [True] or fragmentation:
            # replay.from_snapshot builds a batching machine without allocation fallbacks.
            c.fail("[machine]", "keys 'batching' and 'fragmentation' cannot be used with a [snapshot]")
    elif "process" not in doc:
        c.fail("", "missing table [[process]] (each with a name; or a [snapshot] to start from)")
    if "step" not in doc:
        c.fail("", "missing table [[step]]: a scenario needs at least one step")

    cases = []
    for combo, mach in zip(combos, machines):
        case_values = {**values, **combo}
        label = ",".join(f"{k}={_show(v)}" for k, v in combo.items())
        cases.append(_case(c, doc, case_values, label, arch, mach[5], snapshot, names, seed))
    return Scenario(path, name, description, arch, kernels, seed, batching, fragmentation, snapshot,
                    names, cases)


def _show(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def _subst(c: _Checker, where: str, v: Any, params: dict[str, Any], key: str = "") -> Any:
    """``"$name"``, ``"$name/2"`` and ``"$name*4"`` replaced by the parameter's value."""
    if isinstance(v, dict):
        return {k: _subst(c, where, x, params, k) for k, x in v.items()}
    if isinstance(v, list):
        return [_subst(c, where, x, params, key) for x in v]
    if not isinstance(v, str) or "$" not in v:
        return v
    m = _PARAM_REF.fullmatch(v.strip())
    if not m:
        c.fail(where, f"key {key!r}: {v!r} is not a parameter reference ('$name', '$name/2' or '$name*2')")
    name, op, k = m.groups()
    if name not in params:
        c.fail(where, f"key {key!r}: no parameter {name!r} in [params]; known: {', '.join(params) or 'none'}")
    value = params[name]
    if not op:
        return value
    try:
        n = parse_size(value)
    except (TypeError, ValueError):
        c.fail(where, f"key {key!r}: {v!r} needs a size, but {name} is {_kind(value)}")
    k = int(k)
    if op == "/" and (k == 0 or n % k):
        c.fail(where, f"key {key!r}: {format_size(n)} is not divisible by {k}")
    return n // k if op == "/" else n * k


def _machine(c: _Checker, m: dict):
    w = "[machine]"
    c.keys(w, m, _MACHINE_KEYS)
    arch = c.typed(w, m, "arch", str, "x86-64")
    if arch not in LAYOUT_NAMES:
        c.fail(w, f"key 'arch': unknown arch {arch!r}; expected one of {', '.join(LAYOUT_NAMES)}")
    kernels = _kernels(c, w, "kernels", m.get("kernels", ["6.8", NEWEST_KERNEL]))
    seed = c.typed(w, m, "seed", int, 0)
    if seed < 0:
        c.fail(w, f"key 'seed' must be at least 0, not {seed}")
    b = m.get("batching", True)
    if b == "both":
        batching = [True, False]
    elif isinstance(b, bool):
        batching = [b]
    else:
        c.fail(w, f"key 'batching' must be true, false or \"both\", not {_kind(b)}")
    frag_in = c.typed(w, m, "fragmentation", dict, {})
    frag: dict[int | str, float] = {}
    for size, p in frag_in.items():
        try:
            n = check_folio_size(size, arch)
        except ValueError as e:
            c.fail(w, f"key 'fragmentation': {e}")
        if n == _page_size(arch):
            c.fail(w, f"key 'fragmentation': {size} is the page size; only large folios can fail")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1 or not math.isfinite(p):
            c.fail(w, f"key 'fragmentation': {size} = {p!r} is not a fraction from 0 to 1")
        frag[n] = float(p)
    memory = c.size(w, m, "memory")
    return arch, kernels, seed, batching, frag, memory


def _page_size(arch: str) -> int:
    return folio_sizes(arch)[0]


def _kernels(c: _Checker, where: str, key: str, v: Any) -> list[str]:
    if v == "all":
        return list(KERNEL_VERSIONS)
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(k, str) for k in v):
        c.fail(where, f"key {key!r} must be \"all\" or a non-empty array of kernel versions, not {_kind(v)}")
    for k in v:
        if k not in KERNEL_VERSIONS:
            c.fail(where, f"key {key!r}: unknown kernel {k!r}; expected one of {', '.join(KERNEL_VERSIONS)}")
    return list(dict.fromkeys(v))


def parse_kernels(text: str) -> list[str]:
    """``--kernel`` text: ``"all"`` or a comma-separated list of kernel versions."""
    if text.strip() == "all":
        return list(KERNEL_VERSIONS)
    items = [k.strip() for k in text.split(",") if k.strip()]
    if not items:
        raise ScenarioError("argument --kernel: no kernel given")
    for k in items:
        if k not in KERNEL_VERSIONS:
            raise ScenarioError(f"argument --kernel: unknown kernel {k!r}; expected \"all\" or some of "
                                f"{', '.join(KERNEL_VERSIONS)}")
    return items


def _snapshot(c: _Checker, t: Any, arch: str | None):
    from .snapshot import Snapshot

    w = "[snapshot]"
    c.keys(w, t, _SNAPSHOT_KEYS)
    rel = c.typed(w, t, "path", str)
    path = rel if os.path.isabs(rel) else os.path.join(os.path.dirname(os.path.abspath(c.path)), rel)
    snap = Snapshot.load(path)
    names = c.typed(w, t, "names", dict, {})
    for n, pid in names.items():
        if isinstance(pid, bool) or not isinstance(pid, int) or pid not in snap.pids:
            c.fail(w, f"key 'names': {n} = {pid!r} is not a pid of the snapshot ({', '.join(map(str, snap.pids))})")
    if arch is not None and arch != _snapshot_arch(snap):
        c.fail("[machine]", f"key 'arch': {arch} differs from the snapshot's {_snapshot_arch(snap)}")
    return snap, {n: int(p) for n, p in names.items()}


def _snapshot_arch(snap: Any) -> str:
    from .replay import layout_for

    return layout_for(snap.header["arch"], snap.page_size)


def _case(c: _Checker, doc: dict, params: dict, label: str, arch: str, memory: int | None,
          snapshot: Any, names: dict[str, int], seed: int) -> Case:
    page = _page_size(arch)
    files: list[FileSpec] = []
    fnames: dict[str, FileSpec] = {}
    for i, t in enumerate(_array(c, doc, "file"), 1):
        w = f"[[file]] #{i}"
        t = _subst(c, w, c.keys(w, t, _FILE_KEYS), params)
        name = _name(c, w, t, fnames)
        w = f"[[file]] #{i} ({name})"
        folio = c.size(w, t, "folio_size", page)
        if folio & (folio - 1) or not page <= folio <= pmd_size(arch):
            c.fail(w, f"key 'folio_size': {format_size(folio)} is not a power of two from the page "
                      f"size to the PMD size ({format_size(pmd_size(arch))})")
        size = _aligned(c, w, t, "size", page)
        fnames[name] = FileSpec(name, size, folio, c.typed(w, t, "shmem", bool, False))
        files.append(fnames[name])

    procs: list[str] = []
    vmas: dict[str, VmaSpec] = {}
    if snapshot is not None:
        by_pid = {pid: name for name, pid in names.items()}
        for pid in snapshot.pids:
            procs.append(by_pid.get(pid, f"pid{pid}"))
        a = snapshot.arrays
        count: dict[int, int] = {}
        for i in range(len(a["vma_start"])):
            pid = int(a["vma_pid"][i])
            k = count[pid] = count.get(pid, -1) + 1
            pname = by_pid.get(pid, f"pid{pid}")
            start, end = int(a["vma_start"][i]), int(a["vma_end"][i])
            vmas[f"{pname}.vma{k}"] = VmaSpec(f"{pname}.vma{k}", pname, end - start, start=start)
    for i, t in enumerate(_array(c, doc, "process"), 1):
        w = f"[[process]] #{i}"
        t = c.keys(w, t, _PROCESS_KEYS)
        procs.append(_name(c, w, t, dict.fromkeys(procs)))
    for i, t in enumerate(_array(c, doc, "vma"), 1):
        w = f"[[vma]] #{i}"
        t = _subst(c, w, c.keys(w, t, _VMA_KEYS), params)
        name = _name(c, w, t, vmas)
        w = f"[[vma]] #{i} ({name})"
        owner = c.typed(w, t, "process", str)
        if owner not in procs:
            c.fail(w, f"key 'process': no process {owner!r} at the start; known: {', '.join(procs)} "
                      f"(a child made by fork cannot own a [[vma]]: map it in the parent before the fork)")
        v = VmaSpec(name, owner, _aligned(c, w, t, "size", page))
        v.prot = c.typed(w, t, "prot", str, "rw")
        if not _PROT.fullmatch(v.prot) or not v.prot:
            c.fail(w, f"key 'prot': {v.prot!r}; expected letters r, w, x in that order (\"rw\") or \"none\"")
        v.shared = c.typed(w, t, "shared", bool, False)
        v.file = c.typed(w, t, "file", str)
        if v.file is not None and v.file not in fnames:
            c.fail(w, f"key 'file': no [[file]] named {v.file!r}; known: {', '.join(fnames) or 'none'}")
        v.offset = _aligned(c, w, t, "offset", page, zero=True, default=0)
        if v.file is None and "offset" in t:
            c.fail(w, "key 'offset' needs a key 'file' (an anonymous VMA has no file offset)")
        if v.file is not None and v.offset + v.size > fnames[v.file].size:
            c.fail(w, f"key 'offset': {format_size(v.offset)} + size {format_size(v.size)} is past the "
                      f"end of file {v.file!r} ({format_size(fnames[v.file].size)})")
        mthp = c.typed(w, t, "mthp", list, [])
        if mthp and (v.file is not None or v.shared):
            c.fail(w, "key 'mthp': only private anonymous VMAs have anonymous mTHP sizes "
                      "(a file's page cache folio size is the [[file]]'s folio_size)")
        for s in mthp:
            try:
                v.mthp.append(check_folio_size(s, arch))
            except (TypeError, ValueError) as e:
                c.fail(w, f"key 'mthp': {e}")
        v.align = c.size(w, t, "align")
        if v.align is not None and (v.align & (v.align - 1) or v.align < page):
            c.fail(w, f"key 'align': {format_size(v.align)} is not a power of two of at least a page")
        vmas[name] = v
    if memory is None and snapshot is None:
        total = sum(v.size for v in vmas.values() if v.start is None) + sum(f.size for f in files)
        memory = 2 * total + (64 << 20)
        memory = -(-memory // pmd_size(arch)) * pmd_size(arch)

    steps = _steps(c, doc["step"], params, procs, vmas, page)
    return Case(params, label, memory, files, procs, list(vmas.values()), steps)


def _array(c: _Checker, doc: dict, key: str) -> list:
    v = doc.get(key, [])
    if not isinstance(v, list):
        c.fail("", f"[{key}] must be an array of tables, written [[{key}]]")
    return v


def _name(c: _Checker, where: str, t: dict, taken: dict) -> str:
    name = c.typed(where, t, "name", str)
    if not _NAME.fullmatch(name):
        c.fail(where, f"key 'name': {name!r} must be letters, digits, '_', '-' or '.'")
    if name in taken:
        c.fail(where, f"key 'name': {name!r} is used twice")
    return name


def _aligned(c: _Checker, where: str, t: dict, key: str, page: int, *, zero: bool = False,
             default: Any = None) -> int:
    n = c.size(where, t, key, default, zero=zero)
    if n % page:
        c.fail(where, f"key {key!r}: {n} is not a multiple of the {format_size(page)} page")
    return n


@dataclass
class _Scope:
    """What exists at a point of the sequence: live processes and their VMAs, pins."""

    procs: dict[str, set[str]]
    pins: set[str]
    dead: dict[str, str]


def _steps(c: _Checker, raw: Any, params: dict, procs: list[str], vmas: dict[str, VmaSpec],
           page: int) -> list[Step]:
    if not isinstance(raw, list) or not raw:
        c.fail("", "[[step]] must be a non-empty array of tables")
    owned: dict[str, set[str]] = {p: set() for p in procs}
    for v in vmas.values():
        owned[v.process].add(v.name)
    steps = _parse_steps(c, raw, params, "", "[[step]]", vmas, page)
    _walk(c, steps, _Scope(owned, set(), {}), _creators(steps), vmas)
    return steps


def _parse_steps(c: _Checker, raw: list, params: dict, prefix: str, table: str, vmas: dict[str, VmaSpec],
                 page: int) -> list[Step]:
    out = []
    for i, t in enumerate(raw, 1):
        label = f"{prefix}{i}"
        w0 = f"{table} #{i}" if not prefix else f"[[step]] #{prefix}{i}"
        if not isinstance(t, dict):
            c.fail(w0, f"must be a table, not {_kind(t)}")
        op = t.get("op")
        if op not in OPS:
            c.fail(w0, f"key 'op': {_kind(op) if op is not None else 'missing'}; expected one of {', '.join(OPS)}")
        w = f"{w0} ({op})"
        required, optional = _STEP_KEYS[op]
        t = c.keys(w, t, (("op", *required), optional))
        if op != "repeat":
            t = _subst(c, w, t, params)
        s = Step(label, op, w)
        if op == "repeat":
            n = c.typed(w, t, "count", int)
            if not 1 <= n <= MAX_REPEAT:
                c.fail(w, f"key 'count' must be from 1 to {MAX_REPEAT}, not {n}")
            body = t["steps"]
            if not isinstance(body, list) or not body:
                c.fail(w, "key 'steps' must be a non-empty array of tables, written [[step.steps]]")
            s.args["count"] = n
            s.body = _parse_steps(c, body, params, f"{label}.", "[[step.steps]]", vmas, page)
            out.append(s)
            continue
        s.process = c.typed(w, t, "process", str)
        s.vma = c.typed(w, t, "vma", str)
        if s.vma is not None:
            if s.vma not in vmas:
                c.fail(w, f"key 'vma': no VMA named {s.vma!r}; known: {', '.join(vmas) or 'none'}")
            v = vmas[s.vma]
            s.process = s.process or v.process
            s.offset = _aligned(c, w, t, "offset", page, zero=True, default=0)
            if s.offset >= v.size:
                c.fail(w, f"key 'offset': {format_size(s.offset)} is not inside VMA {s.vma!r} "
                          f"({format_size(v.size)})")
            s.length = _aligned(c, w, t, "length", page, default=v.size - s.offset)
            if s.offset + s.length > v.size or s.length == 0:
                c.fail(w, f"key 'length': offset {format_size(s.offset)} + length {format_size(s.length)} "
                          f"is not inside VMA {s.vma!r} ({format_size(v.size)})")
        for k in ("write", "longterm"):
            if k in t:
                s.args[k] = c.typed(w, t, k, bool)
        if op == "pin":
            s.args.setdefault("write", True)
            s.args.setdefault("longterm", True)
        if op in ("fork", "pin"):
            s.args["as"] = c.typed(w, t, "as", str)
            if s.args["as"] is not None and not _NAME.fullmatch(s.args["as"]):
                c.fail(w, f"key 'as': {s.args['as']!r} must be letters, digits, '_', '-' or '.'")
        if op == "unpin":
            s.args["pin"] = c.typed(w, t, "pin", str)
        if op == "mprotect":
            prot = c.typed(w, t, "prot", str)
            if not prot or not _PROT.fullmatch(prot):
                c.fail(w, f"key 'prot': {prot!r}; expected letters r, w, x in that order (\"rw\") or \"none\"")
            s.args["prot"] = prot
        if op == "madvise":
            advice = c.typed(w, t, "advice", str)
            if advice not in ADVICE:
                c.fail(w, f"key 'advice': {advice!r}; expected one of {', '.join(ADVICE)}")
            s.args["advice"] = advice
        if op in ("write", "read"):
            s.args["pattern"] = _pattern(c, w, t, s.length // page)
        out.append(s)
    return out


def _pattern(c: _Checker, w: str, t: dict, n: int) -> tuple:
    chosen = [k for k in ("every", "random", "pages") if k in t]
    if len(chosen) > 1:
        c.fail(w, f"keys {' and '.join(map(repr, chosen))}: give at most one page pattern")
    if "first" in t and "every" not in t:
        c.fail(w, "key 'first' needs a key 'every'")
    if "every" in t:
        every = c.typed(w, t, "every", int)
        first = c.typed(w, t, "first", int, 0)
        if every < 1 or not 0 <= first < min(every, n):
            c.fail(w, f"key 'every': {every} (first {first}) must be at least 1, with first from 0 to every-1 "
                      f"inside the {n} pages")
        return ("every", every, first)
    if "random" in t:
        p = c.typed(w, t, "random", (int, float))
        if not (0 < p <= 1):
            c.fail(w, f"key 'random': {p} is not a fraction of the pages in (0, 1] (0.1 = 10 %)")
        return ("random", float(p))
    if "pages" in t:
        pages = c.typed(w, t, "pages", list)
        for x in pages:
            if isinstance(x, bool) or not isinstance(x, int) or not 0 <= x < n:
                c.fail(w, f"key 'pages': {x!r} is not a page index from 0 to {n - 1} of the range")
        return ("pages", tuple(pages))
    return ("all",)


def _creators(steps: list[Step]) -> dict[str, str]:
    """Where each name (a fork's child, a pin) is first made, for the forward-reference message."""
    out: dict[str, str] = {}
    for s in steps:
        if s.args.get("as"):
            out.setdefault(s.args["as"], s.where)
        out.update({k: v for k, v in _creators(s.body).items() if k not in out})
    return out


def _walk(c: _Checker, steps: list[Step], scope: _Scope, creators: dict[str, str], vmas: dict[str, VmaSpec]) -> None:
    for s in steps:
        if s.op == "repeat":
            # A second pass finds what one iteration breaks for the next (an exited process).
            for _ in range(min(s.args["count"], 2)):
                _walk(c, s.body, scope, creators, vmas)
            continue
        if s.process is not None and s.process not in scope.procs:
            if s.process in scope.dead:
                c.fail(s.where, f"key 'process': {s.process!r} has exited (at {scope.dead[s.process]})")
            later = f" (it is created by {creators[s.process]}, later)" if s.process in creators else ""
            c.fail(s.where, f"key 'process': no process {s.process!r} at this point{later}; "
                            f"known here: {', '.join(scope.procs) or 'none'}")
        if s.vma is not None and s.vma not in scope.procs[_proc_name(s)]:
            c.fail(s.where, f"key 'vma': process {s.process!r} does not map {s.vma!r} (it belongs to "
                            f"{vmas[s.vma].process!r} and was not inherited by fork)")
        if s.op == "fork":
            child = s.args["as"]
            if child is not None:
                scope.procs[child] = set(scope.procs[_proc_name(s)])
                scope.dead.pop(child, None)
        elif s.op == "exit":
            del scope.procs[_proc_name(s)]
            scope.dead[_proc_name(s)] = s.where
        elif s.op == "pin" and s.args["as"] is not None:
            scope.pins.add(s.args["as"])
        elif s.op == "unpin":
            name = s.args["pin"]
            if name not in scope.pins:
                later = f" (it is made by {creators[name]}, later)" if name in creators else ""
                c.fail(s.where, f"key 'pin': no pin {name!r} held at this point{later}")
            scope.pins.discard(name)


# -- running ----------------------------------------------------------------------------------

def run(sc: Scenario, kernels: Sequence[str] | None = None,
        progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Runs every case of ``sc`` once per kernel (and per batching mode), each on its own
    ``Simulation``, with ``check()`` after every step. Returns the rows (fields :data:`ROW_FIELDS`):
    one per step executed, then one with ``step == "total"`` per run."""
    rows: list[dict[str, Any]] = []
    for case in sc.cases:
        for kernel in kernels or sc.kernels:
            for batching in sc.batching:
                rows.extend(_run_one(sc, case, kernel, batching)[1])
                if progress:
                    progress(f"{case.label} {kernel}{'' if batching else ' per-PTE'}")
    return rows


class _Run:
    def __init__(self, sc: Scenario, case: Case, kernel: str, batching: bool):
        self.sc, self.case, self.kernel, self.batching = sc, case, kernel, batching
        if sc.snapshot is not None:
            from .replay import from_snapshot

            self.sim, by_pid = from_snapshot(sc.snapshot, kernel, memory=case.memory)
            names = {pid: n for n, pid in sc.snapshot_names.items()}
            self.procs = {names.get(pid, f"pid{pid}"): p for pid, p in by_pid.items()}
        else:
            assert case.memory is not None
            self.sim = Simulation(sc.arch, kernel, case.memory, seed=sc.seed, batching=batching,
                                  fragmentation=dict(sc.fragmentation) or None)
            self.procs = {name: self.sim.spawn() for name in case.processes}
        self.starts: dict[str, int] = {}
        fids = {f.name: self.sim.create_file(f.size, f.folio_size, shmem=f.shmem) for f in case.files}
        for v in case.vmas:
            if v.start is not None:
                self.starts[v.name] = v.start
                continue
            p = self.procs[v.process]
            addr = None
            if v.align:
                # Past the highest mapping, with a gap, so that it does not merge with it.
                top = max((m["end"] for m in p.vmas()), default=1 << 36)
                addr = -(-(top + v.align) // v.align) * v.align
            m = p.mmap(v.size, v.prot, v.shared, file=fids[v.file] if v.file else None, offset=v.offset,
                       mthp=v.mthp or None, addr=addr)  # no sizes listed: the THP policy
            self.starts[v.name] = m.start
        self.pins: dict[str, Any] = {}
        self.serial = 0

    def steps(self, steps: list[Step], iteration: int) -> Iterator[dict[str, Any]]:
        for s in steps:
            if s.op == "repeat":
                for i in range(1, s.args["count"] + 1):
                    yield from self.steps(s.body, i)
                continue
            self.serial += 1
            before, free = self.sim.stats, self.sim.free_pages
            try:
                ptes = self.do(s, iteration)
                self.sim.check()
            except ScenarioError:
                raise
            except Exception as e:
                _locate(e, f"{self.sc.path}: {s.where}, kernel {self.kernel}"
                           + ("" if self.batching else " per-PTE")
                           + (f", iteration {iteration}" if iteration else ""))
                raise
            after = self.sim.stats
            yield self.row(s.label, iteration, s.op, s.process or "", s.vma or "", ptes, before, after, free)

    def do(self, s: Step, iteration: int) -> int:
        page = self.sim.page_size
        p: Any = self.procs.get(s.process) if s.process else None
        addr = self.starts[s.vma] + s.offset if s.vma else 0
        n = s.length // page
        if s.op == "touch":
            p.touch(addr, s.length, write=s.args.get("write", False))
            return n
        if s.op in ("write", "read"):
            pages = self.pattern(s.args["pattern"], n, iteration)
            access = p.write if s.op == "write" else p.read
            for i in pages.tolist():
                access(addr + i * page)
            return len(pages)
        if s.op == "fork":
            mapped = sum((m["end"] - m["start"]) // page for m in p.vmas())
            child = p.fork()
            if s.args["as"]:
                self.procs[s.args["as"]] = child
            return mapped
        if s.op == "exit":
            mapped = sum((m["end"] - m["start"]) // page for m in p.vmas())
            p.exit()
            del self.procs[_proc_name(s)]
            return mapped
        if s.op == "pin":
            pin = p.pin(addr, s.length, write=s.args["write"], longterm=s.args["longterm"])
            if s.args["as"]:
                self.pins[s.args["as"]] = pin
            return n
        if s.op == "unpin":
            self.pins.pop(s.args["pin"]).unpin()
            return 0
        if s.op == "munmap":
            p.munmap(addr, s.length)
        elif s.op == "mprotect":
            p.mprotect(addr, s.length, s.args["prot"])
        elif s.op == "madvise":
            p.madvise(addr, s.length, s.args["advice"])
        elif s.op == "check":
            return 0
        return n

    def pattern(self, pat: tuple, n: int, iteration: int) -> np.ndarray:
        if pat[0] == "all":
            return np.arange(n)
        if pat[0] == "every":
            return np.arange(pat[2], n, pat[1])
        if pat[0] == "pages":
            return np.asarray(pat[1], dtype=np.int64)
        # Seeded by the machine's seed and the step's place, so every kernel sees the same pages.
        rng = np.random.default_rng([self.sc.seed, self.serial, iteration])
        k = max(1, round(pat[1] * n))
        return np.sort(rng.choice(n, size=k, replace=False))

    def row(self, step: str, iteration: int, op: str, process: str, vma: str, ptes: int,
            before: dict, after: dict, free_before: int) -> dict[str, Any]:
        r: dict[str, Any] = {"scenario": self.sc.name, "case": self.case.label, "kernel": self.kernel,
                             "batching": self.batching, "step": step, "iteration": iteration, "op": op,
                             "process": process, "vma": vma, "ptes": ptes}
        for k in COUNTERS:
            r[k] = int(after[k]) - int(before[k])
        hist = [a - b for a, b in itertools.zip_longest(after["batch_histogram"], before["batch_histogram"],
                                                        fillvalue=0)]
        r["batched_ptes"] = sum(i * h for i, h in enumerate(hist))
        r["free_pages"] = self.sim.free_pages
        r["pages_freed"] = self.sim.free_pages - free_before
        return r


def _locate(e: BaseException, where: str) -> None:
    """Puts where it happened in front of the exception's message (same exception, same type)."""
    if e.args and isinstance(e.args[0], str):
        e.args = (f"{where}: {e.args[0]}", *e.args[1:])


def execute(sc: Scenario, kernel: str, *, batching: bool = True, case: int = 0) -> tuple[Simulation, list[dict[str, Any]]]:
    """Runs one case of ``sc`` (an index into ``sc.cases``) under one kernel and returns the
    simulation as the last step left it, to look at further, with the rows of the run."""
    if kernel not in KERNEL_VERSIONS:
        raise ValueError(f"unknown kernel {kernel!r}; known: {', '.join(KERNEL_VERSIONS)}")
    if not 0 <= case < len(sc.cases):
        raise IndexError(f"case {case} of {len(sc.cases)}")
    return _run_one(sc, sc.cases[case], kernel, batching)


def _proc_name(s: Step) -> str:
    assert s.process is not None
    return s.process


def _run_one(sc: Scenario, case: Case, kernel: str, batching: bool) -> tuple[Simulation, list[dict[str, Any]]]:
    try:
        r = _Run(sc, case, kernel, batching)
        r.sim.check()
    except Exception as e:
        _locate(e, f"{sc.path}: setting up{' ' + case.label if case.label else ''}, kernel {kernel}")
        raise
    rows = list(r.steps(case.steps, 0))
    total: dict[str, Any] = {k: "" for k in ROW_FIELDS}
    total.update(scenario=sc.name, case=case.label, kernel=kernel, batching=batching, step="total",
                 iteration=0, op="total", free_pages=r.sim.free_pages)
    for k in ("ptes", *COUNTERS, "batched_ptes", "pages_freed"):
        total[k] = sum(row[k] for row in rows)
    return r.sim, rows + [total]


# -- output -----------------------------------------------------------------------------------

#: Columns of the human table: (heading, row field).
_TABLE = (("PTEs", "ptes"), ("batches", "batches"), ("refcount", "refcount_atomics"),
          ("rmap", "rmap_calls"), ("PTE rd", "pte_reads"), ("PTE wr", "pte_writes"),
          ("TLB", "tlb_flush_ranges"), ("faults", "faults"), ("COW cp", "cow_copies"),
          ("copied", "pages_copied"))

LEGEND = """\
columns (the work of the step alone; --json or --csv give every counter):
  step     the step's number in the file (5.2 = second step inside repeat step 5), x3 = iteration 3
  where    the process and the VMA the step works on
  kernel   the kernel version modelled; "per-PTE" = the same kernel with batching off
  PTEs     page-table entries the step covers: its range, the pages a write/read pattern picks,
           or every mapped page of the process for fork and exit
  batches  PTE batches formed (fork, zap, mprotect), one per folio_pte_batch() run or single PTE
  refcount folio refcount atomic operations     rmap   rmap calls (folio_*_rmap_*, one per batch)
  PTE rd   PTE reads            PTE wr   PTE writes            TLB   TLB flushes (ranges)
  faults   page faults          COW cp   write faults that copied a page
  copied   pages copied (fork's copy_present_page for pinned pages, COW copies)
check() ran after every step and passed."""


def format_table(sc: Scenario, rows: list[dict[str, Any]]) -> str:
    """The rows as text: per case, each step under every kernel, then the totals, and a legend."""
    out = [f"scenario {sc.name} ({sc.path}) on {sc.arch}" + (f": {sc.description}" if sc.description else "")]
    head = f"{'step':<8} {'op':<8} {'where':<18} {'kernel':<12}" + "".join(f" {h:>9}" for h, _ in _TABLE)
    for case in dict.fromkeys(r["case"] for r in rows):
        mine = [r for r in rows if r["case"] == case]
        out.append("")
        if case:
            out.append(f"== {case}")
        out.append(head)
        order = list(dict.fromkeys((r["step"], r["iteration"]) for r in mine))
        for key in order:
            for r in (r for r in mine if (r["step"], r["iteration"]) == key):
                step = r["step"] + (f" x{r['iteration']}" if r["iteration"] else "")
                where = "/".join(x for x in (r["process"], r["vma"]) if x)
                kernel = r["kernel"] + ("" if r["batching"] else " per-PTE")
                out.append(f"{step:<8} {r['op']:<8} {where[:18]:<18} {kernel:<12}"
                           + "".join(f" {r[f]:>9}" for _, f in _TABLE))
    out.append("")
    out.append(LEGEND)
    return "\n".join(out)


def to_json(sc: Scenario, rows: list[dict[str, Any]]) -> str:
    doc = {"format": "ptebatch-scenario-results", "version": 1, "scenario": sc.name, "file": sc.path,
           "arch": sc.arch, "fields": list(ROW_FIELDS), "rows": rows}
    return json.dumps(doc, indent=1) + "\n"


def to_csv(rows: Sequence[dict[str, Any]], fields: Sequence[str] = ROW_FIELDS) -> str:
    """CSV with a header line of ``fields``; booleans as ``true``/``false``."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(fields), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (str(v).lower() if isinstance(v, bool) else v) for k, v in r.items()})
    return buf.getvalue()


# -- the `ptebatch run` command ---------------------------------------------------------------

def add_parser(sub: Any, parents: list) -> None:
    """Registers ``ptebatch run`` on the CLI's subparsers."""
    r = sub.add_parser("run", parents=parents, help="run a scenario file (TOML) under each kernel",
                       description="Runs a scenario file under each of its kernels; docs/scenarios.md "
                                   "describes the file format and the output fields.")
    r.add_argument("scenario", help="the scenario file (.toml); examples/ has some to start from")
    r.add_argument("--kernel", action="append",
                   help='kernels instead of the file\'s: "all" or a comma-separated list (repeatable)')
    r.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a [params] value, e.g. --set region=1GiB or --set folio_size=4K,2M")
    fmt = r.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="JSON: {fields, rows, ...} (docs/scenarios.md)")
    fmt.add_argument("--csv", action="store_true", help="CSV with a header line (docs/scenarios.md)")
    r.add_argument("-o", "--output", help="write to this file instead of stdout")
    # The parser reports a bad file as a usage error (its error() raises the CLI's UsageError).
    r.set_defaults(run=run_cmd, scenario_parser=r)


def run_cmd(args: argparse.Namespace) -> int:
    from .study import Progress

    try:
        sc = load(args.scenario, parse_set(args.set))
        kernels = None
        if args.kernel:
            kernels = list(dict.fromkeys(k for text in args.kernel for k in parse_kernels(text)))
        n = len(sc.cases) * len(kernels or sc.kernels) * len(sc.batching)
        rows = run(sc, kernels, progress=Progress(n, "scenario").step)
    except ScenarioError as e:
        args.scenario_parser.error(str(e))
    text = to_json(sc, rows) if args.json else to_csv(rows) if args.csv else format_table(sc, rows) + "\n"
    if args.output:
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


__all__ = ["COUNTERS", "ROW_FIELDS", "Scenario", "ScenarioError", "execute", "format_table", "load", "parse_kernels",
           "parse_set", "run", "to_csv", "to_json"]

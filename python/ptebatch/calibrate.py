"""What batching costs on this machine: the running kernel timed per folio size.

A small compiled worker (``_calib_worker.c``, built with the system C compiler into a per-user
cache directory) maps a region of private anonymous memory with one folio size enabled (the
sysfs mTHP controls are set with ``oracle.thp_only`` and always restored), writes it (the
first-touch faults), forks and times, with CLOCK_MONOTONIC: the parent's fork() call, the
child's exit (from the parent's exit command to waitpid() reaping it), the child's munmap of
the region, and the parent's munmap once the child is gone. Before each fork the region's
folios are checked from /proc/<pid>/pagemap and /proc/kpageflags (``capture``): every page
present, in a folio of the asked size, mapped in order, and PMD-mapped exactly when asked
(AnonHugePages). The fork and exit of a worker without a region are measured too and
subtracted for the per-PTE costs. See docs/calibration.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from . import oracle
from .capture import capture
from .errors import PtebatchError
from .simulation import format_size, parse_size

THP = oracle.THP
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_calib_worker.c")
SCHEMA = "ptebatch-calibration"
SCHEMA_VERSION = 1

#: Operations in table order, with what each one times.
OPERATIONS = {
    "fork": "the parent's fork() call, while it maps the written region",
    "child-exit": "from the parent's write of the exit command to the child's pipe until "
                  "waitpid() has reaped the child (wake-up, exit_mmap(), the rest of exit, reaping)",
    "child-munmap": "the child's munmap() of the whole region, right after the fork (the parent "
                    "still maps every folio)",
    "parent-munmap": "the parent's munmap() of the whole region after the child is gone (the "
                     "folios are freed)",
    "faults": "writing one byte to every page of the fresh region (first-touch faults, zeroing "
              "included); not measured for 2M-pte, whose faults are those of 2M-pmd",
}
#: Operations a bare worker (no region) also pays; subtracted before dividing by the PTEs.
BASELINED = ("fork", "child-exit")
#: Mappings of a region whose folio size was wrong, retried before the row is marked.
MAP_ATTEMPTS = 5


class CalibrationError(PtebatchError):
    """The calibration could not run or the worker's answer could not be read."""


@dataclass(frozen=True)
class FolioSize:
    """A folio size and how it is mapped: ``pmd`` only for a PMD-sized folio mapped by a PMD."""

    bytes: int
    pmd: bool = False
    #: A PMD-sized folio mapped by PTEs (the PMD mapping split, the folio not).
    pte_mapped_pmd_size: bool = False

    @property
    def label(self) -> str:
        name = format_size(self.bytes)
        if self.pmd:
            return f"{name}-pmd"
        if self.pte_mapped_pmd_size:
            return f"{name}-pte"
        return name


def _pmd_size() -> int:
    with open(f"{THP}/hpage_pmd_size") as f:
        return int(f.read())


def available_sizes() -> list[FolioSize]:
    """The base page, every anonymous mTHP size below the PMD size this kernel offers, and the
    PMD size mapped by PTEs and by a PMD (when the kernel offers it)."""
    page, pmd = os.sysconf("SC_PAGE_SIZE"), _pmd_size()
    offered = sorted(oracle._size_dirs())
    out = [FolioSize(page)] + [FolioSize(s) for s in offered if page < s < pmd]
    if pmd in offered:
        out += [FolioSize(pmd, pte_mapped_pmd_size=True), FolioSize(pmd, pmd=True)]
    return out


def parse_sizes(text: str, offered: Sequence[FolioSize]) -> list[FolioSize]:
    """``"4K,64K,2M-pte,2M-pmd"`` (or ``"all"``) → folio sizes, each one the kernel offers."""
    if text.strip().lower() == "all":
        return list(offered)
    by_label = {s.label.lower(): s for s in offered}
    out: list[FolioSize] = []
    for item in text.split(","):
        key = item.strip().lower()
        if not key:
            raise ValueError(f"empty folio size in {text!r}")
        if key not in by_label:
            try:
                n = parse_size(key)
            except ValueError:
                n = -1
            pmd = [s for s in offered if s.bytes == n and (s.pmd or s.pte_mapped_pmd_size)]
            hint = (f"; say {pmd[0].label} or {pmd[1].label} (mapped by PTEs or by a PMD)"
                    if len(pmd) == 2 else "")
            raise ValueError(f"folio size {item.strip()!r} is not one this kernel offers "
                             f"({', '.join(s.label for s in offered)}){hint}")
        if by_label[key] not in out:
            out.append(by_label[key])
    return out


def missing_requirements() -> str | None:
    """Why the calibration cannot run here, or None."""
    why = oracle.missing_requirements()
    if why is None and not os.path.exists(f"{THP}/hpage_pmd_size"):
        why = f"{THP}/hpage_pmd_size does not exist"
    return why


def thp_settings() -> dict[str, str]:
    """Every THP control (each writable file under the sysfs THP directory) by relative path:
    the bracketed choice (``"never"``) or the number."""
    out = {}
    for root, dirs, files in os.walk(THP):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if os.stat(path).st_mode & 0o200:
                with open(path) as f:
                    out[os.path.relpath(path, THP)] = _selected(f.read())
    return out


# -- the worker ---------------------------------------------------------------------------------

def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ptebatch")


def build_worker(cache_dir: str | None = None) -> str:
    """The worker's executable, compiled with ``$CC`` (default ``cc``) ``-O2`` into
    ``cache_dir`` (default ``$XDG_CACHE_HOME/ptebatch`` or ``~/.cache/ptebatch``) on first use,
    named by a hash of the source and the compiler."""
    cc = os.environ.get("CC", "cc")
    try:
        with open(SOURCE, "rb") as f:
            source = f.read()
    except OSError as e:
        raise CalibrationError(f"the worker's source {SOURCE} cannot be read: {e.strerror}") from e
    key = hashlib.sha256(source + b"\0" + cc.encode()).hexdigest()[:16]
    cache = cache_dir or _cache_dir()
    try:
        os.makedirs(cache, mode=0o700, exist_ok=True)
        st = os.stat(cache)
    except OSError as e:
        raise CalibrationError(f"cannot create the cache directory {cache}: {e.strerror}") from e
    # We run what is in there (as root): nobody else may be able to put it there.
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise CalibrationError(f"the cache directory {cache} is not owned by us or is writable by others")
    exe = os.path.join(cache, f"calib-worker-{key}")
    if os.access(exe, os.X_OK):
        return exe
    fd, tmp = tempfile.mkstemp(prefix=".calib-worker-", dir=cache)
    os.close(fd)
    try:
        try:
            r = subprocess.run([cc, "-O2", "-o", tmp, SOURCE], capture_output=True, text=True)
        except FileNotFoundError as e:
            raise CalibrationError(f"no C compiler: {cc!r} was not found (set CC)") from e
        if r.returncode != 0:
            first = (r.stderr.strip().splitlines() or ["no message"])[0]
            raise CalibrationError(f"building the worker with {cc} failed: {first}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, exe)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return exe


#: Integer fields of each reply, by operation.
_REPLY_FIELDS = {
    "start": ("nice",),
    "map": ("pid", "addr", "len", "faults_ns"),
    "unmap": (),
    "exit-round": ("fork_ns", "child_exit_ns", "parent_munmap_ns"),
    "munmap-round": ("fork_ns", "child_munmap_ns", "parent_munmap_ns"),
    "bare": ("fork_ns", "child_exit_ns"),
}


def parse_reply(line: str, op: str) -> dict[str, int]:
    """One line of the worker's output, the answer to ``op``: a JSON object with that ``op`` and
    its non-negative integer fields. Anything else is a :class:`CalibrationError`."""
    if not line:
        raise CalibrationError(f"the worker exited without answering {op!r}")
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise CalibrationError(f"the worker's answer to {op!r} is not JSON: {line.strip()[:80]!r}") from e
    if not isinstance(obj, dict):
        raise CalibrationError(f"the worker's answer to {op!r} is not a JSON object: {line.strip()[:80]!r}")
    if obj.get("op") == "error":
        raise CalibrationError(f"the worker failed on {op!r}: {obj.get('error', 'no message')}")
    if obj.get("op") != op:
        raise CalibrationError(f"the worker answered {obj.get('op')!r} to {op!r}")
    out = {}
    for name in _REPLY_FIELDS[op]:
        v = obj.get(name)
        if type(v) is not int or (v < 0 and name != "nice"):
            raise CalibrationError(f"the worker's answer to {op!r} has no valid integer {name!r}: "
                                   f"{line.strip()[:80]!r}")
        out[name] = v
    return out


class _Worker:
    def __init__(self, exe: str) -> None:
        try:
            self.proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        except OSError as e:
            raise CalibrationError(f"cannot start the worker {exe}: {e.strerror}") from e
        assert self.proc.stdout
        try:
            self.nice = parse_reply(self.proc.stdout.readline(), "start")["nice"]
        except BaseException:
            self.close()
            raise

    def __call__(self, op: str, *args: int) -> dict[str, int]:
        assert self.proc.stdin and self.proc.stdout
        try:
            self.proc.stdin.write(" ".join([op, *map(str, args)]) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError as e:
            raise CalibrationError(f"the worker exited (status {self.proc.poll()}) before {op!r}") from e
        return parse_reply(self.proc.stdout.readline(), op)

    def close(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            assert self.proc.stdin
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()


# -- folio checks -------------------------------------------------------------------------------

@dataclass
class FolioCheck:
    ok: bool
    #: Pages of the region by the size (in pages) of the folio holding them; 0: not present.
    pages_by_folio_pages: dict[int, int]
    anon_huge_kb: int
    message: str


def check_folios(pid: int, addr: int, length: int, size: FolioSize) -> FolioCheck:
    """Whether every page of ``[addr, addr + length)`` of ``pid`` is present, in a folio of
    ``size`` mapped in order from its first page, PMD-mapped exactly when ``size.pmd``."""
    snap = capture(pid, ranges=[(addr, addr + length)])
    page = snap.page_size
    npages = length // page
    present, pfn, _, _ = oracle._view(snap, addr, npages)
    want = size.bytes // page
    hist: dict[int, int] = {}
    bad = npages - int(present.sum())
    if bad:
        hist[0] = bad
    if present.any():
        heads, lens = snap.folio_of(pfn[present])
        idx = np.flatnonzero(present)
        lens_u, counts = np.unique(lens, return_counts=True)
        hist.update({int(n): int(c) for n, c in zip(lens_u, counts)})
        in_order = (pfn[present] - heads).astype(np.int64) == idx % want
        bad += int(np.count_nonzero((lens != want) | ~in_order))
    a = snap.arrays
    inside = (a["vma_start"] < np.uint64(addr + length)) & (a["vma_end"] > np.uint64(addr))
    huge_kb = int(a["vma_anon_huge_kb"][inside].sum())
    want_kb = length // 1024 if size.pmd else 0
    problems = []
    if bad:
        problems.append(f"{bad} of {npages} pages not in an in-order folio of {want} pages "
                        f"(pages by folio pages: {hist})")
    if huge_kb != want_kb:
        problems.append(f"AnonHugePages {huge_kb} kB, expected {want_kb} kB")
    return FolioCheck(not problems, hist, huge_kb, "; ".join(problems) or "ok")


# -- signals and restoring ----------------------------------------------------------------------

class _Signals:
    """SIGINT, SIGTERM and SIGHUP raise KeyboardInterrupt, so that every ``finally`` (stopping
    the worker, restoring sysfs) runs, until ``quiet()``: from then on a signal is only noted
    and raised when the block ends, so that it cannot cut the restore short. Only in the main
    thread (Python runs handlers there); elsewhere the ``finally`` blocks still run on errors."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.quiet_ = False
        self.pending: int | None = None
        self.old: dict = {}

    def _handler(self, signum: int, frame: object) -> None:
        if self.quiet_:
            self.pending = signum
        else:
            self.quiet_ = True
            raise KeyboardInterrupt(signal.Signals(signum).name)

    def quiet(self) -> None:
        self.quiet_ = True

    def __enter__(self) -> "_Signals":
        if threading.current_thread() is threading.main_thread():
            self.old = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
        return self

    def __exit__(self, kind, value, tb) -> None:
        for s, h in self.old.items():
            signal.signal(s, h)
        if self.pending is not None and kind is None:
            raise KeyboardInterrupt(signal.Signals(self.pending).name)


def _selected(text: str) -> str:
    """The value of a sysfs control: the bracketed choice, or the whole text."""
    text = text.strip()
    if "[" in text and "]" in text:
        return text[text.index("[") + 1:text.index("]")]
    return text


def _restore_mthp(saved: dict[str, str]) -> None:
    """Writes back every per-size ``enabled`` control that differs from ``saved``: the net
    under ``oracle.thp_only``'s own restore, should a signal have cut that short."""
    now = thp_settings()
    for key, value in saved.items():
        if key.startswith("hugepages-") and key.endswith("/enabled") and now.get(key) != value:
            with open(os.path.join(THP, key), "w") as f:
                f.write(value)


# -- the calibration ------------------------------------------------------------------------------

def _stats(samples: list[int]) -> dict[str, float | int]:
    a = np.asarray(samples, dtype=np.float64)
    q1, med, q3 = np.percentile(a, [25, 50, 75])
    return {"repetitions": len(samples), "median_ns": float(med), "min_ns": int(a.min()),
            "max_ns": int(a.max()), "q1_ns": float(q1), "q3_ns": float(q3)}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loadavg() -> list[float] | None:
    try:
        with open("/proc/loadavg") as f:
            return [float(x) for x in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def _autogroup() -> bool | None:
    """Whether sched_autogroup is on: then the worker's nice counts only within its session."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1"
    except OSError:
        return None


def _mem_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise CalibrationError("/proc/meminfo has no MemTotal")


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return _mem_total()


def check_region(region: int) -> int:
    """A region is a positive multiple of the PMD size and fits in half the available memory."""
    if isinstance(region, bool) or not isinstance(region, int):
        raise TypeError(f"region must be an int, not {type(region).__name__}")
    pmd = _pmd_size()
    if region <= 0 or region % pmd:
        raise ValueError(f"region {region} is not a positive multiple of the PMD size ({format_size(pmd)})")
    avail = _mem_available()
    if region > avail // 2:
        raise ValueError(f"region {format_size(region)} is more than half the available memory "
                         f"({avail >> 20} MiB available)")
    return region


def calibrate(region: int = 1 << 30, repeat: int = 5, sizes: Sequence[FolioSize] | None = None, *,
              progress: Callable[[str], None] | None = None, worker: str | None = None) -> dict:
    """Times the running kernel per folio size and returns the calibration (see
    docs/calibration.md for the fields). Needs root; sets the mTHP controls for each size and
    restores every one of them, also on an error or a signal. Rounds go size by size within
    each repetition, so that drift of a shared machine spreads over all sizes. ``progress`` is
    called with one line per step; an exception it raises abandons the run (controls restored).
    """
    why = missing_requirements()
    if why:
        raise CalibrationError(f"cannot calibrate here: {why}")
    if isinstance(repeat, bool) or not isinstance(repeat, int):
        raise TypeError(f"repeat must be an int, not {type(repeat).__name__}")
    if not 1 <= repeat <= 1000:
        raise ValueError(f"repeat {repeat} is out of range (1 to 1000)")
    check_region(region)
    offered = available_sizes()
    sizes = list(offered if sizes is None else sizes)
    if not sizes:
        raise ValueError("no folio size to calibrate")
    for s in sizes:
        if s not in offered:
            raise ValueError(f"folio size {s.label} is not one this kernel offers "
                             f"({', '.join(o.label for o in offered)})")
    page, pmd = os.sysconf("SC_PAGE_SIZE"), _pmd_size()
    exe = worker or build_worker()
    say = progress or (lambda line: None)
    samples: dict[tuple[str, str], list[int]] = {}
    checks: dict[str, list[str]] = {s.label: [] for s in sizes}
    retries = {s.label: 0 for s in sizes}
    t0 = time.monotonic()
    load_start = _loadavg()

    def add(label: str, op: str, ns: int) -> None:
        samples.setdefault((label, op), []).append(ns)

    with _Signals() as signals, oracle.thp_lock(say):
        settings = thp_settings()
        w = _Worker(exe)
        try:
            for _ in range(2 * repeat):
                r = w("bare")
                add("bare", "fork", r["fork_ns"])
                add("bare", "child-exit", r["child_exit_ns"])
            for rep in range(repeat):
                for s in sizes:
                    say(f"repetition {rep + 1}/{repeat}: {s.label} ({time.monotonic() - t0:.0f} s)")
                    with oracle.thp_only(s.bytes):
                        for kind in ("exit-round", "munmap-round"):
                            for attempt in range(1, MAP_ATTEMPTS + 1):
                                m = w("map", region, pmd, 1 if s.pte_mapped_pmd_size else 0)
                                chk = check_folios(m["pid"], m["addr"], m["len"], s)
                                if chk.ok or attempt == MAP_ATTEMPTS:
                                    break
                                retries[s.label] += 1
                                w("unmap")
                            if not chk.ok:
                                checks[s.label].append(chk.message)
                            r = w(kind)
                            if not s.pte_mapped_pmd_size:
                                add(s.label, "faults", m["faults_ns"])
                            add(s.label, "fork", r["fork_ns"])
                            add(s.label, "parent-munmap", r["parent_munmap_ns"])
                            if kind == "exit-round":
                                add(s.label, "child-exit", r["child_exit_ns"])
                            else:
                                add(s.label, "child-munmap", r["child_munmap_ns"])
            nice = w.nice
        finally:
            signals.quiet()
            w.close()
            _restore_mthp(settings)
        after = thp_settings()
    changed = sorted(k for k in set(settings) | set(after) if settings.get(k) != after.get(k))

    ptes = region // page
    bare = {op: _stats(samples[("bare", op)]) for op in BASELINED}
    rows = []
    for s in sizes:
        for op in OPERATIONS:
            if (s.label, op) not in samples:
                continue
            st = _stats(samples[(s.label, op)])
            base = bare[op]["median_ns"] if op in BASELINED else 0.0
            rows.append({
                "folio_size": s.label, "folio_bytes": s.bytes, "mapping": "pmd" if s.pmd else "pte",
                "operation": op, **st, "ptes": ptes, "baseline_ns": base,
                "ns_per_pte": (st["median_ns"] - base) / ptes,
                "ns_per_pte_min": (st["min_ns"] - base) / ptes,
                "folios_verified": not checks[s.label],
                "folio_problems": checks[s.label], "map_retries": retries[s.label],
            })
    uname = platform.uname()
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "kernel_release": uname.release, "kernel_version": uname.version, "machine": uname.machine,
        "cpu_model": _cpu_model(), "cpus": os.cpu_count(), "memory_bytes": _mem_total(),
        "page_size": page, "pmd_size": pmd, "region_bytes": region, "repeat": repeat,
        "thp_settings": settings, "thp_controls_changed": changed, "clock": "CLOCK_MONOTONIC",
        "worker_nice": nice, "sched_autogroup": _autogroup(),
        "loadavg": {"start": load_start, "end": _loadavg()},
        "operations": dict(OPERATIONS),
        "bare": bare,
        "measurements": rows,
        "seconds": round(time.monotonic() - t0, 1),
    }


def format_table(cal: dict) -> str:
    """The calibration as a table with a legend."""
    rows = cal["measurements"]
    base = {r["operation"]: r["ns_per_pte"] for r in rows if r["folio_bytes"] == cal["page_size"]}
    lines = [f"{'folio':>7} {'operation':<14} {'median ms':>10} {'ns/PTE':>8} {'min-max ms':>17} "
             f"{'ns/PTE@min':>10} {'4K/this':>8}"]
    for r in [*[{"folio_size": "bare", "operation": op, **st} for op, st in cal["bare"].items()], *rows]:
        per, best = r.get("ns_per_pte"), r.get("ns_per_pte_min")
        ratio = base.get(r["operation"]) if per is not None else None
        ratio_s = f"{ratio / per:.2f}x" if ratio is not None and per > 0 else "-"
        mark = "" if r.get("folios_verified", True) else " *"
        lines.append(f"{r['folio_size']:>7} {r['operation']:<14} {r['median_ns'] / 1e6:>10.3f} "
                     f"{'-' if per is None else f'{per:.1f}':>8} "
                     f"{r['min_ns'] / 1e6:>8.3f}-{r['max_ns'] / 1e6:<8.3f} "
                     f"{'-' if best is None else f'{best:.1f}':>10} {ratio_s:>8}{mark}")
    lines += [
        "",
        f"{format_size(cal['region_bytes'])} region, {cal['repeat']} repetitions, {cal['kernel_release']}, "
        f"{cal['cpu_model']}; CLOCK_MONOTONIC times, worker at nice {cal['worker_nice']}.",
        "fork: the parent's fork() call; child-exit: exit command to waitpid() done; child-munmap: the",
        "child's munmap() of the region; parent-munmap: the parent's, after the child is gone (frees the",
        "folios); faults: writing every page of the fresh region. ns/PTE: the median, less the bare",
        "worker's (no region) for fork and child-exit, per base page of the region (a PMD counts 512);",
        "ns/PTE@min: the same of the fastest run (less disturbed by other load). 4K/this: 4K's ns/PTE",
        "over this row's (median). 2M-pte: 2M folios mapped by PTEs; 2M-pmd: mapped by PMDs.",
    ]
    if cal["thp_controls_changed"]:
        lines.append(f"THP controls another process changed during the run: {', '.join(cal['thp_controls_changed'])}.")
    if any(not r["folios_verified"] for r in rows):
        lines.append("*: the folios were not all of the asked size in some rounds (see folio_problems in the file).")
    return "\n".join(lines)


def write_json(cal: dict, path: str) -> None:
    """Writes ``cal`` to ``path`` through a temporary file in the same directory (no partial file)."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".json", dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(cal, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


# -- the command ----------------------------------------------------------------------------------

def add_parser(sub, parents: Sequence, size_type: Callable[[str], int], int_type: Callable) -> None:
    """Registers ``ptebatch calibrate`` on the CLI's subparsers."""
    p = sub.add_parser("calibrate", parents=list(parents),
                       help="time this kernel's fork, exit, munmap and faults per folio size (root; "
                            "sets mTHP controls, restores them)",
                       description="Times the running kernel per folio size (4K, every mTHP size it offers, "
                                   "2M mapped by PTEs and by a PMD): the parent's fork(), the child's exit, "
                                   "the child's and the parent's munmap, and first-touch faults of a written "
                                   "region, with a small compiled worker; checks every folio's size from "
                                   "/proc/kpageflags; sets the mTHP controls per size and always restores "
                                   "them. Needs root. Writes a JSON calibration file (docs/calibration.md).")
    p.add_argument("--region", type=size_type, default=1 << 30,
                   help="bytes of written anonymous memory, a multiple of the PMD size (default 1GiB)")
    p.add_argument("--repeat", type=int_type(1, 1000), default=5, help="repetitions (default 5)")
    p.add_argument("--sizes", default="all",
                   help="comma-separated folio sizes, e.g. 4K,64K,2M-pte,2M-pmd (default all the kernel offers)")
    p.add_argument("-o", "--output", default="calibration.json", help="JSON file (default calibration.json)")
    p.set_defaults(run=run_cmd)


def run_cmd(args) -> int:
    why = missing_requirements()
    if why:
        raise CalibrationError(f"cannot calibrate here: {why}")
    from .cli import UsageError

    try:
        sizes = parse_sizes(args.sizes, available_sizes())
    except ValueError as e:
        raise UsageError(f"ptebatch calibrate: error: argument --sizes: {e}") from None
    try:
        check_region(args.region)
    except ValueError as e:
        raise UsageError(f"ptebatch calibrate: error: argument --region: {e}") from None
    # The output must be writable before minutes of timing, not after.
    from .report import check_writable

    check_writable(args.output)

    def progress(line: str) -> None:
        print(f"calibrate: {line}", file=sys.stderr, flush=True)

    cal = calibrate(args.region, args.repeat, sizes, progress=progress)
    write_json(cal, args.output)
    print(format_table(cal))
    print(f"written to {args.output}")
    unverified = sorted({r["folio_size"] for r in cal["measurements"] if not r["folios_verified"]})
    if unverified:
        print(f"ptebatch: error: folios not of the asked size for {', '.join(unverified)}", file=sys.stderr)
        return 1
    return 0


__all__ = ["CalibrationError", "FolioSize", "available_sizes", "build_worker", "calibrate", "check_folios",
           "format_table", "parse_reply", "parse_sizes", "thp_settings", "write_json"]

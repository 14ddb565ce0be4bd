"""Capture of live page tables from /proc (kernel Documentation/admin-guide/mm/pagemap.rst).

For each process: the VMAs from /proc/<pid>/smaps (with AnonHugePages), the pagemap entry of
every page of every VMA, read with large ``preadv`` calls straight into numpy arrays (as the
kernel's tools/mm/thpmaps does); then /proc/kpageflags and /proc/kpagecount for every
PMD-sized, aligned window of frames holding a mapped page. Needs root.

A process is only captured whole: /proc/<pid>/stat is read before its maps and again after
its pagemap and after the frame windows, and a process that is or becomes a zombie or dead,
or whose start time changes (the pid was reused), raises ``CaptureError``; so do kernel
threads (PF_KTHREAD) and processes without mappings. Errors are one line, fit for a CLI.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import time
from typing import Iterable

import numpy as np

from ._core import CaptureError
from .snapshot import (INFERRED, PM_PFN_MASK, PM_PRESENT, SCHEMA_VERSION, VMA_EXEC, VMA_FILE, VMA_HUGEPAGE,
                       VMA_NOHUGEPAGE, VMA_READ, VMA_SHARED, VMA_WRITE, Snapshot)

#: Bytes read per preadv call.
CHUNK = 8 << 20
#: Largest VMA captured, in pages (pagemap of a reserved-but-untouched terabyte is not useful).
MAX_VMA_PAGES = 1 << 28

_MAPS_LINE = re.compile(
    r"^([0-9a-f]+)-([0-9a-f]+) ([r-])([w-])([x-])([ps]) ([0-9a-f]+) ([0-9a-f]+):([0-9a-f]+) (\d+)\s*(.*)$")


def _arch() -> str:
    m = platform.machine()
    return {"x86_64": "x86-64", "aarch64": "arm64", "riscv64": "riscv64", "ppc64le": "ppc64",
            "s390x": "s390x", "loongarch64": "loongarch64"}.get(m, m)


def _pmd_pages(page_size: int) -> int:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read()) // page_size
    except (OSError, ValueError):
        # No THP: PTRS_PER_PTE of this architecture's layout.
        from . import layout
        from .replay import layout_for

        return layout(layout_for(_arch(), page_size)).ptrs_per_pte


def _open(path: str, pid: int | None = None) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError as e:
        if pid is not None and not os.path.exists(f"/proc/{pid}"):
            raise CaptureError(f"process {pid} does not exist (or exited)") from e
        raise CaptureError(f"{path} does not exist: this kernel does not provide it") from e
    except PermissionError as e:
        raise CaptureError(f"reading {path} needs root (CAP_SYS_ADMIN); run as root") from e


def _pread_u64(fd: int, first: int, count: int, path: str, pid: int | None = None) -> np.ndarray:
    """``count`` little-endian u64 entries from entry ``first`` of a /proc file, in big preadv calls."""
    out = np.empty(count, dtype=np.uint64)
    view = out.view(np.uint8).data
    done = 0
    total = count * 8
    while done < total:
        n = min(CHUNK, total - done)
        try:
            got = os.preadv(fd, [view[done:done + n]], first * 8 + done)
        except OSError as e:
            if e.errno == errno.ESRCH or (pid is not None and not os.path.exists(f"/proc/{pid}")):
                raise CaptureError(f"process {pid} exited during the capture") from e
            raise CaptureError(f"reading {path}: {e.strerror}") from e
        if got <= 0:
            if pid is not None:
                raise CaptureError(f"process {pid} exited during the capture (short read of {path})")
            raise CaptureError(f"short read of {path} at entry {first + done // 8}")
        done += got
    return out


#: PF_KTHREAD in /proc/<pid>/stat's flags (include/linux/sched.h).
PF_KTHREAD = 0x00200000


def proc_stat(pid: int) -> tuple[str, str, int, int]:
    """(comm, state, flags, start time) of ``pid`` from /proc/<pid>/stat (fields 2, 3, 9, 22 of
    proc(5)); raises ``CaptureError`` when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError) as e:
        raise CaptureError(f"process {pid} does not exist (or exited)") from e
    except OSError as e:
        raise CaptureError(f"cannot read /proc/{pid}/stat: {e.strerror}") from e
    # comm may hold spaces and parentheses: it ends at the last ')'.
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    try:
        return head.partition("(")[2], fields[0], int(fields[6]), int(fields[19])
    except (IndexError, ValueError) as e:
        raise CaptureError(f"cannot parse /proc/{pid}/stat") from e


def _live(pid: int) -> tuple[str, str, int, int]:
    """proc_stat of a process that has a user address space, or ``CaptureError`` saying why not."""
    st = proc_stat(pid)
    comm, state, flags, _ = st
    if state in ("Z", "X", "x"):
        raise CaptureError(f"process {pid} ({comm}) has exited (state {state}): it has no memory to capture")
    if flags & PF_KTHREAD:
        raise CaptureError(f"process {pid} ({comm}) is a kernel thread: it has no user address space")
    return st


def _unchanged(pid: int, before: tuple[str, str, int, int]) -> None:
    """Raises ``CaptureError`` if ``pid`` died, or is another process, since ``before``."""
    try:
        now = _live(pid)
    except CaptureError as e:
        raise CaptureError(f"process {pid} exited during the capture ({e})") from e
    if now[3] != before[3]:
        raise CaptureError(f"process {pid} exited during the capture and its pid was reused")


def read_vmas(pid: int) -> list[dict]:
    """The VMAs of ``pid`` from /proc/<pid>/smaps, with AnonHugePages and THPeligible."""
    path = f"/proc/{pid}/smaps"
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError as e:
        raise CaptureError(f"process {pid} does not exist (or exited)") from e
    except PermissionError as e:
        raise CaptureError(f"reading {path} needs root") from e
    except ProcessLookupError as e:
        raise CaptureError(f"process {pid} exited during the capture") from e
    vmas: list[dict] = []
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            name = m.group(11).strip()
            inode = int(m.group(10))
            vmas.append({
                "start": start, "end": end, "read": m.group(3) == "r", "write": m.group(4) == "w",
                "exec": m.group(5) == "x", "shared": m.group(6) == "s", "offset": int(m.group(7), 16),
                "inode": inode, "name": name, "file": inode != 0 or name.startswith("/"),
                "AnonHugePages": 0, "THPeligible": 0, "VmFlags": [],
            })
            continue
        if vmas and ":" in line:
            key, _, rest = line.partition(":")
            if key in ("AnonHugePages", "THPeligible"):
                vmas[-1][key] = int(rest.split()[0])
            elif key == "VmFlags":
                vmas[-1][key] = rest.split()
    return vmas


THP_SYSFS = "/sys/kernel/mm/transparent_hugepage"


def _sysfs_choice(path: str) -> str | None:
    """The bracketed choice of a sysfs control ("always [madvise] never" → "madvise"), or its
    whole text when it has no brackets; None when the file does not exist."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None
    m = re.search(r"\[([^\]]*)\]", text)
    return m.group(1) if m else text


def read_thp_policy() -> dict | None:
    """The live THP controls under /sys/kernel/mm/transparent_hugepage, as plain strings:
    ``enabled``, ``defrag``, ``use_zero_page``, ``shmem_enabled``, ``sizes`` (each
    ``hugepages-<size>kB/enabled``) and ``shmem_sizes`` (each ``hugepages-<size>kB/shmem_enabled``),
    sizes written "64K"; None without THP."""
    from .simulation import format_size

    if not os.path.isdir(THP_SYSFS):
        return None
    out: dict = {}
    for key in ("enabled", "defrag", "use_zero_page", "shmem_enabled"):
        v = _sysfs_choice(f"{THP_SYSFS}/{key}")
        if v is not None:
            out[key] = v
    sizes: dict[int, str] = {}
    shmem: dict[int, str] = {}
    for name in os.listdir(THP_SYSFS):
        m = re.fullmatch(r"hugepages-(\d+)kB", name)
        if not m:
            continue
        size = int(m.group(1)) << 10
        for table, ctl in ((sizes, "enabled"), (shmem, "shmem_enabled")):
            v = _sysfs_choice(f"{THP_SYSFS}/{name}/{ctl}")
            if v is not None:
                table[size] = v
    out["sizes"] = {format_size(s): sizes[s] for s in sorted(sizes)}
    out["shmem_sizes"] = {format_size(s): shmem[s] for s in sorted(shmem)}
    return out


def _thp_enabled(pid: int) -> int:
    """/proc/<pid>/status "THP_enabled": 0 when PR_SET_THP_DISABLE disabled THP completely
    (its "except advised" form, 6.18+, shows 1)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("THP_enabled:"):
                    return 1 if line.split()[1] != "0" else 0
    except (FileNotFoundError, ProcessLookupError) as e:
        raise CaptureError(f"process {pid} exited during the capture") from e
    return 1


def capture(pids: int | Iterable[int], *, skip_special: bool = True,
            ranges: Iterable[tuple[int, int]] | None = None) -> Snapshot:
    """Captures the page tables of one or more live processes into a :class:`Snapshot`;
    ``ranges`` (address pairs) keeps only the VMAs that overlap one of them."""
    want = list(ranges) if ranges is not None else None
    pid_list = [pids] if isinstance(pids, int) else list(pids)
    if not pid_list:
        raise CaptureError("no process to capture")
    for pid in pid_list:
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ValueError(f"a pid must be a positive int, not {pid!r}")
    if len(set(pid_list)) != len(pid_list):
        raise ValueError(f"pids {pid_list} name a process twice")
    page = os.sysconf("SC_PAGE_SIZE")
    pmd = _pmd_pages(page)
    for path in ("/proc/kpageflags", "/proc/kpagecount"):
        os.close(_open(path))
    cols: dict[str, list] = {k: [] for k in ("vma_pid", "vma_start", "vma_end", "vma_flags", "vma_pgoff",
                                             "vma_anon_huge_kb")}
    names: list[str] = []
    maps: list[np.ndarray] = []
    started: dict[int, tuple[str, str, int, int]] = {}
    thp_enabled: list[int] = []
    for pid in pid_list:
        started[pid] = _live(pid)
        vmas = read_vmas(pid)
        thp_enabled.append(_thp_enabled(pid))
        if not vmas:
            _unchanged(pid, started[pid])
            raise CaptureError(f"process {pid} ({started[pid][0]}) has no memory mappings")
        fd = _open(f"/proc/{pid}/pagemap", pid)
        try:
            for v in vmas:
                if skip_special and v["name"] in ("[vsyscall]", "[vvar]", "[vvar_vclock]", "[vdso]"):
                    continue
                if want is not None and not any(v["start"] < e and s < v["end"] for s, e in want):
                    continue
                n = (v["end"] - v["start"]) // page
                if n > MAX_VMA_PAGES:
                    continue
                entries = _pread_u64(fd, v["start"] // page, n, f"/proc/{pid}/pagemap", pid)
                maps.append(entries)
                cols["vma_pid"].append(pid)
                cols["vma_start"].append(v["start"])
                cols["vma_end"].append(v["end"])
                flags = ((VMA_READ if v["read"] else 0) | (VMA_WRITE if v["write"] else 0)
                         | (VMA_EXEC if v["exec"] else 0) | (VMA_SHARED if v["shared"] else 0)
                         | (VMA_FILE if v["file"] else 0) | (VMA_HUGEPAGE if "hg" in v.get("VmFlags", ()) else 0)
                         | (VMA_NOHUGEPAGE if "nh" in v.get("VmFlags", ()) else 0))
                cols["vma_flags"].append(flags)
                cols["vma_pgoff"].append(v["offset"] // page)
                cols["vma_anon_huge_kb"].append(v["AnonHugePages"])
                names.append(v["name"])
        finally:
            os.close(fd)
        _unchanged(pid, started[pid])
    pagemap = np.concatenate(maps) if maps else np.zeros(0, dtype=np.uint64)
    present = pagemap[(pagemap & np.uint64(PM_PRESENT)) != 0]
    pfns = present & np.uint64(PM_PFN_MASK)
    if len(pfns) and not np.any(pfns):
        raise CaptureError("pagemap shows every PFN as 0: PFNs are hidden (capture needs CAP_SYS_ADMIN)")
    wins = np.unique(pfns - pfns % np.uint64(pmd))
    kflags = _read_windows("/proc/kpageflags", wins, pmd)
    kcount = _read_windows("/proc/kpagecount", wins, pmd)
    # An exit while the frames were read leaves pfns whose folios are already freed.
    for pid in pid_list:
        _unchanged(pid, started[pid])
    offsets = np.zeros(len(maps) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(m) for m in maps])
    header = {
        "schema_version": SCHEMA_VERSION,
        "kernel_release": platform.release(),
        "arch": _arch(),
        "page_size": page,
        "pmd_pages": pmd,
        "capture_time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "pids": pid_list,
        "inferred": list(INFERRED),
        "source": "live",
        "thp_enabled": thp_enabled,
    }
    policy = read_thp_policy()
    if policy is not None:
        header["thp_policy"] = policy
    arrays: dict[str, np.ndarray] = {
        "vma_pid": np.asarray(cols["vma_pid"], dtype=np.int64),
        "vma_start": np.asarray(cols["vma_start"], dtype=np.uint64),
        "vma_end": np.asarray(cols["vma_end"], dtype=np.uint64),
        "vma_flags": np.asarray(cols["vma_flags"], dtype=np.uint32),
        "vma_pgoff": np.asarray(cols["vma_pgoff"], dtype=np.uint64),
        "vma_anon_huge_kb": np.asarray(cols["vma_anon_huge_kb"], dtype=np.int64),
        "vma_page_offset": offsets,
        "pagemap": pagemap,
        "win_start": wins.astype(np.uint64),
        "kpageflags": kflags,
        "kpagecount": kcount,
    }
    return Snapshot(header, arrays, names)


def _read_windows(path: str, wins: np.ndarray, pmd: int) -> np.ndarray:
    """The entries of every window, reading runs of adjacent windows with one preadv each."""
    out = np.empty(len(wins) * pmd, dtype=np.uint64)
    if not len(wins):
        return out
    fd = _open(path)
    try:
        w = wins.astype(np.int64)
        breaks = np.flatnonzero(np.diff(w) != pmd) + 1
        for run in np.split(np.arange(len(w)), breaks):
            first = int(w[run[0]])
            out[run[0] * pmd:(run[-1] + 1) * pmd] = _pread_u64(fd, first, len(run) * pmd, path)
    finally:
        os.close(fd)
    return out


__all__ = ["capture", "read_vmas", "proc_stat", "CHUNK"]

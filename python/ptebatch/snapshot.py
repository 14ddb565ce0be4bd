"""Snapshots of real page tables: a versioned .npz file with a JSON header.

A snapshot holds, per captured process, its VMAs and the /proc/<pid>/pagemap entry of every
page of them, plus /proc/kpageflags and /proc/kpagecount for every PMD-sized, naturally
aligned window of page frames that contains a mapped page (a large folio never leaves its
window, so every folio can be rebuilt from its compound head and tail flags).

Saving (``Snapshot.save``) writes a temporary file in the target's directory and renames it
over the target (``os.replace``), so a reader sees the old file or the new one, never half of
one. The target must be a free name or a regular file: a directory, device (``/dev/null``),
FIFO or socket is refused, and so is a symbolic link, dangling or not (writing through a
link is how a privileged writer gets tricked into replacing another file; give the link's
target instead). A new file gets the mode ``open()`` would give it (0666 less the umask); a
replaced file keeps its permission bits and, where allowed, its owner. Failures raise
``SnapshotError`` with a one-line message and leave no temporary file.

Loading (``Snapshot.load``) reads only a regular file and never unpickles. Before any array
data is read it checks the zip's member list (exactly the known members, none twice, stored
or deflated, not encrypted), each member's declared size against its compressed size (no
more than deflate can expand) and against the .npy header's dtype and one-dimensional shape,
and the total against ``max_bytes``; memory use is thus bounded by what the file really holds.
Then the JSON header (a header JSON cannot parse, such as an over-long integer or nesting
too deep, is refused; field types are checked strictly, no bool for an int) and the
consistency of the arrays are validated (``validate``). Any defect, whatever the
underlying zip, zlib, JSON or numpy error, raises ``SnapshotError`` naming the file and the
problem, and yields nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
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

# VMA flag bits of the snapshot's vma_flags column; VM_HUGEPAGE / VM_NOHUGEPAGE are smaps'
# VmFlags "hg" / "nh".
VMA_READ, VMA_WRITE, VMA_EXEC, VMA_SHARED, VMA_FILE = 1, 2, 4, 8, 16
VMA_HUGEPAGE, VMA_NOHUGEPAGE = 32, 64

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

#: Default bound on the total uncompressed size of a snapshot's arrays.
MAX_LOAD_BYTES = 4 << 30

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
        """Writes the snapshot atomically; ``path`` must be absent or a regular file (see the
        module docstring). Raises ``SnapshotError`` when the snapshot or the path is unfit."""
        path = os.fspath(path)
        validate(self.header, self.arrays)
        _check_names(self.vma_names, len(self.arrays["vma_start"]))
        try:
            blob = json.dumps(dict(self.header, vma_names=self.vma_names), sort_keys=True).encode()
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"the snapshot header cannot be written as JSON: {e}") from e
        mode, owner = _output_mode(path)
        d = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".snapshot-", suffix=".npz", dir=d)
        except OSError as e:
            raise SnapshotError(f"cannot write snapshot {path!r}: {e.strerror}") from e
        try:
            with os.fdopen(fd, "wb") as f:
                # mkstemp creates 0600; give the mode a plain open() would have (or the old file's).
                os.fchmod(f.fileno(), mode)
                if owner is not None:
                    with contextlib.suppress(PermissionError):
                        os.fchown(f.fileno(), *owner)
                np.savez_compressed(f, header=np.frombuffer(blob, dtype=np.uint8), **self.arrays)  # type: ignore[arg-type]
                f.flush()
                os.fsync(f.fileno())
            _output_mode(path)  # again: the path may have been replaced while writing
            os.replace(tmp, path)
        except BaseException as e:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(e, OSError):
                raise SnapshotError(f"cannot write snapshot {path!r}: {e.strerror or e}") from e
            raise
        with contextlib.suppress(OSError):
            dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, max_bytes: int = MAX_LOAD_BYTES) -> "Snapshot":
        """Reads and validates a snapshot; any defect raises ``SnapshotError`` naming it.
        ``max_bytes`` bounds the arrays' total size, which is checked before anything is read."""
        name = os.fspath(path)
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise TypeError(f"max_bytes must be a non-negative int, not {max_bytes!r}")
        try:
            # O_NONBLOCK: opening a FIFO must not hang; it is refused below.
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise SnapshotError(f"cannot read snapshot {name!r}: {e.strerror}") from e
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise SnapshotError(f"{name!r} is not a snapshot: it is {_file_kind(st.st_mode)}")
        with os.fdopen(fd, "rb") as f:
            try:
                arrays = _read_members(f, st.st_size, max_bytes)
            except SnapshotError as e:
                raise SnapshotError(f"{name!r}: {e}") from None
            except Exception as e:  # zipfile and zlib raise many kinds on damaged input
                raise SnapshotError(f"{name!r} is not a readable snapshot (corrupt or truncated): "
                                    f"{type(e).__name__}: {e}") from e
        blob = arrays.pop("header")
        try:
            header = json.loads(blob.tobytes().decode())
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise SnapshotError(f"{name!r}: the header is not valid JSON: {type(e).__name__}: {str(e)[:200]}") from None
        if not isinstance(header, dict):
            raise SnapshotError(f"{name!r}: the header is not a JSON object")
        names = header.pop("vma_names", None)
        try:
            validate(header, arrays)
            _check_names(names, len(arrays["vma_start"]))
        except SnapshotError as e:
            raise SnapshotError(f"{name!r}: {e}") from None
        return cls(header, arrays, list(names))  # type: ignore[arg-type]


# Deflate expands data by at most about 1032:1 (zlib's technical details); a member that
# declares more than that from its compressed size is lying.
_MAX_DEFLATE_RATIO = 1032
#: Members of the .npz file, each a one-dimensional array of this dtype.
MEMBERS = {"header": np.uint8, **ARRAYS}
_NPY_HEADER = re.compile(r"\{'descr':\s*'([^']{1,16})',\s*'fortran_order':\s*(True|False),\s*"
                         r"'shape':\s*\(([0-9, ]{0,80})\),?\s*\}\s*")
_CHUNK = 16 << 20


def _read_members(f: Any, size: int, max_bytes: int) -> dict[str, np.ndarray]:
    """The arrays of an .npz file, after checking its member list, every member's declared size
    against its compressed size and the .npy header's dtype and shape: memory stays bounded by
    what the file can really hold, and nothing is unpickled."""
    zf = zipfile.ZipFile(f)
    infos = zf.infolist()
    names = [i.filename for i in infos]
    if len(names) != len(set(names)):
        raise SnapshotError("the zip archive lists a member twice")
    want = {k + ".npy": k for k in MEMBERS}
    extra = sorted(set(names) - set(want))
    if extra:
        raise SnapshotError(f"unknown members {[n[:64] for n in extra[:4]]}{' ...' if len(extra) > 4 else ''}")
    missing = sorted(k for n, k in want.items() if n not in names)
    if missing:
        raise SnapshotError(f"members missing: {missing}")
    total = 0
    for i in infos:
        if i.flag_bits & 1:
            raise SnapshotError(f"member {i.filename} is encrypted")
        if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise SnapshotError(f"member {i.filename} uses zip compression method {i.compress_type}, "
                                "not stored or deflate")
        limit = i.compress_size if i.compress_type == zipfile.ZIP_STORED else i.compress_size * _MAX_DEFLATE_RATIO + 1024
        if i.compress_size > size or i.file_size > limit:
            raise SnapshotError(f"member {i.filename} declares {i.file_size} bytes from {i.compress_size} "
                                f"compressed bytes in a file of {size}")
        total += i.file_size
    if total > max_bytes:
        raise SnapshotError(f"the arrays hold {total} bytes, more than max_bytes={max_bytes}")
    arrays = {}
    for i in infos:
        key = want[i.filename]
        m: Any
        with zf.open(i) as m:
            dtype, n, offset = _npy_header(m, key, MEMBERS[key])
            if offset + n * dtype.itemsize != i.file_size:
                raise SnapshotError(f"member {i.filename}: shape ({n},) does not match its {i.file_size} bytes")
            buf = bytearray(n * dtype.itemsize)
            view = memoryview(buf)
            done = 0
            while done < len(buf):
                got = m.readinto(view[done:done + _CHUNK])
                if not got:
                    raise SnapshotError(f"member {i.filename} is truncated")
                done += got
            if m.read(1):  # also makes zipfile check the CRC
                raise SnapshotError(f"member {i.filename} holds more data than its shape")
        arrays[key] = np.frombuffer(buf, dtype=dtype)
    return arrays


def _npy_header(m: Any, key: str, typ: Any) -> tuple[np.dtype, int, int]:
    """(dtype, length, data offset) from a member's .npy header; the array must be 1-d of ``typ``."""
    pre = m.read(8)
    if len(pre) != 8 or pre[:6] != b"\x93NUMPY" or pre[6] not in (1, 2, 3):
        raise SnapshotError(f"member {key}.npy is not a .npy array")
    width = 2 if pre[6] == 1 else 4
    raw = m.read(width)
    if len(raw) != width:
        raise SnapshotError(f"member {key}.npy is truncated")
    hlen = int.from_bytes(raw, "little")
    if hlen > 4096:
        raise SnapshotError(f"member {key}.npy has a {hlen}-byte .npy header")
    text = m.read(hlen)
    match = _NPY_HEADER.fullmatch(text.decode("latin-1"))
    if len(text) != hlen or not match:
        raise SnapshotError(f"member {key}.npy has an unreadable .npy header")
    descr, _, dims = match.groups()
    shape = tuple(int(x) for x in dims.split(",") if x.strip())
    if descr != np.dtype(typ).str or len(shape) != 1:
        raise SnapshotError(f"member {key}.npy is a {len(shape)}-d array of {descr!r}; "
                            f"a one-dimensional {np.dtype(typ).str!r} array is expected")
    return np.dtype(typ), shape[0], 8 + width + hlen


def _check_names(names: Any, nv: int) -> None:
    if not isinstance(names, list) or len(names) != nv or not all(isinstance(n, str) for n in names):
        raise SnapshotError("vma_names must list one name (a string) per VMA")


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return kind
    return "not a regular file"


def _umask() -> int:
    # /proc/self/status shows it without changing it (os.umask would, racing other threads).
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def _output_mode(path: str) -> tuple[int, tuple[int, int] | None]:
    """(mode, owner to keep) for a snapshot written to ``path``; refuses any path but a
    regular file or a free name."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return 0o666 & ~_umask(), None
    except OSError as e:
        raise SnapshotError(f"cannot write snapshot {path!r}: {e.strerror}") from e
    if stat.S_ISLNK(st.st_mode):
        raise SnapshotError(f"will not write snapshot {path!r}: it is a symbolic link (give its target's path)")
    if not stat.S_ISREG(st.st_mode):
        raise SnapshotError(f"will not write snapshot {path!r}: it is {_file_kind(st.st_mode)}, not a regular file")
    return stat.S_IMODE(st.st_mode) & 0o777, (st.st_uid, st.st_gid)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _validate_thp(header: dict[str, Any]) -> None:
    """The optional THP fields: ``thp_policy`` (the sysfs controls as plain strings, see
    ``capture.read_thp_policy``) and ``thp_enabled`` (per pid, /proc/<pid>/status)."""
    pol = header.get("thp_policy")
    if pol is not None:
        ok = isinstance(pol, dict) and all(isinstance(k, str) for k in pol)
        for key, v in pol.items() if ok else ():
            if key in ("sizes", "shmem_sizes"):
                ok &= isinstance(v, dict) and all(isinstance(a, str) and isinstance(b, str) for a, b in v.items())
            else:
                ok &= isinstance(v, str)
        if not ok:
            raise SnapshotError("header field 'thp_policy' must map control names to strings "
                                "('sizes' and 'shmem_sizes' to dicts of strings)")
    te = header.get("thp_enabled")
    if te is not None and not (isinstance(te, list) and len(te) == len(header["pids"])
                               and all(_is_int(x) and x in (0, 1) for x in te)):
        raise SnapshotError("header field 'thp_enabled' must hold 0 or 1 for each pid")


def validate(header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Checks a snapshot's header and arrays for consistency; raises ``SnapshotError``."""
    if not isinstance(header, dict):
        raise SnapshotError("the header is not a dict")
    v = header.get("schema_version")
    if not isinstance(v, int) or isinstance(v, bool):
        raise SnapshotError("the header has no integer schema_version")
    if v > SCHEMA_VERSION:
        raise SnapshotError(f"snapshot schema version {v} is newer than this ptebatch reads ({SCHEMA_VERSION})")
    if v < 1:
        raise SnapshotError(f"snapshot schema version {v} is not valid")
    fields: tuple[tuple[str, type], ...] = (("kernel_release", str), ("arch", str), ("page_size", int), ("pmd_pages", int),
                     ("capture_time", str), ("pids", list), ("inferred", list))
    for key, typ in fields:
        x = header.get(key)
        if not isinstance(x, typ) or isinstance(x, bool):
            raise SnapshotError(f"header field {key!r} is missing or not a {typ.__name__}")
    if "source" in header and not isinstance(header["source"], str):
        raise SnapshotError("header field 'source' is not a str")
    ps, pmd = header["page_size"], header["pmd_pages"]
    if not (1 << 10 <= ps <= 1 << 21 and 2 <= pmd <= 1 << 16) or ps & (ps - 1) or pmd & (pmd - 1):
        raise SnapshotError(f"page_size {ps} / pmd_pages {pmd} are not plausible powers of two")
    pids = header["pids"]
    if not all(_is_int(p) and 0 <= p < 1 << 63 for p in pids) or len(set(pids)) != len(pids):
        raise SnapshotError("header field 'pids' must list distinct non-negative integers")
    if not all(isinstance(x, str) for x in header["inferred"]):
        raise SnapshotError("header field 'inferred' must list strings")
    _validate_thp(header)
    if not isinstance(arrays, dict):
        raise SnapshotError("the arrays are not a dict")
    missing = set(ARRAYS) - set(arrays)
    if missing:
        raise SnapshotError(f"snapshot arrays missing: {sorted(missing)}")
    extra = set(arrays) - set(ARRAYS)
    if extra:
        raise SnapshotError(f"unknown snapshot arrays: {sorted(map(str, extra))[:4]}")
    for k, dt in ARRAYS.items():
        a = arrays[k]
        if not isinstance(a, np.ndarray) or a.dtype != np.dtype(dt) or a.ndim != 1:
            what = f"{a.ndim}-d {a.dtype}" if isinstance(a, np.ndarray) else type(a).__name__
            raise SnapshotError(f"array {k!r} must be one-dimensional {np.dtype(dt)}, not {what}")
    nv = len(arrays["vma_start"])
    for k in ("vma_pid", "vma_end", "vma_flags", "vma_pgoff", "vma_anon_huge_kb"):
        if len(arrays[k]) != nv:
            raise SnapshotError(f"array {k!r} has {len(arrays[k])} entries for {nv} VMAs")
    start, end, upid = arrays["vma_start"], arrays["vma_end"], arrays["vma_pid"]
    if np.any(end <= start) or np.any(start % np.uint64(ps)) or np.any(end % np.uint64(ps)):
        raise SnapshotError("a VMA is empty or not page-aligned")
    order = np.lexsort((start, upid))
    same = upid[order][1:] == upid[order][:-1]
    if np.any(same & (start[order][1:] < end[order][:-1])):
        raise SnapshotError("two VMAs of one process overlap")
    if np.any(arrays["vma_flags"] >> np.uint32(7)) or np.any(arrays["vma_anon_huge_kb"] < 0):
        raise SnapshotError("vma_flags has unknown bits or vma_anon_huge_kb is negative")
    off = arrays["vma_page_offset"]
    if len(off) != nv + 1 or off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != len(arrays["pagemap"]):
        raise SnapshotError("vma_page_offset does not partition the pagemap array")
    pages = (end - start) // np.uint64(ps)
    if not np.array_equal(np.diff(off).astype(np.uint64), pages):
        raise SnapshotError("VMA sizes and pagemap entries disagree")
    # A file offset is a loff_t: the VMA's last byte must lie below 2^63.
    limit = np.uint64((1 << 63) // ps)
    if np.any(arrays["vma_pgoff"] > limit - np.minimum(pages, limit)):
        raise SnapshotError("a VMA's file offset is beyond what a file can hold")
    nw = len(arrays["win_start"])
    if len(arrays["kpageflags"]) != nw * pmd or len(arrays["kpagecount"]) != nw * pmd:
        raise SnapshotError("kpageflags/kpagecount do not cover the frame windows")
    both = np.uint64(KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL)
    if np.any((arrays["kpageflags"] & both) == both):
        raise SnapshotError("kpageflags mark a page as a compound head and a tail at once, which no kernel shows")
    win = arrays["win_start"]
    if np.any(win % np.uint64(pmd)) or np.any(win[1:] <= win[:-1]) or np.any(win > np.uint64(PM_PFN_MASK)):
        raise SnapshotError("frame windows are not sorted, distinct and PMD-aligned")
    if nv and set(pids) != set(int(p) for p in np.unique(upid)):
        raise SnapshotError("header pids and VMA pids disagree")
    pm = arrays["pagemap"]
    present = pm[(pm & np.uint64(PM_PRESENT)) != 0] & np.uint64(PM_PFN_MASK)
    if len(present):
        wins = present - present % np.uint64(pmd)
        if not np.all(np.isin(wins, win)):
            raise SnapshotError("a mapped pfn lies outside the captured frame windows")


__all__ = ["Snapshot", "SCHEMA_VERSION", "INFERRED", "MAX_LOAD_BYTES", "validate"]

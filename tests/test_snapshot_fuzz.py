"""Damaged and crafted snapshot files: loading (and replaying what loads) raises only
``SnapshotError``, never reads more than the file can hold, and never unpickles."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch.snapshot import ARRAYS, Snapshot
from ptebatch.thpmaps import snapshot_of


def _base() -> Snapshot:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    v = p.mmap("256K", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    z = p.mmap("16K")
    p.touch(z.start, z.length)  # zero page
    f = sim.create_file("64K", "16K")
    m = p.mmap("64K", "r", file=f)
    p.touch(m.start, m.length)
    c = p.fork()
    c.write(v.page(3))
    return snapshot_of(sim, [p, c])


BASE = _base()


def _members(snap: Snapshot = BASE) -> dict[str, np.ndarray]:
    header = dict(snap.header, vma_names=snap.vma_names)
    return {"header": np.frombuffer(json.dumps(header).encode(), np.uint8), **snap.arrays}


def _npz(members: dict[str, np.ndarray], compressed: bool = False) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **members)
    return buf.getvalue()


def _load_and_replay(tmp_path, data: bytes) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(data)
    try:
        snap = Snapshot.load(path)
    except pb.SnapshotError as e:
        assert str(e) and "\n" not in str(e)
        return
    try:
        sim, _ = pb.Simulation.from_snapshot(snap, "6.18")
    except pb.SnapshotError:
        return
    sim.check()


GOOD = _npz(_members(), compressed=True)
STORED = _npz(_members())


def test_the_base_file_loads(tmp_path) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(GOOD)
    back = Snapshot.load(path)
    assert back.vma_names == BASE.vma_names
    pb.Simulation.from_snapshot(back)[0].check()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.sampled_from([GOOD, STORED]), flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(1, 255)),
                                                         min_size=1, max_size=4))
def test_byte_flips(tmp_path, data: bytes, flips: list[tuple[int, int]]) -> None:
    b = bytearray(data)
    for pos, x in flips:
        b[pos % len(b)] ^= x
    _load_and_replay(tmp_path, bytes(b))


@pytest.mark.parametrize("cut", [0, 1, 4, 22, 100, 1000, -1, -22, -23, -100, -1000])
def test_truncations(tmp_path, cut: int) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(GOOD[:cut])
    with pytest.raises(pb.SnapshotError):
        Snapshot.load(path)


_ARRAY_NAMES = sorted(ARRAYS)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.sampled_from(_ARRAY_NAMES), st.integers(0, 1 << 16),
                                st.sampled_from([0, 1, 2, 3, 7, 8, 255, 511, 512, 1 << 15, 1 << 16, 1 << 31,
                                                 1 << 55, 1 << 63, (1 << 63) | (1 << 20), (1 << 64) - 1])),
                      min_size=1, max_size=5))
def test_crafted_array_values(tmp_path, edits: list[tuple[str, int, int]]) -> None:
    """Well-formed files with wrong contents: consistent-looking but lying arrays."""
    m = {k: v.copy() for k, v in _members().items()}
    for name, i, x in edits:
        a = m[name]
        if len(a):
            a[i % len(a)] = np.array(x).astype(np.uint64).astype(a.dtype)
    _load_and_replay(tmp_path, _npz(m))


def _header_with(**changes) -> dict[str, np.ndarray]:
    m = _members()
    h = json.loads(m["header"].tobytes())
    h.update(changes)
    m["header"] = np.frombuffer(json.dumps(h).encode(), np.uint8)
    return m


HEADERS = {
    "huge-int": lambda: _raw_header(b'{"schema_version": 1' + b"0" * 5000 + b"}"),
    "huge-page-size": lambda: _header_with(page_size=1 << 40),
    "bool-page-size": lambda: _header_with(page_size=True),
    "string-page-size": lambda: _header_with(page_size="4096"),
    "float-pmd": lambda: _header_with(pmd_pages=512.0),
    "deep-nesting": lambda: _raw_header(b'{"schema_version": 1, "x": ' + b"[" * 100000 + b"]" * 100000 + b"}"),
    "deep-nesting-unclosed": lambda: _raw_header(b"[" * 200000),
    "not-object": lambda: _raw_header(b"[1, 2, 3]"),
    "not-utf8": lambda: _raw_header(b'{"a": "\xff\xfe"}'),
    "pids-bool": lambda: _header_with(pids=[True]),
    "pids-str": lambda: _header_with(pids=["1"]),
    "pids-dup": lambda: _header_with(pids=BASE.pids + BASE.pids[:1]),
    "names-int": lambda: _header_with(vma_names=list(range(len(BASE.vma_names)))),
    "names-short": lambda: _header_with(vma_names=[]),
    "inferred-int": lambda: _header_with(inferred=[1]),
    "arch-unknown": lambda: _header_with(arch="vax"),
    "release-junk": lambda: _header_with(kernel_release="junk"),
    "release-old": lambda: _header_with(kernel_release="4.19.0"),
    "version-null": lambda: _header_with(schema_version=None),
    "header-2d": lambda: dict(_members(), header=np.zeros((2, 2), np.uint8)),
    "header-int64": lambda: dict(_members(), header=np.zeros(4, np.int64)),
    "header-empty": lambda: dict(_members(), header=np.zeros(0, np.uint8)),
}


def _raw_header(raw: bytes) -> dict[str, np.ndarray]:
    return dict(_members(), header=np.frombuffer(raw, np.uint8))


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_crafted_headers(tmp_path, case: str) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(_npz(HEADERS[case]()))
    with pytest.raises(pb.SnapshotError) as e:
        snap = Snapshot.load(path)
        pb.Simulation.from_snapshot(snap)  # arch and release are only checked by replay
    assert "\n" not in str(e.value)


MEMBERS = {
    "extra": lambda m: m.update(surprise=np.zeros(3)),
    "missing": lambda m: m.pop("kpagecount"),
    "int32-pagemap": lambda m: m.update(pagemap=m["pagemap"].astype(np.int32)),
    "big-endian-pagemap": lambda m: m.update(pagemap=m["pagemap"].astype(">u8")),
    "2d-pagemap": lambda m: m.update(pagemap=m["pagemap"].reshape(-1, 1)),
    "0d-pagemap": lambda m: m.update(pagemap=np.array(5, np.uint64)),
    "fortran-2d": lambda m: m.update(pagemap=np.asfortranarray(np.zeros((4, 4), np.uint64))),
    "object-pagemap": lambda m: m.update(pagemap=np.array([1, "x"], dtype=object)),
    "struct-pagemap": lambda m: m.update(pagemap=np.zeros(3, [("a", "<u8")])),
}


@pytest.mark.parametrize("case", sorted(MEMBERS))
def test_wrong_members(tmp_path, case: str) -> None:
    m = _members()
    MEMBERS[case](m)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=True, **m) if case == "object-pagemap" else np.savez(buf, **m)
    path = tmp_path / "s.npz"
    path.write_bytes(buf.getvalue())
    with pytest.raises(pb.SnapshotError):
        Snapshot.load(path)


def _zip(entries: list[tuple[str, bytes]], method: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings(), zipfile.ZipFile(buf, "w", method) as z:
        warnings.simplefilter("ignore")  # a duplicate name is what one case wants
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _members_as_npy() -> list[tuple[str, bytes]]:
    return [(k + ".npy", _npy(v)) for k, v in _members().items()]


def _other_files() -> dict[str, bytes]:
    npy = _members_as_npy()
    hdr = _npy(np.zeros(1 << 10, np.uint64))
    lying = hdr.replace(b"(1024,)", b"(1099511627776,)")  # a header declaring 8 TiB of data
    return {
        "plain-npy": _npy(BASE.arrays["pagemap"]),
        "text": b"not a snapshot\n" * 100,
        "empty": b"",
        "duplicate-member": _zip(npy + npy[:1]),
        "npy-huge-shape": _zip([(n, lying) if n == "pagemap.npy" else (n, d) for n, d in npy]),
        "not-npy-member": _zip([(n, b"garbage" * 10) if n == "pagemap.npy" else (n, d) for n, d in npy]),
        "bzip2": _zip(npy, zipfile.ZIP_BZIP2),
        "lzma": _zip(npy, zipfile.ZIP_LZMA),
        "directory-entry": _zip(npy + [("dir/", b"")]),
    }


OTHER_FILES = _other_files()


@pytest.mark.parametrize("case", sorted(OTHER_FILES))
def test_other_files(tmp_path, case: str) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(OTHER_FILES[case])
    with pytest.raises(pb.SnapshotError):
        Snapshot.load(path)


def test_non_regular_paths(tmp_path) -> None:
    with pytest.raises(pb.SnapshotError, match="directory"):
        Snapshot.load(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(pb.SnapshotError, match="FIFO"):
        Snapshot.load(fifo)  # and does not block waiting for a writer
    if os.path.exists("/dev/zero"):
        with pytest.raises(pb.SnapshotError, match="character device"):
            Snapshot.load("/dev/zero")


def _declare(data: bytes, member: str, size: int) -> bytes:
    """``data`` (a zip) with ``member``'s uncompressed size declared as ``size`` in its local
    header and in the central directory."""
    b = bytearray(data)
    name = member.encode()
    for sig, off in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = 0
        while (pos := b.find(sig, pos)) >= 0:
            nlen_off = 26 if sig == b"PK\x03\x04" else 28
            nlen = struct.unpack_from("<H", b, pos + nlen_off)[0]
            start = pos + (30 if sig == b"PK\x03\x04" else 46)
            if bytes(b[start:start + nlen]) == name:
                struct.pack_into("<I", b, pos + off, size)
            pos += 4
    return bytes(b)


def _huge_cases(tmp_path) -> dict[str, str]:
    npy = _members_as_npy()
    extra = _zip(npy + [("extra.npy", _npy(np.zeros(1 << 12, np.uint8)))], zipfile.ZIP_DEFLATED)
    known = _zip(npy, zipfile.ZIP_DEFLATED)
    cases = {
        # One extra member declaring 4 GiB: refused by its name, before any of it is read.
        "extra-4g": _declare(extra, "extra.npy", 0xFFFFFFF0),
        # A known member declaring 4 GiB from a few hundred compressed bytes.
        "pagemap-4g": _declare(known, "pagemap.npy", 0xFFFFFFF0),
    }
    out = {}
    for k, v in cases.items():
        p = tmp_path / f"{k}.npz"
        p.write_bytes(v)
        out[k] = str(p)
    return out


def test_huge_declarations_are_refused_within_bounded_memory(tmp_path) -> None:
    """Run where the address space is limited to 1 GiB: reading any of these files' declared
    contents would fail with MemoryError instead of the SnapshotError expected."""
    cases = _huge_cases(tmp_path)
    script = textwrap.dedent(f"""
        import resource, sys
        import ptebatch as pb
        from ptebatch.snapshot import Snapshot
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        for name, path in {cases!r}.items():
            try:
                Snapshot.load(path)
            except pb.SnapshotError as e:
                print(name, "SnapshotError", e)
            else:
                print(name, "loaded")
    """)
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert set(lines) == set(cases)
    for name, out in lines.items():
        assert out.startswith("SnapshotError"), (name, out)
    assert "unknown members" in lines["extra-4g"]
    assert "declares" in lines["pagemap-4g"]


def test_max_bytes_bounds_honest_files_too(tmp_path) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(GOOD)
    total = sum(v.nbytes for v in _members().values())
    with pytest.raises(pb.SnapshotError, match="max_bytes"):
        Snapshot.load(path, max_bytes=total // 2)
    Snapshot.load(path, max_bytes=2 * total)


def test_a_flipped_data_byte_in_a_stored_member_fails_its_crc(tmp_path) -> None:
    b = bytearray(STORED)
    b[b.find(b"NUMPY", b.find(b"pagemap.npy")) + 200] ^= 1  # inside pagemap's data
    path = tmp_path / "s.npz"
    path.write_bytes(bytes(b))
    with pytest.raises(pb.SnapshotError, match="CRC"):
        Snapshot.load(path)


@pytest.mark.parametrize("pgoff", [1 << 63, (1 << 64) - 1, (1 << 51) - 1])
def test_file_offsets_beyond_a_loff_t(tmp_path, pgoff: int) -> None:
    m = {k: v.copy() for k, v in _members().items()}
    m["vma_pgoff"][np.flatnonzero(m["vma_flags"] & 16)[0]] = np.uint64(pgoff)
    path = tmp_path / "s.npz"
    path.write_bytes(_npz(m))
    with pytest.raises(pb.SnapshotError, match="file offset"):
        Snapshot.load(path)

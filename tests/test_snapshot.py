"""Snapshots: round trip, and every kind of damaged file is refused with SnapshotError."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import ptebatch as pb
from ptebatch.snapshot import SCHEMA_VERSION, Snapshot
from ptebatch.thpmaps import snapshot_of


@pytest.fixture
def snap() -> Snapshot:
    sim = pb.Simulation("x86-64", "6.18", "64M")
    p = sim.spawn()
    v = p.mmap("1M", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    c = p.fork()
    c.write(v.page(3))
    return snapshot_of(sim, [p, c])


def test_round_trip(tmp_path, snap: Snapshot) -> None:
    path = tmp_path / "s.npz"
    snap.save(path)
    back = Snapshot.load(path)
    assert back.header == snap.header
    assert back.vma_names == snap.vma_names
    for k, a in snap.arrays.items():
        assert np.array_equal(back.arrays[k], a) and back.arrays[k].dtype == a.dtype
    assert [f for f in os.listdir(tmp_path)] == ["s.npz"], "no temporary file is left behind"


def _rewrite(path, mutate) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    mutate(arrays)
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _header(arrays, **changes):
    h = json.loads(arrays["header"].tobytes())
    h.update(changes)
    arrays["header"] = np.frombuffer(json.dumps(h).encode(), dtype=np.uint8)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "future", "no-header", "bad-json", "missing-array",
                                    "wrong-dtype", "bad-offsets", "bad-windows", "extra-array", "empty"])
def test_damaged_files_are_refused(tmp_path, snap: Snapshot, damage: str) -> None:
    path = tmp_path / "s.npz"
    snap.save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"not a snapshot" * 100)
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "future":
        _rewrite(path, lambda a: _header(a, schema_version=SCHEMA_VERSION + 1))
    elif damage == "no-header":
        _rewrite(path, lambda a: a.pop("header"))
    elif damage == "bad-json":
        _rewrite(path, lambda a: a.__setitem__("header", np.frombuffer(b"{nope", dtype=np.uint8)))
    elif damage == "missing-array":
        _rewrite(path, lambda a: a.pop("kpagecount"))
    elif damage == "wrong-dtype":
        _rewrite(path, lambda a: a.__setitem__("pagemap", a["pagemap"].astype(np.int32)))
    elif damage == "bad-offsets":
        _rewrite(path, lambda a: a.__setitem__("vma_page_offset", a["vma_page_offset"] + 1))
    elif damage == "bad-windows":
        _rewrite(path, lambda a: a.__setitem__("win_start", a["win_start"] + 1))
    elif damage == "extra-array":
        _rewrite(path, lambda a: a.__setitem__("surprise", np.zeros(3)))
    with pytest.raises(pb.SnapshotError):
        Snapshot.load(path)


def test_missing_file_and_failed_save(tmp_path, snap: Snapshot) -> None:
    with pytest.raises(pb.SnapshotError, match="cannot read"):
        Snapshot.load(tmp_path / "nope.npz")
    bad = Snapshot(dict(snap.header, schema_version="x"), snap.arrays, snap.vma_names)
    with pytest.raises(pb.SnapshotError):
        bad.save(tmp_path / "t.npz")
    assert not (tmp_path / "t.npz").exists()


def test_replay_of_a_simulated_snapshot_rebuilds_the_same_mappings(snap: Snapshot) -> None:
    sim, procs = pb.Simulation.from_snapshot(snap, "6.18")
    sim.check()
    a = snap.arrays
    for i in range(len(a["vma_start"])):
        p = procs[int(a["vma_pid"][i])]
        start, end = int(a["vma_start"][i]), int(a["vma_end"][i])
        got = p.pagemap(start, end - start)
        mask = np.uint64((1 << 63) | ((1 << 55) - 1))
        assert np.array_equal(got & mask, snap.vma_pages(i) & mask)
    # The child's copy is an exclusive order-0 page; the rest is shared with the parent.
    counts = [sim.kpagecount(int(x) & ((1 << 55) - 1)) for x in snap.vma_pages(0)]
    assert counts.count(1) == 1 and counts.count(2) == len(counts) - 1


# -- snapshot_of -> replay gives the same page facts ----------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ptebatch.replay import replayed_pfns  # noqa: E402
from ptebatch.snapshot import PM_PFN_MASK, PM_PRESENT  # noqa: E402

LAYOUTS = ["x86-64", "arm64-16k", "s390x", "ppc64-64k"]

_mmap = st.tuples(st.just("mmap"), st.sampled_from(["anon", "anon-mthp", "anon-mthp", "shared", "file", "file-shared", "file-large"]),
                  st.integers(1, 24))
_touch = st.tuples(st.just("touch"), st.integers(0, 99), st.integers(0, 23), st.integers(1, 24), st.booleans())
_op = st.one_of(
    _mmap, _touch, _touch,
    st.tuples(st.just("fork"), st.integers(0, 99)), st.tuples(st.just("fork"), st.integers(0, 99)),
    st.tuples(st.just("munmap"), st.integers(0, 99), st.integers(0, 23), st.integers(1, 8)),
    st.tuples(st.just("mprotect"), st.integers(0, 99), st.integers(0, 23), st.integers(1, 8),
              st.sampled_from(["r", "rw", "none"])),
    st.tuples(st.just("exit"), st.integers(0, 99)),
)
# Every sequence starts by mapping and touching something, so that there are pages to compare.
_ops = st.builds(lambda a, b, rest: [a, b, *rest], _mmap, _touch, st.lists(_op, max_size=12))


def _run(layout: str, ops: list[tuple]) -> tuple[pb.Simulation, list[pb.Process]]:
    sim = pb.Simulation(layout, "6.18", 512 * pb.layout(layout).page_size)
    page = sim.page_size
    procs = [sim.spawn()]
    maps: list[tuple[pb.Process, int, int]] = []  # (process, start, pages); forks inherit
    for op in ops:
        try:
            if op[0] == "mmap":
                _, kind, n = op
                p = procs[-1]
                if kind.startswith("file"):
                    fid = sim.create_file(32 * page, 4 * page if kind == "file-large" else page)
                    m = p.mmap(n * page, "rw", kind == "file-shared", file=fid, offset=4 * page)
                else:
                    m = p.mmap(n * page, "rw", kind == "shared", mthp=[4 * page, 16 * page] if kind == "anon-mthp" else ())
                maps.append((p, m.start, n))
                continue
            if op[0] in ("fork", "exit"):
                p = procs[op[1] % len(procs)]
                if op[0] == "fork":
                    c = p.fork()
                    procs.append(c)
                    maps += [(c, s, n) for q, s, n in maps if q == p]
                elif len(procs) > 1:
                    p.exit()
                    procs.remove(p)
                    maps = [x for x in maps if x[0] != p]
                continue
            if not maps:
                continue
            p, start, n = maps[op[1] % len(maps)]
            first = op[2] % n
            count = min(op[3], n - first)
            addr = start + first * page
            if op[0] == "touch":
                p.touch(addr, count * page, write=op[4])
            elif op[0] == "munmap":
                p.munmap(addr, count * page)
            elif op[0] == "mprotect":
                p.mprotect(addr, count * page, op[4])
        except (ValueError, pb.AccessFault, pb.OutOfMemoryError):
            pass  # an unmapped range, a write to a read-only page, a full machine: nothing changed
    return sim, procs


def _pages(snap: Snapshot) -> np.ndarray:
    """(address, VMA flags, file page or -1) of every page, in pagemap order."""
    a = snap.arrays
    per = np.diff(a["vma_page_offset"])
    v = np.repeat(np.arange(len(per)), per)
    i = np.arange(len(v)) - a["vma_page_offset"][v]
    addr = a["vma_start"][v].astype(np.int64) + i * snap.page_size
    file = np.where(a["vma_flags"][v] & 16, a["vma_pgoff"][v].astype(np.int64) + i, -1)
    return np.stack([addr, a["vma_flags"][v].astype(np.int64), file])


def _facts(snap: Snapshot, sim: pb.Simulation) -> dict[str, np.ndarray]:
    """What /proc would report of every page of every VMA."""
    pm = snap.arrays["pagemap"]
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pfn = pm & np.uint64(PM_PFN_MASK)
    zero = present & (pfn == np.uint64(sim.zero_pfn))
    real = present & ~zero
    flags = np.zeros(len(pm), np.uint64)
    count = np.zeros(len(pm), np.uint64)
    head_off = np.zeros(len(pm), np.int64)
    length = np.zeros(len(pm), np.int64)
    if real.any():
        flags[real], count[real] = snap.frame_info(pfn[real])
        heads, length[real] = snap.folio_of(pfn[real])
        head_off[real] = (pfn[real] - heads).astype(np.int64)
    return {"present": present, "zero": zero, "pfn": np.where(real, pfn, 0), "bits": pm & ~np.uint64(PM_PFN_MASK),
            "kpageflags": flags, "kpagecount": count, "offset_in_folio": head_off, "folio_pages": length}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=st.sampled_from(LAYOUTS), ops=_ops, compact=st.sampled_from([None, True]), one_name=st.booleans())
def test_snapshot_of_replays_to_the_same_page_facts(layout: str, ops: list[tuple], compact: bool | None,
                                                     one_name: bool) -> None:
    sim, procs = _run(layout, ops)
    snap = snapshot_of(sim, procs)
    if one_name:
        # As a capture shows unrelated shared anonymous mappings: all "/dev/zero (deleted)".
        files = snap.arrays["vma_flags"] & 16
        snap.vma_names = [("/dev/zero (deleted)" if f else n) for f, n in zip(files, snap.vma_names)]
    back, mapping = pb.Simulation.from_snapshot(snap, compact=compact)
    back.check()
    again = snapshot_of(back, [mapping[p.pid] for p in procs])
    # The same pages mapped the same way (replay may merge adjacent VMAs the capture could not
    # tell apart: anon_vma identity is not in /proc).
    assert np.array_equal(_pages(again), _pages(snap))
    want, got = _facts(snap, sim), _facts(again, back)
    real = want["present"] & ~want["zero"]
    if real.any():
        want["pfn"][real] = replayed_pfns(snap, want["pfn"][real], compact=compact)
    for k in want:
        bad = np.flatnonzero(want[k] != got[k])
        assert not len(bad), f"{k} differs at page {bad[0]}: {want[k][bad[0]]:#x} vs {got[k][bad[0]]:#x}"


def _shifted(snap: Snapshot, by: int) -> Snapshot:
    """The snapshot with every frame moved up by ``by`` pfns (a multiple of the PMD size)."""
    a = dict(snap.arrays)
    pm = a["pagemap"].copy()
    present = (pm & np.uint64(PM_PRESENT)) != 0
    pm[present] += np.uint64(by)
    a["pagemap"] = pm
    a["win_start"] = a["win_start"] + np.uint64(by)
    return Snapshot(dict(snap.header), a, list(snap.vma_names))


def test_sparse_pfns_are_compacted(snap: Snapshot) -> None:
    far = _shifted(snap, (1 << 31) - (1 << 20))  # one window near pfn 2^31: an 8 TiB machine
    with pytest.raises(pb.SnapshotError, match="compact=True"):
        pb.Simulation.from_snapshot(far, compact=False)
    sim, procs = pb.Simulation.from_snapshot(far)
    assert sim.nr_pages <= 128 * snap.pmd_pages, "sized by the frames used, not by the largest pfn"
    again = snapshot_of(sim, [procs[p] for p in far.pids])
    pm, got = far.arrays["pagemap"], again.arrays["pagemap"]
    present = (pm & np.uint64(PM_PRESENT)) != 0
    assert np.array_equal((got & np.uint64(PM_PRESENT)) != 0, present)
    old = pm[present] & np.uint64(PM_PFN_MASK)
    new = got[present] & np.uint64(PM_PFN_MASK)
    assert np.array_equal(new, replayed_pfns(far, old))
    assert np.array_equal(new % np.uint64(far.pmd_pages), old % np.uint64(far.pmd_pages))
    assert np.array_equal(far.frame_info(old)[1], again.frame_info(new)[1])
    assert np.array_equal(far.folio_of(old)[1], again.folio_of(new)[1])


def test_placing_a_folio_beyond_memory_or_file_is_a_value_error() -> None:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    f = sim.create_file("64K")
    for args in [((1 << 64) - 512, 9, "anon"), (0, 0, "file", f, (1 << 64) - 1), (0, 4, "file", f, 14)]:
        with pytest.raises(ValueError, match="beyond"):
            sim._b.place_folio(*args)
    sim.check()

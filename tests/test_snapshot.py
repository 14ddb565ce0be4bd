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

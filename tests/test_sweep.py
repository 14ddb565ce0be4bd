"""``ptebatch sweep``: a grid run on a Dask LocalCluster gives exactly the rows of the same grid
run in this process, a failing grid point is one row (not the end of the sweep), and the
command's errors are one line with an exit code. The Dask tests start worker processes on
127.0.0.1 and check that none is left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import psutil
import pytest

import ptebatch as pb
from ptebatch import cli, scenario, sweep
from ptebatch.thpmaps import snapshot_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATRIX = os.path.join(ROOT, "examples", "fork-munmap-matrix.toml")

#: 2 kernels x 2 layouts x 2 folio sizes x 1 scenario, 256K of memory per run.
GRID = dict(kernels=["6.8", "7.0"], arches=["x86-64", "arm64-4k"], sizes=["16K", "64K"],
            params={"region": "256K"})

READ_ONLY = """\
[params]
folio_size = "64K"

[machine]
kernels = ["6.8", "7.0"]

[[process]]
name = "p"

[[vma]]
name = "ro"
process = "p"
size = "256K"
prot = "r"
mthp = ["$folio_size"]

[[step]]
op = "touch"
vma = "ro"

[[step]]
op = "write"
vma = "ro"
every = 8
"""


def _children() -> set[int]:
    # Not multiprocessing's resource tracker: it serves this process until it exits.
    return {c.pid for c in psutil.Process().children(recursive=True)
            if "resource_tracker" not in " ".join(c.cmdline())}


@pytest.fixture(scope="module")
def client():
    """A two-worker LocalCluster, as ``ptebatch sweep --workers 2`` makes it; torn down whole."""
    before = _children()
    with sweep.dask_client(workers=2) as c:
        assert len(c.scheduler_info()["workers"]) == 2
        assert c.scheduler.address.startswith("tcp://127.0.0.1:")
        yield c
    _assert_no_new_children(before)


def _assert_no_new_children(before: set[int]) -> None:
    left = [psutil.Process(pid) for pid in _children() - before if psutil.pid_exists(pid)]
    gone, alive = psutil.wait_procs(left, timeout=10)
    assert not alive, f"worker processes left running: {alive}"


def _key(r: dict) -> tuple:
    return (r["source"], r["arch"], r["kernel"], r["folio_size"])


def _assert_same_rows(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert list(g) == list(sweep.SWEEP_FIELDS), i
        for f in sweep.SWEEP_FIELDS:
            assert g[f] == w[f] and type(g[f]) is type(w[f]), (i, f, g[f], w[f])


def test_dask_gives_exactly_the_serial_rows(client):
    points = sweep.plan([MATRIX], **GRID)
    assert [(p.arch, p.kernel, p.folio_size) for p in points] == [
        (a, k, s) for a in ("x86-64", "arm64-4k") for k in ("6.8", "7.0") for s in (16 << 10, 64 << 10)]
    serial = sweep.run(points, engine="serial")
    done: list[tuple[int, int, int]] = []
    rows = sweep.run(points, client=client, progress=lambda *a: done.append(a))
    _assert_same_rows(rows, serial)
    assert sorted(done) == [(n, 8, 0) for n in range(1, 9)]
    assert all(r["status"] == "ok" and r["error"] == "" for r in rows)
    # Grid order, each point's rows in run order: 4 steps and a total.
    assert [_key(r) for r in rows[::5]] == [(MATRIX, p.arch, p.kernel, p.folio_size)
                                          for p in points]
    assert [r["step"] for r in rows[:5]] == ["1", "2", "3", "4", "total"]
    # A point's rows are those of `ptebatch run` for it, with the coordinates in front.
    sc = scenario.load(MATRIX, {"region": "256K", "folio_size": "64K"}, arch="arm64-4k")
    want = scenario.run(sc, ["7.0"])
    got = [r for r in rows if _key(r) == (MATRIX, "arm64-4k", "7.0", 64 << 10)]
    assert [{k: r[k] for k in scenario.ROW_FIELDS} for r in got] == want
    # The sweep measures something: fork batches by folio on 7.0, per PTE on 6.8.
    forks = {_key(r): r["batches"] for r in rows if r["op"] == "fork"}
    assert forks[(MATRIX, "x86-64", "6.8", 64 << 10)] == 64
    assert forks[(MATRIX, "x86-64", "7.0", 64 << 10)] == 4


def test_failing_points_are_rows_and_the_rest_still_run(client, tmp_path):
    bad = tmp_path / "read-only.toml"
    bad.write_text(READ_ONLY)
    points = sweep.plan([MATRIX, str(bad)], kernels=["6.8", "7.0"], arches=["x86-64", "arm64-64k"],
                        sizes=["16K", "64K"], params={"region": "256K"})
    rows = sweep.run(points, client=client)
    _assert_same_rows(rows, sweep.run(points, engine="serial"))
    status = {_key(r): (r["status"], r["error"]) for r in rows}
    assert len(status) == len(points) == 16
    for (src, arch, kernel, size), (st, err) in status.items():
        if src == str(bad):
            # Every run writes to a read-only VMA: the error names the step and the kernel.
            if arch == "arm64-64k" and size == 16 << 10:
                assert st == "error" and "16K is not an anonymous folio size on arm64-64k" in err, err
                continue
            assert st == "error" and err.startswith("AccessFault: "), err
            assert "[[step]] #2 (write), kernel " + kernel in err, err
        elif arch == "arm64-64k" and size == 16 << 10:
            # Loading fails in the task: 16K is no folio size with 64K pages.
            assert st == "error" and err.startswith("ScenarioError: " + MATRIX), err
            assert "16K is not an anonymous folio size on arm64-64k" in err, err
        else:
            assert (st, err) == ("ok", ""), err
    failed = [r for r in rows if r["status"] == "error"]
    assert len(failed) == 2 + 8
    assert all(r[f] == "" for r in failed for f in scenario.COUNTERS)
    assert all(r["scenario"] in ("fork-munmap-matrix", "read-only") for r in failed)
    text = sweep.format_table(rows)
    assert text.count("\n  ") == 10 and "16 grid points, 10 failed" in text
    doc = json.loads(sweep.to_json(rows))
    assert (doc["points"], doc["failed"], doc["fields"]) == (16, 10, list(sweep.SWEEP_FIELDS))


def test_a_point_whose_worker_dies_is_an_error_row(client, monkeypatch):
    points = sweep.plan([MATRIX], kernels=["6.8", "7.0"], sizes=["64K"], params={"region": "256K"})
    submit = client.submit

    def killing_submit(fn, point, **kw):
        # The first point's task ends its worker process, as the host's OOM killer would.
        return submit(os._exit, 1, **kw) if point is points[0] else submit(fn, point, **kw)

    monkeypatch.setattr(client, "submit", killing_submit)
    rows = sweep.run(points, client=client)
    assert (rows[0]["status"], rows[0]["kernel"]) == ("error", "6.8")
    assert rows[0]["error"].startswith("KilledWorker: its worker process died running it"), rows[0]["error"]
    assert rows[1:] == sweep.run(points[1:], engine="serial")


def test_snapshot_points_replay_and_fork_each_process(tmp_path):
    sim = pb.Simulation("x86-64", "7.0", "64M")
    p = sim.spawn()
    v = p.mmap("1M", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    path = str(tmp_path / "snap.npz")
    snapshot_of(sim, [p]).save(path)
    notes: list[str] = []
    points = sweep.plan([path], arches=["arm64-4k"], sizes=["64K"], notes=notes)
    assert [(q.kind, q.arch, q.kernel, q.folio_size) for q in points] == [
        ("snapshot", "x86-64", "6.8", None), ("snapshot", "x86-64", pb.NEWEST_KERNEL, None)]
    assert len(notes) == 2 and "its own layout, x86-64" in notes[0] and "no folio-size axis" in notes[1]
    rows = sweep.run(points, engine="serial")
    assert [(r["kernel"], r["op"], r["folio_size"], r["status"]) for r in rows] == [
        ("6.8", "fork", "", "ok"), ("6.8", "total", "", "ok"),
        (pb.NEWEST_KERNEL, "fork", "", "ok"), (pb.NEWEST_KERNEL, "total", "", "ok")]
    # As `ptebatch replay` counts it.
    for k, fork in ((r["kernel"], r) for r in rows if r["op"] == "fork"):
        s, procs = pb.Simulation.from_snapshot(path, k)
        next(iter(procs.values())).fork()
        st = s.last_stats
        assert (fork["batches"], fork["refcount_atomics"], fork["rmap_calls"]) == (
            st["batches"], st["refcount_atomics"], st["rmap_calls"])
        assert fork["ptes"] == 256 and fork["batched_ptes"] == 256
    assert rows[0]["batches"] == 256 and rows[2]["batches"] == 16


def test_plan_sizes_arches_and_params(tmp_path):
    notes: list[str] = []
    # The cow files call the folio size `thp` and sweep 64K and 2M themselves.
    cow = os.path.join(ROOT, "examples", "cow-single-pte.toml")
    points = sweep.plan([cow, os.path.join(ROOT, "examples", "file-and-shmem.toml")],
                        kernels=["7.0"], notes=notes)
    assert [(q.size_param, q.folio_size, q.kernel) for q in points] == [
        ("thp", 64 << 10, "7.0"), ("thp", 2 << 20, "7.0"), (None, None, "7.0")]
    assert notes == []
    sweep.plan([os.path.join(ROOT, "examples", "file-and-shmem.toml")], sizes=["64K"], notes=notes)
    assert len(notes) == 1 and "no folio-size parameter" in notes[0]
    # --set goes to the scenarios that declare the parameter; one no scenario declares is an error.
    points = sweep.plan([MATRIX, cow], kernels=["6.8"], sizes=["64K"], params={"region": "1M"})
    assert [dict(q.params) for q in points] == [{"region": "1M"}, {}]
    with pytest.raises(scenario.ScenarioError, match="no scenario declares parameter 'regoin'"):
        sweep.plan([MATRIX], params={"regoin": "1M"})
    # A scenario that declares `arch` gets it as a parameter.
    arched = tmp_path / "arched.toml"
    arched.write_text(Path(MATRIX).read_text().replace('arch = "x86-64"', 'arch = "$arch"')
                      .replace("[params]", '[params]\narch = ["x86-64", "riscv64"]'))
    points = sweep.plan([str(arched)], kernels=["7.0"], sizes=["64K"], params={"region": "256K"})
    assert [(q.arch, q.arch_param) for q in points] == [("x86-64", True), ("riscv64", True)]
    rows = sweep.run(points, engine="serial")
    assert {(r["arch"], r["status"]) for r in rows} == {("x86-64", "ok"), ("riscv64", "ok")}
    for bad, match in (([], "no source"), ([MATRIX], "unknown kernel '5.0'")):
        with pytest.raises(ValueError, match=match):
            sweep.plan(bad, kernels=["5.0"] if bad else None)
    with pytest.raises(ValueError, match="unknown arch 'vax'"):
        sweep.plan([MATRIX], arches=["vax"])
    with pytest.raises(ValueError, match="unknown engine 'ray'"):
        sweep.run([], engine="ray")


# -- the command -------------------------------------------------------------------------------

def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


USAGE = [
    (["sweep"], "the following arguments are required: SOURCE"),
    (["sweep", MATRIX, "--arch", "vax"], "argument --arch: unknown arch 'vax'"),
    (["sweep", MATRIX, "--kernel", "6.8,5.0"], "argument --kernel: unknown kernel '5.0'"),
    (["sweep", MATRIX, "--size", "48K"], "argument --size: size '48K' is not a power of two"),
    (["sweep", MATRIX, "--size", ","], "argument --size: nothing given"),
    (["sweep", MATRIX, "--workers", "0"], "argument --workers: 0 is out of range"),
    (["sweep", MATRIX, "--threads-per-worker", "x"], "argument --threads-per-worker: 'x' is not an integer"),
    (["sweep", MATRIX, "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
     "argument --scheduler: not allowed with argument --workers"),
    (["sweep", MATRIX, "--sequential", "--workers", "2"], "argument --workers: not allowed with argument --sequential"),
    (["sweep", MATRIX, "--set", "regoin=1M"], "no scenario declares parameter 'regoin'"),
    (["sweep", MATRIX, "--set", "region"], "argument --set: 'region' is not NAME=VALUE"),
]


@pytest.mark.parametrize("argv,want", USAGE, ids=[" ".join(a[2:]) or "none" for a, _ in USAGE])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, want):
    code, out, err = _run(capsys, argv)
    assert (code, out) == (2, ""), err
    assert err.count("\n") == 1 and err.startswith("ptebatch sweep: error: ") and want in err, err


def test_runtime_errors_are_one_line_and_exit_1(capsys, tmp_path):
    for argv, want in ((["sweep", str(tmp_path / "none.toml"), "--sequential"], "none.toml: No such file"),
                       (["sweep", str(tmp_path / "none.npz"), "--sequential"], "none.npz"),
                       (["sweep", MATRIX, "--sequential", "-o", str(tmp_path)], "Is a directory")):
        code, out, err = _run(capsys, argv)
        assert (code, out) == (1, ""), err
        assert err.count("\n") == 1 and err.startswith("ptebatch: error: ") and want in err, err


def test_command_on_two_workers(capsys, tmp_path):
    bad = tmp_path / "read-only.toml"
    bad.write_text(READ_ONLY)
    out_file = tmp_path / "sweep.json"
    args = [MATRIX, str(bad), "--kernel", "6.8,7.0", "--arch", "x86-64", "--arch", "arm64-4k",
            "--size", "16K,64K", "--set", "region=256K"]
    before = _children()
    code, out, err = _run(capsys, ["sweep", *args, "--workers", "2", "--json", "-o", str(out_file)])
    _assert_no_new_children(before)
    assert (code, out) == (1, ""), err
    lines = err.splitlines()
    assert lines[-1] == 'ptebatch sweep: error: 8 of 16 grid points failed (status "error" in the output)'
    assert all(line.startswith("ptebatch sweep: ") for line in lines) and "Traceback" not in err
    assert "16/16 grid points done, 8 failed" in lines[-2]
    doc = json.loads(out_file.read_text())
    assert (doc["format"], doc["points"], doc["failed"]) == ("ptebatch-sweep-results", 16, 8)
    points = sweep.plan([MATRIX, str(bad)], **GRID)
    _assert_same_rows(doc["rows"], sweep.run(points, engine="serial"))
    # The same grid in this process, the ok part only: exit 0, the table, nothing on stderr.
    code, out, err = _run(capsys, ["sweep", *args[:1], *args[2:], "--sequential", "--quiet"])
    assert (code, err) == (0, "")
    assert out.count(" ok ") == 8 and "8 grid points, 0 failed" in out

"""ptebatch calibrate: the worker, its output, folio checks, and (as root, against the live
kernel) a tiny calibration that must restore every THP control, also when it fails part-way or
is signalled. The live tests skip when not root, when the files are missing, or when
PTEBATCH_SKIP_LIVE is set."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import threading

import pytest

import ptebatch as pb
from ptebatch import calibrate as cb
from ptebatch import cli, oracle

WHY = cb.missing_requirements()
if os.environ.get("PTEBATCH_SKIP_LIVE"):
    WHY = "PTEBATCH_SKIP_LIVE is set"
live = pytest.mark.skipif(WHY is not None, reason=f"live-kernel test: {WHY}")
need_cc = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


def thp_files() -> dict[str, str]:
    """The text of every writable file under the sysfs THP directory (counters excluded)."""
    out = {}
    for root, _, files in os.walk(cb.THP):
        for name in files:
            path = os.path.join(root, name)
            if os.stat(path).st_mode & 0o200:
                with open(path) as f:
                    out[path] = f.read()
    return out


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> str:
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler")
    return cb.build_worker(str(tmp_path_factory.mktemp("cache")))


# -- the worker and its output ----------------------------------------------------------------

@need_cc
def test_worker_builds_from_source_once(tmp_path) -> None:
    exe = cb.build_worker(str(tmp_path))
    assert os.path.dirname(exe) == str(tmp_path) and os.access(exe, os.X_OK)
    assert os.path.basename(exe).startswith("calib-worker-")
    mtime = os.stat(exe).st_mtime_ns
    assert cb.build_worker(str(tmp_path)) == exe and os.stat(exe).st_mtime_ns == mtime
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(exe)]  # no temporary left


def test_worker_answers_json_lines(worker) -> None:
    out = subprocess.run([worker], input="bare\nmap 4194304 2097152 0\nexit-round\nquit\n",
                         capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert len(out) == 4
    assert cb.parse_reply(out[0], "start")["nice"] in ((-20,) if os.geteuid() == 0 else range(-20, 20))
    bare = cb.parse_reply(out[1], "bare")
    m = cb.parse_reply(out[2], "map")
    r = cb.parse_reply(out[3], "exit-round")
    assert bare["fork_ns"] > 0 and m["len"] == 4 << 20 and m["addr"] % (2 << 20) == 0
    assert r["fork_ns"] > 0 and r["child_exit_ns"] > 0 and r["parent_munmap_ns"] > 0


def test_worker_errors_are_typed(worker) -> None:
    p = subprocess.run([worker], input="exit-round\n", capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    with pytest.raises(cb.CalibrationError, match="no region mapped"):
        cb.parse_reply(p.stdout.splitlines()[1], "exit-round")


def test_build_errors(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    with pytest.raises(cb.CalibrationError, match="no C compiler"):
        cb.build_worker(str(tmp_path / "c1"))
    monkeypatch.setenv("CC", "false")  # a compiler that fails
    with pytest.raises(cb.CalibrationError, match="building the worker"):
        cb.build_worker(str(tmp_path / "c2"))
    assert os.listdir(tmp_path / "c2") == []
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(cb.CalibrationError, match="writable by others"):
        cb.build_worker(str(shared))


@pytest.mark.parametrize("line, match", [
    ("", "exited without answering"),
    ("fork took 3 ms\n", "not JSON"),
    ('{"op": "bare", "fork_ns": 1\n', "not JSON"),
    ("[1, 2]\n", "not a JSON object"),
    ('{"op": "error", "error": "mmap: Cannot allocate memory"}\n', "mmap: Cannot allocate memory"),
    ('{"op": "map", "fork_ns": 1, "child_exit_ns": 1}\n', "answered 'map'"),
    ('{"op": "bare", "fork_ns": 1}\n', "child_exit_ns"),
    ('{"op": "bare", "fork_ns": -1, "child_exit_ns": 1}\n', "fork_ns"),
    ('{"op": "bare", "fork_ns": 1.5, "child_exit_ns": 1}\n', "fork_ns"),
    ('{"op": "bare", "fork_ns": true, "child_exit_ns": 1}\n', "fork_ns"),
    ('{"op": "bare", "fork_ns": "1", "child_exit_ns": 1}\n', "fork_ns"),
])
def test_bad_worker_output_is_a_calibration_error(line: str, match: str) -> None:
    with pytest.raises(cb.CalibrationError, match=match) as e:
        cb.parse_reply(line, "bare")
    assert isinstance(e.value, pb.PtebatchError)


def test_good_reply() -> None:
    assert cb.parse_reply('{"op": "bare", "fork_ns": 7, "child_exit_ns": 9}\n', "bare") == \
        {"fork_ns": 7, "child_exit_ns": 9}


def test_parse_sizes() -> None:
    offered = [cb.FolioSize(4096), cb.FolioSize(64 << 10), cb.FolioSize(2 << 20, pte_mapped_pmd_size=True),
               cb.FolioSize(2 << 20, pmd=True)]
    assert [s.label for s in offered] == ["4K", "64K", "2M-pte", "2M-pmd"]
    assert cb.parse_sizes("64k, 4K,64K", offered) == [offered[1], offered[0]]
    assert cb.parse_sizes("all", offered) == offered
    assert cb.parse_sizes("2M-PMD", offered) == [offered[3]]
    with pytest.raises(ValueError, match="2M-pte or 2M-pmd"):
        cb.parse_sizes("2M", offered)
    with pytest.raises(ValueError, match="'16K' is not one this kernel offers"):
        cb.parse_sizes("4K,16K", offered)
    with pytest.raises(ValueError, match="empty folio size"):
        cb.parse_sizes("4K,", offered)


def test_cli_refuses_where_it_cannot_run(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cb, "missing_requirements", lambda: "not root: /proc/kpageflags needs CAP_SYS_ADMIN")
    assert cli.main(["calibrate", "--region", "32M"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot calibrate here: not root" in err


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--region", "lots"], ["--repeat", "x"]])
def test_cli_usage_errors(argv, capsys) -> None:
    assert cli.main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ptebatch calibrate: error: argument" in err


# -- against the live kernel -------------------------------------------------------------------

@live
def test_cli_sizes_and_region_checked(capsys) -> None:
    before = thp_files()
    assert cli.main(["calibrate", "--sizes", "3K"]) == 2
    assert "argument --sizes" in capsys.readouterr().err
    assert cli.main(["calibrate", "--region", "3M"]) == 2
    assert "multiple of the PMD size" in capsys.readouterr().err
    assert thp_files() == before


@live
def test_tiny_calibration(tmp_path, capsys) -> None:
    before = thp_files()
    out = tmp_path / "cal.json"
    code = cli.main(["calibrate", "--region", "32M", "--repeat", "2", "--sizes", "4K,64K", "-o", str(out)])
    text, err = capsys.readouterr()
    assert thp_files() == before
    assert code == 0, err
    assert "calibrate: repetition 2/2: 64K" in err
    cal = json.loads(out.read_text())
    for key in ("schema", "schema_version", "date", "kernel_release", "cpu_model", "memory_bytes", "page_size",
                "pmd_size", "region_bytes", "repeat", "thp_settings", "thp_controls_changed", "operations",
                "bare", "measurements", "worker_nice", "sched_autogroup", "loadavg", "clock", "seconds"):
        assert key in cal, key
    assert cal["region_bytes"] == 32 << 20 and cal["repeat"] == 2 and cal["page_size"] == os.sysconf("SC_PAGE_SIZE")
    assert cal["thp_settings"]["hugepages-64kB/enabled"] in ("always", "inherit", "madvise", "never")
    assert set(cal["bare"]) == {"fork", "child-exit"}
    rows = {(r["folio_size"], r["operation"]): r for r in cal["measurements"]}
    assert set(rows) == {(s, op) for s in ("4K", "64K") for op in cb.OPERATIONS}
    ptes = (32 << 20) // cal["page_size"]
    for (size, op), r in rows.items():
        # two rounds per repetition: one ends in the child's exit, one in its munmap
        assert r["repetitions"] == (2 if op in ("child-exit", "child-munmap") else 4)
        assert r["min_ns"] <= r["q1_ns"] <= r["median_ns"] <= r["q3_ns"] <= r["max_ns"]
        assert r["ptes"] == ptes and r["folios_verified"] and r["folio_problems"] == []
        base = cal["bare"][op]["median_ns"] if op in cb.BASELINED else 0
        assert r["ns_per_pte"] == pytest.approx((r["median_ns"] - base) / ptes)
        assert r["ns_per_pte_min"] == pytest.approx((r["min_ns"] - base) / ptes)
        assert r["mapping"] == "pte" and r["folio_bytes"] == pb.parse_size(size)
    assert cal["worker_nice"] == -20
    assert "64K fork" in " ".join(text.split()) and "4K/this" in text


@live
def test_folio_check_tells_sizes_apart(worker) -> None:
    page = os.sysconf("SC_PAGE_SIZE")
    w = cb._Worker(worker)
    try:
        with oracle.thp_only(64 << 10):
            m = w("map", 4 << 20, 2 << 20, 0)
        assert cb.check_folios(m["pid"], m["addr"], m["len"], cb.FolioSize(64 << 10)).ok
        wrong = cb.check_folios(m["pid"], m["addr"], m["len"], cb.FolioSize(page))
        assert not wrong.ok and wrong.pages_by_folio_pages == {16: (4 << 20) // page}
        assert not cb.check_folios(m["pid"], m["addr"], m["len"], cb.FolioSize(2 << 20, pmd=True)).ok
        w("unmap")
        with oracle.thp_only(2 << 20):
            m = w("map", 4 << 20, 2 << 20, 1)
        pte = cb.check_folios(m["pid"], m["addr"], m["len"], cb.FolioSize(2 << 20, pte_mapped_pmd_size=True))
        assert pte.ok and pte.anon_huge_kb == 0
        pmd = cb.check_folios(m["pid"], m["addr"], m["len"], cb.FolioSize(2 << 20, pmd=True))
        assert not pmd.ok and "AnonHugePages 0 kB" in pmd.message
    finally:
        w.close()


@live
def test_waits_for_another_calibration(worker) -> None:
    """The run holds a flock on the sysfs THP directory: a second one waits, changing nothing."""
    fd = os.open(cb.THP, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    lines: list[str] = []
    waiting = threading.Event()
    result: list = []

    def progress(line: str) -> None:
        lines.append(line)
        if line.startswith("waiting"):
            waiting.set()

    def run() -> None:
        result.append(cb.calibrate(32 << 20, 1, cb.parse_sizes("4K", cb.available_sizes()),
                                   progress=progress, worker=worker))

    t = threading.Thread(target=run)
    t.start()
    try:
        assert waiting.wait(30)
        assert lines == [f"waiting for another process holding the lock on {cb.THP}"]
    finally:
        os.close(fd)
    t.join(120)
    assert not t.is_alive() and len(result) == 1
    assert len(lines) == 2 and lines[1].startswith("repetition 1/1: 4K")


def _fake_worker(tmp_path, on_map: str) -> str:
    """A worker that answers ``bare`` and, on ``map``, records the 64K control and runs ``on_map``."""
    path = tmp_path / "fake-worker"
    path.write_text(f"""#!/bin/sh
echo '{{"op": "start", "nice": 0}}'
while read op rest; do
  case $op in
    bare) echo '{{"op": "bare", "fork_ns": 1000, "child_exit_ns": 1000}}';;
    map) cat {cb.THP}/hugepages-64kB/enabled > {tmp_path}/during; {on_map};;
    *) exit 0;;
  esac
done
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@live
def test_controls_restored_when_the_worker_fails_part_way(tmp_path) -> None:
    before = thp_files()
    fake = _fake_worker(tmp_path, "echo 'Segmentation fault'")
    with pytest.raises(cb.CalibrationError, match="not JSON"):
        cb.calibrate(32 << 20, 1, cb.parse_sizes("64K", cb.available_sizes()), worker=fake)
    assert "[always]" in (tmp_path / "during").read_text()  # the run had changed them
    assert thp_files() == before


@live
def test_controls_restored_when_progress_raises(worker) -> None:
    before = thp_files()
    calls = []

    def progress(line: str) -> None:
        calls.append(line)
        if len(calls) == 2:
            raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        cb.calibrate(32 << 20, 1, cb.parse_sizes("64K,4K", cb.available_sizes()), progress=progress, worker=worker)
    assert thp_files() == before


@live
def test_controls_restored_on_sigterm(tmp_path) -> None:
    before = thp_files()
    old = signal.getsignal(signal.SIGTERM)
    fake = _fake_worker(tmp_path, "kill -TERM $PPID; sleep 0.2; echo '{\"op\": \"map\"}'")
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        cb.calibrate(32 << 20, 1, cb.parse_sizes("64K", cb.available_sizes()), worker=fake)
    assert "[always]" in (tmp_path / "during").read_text()
    assert thp_files() == before
    assert signal.getsignal(signal.SIGTERM) is old


def test_shipped_calibration_has_the_documented_fields() -> None:
    path = os.path.join(os.path.dirname(cb.__file__), "data", "calibration-rust-pyo3.json")
    with open(path) as f:
        cal = json.load(f)
    for key in ("command", "date", "kernel_release", "cpu_model", "load"):
        assert cal["provenance"][key]
    assert cal["schema"] == cb.SCHEMA and cal["schema_version"] == cb.SCHEMA_VERSION
    assert cal["region_bytes"] == 1 << 30 and cal["repeat"] == 5
    sizes = {r["folio_size"] for r in cal["measurements"]}
    assert {"4K", "2M-pte", "2M-pmd"} <= sizes
    assert all(r["folios_verified"] for r in cal["measurements"])
    table = cb.format_table(cal)
    assert "2M-pmd" in table and "4K/this" in table

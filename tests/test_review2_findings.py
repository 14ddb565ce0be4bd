"""Second hostile review (run, report, sweep, predict, bench): reproducers of what broke.

Each test is the minimal input; it fails until the finding is fixed."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path

import pytest

import ptebatch as pb
from ptebatch import bench, cli, scenario

TINY = """
[machine]
kernels = ["7.0"]
[[process]]
name = "p"
[[vma]]
name = "v"
process = "p"
size = "64K"
[[step]]
{step}
"""


def _write(tmp_path: Path, step: str, head: str = "") -> str:
    path = tmp_path / "s.toml"
    path.write_text(head + TINY.format(step=step))
    return str(path)


def test_repeat_count_without_bound_is_refused(tmp_path):
    # count = 2**64 is loaded and then runs (and collects a row per iteration) until the host's
    # memory is gone; a count no run can finish should be refused by load, naming the key.
    path = _write(tmp_path, 'op = "repeat"\ncount = %d\n[[step.steps]]\nop = "check"' % 2**64)
    with pytest.raises(scenario.ScenarioError, match="count"):
        scenario.load(path)


def test_scenario_path_that_is_a_directory(tmp_path, capsys):
    # scenario.load(dir) raised IsADirectoryError "[Errno 21] Is a directory: 3" (the fd, not
    # the path); the CLI said "ptebatch: error: 3: Is a directory" and exited 1. A FIFO gets
    # "not a regular file", a ScenarioError, exit 2.
    with pytest.raises(scenario.ScenarioError, match="regular file"):
        scenario.load(str(tmp_path))
    assert cli.main(["run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and ": 3:" not in err


def test_step_offset_beyond_vma_is_a_load_error(tmp_path):
    # offset 128K in a 64K VMA passed load and failed at run time with
    # "length must be a non-negative integer, not -65536" (exit 1, key not named).
    path = _write(tmp_path, 'op = "touch"\nvma = "v"\noffset = "128K"')
    with pytest.raises(scenario.ScenarioError, match="offset"):
        scenario.load(path)


def test_fork_as_name_is_checked_like_other_names(tmp_path):
    # [[process]] name = "<script>" is refused, but a fork's `as` takes any string, which then
    # lands unescaped in Markdown reports.
    path = _write(tmp_path, 'op = "fork"\nprocess = "p"\nas = "<script>x</script>"')
    with pytest.raises(scenario.ScenarioError, match="as"):
        scenario.load(path)


def test_markdown_report_escapes_scenario_name(tmp_path):
    # [scenario] name/description go raw into the .md (the HTML report escapes them), so a
    # shared scenario file puts live HTML into a rendered Markdown report.
    path = _write(tmp_path, 'op = "check"', head='[scenario]\nname = "<img src=x onerror=alert(1)>"\n')
    out = tmp_path / "r.md"
    assert cli.main(["report", path, "-o", str(out), "-q"]) == 0
    assert "<img src=x" not in out.read_text()


def test_report_refuses_fifo_output(tmp_path, capsys):
    # report -o FIFO passes check_writable and then open(path, "w") writes into the FIFO (with no
    # reader it blocks forever); the contract: files are never replaced unless regular.
    fifo = tmp_path / "out.md"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # so that a writer does not block
    try:
        code = cli.main(["report", _write(tmp_path, 'op = "check"'), "-o", str(fifo), "-q"])
        written = b""
        try:
            written = os.read(reader, 1 << 16)
        except BlockingIOError:
            pass
    finally:
        os.close(reader)
    assert code in (1, 2) and written == b""
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def _calibration(tmp_path: Path, key: str, value) -> Path:
    cal = json.loads(bench.DEFAULT_CALIBRATION.read_text())
    for m in cal["measurements"]:
        m[key] = value
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(cal))
    return path


@pytest.mark.parametrize("value", [float("nan"), -100.0])
def test_bench_calibration_refuses_nan_and_negative_times(tmp_path, value):
    # predict refuses these ("field 'ns_per_pte' is nan"); bench loads them and prints nan or
    # negative kernel times in its tables.
    with pytest.raises(ValueError, match="ns_per_pte"):
        bench.load_calibration(_calibration(tmp_path, "ns_per_pte", value))


def test_bench_calibration_wrong_type_is_a_named_error(tmp_path, capsys):
    # ns_per_pte = "x": load_calibration accepts it, then bench fails deep inside with
    # "'<' not supported between instances of 'str' and 'int'" (a bare TypeError, no file named).
    path = _calibration(tmp_path, "ns_per_pte", "x")
    with pytest.raises(ValueError, match="cal.json"):
        bench.load_calibration(path)


def test_set_empty_array_is_a_usage_error(tmp_path, capsys):
    # `--set x=[]` (or load(path, {"x": []})) raised a bare IndexError from deep in load; the CLI
    # printed a 19-line traceback and exited 1. In the file, `x = []` is a ScenarioError.
    path = _write(tmp_path, 'op = "check"', head='[params]\nx = "1"\n')
    with pytest.raises(scenario.ScenarioError, match="x"):
        scenario.load(path, {"x": []})
    assert cli.main(["run", path, "--set", "x=[]"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_params_sweep_product_is_bounded(tmp_path):
    # Three swept params of 1000 values each are 10**9 cases: load enumerates them all (about
    # 40 s, then a bare MemoryError under an 8 GiB address-space limit; without a limit the
    # host's OOM killer). Run in a child with a 2 GiB limit and a short timeout so that the
    # unfixed code cannot hurt the machine; it should refuse at once, naming [params].
    import subprocess
    import sys
    values = ",".join(str(i) for i in range(1000))
    path = _write(tmp_path, 'op = "check"', head=f"[params]\na = [{values}]\nb = [{values}]\nc = [{values}]\n")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))\n"
            "from ptebatch import scenario\n"
            "try:\n    scenario.load(sys.argv[1])\nexcept scenario.ScenarioError as e:\n    print('refused', e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("load of a 10**9-case sweep did not refuse within 10 s")
    assert out.stdout.startswith("refused") and "params" in out.stdout, out.stderr[-300:]


def test_sweep_workers_is_bounded(tmp_path, monkeypatch):
    # `ptebatch sweep a.toml --workers 100000` starts a LocalCluster of 100000 worker processes
    # for one grid point (it hung for a minute here before being killed; on a shared host it is
    # the OOM killer's business). The cluster is faked here so nothing is started: refusing
    # the number, or starting no more workers than there are points, both pass.
    distributed = pytest.importorskip("distributed")
    from ptebatch import sweep

    asked = []

    class Stop(Exception):
        pass

    def fake_cluster(*args, n_workers=None, **kwargs):
        asked.append(n_workers)
        raise Stop

    monkeypatch.setattr(distributed, "LocalCluster", fake_cluster)
    points = sweep.plan([_write(tmp_path, 'op = "check"')])
    assert len(points) == 1
    try:
        sweep.run(points, workers=100_000)
    except ValueError:
        return
    except Stop:
        pass
    assert asked and asked[0] <= len(points)

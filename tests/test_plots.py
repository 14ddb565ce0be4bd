"""The plots: each data function against what the simulation measured, and each drawing a
non-blank PNG (read back with matplotlib)."""

from __future__ import annotations

import math
import subprocess
import sys

import matplotlib
import matplotlib.image
import numpy as np
import pytest

import ptebatch as pb
from ptebatch import plots
from ptebatch.study import fork_study


def _not_blank(path: str) -> None:
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 10


@pytest.fixture(scope="module")
def rows():
    return fork_study("4M", ["4K", "64K", "2M"], ["6.8", "7.0"])


def test_histogram_data_is_the_counts():
    lengths, counts = plots.histogram_data([5, 3, 0, 0, 7])
    assert lengths.tolist() == [1, 4] and counts.tolist() == [3, 7]  # index 0 is not a length
    with pytest.raises(ValueError):
        plots.histogram_data([1, -1])


def test_fork_histograms_are_the_forks_batches(rows):
    h = plots.fork_histograms(rows)
    assert list(h) == ["4K", "64K", "2M"]
    for r in rows:
        lengths, counts = plots.histogram_data(h[pb.format_size(r.size)][r.kernel])
        assert int(counts.sum()) == r.batches
        assert int((lengths * counts).sum()) == r.ptes  # every PTE of the region is in one batch
    # 6.8 copies PTE by PTE; 7.0 one batch per folio (a 2M folio fills a page table).
    assert plots.histogram_data(h["64K"]["6.8"])[0].tolist() == [1]
    assert plots.histogram_data(h["64K"]["7.0"])[0].tolist() == [16]
    assert plots.histogram_data(h["2M"]["7.0"])[0].tolist() == [512]


def test_batch_histogram_png(rows, tmp_path):
    path = plots.batch_histogram(plots.fork_histograms(rows), tmp_path / "h.png")
    assert path == str(tmp_path / "h.png")
    _not_blank(path)
    with pytest.raises(ValueError):
        plots.batch_histogram({}, tmp_path / "empty.png")


def test_fork_ops_data(rows):
    d = plots.fork_ops_data(rows)
    assert d.categories == ["4K", "64K", "2M"] and list(d.values) == ["6.8", "7.0"]
    by = {(pb.format_size(r.size), r.kernel): r for r in rows}
    for k, fields in d.values.items():
        for f, vals in fields.items():
            assert vals == [by[(c, k)].per_pte(f) for c in d.categories]
    assert d.values["7.0"]["rmap_calls"][1] == 1 / 16


def _scenario_rows():
    common = dict(scenario="s", batching=True, iteration=0, process="p", vma="v",
                  **{f: 0 for f, _ in plots.OPS_FIELDS})
    return [
        dict(common, case="a", kernel="6.8", step="1", op="fork", ptes=16, refcount_atomics=16, batches=16),
        dict(common, case="a", kernel="7.0", step="1", op="fork", ptes=16, refcount_atomics=1, batches=1),
        dict(common, case="a", kernel="7.0", step="2", op="unpin", ptes=0),
        dict(common, case="b", kernel="7.0", step="1", op="fork", ptes=4, refcount_atomics=2, batches=2),
        dict(common, case="a", kernel="7.0", step="total", op="total", ptes=16),
    ]


def test_scenario_ops_data():
    rows = _scenario_rows()
    by_case = plots.scenario_ops_data(rows, case="a")
    assert by_case.categories == ["1 fork\np/v"]  # no PTE: no bar; totals left out
    assert by_case.values["6.8"]["refcount_atomics"] == [1.0]
    assert by_case.values["7.0"]["batches"] == [1 / 16]
    by_step = plots.scenario_ops_data(rows, step="1")
    assert by_step.categories == ["a", "b"]
    assert math.isnan(by_step.values["6.8"]["batches"][1])  # 6.8 did not run case b
    assert by_step.values["7.0"]["refcount_atomics"] == [1 / 16, 0.5]
    with pytest.raises(ValueError):
        plots.scenario_ops_data(rows)


def test_ops_png_with_zeros(tmp_path):
    # A panel of zeros (rmap calls here) still draws, with its zeros marked.
    _not_blank(plots.ops_per_pte(plots.scenario_ops_data(_scenario_rows(), step="1"), tmp_path / "z.png"))
    with pytest.raises(ValueError):
        plots.ops_per_pte(plots.OpsData([], {}), tmp_path / "none.png")


def test_page_table_map(tmp_path):
    sim = pb.Simulation("x86-64", "7.0", "64M")
    p = sim.spawn()
    v = p.mmap("4M", mthp=["64K"], addr=1 << 36)
    p.touch(v.start, 1 << 20, write=True)         # first table: 1M of 64K folios, then none
    p.touch(v.start + (2 << 20), 4 << 12)         # second table: the zero page, read faults
    w = p.mmap("8K", addr=(1 << 36) + (16 << 20))  # a table after a gap
    p.touch(w.start, 4096, write=True)
    m = plots.page_table_map_data(sim, p)
    assert m.table_addrs.tolist() == [1 << 36, (1 << 36) + (2 << 20), (1 << 36) + (16 << 20)]
    assert m.order.shape == (3, 512)
    assert (m.order[0, :256] == 4).all() and (m.order[0, 256:] == plots.NONE).all()
    assert (m.order[1, :4] == plots.ZERO_PAGE).all() and (m.order[1, 4:] == plots.NONE).all()
    assert m.order[2, 0] == 0 and m.order[2, 1] == plots.NONE and (m.order[2, 2:] == plots.NO_VMA).all()
    # Batches: one per 64K folio under 7.0, and they alternate.
    b = m.batch[0, :256]
    assert len(np.unique(b)) == 16 and (np.diff(b[::16]) == 1).all() and (m.batch[0, 256:] == -1).all()
    per_pte = plots.page_table_map_data(sim, p, kernel="6.8")
    assert len(np.unique(per_pte.batch[0, :256])) == 256
    path = plots.page_table_map(m, tmp_path / "m.png", title="pid 1")
    _not_blank(path)
    img = matplotlib.image.imread(path)[..., :3]
    # The folio colour of order 4 and its darker shade are both in the picture.
    cmap = matplotlib.colormaps["viridis"]
    c = np.array(cmap(0.1 + 0.85 * 4 / 9)[:3])
    for want in (c, c * 0.6):
        assert (np.abs(img - want).max(axis=2) < 0.02).any()
    q = sim.spawn()
    with pytest.raises(ValueError):
        plots.page_table_map(plots.page_table_map_data(sim, q), tmp_path / "nothing.png")


def test_importing_ptebatch_does_not_need_matplotlib():
    code = ("import sys, ptebatch, ptebatch.cli, ptebatch.plots, ptebatch.report; "
            "print('matplotlib' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_drawing_leaves_the_callers_matplotlib_alone(tmp_path):
    before = dict(matplotlib.rcParams)
    backend = matplotlib.get_backend()
    plots.batch_histogram({"a": {"6.8": [0, 3]}}, tmp_path / "x.png")
    assert dict(matplotlib.rcParams) == before and matplotlib.get_backend() == backend
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()


def test_predicted_vs_measured(tmp_path, capsys):
    from ptebatch import cli, cost

    _, held = cost.held_out()
    data = plots.predicted_vs_measured_data(held)
    # Every held-out row is in its operation's panel, with its numbers and its mark.
    for r in held:
        sizes, meas, pred, out = data.operations[r.operation]
        i = sizes.index(r.folio_size)
        assert (meas[i], pred[i], out[i]) == (r.measured_ns_per_pte, r.predicted_ns_per_pte, r.held_out)
    assert sum(len(v[0]) for v in data.operations.values()) == len(held)
    assert any(any(v[3]) for v in data.operations.values()) and any(not all(v[3]) for v in data.operations.values())
    _not_blank(plots.predicted_vs_measured(data, tmp_path / "pvm.png"))
    assert cli.main(["predict", "--held-out", "--plot", str(tmp_path / "cli")]) == 0
    out = capsys.readouterr().out
    assert f"plot: {tmp_path / 'cli' / 'predicted-vs-measured.png'}" in out
    _not_blank(str(tmp_path / "cli" / "predicted-vs-measured.png"))
    assert cli.main(["predict", "--demo", "--plot", str(tmp_path)]) == 2

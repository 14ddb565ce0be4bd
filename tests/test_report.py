"""``ptebatch report`` and ``--plot DIR``: the report holds every table row and every plot,
the HTML parses with its images in it, and mistakes are one line and an exit code."""

from __future__ import annotations

import base64
import io
import os
import re
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pytest

from ptebatch import cli, report, scenario

SCENARIO = """\
[scenario]
name = "tiny"
description = "a written 1M region with 64K folios, forked"

[params]
folio = "64K"

[machine]
kernels = ["6.8", "7.0"]

[[process]]
name = "parent"

[[vma]]
name = "heap"
process = "parent"
size = "1M"
align = "2M"
mthp = ["$folio"]

[[step]]
op = "touch"
vma = "heap"
write = true

[[step]]
op = "fork"
process = "parent"
as = "child"
"""


@pytest.fixture
def toml(tmp_path) -> str:
    path = tmp_path / "tiny.toml"
    path.write_text(SCENARIO)
    return str(path)


def _main(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _png_ok(data: bytes) -> None:
    img = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert len(np.unique(img.reshape(-1, img.shape[2]), axis=0)) > 10


def test_run_scenario_gives_run_rows(toml):
    sc = scenario.load(toml)
    res = report.run_scenario(sc)
    assert res.rows == scenario.run(sc)
    fork = next(r for r in res.rows if r["op"] == "fork" and r["kernel"] == "7.0")
    lengths = np.nonzero(res.histograms["tiny"]["7.0"])[0]
    assert lengths.tolist() == [16] and fork["batches"] == 16  # 1M of 64K folios, one batch each
    [(case, proc, m)] = res.maps
    assert (case, proc) == ("tiny", "parent") and (m.order[0, :256] == 4).all()


def test_markdown_report(toml, tmp_path, capsys):
    out = tmp_path / "r.md"
    code, stdout, err = _main(["report", toml, "-o", str(out), "--kernel", "6.8,7.0"], capsys)
    assert code == 0, err
    md = out.read_text()
    sc = scenario.load(toml)
    rows = scenario.run(sc)
    # Every row of the human table is a row of the Markdown table, cell for cell.
    text_rows = [ln.split() for ln in scenario.format_table(sc, rows).splitlines()
                 if re.match(r"^(\d+|total) ", ln)]
    # (The text table leaves an empty "where" blank; split() drops it.)
    md_rows = [[c.strip() for c in ln.strip("|").split("|") if c.strip()] for ln in md.splitlines()
               if re.match(r"^\| (\d+|total) ", ln)]
    assert len(text_rows) == len(rows) and md_rows == text_rows
    assert "check() ran after every step and passed." in md  # the legend
    assert "cost model" in md
    images = re.findall(r"!\[[^]]*\]\(([^)]+)\)", md)
    assert len(images) == 3 and all(i.startswith("r_files/") for i in images)
    printed = [ln.split(": ", 1)[1] for ln in stdout.splitlines() if ln.startswith("plot: ")]
    assert sorted(os.path.basename(p) for p in printed) == sorted(os.path.basename(i) for i in images)
    for i in images:
        _png_ok((tmp_path / i).read_bytes())


class _Doc(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[str] = []
        self.open: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])
        elif tag not in ("meta", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open.pop() == tag, f"</{tag}> closes nothing open"


def test_html_report_of_the_demo(tmp_path, capsys):
    out = tmp_path / "demo.html"
    code, stdout, err = _main(["report", "--demo", "--set", "region=4M", "--set", "size=64K,2M", "-o", str(out)],
                              capsys)
    assert code == 0, err
    assert stdout.strip() == f"report: {out}"  # nothing else on disk: the images are embedded
    assert not (tmp_path / "demo_files").exists()
    doc = _Doc()
    text = out.read_text()
    doc.feed(text)
    doc.close()
    assert text.startswith("<!DOCTYPE html>") and doc.open == []
    assert doc.tags[:2] == ["html", "head"] and "body" in doc.tags
    # Two sizes × two kernels, plus a ratio row per size, plus the heading row.
    assert doc.tags.count("tr") == 1 + 2 * 3
    assert len(doc.imgs) == 2
    for src in doc.imgs:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        _png_ok(base64.b64decode(data))
    for cell in ("64K", "2M", "6.8", "7.0", "ratio", "0.0625", "16x"):
        assert f">{cell}</td>" in text


def test_demo_plot_option(tmp_path, capsys):
    d = tmp_path / "plots"
    code, stdout, err = _main(["demo", "--region", "16M", "--size", "2M", "--plot", str(d)], capsys)
    assert code == 0, err
    printed = [ln.split(": ", 1)[1] for ln in stdout.splitlines() if ln.startswith("plot: ")]
    assert sorted(map(os.path.basename, printed)) == ["fork-batch-histogram.png", "fork-ops-per-pte.png"]
    for p in printed:
        assert os.path.dirname(p) == str(d)
        with open(p, "rb") as f:
            _png_ok(f.read())


def test_run_plot_option_with_a_sweep(toml, tmp_path, capsys):
    d = tmp_path / "plots"
    code, stdout, err = _main(["run", toml, "--set", "folio=16K,2M", "--plot", str(d), "--json"], capsys)
    assert code == 0, err
    assert stdout.startswith("{")  # the JSON stays alone on stdout; the paths go to stderr
    printed = sorted(os.path.basename(ln.split(": ", 1)[1]) for ln in err.splitlines() if ln.startswith("plot: "))
    assert printed == ["tiny-batch-histogram.png", "tiny-ops-per-pte-step1.png", "tiny-ops-per-pte-step2.png",
                       "tiny-ptmap-folio_16K-parent.png", "tiny-ptmap-folio_2M-parent.png"]
    assert sorted(os.listdir(d)) == printed


@pytest.mark.parametrize("argv, code, want", [
    (["report", "nowhere.toml"], 1, "nowhere.toml"),
    (["report", "--demo", "--set", "regoin=4M"], 2, "regoin"),
    (["report", "--demo", "--set", "size=3K"], 2, "3K"),
    (["report", "--demo", "--kernel", "5.0"], 2, "5.0"),
    (["report"], 2, "required"),
    (["report", "--demo", "--format", "pdf"], 2, "pdf"),
    (["report", "--demo", "-o", "/nonexistent/dir/r.md"], 1, "/nonexistent/dir/r.md"),
    (["demo", "--region", "4M", "--plot", "/proc/version"], 1, "/proc/version"),
])
def test_errors_are_one_line(argv, code, want, capsys):
    got, out, err = _main(argv, capsys)
    assert got == code
    assert len(err.strip().splitlines()) == 1 and want in err and "Traceback" not in err
    assert "plot:" not in out


def test_report_of_a_scenario_and_demo_together_is_a_usage_error(toml, capsys):
    got, out, err = _main(["report", toml, "--demo"], capsys)
    assert got == 2 and len(err.strip().splitlines()) == 1

"""Scenario files (``ptebatch.scenario``, ``ptebatch run``): every mistake is one line naming the
file, the table and the key; the rows equal what the same steps give through the Python API;
JSON and CSV carry the documented fields; every file in examples/ runs."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import ptebatch as pb
from ptebatch import cli
from ptebatch.scenario import (COUNTERS, ROW_FIELDS, ScenarioError, execute, format_table, load,
                               parse_set, run, to_csv, to_json)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.toml")))

BASE = """\
[machine]
kernels = ["6.8", "7.0"]
memory = "64MiB"
seed = 3

[[process]]
name = "parent"

[[vma]]
name = "buf"
process = "parent"
size = "2M"
mthp = ["64K"]

[[step]]
op = "touch"
vma = "buf"
write = true

[[step]]
op = "fork"
process = "parent"
as = "child"

[[step]]
op = "write"
process = "child"
vma = "buf"
every = 16
"""


def _write(tmp_path, text: str, name: str = "s.toml") -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# -- validation: one line, naming the file, the table and the key -----------------------------

BAD = [
    ("unknown step key", BASE.replace('as = "child"', 'as = "child"\nproces = "x"'),
     "[[step]] #2 (fork): unknown key 'proces'; expected one of op, process, as"),
    ("unknown vma key", BASE.replace('mthp = ["64K"]', 'mthp = ["64K"]\nsise = 1'),
     "[[vma]] #1: unknown key 'sise'"),
    ("unknown table", BASE + "\n[extra]\n", "unknown table [extra]"),
    ("wrong type", BASE.replace("seed = 3", 'seed = "3"'), "[machine]: key 'seed' must be an integer, not string '3'"),
    ("bool for int", BASE.replace("every = 16", "every = true"), "[[step]] #3 (write): key 'every' must be an integer"),
    ("bad size", BASE.replace('size = "2M"', 'size = "2Q"'), "[[vma]] #1 (buf): key 'size': cannot read size '2Q'"),
    ("size not of pages", BASE.replace('size = "2M"', "size = 5000"),
     "[[vma]] #1 (buf): key 'size': 5000 is not a multiple of the 4K page"),
    ("zero size", BASE.replace('size = "2M"', "size = 0"), "[[vma]] #1 (buf): key 'size': size 0 is zero"),
    ("bad mthp", BASE.replace('mthp = ["64K"]', 'mthp = ["8K"]'), "[[vma]] #1 (buf): key 'mthp': 8K is not an anonymous folio size"),
    ("range past the vma", BASE.replace("every = 16", 'every = 16\noffset = "1M"\nlength = "2M"'),
     "[[step]] #3 (write): key 'length': offset 1M + length 2M is not inside VMA 'buf' (2M)"),
    ("missing machine", BASE.replace("[machine]", "[scenario]").replace('kernels = ["6.8", "7.0"]\nmemory = "64MiB"\nseed = 3', ""),
     "missing table [machine]"),
    ("missing steps", BASE.split("[[step]]")[0], "missing table [[step]]"),
    ("missing processes", BASE.replace('[[process]]\nname = "parent"', ""), "missing table [[process]]"),
    ("forward reference", BASE.replace('op = "fork"\nprocess = "parent"\nas = "child"',
                                       'op = "read"\nprocess = "child"\nvma = "buf"\n\n[[step]]\nop = "fork"\nprocess = "parent"\nas = "child"'),
     "[[step]] #2 (read): key 'process': no process 'child' at this point (it is created by [[step]] #3 (fork), later)"),
    ("exited process", BASE + '\n[[step]]\nop = "exit"\nprocess = "child"\n\n[[step]]\nop = "read"\nprocess = "child"\nvma = "buf"\n',
     "[[step]] #5 (read): key 'process': 'child' has exited (at [[step]] #4 (exit))"),
    ("unknown kernel", BASE.replace('"7.0"]', '"7.9"]'), "[machine]: key 'kernels': unknown kernel '7.9'"),
    ("unknown op", BASE.replace('op = "fork"', 'op = "clone"'), "[[step]] #2: key 'op': string 'clone'; expected one of touch"),
    ("unknown vma", BASE.replace('vma = "buf"\nevery', 'vma = "bfu"\nevery'), "[[step]] #3 (write): key 'vma': no VMA named 'bfu'"),
    ("unknown param", BASE.replace('size = "2M"', 'size = "$region"'), "[[vma]] #1: key 'size': no parameter 'region' in [params]"),
    ("unpin unknown", BASE + '\n[[step]]\nop = "unpin"\npin = "dma"\n', "[[step]] #4 (unpin): key 'pin': no pin 'dma' held"),
    ("two patterns", BASE.replace("every = 16", "every = 16\nrandom = 0.1"), "[[step]] #3 (write): keys 'every' and 'random'"),
    ("bad random", BASE.replace("every = 16", "random = 1.5"), "[[step]] #3 (write): key 'random': 1.5 is not a fraction"),
    ("bad prot", BASE.replace('mthp = ["64K"]', 'mthp = ["64K"]\nprot = "wr"'), "[[vma]] #1 (buf): key 'prot': 'wr'"),
    ("repeat without steps", BASE + '\n[[step]]\nop = "repeat"\ncount = 2\n', "[[step]] #4 (repeat): missing key 'steps'"),
    ("inside repeat", BASE + '\n[[step]]\nop = "repeat"\ncount = 2\n[[step.steps]]\nop = "exit"\nprocess = "child"\n',
     "[[step]] #4.1 (exit): key 'process': 'child' has exited (at [[step]] #4.1 (exit))"),
    ("not toml", "[machine\n", "not valid TOML"),
]


@pytest.mark.parametrize("text,message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_scenario_is_one_line_naming_file_table_and_key(tmp_path, capsys, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(ScenarioError) as e:
        load(path)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith(f"{path}: ")
    assert message in str(e.value)
    assert "\n" not in str(e.value)
    # The command: exit 2, one line on stderr, nothing on stdout.
    assert cli.main(["run", path]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and message in err and err.startswith("ptebatch run: error: ")


def test_set_overrides_and_sweeps_params(tmp_path):
    path = _write(tmp_path, BASE.replace('size = "2M"', 'size = "$region"').replace('mthp = ["64K"]', 'mthp = ["$folio"]')
                  + '\n[params]\nregion = "1M"\nfolio = ["16K", "64K"]\n')
    sc = load(path)
    assert [c.label for c in sc.cases] == ["folio=16K", "folio=64K"]
    assert sc.cases[0].vmas[0].size == 1 << 20
    sc = load(path, parse_set(["region=2MiB", "folio=64K,2M"]))
    assert [c.label for c in sc.cases] == ["folio=64K", "folio=2M"]
    assert sc.cases[1].vmas[0].size == 2 << 20 and sc.cases[1].vmas[0].mthp == [2 << 20]
    with pytest.raises(ScenarioError, match=r"--set: no parameter 'size' in \[params\]; known: region, folio"):
        load(path, {"size": "1M"})
    with pytest.raises(ScenarioError, match=r"\[\[vma\]\] #1 \(buf\): key 'size': cannot read size '1Q'"):
        load(path, {"region": "1Q"})


def test_cli_usage_and_runtime_errors(tmp_path, capsys):
    good = _write(tmp_path, BASE)
    assert cli.main(["run", good, "--kernel", "6.8,9.9"]) == 2
    assert capsys.readouterr().err.startswith("ptebatch run: error: argument --kernel: unknown kernel '9.9'")
    assert cli.main(["run", good, "--set", "seed"]) == 2
    assert capsys.readouterr().err == "ptebatch run: error: argument --set: 'seed' is not NAME=VALUE\n"
    assert cli.main(["run", good, "--json", "--csv"]) == 2
    capsys.readouterr()
    assert cli.main(["run", str(tmp_path / "missing.toml")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.toml: No such file or directory" in err
    # As a program (python -m ptebatch.cli is a module of its own): still one line and exit 2.
    bad = _write(tmp_path, BASE.replace("seed = 3", "seed = -1"), "bad.toml")
    p = subprocess.run([sys.executable, "-m", "ptebatch.cli", "run", bad], capture_output=True, text=True)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == f"ptebatch run: error: {bad}: [machine]: key 'seed' must be at least 0, not -1\n"
    # Valid, but the child writes a range the parent made read-only before the fork: a
    # runtime fault (exit 1) that names the step and the kernel.
    ro = _write(tmp_path, BASE.replace('[[step]]\nop = "fork"', '[[step]]\nop = "mprotect"\nvma = "buf"\nprot = "r"\n\n[[step]]\nop = "fork"'), "ro.toml")
    assert cli.main(["run", ro]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and f"{ro}: [[step]] #4 (write), kernel 6.8: " in err
    with pytest.raises(pb.AccessFault):
        run(load(ro))


# -- the rows equal the same steps through the Python API -------------------------------------

HAND = """\
[machine]
arch = "arm64-4k"
kernels = ["6.8", "6.12", "7.0"]
memory = "64MiB"
seed = 9

[[file]]
name = "lib"
size = "1M"
folio_size = "16K"

[[process]]
name = "parent"

[[vma]]
name = "heap"
process = "parent"
size = "4M"
mthp = ["64K", "2M"]

[[vma]]
name = "lib"
process = "parent"
size = "1M"
prot = "r"
file = "lib"

[[step]]
op = "touch"
vma = "heap"
write = true

[[step]]
op = "touch"
vma = "lib"

[[step]]
op = "pin"
vma = "heap"
offset = "64K"
length = "8K"
as = "dma"

[[step]]
op = "fork"
process = "parent"
as = "child"

[[step]]
op = "write"
process = "child"
vma = "heap"
every = 7
first = 3

[[step]]
op = "mprotect"
process = "parent"
vma = "heap"
offset = "1M"
length = "1M"
prot = "r"

[[step]]
op = "repeat"
count = 2

  [[step.steps]]
  op = "fork"
  process = "child"
  as = "grandchild"

  [[step.steps]]
  op = "read"
  process = "grandchild"
  vma = "heap"
  pages = [0, 5, 700]

  [[step.steps]]
  op = "exit"
  process = "grandchild"

[[step]]
op = "unpin"
pin = "dma"

[[step]]
op = "madvise"
process = "child"
vma = "heap"
length = "2M"
advice = "dontneed"

[[step]]
op = "munmap"
process = "parent"
vma = "heap"
offset = "512K"
length = "1M"

[[step]]
op = "check"

[[step]]
op = "exit"
process = "child"
"""


def _by_hand(kernel: str, batching: bool):
    """HAND's steps through the Python API, in order; per step (label, ptes, counter deltas)."""
    sim = pb.Simulation("arm64-4k", kernel, "64MiB", seed=9, batching=batching)
    parent = sim.spawn()
    fid = sim.create_file("1M", "16K")
    heap = parent.mmap("4M", mthp=["64K", "2M"])
    lib = parent.mmap("1M", "r", file=fid)
    page = sim.page_size
    out = []

    def step(label, ptes, fn):
        before = sim.stats
        fn()
        sim.check()
        after = sim.stats
        out.append((label, ptes, {k: after[k] - before[k] for k in COUNTERS}))

    step("1", 1024, lambda: parent.touch(heap.start, heap.length, write=True))
    step("2", 256, lambda: parent.touch(lib.start, lib.length))
    pins = []
    step("3", 2, lambda: pins.append(parent.pin(heap.start + (64 << 10), 8192)))
    kids = []
    step("4", 1280, lambda: kids.append(parent.fork()))
    child = kids[0]
    picked = list(range(3, 1024, 7))
    step("5", len(picked), lambda: [child.write(heap.start + i * page) for i in picked])
    step("6", 256, lambda: parent.mprotect(heap.start + (1 << 20), "1M", "r"))
    for _ in range(2):
        gk = []
        step("7.1", 1280, lambda: gk.append(child.fork()))
        step("7.2", 3, lambda: [gk[0].read(heap.start + i * page) for i in (0, 5, 700)])
        step("7.3", 1280, lambda: gk[0].exit())
    step("8", 0, lambda: pins[0].unpin())
    step("9", 512, lambda: child.madvise(heap.start, "2M", "dontneed"))
    step("10", 256, lambda: parent.munmap(heap.start + (512 << 10), "1M"))
    step("11", 0, lambda: None)
    step("12", 1280, lambda: child.exit())
    return sim, out


@pytest.mark.parametrize("kernel,batching", [("6.8", True), ("6.12", True), ("7.0", True), ("7.0", False)])
def test_rows_equal_the_same_steps_by_hand(tmp_path, kernel, batching):
    sc = load(_write(tmp_path, HAND))
    sim, rows = execute(sc, kernel, batching=batching)
    hand_sim, hand = _by_hand(kernel, batching)
    steps = [r for r in rows if r["step"] != "total"]
    assert [(r["step"], r["ptes"], {k: r[k] for k in COUNTERS}) for r in steps] == hand
    assert [r["iteration"] for r in steps if r["step"].startswith("7.")] == [1, 1, 1, 2, 2, 2]
    assert all(r["kernel"] == kernel and r["batching"] is batching for r in rows)
    assert sim.state_equal(hand_sim)
    total = rows[-1]
    assert total["step"] == "total" and total["pte_writes"] == sum(r["pte_writes"] for r in steps)
    assert total["free_pages"] == sim.free_pages


def test_run_covers_every_kernel_case_and_mode(tmp_path):
    sc = load(_write(tmp_path, BASE.replace('seed = 3', 'seed = 3\nbatching = "both"')))
    rows = run(sc, kernels=["6.12", "7.0"])
    runs = [(r["kernel"], r["batching"]) for r in rows if r["step"] == "total"]
    assert runs == [("6.12", True), ("6.12", False), ("7.0", True), ("7.0", False)]
    fork = {(r["kernel"], r["batching"]): r for r in rows if r["op"] == "fork"}
    # Per PTE, fork makes one batch per PTE; batched, one per 64K folio.
    assert fork[("7.0", False)]["batches"] == 512 and fork[("7.0", True)]["batches"] == 32
    assert fork[("7.0", True)]["batched_ptes"] == 512


def test_random_pattern_is_seeded_and_sized(tmp_path):
    path = _write(tmp_path, BASE.replace("every = 16", "random = 0.1"))
    a, b = run(load(path)), run(load(path))
    writes = [r for r in a if r["op"] == "write"]
    assert [r["ptes"] for r in writes] == [51, 51]                   # round(0.1 * 512) per kernel
    assert writes[0]["cow_copies"] + writes[0]["cow_reuses"] == 51
    assert a == b
    other = run(load(_write(tmp_path, BASE.replace("every = 16", "random = 0.1").replace("seed = 3", "seed = 4"), "t.toml")))
    assert [r["ptes"] for r in other if r["op"] == "write"] == [51, 51]


# -- output formats ---------------------------------------------------------------------------

def test_json_and_csv_have_the_documented_fields(tmp_path, capsys):
    path = _write(tmp_path, BASE)
    assert cli.main(["run", path, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["format"] == "ptebatch-scenario-results" and doc["version"] == 1
    assert doc["fields"] == list(ROW_FIELDS)
    assert [list(r) for r in doc["rows"]] == [list(ROW_FIELDS)] * len(doc["rows"])
    assert [r["step"] for r in doc["rows"]] == ["1", "2", "3", "total"] * 2
    out = tmp_path / "rows.csv"
    assert cli.main(["run", path, "--csv", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert list(rows[0]) == list(ROW_FIELDS)
    assert len(rows) == len(doc["rows"])
    for c, j in zip(rows, doc["rows"]):
        assert c["batching"] == str(j["batching"]).lower()
        assert all(c[k] == str(j[k]) for k in ROW_FIELDS if k != "batching")
    # The documentation names every field.
    with open(os.path.join(ROOT, "docs", "scenarios.md")) as f:
        doc_text = f.read()
    for name in ROW_FIELDS:
        assert f"`{name}`" in doc_text


def test_table_has_a_legend(tmp_path, capsys):
    path = _write(tmp_path, BASE)
    assert cli.main(["run", path, "--kernel", "7.0"]) == 0
    out = capsys.readouterr().out
    assert "columns (" in out and "refcount folio refcount atomic operations" in out
    assert " 6.8 " not in out and "7.0" in out


# -- every example runs -----------------------------------------------------------------------

def test_examples_exist():
    names = {os.path.basename(p) for p in EXAMPLES}
    assert {"fork-munmap-matrix.toml", "cow-pte-mapped-thp.toml", "cow-single-pte.toml",
            "cow-partial-mremap.toml", "cow-partially-shared.toml", "cow-pinned-before-fork.toml",
            "fragmented.toml", "replay-snapshot.toml"} <= names
    assert os.path.getsize(os.path.join(ROOT, "examples", "replay-snapshot.npz")) < 200_000


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_example_runs(path):
    with open(path) as f:
        assert f.readline().startswith("# "), "an example starts with a comment header"
    sc = load(path)
    rows = run(sc)
    totals = [r for r in rows if r["step"] == "total"]
    assert len(totals) == len(sc.cases) * len(sc.kernels) * len(sc.batching)
    assert all(t["ptes"] > 0 for t in totals)
    assert format_table(sc, rows) and json.loads(to_json(sc, rows))["rows"] and to_csv(rows)


def test_fork_matrix_shows_batching():
    sc = load(os.path.join(ROOT, "examples", "fork-munmap-matrix.toml"), {"folio_size": ["4K", "64K"], "region": "4M"})
    rows = run(sc)
    fork = {(r["case"], r["kernel"]): r for r in rows if r["op"] == "fork"}
    assert fork[("folio_size=4K", "7.0")]["batches"] == 1024
    assert fork[("folio_size=64K", "6.8")]["refcount_atomics"] == 1024
    assert fork[("folio_size=64K", "7.0")]["refcount_atomics"] == 64
    assert np.all([r["ptes"] == 1024 for r in rows if r["op"] in ("fork", "munmap", "exit")])

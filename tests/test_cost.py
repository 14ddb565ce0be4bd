"""The cost model (ptebatch.cost): NNLS, the fit, and `ptebatch predict`."""

from __future__ import annotations

import copy
import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch import cli, cost, scenario

MATRIX = "examples/fork-munmap-matrix.toml"
TINY = ["--set", "region=4MiB", "--set", "folio_size=4K,64K,2M"]


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--quiet", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def shipped() -> dict:
    return cost.load_calibration()


# -- NNLS ----------------------------------------------------------------------------------------

def _brute_nnls(A: np.ndarray, b: np.ndarray) -> float:
    """The least residual over every support set whose least-squares solution is non-negative."""
    best = float(np.linalg.norm(b))
    for k in range(1, A.shape[1] + 1):
        for cols in itertools.combinations(range(A.shape[1]), k):
            z = np.linalg.lstsq(A[:, cols], b, rcond=None)[0]
            if np.all(z >= 0):
                best = min(best, float(np.linalg.norm(A[:, cols] @ z - b)))
    return best


def test_nnls_recovers_known_coefficients():
    rng = np.random.default_rng(7)
    A = rng.uniform(0, 10, size=(40, 4))
    x = np.array([3.0, 0.0, 120.5, 0.25])
    got = cost.nnls(A, A @ x)
    np.testing.assert_allclose(got, x, rtol=1e-9, atol=1e-9)


def test_nnls_clamps_where_least_squares_goes_negative():
    A = np.array([[1.0, 1.0], [1.0, 2.0], [1.0, 3.0]])
    b = np.array([3.0, 2.0, 1.0])  # slope -1 unconstrained
    assert np.linalg.lstsq(A, b, rcond=None)[0][1] < 0
    np.testing.assert_allclose(cost.nnls(A, b), [2.0, 0.0], atol=1e-12)


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 12), st.integers(1, 4), st.integers(0, 2**32 - 1))
def test_nnls_is_optimal(m, n, seed):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(m, n))
    b = rng.normal(size=m)
    x = cost.nnls(A, b)
    assert np.all(x >= 0)
    assert np.linalg.norm(A @ x - b) <= _brute_nnls(A, b) + 1e-9
    # KKT: no descent direction into the feasible set.
    w = A.T @ (b - A @ x)
    assert np.all(w <= 1e-8)
    assert np.all(np.abs(w[x > 0]) <= 1e-8)


def test_nnls_rejects_bad_shapes():
    with pytest.raises(ValueError, match="m×n"):
        cost.nnls(np.ones((3, 2)), np.ones(2))
    with pytest.raises(ValueError, match="finite"):
        cost.nnls(np.array([[np.nan]]), np.ones(1))


# -- the simulated counterpart of a calibration ---------------------------------------------------

@pytest.mark.parametrize("kernel", ["6.8", "6.18"])
@pytest.mark.parametrize("folio, pmd", [(4096, False), (64 << 10, False), (2 << 20, False), (2 << 20, True)])
def test_features_are_linear_in_the_region(kernel, folio, pmd):
    """What lets the fit simulate a few PMDs and scale to the calibrated region."""
    small = cost.simulate_case("x86-64", kernel, folio, 4 << 20, pmd)
    large = cost.simulate_case("x86-64", kernel, folio, 32 << 20, pmd)
    for model, (features, ops) in cost.MODELS.items():
        extra = (cost.PMD_TERMS[model][0],) if model in cost.PMD_TERMS else ()
        for op in ops:
            for f in features + extra:
                assert large[op][f] == 8 * small[op][f], (model, op, f)
    # A PMD THP is mapped, copied and zapped by its PMD alone; PTE-mapped folios by PTEs.
    assert (small["fork"]["pmd_copies"] > 0) == pmd and (small["fork"]["pte_writes"] > 0) != pmd
    assert (small["parent-munmap"]["pmd_zaps"] > 0) == pmd
    assert small["faults"]["pages_allocated"] == (4 << 20) // 4096
    # Some counters are not (fork's one TLB flush), and the fit leaves them out.
    assert small["fork"]["tlb_flush_ranges"] == large["fork"]["tlb_flush_ranges"] == 1


def _synthetic(cal: dict, coefs: dict[str, dict[str, float]]) -> dict:
    """``cal`` with every PTE-mapped time replaced by what the model with ``coefs`` predicts."""
    syn = copy.deepcopy(cal)
    cs, _ = cost.cases(cal)
    want = {}
    for c in cs:
        name = next(n for n, (_, ops) in cost.MODELS.items() if c.operation in ops)
        want[(c.folio_size, c.operation)] = sum(coefs[name][f] * c.features[f] for f in coefs[name])
    for m in syn["measurements"]:
        key = (m["folio_size"], m["operation"])
        if key in want:
            m["ns_per_pte"] = m["ns_per_pte_min"] = want[key]
    return syn


def test_fit_recovers_coefficients_from_a_synthetic_calibration(shipped):
    coefs = {"fork": {"pte_writes": 20.0, "batches": 55.0, "pmd_copies": 900.0},
             "munmap": {"pte_writes": 12.0, "batches": 40.0, "folios_freed": 150.0, "pages_freed": 9.0,
                        "pmd_zaps": 700.0},
             "exit": {"pte_writes": 15.0, "batches": 0.0, "pmd_zaps": 300.0},
             "faults": {"pte_writes": 100.0, "faults": 1500.0, "pages_allocated": 600.0}}
    syn = _synthetic(shipped, coefs)
    for estimator in cost.ESTIMATORS:
        model = cost.fit(syn, estimator=estimator)
        for name, want in coefs.items():
            got = model.ops[name].coef_ns
            for f, v in want.items():
                assert got[f] == pytest.approx(v, rel=1e-6, abs=1e-6), (name, f)
            assert model.ops[name].rms_ns_per_pte < 1e-6
            assert np.isfinite(model.ops[name].condition)
    # Fitted on half the sizes, the other half is predicted exactly too.
    _, rows = cost.held_out(syn)
    assert {r.folio_size for r in rows if r.held_out} == {*cost.HELD_OUT_SIZES, "2M-pmd"}
    # The parent's munmap of PMD THPs is the one PMD case predicted rather than fitted.
    assert [r.operation for r in rows if r.held_out and r.folio_size == "2M-pmd"] == ["parent-munmap"]
    for r in rows:
        assert r.predicted_ns_per_pte == pytest.approx(r.measured_ns_per_pte, rel=1e-6)
    assert "target met" in cost.format_held_out(rows) and "missed" not in cost.format_held_out(rows)


def test_fit_of_the_shipped_calibration(shipped):
    model = cost.fit()
    assert model.calibration["kernel"] == "6.18" and model.calibration["arch"] == "x86-64"
    assert not model.notes
    # PMD terms rest on the PMD-mapped cases: the parent's munmap of them is predicted only.
    assert "2M-pmd fork" in model.ops["fork"].fitted_on and "2M-pmd faults" in model.ops["faults"].fitted_on
    assert "2M-pmd child-munmap" in model.ops["munmap"].fitted_on
    assert "2M-pmd parent-munmap" not in model.ops["munmap"].fitted_on
    assert model.ops["fork"].coef_ns["pmd_copies"] > 0 and model.ops["munmap"].coef_ns["pmd_zaps"] > 0
    # With a batching kernel, refcount atomics and rmap calls are one per batch: folded in.
    assert {"refcount_atomics", "rmap_calls"} <= set(model.ops["fork"].aliases)
    for f in model.ops.values():
        assert all(v >= 0 for v in f.coef_ns.values())
    # The 4K fork (one folio per PTE) costs the same per PTE under both kernels; a 2M one less
    # with batching.
    cs = {k: cost.cases(shipped, kernel=k)[0] for k in ("6.8", "6.18")}
    fork = {k: {c.folio_size: model.predict("fork", c.features) for c in v if c.operation == "fork"} for k, v in cs.items()}
    assert fork["6.8"]["4K"] == pytest.approx(fork["6.18"]["4K"])
    assert fork["6.18"]["2M-pte"] < fork["6.8"]["2M-pte"]


# -- ptebatch predict ---------------------------------------------------------------------------

def test_predict_scenario_json_matches_the_counters(capsys):
    code, out, err = _run(capsys, "predict", MATRIX, *TINY, "--kernel", "6.8,6.18", "--json")
    assert code == 0, err
    doc = json.loads(out)
    coef = {k: v["coefficients_ns"] for k, v in doc["model"]["operations"].items()}
    rows = scenario.run(scenario.load(MATRIX, scenario.parse_set(TINY[1::2])), ["6.8", "6.18"])
    steps = [r for r in rows if r["step"] != "total"]
    assert len(doc["rows"]) == len(steps)
    for p, r in zip(doc["rows"], steps):
        assert (p["kernel"], p["op"], p["ptes"]) == (r["kernel"], r["op"], r["ptes"])
        freed = r["pages_freed"]
        name = {"touch": "faults"}.get(r["op"], r["op"])
        feats = dict(r, pages_freed=freed, pages_allocated=max(0, -freed))
        want = sum(c * feats[f] for f, c in coef[name].items())
        if name == "exit" and r["folios_freed"]:
            z = coef["munmap"]
            want += z["folios_freed"] * r["folios_freed"] + z["pages_freed"] * freed
        assert p["ns"] == pytest.approx(want)
    fork = {(p["source"], p["kernel"]): p["ns"] for p in doc["rows"] if p["op"] == "fork"}
    assert fork[("folio_size=2M", "6.18")] < fork[("folio_size=2M", "6.8")]
    assert fork[("folio_size=4K", "6.18")] == pytest.approx(fork[("folio_size=4K", "6.8")])


def test_predict_text_marks_what_it_cannot_predict(capsys, tmp_path):
    toml = tmp_path / "mprotect.toml"
    toml.write_text('[machine]\narch = "x86-64"\nkernels = ["6.8", "7.0"]\nmemory = "64MiB"\n'
                    '[[process]]\nname = "p"\n[[vma]]\nname = "r"\nprocess = "p"\nsize = "2MiB"\nmthp = ["64K"]\n'
                    '[[step]]\nop = "touch"\nvma = "r"\nwrite = true\n'
                    '[[step]]\nop = "mprotect"\nvma = "r"\nprot = "r"\n'
                    '[[step]]\nop = "fork"\nprocess = "p"\n')
    code, out, err = _run(capsys, "predict", str(toml))
    assert code == 0, err
    lines = out.splitlines()
    mprotect = next(line for line in lines if " mprotect " in line)
    assert mprotect.split()[-2:] == ["-", "-"]
    fork = next(line for line in lines if " fork " in line)
    assert all(float(x) > 0 for x in fork.split()[-2:])
    assert "- = not predicted: mprotect: mprotect is not calibrated" in out
    assert "columns:" in out and "or by PMDs" in out


def test_predict_demo_and_snapshot(capsys, tmp_path):
    code, out, err = _run(capsys, "predict", "--demo", "--region", "4MiB", "--json")
    assert code == 0, err
    rows = json.loads(out)["rows"]
    assert {r["step"] for r in rows} == {"4K", "16K", "32K", "64K", "128K", "256K", "512K", "1M", "2M", "2M-pmd"}
    assert {r["kernel"] for r in rows} == {"6.8", pb.NEWEST_KERNEL}
    assert all(r["ns"] > 0 and r["ptes"] == 1024 for r in rows)
    # PMD THPs: one copy_huge_pmd() per 2M, far cheaper than 512 PTEs, the same in both kernels.
    ns = {(r["step"], r["kernel"]): r["ns"] for r in rows}
    assert ns[("2M-pmd", "6.8")] == ns[("2M-pmd", pb.NEWEST_KERNEL)] < ns[("2M", pb.NEWEST_KERNEL)] / 5

    sim = pb.Simulation("x86-64", "6.18", "64M")
    p = sim.spawn()
    v = p.mmap("2M", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    from ptebatch.thpmaps import snapshot_of
    path = str(tmp_path / "s.npz")
    snapshot_of(sim, [p]).save(path)
    code, out, err = _run(capsys, "predict", "--snapshot", path, "--kernel", "6.8,6.18")
    assert code == 0, err
    line = next(line for line in out.splitlines() if line.startswith("pid "))
    old, new = map(float, line.split()[-2:])
    assert new < old


def test_own_calibration_replaces_the_shipped_one(capsys, tmp_path, shipped):
    doubled = copy.deepcopy(shipped)
    del doubled["_path"]
    for m in doubled["measurements"]:
        m["ns_per_pte"] *= 2
        m["ns_per_pte_min"] *= 2
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(doubled))
    outs = []
    for extra in ([], ["--calibration", str(path)]):
        code, out, err = _run(capsys, "predict", "--demo", "--region", "4MiB", "--json", *extra)
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[1]["model"]["calibration"]["file"] == str(path)
    for a, b in zip(outs[0]["rows"], outs[1]["rows"]):
        assert b["ns"] == pytest.approx(2 * a["ns"])


def test_held_out_command(capsys):
    code, out, err = _run(capsys, "predict", "--held-out")
    assert code == 0, err
    for op in ("fork", "child-exit", "child-munmap", "parent-munmap", "faults"):
        assert f"== {op} " in out
    assert "16K*" in out and " 2M-pmd " in out and "2M-pmd*" in out
    assert "seed series" in out


@pytest.mark.parametrize("argv, code, message", [
    (["predict"], 2, "one of the arguments"),
    (["predict", MATRIX, "--demo"], 2, "not allowed with"),
    (["predict", MATRIX, "--region", "4MiB"], 2, "--region: only with --demo"),
    (["predict", "--demo", "--set", "region=1M"], 2, "--set: only with a scenario"),
    (["predict", "--demo", "--kernel", "5.4"], 2, "invalid choice"),
    (["predict", "--demo", "--region", "3000"], 2, "--region"),
    (["predict", "no-such.toml"], 1, "no-such.toml"),  # as for ptebatch run
    (["predict", "--demo", "--calibration", "no-such.json"], 1, "no-such.json"),
    (["predict", "--snapshot", "no-such.npz"], 1, "no-such.npz"),
])
def test_errors(capsys, argv, code, message):
    got, out, err = _run(capsys, *argv)
    assert got == code
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(schema="other"), "not a calibration file"),
    (lambda c: c.update(schema_version=2), "schema_version"),
    (lambda c: c.update(kernel_release="4.19.0"), "not modelled"),
    (lambda c: c.update(machine="sparc64"), "not a modelled layout"),
    (lambda c: c["measurements"][0].update(ns_per_pte="fast"), "ns_per_pte"),
    (lambda c: c["measurements"][0].update(ptes=0), "ptes"),
    (lambda c: c.update(measurements=[m for m in c["measurements"] if m["mapping"] == "pmd"]), "no PTE-mapped"),
])
def test_bad_calibration_files(capsys, tmp_path, shipped, edit, message):
    bad = copy.deepcopy(shipped)
    del bad["_path"]
    edit(bad)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(cost.CalibrationFileError, match=message):
        cost.fit(str(path))
    code, out, err = _run(capsys, "predict", "--demo", "--region", "4MiB", "--calibration", str(path))
    assert code == 1 and out == "" and message in err and len(err.strip().splitlines()) == 1


def test_fit_of_a_dict():
    with open(cost.SHIPPED_CALIBRATION, encoding="utf-8") as f:
        cal = json.load(f)
    assert cost.fit(cal).calibration["file"] == "calibration"
    with pytest.raises(cost.CalibrationFileError, match="region_bytes"):
        cost.fit(dict(cal, region_bytes="1G"))
    with pytest.raises(cost.CalibrationFileError, match="not a calibration"):
        cost.fit({})


def test_not_json(capsys, tmp_path):
    path = tmp_path / "x.json"
    path.write_text("{")
    code, out, err = _run(capsys, "predict", "--held-out", "--calibration", str(path))
    assert code == 1 and "not a JSON calibration file" in err
    assert isinstance(cost.CalibrationFileError("x"), pb.PtebatchError)

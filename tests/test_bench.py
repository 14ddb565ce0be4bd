"""``ptebatch bench`` end to end at tiny sizes: the tables, the JSON fields, the errors."""

from __future__ import annotations

import json

import pytest
from test_cli import _one_error_line, _run

from ptebatch import bench, cli

QUICK = ["bench", "--quick", "--sizes", "4K,64K,2M", "--ptes", "4096"]
NUMBERS = [f"{impl}_ns_per_pte" for impl in bench.IMPLEMENTATIONS] + [
    "kernel_ns_per_pte", "kernel_ns_per_pte_min", "rust_over_copy", "numpy_over_copy", "reference_over_copy",
    "kernel_over_copy", "numpy_over_rust", "reference_over_rust", "kernel_over_rust"]




def test_json_has_every_number(capsys):
    code, out, err = _run(capsys, ["-q"] + QUICK + ["--json"])
    assert code == 0 and err == ""
    r = json.loads(out)
    assert (r["schema"], r["schema_version"], r["layout"]) == ("ptebatch-bench", 1, "x86-64")
    assert r["settings"]["sizes"] == ["4K", "64K", "2M"] and r["settings"]["ptes"] == 4096
    assert r["calibration"]["kernel_release"] and "provenance" in r["calibration"]
    got = {(row["operation"], row["folio_size"]) for row in r["rows"]}
    assert got == {(op, s) for op in bench.OPERATIONS for s in ("4K", "64K", "2M")} | {
        (op, "2M-pmd") for op in bench.OPERATIONS if op != "cut"}
    for row in r["rows"]:
        assert set(NUMBERS) <= set(row), row
        for impl in ("copy", "rust", "reference"):
            assert row[f"{impl}_ns_per_pte"] > 0, row
            assert len(row["samples_ns"][impl]) >= 2
        assert row["rust_over_copy"] == pytest.approx(row["rust_ns_per_pte"] / row["copy_ns_per_pte"])
        cut = row["operation"] == "cut"
        assert (row["numpy_ns_per_pte"] is not None) == cut
        assert (row["kernel_ns_per_pte"] is None) == (cut or (row["folio_size"], row["operation"]) == ("2M", "faults"))
        if not cut:
            # 2M folios mapped by PTEs are 2M-pte in the calibration, which times 2M faults only as
            # PMD faults; PMD THPs are 2M-pmd.
            want = {"2M": None if row["operation"] == "faults" else "2M-pte"}.get(row["folio_size"], row["folio_size"])
            assert row["kernel_folio_size"] == want and row["pmd_mapped"] == (row["folio_size"] == "2M-pmd")
            if want is not None:
                assert row["kernel_over_rust"] == pytest.approx(row["kernel_ns_per_pte"] / row["rust_ns_per_pte"])
            assert row["ptes"] == 8 << 20 >> 12
            # the reference region holds a 2M folio
            assert row["reference_ptes"] == 512


def test_tables_and_legends(capsys):
    code, out, err = _run(capsys, ["-q"] + QUICK + ["--kernel", "6.12"])
    assert code == 0 and err == ""
    assert "kernel 6.12 simulated" in out and "real kernel: calibration-rust-pyo3.json: kernel 6." in out
    for op in bench.OPERATIONS:
        assert bench.TITLES[op] in out
    assert out.count("columns:") == len(bench.OPERATIONS)
    assert "numpy/rust" in out and "kernel min" in out


def test_without_calibration(capsys, tmp_path):
    code, out, err = _run(capsys, ["-q", "bench", "--quick", "--sizes", "16K", "--ptes", "512",
                                   "--calibration", "none", "--json"])
    assert code == 0
    r = json.loads(out)
    assert r["calibration"] is None
    assert all(row["kernel_ns_per_pte"] is None for row in r["rows"])


@pytest.mark.parametrize("argv,want", [
    (["--sizes", "48K"], "argument --sizes: 48K is not an anonymous folio size"),
    (["--sizes", "4M"], "argument --sizes"),
    (["--kernel", "5.4"], 'argument --kernel: unknown kernel version "5.4"'),
    (["--ptes", "1"], "argument --ptes: 1 is out of range"),
    (["--region", "3M", "--sizes", "2M"], "argument --region: the 3M region is not a multiple of the 2M folio size"),
    (["--region", "0"], "argument --region"),
    (["--region", "1M", "--sizes", "4K", "--pmd"], "argument --pmd: the 1M region is not a multiple of the 2M PMD size"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_usage_errors(capsys, argv, want):
    _one_error_line(*_run(capsys, ["bench", "--quick"] + argv), 2, want)


def test_bad_calibration_files_are_runtime_errors(capsys, tmp_path):
    missing = tmp_path / "missing.json"
    _one_error_line(*_run(capsys, ["bench", "--quick", "--calibration", str(missing)]), 1, "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    _one_error_line(*_run(capsys, ["bench", "--quick", "--calibration", str(bad)]), 1,
                    "bad.json: not a calibration file (bad JSON")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema": "ptebatch-snapshot"}))
    _one_error_line(*_run(capsys, ["bench", "--quick", "--calibration", str(other)]), 1,
                    "other.json: not a calibration file (schema")
    # A measurement without its fields: the same checks as the cost model's, naming the field.
    cal = json.loads(bench.DEFAULT_CALIBRATION.read_text())
    del cal["measurements"][0]["ns_per_pte"]
    short = tmp_path / "short.json"
    short.write_text(json.dumps(cal))
    _one_error_line(*_run(capsys, ["bench", "--quick", "--calibration", str(short)]), 1,
                    "short.json: measurements[0] field 'ns_per_pte' is missing")


def test_run_checks_its_settings():
    with pytest.raises(ValueError, match="not a multiple of the 2M folio size"):
        bench.run(bench.Settings(sizes=(2 << 20,), region=1 << 20, ref_region=1 << 20))
    with pytest.raises(ValueError, match="kernel"):
        bench.run(bench.Settings(kernel="2.6"))
    with pytest.raises(ValueError, match="ref_region=1M is not a multiple of the 2M PMD size"):
        bench.run(bench.Settings(sizes=(4096,), region=2 << 20, ref_region=1 << 20))


def test_without_the_pmd_row(capsys):
    """--no-pmd, or a region the PMD size does not divide, leaves the 2M-pmd rows out."""
    for extra in (["--no-pmd"], ["--region", "1M"]):
        code, out, err = _run(capsys, ["-q", "bench", "--quick", "--sizes", "16K", "--ptes", "512",
                                       "--calibration", "none", "--json"] + extra)
        assert code == 0, err
        assert {row["folio_size"] for row in json.loads(out)["rows"]} == {"16K"}

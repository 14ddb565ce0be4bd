"""The package as a user installs it: one version (Cargo's) everywhere, the MIT license, and the
abi3 wheel that scripts/setup.sh builds into dist/, installed into a fresh virtualenv and
imported there with no Rust toolchain on PATH and no source tree in reach.

When the package under test was imported from the source tree (``maturin develop``, or the
extension copied next to the sources), there may be no wheel: the wheel test then skips. When it
was imported from an installed wheel (what scripts/setup.sh does), the wheel must be in dist/.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

import ptebatch as pb
from ptebatch import _core

ROOT = Path(__file__).resolve().parent.parent
BARE_PATH = "/usr/bin:/bin"


def _cargo_version() -> str:
    text = (ROOT / "Cargo.toml").read_text()
    package = text.split("[package]", 1)[1].split("\n[", 1)[0]
    return re.search(r'^version\s*=\s*"([^"]+)"', package, re.M).group(1)


def _from_source_tree() -> bool:
    return Path(pb.__file__).resolve().is_relative_to(ROOT / "python")


def test_one_version_cargos():
    version = _cargo_version()
    assert pb.__version__ == _core.__version__ == version
    pyproject = (ROOT / "pyproject.toml").read_text()
    project = pyproject.split("[project]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^dynamic\s*=\s*\["version"\]', project, re.M), "pyproject must take Cargo's version"
    assert not re.search(r"^version\s*=", project, re.M), "a second version in pyproject.toml"
    if not _from_source_tree():
        assert metadata.version("ptebatch") == version


def test_license_is_mit_everywhere():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "the ptebatch authors" in text
    assert re.search(r'^license\s*=\s*"MIT"', (ROOT / "Cargo.toml").read_text(), re.M)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'license = { text = "MIT" }' in pyproject and "The ptebatch authors" in pyproject


def test_sources_parse_as_python_3_9():
    """The wheel claims CPython 3.9 and later: no newer syntax in the package."""
    files = sorted((ROOT / "python" / "ptebatch").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        ast.parse(path.read_text(), str(path), feature_version=(3, 9))
    with pytest.raises(SyntaxError):
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 9))


def _wheel() -> Path:
    wheels = sorted((ROOT / "dist").glob(f"ptebatch-{_cargo_version()}-*.whl"))
    if not wheels:
        if _from_source_tree():
            pytest.skip("ptebatch is imported from the source tree and dist/ has no wheel "
                        "(bash scripts/setup.sh builds one)")
        pytest.fail("ptebatch is installed, but dist/ has no wheel of this version: run bash scripts/setup.sh")
    assert len(wheels) == 1, f"more than one wheel of this version in dist/: {wheels}"
    return wheels[0]


def test_wheel_is_one_abi3_wheel_with_everything():
    wheel = _wheel()
    assert "-cp39-abi3-" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        info = f"ptebatch-{_cargo_version()}.dist-info"
        meta = z.read(f"{info}/METADATA").decode()
        entry_points = z.read(f"{info}/entry_points.txt").decode()
    assert "ptebatch/_core.abi3.so" in names
    for name in ("__init__.py", "__main__.py", "cli.py", "_core.pyi", "py.typed", "reference/__init__.py"):
        assert f"ptebatch/{name}" in names, name
    assert any(n.startswith(info) and n.endswith("/LICENSE") for n in names), sorted(names)
    fields = [line.split(": ", 1) for line in meta.split("\n\n", 1)[0].splitlines() if ": " in line]
    got = {}
    for key, value in fields:
        got.setdefault(key, []).append(value)
    assert got["Version"] == [_cargo_version()]
    assert got["Requires-Python"] == [">=3.9"]
    assert any(d.startswith("numpy") for d in got["Requires-Dist"])
    assert got["License"] == ["MIT"] and got["Author"] == ["The ptebatch authors"]
    assert re.search(r"^\[console_scripts\]\nptebatch\s*=\s*ptebatch\.cli:main$", entry_points, re.M), entry_points


def test_wheel_installs_and_imports_without_cargo(tmp_path):
    """A fresh virtualenv, the wheel and numpy installed from binaries only, and PATH without
    cargo or rustc: the import must come from that virtualenv's site-packages."""
    wheel = _wheel()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "CARGO", "RUST"))}
    env["PATH"] = BARE_PATH
    assert shutil.which("cargo", path=BARE_PATH) is None and shutil.which("rustc", path=BARE_PATH) is None
    # This test's pip installs into the new environment (--python), so it needs no pip of its own.
    r = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                        "--only-binary", ":all:", str(wheel)],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    probe = (
        "import os, sys, sysconfig, numpy as np, ptebatch as pb, ptebatch._core as core\n"
        "site = os.path.realpath(sysconfig.get_paths()['purelib'])\n"
        "for f in (pb.__file__, core.__file__):\n"
        "    assert os.path.realpath(f).startswith(site + os.sep), (f, site)\n"
        "assert core.__file__.endswith('_core.abi3.so'), core.__file__\n"
        "L = pb.layout('x86-64')\n"
        "ptes = L.mk_pte(np.arange(16, 32, dtype=np.uint64), write=True)\n"
        "n = pb.folio_pte_batch(ptes, folio_pfn=16, folio_nr_pages=16, layout=L, kernel=pb.NEWEST_KERNEL).nr\n"
        "print(pb.__version__, n, sys.prefix)\n"
    )
    r = subprocess.run([str(python), "-I", "-c", probe], env=env, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [_cargo_version(), "16", str(venv)]
    for argv in ([str(venv / "bin" / "ptebatch"), "--version"], [str(python), "-m", "ptebatch", "--version"]):
        r = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (0, f"ptebatch {_cargo_version()}\n", ""), argv

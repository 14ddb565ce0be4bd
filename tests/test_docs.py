"""The repository's text stands on its own: no file points outside it, and every docs/ page a
file names exists. Kernel facts are cited by kernel file, function and version instead."""

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SELF = Path(__file__).resolve().relative_to(ROOT).as_posix()
# Notes that only the developers have; users of the repository do not.
OUTSIDE = (b"shared/spec", b"../shared")


def tracked_files():
    out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, check=True,
                         capture_output=True).stdout
    files = [f for f in out.decode().split("\0") if f]
    assert files, "git ls-files listed nothing"
    return files


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    for name in tracked_files():
        if name == SELF:
            continue
        path = ROOT / name
        if not path.is_file():  # deleted in the work tree
            continue
        for no, line in enumerate(path.read_bytes().splitlines(), 1):
            if any(s in line for s in OUTSIDE):
                offenders.append(f"{name}:{no}: {line.decode(errors='replace').strip()}")
    assert not offenders, "paths outside the repository:\n" + "\n".join(offenders)


def test_every_named_docs_page_exists():
    missing = []
    pattern = re.compile(r"\bdocs/[\w./-]+\.md\b")
    for name in tracked_files():
        if name == SELF or not name.endswith((".md", ".py", ".pyi", ".rs", ".sh", ".yml", ".toml")):
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        for no, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for ref in pattern.findall(line):
                if not (ROOT / ref).is_file():
                    missing.append(f"{name}:{no}: {ref}")
    assert not missing, "links to docs pages that do not exist:\n" + "\n".join(missing)

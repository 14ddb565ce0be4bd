"""The ``ptebatch`` command: what it prints, and that every mistake is one line and an exit code.

A usage error exits 2, a runtime error 1, Ctrl-C 130; each is exactly one line on stderr, nothing
on stdout and no traceback unless ``--debug``. The tests that read /proc of other processes need
root and skip otherwise, or when PTEBATCH_SKIP_LIVE is set.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import ptebatch as pb
from ptebatch import cli, study
from ptebatch.snapshot import Snapshot
from ptebatch.study import check_folio_size, folio_sizes, fork_study
from ptebatch.tables import mixed_table
from ptebatch.thpmaps import check_cont_sizes, snapshot_of

#: Where the package under test came from (the source tree, or site-packages when installed from
#: the wheel): subprocesses import the same one.
PYTHON_PATH = os.path.dirname(os.path.dirname(os.path.abspath(pb.__file__)))
LIVE = os.geteuid() == 0 and not os.environ.get("PTEBATCH_SKIP_LIVE")
live = pytest.mark.skipif(not LIVE, reason="reads /proc of other processes: needs root (and no PTEBATCH_SKIP_LIVE)")


def _snap(vmas: int = 2) -> Snapshot:
    sim = pb.Simulation("x86-64", "6.18", "64M")
    p = sim.spawn()
    v = p.mmap("1M", mthp=["64K"])
    p.touch(v.start, v.length, write=True)
    for i in range(vmas - 1):
        # Alternate the protection, so the VMAs do not merge; a read would map the zero page.
        w = p.mmap("64K", prot="r" if i % 2 else "rw")
        if not i % 2:
            p.touch(w.start, w.length, write=True)
    return snapshot_of(sim, [p])


@pytest.fixture(scope="module")
def snapshots(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("snaps")
    s = _snap()
    out = {"ok": str(d / "ok.npz"), "missing": str(d / "missing.npz"), "garbage": str(d / "garbage.npz")}
    s.save(out["ok"])
    with open(out["garbage"], "wb") as f:
        f.write(b"not a snapshot")
    # A layout no one models; and two VMAs over the same addresses (each still matches its pagemap).
    out["sparc"] = str(d / "sparc.npz")
    Snapshot(dict(s.header, arch="sparc"), dict(s.arrays), s.vma_names).save(out["sparc"])
    a = {k: v.copy() for k, v in s.arrays.items()}
    length = a["vma_end"][1] - a["vma_start"][1]
    a["vma_start"][1] = a["vma_start"][0]
    a["vma_end"][1] = a["vma_start"][0] + length
    out["overlap"] = str(d / "overlap.npz")
    # save() refuses such a snapshot; write it anyway, as a corrupt file would come.
    with pytest.MonkeyPatch.context() as m:
        m.setattr("ptebatch.snapshot.validate", lambda header, arrays: None)
        Snapshot(dict(s.header), a, s.vma_names).save(out["overlap"])
    many = _snap(vmas=60)
    out["many"] = str(d / "many.npz")
    many.save(out["many"])
    return out


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(code: int, out: str, err: str, want_code: int, want: str) -> None:
    assert code == want_code, (code, out, err)
    assert out == "", out
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and err.endswith("\n"), err
    assert lines[0].startswith("ptebatch") and ": error: " in lines[0], err
    assert want in lines[0], err


# -- usage errors: exit 2, naming the option ---------------------------------------------------

USAGE = [
    (["demo", "--size", "48K"], "argument --size: size '48K' is not a power of two"),
    (["demo", "--size", "3K"], "argument --size: size '3K' is not a power of two"),
    (["demo", "--size", "0"], "argument --size: size '0' is zero"),
    (["demo", "--size", "64", "--region", "16M"], "argument --size: 64 is not an anonymous folio size"),
    (["demo", "--size", "8K", "--region", "16M"], "argument --size: 8K is not an anonymous folio size"),
    (["demo", "--size", "4M", "--region", "16M"], "argument --size: 4M is not an anonymous folio size on x86-64"),
    (["demo", "--arch", "s390x", "--size", "2M", "--region", "16M"], "2M is not an anonymous folio size on s390x"),
    (["demo", "--arch", "ppc64-64k", "--size", "4K", "--region", "16M"], "4K is not an anonymous folio size on ppc64-64k"),
    (["demo", "--size", "2M", "--region", "1M"], "argument --size: 2M does not divide the 1M region"),
    (["demo", "--size", "64K", "--region", "96K"], "argument --size: 64K does not divide the 96K region"),
    (["demo", "--region", "0"], "argument --region: size '0' is zero"),
    (["demo", "--region", "1.5GiB"], "argument --region: cannot read size '1.5GiB'"),
    (["demo", "--region=-4K"], "argument --region: cannot read size '-4K'"),
    (["demo", "--region", "6K"], "argument --region: region 6K is not a positive multiple of the 4K page"),
    (["demo", "--arch", "arm64-64k", "--region", "16K"], "region 16K is not a positive multiple of the 64K page"),
    (["demo", "--region", "1T"], "argument --region: region 1024G is larger than 64G"),
    (["demo", "--kernel", "5.0"], "argument --kernel: invalid choice: '5.0'"),
    (["demo", "--arch", "sparc"], "argument --arch: invalid choice: 'sparc'"),
    (["demo", "--bogus"], "unrecognized arguments: --bogus"),
    (["frob"], "invalid choice: 'frob'"),
    (["batches", "--holes", "2"], "argument --holes: 2 is not a probability in [0, 1]"),
    (["batches", "--holes", "nan"], "argument --holes: nan is not a probability"),
    (["batches", "--holes=-inf"], "argument --holes: -inf is not a probability"),
    (["batches", "--holes", "often"], "argument --holes: 'often' is not a number"),
    (["batches", "--orders", "99"], "argument --orders: 99 is out of range (must be from 0 to 13)"),
    (["batches", "--orders", "-1"], "argument --orders: -1 is out of range"),
    (["batches", "--orders", "0", "1"], "argument --orders: order 1 is not an anonymous mTHP order"),
    (["batches", "--orders", "9", "--layout", "ppc64-64k"], "order 9 is above the PMD order of every layout chosen"),
    (["batches", "--orders"], "argument --orders: expected at least one argument"),
    (["batches", "--ptes", "0"], "argument --ptes: 0 is out of range"),
    (["batches", "--ptes", "1e3"], "argument --ptes: '1e3' is not an integer"),
    (["batches", "--width", "2"], "argument --width: 2 is out of range (must be at least 4)"),
    (["batches", "--seed", "-1"], "argument --seed: -1 is out of range"),
    (["batches", "--first-vpn", "-1"], "argument --first-vpn: -1 is out of range"),
    (["batches", "--first-vpn", str(1 << 48)], "argument --first-vpn: the table would end past virtual page"),
    (["batches", "--layout", "vax"], "argument --layout: invalid choice: 'vax'"),
    (["capture", "--pid", "0", "-o", "x.npz"], "argument --pid: 0 is out of range"),
    (["capture", "--pid", "self", "-o", "x.npz"], "argument --pid: 'self' is not an integer"),
    (["capture", "--pid", str(1 << 23), "-o", "x.npz"], "is out of range (must be from 1 to 4194304)"),
    (["capture", "--pid", "1"], "the following arguments are required: -o/--output"),
    (["thpmaps"], "one of the arguments --pid --snapshot is required"),
    (["thpmaps", "--pid", "-3"], "argument --pid: -3 is out of range"),
    (["thpmaps", "--pid", "1", "--snapshot", "x"], "argument --snapshot: not allowed with argument --pid"),
    (["thpmaps", "--pid", "1", "--cont", "3K"], "argument --cont: size '3K' is not a power of two"),
    (["thpmaps", "--pid", "1", "--cont", "0"], "argument --cont: size '0' is zero"),
    (["replay"], "the following arguments are required: SNAPSHOT"),
    (["replay", "x.npz", "--kernel", "9.9"], "argument --kernel: invalid choice: '9.9'"),
    (["oracle", "--size", "3K"], "argument --size: size '3K' is not a power of two"),
    (["oracle", "--size", "0"], "argument --size: size '0' is zero"),
]


@pytest.mark.parametrize("argv,want", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors_are_one_line_and_exit_2(capsys, argv, want):
    _one_error_line(*_run(capsys, argv), 2, want)


@pytest.mark.parametrize("cont,want", [("1", "contiguous block size 1 is not a power of two from 2 pages"),
                                       ("4K", "contiguous block size 4096 is not"),
                                       ("4M", "contiguous block size 4194304 is not")])
def test_cont_is_checked_against_the_snapshots_pages(capsys, snapshots, cont, want):
    _one_error_line(*_run(capsys, ["thpmaps", "--snapshot", snapshots["ok"], "--cont", cont]), 2,
                    "argument --cont: " + want)


# -- runtime errors: exit 1 ---------------------------------------------------------------------

@pytest.mark.parametrize("which,want", [
    ("missing", "No such file or directory"),
    ("garbage", "is not a readable snapshot"),
    ("sparc", 'unknown layout "sparc"'),
    ("overlap", "two VMAs of one process overlap"),
])
def test_bad_snapshots_are_runtime_errors(capsys, snapshots, which, want):
    _one_error_line(*_run(capsys, ["replay", snapshots[which]]), 1, want)
    if which in ("missing", "garbage"):
        _one_error_line(*_run(capsys, ["thpmaps", "--snapshot", snapshots[which]]), 1, want)


def test_unwritable_output_fails_before_the_capture(capsys, tmp_path, monkeypatch):
    import ptebatch.capture

    def no_capture(pids):
        raise AssertionError("the output is checked first")

    monkeypatch.setattr(ptebatch.capture, "capture", no_capture)
    pid = str(os.getpid())
    _one_error_line(*_run(capsys, ["capture", "--pid", pid, "-o", str(tmp_path / "no" / "s.npz")]), 1,
                    f"{tmp_path / 'no' / 's.npz'}: No such file or directory")
    _one_error_line(*_run(capsys, ["capture", "--pid", pid, "-o", str(tmp_path)]), 1,
                    f"{tmp_path}: Is a directory")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("exc,code,want", [
    (pb.CaptureError("process 7 is a kernel thread"), 1, "ptebatch: error: process 7 is a kernel thread"),
    (PermissionError(13, "Permission denied", "/proc/7/pagemap"), 1, "ptebatch: error: /proc/7/pagemap: Permission denied"),
    (pb.SnapshotError("bad\nheader"), 1, "ptebatch: error: bad header"),
    (pb.OutOfMemoryError("out of simulated memory"), 1, "ptebatch: error: out of simulated memory"),
    (MemoryError(), 1, "ptebatch: error: out of memory"),
    (KeyboardInterrupt(), 130, "ptebatch: interrupted"),
])
def test_errors_while_running_are_one_line(capsys, monkeypatch, exc, code, want):
    import ptebatch.capture

    def fail(*a, **kw):
        raise exc

    monkeypatch.setattr(ptebatch.capture, "capture", fail)
    got, out, err = _run(capsys, ["thpmaps", "--pid", str(os.getpid())])
    assert (got, out, err) == (code, "", want + "\n")


def test_debug_shows_the_traceback(capsys, snapshots, monkeypatch):
    with pytest.raises(pb.SnapshotError):
        cli.main(["--debug", "replay", snapshots["missing"]])
    with pytest.raises(pb.SnapshotError):
        cli.main(["replay", snapshots["overlap"], "--debug"])
    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "fork_study", interrupted)
    with pytest.raises(KeyboardInterrupt):
        cli.main(["demo", "--debug", "--region", "16M"])
    # Usage errors need no traceback, with --debug or not.
    assert cli.main(["--debug", "demo", "--size", "3K"]) == 2


def test_help_documents_debug_and_exit_codes(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--debug" in out and "2 usage error" in out and "130" in out
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    assert "--debug" in capsys.readouterr().out


# -- what used to run silently wrong ------------------------------------------------------------

def test_folio_sizes_follow_the_layouts_pmd():
    for name in pb.LAYOUT_NAMES:
        L = pb.layout(name)
        sizes = folio_sizes(name)
        pmd = L.page_size * L.ptrs_per_pte
        assert sizes[0] == L.page_size and sizes[-1] == pmd and 2 * L.page_size not in sizes
        assert sizes[1:] == [L.page_size << o for o in range(2, L.ptrs_per_pte.bit_length())]
    assert max(folio_sizes("s390x")) == 1 << 20  # 256 PTEs per table
    assert folio_sizes("ppc64-64k") == [64 << 10, 256 << 10, 512 << 10, 1 << 20, 2 << 20]  # 32 PTEs
    with pytest.raises(ValueError, match="not an anonymous folio size on x86-64"):
        check_folio_size("8K", "x86-64")


@pytest.mark.parametrize("arch", ["s390x", "ppc64-64k", "arm64-64k"])
def test_demo_runs_every_folio_size_of_the_arch(capsys, arch):
    pmd = max(folio_sizes(arch))
    region = 2 * pmd
    code, out, err = _run(capsys, ["demo", "--arch", arch, "--region", pb.format_size(region)])
    assert code == 0 and "Traceback" not in err, err
    rows = [line.split() for line in out.splitlines()]
    seen = {r[0] for r in rows if len(r) == 8 and r[1] in ("6.8", pb.NEWEST_KERNEL)}
    assert seen == {pb.format_size(s) for s in folio_sizes(arch)} | {pb.format_size(pmd) + "-pmd"}, out
    page = pb.layout(arch).page_size
    for r in rows:
        if len(r) == 8 and r[1] == pb.NEWEST_KERNEL and r[0].endswith("-pmd"):
            # PMD THPs: no PTE written, no batch; one refcount atomic per PMD.
            assert int(r[3]) == 0 and float(r[4]) == pytest.approx(page / pmd, rel=1e-3) and float(r[6]) == 0, r
        elif len(r) == 8 and r[1] == pb.NEWEST_KERNEL:
            size = pb.parse_size(r[0])
            # One batch per folio: the row ran folios of the size it names.
            assert int(r[2]) == region // page and int(r[3]) == region // size, r


def test_demo_pmd_row(capsys):
    """The region mapped by PMD THPs (the THP default), beside the PTE-mapped sizes: one PMD
    copied per 2M under every kernel, so no batch and a ratio of 1."""
    rows = fork_study("8M", ["2M"], ["6.8", "7.0"], pmd=True)
    assert [(r.label, r.kernel, r.pmd_copies, r.batches, r.pte_writes, r.refcount_atomics) for r in rows] == [
        ("2M", "6.8", 0, 2048, 4096, 2048), ("2M", "7.0", 0, 4, 4096, 4),
        ("2M-pmd", "6.8", 4, 0, 0, 4), ("2M-pmd", "7.0", 4, 0, 0, 4)]
    code, out, err = _run(capsys, ["demo", "--region", "8M", "--kernel", "6.8,7.0"])
    assert code == 0, err
    table = _table(out)
    pmd = [l for l in table if l[0] == "2M-pmd"]
    assert [l[1] for l in pmd] == ["6.8", "7.0"] and all(l[3] == "0" for l in pmd), out
    after = table[table.index(pmd[1]) + 1]
    assert after[:3] == ["ratio", "-", "1x"], out
    # With --size, only the sizes asked for, unless --pmd; --no-pmd leaves it out.
    code, out, err = _run(capsys, ["demo", "--region", "8M", "--size", "64K"])
    assert code == 0 and "2M-pmd" not in out, err
    code, out, err = _run(capsys, ["demo", "--region", "8M", "--size", "64K", "--pmd"])
    assert code == 0 and "2M-pmd" in out, err
    code, out, err = _run(capsys, ["demo", "--region", "8M", "--no-pmd"])
    assert code == 0 and not any(l[0] == "2M-pmd" for l in _table(out)), err
    code, out, err = _run(capsys, ["demo", "--region", "1M", "--pmd"])
    assert code == 2 and out == "" and "--pmd" in err and "not a multiple of the 2M PMD size" in err
    with pytest.raises(ValueError, match="PMD size"):
        fork_study("1M", ["4K"], ["7.0"], pmd=True)


def test_demo_leaves_out_sizes_that_do_not_divide_the_region(capsys):
    code, out, err = _run(capsys, ["demo", "--region", "1M"])
    assert code == 0, err
    assert "note: skipped folio sizes that do not divide the region: 2M" in out
    sizes = {line.split()[0] for line in out.splitlines() if line.split()[1:2] == ["6.8"]}
    assert "1M" in sizes and "2M" not in sizes


def _table(out: str) -> list[list[str]]:
    """The rows of the table before the legend, split into words."""
    return [l.split() for l in out.split("\ncolumns:\n")[0].splitlines() if l.strip()]


def test_demo_is_the_fork_study(capsys):
    assert cli.main(["demo", "--region", "16M", "--size", "4K", "--size", "64K"]) == 0
    out = capsys.readouterr().out
    ratio = [l for l in _table(out) if l[0] == "ratio"]
    assert len(ratio) == 2 and ratio[1][1] == "16x" and ratio[1][2] == "16x", out


def test_fork_study_rejects_what_it_cannot_label():
    for region, sizes, match in [("3M", ["2M"], "does not divide"), ("0", None, "positive multiple"),
                                 ("16M", ["8K"], "not an anonymous folio size"), ("6K", None, "positive multiple")]:
        with pytest.raises(ValueError, match=match):
            fork_study(region, sizes, ["7.0"])
    with pytest.raises(ValueError, match="no kernel"):
        fork_study("16M", ["4K"], [])


def test_batches_runs_and_shows_the_xen_overrun(capsys):
    assert cli.main(["batches", "--layout", "x86-64-xenpv", "--layout", "arm64-4k", "--ptes", "1024"]) == 0
    out = capsys.readouterr().out
    assert "== x86-64-xenpv" in out and "== arm64-4k" in out
    xen = out.split("== x86-64-xenpv")[1].split("==")[0]
    # The pre-6.15 forms swallow a none PTE after a folio whose next frame is ballooned.
    assert any(line.startswith(" * 6.9") for line in xen.splitlines())


def test_batches_keep_folios_within_a_page_table(capsys):
    code, out, err = _run(capsys, ["batches", "--layout", "ppc64-64k", "--layout", "x86-64",
                                   "--ptes", "256", "--kernel", "7.0"])
    assert code == 0, err
    ppc = out.split("== ppc64-64k")[1].split("==")[0]
    assert "orders 9 left out: above the PMD order 5" in ppc
    assert "left out" not in out.split("== x86-64")[1]
    code, out, err = _run(capsys, ["batches", "--layout", "ppc64-64k", "--layout", "x86-64",
                                   "--orders", "9", "--ptes", "64", "--kernel", "7.0"])
    assert code == 0 and "== ppc64-64k: skipped, every order asked for is above its PMD order 5" in out


def test_batches_with_only_holes(capsys):
    code, out, err = _run(capsys, ["batches", "--layout", "arm64-4k", "--holes", "1", "--ptes", "64",
                                   "--kernel", "7.0"])
    assert code == 0 and "0 folios, 0 present PTEs" in out, out + err


def test_mixed_table_checks_its_arguments():
    L = pb.layout("ppc64-64k")
    for kw, exc in [(dict(n_ptes=0), ValueError), (dict(hole_rate=float("nan")), ValueError),
                    (dict(dirty_rate=1.5), ValueError), (dict(folio_orders=(6,)), ValueError),
                    (dict(folio_orders=()), ValueError), (dict(folio_orders=(-1,)), ValueError),
                    (dict(first_vpn=-1), ValueError), (dict(n_ptes=2.0), TypeError),
                    (dict(hole_rate="0.1"), TypeError)]:
        args = dict(n_ptes=16, folio_orders=(0, 2))
        args.update(kw)
        with pytest.raises(exc):
            mixed_table(L, **args)
    assert len(mixed_table(L, 16, folio_orders=(5,))) == 16


def test_thpmaps_cont_counts_blocks(capsys, snapshots):
    code, out, err = _run(capsys, ["thpmaps", "--snapshot", snapshots["ok"], "--cont", "64K", "--rollup"])
    assert code == 0, err
    assert "anon-cont-pte-aligned-64kB:" in out and "anon-thp-pte-aligned-64kB:" in out
    with pytest.raises(ValueError):
        check_cont_sizes([3 << 10], 4096, 512)
    with pytest.raises(TypeError):
        check_cont_sizes(["64K"], 4096, 512)
    assert check_cont_sizes([8192, 2 << 20], 4096, 512) == [8192, 2 << 20]


def test_replay_forks_under_each_kernel(capsys, snapshots):
    code, out, err = _run(capsys, ["replay", snapshots["ok"], "--kernel", "6.8", "--kernel", "7.0"])
    assert code == 0 and err == ""
    rows = _table(out)[2:]
    assert [r[0] for r in rows] == ["6.8", "7.0"], out
    assert "columns:\n  kernel, pid" in out and "  rmap calls  " in out


def test_replay_says_pmd_mapped_thps_are_replayed_as_ptes(capsys, tmp_path):
    s = _snap()
    code, out, _ = _run(capsys, ["replay", _save(s, tmp_path / "plain.npz"), "--kernel", "6.8"])
    assert code == 0 and "PMD-mapped" not in out
    arrays = dict(s.arrays, vma_anon_huge_kb=np.array([2048, 0], dtype=np.int64))
    code, out, _ = _run(capsys, ["replay", _save(Snapshot(dict(s.header), arrays, s.vma_names),
                                                 tmp_path / "thp.npz"), "--kernel", "6.8"])
    assert code == 0 and "note: 2048 kB of the capture were PMD-mapped THPs" in out


def _save(s: Snapshot, path) -> str:
    s.save(str(path))
    return str(path)


# -- through a real process ---------------------------------------------------------------------

def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PYTHON_PATH + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _ptebatch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ptebatch", *args], capture_output=True, text=True,
                          env=_env(), timeout=120)


@pytest.mark.parametrize("args,code,want", [
    (["demo", "--size", "3K"], 2, "ptebatch demo: error: argument --size: size '3K' is not a power of two"),
    (["batches", "--holes", "nan"], 2, "ptebatch batches: error: argument --holes: nan is not a probability"),
    (["replay", "/nonexistent/s.npz"], 1, "ptebatch: error: cannot read snapshot '/nonexistent/s.npz'"),
])
def test_python_m_ptebatch(args, code, want):
    r = _ptebatch(*args)
    assert r.returncode == code and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(want), r.stderr


def _first_line_then_close(*args: str) -> tuple[str, int, str]:
    """``ptebatch ... | head -1``: read one line, close the pipe, let the writer find it gone."""
    p = subprocess.Popen([sys.executable, "-m", "ptebatch", *args], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_env())
    try:
        first = p.stdout.readline().decode()
        p.stdout.close()
        err = p.stderr.read().decode()
        code = p.wait(timeout=120)
    finally:
        p.kill() if p.poll() is None else None
        p.stderr.close()
    return first, code, err


def test_a_closed_pipe_is_a_quiet_exit(snapshots):
    # Far more output than a pipe holds, so the writer must meet the closed end.
    first, code, err = _first_line_then_close("thpmaps", "--snapshot", snapshots["many"], "--inc-empty")
    assert first.split()[0] == "1" and "-" in first.split()[1], first
    assert (code, err) == (1, "")
    first, code, err = _first_line_then_close("batches", "--ptes", "20000", "--width", "1000000")
    assert first.startswith("ptebatch ") and (code, err) == (1, "")


@live
def test_a_closed_pipe_on_a_live_capture():
    first, code, err = _first_line_then_close("thpmaps", "--pid", str(os.getpid()), "--inc-empty")
    assert first.split()[0] == str(os.getpid()) and (code, err) == (1, "")


def _is_kthreadd() -> bool:
    try:
        with open("/proc/2/comm") as f:
            return f.read().strip() == "kthreadd"
    except OSError:
        return False


@live
@pytest.mark.skipif(not _is_kthreadd(), reason="pid 2 is not kthreadd in this pid namespace")
def test_capturing_a_kernel_thread_is_one_line(tmp_path):
    r = _ptebatch("capture", "--pid", "2", "-o", str(tmp_path / "k.npz"))
    assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ptebatch: error: ") and "2" in r.stderr
    assert os.listdir(tmp_path) == []


@live
def test_capturing_a_zombie_is_one_line(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with open(f"/proc/{child.pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break
            time.sleep(0.01)
        else:
            pytest.fail("the child did not become a zombie")
        r = _ptebatch("thpmaps", "--pid", str(child.pid))
        assert r.returncode == 1 and r.stdout == "" and "Traceback" not in r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("ptebatch: error: "), r.stderr
        assert str(child.pid) in r.stderr
    finally:
        child.wait()


def test_bare_ptebatch_prints_help_and_runs_nothing(capsys, monkeypatch):
    def study(*a, **kw):
        raise AssertionError("bare ptebatch must not run the demo")

    monkeypatch.setattr(cli, "fork_study", study)
    for argv in ([], ["--debug"], ["--quiet"]):
        code, out, err = _run(capsys, argv)
        assert (code, err) == (0, ""), err
        assert out.startswith("usage: ptebatch") and "Start with 'ptebatch demo'" in " ".join(out.split())
        for name in ("demo", "batches", "capture", "thpmaps", "replay", "oracle"):
            assert f"\n    {name} " in out, name


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"ptebatch {pb.__version__}\n"
    r = _ptebatch("--version")
    assert (r.returncode, r.stdout, r.stderr) == (0, f"ptebatch {pb.__version__}\n", "")


def _subparsers(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices
    raise AssertionError("no subcommands")


def test_every_command_and_option_is_explained():
    import argparse

    parser = cli._parser()
    commands = _subparsers(parser)
    assert {"demo", "batches", "capture", "thpmaps", "replay", "oracle"} <= set(commands)
    helps = {a.dest: a.help for a in _subparsers_action(parser)._choices_actions}
    for name, sub in [("ptebatch", parser), *commands.items()]:
        if sub is not parser:
            assert helps.get(name), f"{name} has no summary in the command list"
        assert sub.description and len(sub.description) > 40, f"{name} has no description"
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help is not argparse.SUPPRESS, (name, action.option_strings or action.dest)
    for name in ("demo", "batches", "replay", "thpmaps", "capture"):
        assert "example" in commands[name].epilog, name


def _subparsers_action(parser):
    import argparse

    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


@pytest.mark.parametrize("argv,want", [
    (["--kernel", "6.8,7.0"], ["6.8", "7.0"]),
    (["--kernel", " 6.9 , 6.12 "], ["6.9", "6.12"]),
    (["--kernel", "6.8", "--kernel", "6.9,7.0"], ["6.8", "6.9", "7.0"]),
    (["--kernel", "all"], list(pb.KERNEL_VERSIONS)),
    ([], None),
])
def test_kernel_takes_lists_all_and_repeats(argv, want):
    for command in (["demo"], ["batches"], ["replay", "s.npz"]):
        assert cli._parser().parse_args([*command, *argv]).kernel == want


@pytest.mark.parametrize("text,bad", [("5.0", "'5.0'"), ("6.8,,7.0", "''"), ("6.8,latest", "'latest'"),
                                      ("ALL", "'ALL'"), ("", "''")])
def test_kernel_list_errors_name_the_bad_one(capsys, text, bad):
    _one_error_line(*_run(capsys, ["demo", "--kernel", text]), 2,
                    f"argument --kernel: invalid choice: {bad} (choose from seed, 6.8, ")


def test_defaults_model_the_newest_kernel(capsys, monkeypatch):
    """demo and replay compare 6.8 with the newest kernel; batches ends with the newest, which
    the other cuts are compared with, and has 6.8 and one kernel per folio_pte_batch() form."""
    seen = []

    def study(region, sizes, kernels, arch, progress=None, pmd=False):
        seen.append((region, sizes, kernels, arch, pmd))
        return []

    monkeypatch.setattr(cli, "fork_study", study)
    monkeypatch.setattr(cli, "format_fork_study", lambda rows, kernels, predicted=None: "")
    assert cli.main(["demo"]) == 0 and cli.main(["--debug", "demo", "-q"]) == 0
    assert seen[0] == seen[1] == (1 << 30, folio_sizes("x86-64"), ["6.8", pb.NEWEST_KERNEL], "x86-64", True)
    assert cli.COMPARED_KERNELS == ("6.8", pb.NEWEST_KERNEL)
    assert cli.BATCHES_KERNELS[0] == "6.8" and cli.BATCHES_KERNELS[-1] == pb.NEWEST_KERNEL
    forms = {pb.fpb_form(k) for k in pb.KERNEL_VERSIONS}
    assert {pb.fpb_form(k) for k in cli.BATCHES_KERNELS} == forms
    code, out, err = _run(capsys, ["batches", "--layout", "riscv64", "--ptes", "64"])
    assert code == 0, err
    rows = [l.lstrip(" *").split()[0] for l in out.split("== riscv64")[1].split("columns:")[0].splitlines()[2:] if l.strip()]
    assert rows == list(cli.BATCHES_KERNELS), out


def test_demo_with_one_kernel_explains_there_is_no_ratio(capsys):
    code, out, err = _run(capsys, ["demo", "--region", "4M", "--size", "64K", "--kernel", "6.12"])
    assert code == 0, err
    assert "note: one kernel, so no ratio rows: give two or more to compare, e.g. --kernel 6.8,6.12" in out
    table = _table(out)
    assert not any(r[0] == "ratio" for r in table) and [r[1] for r in table if r[0] == "64K"] == ["6.12"]
    assert "  ratio  " not in out


def test_demo_legend_and_check_come_after_the_forks(capsys):
    code, out, err = _run(capsys, ["demo", "--region", "4M", "--size", "4K", "--size", "2M", "--kernel", "6.8,6.12"])
    assert code == 0, err
    before, legend = out.split("\ncolumns:\n")
    assert "sim.check()" not in before
    for column in ("folio", "kernel", "PTEs", "batches", "refcount/PTE", "rmap/PTE", "PTE writes/PTE",
                   "sim ms", "ratio"):
        assert f"\n  {column} " in "\n" + legend, column
    assert "not the kernel" in legend and "write-protects" in legend and "set_ptes" in legend
    assert "6.8 / 6.12" in legend
    assert legend.rstrip().splitlines()[-1].startswith("sim.check() passed after each of the 4 forks")
    # PTE writes stay at 2 per PTE, batched or not: the legend's claim holds for these rows.
    assert {r[6] for r in _table(out) if r[1] in ("6.8", "6.12")} == {"2.0000"}


def test_small_ratios_keep_their_digits(capsys):
    assert study.per_pte(1 / 8192) == "0.0001221"
    assert [study.per_pte(x) for x in (1.0, 2.0, 0.25, 1 / 16, 1 / 512, 0.0)] == \
        ["1.0000", "2.0000", "0.2500", "0.06250", "0.001953", "0.0000"]
    # 512M folios of 64K pages: one refcount update per 8192 PTEs.
    code, out, err = _run(capsys, ["demo", "--arch", "arm64-64k", "--region", "512M", "--size", "512M"])
    assert code == 0, err
    row = [r for r in _table(out) if r[:2] == ["512M", pb.NEWEST_KERNEL]][0]
    assert row[4] == row[5] == "0.0001221", out


def test_batches_legend(capsys):
    code, out, err = _run(capsys, ["batches", "--layout", "arm64-4k", "--ptes", "64", "--kernel", "6.8,7.0"])
    assert code == 0, err
    legend = out.split("\ncolumns:\n")[1]
    for column in ("*", "form", "batches", "mean, max", "batch lengths"):
        assert f"\n  {column} " in "\n" + legend, column


# -- progress -----------------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 30
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within 30 s")
        time.sleep(0.01)


def test_progress_is_a_line_every_few_seconds_off_a_terminal():
    stream = io.StringIO()
    with study.Progress(4, "fork study", stream, delay=0.01, every=0.01) as bar:
        assert not bar.tty and (bar.delay, bar.every) == (0.01, 0.01)
        bar.update(1.5, "64K folios, 7.0")
        _wait_for(lambda: stream.getvalue().count("\n") >= 2, "two progress lines")
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert lines[0].startswith("fork study: 38% after ") and lines[0].endswith(" 64K folios, 7.0")
    assert lines[-1].startswith("fork study: finished after ")
    # Defaults: off a terminal, the first line after 5 s and one every 5 s.
    quiet = study.Progress(1, "x", io.StringIO())
    assert (quiet.delay, quiet.every) == (5.0, 5.0)


def test_progress_is_a_bar_on_a_terminal_erased_at_the_end():
    stream = _Terminal()
    bar = study.Progress(2, "replay", stream, delay=0.0, every=0.01)
    assert bar.tty and study.Progress(2, "replay", _Terminal()).delay == 1.0
    bar.step("6.8")
    _wait_for(lambda: "#" in stream.getvalue(), "bar")
    text = stream.getvalue()
    assert text.startswith("\rreplay [############............]  50% ") and "\n" not in text
    bar.step("7.0")  # the last step closes it
    assert bar._thread is not None and not bar._thread.is_alive()
    *drawn, blank, end = stream.getvalue().split("\r")
    assert end == "" and blank == " " * max(map(len, drawn)), stream.getvalue()
    # Printing to stdout meanwhile: the bar steps aside, then comes back.
    stream = _Terminal()
    with study.Progress(2, "oracle", stream, delay=0.0, every=0.01) as bar:
        bar.update(1)
        _wait_for(lambda: "#" in stream.getvalue(), "bar")
        with bar.paused():
            assert stream.getvalue().endswith(" \r") and stream.getvalue().split("\r")[-2].strip() == ""
            shown = len(stream.getvalue())
        _wait_for(lambda: "#" in stream.getvalue()[shown:], "bar again")


def test_progress_follows_the_simulations_long_steps():
    bar = study.Progress(4, "fork study", io.StringIO(), enabled=False)
    callback = bar.within(2, 0.5)
    callback(50, 100)
    assert bar.done == 2.25
    callback(100, 100)
    assert bar.done == 2.5
    seen = []

    class Recorder(study.Progress):
        def update(self, done, what=None):
            seen.append(done)
            super().update(done, what)

    rows = study.fork_study("4M", ["4K", "64K"], ["6.8", "7.0"], progress=Recorder(4, "t", io.StringIO(), enabled=False))
    assert len(rows) == 4 and seen == sorted(seen) and seen[-1] == 4 and {0, 1, 2, 3} <= set(seen)


def test_quiet_silences_progress(capsys, monkeypatch):
    made = []

    class Recorder(study.Progress):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self.enabled)

    monkeypatch.setattr(cli, "Progress", Recorder)
    for argv, enabled in [(["demo"], True), (["-q", "demo"], False), (["demo", "--quiet"], False)]:
        assert cli.main([*argv, "--region", "4M", "--size", "2M"]) == 0
        assert made.pop() is enabled, argv
    stream = io.StringIO()
    with study.Progress(1, "x", stream, enabled=False, delay=0.0, every=0.0) as bar:
        bar.update(0.5)
        time.sleep(0.1)
    assert stream.getvalue() == "" and bar._thread is None


def test_demo_shows_the_cost_models_predicted_kernel_time(capsys):
    """Beside the counts, the demo prints the kernel time per GiB the cost model predicts,
    and its ratio to 4K; the prediction follows the counters (fewer batches, less time)."""
    from ptebatch import cost

    code, out, _ = _run(capsys, ["demo", "--region", "16M", "--size", "4K", "--size", "2M"])
    assert code == 0 and "kernel ms/GiB*" in out and "* calibration:" in out
    rows = {(r[0], r[1]): r for r in _table(out) if len(r) >= 10 and r[1] in ("6.8", pb.NEWEST_KERNEL)}
    model = cost.fit()
    for (size, kernel), r in rows.items():
        ptes, batches = int(r[2]), int(r[3])
        ns, _ = cost.predict_row(model, "fork", {"pte_writes": 2 * ptes, "batches": batches})
        assert float(r[8]) == pytest.approx(ns / 1e6 * (1 << 30) / (ptes * 4096), abs=0.006)
    assert float(rows[("2M", pb.NEWEST_KERNEL)][8]) < float(rows[("2M", "6.8")][8])
    assert rows[("4K", "6.8")][9] == "1.00x"


@live
def test_demo_measure_times_the_running_kernel_beside_the_prediction(capsys):
    """demo --measure (root): the running kernel's fork per folio size, beside the model's
    prediction; the mTHP controls are as they were afterwards."""
    from ptebatch import calibrate

    if calibrate.missing_requirements():
        pytest.skip(calibrate.missing_requirements())
    before = calibrate.thp_settings()
    code, out, err = _run(capsys, ["-q", "demo", "--region", "16M", "--size", "4K", "--size", "64K", "--measure", "1"])
    assert code == 0, err
    assert calibrate.thp_settings() == before
    lines = out[out.index("measured ms/GiB"):].splitlines()[1:3]
    assert [ln.split()[0] for ln in lines] == ["4K", "64K"]
    for ln in lines:
        meas, pred = float(ln.split()[1]), float(ln.split()[3])
        assert meas > 0 and pred > 0


def test_oracle_scenarios_are_listed_and_checked(capsys) -> None:
    """`oracle --scenario list` names every live scenario (no root needed); a wrong name is a
    usage error that lists the known ones."""
    rc, out, _ = _run(capsys, ["oracle", "--scenario", "list"])
    topics = {line.split()[0] for line in out.splitlines()}
    assert rc == 0 and {"policy", "filemap"} <= topics
    assert "always-mode" in out and "faultaround-shared-anon" in out
    rc, _, err = _run(capsys, ["oracle", "--scenario", "no-such"])
    assert rc == 2 and "unknown scenario 'no-such'" in err and "always-mode" in err

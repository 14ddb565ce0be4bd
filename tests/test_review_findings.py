"""Reproducers from a hostile review of the embedding contract (README, "What you can rely on
when embedding it"). Each test fails on the code it was written against; keep each tiny."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

import ptebatch as pb

# Runs `setup`, then caps the address space at what the process holds plus `margin` MiB and
# runs `op`: the contract is OutOfMemoryError(host=True) or success, never a panic or abort.
_RLIMIT_RUNNER = textwrap.dedent("""
    import resource, sys
    import ptebatch as pb
    exec(sys.argv[2])
    vm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmSize")][0] << 10
    lim = vm + (int(sys.argv[1]) << 20)
    resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    try:
        exec(sys.argv[3])
        print("RESULT ok")
    except pb.OutOfMemoryError as e:
        print("RESULT oom", e.host)
    except BaseException as e:
        print("RESULT untyped", type(e).__name__)
""")


def _under_rlimit(margin_mib: int, setup: str, op: str) -> tuple[int, str]:
    r = subprocess.run([sys.executable, "-c", _RLIMIT_RUNNER, str(margin_mib), setup, op],
                       capture_output=True, text=True, timeout=30)
    lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT")]
    return r.returncode, (lines[-1] if lines else "no result; stderr: " + r.stderr[-300:])


_BIG_MAPPING = 'sim = pb.Simulation(memory="1G"); p = sim.spawn(); m = p.mmap(2**38)'  # 512 MiB of PTEs


def test_host_oom_ptes_panics() -> None:
    """ptes() of a 64 Mi-page VMA with 300 MiB of headroom: numpy cannot allocate the result and
    pyo3 panics ('PyObject pointer is null', PanicException) instead of OutOfMemoryError(host=True)."""
    rc, res = _under_rlimit(300, _BIG_MAPPING, "p.ptes(m.start)")
    assert rc == 0 and res in ("RESULT ok", "RESULT oom True"), (rc, res)


def test_host_oom_state_panics() -> None:
    """state() of a 32 GiB machine with 16 MiB of headroom: PanicException."""
    rc, res = _under_rlimit(16, 'sim = pb.Simulation(memory="32G")', "sim.state()")
    assert rc == 0 and res in ("RESULT ok", "RESULT oom True"), (rc, res)


def test_host_oom_memory_array_panics() -> None:
    """sim.memory.token of a 60 GiB machine with 1 MiB of headroom: PanicException."""
    rc, res = _under_rlimit(1, 'sim = pb.Simulation(memory="60G")', "sim.memory.token")
    assert rc == 0 and res in ("RESULT ok", "RESULT oom True"), (rc, res)


def test_host_oom_state_of_big_mapping_aborts() -> None:
    """state() of a 64 Mi-page VMA with 300 MiB of headroom: 'memory allocation of 536870912
    bytes failed' and SIGABRT (exit -6), instead of OutOfMemoryError(host=True)."""
    rc, res = _under_rlimit(300, _BIG_MAPPING, "sim.state()")
    assert rc == 0 and res in ("RESULT ok", "RESULT oom True"), (rc, res)


def test_set_progress_accepts_non_callable() -> None:
    """set_progress(5) is accepted; the TypeError surfaces later from an unrelated step
    ('int' object is not callable from check())."""
    sim = pb.Simulation(memory="16M")
    with pytest.raises(TypeError):
        sim.set_progress(5)


def test_fragmentation_huge_int_overflowerror() -> None:
    """fragmentation={"64K": 10**400}: OverflowError instead of ValueError naming it."""
    with pytest.raises(ValueError):
        pb.Simulation(memory="16M", fragmentation={"64K": 10**400})


def test_reference_create_file_host_oom_is_bare_memoryerror() -> None:
    """backend='reference': create_file(2**63) raises a bare MemoryError (rust: OutOfMemoryError(host=True))."""
    sim = pb.Simulation(memory="16M", backend="reference")
    with pytest.raises(pb.OutOfMemoryError):
        sim.create_file(2**63)


def test_state_equal_non_simulation_attributeerror() -> None:
    """sim.state_equal(5): AttributeError instead of TypeError."""
    sim = pb.Simulation(memory="16M")
    with pytest.raises(TypeError):
        sim.state_equal(5)  # type: ignore[arg-type]


def _cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ptebatch", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _all_ones_kpageflags_snapshot(path: str) -> None:
    """A snapshot of one touched 64K mapping whose kpageflags are all ones: it loads (flag
    bits are not validated) but is not a state any kernel shows."""
    import numpy as np

    from ptebatch.thpmaps import snapshot_of

    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    m = p.mmap("64K")
    p.touch(m.start, m.length, write=True)
    snap = snapshot_of(sim, [p])
    snap.arrays["kpageflags"][:] = np.uint64(2**64 - 1)
    # save() refuses such flags now; write the file anyway, as a corrupt capture would come.
    with pytest.MonkeyPatch.context() as m:
        m.setattr("ptebatch.snapshot.validate", lambda header, arrays: None)
        snap.save(path)


def test_thpmaps_report_keyerror_on_odd_kpageflags(tmp_path) -> None:
    """thpmaps.report of a loaded snapshot with impossible kpageflags: KeyError
    ('anon-thp-pte-aligned-4kB') instead of SnapshotError."""
    from ptebatch.snapshot import Snapshot
    from ptebatch.thpmaps import report

    path = str(tmp_path / "ones.npz")
    _all_ones_kpageflags_snapshot(path)
    with pytest.raises(pb.SnapshotError):
        report(Snapshot.load(path))


def test_cli_thpmaps_snapshot_odd_kpageflags_traceback(tmp_path) -> None:
    """`ptebatch thpmaps --snapshot` of that file prints a KeyError traceback."""
    path = str(tmp_path / "ones.npz")
    _all_ones_kpageflags_snapshot(path)
    r = _cli("thpmaps", "--snapshot", path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr[-300:]


def test_cli_closed_stdout_traceback() -> None:
    """With stdout closed (`ptebatch batches >&-`), sys.stdout is None and main() dies in
    sys.stdout.flush() with an AttributeError traceback."""
    r = subprocess.run(["sh", "-c", f'exec "{sys.executable}" -m ptebatch batches --ptes 16 >&-'],
                       capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 1, r.stderr[-300:]


def test_cli_thpmaps_empty_snapshot_path_message() -> None:
    """`ptebatch thpmaps --snapshot ""` falls through to the --pid path and reports
    "'NoneType' object is not iterable"."""
    r = _cli("thpmaps", "--snapshot", "")
    assert r.returncode in (1, 2) and "NoneType" not in r.stderr, r.stderr


def test_cli_run_fifo_hangs(tmp_path) -> None:
    """`ptebatch run FIFO` blocks forever opening/reading the scenario (the snapshot loader
    refuses non-regular files; the scenario loader does not). /dev/zero is read without bound."""
    import os

    fifo = tmp_path / "scenario.toml"
    os.mkfifo(fifo)
    try:
        r = _cli("run", str(fifo), timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("ptebatch run on a FIFO hangs")
    assert r.returncode in (1, 2) and len(r.stderr.splitlines()) == 1, r.stderr


def test_reference_backend_not_thread_safe() -> None:
    """backend='reference' shared by threads: calls interleave, giving IndexError from touch()
    and a corrupt state (InvariantError 'rss: ... anon rss counter is N, page tables map M');
    the README promises that a Simulation may be shared by threads."""
    import threading
    import time

    sim = pb.Simulation("x86-64", "6.18", "64M", backend="reference")
    root = sim.spawn()
    errors: list[str] = []
    stop = time.monotonic() + 2

    def worker() -> None:
        m = root.mmap("256K")
        while time.monotonic() < stop:
            try:
                root.touch(m.start, m.length, write=True)
                root.madvise(m.start, m.length, "dontneed")
            except BaseException as e:
                errors.append(f"{type(e).__name__}: {e}")

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert errors == [], errors[:3]
    sim.check()


def test_progress_never_called_below_4mi_pages() -> None:
    """A step of 4 Mi - 1 pages (touch of 16 GiB less a page: about a second here, 3 s for
    a COW on arm64-4k with batching=False) never calls the progress callback nor looks for
    signals, so Ctrl-C waits for the whole step: the 4 Mi-page threshold is by size, not by
    time. (At exactly 4 Mi pages the same touch reports ~20 times.)"""
    sim = pb.Simulation("x86-64", "6.18", "17G")
    p = sim.spawn()
    m = p.mmap(((4 << 20) - 1) * sim.page_size)
    calls: list[tuple[int, int]] = []
    sim.set_progress(lambda done, total: calls.append((done, total)))
    p.touch(m.start, m.length, write=True)
    assert calls, "no progress report (and no signal check) during a step of 4 Mi - 1 pages"


def test_snapshot_load_bad_max_bytes_blamed_on_file() -> None:
    """Snapshot.load(path, max_bytes=None): SnapshotError "is not a readable snapshot (corrupt
    or truncated): TypeError ..." about a good file, instead of a TypeError naming max_bytes."""
    from ptebatch.snapshot import Snapshot

    with pytest.raises(TypeError):
        Snapshot.load(str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "replay-snapshot.npz"), max_bytes=None)  # type: ignore[arg-type]


def test_from_snapshot_mthp_string_split_into_characters() -> None:
    """from_snapshot(path, mthp="64K") iterates the string: "cannot read size 'K'"."""
    sim, _ = pb.Simulation.from_snapshot(str(pathlib.Path(__file__).resolve().parent.parent / "examples" / "replay-snapshot.npz"), mthp="64K")  # type: ignore[arg-type]
    sim.check()


def test_kernel_from_release_none_attributeerror() -> None:
    """pb.kernel_from_release(None): AttributeError ('NoneType' object has no attribute 'split')."""
    with pytest.raises(TypeError):
        pb.kernel_from_release(None)  # type: ignore[arg-type]

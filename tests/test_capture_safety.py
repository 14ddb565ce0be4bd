"""Where snapshots are written (never over a device, directory or symlink; the umask's mode),
and captures of processes that have no memory or lose it while being read.

Tests that read /proc of other processes skip when PTEBATCH_SKIP_LIVE is set."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

import ptebatch as pb
from ptebatch import capture as cap
from ptebatch.snapshot import Snapshot
from ptebatch.thpmaps import snapshot_of

ROOT = os.geteuid() == 0
LIVE = not os.environ.get("PTEBATCH_SKIP_LIVE") and ROOT and os.path.exists("/proc/kpageflags")
live = pytest.mark.skipif(not LIVE, reason="needs root, /proc/kpageflags and PTEBATCH_SKIP_LIVE unset")


@pytest.fixture(scope="module")
def snap() -> Snapshot:
    sim = pb.Simulation("x86-64", "6.18", "16M")
    p = sim.spawn()
    v = p.mmap("64K")
    p.touch(v.start, v.length, write=True)
    return snapshot_of(sim, [p])


def _listing(d) -> list[str]:
    return sorted(os.listdir(d))


@pytest.mark.skipif(not ROOT, reason="only root can replace /dev/null; as another user the test proves nothing")
def test_save_never_replaces_dev_null(snap: Snapshot) -> None:
    before = os.lstat("/dev/null")
    assert stat.S_ISCHR(before.st_mode)
    with pytest.raises(pb.SnapshotError, match="character device"):
        snap.save("/dev/null")
    after = os.lstat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino
    assert not [f for f in os.listdir("/dev") if f.startswith(".snapshot-")]


@live
def test_cli_capture_to_a_device_is_refused_in_one_line(tmp_path) -> None:
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a second /dev/null
    except PermissionError:
        pytest.skip("mknod is not allowed here")
    child = subprocess.Popen(["sleep", "30"])
    try:
        r = subprocess.run([sys.executable, "-m", "ptebatch.cli", "capture", "--pid", str(child.pid), "-o", str(node)],
                           capture_output=True, text=True, timeout=120)
    finally:
        child.kill()
        child.wait()
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "character device" in r.stderr and "Traceback" not in r.stderr
    assert stat.S_ISCHR(os.lstat(node).st_mode)
    assert _listing(tmp_path) == ["null"]


def test_save_refuses_directories_fifos_and_symlinks(tmp_path, snap: Snapshot) -> None:
    with pytest.raises(pb.SnapshotError, match="directory"):
        snap.save(tmp_path)
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(pb.SnapshotError, match="FIFO"):
        snap.save(tmp_path / "fifo")
    target = tmp_path / "target.npz"
    target.write_bytes(b"keep me")
    os.symlink(target, tmp_path / "link.npz")
    with pytest.raises(pb.SnapshotError, match="symbolic link"):
        snap.save(tmp_path / "link.npz")
    os.symlink(tmp_path / "nowhere.npz", tmp_path / "dangling.npz")
    with pytest.raises(pb.SnapshotError, match="symbolic link"):
        snap.save(tmp_path / "dangling.npz")
    assert target.read_bytes() == b"keep me"
    assert os.path.islink(tmp_path / "link.npz") and os.path.islink(tmp_path / "dangling.npz")
    assert _listing(tmp_path) == ["dangling.npz", "fifo", "link.npz", "target.npz"], "no temporary file is left"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_new_files_get_the_umask_mode(tmp_path, snap: Snapshot, umask: int) -> None:
    old = os.umask(umask)
    try:
        snap.save(tmp_path / "s.npz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.npz").st_mode) == 0o666 & ~umask
    assert Snapshot.load(tmp_path / "s.npz").pids == snap.pids


def test_an_existing_file_keeps_its_mode_and_is_replaced_atomically(tmp_path, snap: Snapshot) -> None:
    path = tmp_path / "s.npz"
    path.write_bytes(b"old")
    os.chmod(path, 0o640)
    ino = os.stat(path).st_ino
    snap.save(path)
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_ino != ino, "a new file renamed over the old one, not the old one rewritten"
    assert np.array_equal(Snapshot.load(path).arrays["pagemap"], snap.arrays["pagemap"])
    assert _listing(tmp_path) == ["s.npz"]


def test_an_unwritable_directory_gives_snapshot_error(tmp_path, snap: Snapshot) -> None:
    with pytest.raises(pb.SnapshotError, match="cannot write"):
        snap.save(tmp_path / "no" / "such" / "dir" / "s.npz")


# -- capture -----------------------------------------------------------------------------------


def test_pids_are_checked() -> None:
    for bad in (True, -1, 0, "1", 1.5):
        with pytest.raises(ValueError, match="pid"):
            cap.capture([bad])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="twice"):
        cap.capture([os.getpid(), os.getpid()])


@live
def test_capture_of_a_kernel_thread() -> None:
    comm = cap.proc_stat(2)[0]
    if comm != "kthreadd":
        pytest.skip(f"pid 2 is {comm!r}, not kthreadd (a pid namespace?)")
    with pytest.raises(pb.CaptureError, match="kernel thread") as e:
        cap.capture(2)
    assert "\n" not in str(e.value)


def _zombie() -> subprocess.Popen:
    child = subprocess.Popen(["true"])
    for _ in range(500):
        if cap.proc_stat(child.pid)[1] == "Z":
            return child
        time.sleep(0.01)
    raise AssertionError("the child did not exit")


@live
def test_capture_of_a_zombie() -> None:
    child = _zombie()
    try:
        with pytest.raises(pb.CaptureError, match="has exited"):
            cap.capture(child.pid)
    finally:
        child.wait()
    with pytest.raises(pb.CaptureError, match="does not exist"):
        cap.capture(child.pid)


@live
def test_exit_during_the_capture_is_detected(monkeypatch) -> None:
    child = subprocess.Popen(["sleep", "30"])
    read_windows = cap._read_windows

    def exit_first(*args):  # the process dies after its page tables were read
        if child.poll() is None:
            child.kill()
            while cap.proc_stat(child.pid)[1] != "Z":
                time.sleep(0.01)
        return read_windows(*args)

    monkeypatch.setattr(cap, "_read_windows", exit_first)
    try:
        with pytest.raises(pb.CaptureError, match="exited during the capture"):
            cap.capture(child.pid)
    finally:
        child.kill()
        child.wait()


@live
def test_pid_reuse_during_the_capture_is_detected(monkeypatch) -> None:
    real = cap.proc_stat
    calls = []

    def reused(pid: int):
        comm, state, flags, start = real(pid)
        calls.append(pid)
        return comm, state, flags, start + (len(calls) > 1)  # another process, same pid

    monkeypatch.setattr(cap, "proc_stat", reused)
    with pytest.raises(pb.CaptureError, match="pid was reused"):
        cap.capture(os.getpid())


_SHARED_ANON_CHILD = """
import ctypes, mmap, sys
maps = [mmap.mmap(-1, 1 << 16) for _ in range(2)]
for i, m in enumerate(maps):
    m[:] = bytes([65 + i]) * len(m)
print(*(ctypes.addressof(ctypes.c_char.from_buffer(m)) for m in maps), flush=True)
sys.stdin.read()
"""


@live
def test_a_live_capture_replays() -> None:
    """Two unrelated shared anonymous mappings, both named "/dev/zero (deleted)", of an idle
    process: the replay maps the same pages, each mapping its own shmem object."""
    child = subprocess.Popen([sys.executable, "-c", _SHARED_ANON_CHILD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        addrs = [int(x) for x in child.stdout.readline().split()]
        snap = cap.capture(child.pid, ranges=[(x, x + (1 << 16)) for x in addrs])
    finally:
        child.kill()
        child.wait()
        for f in (child.stdin, child.stdout):
            if f:
                f.close()
    assert snap.vma_names == ["/dev/zero (deleted)"] * 2
    try:
        sim, procs = pb.Simulation.from_snapshot(snap)
    except pb.SnapshotError as e:
        if "not modelled" not in str(e):
            raise
        sim, procs = pb.Simulation.from_snapshot(snap, pb.NEWEST_KERNEL)
    sim.check()
    p = procs[child.pid]
    # pfn, present, exclusive, file (soft-dirty depends on VM_SOFTDIRTY, not captured)
    mask = np.uint64((1 << 63) | (1 << 61) | (1 << 56) | ((1 << 55) - 1))
    for i in range(2):
        start, end = int(snap.arrays["vma_start"][i]), int(snap.arrays["vma_end"][i])
        assert np.array_equal(p.pagemap(start, end - start) & mask, snap.vma_pages(i) & mask)
    assert len({v["file"] for v in p.vmas()}) == 2

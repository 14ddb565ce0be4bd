"""The process the kernel oracle drives (``ptebatch.oracle``): it maps and writes anonymous
memory, forks a child that waits on a pipe, and performs one scripted step per command line
on stdin, answering "ok ..." on stdout. Run as ``python -m ptebatch._oracle_worker``."""

from __future__ import annotations

import ctypes
import mmap
import os
import sys

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None, use_errno=True)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_DONTNEED, MADV_HUGEPAGE, MADV_NOHUGEPAGE = 4, 14, 15


def check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


class Region:
    def __init__(self, size: int, align: int):
        self.m = mmap.mmap(-1, size + align, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.m))
        self.off = (-base) % align
        self.addr = base + self.off
        self.size = size
        self.stamp = 0

    def write(self, page: int) -> None:
        # Store without loading first: a read would map the shared zero page, and the write
        # after it would copy into an order-0 page instead of faulting in a large folio.
        self.stamp = self.stamp % 255 + 1
        self.m[self.off + page * PAGE] = self.stamp

    def at(self, page: int) -> int:
        return self.addr + page * PAGE


def child_loop(r: Region, rd: int, wr: int) -> None:
    with os.fdopen(rd, "r") as cmds, os.fdopen(wr, "w") as out:
        for line in cmds:
            op, *args = line.split()
            if op == "write":
                r.write(int(args[0]))
            elif op == "exit":
                os._exit(0)
            out.write("ok\n")
            out.flush()
    os._exit(0)


def main() -> None:
    r: Region | None = None
    child = None
    to_child = from_child = None
    for line in sys.stdin:
        op, *args = line.split()
        reply = "ok"
        if op == "setup":
            size, align, split = int(args[0]), int(args[1]), args[2] == "1"
            r = Region(size, align)
            check(libc.madvise(r.addr, size, MADV_HUGEPAGE), "madvise(MADV_HUGEPAGE)")
            for p in range(size // PAGE):
                r.write(p)
            if split:
                # mprotect() of one page and back PTE-maps each PMD THP without splitting it.
                for p in range(0, size // PAGE, align // PAGE):
                    check(libc.mprotect(r.at(p), PAGE, mmap.PROT_READ), "mprotect")
                    check(libc.mprotect(r.at(p), PAGE, mmap.PROT_READ | mmap.PROT_WRITE), "mprotect")
                check(libc.madvise(r.addr, size, MADV_NOHUGEPAGE), "madvise(MADV_NOHUGEPAGE)")
            reply = f"ok {os.getpid()} {r.addr}"
        elif op == "fork":
            a_rd, a_wr = os.pipe()
            b_rd, b_wr = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(a_wr)
                os.close(b_rd)
                child_loop(r, a_rd, b_wr)
            os.close(a_rd)
            os.close(b_wr)
            child = pid
            to_child = os.fdopen(a_wr, "w")
            from_child = os.fdopen(b_rd, "r")
            reply = f"ok {pid}"
        elif op == "pwrite":
            r.write(int(args[0]))
        elif op == "cwrite":
            to_child.write(f"write {args[0]}\n")
            to_child.flush()
            from_child.readline()
        elif op == "cexit":
            to_child.write("exit\n")
            to_child.flush()
            os.waitpid(child, 0)
            child = None
        elif op == "munmap":
            check(libc.munmap(r.at(int(args[0])), int(args[1]) * PAGE), "munmap")
        elif op == "dontneed":
            check(libc.madvise(r.at(int(args[0])), int(args[1]) * PAGE, MADV_DONTNEED), "madvise(MADV_DONTNEED)")
        # ---- PMD-mapped THP scenarios (ptebatch.oracle_pmd) ----
        elif op == "zsetup":
            # Read every page only: each aligned 2M range maps the huge zero page.
            size, align = int(args[0]), int(args[1])
            r = Region(size, align)
            check(libc.madvise(r.addr, size, MADV_HUGEPAGE), "madvise(MADV_HUGEPAGE)")
            for p in range(size // PAGE):
                r.m[r.off + p * PAGE]
            reply = f"ok {os.getpid()} {r.addr}"
        elif op == "mprotect":
            prot = {"r": mmap.PROT_READ, "rw": mmap.PROT_READ | mmap.PROT_WRITE, "none": 0}[args[2]]
            check(libc.mprotect(r.at(int(args[0])), int(args[1]) * PAGE, prot), "mprotect")
        # ---- end of the PMD block ----
        elif op == "quit":
            break
        elif op in POLICY_COMMANDS:
            reply = POLICY_COMMANDS[op](*args)
        elif op.startswith("fm_"):
            reply = filemap_command(op, args)
        else:
            reply = f"error unknown command {op}"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    if child is not None:
        to_child.write("exit\n")
        to_child.flush()
        os.waitpid(child, 0)
    filemap_command("fm_cexit", [])


# ---- shared and file mappings (ptebatch.oracle_filemap) ---------------------------------------
# One MAP_SHARED mapping, anonymous or of a file, at a chosen offset from an aligned address; a
# child that reads and writes it on command. Accesses are single loads and stores, so that a
# read is a read fault and a write a write fault.

libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
PROT_NONE, PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
fm: dict = {"addr": 0, "child": None, "to": None, "frm": None, "stamp": 0}


def fm_access(addr: int, write: bool) -> None:
    if write:
        fm["stamp"] = fm["stamp"] % 255 + 1
        ctypes.memset(addr, fm["stamp"], 1)
    else:
        ctypes.c_char.from_address(addr).value


def fm_child(rd: int, wr: int) -> None:
    with os.fdopen(rd, "r") as cmds, os.fdopen(wr, "w") as out:
        for line in cmds:
            op, *args = line.split()
            if op == "exit":
                os._exit(0)
            fm_access(fm["addr"] + int(args[0]) * PAGE, op == "write")
            out.write("ok\n")
            out.flush()
    os._exit(0)


def filemap_command(op: str, args: list[str]) -> str:
    if op == "fm_map":
        # fm_map <pages> <align bytes> <skew pages> <file path or "-">: MAP_SHARED at
        # align_up(base) + skew pages, inside a PROT_NONE reservation.
        pages, align, skew, path = int(args[0]), int(args[1]), int(args[2]), args[3]
        size = pages * PAGE
        base = libc.mmap(None, size + 2 * align + abs(skew) * PAGE, PROT_NONE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap reservation")
        addr = -(-(base + abs(skew) * PAGE) // align) * align + skew * PAGE
        if path == "-":
            got = libc.mmap(addr, size, PROT_RW, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                os.ftruncate(fd, size)
                got = libc.mmap(addr, size, PROT_RW, MAP_SHARED | MAP_FIXED, fd, 0)
            finally:
                os.close(fd)
        if got != addr:
            raise OSError(ctypes.get_errno(), "mmap MAP_FIXED")
        fm["addr"] = addr
        return f"ok {os.getpid()} {addr}"
    if op in ("fm_read", "fm_write"):
        fm_access(fm["addr"] + int(args[0]) * PAGE, op == "fm_write")
    elif op == "fm_fork":
        a_rd, a_wr = os.pipe()
        b_rd, b_wr = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(a_wr)
            os.close(b_rd)
            fm_child(a_rd, b_wr)
        os.close(a_rd)
        os.close(b_wr)
        fm["child"], fm["to"], fm["frm"] = pid, os.fdopen(a_wr, "w"), os.fdopen(b_rd, "r")
        return f"ok {pid}"
    elif op in ("fm_cread", "fm_cwrite"):
        fm["to"].write(f"{op[4:]} {args[0]}\n")
        fm["to"].flush()
        fm["frm"].readline()
    elif op == "fm_cexit":
        if fm["child"] is not None:
            fm["to"].write("exit\n")
            fm["to"].flush()
            os.waitpid(fm["child"], 0)
            fm["child"] = None
    elif op == "fm_dontneed":
        check(libc.madvise(fm["addr"] + int(args[0]) * PAGE, int(args[1]) * PAGE, MADV_DONTNEED),
              "madvise(MADV_DONTNEED)")
    else:
        return f"error unknown command {op}"
    return "ok"


# ---- commands of the THP policy scenarios (ptebatch.oracle_policy) --------------------------
# Mappings at chosen alignments, MADV_HUGEPAGE / MADV_NOHUGEPAGE, PR_SET_THP_DISABLE, and
# first-touch accesses at absolute addresses.

PROT_NONE, PROT_RW = 0, mmap.PROT_READ | mmap.PROT_WRITE
MAP_FIXED, MAP_NORESERVE = 0x10, 0x4000
PR_SET_THP_DISABLE = 41
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mmap.restype = ctypes.c_void_p
libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _raw_mmap(addr: int, length: int, prot: int, flags: int) -> int:
    got = libc.mmap(addr or None, length, prot, flags | mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    if got in (None, ctypes.c_void_p(-1).value):
        e = ctypes.get_errno()
        raise OSError(e, f"mmap: {os.strerror(e)}")
    return int(got)


def policy_map(length: str, align: str, offset: str) -> str:
    """A private anonymous read-write mapping of ``length`` bytes at ``offset`` past an
    ``align``-aligned address, between PROT_NONE guards so that no later mapping merges
    with it; answers its address."""
    n, a, off = int(length), int(align), int(offset)
    guard = max(a, PAGE)
    span = n + off + 3 * guard
    base = _raw_mmap(0, span, PROT_NONE, MAP_NORESERVE)
    addr = (base + guard + a - 1) // a * a + off
    _raw_mmap(addr, n, PROT_RW, MAP_FIXED)
    return f"ok {addr}"


def policy_madvise(addr: str, length: str, advice: str) -> str:
    code = {"hugepage": MADV_HUGEPAGE, "nohugepage": MADV_NOHUGEPAGE}[advice]
    check(libc.madvise(int(addr), int(length), code), f"madvise({advice})")
    return "ok"


def policy_prctl(disable: str, flags: str) -> str:
    check(libc.prctl(PR_SET_THP_DISABLE, int(disable), int(flags), 0, 0), "prctl(PR_SET_THP_DISABLE)")
    return "ok"


def policy_write(addr: str) -> str:
    # A store without a load first (see Region.write).
    ctypes.c_char.from_address(int(addr)).value = b"\x5a"
    return "ok"


def policy_read(addr: str) -> str:
    return f"ok {ctypes.c_char.from_address(int(addr)).value[0]}"


POLICY_COMMANDS = {"tmap": policy_map, "tmadvise": policy_madvise, "tprctl": policy_prctl,
                   "twrite": policy_write, "tread": policy_read}


if __name__ == "__main__":
    main()

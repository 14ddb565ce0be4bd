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
        else:
            reply = f"error unknown command {op}"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    if child is not None:
        to_child.write("exit\n")
        to_child.flush()
        os.waitpid(child, 0)


if __name__ == "__main__":
    main()

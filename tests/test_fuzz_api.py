"""Fuzz of the public API with arbitrary arguments (hypothesis).

Every call either works or raises one of the typed exceptions (ValueError, TypeError,
pb.PtebatchError and its subclasses), never OverflowError, IndexError, KeyError, a Rust panic
or the like; a failed simulation call leaves the state as it was and every invariant holding.
The Rust core and the pure-Python reference answer bad input alike: the same exception class,
or the same result.

PTEBATCH_FUZZ_EXAMPLES sets the examples per test (default small, for CI).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import ptebatch as pb
from ptebatch import reference as ref

EXAMPLES = int(os.environ.get("PTEBATCH_FUZZ_EXAMPLES", "40"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

TYPED = (ValueError, TypeError, pb.PtebatchError)
#: Never acceptable, even where a subclass of a typed one (numpy's AxisError is a ValueError
#: and an IndexError).
UNTYPED = (OverflowError, AttributeError, IndexError, KeyError, RuntimeError, ZeroDivisionError,
           SystemError, MemoryError, RecursionError)


def outcome(fn, *args, **kwargs):
    """``("ok", result)`` or ``("raised", exception class)``; fails on an untyped exception."""
    try:
        return "ok", fn(*args, **kwargs)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # noqa: B036 - a Rust panic is a BaseException
        assert isinstance(e, TYPED) and not isinstance(e, UNTYPED), f"{type(e).__module__}.{type(e).__name__}: {e}"
        assert str(e), f"{type(e).__name__} without a message"
        kind = TypeError if isinstance(e, TypeError) else ValueError if isinstance(e, ValueError) else type(e)
        return "raised", kind


# -- arbitrary values ------------------------------------------------------------------------

BIG_INTS = [0, 1, 2, 3, 4095, 4096, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64, 2**65, 10**30,
            -1, -4096, -(2**63), -(2**64), 2**200]
INTS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(BIG_INTS))
STRINGS = st.one_of(st.text(max_size=6), st.sampled_from(
    ["4K", "64K", "2M", "1.5GiB", "0", "-4K", "nan", " 4K ", "4k", "4KiB", "4KB", "0x10", "1e3", "16T",
     "9" * 30, "rw", "r", "none", "rq", "dontneed", "wipeonfork", "6.18", "seed", "x86-64", "arm64-4k"]))


@st.composite
def arrays(draw):
    """numpy arrays of awkward dtypes, shapes and strides."""
    dtype = draw(st.sampled_from(["uint64", "int64", "int32", "uint8", "float64", "bool", "object", ">u8"]))
    shape = draw(st.sampled_from([(0,), (1,), (5,), (2, 3), ()]))
    n = int(np.prod(shape))
    values = draw(st.lists(st.integers(0, 2**16), min_size=n, max_size=n))
    a = np.array(values, dtype=np.uint64).astype(dtype).reshape(shape)
    if draw(st.booleans()) and a.ndim == 1 and len(a) > 1:
        a = np.repeat(a, 2)[::2]  # the same values, not contiguous
    return a


SCALARS = st.one_of(
    st.none(), st.booleans(), INTS, st.floats(allow_nan=True, allow_infinity=True), st.just(4096.0),
    STRINGS, st.binary(max_size=4), st.just(np.uint64(4096)), st.just(np.int64(-1)),
    st.just(np.float64("nan")), st.just(np.True_), st.just(object()), st.just(1j),
)
ANYTHING = st.one_of(SCALARS, arrays(), st.lists(st.one_of(INTS, st.floats(), st.none()), max_size=4),
                     st.tuples(INTS), st.dictionaries(st.integers(0, 4), st.integers(0, 4), max_size=2),
                     st.frozensets(st.integers(0, 4), max_size=2))


def same(got, want) -> None:
    """Rust and reference agree: the same exception class, or equal results."""
    assert got[0] == want[0], (got, want)
    if got[0] == "raised":
        assert got[1] == want[1], (got, want)


# -- layouts ---------------------------------------------------------------------------------

UNARY = ["pte_pfn", "pte_none", "pte_present", "pte_protnone", "pte_write", "pte_dirty", "pte_young",
         "pte_soft_dirty", "pte_uffd_wp", "pte_special", "pte_exec", "pte_cont", "pte_wrprotect",
         "pte_mkwrite", "pte_mkold", "pte_mkyoung", "pte_mkclean", "pte_mkdirty",
         "pte_clear_soft_dirty", "pte_mksoft_dirty"]
FLAGS = ["present", "write", "dirty", "young", "soft_dirty", "uffd_wp", "exec", "special", "prot_none", "cont"]


def _scalar_result(r):
    return int(r) if not isinstance(r, (bool, np.bool_)) else bool(r)


@FUZZ
@given(name=st.sampled_from(pb.LAYOUT_NAMES), fn=st.sampled_from(UNARY + ["pte_advance_pfn", "pte_batch_hint"]),
       a=ANYTHING, b=ANYTHING)
def test_layout_accessors(name, fn, a, b):
    fast, slow = pb.layout(name), ref.layout(name)
    args = (a, b) if fn in ("pte_advance_pfn", "pte_batch_hint") else (a,)
    got = outcome(getattr(fast, fn), *args)
    if any(isinstance(x, np.ndarray) for x in args):
        return  # vectorised in Rust only
    want = outcome(getattr(slow, fn), *args)
    same(got, want)
    if got[0] == "ok":
        assert _scalar_result(got[1]) == _scalar_result(want[1])


@FUZZ
@given(name=st.sampled_from(pb.LAYOUT_NAMES), pfns=ANYTHING,
       flags=st.dictionaries(st.sampled_from(FLAGS), st.one_of(st.booleans(), ANYTHING), max_size=3))
def test_mk_pte(name, pfns, flags):
    got = outcome(pb.layout(name).mk_pte, pfns, **flags)
    if isinstance(pfns, np.ndarray) or any(isinstance(v, np.ndarray) for v in flags.values()):
        return
    want = outcome(ref.layout(name).mk_pte, pfns, **flags)
    same(got, want)
    if got[0] == "ok":
        assert got[1] == want[1]


@FUZZ
@given(name=st.one_of(st.sampled_from(pb.LAYOUT_NAMES), ANYTHING), ballooned=st.one_of(st.none(), ANYTHING))
def test_layout_constructor(name, ballooned):
    outcome(pb.layout, name, ballooned_pfns=ballooned)
    outcome(pb.Layout, name, ballooned_pfns=ballooned)
    outcome(ref.layout, name, ballooned_pfns=ballooned)


# -- folio_pte_batch, batch_lengths, fork_flags, fpb_form ---------------------------------------

KERNELS = st.sampled_from(list(pb.KERNEL_VERSIONS))
FPB = st.one_of(st.sampled_from([None, 0, pb.FPB_IGNORE_DIRTY, pb.FPB_IGNORE_SOFT_DIRTY, pb.FPB_RESPECT_DIRTY,
                                 pb.FPB_MERGE_WRITE | pb.FPB_RESPECT_WRITE, pb.FpbFlags("ignore", 0)]), SCALARS)


def _table(layout: pb.Layout, base: int, n: int) -> np.ndarray:
    return layout.mk_pte(np.arange(base, base + n, dtype=np.uint64), write=True, young=True)


def _int_or_anything(valid):
    return st.one_of(st.sampled_from(valid), ANYTHING)


@FUZZ
@given(name=st.sampled_from(pb.LAYOUT_NAMES), kernel=KERNELS, n=st.integers(1, 32), data=st.data())
def test_folio_pte_batch(name, kernel, n, data):
    fast = pb.layout(name)
    ptes = data.draw(st.one_of(st.just(_table(fast, 0x1000, n)), ANYTHING), "ptes")
    args = dict(
        start=data.draw(_int_or_anything([0, 1, n - 1, n]), "start"),
        max_nr=data.draw(_int_or_anything([1, n, n + 1, 0]), "max_nr"),
        folio_pfn=data.draw(_int_or_anything([0x1000, 0x1001, 0x1010, 0x0FF0]), "folio_pfn"),
        folio_nr_pages=data.draw(_int_or_anything([1, 2, 3, 16, 32, 0, 2**63]), "folio_nr_pages"),
        kernel=kernel, flags=data.draw(FPB, "flags"),
        first_vpn=data.draw(_int_or_anything([0, 511, 2**64 - 1]), "first_vpn"),
    )
    got = outcome(pb.folio_pte_batch, ptes, layout=fast, **args)
    want = outcome(ref.folio_pte_batch, ptes, layout=ref.layout(name), **args)
    same(got, want)
    if got[0] == "ok":
        b, r = got[1], want[1]
        assert (b.nr, b.pte, b.any_writable, b.any_young, b.any_dirty) == (
            r.nr, r.pte, r.any_writable, r.any_young, r.any_dirty)


@FUZZ
@given(name=st.sampled_from(pb.LAYOUT_NAMES), kernel=KERNELS, n=st.integers(0, 40), data=st.data())
def test_batch_lengths(name, kernel, n, data):
    fast = pb.layout(name)
    starts = data.draw(st.one_of(st.sampled_from([
        np.array([0x1000], dtype=np.uint64), [0x1000], [0x1000, 0x1010], [0x1001], [0x1000, 0x1008],
        (0x1000,), [], [4096.0]]), ANYTHING), "folio_start")
    nrs = data.draw(st.one_of(st.sampled_from([
        np.array([16], dtype=np.uint64), [16], [16, 16], [3], [8, 8], [0], [], [16.9]]), ANYTHING), "folio_nr_pages")
    whole = np.full(0x1020, -1, dtype=np.int64)
    whole[0x1000:0x1010] = 0
    pfn_to_folio = data.draw(st.one_of(st.sampled_from([None, whole, whole[:0x1008], whole[::2], whole.tolist()]),
                                       ANYTHING), "pfn_to_folio")
    kw = dict(kernel=kernel, folio_start=starts, folio_nr_pages=nrs, pfn_to_folio=pfn_to_folio,
              first_vpn=data.draw(_int_or_anything([0, 504]), "first_vpn"), flags=data.draw(FPB, "flags"),
              shared=data.draw(st.one_of(st.booleans(), SCALARS), "shared"),
              soft_dirty_tracking=data.draw(st.one_of(st.booleans(), SCALARS), "soft_dirty_tracking"))
    ptes = data.draw(st.one_of(st.just(_table(fast, 0x1000, n)), ANYTHING), "ptes")
    got = outcome(pb.batch_lengths, ptes, layout=fast, **kw)
    want = outcome(ref.batch_lengths, ptes, layout=ref.layout(name), **kw)
    same(got, want)
    if got[0] == "ok":
        assert got[1].tolist() == list(want[1])


@FUZZ
@given(kernel=st.one_of(KERNELS, ANYTHING), shared=st.one_of(st.booleans(), SCALARS),
       sdt=st.one_of(st.booleans(), SCALARS))
def test_fork_flags_and_fpb_form(kernel, shared, sdt):
    got = outcome(pb.fork_flags, kernel, shared, sdt)
    outcome(pb.fpb_form, kernel)
    outcome(ref.fpb_form, kernel)
    if isinstance(kernel, str):
        same(got, outcome(ref.fork_flags, kernel, shared, sdt))
        if got[0] == "ok":
            assert got[1] == ref.fork_flags(kernel, shared, sdt)


# -- the simulation --------------------------------------------------------------------------

#: Successful allocations stay small: mmap and create_file allocate page tables and page
#: caches of their length on the host, and pagemap an entry per page.
MAX_BYTES = 16 << 20


def _bounded(value) -> bool:
    try:
        return pb.parse_size(value) <= MAX_BYTES
    except (TypeError, ValueError):
        return True


SIZES = st.one_of(st.sampled_from(["4K", "64K", 4096, 8192, 65536, "2M", 0, 4097, "1.5G", "-4K", "nan", 4096.0]),
                  ANYTHING).filter(_bounded)


def _world(backend):
    sim = pb.Simulation("x86-64", "6.18", "8M", backend=backend)
    p = sim.spawn()
    v = p.mmap("256K", mthp=["64K"])
    p.touch(v.start, "128K", write=True)
    fid = sim.create_file("256K", "16K")
    pin = p.pin(v.start, "4K")
    return sim, p, v, fid, pin


@st.composite
def operations(draw, v_start, v_end, fid, pin):
    addrs = st.one_of(st.sampled_from([v_start, v_start + 4096, v_start + 65536, v_end - 4096, v_end,
                                       v_start + 1, 0]), ANYTHING)
    bools = st.one_of(st.booleans(), SCALARS)
    op = draw(st.sampled_from(["mmap", "touch", "read", "write", "fork", "munmap", "mprotect", "madvise",
                               "pin", "exit", "pagemap", "ptes", "page", "kpagecount", "create_file",
                               "uffd_writeprotect", "clear_soft_dirty", "process", "pin_read",
                               "pin_write"]))
    a = lambda s, label: draw(s, label)  # noqa: E731
    if op == "mmap":
        kw = {}
        for key, s in (("prot", st.one_of(st.sampled_from(["rw", "r", "none", "rq"]), ANYTHING)),
                       ("shared", bools), ("file", st.one_of(st.sampled_from([None, fid, 99]), ANYTHING)),
                       ("offset", SIZES), ("mthp", st.one_of(st.sampled_from(["64K", ["16K", "2M"], "3", []]),
                                                             ANYTHING)),
                       ("addr", addrs), ("uffd_wp", bools), ("uffd_event_fork", bools)):
            if draw(st.booleans()):
                kw[key] = a(s, key)
        return op, (a(SIZES, "length"),), kw
    if op in ("touch", "munmap", "pagemap"):
        kw = {"write": a(bools, "write")} if op == "touch" and draw(st.booleans()) else {}
        return op, (a(addrs, "addr"), a(SIZES, "length")), kw
    if op in ("read", "write"):
        return op, (a(addrs, "addr"),), {}
    if op in ("mprotect", "madvise"):
        words = ["rw", "r", "none", "rq"] if op == "mprotect" else ["dontneed", "dontfork", "wipeonfork", "cold"]
        return op, (a(addrs, "addr"), a(SIZES, "length"), a(st.one_of(st.sampled_from(words), ANYTHING), "w")), {}
    if op == "pin":
        return op, (a(addrs, "addr"), a(SIZES, "length")), {"write": a(bools, "w"), "longterm": a(bools, "l")}
    if op == "uffd_writeprotect":
        return op, (a(addrs, "addr"), a(SIZES, "length"), a(bools, "enable")), {}
    if op == "ptes":
        return op, (a(addrs, "addr"),), {}
    if op in ("page", "kpagecount"):
        return op, (a(st.one_of(st.sampled_from([0, 5, 2047, 2048, 2049]), ANYTHING), "pfn"),), {}
    if op == "create_file":
        kw = {"shmem": a(bools, "shmem")} if draw(st.booleans()) else {}
        return op, (a(SIZES, "size"), a(SIZES, "folio_size")), kw
    if op == "process":
        return op, (a(st.one_of(st.sampled_from([1, 2, 99]), ANYTHING), "pid"),), {}
    if op in ("pin_read", "pin_write"):
        return op, (a(st.one_of(st.sampled_from([0, 1, 4096]), ANYTHING), "index"),), {}
    return op, (), {}  # fork, exit, clear_soft_dirty


def _apply(sim, p, pin, op, args, kw):
    if op in ("page", "kpagecount", "create_file", "process"):
        r = getattr(sim, op)(*args, **kw)
        if op == "process":
            r.fork()  # a process handle is only checked by the backend when it is used
        return r
    if op in ("pin_read", "pin_write"):
        return getattr(pin, op[4:])(*args)
    return getattr(p, op)(*args, **kw)


@pytest.mark.parametrize("backend", ["rust", "reference"])
def test_simulation_operations(backend):
    sim0, p0, v0, fid0, pin0 = _world(backend)

    @FUZZ
    @given(data=st.data())
    def run(data):
        sim = sim0.clone()
        p, pin = pb.Process(sim, p0.pid), pb.Pin(sim, pin0.id)
        for _ in range(data.draw(st.integers(1, 3), "steps")):
            op, args, kw = data.draw(operations(v0.start, v0.end, fid0, pin0.id), "op")
            before = sim.state()
            status, _ = outcome(_apply, sim, p, pin, op, args, kw)
            event(f"{op} {status}")
            if status == "raised":
                assert pb.state_diff(before, sim.state()) == [], (op, args, kw)
            sim.check()

    run()


def test_simulation_constructor_and_snapshot_arguments(tmp_path):
    @FUZZ
    @given(arch=st.one_of(st.just("x86-64"), ANYTHING), kernel=st.one_of(st.just("6.18"), ANYTHING),
           memory=st.one_of(st.sampled_from(["8M", 1 << 23, "0", "1.5M"]), ANYTHING).filter(_bounded),
           seed=st.one_of(st.just(0), ANYTHING), batching=st.one_of(st.booleans(), SCALARS),
           fragmentation=st.one_of(st.none(), st.just({"64K": 0.5}), st.just({"64K": float("nan")}),
                                   st.just({"3K": 0.5}), st.just({"64K": "0.5"}), ANYTHING),
           backend=st.sampled_from(["rust", "reference", "gpu"]))
    def run(arch, kernel, memory, seed, batching, fragmentation, backend):
        outcome(pb.Simulation, arch, kernel, memory, seed=seed, batching=batching,
                fragmentation=fragmentation, backend=backend)

    run()
    from ptebatch.thpmaps import snapshot_of

    sim = pb.Simulation("x86-64", "6.18", "8M")
    p = sim.spawn()
    v = p.mmap("256K", mthp="64K")
    p.touch(v.start, v.length, write=True)
    path = tmp_path / "s.npz"
    snapshot_of(sim, [p]).save(path)
    for where in (path, str(path)):
        replayed, procs = pb.Simulation.from_snapshot(where, "6.18")
        replayed.check()
        assert len(procs) == 1
    missing = tmp_path / "missing.npz"
    for snap, exc in ((str(missing), pb.SnapshotError), (missing, pb.SnapshotError), (42, TypeError),
                      (None, TypeError), (b"snap.npz", TypeError)):
        with pytest.raises(exc):
            pb.Simulation.from_snapshot(snap)


# -- sizes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("0", 0), ("4096", 4096), (" 4K ", 4096), ("4k", 4096), ("4K", 4096), ("4KB", 4096), ("4KiB", 4096),
    ("64 K", 65536), ("2M", 2 << 20), ("16GiB", 16 << 30), ("1T", 1 << 40), (4096, 4096),
    (np.uint64(8192), 8192), ("15T", 15 << 40), ("18446744073709551615", 2**64 - 1),
])
def test_parse_size_reads(text, size):
    assert pb.parse_size(text) == size


@pytest.mark.parametrize("text, exc, match", [
    ("1.5GiB", ValueError, "whole number"), ("-4K", ValueError, "negative"), (-4096, ValueError, "non-negative"),
    ("nan", ValueError, "cannot read"), ("4X", ValueError, "cannot read"), ("", ValueError, "cannot read"),
    ("0x1000", ValueError, "cannot read"), ("99999999T", ValueError, "2\\*\\*64"), ("9" * 5000, ValueError, "2\\*\\*64"),
    (2**64, ValueError, "2\\*\\*64"), (4096.0, TypeError, "float"), (True, TypeError, "bool"),
    (None, TypeError, "NoneType"), (float("nan"), TypeError, "float"),
])
def test_parse_size_refuses(text, exc, match):
    with pytest.raises(exc, match=match):
        pb.parse_size(text)
    with pytest.raises(exc, match="length"):
        pb.parse_size(text, "length")


def test_errors_name_the_argument():
    sim = pb.Simulation("x86-64", "6.18", "8M")
    p = sim.spawn()
    v = p.mmap("64K", mthp="64K")  # one size, not only a list
    with pytest.raises(ValueError, match="addr must be a non-negative integer, not -1"):
        p.touch(-1, 4096)
    with pytest.raises(ValueError, match="addr must be below 2\\*\\*64"):
        p.read(2**64)
    with pytest.raises(TypeError, match="addr must be an integer, not float"):
        p.write(float(v.start))
    with pytest.raises(TypeError, match="write must be a bool"):
        p.touch(v.start, 4096, write=1)
    with pytest.raises(ValueError, match="mthp\\[1\\]"):
        p.mmap("64K", mthp=["64K", "-64K"])
    with pytest.raises(TypeError, match="mthp"):
        p.mmap("64K", mthp=4096.0)
    with pytest.raises(ValueError, match="pid"):
        sim.process(-1)
    L = pb.layout("x86-64")
    t = _table(L, 0x1000, 16)
    with pytest.raises(ValueError, match="start must be a non-negative integer, not -1"):
        pb.folio_pte_batch(t, -1, folio_pfn=0x1000, folio_nr_pages=16, layout=L, kernel="6.18")
    with pytest.raises(TypeError, match="flags"):
        pb.batch_lengths(t, layout=L, kernel="6.8", folio_start=[0x1000], folio_nr_pages=[16], flags=7)
    with pytest.raises(TypeError, match=r"folio_start\[0\] must be an integer, not float"):
        pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=[4096.9], folio_nr_pages=[16])
    with pytest.raises(ValueError, match="naturally aligned"):
        pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=[0x1008], folio_nr_pages=[16])
    with pytest.raises(ValueError, match="pfn_to_folio"):
        split = np.full(0x1008, -1, dtype=np.int64)
        split[0x1000:] = 0
        pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=[0x1000], folio_nr_pages=[16], pfn_to_folio=split)
    assert pb.batch_lengths(t, layout=L, kernel="6.18", folio_start=[0x1000], folio_nr_pages=(16,)).tolist() == [16]

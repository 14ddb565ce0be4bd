"""Tests of the pure-Python reference (``ptebatch.reference``) against hand-worked values.

Every expected value here is worked out by hand from docs/semantics.md; the comments show the
bit arithmetic. These tests need no compiled core.
"""

from __future__ import annotations

import itertools

import pytest

from ptebatch import reference as ref
from ptebatch._flags import (
    FPB_IGNORE_DIRTY,
    FPB_IGNORE_SOFT_DIRTY,
    FPB_MERGE_WRITE,
    FPB_MERGE_YOUNG_DIRTY,
    FPB_RESPECT_DIRTY,
    FPB_RESPECT_SOFT_DIRTY,
    FPB_RESPECT_WRITE,
    FpbFlags,
)

MASK64 = (1 << 64) - 1
BATCHING_KERNELS = [k for k in ref.KERNEL_VERSIONS if k != "6.8"]
# One kernel per folio_pte_batch form.
FORM_KERNELS = {"seed": "seed", "v6.9": "6.9", "v6.10": "6.12", "v6.15": "6.15", "v6.17": "6.17"}


def run(lay, pfn0, n, **kw):
    """n PTEs mapping pfn0, pfn0+1, ... with the same flags."""
    return [lay.mk_pte(pfn0 + k, **kw) for k in range(n)]


# ============================================================================================
# Layout attributes
# ============================================================================================


@pytest.mark.parametrize(
    "name, page_shift, ptrs, cont, pfn_shift, max_pfn, none, sd, uffd, contpte",
    [
        ("x86-64", 12, 512, 1, 12, 2**40 - 1, 0, True, True, False),
        ("x86-64-xenpv", 12, 512, 1, 12, 2**40 - 1, 0, True, True, False),
        ("arm64-4k", 12, 512, 16, None, 2**36 - 1, 0, False, True, True),
        ("arm64-16k", 14, 2048, 128, None, 2**34 - 1, 0, False, True, True),
        ("arm64-64k", 16, 8192, 32, None, 2**32 - 1, 0, False, True, True),
        ("riscv64", 12, 512, 1, 10, 2**44 - 1, 0, False, False, False),
        ("ppc64-4k", 12, 512, 1, 12, 2**41 - 1, 0, True, False, False),
        ("ppc64-64k", 16, 32, 1, 16, 2**37 - 1, 0, True, False, False),
        ("s390x", 12, 256, 1, 12, 2**52 - 1, 0x400, True, False, False),
        ("loongarch64", 14, 2048, 1, 14, 2**34 - 1, 0, False, False, False),
    ],
)
def test_layout_attributes(name, page_shift, ptrs, cont, pfn_shift, max_pfn, none, sd, uffd, contpte):
    lay = ref.layout(name)
    assert lay.name == name
    assert (lay.page_shift, lay.page_size) == (page_shift, 1 << page_shift)
    assert lay.ptrs_per_pte == ptrs
    assert lay.cont_ptes == cont
    assert lay.pfn_pte_shift == pfn_shift
    assert lay.max_pfn == max_pfn
    assert lay.none_value == none
    assert (lay.has_soft_dirty, lay.has_uffd_wp, lay.has_contpte) == (sd, uffd, contpte)


def test_layout_names_cover_every_layout():
    assert ref.LAYOUT_NAMES == (
        "x86-64", "x86-64-xenpv", "arm64-4k", "arm64-16k", "arm64-64k", "riscv64",
        "riscv64-svrsw60t59b", "ppc64-4k", "ppc64-64k", "s390x", "loongarch64",
    )
    for name in ref.LAYOUT_NAMES:
        assert isinstance(ref.layout(name), ref.RefLayout)


# ============================================================================================
# mk_pte: hand-computed values for every layout
# ============================================================================================

KNOWN_PTES = [
    # ---- x86-64: P=0 RW=1 USER=2 A=5 D=6 PROTNONE=8 SPECIAL=9 UFFD_WP=10 SOFT_DIRTY=11
    #      SAVED_DIRTY=58 NX=63; PFN at bits 12..51.
    # PAGE_READONLY = P|USER|A|NX = 0x8000000000000025; pfn 1 -> 0x1000; mkold clears A (0x20).
    ("x86-64", 1, {}, 0x8000_0000_0000_1005),
    # + mkwrite (RW 0x2), mkdirty (D 0x40 | SOFT_DIRTY 0x800; RW set so D stays),
    # mkyoung (A 0x20), clear_soft_dirty (-0x800): low bits 0x25|0x2|0x40 = 0x67.
    ("x86-64", 1, dict(write=True, dirty=True, young=True), 0x8000_0000_0000_1067),
    # read-only dirty: mkdirty sets D|SD, RW clear so D moves to SAVED_DIRTY (1<<58);
    # clear_soft_dirty drops 0x800: 0x8000000000001005 | 0x0400000000000000.
    ("x86-64", 1, dict(dirty=True), 0x8400_0000_0000_1005),
    # soft-dirty 0x800 | uffd-wp 0x400 | special 0x200 on 0x8000000012345005.
    ("x86-64", 0x12345, dict(soft_dirty=True, uffd_wp=True, special=True), 0x8000_0000_1234_5E05),
    # exec: template without NX: 0x1000 | P|USER = 0x1005.
    ("x86-64", 1, dict(exec=True), 0x1005),
    # PAGE_NONE = A|PROTNONE (non-present): PFN field inverted: (~(1 << 12)) & bits 12..51
    # = 0xFFFFFFFFFE000; | 0x100 (A cleared by mkold).
    ("x86-64", 1, dict(prot_none=True), 0x000F_FFFF_FFFF_E100),
    # ---- arm64: VALID|TYPE=0x3, USER=0x40, RDONLY=0x80, SH=0x300, AF=0x400, NG=0x800,
    #      WRITE=1<<51, CONT=1<<52, PXN=1<<53, UXN=1<<54, DIRTY=1<<55, UFFD_WP=1<<58.
    # PAGE_READONLY low bits 0x3|0x40|0x80|0x300|0x800 = 0xBC3 (AF cleared by mkold);
    # PXN|UXN = 0x0060 << 48; pfn 1 << 12 = 0x1000.
    ("arm64-4k", 1, {}, 0x0060_0000_0000_1BC3),
    # mkwrite (WRITE 0x0008<<48; DIRTY clear so RDONLY stays), mkdirty (DIRTY 0x0080<<48,
    # WRITE set so RDONLY 0x80 cleared), mkyoung (AF 0x400): 0xBC3 - 0x80 + 0x400 = 0xF43.
    ("arm64-4k", 1, dict(write=True, dirty=True, young=True), 0x00E8_0000_0000_1F43),
    # PAGE_NONE: TYPE 0x2|RDONLY 0x80|SH 0x300|NG 0x800 = 0xB82, PXN|UXN, VALID clear.
    ("arm64-4k", 1, dict(prot_none=True), 0x0060_0000_0000_1B82),
    # 16k: pfn 3 << 14 = 0xC000; 0xBC3 | AF 0x400 = 0xFC3; PXN|UXN|CONT = 0x0070 << 48.
    ("arm64-16k", 3, dict(young=True, cont=True), 0x0070_0000_0000_CFC3),
    # 64k: pfn 2 << 16 = 0x20000; exec drops UXN: PXN 0x0020<<48; UFFD_WP 0x0400<<48.
    ("arm64-64k", 2, dict(exec=True, uffd_wp=True), 0x0420_0000_0002_0BC3),
    # ---- riscv64: V=0x1 R=0x2 W=0x4 X=0x8 U=0x10 PROT_NONE=0x20 A=0x40 D=0x80, PFN << 10.
    # PAGE_READ = V|R|U|A; mkold drops A: 0x13; pfn 1 << 10 = 0x400.
    ("riscv64", 1, {}, 0x413),
    # 0xABCDE << 10 = 0x2AF37800; V|R|W|X|U|A|D = 0xDF.
    ("riscv64", 0xABCDE, dict(write=True, dirty=True, young=True, exec=True), 0x2AF3_78DF),
    # PAGE_NONE = PROT_NONE|R = 0x22.
    ("riscv64", 1, dict(prot_none=True), 0x422),
    # ---- ppc64: EXEC=0x1 WRITE=0x2 READ=0x4 PRIVILEGED=0x8 DIRTY=0x80 ACCESSED=0x100
    #      SOFT_DIRTY=0x200 SPECIAL=0x400 PTE=1<<62 PRESENT=1<<63; pfn_pte ORs PTE.
    # PRESENT|PTE = 0xC000000000000000; READ 0x4 (ACCESSED cleared); pfn 1 << 12.
    ("ppc64-4k", 1, {}, 0xC000_0000_0000_1004),
    # mkwrite READ|WRITE 0x6, mkdirty DIRTY 0x80 (+SD, cleared again), mkyoung 0x100: 0x186.
    ("ppc64-4k", 1, dict(write=True, dirty=True, young=True), 0xC000_0000_0000_1186),
    # PAGE_NONE = PRESENT|ACCESSED (generic masks since v6.8, no PRIVILEGED): nothing left after mkold.
    ("ppc64-4k", 1, dict(prot_none=True), 0xC000_0000_0000_1000),
    # 64k: pfn 5 << 16 = 0x50000; READ 0x4 | SOFT_DIRTY 0x200 | SPECIAL 0x400 = 0x604.
    ("ppc64-64k", 5, dict(soft_dirty=True, special=True), 0xC000_0000_0005_0604),
    # ---- s390x: PRESENT=0x1 SOFT_DIRTY=0x2 YOUNG=0x4 DIRTY=0x8 READ=0x10 WRITE=0x20
    #      SPECIAL=0x40 NOEXEC=0x100 PROTECT=0x200 INVALID=0x400; PFN << 12.
    # PAGE_RO = 0x1|0x10|0x100|0x400|0x200 = 0x711; mkold: INVALID stays set.
    ("s390x", 1, {}, 0x1711),
    # mkwrite: WRITE 0x20 (not dirty yet: PROTECT stays); mkdirty: DIRTY 0x8 (+SD 0x2,
    # cleared again), WRITE set so PROTECT cleared; mkyoung: YOUNG 0x4, READ set so INVALID
    # cleared: 0x1|0x4|0x8|0x10|0x20|0x100 = 0x13D.
    ("s390x", 1, dict(write=True, dirty=True, young=True), 0x113D),
    # PAGE_RX = 0x611; mkyoung: YOUNG 0x4, clears INVALID 0x400: 0x215; pfn 0x10 << 12.
    ("s390x", 0x10, dict(exec=True, young=True), 0x1_0215),
    # PAGE_NONE = PRESENT|INVALID|PROTECT = 0x601.
    ("s390x", 1, dict(prot_none=True), 0x1601),
    ("s390x", 0, dict(soft_dirty=True), 0x713),
    # ---- loongarch64: VALID=0x1 DIRTY=0x2 PLV3=0xC CC=0x10 PRESENT=0x80 WRITE=0x100
    #      MODIFIED=0x200 PROTNONE=0x400 NO_READ=1<<61 NO_EXEC=1<<62; PFN << 14.
    # PAGE_READONLY = PRESENT|PLV3|CC|NO_EXEC = 0x4000_0000_0000_009C; pfn 1 << 14 = 0x4000.
    ("loongarch64", 1, {}, 0x4000_0000_0000_409C),
    # mkwrite WRITE 0x100; mkdirty MODIFIED 0x200 and (WRITE) DIRTY 0x2; mkyoung VALID 0x1.
    ("loongarch64", 1, dict(write=True, dirty=True, young=True), 0x4000_0000_0000_439F),
    # pfn 3 << 14 = 0xC000; WRITE 0x100 (not MODIFIED: no hw DIRTY); VALID 0x1.
    ("loongarch64", 3, dict(write=True, young=True), 0x4000_0000_0000_C19D),
    # PAGE_NONE = PROTNONE|PLV3|CC|NO_READ|NO_EXEC = 0x6000_0000_0000_041C.
    ("loongarch64", 1, dict(prot_none=True), 0x6000_0000_0000_441C),
]


@pytest.mark.parametrize("name, pfn, kw, expected", KNOWN_PTES)
def test_mk_pte_known_values(name, pfn, kw, expected):
    lay = ref.layout(name)
    v = lay.mk_pte(pfn, **kw)
    assert v == expected, f"{v:#x} != {expected:#x}"
    assert lay.pte_pfn(v) == pfn
    assert lay.pte_present(v)
    assert lay.pte_protnone(v) == kw.get("prot_none", False)
    assert lay.pte_write(v) == kw.get("write", False)
    assert lay.pte_dirty(v) == kw.get("dirty", False)
    assert lay.pte_young(v) == kw.get("young", False)
    assert lay.pte_soft_dirty(v) == kw.get("soft_dirty", False)
    assert lay.pte_uffd_wp(v) == kw.get("uffd_wp", False)
    assert lay.pte_special(v) == kw.get("special", False)
    assert lay.pte_cont(v) == kw.get("cont", False)
    assert not lay.pte_none(v)


@pytest.mark.parametrize("name", ref.LAYOUT_NAMES)
def test_mk_pte_not_present_is_the_empty_entry(name):
    lay = ref.layout(name)
    # All other flags are ignored, even ones the arch could not encode.
    v = lay.mk_pte(lay.max_pfn + 1, present=False, write=True, prot_none=True, soft_dirty=True,
                   uffd_wp=True, cont=True)
    assert v == lay.none_value
    assert lay.pte_none(v)
    assert not lay.pte_present(v)


@pytest.mark.parametrize("name", ref.LAYOUT_NAMES)
def test_mk_pte_exec_and_protnone(name):
    lay = ref.layout(name)
    assert lay.pte_exec(lay.mk_pte(7, exec=True))
    assert not lay.pte_exec(lay.mk_pte(7))
    v = lay.mk_pte(7, prot_none=True)
    assert lay.pte_present(v) and lay.pte_protnone(v) and lay.pte_pfn(v) == 7
    assert not lay.pte_protnone(lay.mk_pte(7))


def test_mk_pte_dirty_and_soft_dirty_are_independent():
    # pte_mkdirty() also sets soft-dirty on x86/ppc64/s390; mk_pte then applies soft_dirty.
    for name in ("x86-64", "ppc64-4k", "s390x"):
        lay = ref.layout(name)
        assert not lay.pte_soft_dirty(lay.mk_pte(1, dirty=True))
        assert lay.pte_soft_dirty(lay.mk_pte(1, soft_dirty=True))
        assert not lay.pte_dirty(lay.mk_pte(1, soft_dirty=True))


def test_mk_pte_uffd_wp_sets_only_the_bit():
    # Not pte_mkuffd_wp(): a writable uffd-wp PTE stays writable.
    lay = ref.layout("x86-64")
    v = lay.mk_pte(1, write=True, uffd_wp=True)
    assert v == 0x8000_0000_0000_1007 | 0x400
    assert lay.pte_write(v) and lay.pte_uffd_wp(v)


# ============================================================================================
# Architecture quirks
# ============================================================================================


def test_x86_protnone_pfn_inversion():
    lay = ref.layout("x86-64")
    p = lay.mk_pte(0x12345, prot_none=True)
    # Stored PFN field = ~0x12345 within 40 bits = 0xFF_FFFE_DCBA, at bit 12; PROTNONE 0x100.
    assert p == 0x000F_FFFF_EDCB_A100
    assert lay.pte_pfn(p) == 0x12345
    assert lay.pte_present(p) and lay.pte_protnone(p)
    # The largest PFN inverts to an all-zero field, leaving only PROTNONE: still inverted,
    # because the value is non-zero and P is clear.
    top = lay.mk_pte(lay.max_pfn, prot_none=True)
    assert top == 0x100
    assert lay.pte_pfn(top) == lay.max_pfn
    # A zero PTE is never inverted.
    assert lay.pte_pfn(0) == 0


def test_x86_protnone_raw_value_descends_on_advance():
    lay = ref.layout("x86-64")
    p = lay.mk_pte(0x12345, prot_none=True)
    q = lay.pte_advance_pfn(p, 1)
    assert q == p - 0x1000 == 0x000F_FFFF_EDCB_9100
    assert lay.pte_pfn(q) == 0x12346
    assert lay.pte_advance_pfn(p, 5) == p - 5 * 0x1000
    # A present PTE ascends.
    r = lay.mk_pte(0x12345)
    assert lay.pte_advance_pfn(r, 5) == r + 5 * 0x1000
    # Wrapping is explicit: advancing 0 downwards past zero wraps at 64 bits.
    assert lay.pte_advance_pfn(0x100, 1) == (0x100 - 0x1000) & MASK64


def test_x86_saved_dirty_moves_on_wrprotect_and_back_on_mkwrite():
    lay = ref.layout("x86-64")
    p = lay.mk_pte(1, write=True, dirty=True)  # P|RW|USER|D, NX
    assert p == 0x8000_0000_0000_1047
    w = lay.pte_wrprotect(p)
    # RW (0x2) cleared; D (0x40) moved to SAVED_DIRTY (1 << 58).
    assert w == 0x8400_0000_0000_1005
    assert lay.pte_dirty(w) and not lay.pte_write(w)
    assert lay.pte_mkwrite(w) == p  # SAVED_DIRTY back into D
    # pte_mkdirty on a read-only PTE lands in SAVED_DIRTY (and sets soft-dirty 0x800).
    assert lay.pte_mkdirty(lay.mk_pte(1)) == 0x8400_0000_0000_1805
    # pte_mkclean clears both.
    assert lay.pte_mkclean(w) == 0x8000_0000_0000_1005
    # pte_none ignores A and D (Knights Landing erratum).
    assert lay.pte_none(0x20) and lay.pte_none(0x60) and not lay.pte_none(0x1)


def test_arm64_hw_dirty_becomes_sw_dirty_on_wrprotect():
    lay = ref.layout("arm64-4k")
    writable = lay.mk_pte(1, write=True)  # WRITE set, RDONLY still set: clean writable
    assert not lay.pte_dirty(writable)
    hw_dirty = writable & ~(1 << 7)  # the CPU clears RDONLY on the first write (DBM)
    assert lay.pte_dirty(hw_dirty) and not hw_dirty & (1 << 55)
    w = lay.pte_wrprotect(hw_dirty)
    # WRITE (1<<51) cleared, RDONLY (1<<7) set, DIRTY (1<<55) set.
    assert w == (hw_dirty & ~(1 << 51)) | (1 << 7) | (1 << 55)
    assert lay.pte_dirty(w) and not lay.pte_write(w)
    # A clean writable PTE stays clean.
    assert not lay.pte_dirty(lay.pte_wrprotect(writable))
    # pte_mkwrite on a sw-dirty PTE clears RDONLY again: hardware dirty.
    again = lay.pte_mkwrite(w)
    assert again & (1 << 51) and not again & (1 << 7)
    # pte_mkclean: clear DIRTY, set RDONLY.
    assert not lay.pte_dirty(lay.pte_mkclean(again))


def test_arm64_pte_advance_pfn_rebuilds():
    lay = ref.layout("arm64-16k")
    p = lay.mk_pte(0x10, young=True, cont=True)
    q = lay.pte_advance_pfn(p, 3)
    assert q == p + (3 << 14)
    assert lay.pte_pfn(q) == 0x13


def test_arm64_batch_hint():
    lay = ref.layout("arm64-4k")
    cont = lay.mk_pte(0x100, cont=True)
    assert lay.pte_batch_hint(0, cont) == 16
    assert lay.pte_batch_hint(5, cont) == 11
    assert lay.pte_batch_hint(16 + 15, cont) == 1
    assert lay.pte_batch_hint(5, lay.mk_pte(0x100)) == 1  # no CONT
    # PROT_NONE with CONT: not VALID, so no hint.
    assert lay.pte_batch_hint(0, lay.mk_pte(0x100, prot_none=True, cont=True)) == 1
    assert ref.layout("arm64-64k").pte_batch_hint(33, ref.layout("arm64-64k").mk_pte(0, cont=True)) == 31
    for name in ref.LAYOUT_NAMES:
        if not name.startswith("arm64"):
            assert ref.layout(name).pte_batch_hint(5, ref.layout(name).mk_pte(1)) == 1


def test_s390_invalid_and_protect_follow_the_software_bits():
    lay = ref.layout("s390x")
    PROTECT, INVALID = 0x200, 0x400
    p = lay.mk_pte(1)  # old and clean: both hardware bits set
    assert p == 0x1711 and p & PROTECT and p & INVALID
    y = lay.pte_mkyoung(p)  # readable, so INVALID goes
    assert y == 0x1315
    assert lay.pte_mkold(y) == 0x1711
    w = lay.pte_mkwrite(p)  # writable but clean: PROTECT stays
    assert w == 0x1731
    d = lay.pte_mkdirty(w)  # dirty and writable: PROTECT goes; SOFT_DIRTY 0x2 set
    assert d == 0x153B
    assert lay.pte_wrprotect(d) == 0x171B  # WRITE 0x20 cleared, PROTECT back
    assert lay.pte_mkclean(d) == 0x1733  # DIRTY 0x8 cleared, PROTECT back
    # Dirty first, then writable: mkwrite clears PROTECT because DIRTY is set.
    assert lay.pte_mkwrite(lay.pte_mkdirty(p)) == 0x153B
    # PROT_NONE (no READ): mkyoung keeps INVALID.
    n = lay.mk_pte(1, prot_none=True)
    assert lay.pte_mkyoung(n) == 0x1605
    assert lay.pte_protnone(n) and not lay.pte_protnone(p)
    assert lay.pte_pfn(0xABC_D715) == 0xABCD
    assert lay.pte_none(0x400) and not lay.pte_none(0)


def test_loongarch_valid_bit_is_young():
    lay = ref.layout("loongarch64")
    old = lay.mk_pte(1)
    assert not old & 0x1 and not lay.pte_young(old)
    young = lay.pte_mkyoung(old)
    assert young == old | 0x1 and lay.pte_young(young)
    assert lay.pte_mkold(young) == old
    assert lay.pte_present(old) and lay.pte_present(young)  # PRESENT is bit 7, not VALID
    # wrprotect clears WRITE and the hardware DIRTY bit, keeps MODIFIED.
    wd = lay.mk_pte(1, write=True, dirty=True)
    assert wd & 0x2 and wd & 0x200
    assert lay.pte_wrprotect(wd) == wd & ~0x102
    assert lay.pte_dirty(lay.pte_wrprotect(wd))
    assert lay.pte_none(0x40) and not lay.pte_none(0x41)  # GLOBAL ignored


def test_riscv_has_no_soft_dirty_or_uffd_wp_yet():
    lay = ref.layout("riscv64")
    assert not lay.has_soft_dirty and not lay.has_uffd_wp
    assert lay.pte_clear_soft_dirty(0x4D7) == 0x4D7 and lay.pte_mksoft_dirty(0x4D7) == 0x4D7
    assert lay.pte_mkdirty(0x413) == 0x493  # only D
    assert lay.pte_advance_pfn(0x413, 3) == 0x413 + (3 << 10)


def test_ppc64_mkwrite_sets_read_and_write():
    lay = ref.layout("ppc64-64k")
    p = lay.mk_pte(1, prot_none=True)
    assert lay.pte_mkwrite(p) == p | 0x6
    # present-but-invalid entry
    assert lay.pte_present((1 << 61) | (1 << 62))
    assert not lay.pte_present(1 << 61)


def test_xenpv_advance_onto_a_ballooned_pfn_gives_zero():
    lay = ref.layout("x86-64-xenpv", ballooned_pfns=[0x104])
    p = lay.mk_pte(0x103)
    assert lay.pte_advance_pfn(p, 1) == 0
    assert lay.pte_advance_pfn(lay.mk_pte(0x102), 2) == 0
    assert lay.pte_advance_pfn(lay.mk_pte(0x102), 3) == lay.mk_pte(0x105)
    # Non-present values advance as on x86.
    assert lay.pte_advance_pfn(0, 1) == 0x1000
    assert ref.layout("x86-64-xenpv").pte_advance_pfn(p, 1) == lay.mk_pte(0x104)


# ============================================================================================
# debug_vm_pgtable identities, for every layout
# ============================================================================================


def sample_ptes(lay):
    """PTEs of several PFNs and every combination of the flags the layout has."""
    pfns = sorted({0, 1, 0x1234 & lay.max_pfn, lay.max_pfn - 40, lay.max_pfn})
    optional = ["soft_dirty"] * lay.has_soft_dirty + ["uffd_wp"] * lay.has_uffd_wp + ["cont"] * lay.has_contpte
    names = ["write", "dirty", "young", "exec", "prot_none", "special"] + optional
    out = []
    for pfn in pfns:
        for bits in itertools.product([False, True], repeat=len(names)):
            kw = dict(zip(names, bits))
            if kw["prot_none"] and (kw["write"] or kw["exec"]):
                continue
            out.append(lay.mk_pte(pfn, **kw))
    return out


@pytest.mark.parametrize("name", ref.LAYOUT_NAMES)
def test_debug_vm_pgtable_identities(name):
    lay = ref.layout(name)
    for p in sample_ptes(lay):
        ctx = f"{name} {p:#x}"
        assert lay.pte_dirty(lay.pte_wrprotect(p)) == lay.pte_dirty(p), ctx
        assert lay.pte_write(lay.pte_mkwrite(lay.pte_wrprotect(p))), ctx
        assert lay.pte_young(lay.pte_mkyoung(lay.pte_mkold(p))), ctx
        assert lay.pte_dirty(lay.pte_mkdirty(lay.pte_mkclean(p))), ctx
        assert not lay.pte_write(lay.pte_wrprotect(p)), ctx
        assert not lay.pte_young(lay.pte_mkold(p)), ctx
        assert not lay.pte_dirty(lay.pte_mkclean(p)), ctx
        if lay.has_soft_dirty:
            assert lay.pte_soft_dirty(lay.pte_mksoft_dirty(p)), ctx
            assert not lay.pte_soft_dirty(lay.pte_clear_soft_dirty(p)), ctx
        pfn = lay.pte_pfn(p)
        for transform in (
            lay.pte_wrprotect, lay.pte_mkwrite, lay.pte_mkold, lay.pte_mkyoung,
            lay.pte_mkclean, lay.pte_mkdirty, lay.pte_clear_soft_dirty, lay.pte_mksoft_dirty,
        ):
            q = transform(p)
            assert lay.pte_pfn(q) == pfn, f"{ctx} {transform.__name__}"
            assert lay.pte_present(q) == lay.pte_present(p), f"{ctx} {transform.__name__}"
        for a, b in ((0, 0), (1, 0), (1, 1), (3, 5), (16, 17)):
            if pfn + a + b > lay.max_pfn:
                continue
            assert lay.pte_advance_pfn(lay.pte_advance_pfn(p, a), b) == lay.pte_advance_pfn(p, a + b), ctx
            assert lay.pte_pfn(lay.pte_advance_pfn(p, a + b)) == pfn + a + b, ctx


# ============================================================================================
# Kernel versions
# ============================================================================================


def test_kernel_versions_and_forms():
    assert ref.KERNEL_VERSIONS == (
        "seed", "6.8", "6.9", "6.10", "6.11", "6.12", "6.13", "6.14", "6.15", "6.16",
        "6.17", "6.18", "6.19", "7.0",
    )
    forms = {k: ref.fpb_form(k) for k in ref.KERNEL_VERSIONS}
    assert forms == {
        "seed": "seed", "6.8": None, "6.9": "v6.9",
        "6.10": "v6.10", "6.11": "v6.10", "6.12": "v6.10", "6.13": "v6.10", "6.14": "v6.10",
        "6.15": "v6.15", "6.16": "v6.15",
        "6.17": "v6.17", "6.18": "v6.17", "6.19": "v6.17", "7.0": "v6.17",
    }


@pytest.mark.parametrize(
    "kernel, hint",
    [
        ("6.18.44", "'6.18'"),
        ("6.12.30", "stable"),
        ("5.10", "out of range"),
        ("7.1", "out of range"),
        ("v6.9", "'6.9'"),
        ("", "not a kernel version"),
        ("linux", "not a kernel version"),
        (6.9, "string"),
        (None, "string"),
    ],
)
def test_fpb_form_rejects_with_a_helpful_message(kernel, hint):
    with pytest.raises(ValueError, match=hint):
        ref.fpb_form(kernel)


# ============================================================================================
# folio_pte_batch: hand-worked cases
# ============================================================================================


def test_seed_stops_at_a_physically_adjacent_next_folio():
    lay = ref.layout("x86-64")
    # Folio A = pfns 0x100..0x103, folio B = 0x104..0x107 right after it; all mapped in order.
    T = run(lay, 0x100, 8)
    b = ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "seed")
    # T[4] is the "correct next" PTE but maps pfn 0x104 == folio end: the == test stops there.
    assert b == ref.Batch(4, T[0], False, None, None)
    for kernel in ("6.9", "6.12", "6.15", "6.17"):
        assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, kernel).nr == 4
    # Starting in the middle of the folio.
    assert ref.folio_pte_batch(T, 2, 6, 0x100, 4, lay, "seed").nr == 2


def test_v6_9_greater_equal_end_test_with_a_contpte_block_past_the_folio_end():
    lay = ref.layout("arm64-4k")
    # 32 entries in two contpte blocks of 16, pfns 0x1000..0x101F; the folio is only the
    # 8 pages 0x1000..0x1007 (the table may say anything: the kernel would not fold it).
    T = run(lay, 0x1000, 32, cont=True)
    # start 4: hint = 16 - 4 = 12, so the first step jumps to entry 16 (pfn 0x1010).
    # The >= test sees 0x1010 >= 0x1008 and stops; nr = min(12, 28) = 12, reaching past the
    # folio end. An == test would not have stopped at 0x1010.
    b = ref.folio_pte_batch(T, 4, 28, 0x1000, 8, lay, "6.9")
    assert b == ref.Batch(12, T[4], False, None, None)
    assert ref.folio_pte_batch(T, 4, 28, 0x1000, 8, lay, "6.14") == ref.Batch(12, T[4], False, False, False)
    # The hint can overshoot max_nr: the result is clamped.
    assert ref.folio_pte_batch(T, 4, 3, 0x1000, 8, lay, "6.9").nr == 3
    # seed steps one entry at a time and stops at pfn 0x1008 == end.
    assert ref.folio_pte_batch(T, 4, 28, 0x1000, 8, lay, "seed").nr == 4
    # v6.15+: max_nr clamped up front to 0x1008 - 0x1004 = 4; min(12, 4) = 4.
    assert ref.folio_pte_batch(T, 4, 28, 0x1000, 8, lay, "6.15").nr == 4
    assert ref.folio_pte_batch(T, 4, 28, 0x1000, 8, lay, "7.0").nr == 4
    # With a 32-page folio, v6.9 covers both blocks in two reads.
    assert ref.folio_pte_batch(T, 0, 32, 0x1000, 32, lay, "6.9").nr == 32
    # first_vpn shifts the block alignment: with first_vpn = 8, entry 4 is index 12 of its block.
    assert ref.folio_pte_batch(T, 4, 28, 0x1000, 8, lay, "6.9", first_vpn=8).nr == 4


def test_arm64_ptep_get_gathers_young_and_dirty_of_the_block():
    lay = ref.layout("arm64-4k")
    T = run(lay, 0x2000, 16, cont=True)
    T[5] = lay.mk_pte(0x2005, cont=True, write=True, dirty=True, young=True)
    T[5] &= ~(1 << 55)  # hardware dirty only (WRITE, RDONLY clear)
    b = ref.folio_pte_batch(T, 0, 16, 0x2000, 16, lay, "6.12")
    # ptep_get(0) = pte_mkyoung(pte_mkdirty(T[0])): DIRTY (1<<55) and AF (0x400) OR-ed in.
    assert b.pte == T[0] | (1 << 55) | 0x400
    # The hint jumps over the whole block: nothing else is read.
    assert b == ref.Batch(16, T[0] | (1 << 55) | 0x400, False, False, False)
    # seed reads raw entries one by one; with no flags dirty is compared and T[5] differs.
    assert ref.folio_pte_batch(T, 0, 16, 0x2000, 16, lay, "seed") == ref.Batch(5, T[0], False, None, None)
    # A block cut by the table start: only entries inside T are gathered.
    assert ref.folio_pte_batch(T[4:], 0, 12, 0x2000, 16, lay, "6.9", first_vpn=4).pte == T[4] | (1 << 55) | 0x400
    assert ref.folio_pte_batch(T[6:], 0, 10, 0x2000, 16, lay, "6.9", first_vpn=6).pte == T[6]


def test_xenpv_overrun_by_one_none_pte_before_6_15():
    lay = ref.layout("x86-64-xenpv", ballooned_pfns={0x104})
    T = run(lay, 0x100, 4) + [0, 0, 0, 0]
    # v6.9 / v6.10: after accepting T[3], expected = advance(norm(T[3]), 1) targets the
    # ballooned pfn 0x104 and becomes 0. T[4] = 0 normalises to 0: equal; its pfn 0 is not
    # >= 0x104, so it is accepted. expected = advance(0, 1) = 0x1000 != T[5]: stop at 5.
    assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "6.9") == ref.Batch(5, T[0], False, None, None)
    assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "6.10") == ref.Batch(5, T[0], False, False, False)
    assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "6.14").nr == 5
    # seed has the same flaw (pfn 0 != 0x104).
    assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "seed").nr == 5
    # v6.15+: max_nr is clamped to the 4 pages left in the folio; no overrun.
    assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "6.15") == ref.Batch(4, T[0], False, False, False)
    assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, lay, "6.17") == ref.Batch(4, T[0], None, None, None)
    # Without ballooning the expected PTE is a real PTE for 0x104 and differs from 0.
    plain = ref.layout("x86-64")
    for kernel in BATCHING_KERNELS:
        assert ref.folio_pte_batch(T, 0, 8, 0x100, 4, plain, kernel).nr == 4


def test_any_writable_does_not_take_the_first_pte():
    lay = ref.layout("x86-64")
    T = [lay.mk_pte(0x100, write=True)] + run(lay, 0x101, 3)
    for kernel in ("seed", "6.9", "6.12", "6.15"):
        b = ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, kernel)
        assert (b.nr, b.any_writable) == (4, False)
    # v6.17: MERGE_WRITE does not change an already writable first PTE; nothing reported.
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17", FPB_MERGE_WRITE) == ref.Batch(4, T[0], None, None, None)
    # A later writable entry is reported.
    T2 = run(lay, 0x100, 2) + [lay.mk_pte(0x102, write=True), lay.mk_pte(0x103)]
    assert ref.folio_pte_batch(T2, 0, 4, 0x100, 4, lay, "6.9").any_writable is True
    # ...but not when it ends the batch (here the table ends the batch before it).
    assert ref.folio_pte_batch(T2, 0, 2, 0x100, 4, lay, "6.9").any_writable is False


def test_v6_17_merges_into_the_first_pte():
    lay = ref.layout("x86-64")
    T = [
        lay.mk_pte(0x100),  # 0x8000000000100005
        lay.mk_pte(0x101, write=True),
        lay.mk_pte(0x102, young=True),
        lay.mk_pte(0x103, dirty=True),
    ]
    # No RESPECT_DIRTY: the dirty entry does not end the batch.
    both = FPB_MERGE_WRITE | FPB_MERGE_YOUNG_DIRTY
    b = ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17", both)
    # mkwrite: | RW 0x2; mkyoung: | A 0x20; mkdirty: | D 0x40 | SOFT_DIRTY 0x800 (RW set).
    assert b == ref.Batch(4, 0x8000_0000_0010_0867, None, None, None)
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.19", FPB_MERGE_WRITE).pte == 0x8000_0000_0010_0007
    # mkyoung then mkdirty on the read-only first PTE: D lands in SAVED_DIRTY.
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "7.0", FPB_MERGE_YOUNG_DIRTY).pte == 0x8400_0000_0010_0825
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17").pte == T[0]
    # The same table under 6.12 reports the out-parameters instead.
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12", FPB_IGNORE_DIRTY) == ref.Batch(4, T[0], True, True, True)
    # Without FPB_IGNORE_DIRTY, the dirty T[3] ends the batch there.
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12") == ref.Batch(3, T[0], True, True, False)
    # Only entries read after the first and accepted count: start at 3, nothing read.
    assert ref.folio_pte_batch(T, 3, 1, 0x100, 4, lay, "6.17", both) == ref.Batch(1, T[3], None, None, None)


def test_respect_write_splits_a_batch():
    lay = ref.layout("x86-64")
    T = run(lay, 0x100, 2, write=True) + run(lay, 0x102, 2)  # writable, writable, ro, ro
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17", FPB_RESPECT_WRITE).nr == 2
    assert ref.folio_pte_batch(T, 2, 2, 0x100, 4, lay, "6.17", FPB_RESPECT_WRITE).nr == 2
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17").nr == 4
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17", FPB_MERGE_WRITE).nr == 4


ALL_FLAG_SETS = {
    "ignore": [FpbFlags("ignore", 0), FPB_IGNORE_DIRTY, FPB_IGNORE_SOFT_DIRTY, FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY],
    "respect": [FpbFlags("respect", bits) for bits in range(32)],
}


@pytest.mark.parametrize("kernel", list(FORM_KERNELS.values()))
@pytest.mark.parametrize("name", ["x86-64", "arm64-4k", "arm64-64k"])
def test_uffd_wp_always_ends_a_batch(kernel, name):
    lay = ref.layout(name)
    T = run(lay, 0x40, 2) + [lay.mk_pte(0x42, uffd_wp=True)] + [lay.mk_pte(0x43)]
    family = "respect" if kernel == "6.17" else "ignore"
    for flags in ALL_FLAG_SETS[family]:
        assert ref.folio_pte_batch(T, 0, 4, 0x40, 4, lay, kernel, flags).nr == 2
        assert ref.folio_pte_batch(T, 2, 2, 0x40, 4, lay, kernel, flags).nr == 1


@pytest.mark.parametrize("kernel", list(FORM_KERNELS.values()))
@pytest.mark.parametrize("name", ref.LAYOUT_NAMES)
def test_young_never_ends_a_batch(kernel, name):
    lay = ref.layout(name)
    T = [lay.mk_pte(0x40, young=True), lay.mk_pte(0x41), lay.mk_pte(0x42, young=True), lay.mk_pte(0x43)]
    family = "respect" if kernel == "6.17" else "ignore"
    for flags in ALL_FLAG_SETS[family]:
        assert ref.folio_pte_batch(T, 0, 4, 0x40, 4, lay, kernel, flags).nr == 4
        assert ref.folio_pte_batch(T, 1, 3, 0x40, 4, lay, kernel, flags).nr == 3


def test_dirty_and_soft_dirty_end_a_batch_only_when_respected():
    lay = ref.layout("x86-64")
    T = [lay.mk_pte(0x100), lay.mk_pte(0x101, dirty=True), lay.mk_pte(0x102, soft_dirty=True), lay.mk_pte(0x103)]
    nr = lambda kernel, flags: ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, kernel, flags).nr
    assert nr("6.12", 0) == 1
    assert nr("6.12", FPB_IGNORE_DIRTY) == 2
    assert nr("6.12", FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY) == 4
    assert nr("6.17", 0) == 4
    assert nr("6.17", FPB_RESPECT_DIRTY) == 1
    assert nr("6.17", FPB_RESPECT_SOFT_DIRTY) == 2


def test_protnone_folio_batches_on_x86():
    lay = ref.layout("x86-64")
    T = run(lay, 0x100, 4, prot_none=True)
    for kernel in BATCHING_KERNELS:
        assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, kernel).nr == 4


class _FakeArray:
    """Stands in for a numpy array: has ``ndim``, iterates, and its items only have __index__."""

    class _Item:
        def __init__(self, value):
            self.value = value

        def __index__(self):
            return self.value

    def __init__(self, values, ndim=1):
        self.values = [self._Item(v) for v in values]
        self.ndim = ndim

    def __iter__(self):
        return iter(self.values)

    def __len__(self):
        return len(self.values)


def test_accepts_any_sequence_of_integers():
    lay = ref.layout("riscv64")
    T = run(lay, 0x10, 4)
    assert ref.folio_pte_batch(tuple(T), 0, 4, 0x10, 4, lay, "6.15").nr == 4
    assert ref.folio_pte_batch(_FakeArray(T), 0, 4, 0x10, 4, lay, "6.15").nr == 4
    assert ref.batch_lengths(_FakeArray(T), lay, "6.15", _FakeArray([0x10]), _FakeArray([4]),
                             pfn_to_folio=_FakeArray([-1] * 0x10 + [0] * 4)) == [4]
    with pytest.raises(ValueError, match="one-dimensional"):
        ref.folio_pte_batch(_FakeArray(T, ndim=2), 0, 4, 0x10, 4, lay, "6.15")
    with pytest.raises(TypeError):
        ref.folio_pte_batch([float(T[0])] + T[1:], 0, 4, 0x10, 4, lay, "6.15")


# ============================================================================================
# fork_flags
# ============================================================================================


def test_fork_flags():
    for kernel in ("seed", "6.9", "6.12", "6.16"):
        assert ref.fork_flags(kernel) == FPB_IGNORE_SOFT_DIRTY
        assert ref.fork_flags(kernel, shared=True) == FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY
        assert ref.fork_flags(kernel, soft_dirty_tracking=True) == FpbFlags("ignore", 0)
        assert ref.fork_flags(kernel, shared=True, soft_dirty_tracking=True) == FPB_IGNORE_DIRTY
    for kernel in ("6.17", "6.18", "6.19", "7.0"):
        assert ref.fork_flags(kernel) == FPB_MERGE_WRITE | FPB_RESPECT_DIRTY
        assert ref.fork_flags(kernel, shared=True) == FPB_MERGE_WRITE
        assert ref.fork_flags(kernel, soft_dirty_tracking=True) == (
            FPB_MERGE_WRITE | FPB_RESPECT_DIRTY | FPB_RESPECT_SOFT_DIRTY
        )
    with pytest.raises(ValueError, match="6.8"):
        ref.fork_flags("6.8")
    with pytest.raises(ValueError):
        ref.fork_flags("6.18.44")


# ============================================================================================
# batch_lengths
# ============================================================================================


def test_batch_lengths_pmd_boundary_splits_a_folio():
    lay = ref.layout("x86-64")
    T = run(lay, 0x100, 4)
    # T[0] is entry 510 of its table: two entries to the table end, then a new table.
    for kernel in BATCHING_KERNELS:
        assert ref.batch_lengths(T, lay, kernel, [0x100], [4], first_vpn=510) == [2, 2]
        assert ref.batch_lengths(T, lay, kernel, [0x100], [4], first_vpn=511) == [1, 3]
        assert ref.batch_lengths(T, lay, kernel, [0x100], [4]) == [4]
    # s390: 256 entries per table.
    s = ref.layout("s390x")
    assert ref.batch_lengths(run(s, 0x100, 4), s, "6.12", [0x100], [4], first_vpn=255) == [1, 3]
    assert ref.batch_lengths(run(s, 0x100, 4), s, "6.12", [0x100], [4], first_vpn=512) == [4]


def test_batch_lengths_holes_small_folios_and_special():
    lay = ref.layout("x86-64")
    full = run(lay, 0x100, 4)
    holes = [full[0], 0, full[2], full[3]]
    assert ref.batch_lengths(holes, lay, "6.12", [0x100], [4]) == [1, 1, 2]
    # A PTE whose pfn is in no folio.
    assert ref.batch_lengths(full, lay, "6.12", [0x102], [2]) == [1, 1, 2]
    # Small folios.
    assert ref.batch_lengths(full, lay, "6.17", [0x100, 0x101, 0x102, 0x103], [1, 1, 1, 1]) == [1, 1, 1, 1]
    # Two adjacent large folios.
    assert ref.batch_lengths(full, lay, "6.17", [0x100, 0x102], [2, 2]) == [2, 2]
    # A special PTE has no folio.
    special = [lay.mk_pte(0x100, special=True)] + full[1:]
    assert ref.batch_lengths(special, lay, "6.12", [0x100], [4]) == [1, 3]
    # Non-present but not none (a swap-like value): 1.
    swapish = [full[0], 0x8_0000_0002, full[2], full[3]]
    assert ref.batch_lengths(swapish, lay, "6.9", [0x100], [4]) == [1, 1, 2]
    assert ref.batch_lengths([], lay, "6.12", [0x100], [4]) == []


def test_batch_lengths_6_8_is_all_ones():
    lay = ref.layout("arm64-4k")
    T = run(lay, 0x1000, 32, cont=True)
    assert ref.batch_lengths(T, lay, "6.8", [0x1000], [32]) == [1] * 32
    assert ref.batch_lengths(T, lay, "6.8", [0x1000], [32], flags=FPB_RESPECT_WRITE) == [1] * 32
    assert ref.batch_lengths(T, lay, "6.9", [0x1000], [32]) == [32]
    assert ref.batch_lengths(T, lay, "seed", [0x1000], [32]) == [32]


def test_batch_lengths_fork_flags_follow_shared_and_soft_dirty():
    lay = ref.layout("x86-64")
    T = [lay.mk_pte(0x100), lay.mk_pte(0x101, dirty=True), lay.mk_pte(0x102, soft_dirty=True), lay.mk_pte(0x103)]
    for kernel in ("seed", "6.9", "6.12", "6.15", "6.17", "7.0"):
        # Private: dirty compared (T[1] stands alone), soft-dirty ignored (T[2], T[3] batch).
        assert ref.batch_lengths(T, lay, kernel, [0x100], [4]) == [1, 1, 2], kernel
        assert ref.batch_lengths(T, lay, kernel, [0x100], [4], shared=True) == [4], kernel
        # Shared with soft-dirty tracking: dirty ignored, soft-dirty compared.
        assert ref.batch_lengths(T, lay, kernel, [0x100], [4], shared=True, soft_dirty_tracking=True) == [2, 1, 1]
    # flags= replaces the fork flags.
    assert ref.batch_lengths(T, lay, "6.17", [0x100], [4], flags=0) == [4]
    assert ref.batch_lengths(T, lay, "6.12", [0x100], [4], flags=FPB_IGNORE_DIRTY | FPB_IGNORE_SOFT_DIRTY) == [4]


def test_batch_lengths_with_pfn_to_folio():
    lay = ref.layout("x86-64")
    T = run(lay, 0x10, 8)
    p2f = [-1] * 0x10 + [0] * 4 + [1] * 4
    assert ref.batch_lengths(T, lay, "6.12", [0x10, 0x14], [4, 4], pfn_to_folio=p2f) == [4, 4]
    assert ref.batch_lengths(T, lay, "6.12", [0x10, 0x14], [4, 4]) == [4, 4]
    # The map must agree with the folio arrays: a folio it leaves out, cuts short or punches
    # a hole in would be copied page by page.
    p2f_hole = p2f[:]
    p2f_hole[0x10] = -1
    for bad in (p2f[:0x14], p2f[:0x16], p2f_hole):
        with pytest.raises(ValueError, match="pfn_to_folio"):
            ref.batch_lengths(T, lay, "6.12", [0x10, 0x14], [4, 4], pfn_to_folio=bad)


def test_batch_lengths_xenpv_overrun_is_visible():
    lay = ref.layout("x86-64-xenpv", ballooned_pfns=[0x104])
    T = run(lay, 0x100, 4) + [0, 0]
    assert ref.batch_lengths(T, lay, "6.12", [0x100], [4]) == [5, 1]
    assert ref.batch_lengths(T, lay, "6.15", [0x100], [4]) == [4, 1, 1]


# ============================================================================================
# Bad inputs
# ============================================================================================


def test_layout_errors():
    with pytest.raises(ValueError, match="x86-64-xenpv"):
        ref.layout("x86")
    with pytest.raises(TypeError):
        ref.layout("x86-64", ballooned_pfns=[1])
    with pytest.raises(TypeError):
        ref.layout("arm64-4k", ballooned_pfns=[])
    assert ref.layout("x86-64-xenpv").ballooned_pfns == frozenset()
    with pytest.raises(ValueError):
        ref.layout("x86-64-xenpv", ballooned_pfns=[-1])


@pytest.mark.parametrize("name", ref.LAYOUT_NAMES)
def test_accessors_reject_values_outside_u64(name):
    lay = ref.layout(name)
    for bad in (-1, 1 << 64):
        for accessor in (lay.pte_pfn, lay.pte_present, lay.pte_protnone, lay.pte_none, lay.pte_write,
                         lay.pte_dirty, lay.pte_young, lay.pte_soft_dirty, lay.pte_uffd_wp,
                         lay.pte_special, lay.pte_exec, lay.pte_cont, lay.pte_wrprotect,
                         lay.pte_mkwrite, lay.pte_mkold, lay.pte_mkyoung, lay.pte_mkclean,
                         lay.pte_mkdirty, lay.pte_clear_soft_dirty, lay.pte_mksoft_dirty):
            with pytest.raises(ValueError):
                accessor(bad)
        with pytest.raises(ValueError):
            lay.pte_advance_pfn(bad, 1)
        with pytest.raises(ValueError):
            lay.pte_advance_pfn(0, bad)
        with pytest.raises(ValueError):
            lay.pte_batch_hint(bad, 0)
        with pytest.raises(ValueError):
            lay.pte_batch_hint(0, bad)
        with pytest.raises(ValueError):
            lay.mk_pte(bad)
    assert lay.pte_pfn(MASK64) >= 0  # the extremes themselves are accepted
    with pytest.raises(TypeError):
        lay.pte_pfn(1.0)


@pytest.mark.parametrize("name", ref.LAYOUT_NAMES)
def test_mk_pte_errors(name):
    lay = ref.layout(name)
    lay.mk_pte(lay.max_pfn)
    with pytest.raises(ValueError, match="max_pfn"):
        lay.mk_pte(lay.max_pfn + 1)
    with pytest.raises(ValueError):
        lay.mk_pte(1, prot_none=True, write=True)
    with pytest.raises(ValueError):
        lay.mk_pte(1, prot_none=True, exec=True)
    for flag, has in (("soft_dirty", lay.has_soft_dirty), ("uffd_wp", lay.has_uffd_wp), ("cont", lay.has_contpte)):
        if has:
            lay.mk_pte(1, **{flag: True})
        else:
            with pytest.raises(ValueError):
                lay.mk_pte(1, **{flag: True})


def test_folio_pte_batch_errors():
    lay = ref.layout("x86-64")
    T = run(lay, 0x100, 4)
    ok = ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12")
    assert ok.nr == 4
    with pytest.raises(ValueError, match="6.9"):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.8")
    with pytest.raises(ValueError, match="'6.18'"):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.18.44")
    with pytest.raises(ValueError, match="out of range"):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "5.10")
    # Flags of the wrong family; a plain non-zero int.
    with pytest.raises(ValueError):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12", FPB_RESPECT_DIRTY)
    with pytest.raises(ValueError):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17", FPB_IGNORE_DIRTY)
    with pytest.raises(TypeError):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12", 1)
    with pytest.raises(TypeError):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12", "FPB_IGNORE_DIRTY")
    assert ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.17", None) == ref.Batch(4, T[0], None, None, None)
    with pytest.raises(TypeError):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, "x86-64", "6.12")
    # Preconditions.
    with pytest.raises(ValueError, match="start=4"):
        ref.folio_pte_batch(T, 4, 1, 0x100, 4, lay, "6.12")
    with pytest.raises(ValueError, match="start must be a non-negative integer, not -1"):
        ref.folio_pte_batch(T, -1, 1, 0x100, 4, lay, "6.12")
    with pytest.raises(ValueError, match="max_nr=0"):
        ref.folio_pte_batch(T, 0, 0, 0x100, 4, lay, "6.12")
    with pytest.raises(ValueError, match="max_nr=4"):
        ref.folio_pte_batch(T, 1, 4, 0x100, 4, lay, "6.12")
    with pytest.raises(ValueError, match="folio_nr_pages=1"):
        ref.folio_pte_batch(T, 0, 4, 0x100, 1, lay, "6.12")
    with pytest.raises(ValueError, match="not present"):
        ref.folio_pte_batch([0] + T[1:], 0, 4, 0x100, 4, lay, "6.12")
    with pytest.raises(ValueError, match="outside the folio"):
        ref.folio_pte_batch(T, 0, 4, 0x104, 4, lay, "6.12")
    # Folios are naturally aligned powers of two.
    with pytest.raises(ValueError, match="naturally aligned"):
        ref.folio_pte_batch(T, 0, 4, 0xFE, 4, lay, "6.12")
    with pytest.raises(ValueError, match="power of two"):
        ref.folio_pte_batch(T, 0, 3, 0x100, 3, lay, "6.12")
    with pytest.raises(ValueError, match="outside the folio"):
        ref.folio_pte_batch(T, 0, 4, 0xFC, 4, lay, "6.12")
    with pytest.raises(ValueError, match=r"ptes\[1\]"):
        ref.folio_pte_batch([T[0], 1 << 64], 0, 2, 0x100, 4, lay, "6.12")
    with pytest.raises(ValueError):
        ref.folio_pte_batch(T, 0, 4, 0x100, 4, lay, "6.12", first_vpn=-1)


def test_batch_lengths_errors():
    lay = ref.layout("x86-64")
    T = run(lay, 0x100, 4)
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100, 0x104], [4])  # length mismatch
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x104, 0x100], [4, 4])  # not sorted
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100, 0x102], [4, 4])  # overlapping
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100], [0])  # empty folio
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100], [4], pfn_to_folio=[0] * 0x101)  # pfn 0 not in folio 0
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100], [4], pfn_to_folio=[-1] * 0x100 + [1])  # no folio 1
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100], [4], pfn_to_folio=[-2])
    a = ref.layout("arm64-4k")
    with pytest.raises(ValueError, match="soft-dirty"):
        ref.batch_lengths(run(a, 0x100, 4), a, "6.12", [0x100], [4], soft_dirty_tracking=True)
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "6.12", [0x100], [4], flags=FPB_RESPECT_DIRTY)
    with pytest.raises(TypeError):
        ref.batch_lengths(T, lay, "6.12", [0x100], [4], flags=3)
    with pytest.raises(ValueError):
        ref.batch_lengths(T, lay, "5.4", [0x100], [4])

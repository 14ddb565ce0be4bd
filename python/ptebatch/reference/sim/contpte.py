"""arm64 transparent contiguous PTEs for user mappings (rust/src/contpte.rs;
arch/arm64/mm/contpte.c, v6.9+): which writes fold a naturally aligned block of ``CONT_PTES``
entries into one TLB entry (PTE_CONT) and which unfold it, and the repaint both do, which gives
every entry of the block the young/dirty bits of all of them.

The ``Cont*`` functions work on one VMA's page table (``t``, entry 0 mapping virtual page
``first_vpn``). A block is never folded across a VMA's edge; callers unfold a block before a
VMA is split inside it.
"""

from __future__ import annotations

from .kernel import KernelProfile
from .stats import Stats

MASK64 = (1 << 64) - 1


class Cont:
    """A VMA's page table as contpte sees it (``Cont`` in rust/src/contpte.rs)."""

    __slots__ = ("t", "first_vpn", "n")

    def __init__(self, t: list[int], first_vpn: int, n: int) -> None:
        self.t = t
        self.first_vpn = first_vpn
        self.n = n  # CONT_PTES

    def block(self, i: int) -> int | None:
        """First entry of the block holding entry ``i``, if the whole block lies in the table."""
        off = ((self.first_vpn + i) & MASK64) % self.n
        b = i - off
        if b < 0:
            return None
        return b if b + self.n <= len(self.t) else None

    def convert(self, l, b: int, cont: bool, st: Stats) -> None:
        """contpte_convert(): repaint the block at ``b`` with or without PTE_CONT, every entry
        taking the young and dirty bits of all of them."""
        t, n = self.t, self.n
        base = l.clear_cont_bit(t[b])
        for e in t[b:b + n]:
            if l.pte_dirty(e):
                base = l.pte_mkdirty(base)
            if l.pte_young(e):
                base = l.pte_mkyoung(base)
        for k in range(n):
            v = l.pte_advance_pfn(base, k)
            t[b + k] = l.set_cont_bit(v) if cont else v
        st.pte_writes += n
        st.tlb_flush_ranges += 1
        st.tlb_flush_pages += n

    def unfold(self, l, i: int, st: Stats) -> None:
        """contpte_try_unfold(): if entry ``i`` is a valid contpte entry, unfold its block."""
        if l.pte_valid_cont(self.t[i]):
            b = self.block(i)
            if b is not None:
                self.convert(l, b, False, st)

    def unfold_partial(self, l, i: int, nr: int, st: Stats) -> None:
        """contpte_try_unfold_partial(): unfold the blocks [i, i + nr) covers only in part."""
        if nr == 0:
            return
        first = self.first_vpn
        if (first + i) % self.n != 0 or nr < self.n:
            self.unfold(l, i, st)
        if (first + i + nr) % self.n != 0:
            self.unfold(l, i + nr - 1, st)

    def try_fold(self, l, i: int, folio_of, st: Stats) -> None:
        """contpte_try_fold(): after entry ``i`` was written, fold its block when ``i`` is the
        block's last entry, the block maps one aligned run of ``n`` pages of one large folio and
        all entries agree but for A/D."""
        n, t = self.n, self.t
        v = t[i]
        if (self.first_vpn + i) % n != n - 1 or not l.pte_valid(v) or l.pte_cont(v) \
                or l.pte_special(v):
            return
        pfn = l.pte_pfn(v)
        if (pfn + 1) % n != 0 or i + 1 < n:
            return
        b = i + 1 - n
        got = folio_of(pfn)
        if got is None:
            return
        head, nr = got
        folio_va = (self.first_vpn + i - (pfn - head)) & MASK64  # wrapping_sub
        block_va = self.first_vpn + b
        if nr < n or folio_va > block_va or folio_va + nr < block_va + n:
            return

        def norm(x: int) -> int:
            return l.pte_mkold(l.pte_mkclean(x))

        base = norm(t[b])
        if not l.pte_valid(t[b]) or l.pte_pfn(base) != pfn + 1 - n:
            return
        if all(norm(t[b + k]) == l.pte_advance_pfn(base, k) for k in range(1, n)):
            self.convert(l, b, True, st)

    def set_ptes(self, l, i: int, pte: int, nr: int) -> None:
        """set_ptes() of nr > 1 entries of a not-present range (contpte_set_ptes()): each whole
        block, aligned in virtual and physical address, gets PTE_CONT."""
        n = self.n
        pte = l.clear_cont_bit(pte)
        j = i
        while j < i + nr:
            vpn = self.first_vpn + j
            nxt = min(i + nr, j + n - vpn % n)
            v0 = l.pte_advance_pfn(pte, j - i)
            full = nxt - j == n and vpn % n == 0 and l.pte_pfn(v0) % n == 0
            for k in range(j, nxt):
                v = l.pte_advance_pfn(pte, k - i)
                self.t[k] = l.set_cont_bit(v) if full else v
            j = nxt

    def set_pte(self, l, i: int, pte: int, folio_of, st: Stats) -> None:
        """set_ptes() of one entry (set_pte_at()): unfold what it overwrites, write, try to fold."""
        self.unfold(l, i, st)
        self.t[i] = l.clear_cont_bit(pte)
        self.try_fold(l, i, folio_of, st)


def folio_of(mem, pfn: int) -> tuple[int, int] | None:
    """The folio holding ``pfn``: its first pfn and size."""
    if pfn >= mem.nr_pages() or mem.is_free(pfn):
        return None
    h = mem.folio_head(pfn)
    return h, 1 << mem.folio_order(h)


def cont_ptes(l, p: KernelProfile) -> int | None:
    """CONT_PTES when the kernel folds user contpte blocks on this layout (arm64, v6.9+)."""
    return l.cont_ptes if (p.contpte and l.has_contpte) else None


def _cont(st, l, p: KernelProfile, vma) -> Cont | None:
    n = cont_ptes(l, p)
    return None if n is None else Cont(vma.ptes, vma.start, n)


def _table_ptep_get(l, contpte: bool, ptes: list[int], first_vpn: int, i: int) -> int:
    """Table::ptep_get() — rust/src/batch.rs: on a valid contpte entry, young and dirty of its
    block (the block entries inside this table) OR-ed in."""
    v = ptes[i]
    if not (contpte and l.pte_valid_cont(v)):
        return v
    n = l.cont_ptes
    m = ((first_vpn + i) & MASK64) & (n - 1)
    start = i - min(m, i)
    end = max(min(i - m + n, len(ptes)), i + 1)
    out = v
    for e in ptes[start:end]:
        if l.pte_dirty(e):
            out = l.pte_mkdirty(out)
        if l.pte_young(e):
            out = l.pte_mkyoung(out)
    return out


def ptep_get(st, l, p: KernelProfile, vma, i: int) -> int:
    """ptep_get(): on a contpte block, young and dirty of the whole block."""
    return _table_ptep_get(l, cont_ptes(l, p) is not None, vma.ptes, vma.start, i)


def set_pte(st, l, p: KernelProfile, vma, i: int, pte: int) -> None:
    """set_pte_at() / set_ptes(.., 1) of entry ``i`` of ``vma``."""
    st.op.pte_writes += 1
    c = _cont(st, l, p, vma)
    if c is None:
        vma.ptes[i] = pte
        return
    mem = st.mem
    c.set_pte(l, i, pte, lambda pfn: folio_of(mem, pfn), st.op)


def set_ptes(st, l, p: KernelProfile, vma, i: int, pte: int, nr: int) -> None:
    """set_ptes() of ``nr`` entries from ``i`` (pfn advancing by one)."""
    if nr == 1:
        set_pte(st, l, p, vma, i, pte)
        return
    st.op.pte_writes += nr
    c = _cont(st, l, p, vma)
    if c is not None:
        c.set_ptes(l, i, pte, nr)
    else:
        for j in range(nr):
            vma.ptes[i + j] = l.pte_advance_pfn(pte, j)


def unfold(st, l, p: KernelProfile, vma, i: int) -> None:
    """Unfolds the contpte block holding entry ``i``, if any (contpte_try_unfold())."""
    c = _cont(st, l, p, vma)
    if c is not None:
        c.unfold(l, i, st.op)


def unfold_partial(st, l, p: KernelProfile, vma, i: int, nr: int) -> None:
    """Unfolds the blocks [i, i + nr) covers in part; nr == 1 unfolds the entry's block."""
    c = _cont(st, l, p, vma)
    if c is not None:
        if nr == 1:
            c.unfold(l, i, st.op)
        else:
            c.unfold_partial(l, i, nr, st.op)


def try_fold(st, l, p: KernelProfile, vma, i: int) -> None:
    """contpte_try_fold() after entry ``i`` was written by something other than set_pte."""
    c = _cont(st, l, p, vma)
    if c is not None:
        mem = st.mem
        c.try_fold(l, i, lambda pfn: folio_of(mem, pfn), st.op)


def unfold_at_split(st, l, p: KernelProfile, k: int, vpn: int) -> None:
    """Before a VMA is split at ``vpn``, the block the split would cut is unfolded."""
    n = cont_ptes(l, p)
    if n is None:
        return
    v = st.mms[k].find_vma(vpn)
    if v is None:
        return
    if vpn % n != 0:
        vma = st.mms[k].vmas[v]
        unfold(st, l, p, vma, vpn - vma.start)

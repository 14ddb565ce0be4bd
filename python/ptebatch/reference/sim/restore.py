"""Building a simulation from arrays a user prepared (rust/src/restore.rs): folios placed at
given pfns, page tables copied in after every entry is checked against its VMA and the placed
folios, then every counter recomputed from the page tables. Not a kernel path; the rules are
listed in docs/from-arrays.md."""

from __future__ import annotations

from typing import Any

from .errors import value_error
from .kernel import KernelProfile
from .memory import (
    GUP_PIN_COUNTING_BIAS,
    MM_ID_DUMMY,
    PG_ANON,
    PG_ANON_EXCLUSIVE,
    PG_DIRTY,
    PG_FILE,
    PG_MAYBE_SHARED,
    PG_PARTIALLY_MAPPED,
    PG_SWAPBACKED,
)
from .mm import ANON, NOT_CACHED, Pin, Prot, Vma, mm_counter
from .state import State

KIND_ANON, KIND_FILE, KIND_SHMEM = 0, 1, 2
MAX_VMA_PAGES = 1 << 31


def place_folio(st: State, head: int, order: int, file: tuple[int, int] | None, dirty: bool) -> None:
    """A folio of ``order`` at free pfn ``head``: anonymous, or in ``file`` = (file id, first index)."""
    if order > st.pmd_order:
        raise value_error(f"folio order {order} is above the PMD order {st.pmd_order}")
    n = 1 << order
    if head % n != 0 or head + n > st.mem.nr_pages():
        raise value_error(f"folio {head:#x} of order {order} is unaligned or beyond memory")
    if file is not None:
        fid, index = file
        if fid >= len(st.files):
            raise value_error(f"no file {fid}")
        f = st.files[fid]
        # A shmem object's cache reaches the next PMD boundary: a huge folio may pass i_size.
        if index + n > len(f.cache) or any(c != NOT_CACHED for c in f.cache[index:index + n]):
            raise value_error(f"file {fid} pages from {index} ({n} of them) are beyond the file or cached")
    if not st.mem.alloc_at(head, order):
        raise value_error(f"pfns {head:#x}..{head + n:#x} are not free")
    if file is None:
        st.mem.set(head, PG_ANON | PG_SWAPBACKED)
    else:
        fid, index = file
        f = st.files[fid]
        st.mem.set(head, PG_FILE | (PG_SWAPBACKED if f.shmem else 0))
        for j in range(n):
            f.cache[index + j] = head + j
    if dirty:
        st.mem.set(head, PG_DIRTY)


def place_huge_pmd(st: State, l, k: int, v: int, base: int, e: int) -> None:
    """Places a huge PMD ``e`` (the layout's PTE encoding) at the PMD-aligned ``base`` of VMA
    ``v``, checked as a PMD fault would leave it (huge_memory.rs ``place_huge_pmd``)."""
    pfn = l.pte_pfn(e)
    vma = st.mms[k].vmas[v]
    n = st.ptrs_per_pte
    if base % n or base < vma.start or base + n > vma.end():
        raise value_error(f"a huge PMD at {base << st.page_shift:#x} must be PMD-aligned and lie "
                          "whole in a mapping")
    if not vma.is_anon():
        raise value_error("huge PMDs are modelled in private anonymous mappings only")
    s = base - vma.start
    if base in vma.pmds or not all(l.pte_none(x) for x in vma.ptes[s:s + n]):
        raise value_error(f"the PMD range at {base << st.page_shift:#x} is already mapped")
    if pfn != st.zero_pfn:
        ok = (pfn < st.mem.nr_pages() and not st.mem.is_free(pfn) and st.mem.folio_head(pfn) == pfn
              and st.mem.folio_order(pfn) == st.pmd_order and st.mem.test(pfn, PG_ANON))
        if not ok:
            raise value_error(f"pfn {pfn:#x} is not the first page of a placed PMD-sized "
                              "anonymous folio")
    vma.pmds[base] = e


def _place_folios(st: State, f: dict[str, Any]) -> None:
    n = len(f["pfn"])
    for name in ("order", "kind", "file", "index", "dirty", "partially_mapped", "maybe_shared",
                 "mm_ids", "mm_id_mapcounts"):
        if f.get(name) is None:
            continue
        want = 2 * n if name.startswith("mm_id") else n
        if len(f[name]) != want:
            raise value_error(f'folios["{name}"] has {len(f[name])} entries for {n} folios'
                              + ("" if want == n else " (two per folio)"))
    for i in range(n):
        head, order, kind = int(f["pfn"][i]), int(f["order"][i]), int(f["kind"][i])
        if kind == KIND_ANON:
            where = None
        elif kind in (KIND_FILE, KIND_SHMEM):
            fid, index = int(f["file"][i]), int(f["index"][i])
            if fid < len(st.files) and st.files[fid].shmem != (kind == KIND_SHMEM):
                is_, says = ("shmem", "file") if st.files[fid].shmem else ("file", "shmem")
                raise value_error(f'folios[{i}]: kind "{says}", but file {fid} is a {is_} object')
            if index % (1 << order):
                raise value_error(f"folios[{i}]: a page-cache folio of order {order} starts at file page "
                                  f"{index}, which is not a multiple of {1 << order}")
            where = (fid, index)
        else:
            raise value_error(f"folios[{i}]: unknown kind code {kind}")
        try:
            place_folio(st, head, order, where, bool(f["dirty"][i]))
        except ValueError as e:
            raise value_error(f"folios[{i}]: {e}") from None


def check_ptes(st: State, l, vma: Vma, ptes: list[int], pid: int) -> None:
    """Every entry none, or a present entry ``mk_pte`` makes, with the VMA's protection,
    mapping the zero page (private anonymous VMAs only), an anonymous page (private VMAs only)
    or the page-cache page of the VMA's file at that offset."""
    n = st.mem.nr_pages()
    file = None if vma.file is None else st.files[vma.file]
    for i, e in enumerate(ptes):
        if l.pte_none(e):
            continue
        at = f"pid {pid} address {(vma.start + i) << st.page_shift:#x}: PTE {e:#x}"
        if not l.pte_present(e):
            raise value_error(f"{at} is neither none nor present (the model has no swap or migration entries)")
        pfn, prot_none = l.pte_pfn(e), l.pte_protnone(e)
        # A PROT_NONE template may lack the no-execute bit (x86 PAGE_NONE).
        bits = dict(write=l.pte_write(e), dirty=l.pte_dirty(e), young=l.pte_young(e),
                    soft_dirty=l.pte_soft_dirty(e), uffd_wp=l.pte_uffd_wp(e),
                    exec=not prot_none and l.pte_exec(e), special=l.pte_special(e),
                    prot_none=prot_none, cont=l.pte_cont(e))
        try:
            same = l.mk_pte(pfn, **bits) == e
        except ValueError:
            same = False
        if not same:
            raise value_error(f"{at} is not an entry {l.name} makes (bits the model does not use)")
        if (bits["prot_none"] != vma.prot.none() or (not bits["prot_none"] and bits["exec"] != vma.prot.exec)
                or (bits["write"] and not vma.prot.write)):
            raise value_error(f'{at} does not have the VMA\'s protection "{vma.prot.as_string()}"')
        if pfn == st.zero_pfn:
            if not bits["special"] or bits["write"] or not vma.is_anon():
                raise value_error(f"{at} maps the zero page, which is mapped special and read-only in "
                                  "private anonymous VMAs only")
            continue
        if bits["special"]:
            raise value_error(f"{at} is special but maps pfn {pfn:#x}, not the zero page")
        if pfn >= n or st.mem.is_free(pfn):
            raise value_error(f"{at} maps pfn {pfn:#x}, which is in no folio")
        if st.mem.test(st.mem.folio_head(pfn), PG_ANON):
            if vma.shared:
                raise value_error(f"{at} maps anonymous pfn {pfn:#x} in a shared mapping")
            continue
        index = vma.pgoff + i
        if file is None or file.cache[index] != pfn:
            want = f"file {vma.file}'s page {index}" if vma.file is not None else \
                "an anonymous page (the VMA has no file)"
            raise value_error(f"{at} maps page-cache pfn {pfn:#x}, which is not {want}")


def _order_of_size(size: int, page_shift: int) -> int | None:
    if size == 0 or size & (size - 1) or size < (1 << page_shift):
        return None
    return size.bit_length() - 1 - page_shift


def _place_mm(st: State, l, p: KernelProfile, k: int, m: dict[str, Any], spawn) -> None:
    """Process ``k`` (pid ``k + 1``) with its VMAs, each page table checked and copied in."""
    pid = spawn()
    shift, pmd_pages = st.page_shift, st.ptrs_per_pte
    page = 1 << shift
    mm = st.mms[k]
    if m["exited"] and m["vmas"]:
        raise value_error(f"processes[{k}] has exited but has VMAs")
    specs = m["vmas"]
    for i, s in enumerate(specs):
        if s["start"] % page or s["offset"] % page:
            raise value_error(f'processes[{k}]["vmas"][{i}]: start {s["start"]:#x} and offset '
                              f'{s["offset"]:#x} must be multiples of the {page}-byte page')
    order = sorted(range(len(specs)), key=lambda i: specs[i]["start"])
    next_vpn = mm.next_vpn
    vmas = []
    for pos, i in enumerate(order):
        s = specs[i]
        at = f'processes[{k}]["vmas"][{i}]'
        start, nr = s["start"] >> shift, len(s["ptes"])
        if nr == 0 or nr > MAX_VMA_PAGES:
            raise value_error(f"{at}: a page table of {nr} entries; a VMA has 1 to {MAX_VMA_PAGES} pages")
        if start + nr > 1 << (56 - shift):
            raise value_error(f"{at}: {start << shift:#x}+{nr} pages leaves the 56-bit user address space")
        if pos > 0:
            prev = specs[order[pos - 1]]
            if (prev["start"] >> shift) + len(prev["ptes"]) > start:
                raise value_error(f'{at} at {start << shift:#x} overlaps processes[{k}]["vmas"][{order[pos - 1]}] '
                                  f'at {prev["start"]:#x}')
        mthp = 0 if s["mthp"] is None else 1
        for size in s["mthp"] or ():
            o = _order_of_size(size, shift)
            if o is None or o > st.pmd_order or o == 1:
                raise value_error(f"{at}: mTHP size {size} is not one of the page size, 4 pages … the PMD size")
            mthp |= 1 << o
        fid, pgoff = s["file"], s["offset"] >> shift
        if fid is not None:
            if fid >= len(st.files):
                raise value_error(f"{at}: no file {fid}")
            if pgoff + nr > st.files[fid].nr_pages:
                raise value_error(f"{at}: file pages {pgoff}+{nr} are beyond file {fid}'s "
                                  f"{st.files[fid].nr_pages} pages")
        elif s["shared"]:
            raise value_error(f"{at}: a shared mapping needs a file (shared anonymous memory is a shmem file)")
        elif pgoff:
            raise value_error(f"{at}: an offset without a file")
        if s["uffd_wp"] and not l.has_uffd_wp:
            raise value_error(f"{at}: {l.name} has no uffd-wp PTE bit")
        if s["wipeonfork"] and (s["shared"] or fid is not None):
            raise value_error(f"{at}: MADV_WIPEONFORK applies to private anonymous mappings only")
        prot = Prot.parse(s["prot"])
        if prot is None:
            raise value_error(f'prot "{s["prot"]}": use letters r, w, x (e.g. "rw") or "none"')
        if s["hugepage"] and s["nohugepage"]:
            raise value_error(f"{at}: hugepage and nohugepage exclude each other")
        vma = Vma(start=start, ptes=[], prot=prot, shared=s["shared"], file=fid, pgoff=pgoff,
                  hugepage=s["hugepage"], nohugepage=s["nohugepage"], thp_pmd=s["pmd"],
                  vm_softdirty=s["vm_softdirty"], uffd_wp=s["uffd_wp"], uffd_event_fork=s["uffd_event_fork"],
                  dontfork=s["dontfork"], wipeonfork=s["wipeonfork"], anon_vma=s["anon_vma"], mthp=mthp)
        ptes = [int(e) for e in s["ptes"]]
        try:
            check_ptes(st, l, vma, ptes, pid)
        except ValueError as e:
            raise value_error(f"{at}: {e}") from None
        vma.ptes = ptes
        next_vpn = max(next_vpn, start + nr + pmd_pages)
        vmas.append(vma)
    if m["thp_disable"] not in (0, 1, 3):
        raise value_error(f"processes[{k}]: thp_disable {m['thp_disable']} is not 0, 1 or 3 (PR_GET_THP_DISABLE)")
    if m["thp_disable"] == 3 and not p.thp_disable_except_advised:
        raise value_error(f"processes[{k}]: PR_THP_DISABLE_EXCEPT_ADVISED exists from kernel 6.18")
    mm.vmas = vmas
    # Huge PMDs, each checked as a PMD fault would leave it.
    for pos, i in enumerate(order):
        for addr, e in specs[i]["pmds"]:
            if addr % page:
                raise value_error(f'processes[{k}]["vmas"][{i}]: pmds address {addr:#x} is not page-aligned')
            try:
                place_huge_pmd(st, l, k, pos, addr >> shift, int(e))
            except ValueError as err:
                raise value_error(f'processes[{k}]["vmas"][{i}]: pmds: {err}') from None
    mm.exited, mm.has_pinned = m["exited"], m["has_pinned"]
    mm.thp_disable = m["thp_disable"]
    if m["next_mmap"] is None:
        mm.next_vpn = next_vpn
    else:
        if m["next_mmap"] % page:
            raise value_error(f"processes[{k}]: next_mmap must be a multiple of the {page}-byte page")
        if m["next_mmap"] >> shift > 1 << (56 - shift):
            raise value_error(f"processes[{k}]: next_mmap {m['next_mmap']:#x} is beyond the 56-bit user address space")
        mm.next_vpn = m["next_mmap"] >> shift


def _place_pin(st: State, i: int, p: dict[str, Any]) -> None:
    pfns = [int(x) for x in p["pfns"]]
    if not p["active"] and pfns:
        raise value_error(f"pins[{i}] is not active but holds pages (unpinning drops them)")
    for pfn in pfns:
        if pfn != st.zero_pfn and (pfn >= st.mem.nr_pages() or st.mem.is_free(pfn)):
            raise value_error(f"pins[{i}] holds pfn {pfn:#x}, which is in no folio")
    st.pins.append(Pin(pfns=pfns, write=p["write"], longterm=p["longterm"], active=p["active"]))


def rebuild_accounting(st: State, l, p: KernelProfile, f: dict[str, Any], exclusive) -> None:
    """Every counter recomputed from the page tables, page caches and pins (see
    docs/from-arrays.md for what is inferred when not given)."""
    mem = st.mem
    for fl in st.files:
        for c in fl.cache:
            if c != NOT_CACHED and mem.folio_head(c) == c:
                mem.refcount[c] += 1 << mem.folio_order(c)
    for pin in st.pins:
        if not pin.active:
            continue
        for pfn in pin.pfns:
            if pfn == st.zero_pfn:
                continue
            head = mem.folio_head(pfn)
            if mem.folio_order(head) > 0:
                mem.refcount[head] += 1
                mem.lf(head).pincount += 1
            else:
                mem.refcount[head] += GUP_PIN_COUNTING_BIAS
    assign_slots = p.mm_id and f.get("mm_ids") is None
    for mm in st.mms:
        rss = [0, 0, 0]
        for vma in mm.vmas:
            any_anon = bool(vma.pmds)
            for e in vma.pmds.values():
                head = l.pte_pfn(e)
                if head == st.zero_pfn:
                    continue
                st.mem.refcount[head] += 1
                rss[mm_counter(st.mem, head)] += st.ptrs_per_pte
                lf = st.mem.lf(head)
                lf.entire_mapcount += 1
                lf.large_mapcount += 1
                if assign_slots:
                    slot = next((s for s in (0, 1) if lf.mm_id[s] == mm.mm_id),
                                next((s for s in (0, 1) if lf.mm_id[s] == MM_ID_DUMMY), None))
                    if slot is not None:
                        lf.mm_id[slot] = mm.mm_id
                        lf.mm_id_mapcount[slot] += 1
            for e in vma.ptes:
                if l.pte_none(e) or l.pte_pfn(e) == st.zero_pfn:
                    continue
                pfn = l.pte_pfn(e)
                head = mem.folio_head(pfn)
                mem.mapcount[pfn] += 1
                mem.refcount[head] += 1
                any_anon |= mem.test(head, PG_ANON)
                rss[mm_counter(mem, head)] += 1
                if mem.folio_order(head) > 0:
                    lf = mem.lf(head)
                    lf.large_mapcount += 1
                    if mem.mapcount[pfn] == 1:
                        lf.nr_pages_mapped += 1
                    if assign_slots:
                        # The first two mms (in pid order) take the slots; a third takes none.
                        slot = next((s for s in (0, 1) if lf.mm_id[s] == mm.mm_id),
                                    next((s for s in (0, 1) if lf.mm_id[s] == MM_ID_DUMMY), None))
                        if slot is not None:
                            lf.mm_id[slot] = mm.mm_id
                            lf.mm_id_mapcount[slot] += 1
            if any_anon and vma.anon_vma == 0:
                vma.anon_vma = st.new_anon_vma()
        mm.rss = rss

    def given(name: str, i: int) -> bool | None:
        a = f.get(name)
        return None if a is None else bool(a[i])

    ids, counts = f.get("mm_ids"), f.get("mm_id_mapcounts")
    for i in range(len(f["pfn"])):
        head = int(f["pfn"][i])
        o = mem.folio_order(head)
        nr = 1 << o
        if mem.refcount[head] == 0:
            raise value_error(f"folios[{i}] (pfn {head:#x}) is neither mapped, in a page cache nor pinned: "
                              "the kernel would have freed it")
        anon = mem.test(head, PG_ANON)
        lf0 = mem.large.get(head)
        entire = lf0.entire_mapcount + 1 if lf0 is not None else 0  # huge PMD mappings
        for pg in range(head, head + nr):
            # Inferred: an anonymous page mapped once; under one huge PMD, the head only.
            ptes = mem.mapcount[pg]
            excl = (bool(exclusive[pg]) if exclusive is not None
                    else anon and ((ptes == 1 and entire == 0) or (ptes == 0 and entire == 1 and pg == head)))
            if excl:
                mem.set(pg, PG_ANON_EXCLUSIVE)
        if o == 0:
            slots = (ids is not None and (ids[2 * i] or ids[2 * i + 1])) or \
                (counts is not None and (counts[2 * i] or counts[2 * i + 1]))
            if given("partially_mapped", i) or given("maybe_shared", i) or slots:
                raise value_error(f"folios[{i}]: a small folio has no partially-mapped flag, shared bit or MM-ID slots")
            continue
        lf = mem.large[head]
        partial = given("partially_mapped", i)
        if partial is None:
            # A folio a huge PMD maps is entirely mapped (ENTIRELY_MAPPED), never partially.
            partial = anon and lf.entire_mapcount < 0 and 0 < lf.nr_pages_mapped < nr
        if partial and not anon:
            raise value_error(f"folios[{i}]: only anonymous folios are queued for deferred split (partially_mapped)")
        if partial:
            mem.set(head, PG_PARTIALLY_MAPPED)
        if ids is not None and counts is not None:
            for s in (0, 1):
                mid, c = int(ids[2 * i + s]), int(counts[2 * i + s])
                if (mid == MM_ID_DUMMY) != (c == 0) or c < 0 or (not p.mm_id and mid != MM_ID_DUMMY):
                    raise value_error(f"folios[{i}]: MM-ID slot {s} holds mm {mid} with {c} mapping(s); a slot is "
                                      "free (0, 0), or an mm with at least one mapping on a kernel with MM-IDs (6.15+)")
                lf.mm_id[s] = mid
                lf.mm_id_mapcount[s] = c - 1
        elif ids is not None or counts is not None:
            raise value_error("folios: mm_ids and mm_id_mapcounts go together")
        if p.mm_id:
            shared = given("maybe_shared", i)
            if shared is None:
                shared = lf.large_mapcount >= 0 and lf.large_mapcount not in lf.mm_id_mapcount
            if shared:
                mem.set(head, PG_MAYBE_SHARED)
        elif given("maybe_shared", i):
            raise value_error(f'folios[{i}]: the "maybe mapped shared" bit exists from kernel 6.15 (MM-IDs)')


def build(st: State, l, p: KernelProfile, spawn, create_file, files: list[dict[str, Any]],
          folios: dict[str, Any], processes: list[dict[str, Any]], pins: list[dict[str, Any]],
          token, anon_exclusive, next_token: int | None, next_anon_vma: int | None) -> None:
    """The state the arguments describe, into the fresh ``st`` (see Simulation.from_arrays)."""
    for i, fl in enumerate(files):
        if fl["anon"] and (not fl["shmem"] or fl["huge"] is not None or fl["folio_size"] != 1 << st.page_shift):
            raise value_error(f"files[{i}]: shared anonymous memory is a shmem object of page-size folios, without huge=")
        try:
            fid = create_file(fl["size"], fl["folio_size"], fl["shmem"], fl["huge"])
        except ValueError as e:
            raise value_error(f"files[{i}]: {e}") from None
        if fl["anon"]:
            st.files[fid].kind = ANON
    _place_folios(st, folios)
    n = st.mem.nr_pages()
    for name, a in (("token", token), ("anon_exclusive", anon_exclusive)):
        if a is not None and len(a) != n:
            raise value_error(f'pages["{name}"] has {len(a)} entries, memory has {n} pages')
    if token is not None:
        token = [int(t) for t in token]
        for pg, t in enumerate(token):
            if t and st.mem.is_free(pg):
                raise value_error(f'pages["token"][{pg:#x}] is {t}, but pfn {pg:#x} is in no folio')
        st.mem.token = token
    if anon_exclusive is not None:
        anon_exclusive = [bool(x) for x in anon_exclusive]
        for pg, x in enumerate(anon_exclusive):
            if x and (st.mem.is_free(pg) or not st.mem.test(st.mem.folio_head(pg), PG_ANON)):
                raise value_error(f'pages["anon_exclusive"] marks pfn {pg:#x}, which is not a page of an anonymous folio')
    for k, m in enumerate(processes):
        _place_mm(st, l, p, k, m, spawn)
    for i, pin in enumerate(pins):
        _place_pin(st, i, pin)
    max_anon_vma = max((v.anon_vma for mm in st.mms for v in mm.vmas), default=0)
    if next_anon_vma is not None and next_anon_vma <= max_anon_vma:
        raise value_error(f"next_anon_vma {next_anon_vma} is not above the anon_vma {max_anon_vma} a VMA has")
    st.next_anon_vma = max_anon_vma + 1 if next_anon_vma is None else next_anon_vma
    if next_token == 0:
        raise value_error("next_token must not be 0 (the token of a zero-filled page)")
    st.next_token = next_token if next_token is not None else max(max(st.mem.token, default=0) + 1 & 0xFFFF_FFFF, 1)
    rebuild_accounting(st, l, p, folios, anon_exclusive)

//! `check()` against the straightforward scan it replaced (full per-page arrays of counts,
//! owners and writable mappings, and every run of a large folio's mappings kept), on random
//! states with random damage: the same verdict and the same first error, on one thread and
//! on two.

use proptest::prelude::*;

use super::*;
use crate::arch::Layout;
use crate::mm::Prot;
use crate::sim::Simulation;
use crate::with_layout;

/// `owner[pfn]` of a page mapped by more than one mm.
const MANY: u32 = u32::MAX;

/// The owner of a page once `pid` maps it too: `pid`, or [`MANY`].
fn owned_by(owner: u32, pid: u32) -> u32 {
    match owner {
        0 => pid,
        o if o == pid => o,
        _ => MANY,
    }
}

/// The scan `check()` replaced, kept as its reference.
fn check_by_arrays<L: PteLayout>(st: &State, l: &L, p: &KernelProfile) -> Result<()> {
    let cx = Ctx::new(st, l, p);
    let n = st.mem.nr_pages() as usize;
    let shift = st.page_shift;
    use crate::alloc::try_filled;
    let mut count = try_filled(n, 0u32, "check()'s mapping counts")?;
    let mut owner = try_filled(n, 0u32, "check()'s owners")?;
    let mut writable = try_filled(n, 0u32, "check()'s writable counts")?;
    // Mappings of large folios per mm, as runs (folio, mm_id, PTEs): a folio's PTEs are
    // mostly consecutive, so there is about one run per folio and mm. Sorted once, they
    // are read in folio order by the pass over memory below.
    let mut runs: Vec<(u64, u32, u32)> = Vec::new();
    let mut flush = |run: &mut Option<(u64, u32, u32)>| -> Result<()> {
        if let Some(r) = run.take() {
            if runs.len() == runs.capacity() {
                let more = runs.len().max(1 << 12);
                runs.try_reserve(more).map_err(|_| Error::host_memory::<(u64, u32, u32)>("check()'s folio runs", runs.len() + more))?;
            }
            runs.push(r);
        }
        Ok(())
    };
    let mut run: Option<(u64, u32, u32)> = None;
    // Huge PMD mappings, by folio head (the kernel's entire mapcount); sorted below.
    let mut pmd_heads: Vec<u64> = Vec::new();
    for mm in &st.mms {
        if mm.exited && !mm.vmas.is_empty() {
            return Err(broken("exited-mm", format!("pid {} has exited but still has VMAs", mm.pid)));
        }
        let mut rss = [0i64; 3];
        for (vi, vma) in mm.vmas.iter().enumerate() {
            if vi > 0 && mm.vmas[vi - 1].end() > vma.start {
                return Err(broken("vma-order", format!("pid {}: VMAs overlap at {:#x}", mm.pid, vma.start << shift)));
            }
            cx.check_contpte(mm.pid, vma)?;
            for (&base, &e) in &vma.pmds {
                let at = || format!("pid {} address {:#x} (PMD {e:#x})", mm.pid, base << shift);
                let nr = st.ptrs_per_pte;
                if base % nr != 0 || base < vma.start || base + nr > vma.end() || !vma.is_anon() {
                    return Err(broken("pmd-leaf", format!("{}: a huge PMD must be aligned, inside its mapping, in a private anonymous mapping", at())));
                }
                let s = (base - vma.start) as usize;
                if !vma.ptes[s..s + nr as usize].iter().all(|&x| l.pte_none(x)) {
                    return Err(broken("pmd-leaf", format!("{}: PTEs under a huge PMD", at())));
                }
                let head = l.pte_pfn(e);
                if head == st.zero_pfn {
                    if l.pte_write(e) || !l.pte_special(e) {
                        return Err(broken("zero-page-pte", format!("{}: the huge zero page must be mapped special and read-only", at())));
                    }
                    continue;
                }
                let ok = head < n as u64 && !st.mem.is_free(head) && st.mem.folio_head(head) == head && st.mem.folio_order(head) == st.pmd_order && st.mem.test(head, PG_ANON);
                if !ok {
                    return Err(broken("pmd-leaf", format!("{}: pfn {head:#x} is not the first page of a PMD-sized anonymous folio", at())));
                }
                if l.pte_write(e) && !st.mem.test(head, PG_ANON_EXCLUSIVE) {
                    return Err(broken("writable-cow-not-exclusive", format!("{}: a writable huge PMD whose head pfn {head:#x} is not exclusive", at())));
                }
                pmd_heads.push(head);
                for pu in head as usize..(head + nr) as usize {
                    owner[pu] = owned_by(owner[pu], mm.pid);
                    if l.pte_write(e) {
                        writable[pu] += 1;
                    }
                }
                flush(&mut run)?;
                run = Some((head, mm.mm_id, 1));
                rss[mm_counter(&st.mem, head)] += nr as i64;
            }
            for (i, &e) in vma.ptes.iter().enumerate() {
                if i % 4096 == 0 {
                    st.ticker.tick(4096)?;
                }
                if l.pte_none(e) {
                    continue;
                }
                let addr = (vma.start + i as u64) << shift;
                let at = || format!("pid {} address {addr:#x} (PTE {e:#x})", mm.pid);
                let pfn = l.pte_pfn(e);
                if pfn == st.zero_pfn {
                    if l.pte_write(e) || !l.pte_special(e) {
                        return Err(broken("zero-page-pte", format!("{}: the zero page must be mapped special and read-only", at())));
                    }
                    continue;
                }
                if pfn >= n as u64 || st.mem.is_free(pfn) {
                    return Err(broken("pte-maps-free-page", format!("{} maps pfn {pfn:#x}, which is not allocated", at())));
                }
                let head = st.mem.folio_head(pfn);
                let anon = st.mem.test(head, PG_ANON);
                if vma.is_anon() && !anon {
                    return Err(broken("anon-vma-maps-file-page", format!("{} maps page-cache pfn {pfn:#x} in a private anonymous mapping", at())));
                }
                let pu = pfn as usize;
                count[pu] += 1;
                owner[pu] = owned_by(owner[pu], mm.pid);
                if l.pte_write(e) {
                    writable[pu] += 1;
                    if vma.is_cow() && !(anon && st.mem.test(pfn, PG_ANON_EXCLUSIVE)) {
                        return Err(broken("writable-cow-not-exclusive", format!("{} is writable in a private mapping but pfn {pfn:#x} is not an exclusive anonymous page", at())));
                    }
                }
                if st.mem.folio_order(head) > 0 {
                    match &mut run {
                        Some((h, id, n)) if *h == head && *id == mm.mm_id => *n += 1,
                        _ => {
                            flush(&mut run)?;
                            run = Some((head, mm.mm_id, 1));
                        }
                    }
                }
                let c = mm_counter(&st.mem, head);
                rss[c] += 1;
            }
        }
        flush(&mut run)?;
        for c in 0..3 {
            if rss[c] != mm.rss[c] {
                return Err(broken("rss", format!("pid {}: {} rss counter is {}, page tables map {} such pages", mm.pid, RSS_NAMES[c], mm.rss[c], rss[c])));
            }
        }
    }
    runs.sort_unstable_by_key(|&(head, mm_id, _)| (head, mm_id));
    pmd_heads.sort_unstable();
    let mut next_run = 0usize;
    // Pins and page-cache references.
    let mut pins = try_filled(n, 0u32, "check()'s pin counts")?;
    for pin in st.pins.iter().filter(|p| p.active) {
        for &pfn in &pin.pfns {
            if pfn != st.zero_pfn {
                if pfn >= n as u64 || st.mem.is_free(pfn) {
                    return Err(broken("pin-of-free-page", format!("a pin holds pfn {pfn:#x}, which is free")));
                }
                pins[pfn as usize] += 1;
            }
        }
    }
    let mut cached = try_filled(n, false, "check()'s page-cache map")?;
    for f in &st.files {
        for &pfn in f.cache.iter().filter(|&&c| c != NOT_CACHED) {
            cached[pfn as usize] = true;
        }
    }
    let mut free = 0u64;
    let mut pfn = 0usize;
    while pfn < n {
        if pfn % 4096 == 0 {
            st.ticker.tick(4096)?;
        }
        if st.mem.is_free(pfn as u64) {
            if st.mem.refcount[pfn] != 0 || st.mem.mapcount[pfn] != 0 {
                return Err(broken("free-page-state", format!("free pfn {pfn:#x} has refcount {} mapcount {}", st.mem.refcount[pfn], st.mem.mapcount[pfn])));
            }
            free += 1;
            pfn += 1;
            continue;
        }
        let head = pfn as u64;
        let order = st.mem.folio_order(head);
        let nr = 1usize << order;
        let what = |pg: usize| format!("pfn {pg:#x} (folio {head:#x}, order {order})");
        let mut maps = 0i64;
        let mut mapped_pages = 0i32;
        let mut pin_refs = 0i64;
        for pg in pfn..pfn + nr {
            if st.mem.mapcount[pg] as u32 != count[pg] {
                return Err(broken("page-mapcount", format!("{}: stored mapcount {}, page tables map it {} time(s){}", what(pg), st.mem.mapcount[pg], count[pg], cx.where_mapped(pg as u64))));
            }
            if st.mem.test(pg as u64, PG_ANON_EXCLUSIVE) {
                if owner[pg] == MANY {
                    return Err(broken("anon-exclusive-shared", format!("{} is PageAnonExclusive but mapped by several processes{}", what(pg), cx.where_mapped(pg as u64))));
                }
            }
            if writable[pg] > 0 && owner[pg] == MANY && st.mem.test(head, PG_ANON) {
                return Err(broken("writable-shared-anon", format!("{} is an anonymous page mapped writable while mapped by several processes{}", what(pg), cx.where_mapped(pg as u64))));
            }
            maps += count[pg] as i64;
            mapped_pages += (count[pg] > 0) as i32;
            pin_refs += pins[pg] as i64;
        }
        let refs = st.mem.refcount[pfn] as i64;
        let bias = if order > 0 { 1 } else { GUP_PIN_COUNTING_BIAS as i64 };
        let cache_refs = if cached[pfn] { nr as i64 } else { 0 };
        if cached[pfn] != st.mem.test(head, PG_FILE) {
            return Err(broken("page-cache-flag", format!("{}: PG_FILE does not match page-cache membership", what(pfn))));
        }
        // A huge PMD maps the folio once and holds one reference.
        let pmd_maps = (pmd_heads.partition_point(|&h| h <= head) - pmd_heads.partition_point(|&h| h < head)) as i64;
        let expect = maps + pmd_maps + pin_refs * bias + cache_refs;
        if refs != expect {
            return Err(broken("refcount", format!("{}: refcount {refs}, expected {expect} = {maps} PTE mapping(s) + {pmd_maps} PMD mapping(s) + {pin_refs} pin(s) + {cache_refs} page-cache reference(s){}", what(pfn), cx.where_mapped(head))));
        }
        if refs <= 0 {
            return Err(broken("refcount", format!("{}: an allocated folio with refcount {refs}", what(pfn))));
        }
        if order > 0 {
            let Some(lf) = st.mem.large_folio(head) else {
                return Err(broken("large-folio-record", format!("{} has no large-folio record", what(pfn))));
            };
            if lf.large_mapcount as i64 + 1 != maps + pmd_maps {
                return Err(broken("large-mapcount", format!("{}: large mapcount {}, page tables map it {} time(s){}", what(pfn), lf.large_mapcount + 1, maps + pmd_maps, cx.where_mapped(head))));
            }
            if lf.entire_mapcount as i64 + 1 != pmd_maps {
                return Err(broken("entire-mapcount", format!("{}: entire mapcount {}, {pmd_maps} huge PMD mapping(s){}", what(pfn), lf.entire_mapcount + 1, cx.where_mapped(head))));
            }
            if lf.nr_pages_mapped != mapped_pages {
                return Err(broken("nr-pages-mapped", format!("{}: nr_pages_mapped {}, {mapped_pages} page(s) are mapped", what(pfn), lf.nr_pages_mapped)));
            }
            if lf.pincount as i64 != pin_refs {
                return Err(broken("pincount", format!("{}: pincount {}, {pin_refs} pin(s)", what(pfn), lf.pincount)));
            }
            // This folio's runs: mappings per mm.
            let first = next_run + runs[next_run..].partition_point(|r| r.0 < head);
            let mut end = first;
            let (mut mms, mut have) = (0usize, [0i64; 2]);
            while end < runs.len() && runs[end].0 == head {
                let id = runs[end].1;
                let mut by_mm = 0i64;
                while end < runs.len() && runs[end].0 == head && runs[end].1 == id {
                    by_mm += runs[end].2 as i64;
                    end += 1;
                }
                mms += 1;
                for s in 0..2 {
                    if lf.mm_id[s] == id {
                        have[s] = by_mm;
                    }
                }
            }
            next_run = end;
            if p.mm_id {
                let total = maps + pmd_maps - 1;
                for s in 0..2 {
                    let id = lf.mm_id[s];
                    let c = lf.mm_id_mapcount[s];
                    if id == MM_ID_DUMMY {
                        if c != -1 {
                            return Err(broken("mm-id-slot", format!("{}: free MM-ID slot {s} has mapcount {}", what(pfn), c + 1)));
                        }
                        continue;
                    }
                    let have = have[s];
                    if c < 0 || c as i64 + 1 > have {
                        return Err(broken("mm-id-slot", format!("{}: MM-ID slot {s} says mm {id} maps it {} time(s), it maps it {have}{}", what(pfn), c + 1, cx.where_mapped(head))));
                    }
                }
                if !st.mem.test(head, PG_MAYBE_SHARED) && total >= 0 {
                    let owned = (0..2).any(|s| lf.mm_id[s] != MM_ID_DUMMY && lf.mm_id_mapcount[s] as i64 == total);
                    if !owned || mms > 1 {
                        return Err(broken("mm-id-shared-bit", format!("{}: \"maybe mapped shared\" is clear but {mms} mm(s) map it{}", what(pfn), cx.where_mapped(head))));
                    }
                }
            }
        }
        pfn += nr;
    }
    if free != st.mem.free_pages {
        return Err(broken("free-pages", format!("the allocator counts {} free pages, {free} pages are free", st.mem.free_pages)));
    }
    Ok(())
}


fn rw() -> Prot {
    Prot { read: true, write: true, exec: false }
}

/// A small machine (8 MiB: the threads' border at 4 MiB) after random steps; failed steps
/// (out of memory, unmapped ranges, exited processes) are part of the game.
fn build(arch: &str, kernel: &str, ops: &[(u8, u32, u32)]) -> Simulation {
    let layout = Layout::by_name(arch, None).unwrap();
    let mut s = Simulation::new(layout, KernelProfile::parse(kernel).unwrap(), 8 << 20, 7).unwrap();
    let ps = s.page_size();
    let parent = s.spawn();
    let mut regions: Vec<(u64, u64)> = Vec::new();
    let mut pids = vec![parent];
    // Start from a written region, forked (ops 0, 1, 3).
    let start = [(0, ops[0].1, ops[0].2), (1, 0, 1), (3, 0, 0)];
    for &(op, a, b) in start.iter().chain(ops) {
        let pid = pids[a as usize % pids.len()];
        let region = (!regions.is_empty()).then(|| regions[a as usize % regions.len()]);
        // A sub-range of a region: [start + x, start + x + len).
        let sub = |(start, len): (u64, u64)| {
            let pages = len / ps;
            let x = b as u64 % pages;
            (start + x * ps, (pages - x).min(1 + (b as u64 >> 8) % pages) * ps)
        };
        let _ = match op % 9 {
            0 => {
                let len = (1 + a as u64 % 96) * (16 << 10);
                let sizes: &[u64] = match b % 4 {
                    0 => &[],
                    1 => &[16 << 10],
                    2 => &[64 << 10, 16 << 10],
                    _ => &[2 << 20],
                };
                let mthp = (b % 4 != 0).then_some(sizes);
                s.mmap(parent, None, len, rw(), false, None, mthp, false, false, b % 5 == 0).map(|addr| regions.push((addr, len)))
            }
            1 | 2 => match region {
                Some(r) => {
                    let (at, len) = if op == 1 { r } else { sub(r) };
                    s.touch(pid, at, len, b % 3 != 0)
                }
                None => Ok(()),
            },
            3 if pids.len() < 9 => s.fork(pid).map(|c| pids.push(c)),
            4 => match region {
                Some(r) => s.write(pid, sub(r).0).map(|_| ()),
                None => Ok(()),
            },
            5 => match region {
                Some(r) => {
                    let (at, len) = sub(r);
                    if b % 2 == 0 {
                        s.munmap(pid, at, len)
                    } else {
                        s.madvise(pid, at, len, "dontneed")
                    }
                }
                None => Ok(()),
            },
            6 => match region {
                Some(r) => {
                    let (at, len) = sub(r);
                    s.pin(pid, at, len, b % 2 == 0, false).map(|_| ())
                }
                None => Ok(()),
            },
            7 => {
                let len = (1 + a as u64 % 32) * (16 << 10);
                let folio = [4 << 10, 16 << 10, 64 << 10][b as usize % 3];
                let shmem = b % 5 == 0;
                s.create_file(len, folio, shmem, None)
                    .and_then(|f| s.mmap(pid, None, len, rw(), b % 2 == 0, Some((f, 0)), None, false, false, false))
                    .and_then(|addr| {
                        regions.push((addr, len));
                        s.touch(pid, addr, len, b % 3 == 0)
                    })
            }
            _ => match pids.len() > 1 {
                true if b % 3 == 0 => s.exit(pids[1 + a as usize % (pids.len() - 1)]),
                _ => Ok(()),
            },
        };
    }
    s
}

/// Breaks one thing in the state (or nothing), picked by `(kind, x, y)`.
fn damage(s: &mut Simulation, kind: u8, x: u64, y: u64, up: bool) {
    let d = if up { 1 } else { -1 };
    let st = &mut s.st;
    let n = st.mem.nr_pages();
    // Present PTEs, as (mm, vma, index).
    let mapped: Vec<(usize, usize, usize)> = st
        .mms
        .iter()
        .enumerate()
        .flat_map(|(k, mm)| mm.vmas.iter().enumerate().map(move |(v, vma)| (k, v, vma)))
        .flat_map(|(k, v, vma)| {
            let none = with_layout!(&s.layout, l => l.geometry().none_value);
            vma.ptes.iter().enumerate().filter(move |(_, &e)| e != none).map(move |(i, _)| (k, v, i))
        })
        .collect();
    let large: Vec<u64> = st.mem.large_folios().into_iter().map(|(h, _)| h).collect();
    let pte = mapped.get(x as usize % mapped.len().max(1)).copied();
    // Mostly a mapped page (or its folio's first page), sometimes any.
    let pfn = match pte {
        Some((k, v, i)) if y % 4 != 0 => {
            let pfn = with_layout!(&s.layout, l => l.pte_pfn(st.mms[k].vmas[v].ptes[i])).min(n - 1);
            if y % 4 == 1 && !st.mem.is_free(pfn) { st.mem.folio_head(pfn) } else { pfn }
        }
        _ => x % n,
    } as usize;
    match kind % 12 {
        1 => st.mem.mapcount[pfn] += d,
        2 => st.mem.refcount[pfn] += d,
        3 => st.mem.flags[pfn] ^= 1 << (x % 7),
        4 if !large.is_empty() => {
            let lf = st.mem.lf(large[x as usize % large.len()]);
            let s = (y / 8 % 2) as usize;
            match y % 8 {
                0 => lf.large_mapcount += d,
                1 => lf.entire_mapcount += d,
                2 => lf.nr_pages_mapped += d,
                3 => lf.pincount += d,
                4 => lf.mm_id[s] = (lf.mm_id[s] as i64 + d as i64).max(0) as u32,
                5 => lf.mm_id = [lf.mm_id[1], lf.mm_id[0]],
                _ => lf.mm_id_mapcount[s] += d,
            }
        }
        5 if !st.mms.is_empty() => {
            let k = x as usize % st.mms.len();
            st.mms[k].rss[(y % 3) as usize] += d as i64;
        }
        6..=9 if pte.is_some() => {
            let (k, v, i) = pte.unwrap();
            let e = &mut st.mms[k].vmas[v].ptes[i];
            *e = with_layout!(&s.layout, l => match kind % 12 {
                6 => l.pte_mkwrite(*e),
                7 => l.pte_advance_pfn(*e, 1 + y % 4),
                8 => l.mk_pte(y % (n + 1), crate::arch::PteBits::present()).unwrap(),
                _ => l.geometry().none_value,
            });
        }
        10 if pte.is_some() && st.mms.len() > 1 => {
            // Another process maps the same page at the same place, if it has a VMA there.
            let (k, v, i) = pte.unwrap();
            let (e, vpn) = (st.mms[k].vmas[v].ptes[i], st.mms[k].vmas[v].start + i as u64);
            let other = (k + 1 + y as usize % (st.mms.len() - 1)) % st.mms.len();
            if let Some(w) = st.mms[other].find_vma(vpn) {
                let vma = &mut st.mms[other].vmas[w];
                let j = (vpn - vma.start) as usize;
                vma.ptes[j] = e;
            }
        }
        11 => st.mem.free_pages = st.mem.free_pages.wrapping_add(d as i64 as u64),
        _ => {}
    }
}

fn verdicts(s: &Simulation) -> [Result<()>; 3] {
    with_layout!(&s.layout, l => [
        check_by_arrays(&s.st, l, &s.profile),
        s.st.check_threads(l, &s.profile, u64::MAX),
        s.st.check_threads(l, &s.profile, 0),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// The same verdict and first error as the reference, on one thread and on two.
    #[test]
    fn check_agrees_with_the_full_arrays(
        machine in 0usize..5,
        ops in prop::collection::vec((0u8..9, any::<u32>(), any::<u32>()), 1..20),
        kind in 0u8..12, x in any::<u64>(), y in any::<u64>(), up in any::<bool>(),
    ) {
        let (arch, kernel) = [("x86-64", "6.18"), ("x86-64", "6.8"), ("x86-64", "6.15"), ("arm64-4k", "6.18"), ("arm64-4k", "6.8")][machine];
        let mut s = build(arch, kernel, &ops);
        let [r, one, two] = verdicts(&s);
        prop_assert_eq!(&r, &Ok(()));
        prop_assert_eq!(&one, &r);
        prop_assert_eq!(&two, &r);
        damage(&mut s, kind, x, y, up);
        let [r, one, two] = verdicts(&s);
        prop_assert_eq!(&one, &r);
        prop_assert_eq!(&two, &r);
    }
}

/// Nine processes share pages (more mms than the scratch has tags): a page mapped by the
/// first and the ninth is still seen as shared, whichever way the tags are renewed.
#[test]
fn sharing_is_seen_across_many_processes() {
    for len in [64u64 << 10, 6 << 20] {
        let layout = Layout::by_name("x86-64", None).unwrap();
        let mut s = Simulation::new(layout, KernelProfile::parse("6.18").unwrap(), 16 << 20, 7).unwrap();
        let p = s.spawn();
        let a = s.mmap(p, None, len, rw(), false, None, Some(&[16 << 10]), false, false, false).unwrap();
        s.touch(p, a, len, true).unwrap();
        let mut last = p;
        for _ in 0..8 {
            last = s.fork(p).unwrap();
        }
        let [r, one, two] = verdicts(&s);
        assert_eq!((&r, &one, &two), (&Ok(()), &Ok(()), &Ok(())));
        // Only the first process and the last map the page: it must not be exclusive.
        for pid in 2..last {
            s.munmap(pid, a, 4096).unwrap();
        }
        let k = s.vma_index(p, a).unwrap();
        let pte = s.st.mms[k.0].vmas[k.1].ptes[0];
        let pfn = with_layout!(&s.layout, l => l.pte_pfn(pte));
        s.st.mem.set(pfn, PG_ANON_EXCLUSIVE);
        let [r, one, two] = verdicts(&s);
        assert_eq!(r.as_ref().unwrap_err().rule, Some("anon-exclusive-shared"), "{len}");
        assert_eq!((&one, &two), (&r, &r));
    }
}

/// Told to stop, `check()` on two threads stops and says so; told nothing, it finishes.
#[test]
fn the_watch_stops_check_on_two_threads() {
    struct Stop;
    impl crate::watch::Watch for Stop {
        fn keep_going(&self, _done: u64, _total: u64) -> bool {
            false
        }
    }
    let layout = Layout::by_name("x86-64", None).unwrap();
    let mut s = Simulation::new(layout, KernelProfile::parse("6.18").unwrap(), 256 << 20, 7).unwrap();
    let p = s.spawn();
    let len = 96 << 20;
    let a = s.mmap(p, None, len, rw(), false, None, None, false, false, false).unwrap();
    s.touch(p, a, len, true).unwrap();
    s.fork(p).unwrap();
    s.st.ticker.set_watch(Some(std::sync::Arc::new(Stop)));
    s.st.ticker.start(1 << 30, true);
    let r = with_layout!(&s.layout, l => s.st.check_threads(l, &s.profile, 0));
    assert_eq!(r.unwrap_err().kind, ErrorKind::Interrupted);
    s.st.ticker.set_watch(None);
    s.st.ticker.start(1 << 30, true);
    with_layout!(&s.layout, l => s.st.check_threads(l, &s.profile, 0)).unwrap();
}

use super::*;
use crate::memory::{PG_ANON_EXCLUSIVE, PG_PARTIALLY_MAPPED};

fn sim(kernel: &str) -> Simulation {
    let layout = Layout::by_name("x86-64", None).unwrap();
    Simulation::new(layout, KernelProfile::parse(kernel).unwrap(), 64 << 20, 7).unwrap()
}

fn rw() -> Prot {
    Prot { read: true, write: true, exec: false }
}

fn check(s: &Simulation) {
    with_layout!(&s.layout, l => s.st.check(l, &s.profile)).unwrap();
}

fn pfn_at(s: &Simulation, pid: u32, addr: u64) -> u64 {
    let (k, v) = s.vma_index(pid, addr).unwrap();
    let vma = &s.st.mms[k].vmas[v];
    let pte = vma.ptes[((addr >> 12) - vma.start) as usize];
    with_layout!(&s.layout, l => l.pte_pfn(pte))
}

#[test]
fn fork_of_written_mthp_region_then_cow() {
    for kernel in ["6.8", "6.9", "6.14", "6.15", "6.18"] {
        let mut s = sim(kernel);
        let p = s.spawn();
        let len = 1 << 20;
        let a = s.mmap(p, None, len, rw(), false, None, Some(&[64 << 10]), false, false, false).unwrap();
        s.touch(p, a, len, true).unwrap();
        check(&s);
        let c = s.fork(p).unwrap();
        check(&s);
        for i in 0..(len >> 12) {
            let pfn = pfn_at(&s, p, a + (i << 12));
            assert_eq!(s.st.mem.mapcount[pfn as usize], 2);
            assert!(!s.st.mem.test(pfn, PG_ANON_EXCLUSIVE));
        }
        let t0 = s.read(c, a + 5 * 4096).unwrap();
        let old = pfn_at(&s, p, a + 5 * 4096);
        let tc = s.write(c, a + 5 * 4096).unwrap();
        check(&s);
        assert_ne!(pfn_at(&s, c, a + 5 * 4096), old, "{kernel}: child write copies");
        assert_eq!(s.read(p, a + 5 * 4096).unwrap(), t0, "{kernel}: parent keeps its data");
        assert_eq!(s.read(c, a + 5 * 4096).unwrap(), tc);
        // Parent writes another page of the folio the child still maps: copy.
        let before = pfn_at(&s, p, a + 6 * 4096);
        s.write(p, a + 6 * 4096).unwrap();
        assert_ne!(pfn_at(&s, p, a + 6 * 4096), before, "{kernel}");
        check(&s);
        s.exit(c).unwrap();
        check(&s);
        let before = pfn_at(&s, p, a + 7 * 4096);
        s.write(p, a + 7 * 4096).unwrap();
        let reused = pfn_at(&s, p, a + 7 * 4096) == before;
        assert_eq!(reused, kernel == "6.15" || kernel == "6.18", "{kernel}: reuse after child exit");
        check(&s);
    }
}

#[test]
fn batched_and_per_pte_give_the_same_state() {
    let run = |profile: KernelProfile| {
        let layout = Layout::by_name("x86-64", None).unwrap();
        let mut s = Simulation::new(layout, profile, 64 << 20, 7).unwrap();
        let p = s.spawn();
        let len = 4 << 20;
        let a = s.mmap(p, None, len, rw(), false, None, Some(&[16 << 10, 64 << 10, 2 << 20]), false, false, false).unwrap();
        s.touch(p, a, len / 2, true).unwrap();
        s.touch(p, a + len / 2, len / 4, false).unwrap();
        let c = s.fork(p).unwrap();
        s.write(c, a + 3 * 4096).unwrap();
        s.munmap(p, a + (3 << 20) + 20 * 4096, 7 * 4096).unwrap();
        s.madvise(c, a + (1 << 20), 1 << 20, "dontneed").unwrap();
        s.mprotect(p, a, 1 << 20, Prot { read: true, write: false, exec: false }).unwrap();
        s.mprotect(p, a, 1 << 20, rw()).unwrap();
        s.exit(c).unwrap();
        check(&s);
        s
    };
    let b = run(KernelProfile::parse("6.16").unwrap());
    let u = run(KernelProfile::parse("6.16").unwrap().unbatched());
    assert!(b.st.total.folio_pte_batch_calls > 0);
    assert_eq!(u.st.total.folio_pte_batch_calls, 0);
    assert_eq!(b.st.mem.refcount, u.st.mem.refcount);
    assert_eq!(b.st.mem.mapcount, u.st.mem.mapcount);
    assert_eq!(b.st.mem.token, u.st.mem.token);
    assert_eq!(b.st.mem.order, u.st.mem.order);
    for (x, y) in b.st.mms.iter().zip(&u.st.mms) {
        assert_eq!(x.rss, y.rss);
        for (v, w) in x.vmas.iter().zip(&y.vmas) {
            assert_eq!(v.ptes, w.ptes);
        }
    }
    let _ = PG_PARTIALLY_MAPPED;
}

#[test]
fn pinned_page_is_copied_for_the_child() {
    for kernel in ["6.8", "6.18"] {
        let mut s = sim(kernel);
        let p = s.spawn();
        let a = s.mmap(p, None, 64 << 10, rw(), false, None, Some(&[64 << 10]), false, false, false).unwrap();
        s.touch(p, a, 64 << 10, true).unwrap();
        let pin = s.pin(p, a + 4096, 4096, true, true).unwrap();
        let c = s.fork(p).unwrap();
        check(&s);
        assert_ne!(pfn_at(&s, c, a + 4096), pfn_at(&s, p, a + 4096));
        // folio_needs_cow_for_dma() looks at the whole folio: every exclusive page of a
        // pinned large folio is copied, not just the pinned one.
        assert_ne!(pfn_at(&s, c, a + 8192), pfn_at(&s, p, a + 8192));
        assert_eq!(s.st.op.pages_copied, 16);
        let t = s.write(p, a + 4096).unwrap();
        assert_eq!(s.pin_read(pin, 0).unwrap(), t, "{kernel}: the pin sees the parent's write");
        assert_ne!(s.read(c, a + 4096).unwrap(), t);
        s.unpin(pin).unwrap();
        check(&s);
    }
}

#[test]
fn errors_leave_state_unchanged() {
    let layout = Layout::by_name("x86-64", None).unwrap();
    let mut s = Simulation::new(layout, KernelProfile::parse("6.18").unwrap(), 1 << 20, 7).unwrap();
    let p = s.spawn();
    let a = s.mmap(p, None, 2 << 20, rw(), false, None, Some(&[]), false, false, false).unwrap();
    let before = s.st.mem.clone();
    let e = s.touch(p, a, 2 << 20, true).unwrap_err();
    assert_eq!(e.kind, crate::error::ErrorKind::OutOfMemory);
    assert_eq!(s.st.mem.refcount, before.refcount);
    assert!(s.touch(p, a + 4096 * 1000, 4096 * 1000, true).is_err());
    assert!(s.touch(p, 0x1234, 4096, false).is_err());
    s.exit(p).unwrap();
    assert!(s.fork(p).is_err());
}

/// Every rule of `check()` fires on the corruption it exists for.
#[test]
fn check_names_each_broken_rule() {
    let base = || {
        let mut s = sim("6.18");
        let p = s.spawn();
        let a = s.mmap(p, None, 64 << 10, rw(), false, None, Some(&[16 << 10]), false, false, false).unwrap();
        s.touch(p, a, 64 << 10, true).unwrap();
        let c = s.fork(p).unwrap();
        s.write(c, a).unwrap();
        check(&s);
        (s, a)
    };
    let rule = |s: &Simulation| with_layout!(&s.layout, l => s.st.check(l, &s.profile)).unwrap_err().rule.unwrap();
    let pfn1 = |s: &Simulation, a: u64| pfn_at(s, 1, a + 4096) as usize;

    let (mut s, a) = base();
    let p = pfn1(&s, a);
    s.st.mem.mapcount[p] += 1;
    assert_eq!(rule(&s), "page-mapcount");

    let (mut s, a) = base();
    let p = pfn1(&s, a);
    let head = s.st.mem.folio_head(p as u64) as usize;
    s.st.mem.refcount[head] += 1;
    assert_eq!(rule(&s), "refcount");

    let (mut s, _) = base();
    s.st.mms[0].rss[1] -= 1;
    assert_eq!(rule(&s), "rss");

    let (mut s, a) = base();
    let p = pfn1(&s, a);
    s.st.mem.set(p as u64, PG_ANON_EXCLUSIVE);
    assert_eq!(rule(&s), "anon-exclusive-shared");

    let (mut s, a) = base();
    let p = pfn1(&s, a);
    let head = s.st.mem.folio_head(p as u64);
    s.st.mem.clear(head, crate::memory::PG_MAYBE_SHARED);
    assert_eq!(rule(&s), "mm-id-shared-bit");

    let (mut s, a) = base();
    let p = pfn1(&s, a);
    let head = s.st.mem.folio_head(p as u64);
    s.st.mem.lf(head).nr_pages_mapped -= 1;
    assert_eq!(rule(&s), "nr-pages-mapped");

    for slot in 0..2 {
        let (mut s, a) = base();
        let p = pfn1(&s, a);
        let head = s.st.mem.folio_head(p as u64);
        s.st.mem.lf(head).mm_id_mapcount[slot] += 3;
        assert_eq!(rule(&s), "mm-id-slot");
    }

    let (mut s, a) = base();
    let (k, v) = s.vma_index(1, a).unwrap();
    let e = &mut s.st.mms[k].vmas[v].ptes[1];
    *e = with_layout!(&s.layout, l => l.pte_mkwrite(*e));
    assert_eq!(rule(&s), "writable-cow-not-exclusive");

    let (mut s, a) = base();
    let (k, v) = s.vma_index(1, a).unwrap();
    let free = s.st.mem.nr_pages() - 1;
    assert!(s.st.mem.is_free(free));
    let e = &mut s.st.mms[k].vmas[v].ptes[1];
    *e = with_layout!(&s.layout, l => l.mk_pte(free, crate::arch::PteBits::present()).unwrap());
    assert_eq!(rule(&s), "pte-maps-free-page");
}

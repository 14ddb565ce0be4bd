//! fork(): `dup_mmap()` → `copy_page_range()` → `copy_pte_range()` → `copy_present_ptes()`
//! → `__copy_present_ptes()` (mm/memory.c, kernel/fork.c; v6.8 per PTE, v6.9+ batched;
//! docs/simulation.md, "fork").
//!
//! [`copy_pte_range`] is the per-page-table loop, written once over a parent and a child
//! table and any [`FolioCounts`]: the simulation runs it over its own storage, and
//! [`copy_pte_range_arrays`] over arrays a user owns (docs/helpers.md).

use crate::arch::PteLayout;
use crate::batch::{folio_pte_batch_linear, folio_pte_batch_linear_guess, folio_pte_batch_unchecked, Folio, FpbFlags, Table};
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::memory::{PG_ANON, PG_ANON_EXCLUSIVE, PG_SWAPBACKED};
use crate::mm::{mm_counter, Mm, Prot, Vma, MM_ANONPAGES, MM_FILEPAGES, MM_SHMEMPAGES};
use crate::pgtable;
use crate::rmap::{folio_dup_ptes, FolioCounts, Rmap};
use crate::sim::State;
use crate::stats::Stats;

/// What one VMA's copy needs to know about source and destination.
#[derive(Clone, Copy, Debug)]
pub struct CopyCtx {
    /// Virtual page number of entry 0 of both tables.
    pub start: u64,
    /// `is_cow_mapping()` of the source VMA: the parent's writable PTEs are write-protected.
    pub is_cow: bool,
    /// VM_SHARED: the child's PTEs are clean.
    pub shared: bool,
    /// The child VMA keeps uffd-wp (`userfaultfd_wp(dst_vma)`).
    pub dst_uffd_wp: bool,
    pub dst_prot: Prot,
    /// The `fpb_t` flags `copy_present_ptes()` passes (ignored without batching).
    pub flags: FpbFlags,
    /// MMF_HAS_PINNED of the parent mm.
    pub has_pinned: bool,
    pub dst_mm_id: u32,
    /// The shared zero page's pfn (`vm_normal_page()` gives no page for it).
    pub zero_pfn: u64,
}

/// `copy_present_ptes()` returned -EAGAIN at this entry: it needs a preallocated page.
pub struct Again(pub usize);

/// `vm_normal_page()`: no page for special entries and the shared zero page.
#[inline]
fn vm_normal_page<L: PteLayout>(l: &L, pte: u64, zero_pfn: u64) -> Option<u64> {
    if l.pte_special(pte) {
        return None;
    }
    let pfn = l.pte_pfn(pte);
    (pfn != zero_pfn).then_some(pfn)
}

/// The tables and counts one `copy_pte_range()` works on.
pub struct CopyEnv<'a, M: FolioCounts> {
    pub src: &'a mut [u64],
    pub dst: &'a mut [u64],
    pub mem: &'a mut M,
    pub stats: &'a mut Stats,
    /// The child's rss counters (file, anon, shmem).
    pub rss: &'a mut [i64; 3],
    /// The batches [`plan_batches`] found for this copy, taken in order instead of calling
    /// `folio_pte_batch()` again; `None` to find them as the copy goes.
    pub plan: Option<&'a mut Plan>,
}

/// The batches of a copy found ahead of it: each one's length and the template
/// `copy_present_ptes()` makes from the batch, in table order.
#[derive(Default)]
pub struct Plan {
    batches: Vec<(u64, u64)>,
    next: usize,
}

impl Plan {
    fn pop(&mut self) -> Option<(usize, u64)> {
        let &(nr, tpl) = self.batches.get(self.next)?;
        self.next += 1;
        Some((nr as usize, tpl))
    }
}

/// `copy_pte_range()` over entries `[i, e)` of one page table. A page that needs
/// `copy_present_page()` (the parent may have pinned it) takes `prealloc`; without one the
/// copy stops with [`Again`] at that entry, for the caller to preallocate and call again
/// from there. A preallocated page not used for the next present entry is dropped.
pub fn copy_pte_range<L: PteLayout, M: FolioCounts>(
    l: &L,
    p: &KernelProfile,
    ctx: &CopyCtx,
    env: &mut CopyEnv<'_, M>,
    mut i: usize,
    e: usize,
    prealloc: &mut Option<u64>,
) -> std::result::Result<(), Again> {
    let cont = pgtable::cont_ptes(l, p);
    let none = l.geometry().none_value;
    // Without contpte and MMF_HAS_PINNED, no entry needs copy_present_page() or an unfold:
    // copy_ptes_unpinned() takes the whole range.
    let one_by_one = cont.is_none() && !ctx.has_pinned;
    while i < e {
        if one_by_one && prealloc.is_none() {
            i = copy_ptes_unpinned(l, p, ctx, env, i, e);
            if i >= e {
                break;
            }
        }
        let pte = pgtable::ptep_get(l, cont, env.src, ctx.start, i);
        env.stats.pte_reads += 1;
        if l.pte_none(pte) {
            // The child's entry stays (or becomes: the array form's table is not new) none.
            env.dst[i] = none;
            i += 1;
            continue;
        }
        let nr = copy_present_ptes(l, p, ctx, env, i, pte, e - i, prealloc).map_err(|()| Again(i))?;
        if let Some(pf) = prealloc.take() {
            // A preallocated page is never kept for another address.
            Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p }.put_refs(pf, 1);
        }
        i += nr;
    }
    Ok(())
}

/// What [`copy_ptes_unpinned`] counts, added to [`Stats`] once at the end.
#[derive(Default)]
struct Tally {
    reads: u64,
    /// Entries of a page: one `folio_ref_add()` and one rmap call each.
    pages: u64,
    /// Entries without a page (special, zero page).
    no_page: u64,
    wrprotects: u64,
    /// Batches of large folios, and the entries in them.
    batches: u64,
    batched: u64,
    /// The last run of batches of one length, not yet in the histogram.
    run_nr: usize,
    run: u64,
}

impl Tally {
    /// One batch of `nr` entries of a large folio ([`copy_large_batch`]).
    #[inline(always)]
    fn batch(&mut self, st: &mut Stats, nr: usize) {
        if nr != self.run_nr {
            self.flush_run(st);
            self.run_nr = nr;
        }
        self.run += 1;
        self.batches += 1;
        self.batched += nr as u64;
    }

    #[cold]
    fn flush_run(&mut self, st: &mut Stats) {
        if self.run > 0 {
            if st.batch_histogram.len() <= self.run_nr {
                st.batch_histogram.resize(self.run_nr + 1, 0);
            }
            st.batch_histogram[self.run_nr] += self.run;
            self.run = 0;
        }
    }

    /// Adds the counts to `st`: per batch, `copy_present_ptes()`'s read of the first entry,
    /// `folio_pte_batch()` and its reads, one `folio_ref_add()`, one rmap call with a
    /// mapcount update per page and one of the large mapcount, and `set_ptes()`.
    fn finish(mut self, st: &mut Stats) {
        self.flush_run(st);
        let singles = self.pages + self.no_page;
        st.pte_reads += self.reads + self.batches + self.batched;
        st.folio_pte_batch_calls += self.batches;
        st.refcount_atomics += self.pages + self.batches;
        st.rmap_calls += self.pages + self.batches;
        st.mapcount_updates += self.pages + self.batched + self.batches;
        st.pte_writes += singles + self.batched + self.wrprotects;
        st.batches += self.batches;
        if singles > 0 {
            st.batches += singles;
            if st.batch_histogram.len() < 2 {
                st.batch_histogram.resize(2, 0);
            }
            st.batch_histogram[1] += singles;
        }
    }
}

/// The loop of [`copy_pte_range`] over entries `[i, e)` without contpte and without
/// MMF_HAS_PINNED, where no entry needs `copy_present_page()`: none entries, entries without
/// a page, pages of small folios (or of any folio where the kernel does not batch) one PTE
/// at a time, and batches of large folios. Each entry has the effects [`copy_present_ptes`]
/// gives it (`folio_ref_add()`, `folio_try_dup_anon_rmap_pte()`, which cannot fail here, or
/// `folio_dup_file_rmap_pte()`, then `__copy_present_ptes()`), with the counters of single
/// entries added per run instead of per entry, and runs of order-0 pages in a row taken as
/// blocks ([`copy_order0_block`]). Returns `e`.
#[inline(never)]
fn copy_ptes_unpinned<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &CopyCtx, env: &mut CopyEnv<'_, M>, mut i: usize, e: usize) -> usize {
    let none = l.geometry().none_value;
    let form = p.fpb.filter(|_| p.fork_batched);
    let mut n = Tally::default();
    let mut rss = [0i64; 3];
    // A block failed before this entry: none is tried again until past it.
    let mut no_block_before = 0usize;
    let (src, dst) = (&mut env.src[..e], &mut env.dst[..e]);
    while i < e {
        let pte = src[i];
        if l.pte_none(pte) {
            n.reads += 1;
            dst[i] = none;
            i += 1;
            continue;
        }
        if let Some(page) = vm_normal_page(l, pte, ctx.zero_pfn) {
            let head = env.mem.folio_head(page);
            let order = env.mem.folio_order(head);
            if let (true, Some(form), true) = (order > 0, form, e - i != 1) {
                let folio = Folio { pfn: head, nr_pages: 1 << order };
                let (nr, tpl, child_done) = match env.plan.as_deref_mut().and_then(Plan::pop) {
                    Some((nr, tpl)) => (nr, tpl, false),
                    None => match batch_and_child(l, form, ctx, src, dst, i, e - i, folio) {
                        Some((nr, tpl)) => (nr, tpl, true),
                        None => {
                            let (nr, tpl) = batch_template(l, form, ctx, src, i, e - i, folio);
                            (nr, tpl, false)
                        }
                    },
                };
                copy_large_batch(l, p, ctx, &mut *env.mem, &mut *env.stats, &mut n, &mut rss, &mut src[i..i + nr], &mut dst[i..i + nr], head, order, page, tpl, child_done);
                i += nr;
                continue;
            }
            if order == 0 && i >= no_block_before && e - i >= BLOCK {
                if copy_order0_block(l, ctx, &mut *env.mem, &mut src[i..i + BLOCK], &mut dst[i..i + BLOCK], page, &mut n, &mut rss) {
                    i += BLOCK;
                    continue;
                }
                no_block_before = i + BLOCK;
            }
            *env.mem.refcount_mut(head) += 1;
            let counter = mm_counter(&*env.mem, head);
            if counter == MM_ANONPAGES {
                env.mem.clear(page, PG_ANON_EXCLUSIVE);
            }
            *env.mem.mapcount_mut(page) += 1;
            if order > 0 {
                Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p }.add_large_mapcount(head, 1, ctx.dst_mm_id);
            }
            rss[counter] += 1;
            n.pages += 1;
        } else {
            n.no_page += 1;
        }
        n.reads += 1;
        let mut t = pte;
        if ctx.is_cow && l.pte_write(t) {
            src[i] = l.pte_wrprotect(src[i]);
            n.wrprotects += 1;
            t = l.pte_wrprotect(t);
        }
        dst[i] = child_pte(l, ctx, t);
        i += 1;
    }
    n.finish(env.stats);
    for (r, d) in env.rss.iter_mut().zip(rss) {
        *r += d;
    }
    i
}

/// Entries [`copy_order0_block`] takes at once.
const BLOCK: usize = 64;

/// The effects of [`copy_ptes_unpinned`]'s single entries on `src.len()` entries that map
/// as many order-0 pages in a row from `page`, none of them the zero page, with the same
/// bits (each the first advanced by `pte_advance_pfn()`, as a fault of a run writes them):
/// the per-page counts as passes over slices. Returns false, having changed nothing, when
/// the entries are not such.
#[allow(clippy::too_many_arguments)]
#[inline]
fn copy_order0_block<L: PteLayout, M: FolioCounts>(l: &L, ctx: &CopyCtx, mem: &mut M, src: &mut [u64], dst: &mut [u64], page: u64, n: &mut Tally, rss: &mut [i64; 3]) -> bool {
    let first = src[0];
    let nr = src.len() as u64;
    let Some(step) = l.linear_advance(first, nr) else { return false };
    if !matches!(page.checked_add(nr), Some(end) if end <= mem.nr_pages()) || ctx.zero_pfn.wrapping_sub(page) < nr {
        return false;
    }
    let (mut diff, mut expected) = (0u64, first);
    for &v in src.iter() {
        diff |= v ^ expected;
        expected = expected.wrapping_add(step);
    }
    if diff != 0 || mem.orders(page, nr).iter().fold(0u8, |a, &o| a | o) != 0 {
        return false;
    }
    // folio_ref_add(); mm_counter() and, for anonymous pages, folio_try_dup_anon_rmap_pte()
    // clearing PageAnonExclusive, or folio_dup_file_rmap_pte(); the mapcount.
    for r in mem.refcounts_mut(page, nr) {
        *r += 1;
    }
    let (mut anon, mut shmem) = (0u32, 0u32);
    for f in mem.flags_range_mut(page, nr) {
        let a = (*f & PG_ANON != 0) as u8;
        anon += a as u32;
        shmem += ((*f & PG_SWAPBACKED != 0) as u8 & (a ^ 1)) as u32;
        *f &= !(PG_ANON_EXCLUSIVE * a);
    }
    let (anon, shmem) = (anon as i64, shmem as i64);
    for m in mem.mapcounts_mut(page, nr) {
        *m += 1;
    }
    rss[MM_ANONPAGES] += anon;
    rss[MM_SHMEMPAGES] += shmem;
    rss[MM_FILEPAGES] += nr as i64 - anon - shmem;
    n.reads += nr;
    n.pages += nr;
    // __copy_present_ptes(): every entry has the first one's write bit.
    if ctx.is_cow && l.pte_write(first) {
        for v in src.iter_mut() {
            *v = l.pte_wrprotect(*v);
        }
        n.wrprotects += nr;
    }
    for (d, &v) in dst.iter_mut().zip(src.iter()) {
        *d = child_pte(l, ctx, v);
    }
    true
}

/// [`copy_present_ptes`] of a batch (`src`, `dst`: its entries), mapping pages from `page`
/// of the large folio of `order` at `head`, with `tpl` the template `folio_pte_batch()`
/// gave; without MMF_HAS_PINNED (so `folio_try_dup_anon_rmap_ptes()` cannot fail) and
/// without contpte. Counts into `n` (the caller's read of the first entry too).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn copy_large_batch<L: PteLayout, M: FolioCounts>(
    l: &L,
    p: &KernelProfile,
    ctx: &CopyCtx,
    mem: &mut M,
    st: &mut Stats,
    n: &mut Tally,
    rss: &mut [i64; 3],
    src: &mut [u64],
    dst: &mut [u64],
    head: u64,
    order: u32,
    page: u64,
    tpl: u64,
    child_done: bool,
) {
    let nr = src.len();
    n.batch(st, nr);
    let counter = mm_counter(&*mem, head);
    // folio_ref_add(), then folio_try_dup_anon_rmap_ptes() or folio_dup_file_rmap_ptes().
    *mem.refcount_mut(head) += nr as i32;
    folio_dup_ptes(mem, p.mm_id, head, order, page, nr as u64, ctx.dst_mm_id, counter == MM_ANONPAGES);
    rss[counter] += nr as i64;
    // __copy_present_ptes(): wrprotect_ptes() of the parent's run and set_ptes() of the
    // child's, in one pass where the child's entries step linearly.
    let wrprotect = ctx.is_cow && l.pte_write(tpl);
    if wrprotect {
        n.wrprotects += nr as u64;
        for s in src.iter_mut() {
            *s = l.pte_wrprotect(*s);
        }
    }
    if !child_done {
        let child = child_of_template(l, ctx, tpl);
        match l.linear_advance(child, nr as u64) {
            Some(step) => {
                let mut v = child;
                for d in dst.iter_mut() {
                    *d = v;
                    v = v.wrapping_add(step);
                }
            }
            None => {
                for (k, d) in dst.iter_mut().enumerate() {
                    *d = l.pte_advance_pfn(child, k as u64);
                }
            }
        }
    }
}

/// The first entry of the child's run `__copy_present_ptes()` makes from a batch's template:
/// write-protected where the parent's are, then [`child_pte`].
#[inline(always)]
fn child_of_template<L: PteLayout>(l: &L, ctx: &CopyCtx, tpl: u64) -> u64 {
    let t = if ctx.is_cow && l.pte_write(tpl) { l.pte_wrprotect(tpl) } else { tpl };
    child_pte(l, ctx, t)
}

/// [`batch_template`] where the run is linear ([`folio_pte_batch_linear`]), comparing the
/// run in the pass that writes the child's entries (`dst`) as [`copy_large_batch`] would:
/// one pass over the batch instead of two. `None` when the run is not linear; the child's
/// entries it wrote then are scratch, which the copy writes again (every entry of the range
/// is written once the copy has passed it).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn batch_and_child<L: PteLayout>(l: &L, form: crate::kernel::FpbForm, ctx: &CopyCtx, src: &[u64], dst: &mut [u64], i: usize, max_nr: usize, folio: Folio) -> Option<(usize, u64)> {
    let first = src[i];
    let (step, b) = folio_pte_batch_linear_guess(l, form, first, max_nr, folio, ctx.flags)?;
    let tpl = template_of(l, &b);
    let child = child_of_template(l, ctx, tpl);
    let child_step = l.linear_advance(child, b.nr as u64)?;
    let (mut diff, mut expected, mut c) = (0u64, first, child);
    for (&v, d) in src[i..i + b.nr].iter().zip(&mut dst[i..i + b.nr]) {
        diff |= v ^ expected;
        expected = expected.wrapping_add(step);
        *d = c;
        c = c.wrapping_add(child_step);
    }
    (diff == 0).then_some((b.nr, tpl))
}

/// The child's copy of a parent PTE `__copy_present_ptes()` makes (after the parent's
/// write-protect): old, clean if shared, without uffd-wp unless the child VMA keeps it.
#[inline(always)]
fn child_pte<L: PteLayout>(l: &L, ctx: &CopyCtx, mut t: u64) -> u64 {
    if ctx.shared {
        t = l.pte_mkclean(t);
    }
    t = l.pte_mkold(t);
    if !ctx.dst_uffd_wp {
        t = l.clear_uffd_wp_bit(t);
    }
    t
}

/// `copy_present_ptes()`: a run of PTEs of one large folio at once where the kernel
/// batches, else one PTE (with the pinned-page copy through `copy_present_page()`).
#[allow(clippy::too_many_arguments)]
#[inline]
fn copy_present_ptes<L: PteLayout, M: FolioCounts>(
    l: &L,
    p: &KernelProfile,
    ctx: &CopyCtx,
    env: &mut CopyEnv<'_, M>,
    i: usize,
    pte: u64,
    max_nr: usize,
    prealloc: &mut Option<u64>,
) -> std::result::Result<usize, ()> {
    let Some(page) = vm_normal_page(l, pte, ctx.zero_pfn) else {
        env.stats.batch(1);
        copy_ptes_tail(l, p, ctx, env, i, pte, 1);
        return Ok(1);
    };
    let head = env.mem.folio_head(page);
    let order = env.mem.folio_order(head);
    let anon = env.mem.test(head, PG_ANON);
    let file_counter = mm_counter(&*env.mem, head);
    if let (None, true, true, Some(form)) = (&prealloc, order > 0, max_nr != 1, p.fpb.filter(|_| p.fork_batched)) {
        let (nr, tpl) = match env.plan.as_deref_mut().and_then(Plan::pop) {
            Some(planned) => planned,
            None => batch_template(l, form, ctx, env.src, i, max_nr, Folio { pfn: head, nr_pages: 1 << order }),
        };
        env.stats.folio_pte_batch_calls += 1;
        env.stats.pte_reads += nr as u64;
        let nr = nr as u64;
        let mut r = Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p };
        r.ref_add(head, nr as i32);
        if anon {
            if !r.try_dup_anon_ptes(head, page, nr, ctx.dst_mm_id, ctx.has_pinned) {
                r.put_refs(head, nr as i32);
                return Err(());
            }
            env.rss[MM_ANONPAGES] += nr as i64;
        } else {
            r.dup_file_ptes(head, page, nr, ctx.dst_mm_id);
            env.rss[file_counter] += nr as i64;
        }
        env.stats.batch(nr as usize);
        copy_ptes_tail(l, p, ctx, env, i, tpl, nr as usize);
        return Ok(nr as usize);
    }
    let mut r = Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p };
    r.ref_add(head, 1);
    if anon {
        if !r.try_dup_anon_ptes(head, page, 1, ctx.dst_mm_id, ctx.has_pinned) {
            r.put_refs(head, 1);
            return copy_present_page(l, p, ctx, env, i, pte, page, prealloc);
        }
        env.rss[MM_ANONPAGES] += 1;
    } else {
        r.dup_file_ptes(head, page, 1, ctx.dst_mm_id);
        env.rss[file_counter] += 1;
    }
    env.stats.batch(1);
    copy_ptes_tail(l, p, ctx, env, i, pte, 1);
    Ok(1)
}

/// `folio_pte_batch()` from entry `i` of `src` as `copy_present_ptes()` calls it: the
/// batch's length and the template for the child (writable if any entry was, v6.12+).
#[inline(always)]
fn batch_template<L: PteLayout>(l: &L, form: crate::kernel::FpbForm, ctx: &CopyCtx, src: &[u64], i: usize, max_nr: usize, folio: Folio) -> (usize, u64) {
    let b = folio_pte_batch_linear(l, form, src, i, max_nr, folio, ctx.flags)
        .unwrap_or_else(|| folio_pte_batch_unchecked(l, form, Table { ptes: src, first_vpn: ctx.start }, i, max_nr, folio, ctx.flags));
    (b.nr, template_of(l, &b))
}

/// The template `copy_present_ptes()` makes from what `folio_pte_batch()` reported:
/// writable if any entry was (v6.12+).
#[inline(always)]
fn template_of<L: PteLayout>(l: &L, b: &crate::batch::Batch) -> u64 {
    if b.any_writable == Some(true) {
        l.pte_mkwrite(b.pte)
    } else {
        b.pte
    }
}

/// `copy_present_page()`: the child gets its own copy of a page the parent may have
/// pinned; the parent's PTE and exclusivity stay as they are.
#[allow(clippy::too_many_arguments)]
fn copy_present_page<L: PteLayout, M: FolioCounts>(
    l: &L,
    p: &KernelProfile,
    ctx: &CopyCtx,
    env: &mut CopyEnv<'_, M>,
    i: usize,
    pte: u64,
    page: u64,
    prealloc: &mut Option<u64>,
) -> std::result::Result<usize, ()> {
    let Some(new) = prealloc.take() else { return Err(()) };
    env.mem.copy_contents(new, page);
    env.stats.pages_copied += 1;
    Rmap { mem: &mut *env.mem, stats: &mut *env.stats, profile: p }.add_new_anon(new, ctx.dst_mm_id);
    env.rss[MM_ANONPAGES] += 1;
    // mk_pte(new, vm_page_prot) without pte_sw_mkyoung(): young only where the arch's
    // user template is (x86, arm64), then maybe_mkwrite(pte_mkdirty()).
    let mut n = l.pte_mkdirty(l.pfn_pte_template(new, ctx.dst_prot.exec, ctx.dst_prot.none()));
    if ctx.dst_prot.write {
        n = l.pte_mkwrite(n);
    }
    if ctx.dst_uffd_wp && l.pte_uffd_wp(pte) {
        n = l.set_uffd_wp_bit(n);
    }
    child_set_ptes(l, p, ctx, env, i, n, 1);
    env.stats.batch(1);
    Ok(1)
}

/// `__copy_present_ptes()`: write-protect the parent's run if the mapping is COW and the
/// template is writable (`wrprotect_ptes()`), then `set_ptes()` the child's run from the
/// template made old, clean if shared, and without uffd-wp unless the child VMA has it.
#[allow(clippy::too_many_arguments)]
#[inline]
fn copy_ptes_tail<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &CopyCtx, env: &mut CopyEnv<'_, M>, i: usize, tpl: u64, nr: usize) {
    let mut t = tpl;
    if ctx.is_cow && l.pte_write(t) {
        pgtable::wrprotect_ptes(l, pgtable::cont_ptes(l, p), env.src, ctx.start, i, nr, env.stats);
        t = l.pte_wrprotect(t);
    }
    child_set_ptes(l, p, ctx, env, i, child_pte(l, ctx, t), nr);
}

/// `set_ptes()` into the child's table (not yet part of the child mm).
#[inline]
fn child_set_ptes<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &CopyCtx, env: &mut CopyEnv<'_, M>, i: usize, pte: u64, nr: usize) {
    let mem = &*env.mem;
    pgtable::set_ptes(l, pgtable::cont_ptes(l, p), env.dst, ctx.start, i, pte, nr, |pfn| pgtable::folio_of(mem, pfn), env.stats);
}

/// The page tables of a table of `len` entries whose entry 0 maps virtual page `start`:
/// `[a, e)` cut at PMD boundaries.
fn page_tables<L: PteLayout>(l: &L, start: u64, len: usize) -> impl Iterator<Item = (usize, usize)> {
    let ptrs = l.geometry().ptrs_per_pte as usize;
    let mut a = 0usize;
    std::iter::from_fn(move || {
        (a < len).then(|| {
            let e = len.min(a + ptrs - ((start as usize + a) & (ptrs - 1)));
            let r = (a, e);
            a = e;
            r
        })
    })
}

/// Checks `src` as [`pgtable::check_table`] does (the same error for the same first bad
/// entry) and finds, in the same pass, the batches the copy will take, so that the copy
/// neither checks nor scans them again. Only without contpte, where the copy changes
/// nothing the later batches read. An entry inside a batch needs no check: it is present,
/// not special and maps a page of the folio whose first entry was checked. Gives up
/// (`Ok(false)`, the check unfinished) when the plan would hold more than `limit` batches.
fn plan_batches<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &CopyCtx, src: &[u64], mem: &M, plan: &mut Plan, limit: usize) -> Result<bool> {
    let form = p.fpb.filter(|_| p.fork_batched);
    // The folio checked last, as in check_table().
    let (mut lo, mut hi) = (0u64, 0u64);
    for (a, e) in page_tables(l, ctx.start, src.len()) {
        let mut i = a;
        while i < e {
            let v = src[i];
            let pfn = l.pte_pfn(v);
            let folio = if pfn.wrapping_sub(lo) < hi.wrapping_sub(lo) && l.pte_present(v) && !l.pte_special(v) {
                Some((lo, hi - lo))
            } else {
                let f = pgtable::check_entry(l, i, v, ctx.zero_pfn, mem, "src")?;
                if let Some((head, nr)) = f {
                    (lo, hi) = (head, head + nr);
                }
                f
            };
            match (folio, form) {
                (Some((head, nr_pages)), Some(form)) if nr_pages > 1 && e - i != 1 => {
                    if plan.batches.len() == limit || plan.batches.try_reserve(1).is_err() {
                        return Ok(false);
                    }
                    let (nr, tpl) = batch_template(l, form, ctx, src, i, e - i, Folio { pfn: head, nr_pages });
                    plan.batches.push((nr as u64, tpl));
                    i += nr;
                }
                _ => i += 1,
            }
        }
    }
    Ok(true)
}

/// `copy_page_range()` of one VMA over arrays a user owns: `src` (the parent's table,
/// write-protected where the copy is COW) and `dst` (the child's: every entry written, none
/// where the parent's is none, as in a new page table) cut into page tables at PMD
/// boundaries, one [`copy_pte_range`] each. `src` is checked first
/// ([`pgtable::check_table`]): a bad entry changes nothing. The caller has checked the
/// lengths.
pub fn copy_pte_range_arrays<L: PteLayout, M: FolioCounts>(l: &L, p: &KernelProfile, ctx: &CopyCtx, env: &mut CopyEnv<'_, M>) -> Result<()> {
    if ctx.has_pinned {
        return Err(Error::value("the array form of copy_pte_range() models a parent without MMF_HAS_PINNED"));
    }
    let mut plan = Plan::default();
    // At most 2 bytes of plan per entry; past that the batches are found as the copy goes.
    let limit = env.src.len() / 8 + 16;
    let planned = pgtable::cont_ptes(l, p).is_none() && plan_batches(l, p, ctx, env.src, &*env.mem, &mut plan, limit)?;
    if !planned {
        pgtable::check_table(l, env.src, ctx.zero_pfn, &*env.mem, "src")?;
    }
    let mut env = CopyEnv {
        src: &mut *env.src,
        dst: &mut *env.dst,
        mem: &mut *env.mem,
        stats: &mut *env.stats,
        rss: &mut *env.rss,
        plan: planned.then_some(&mut plan),
    };
    for (a, e) in page_tables(l, ctx.start, env.src.len()) {
        if pgtable::cont_ptes(l, p).is_some() {
            // A single-entry set_ptes() reads what it overwrites (contpte unfold): empty first.
            env.dst[a..e].fill(l.geometry().none_value);
        }
        // Without MMF_HAS_PINNED no page needs copying, so there is no -EAGAIN.
        copy_pte_range(l, p, ctx, &mut env, a, e, &mut None)
            .map_err(|Again(i)| Error::value(format!("entry {i} needs copy_present_page(), which the array form has not")))?;
    }
    Ok(())
}

impl State {
    /// `dup_mmap()`: a child with a copy of every VMA not marked MADV_DONTFORK; page tables
    /// copied where `vma_needs_copy()` says so. Returns the child's pid.
    pub fn fork<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, k: usize) -> Result<u32> {
        let pid = self.mms.len() as u32 + 1;
        let c = self.mms.len();
        let none = l.geometry().none_value;
        // The child's page tables first, so that running out of host memory changes nothing.
        let mut tables = Vec::new();
        for v in self.mms[k].vmas.iter().filter(|v| !v.dontfork) {
            // THP-backed where the host allows: a fault per 4 KiB of a fresh table costs more
            // than the copy into it. A none of 0 is the kernel's zeroing, not a pass of ours.
            let t = if none == 0 {
                crate::alloc::try_zeroed_huge(v.ptes.len(), "a page table")?
            } else {
                let mut t = crate::alloc::try_with_capacity_huge::<u64>(v.ptes.len(), "a page table")?;
                t.resize(v.ptes.len(), none);
                t
            };
            tables.push(crate::ptes::PteTable::from(t));
        }
        let mut tables = tables.into_iter();
        self.mms.push(Mm {
            pid,
            mm_id: pid,
            vmas: Vec::new(),
            rss: [0; 3],
            has_pinned: false,
            exited: false,
            next_vpn: self.mms[k].next_vpn,
            thp_disable: self.mms[k].thp_disable,
        });
        let caps = l.caps();
        let mut rss = [0i64; 3];
        for vi in 0..self.mms[k].vmas.len() {
            let src = &self.mms[k].vmas[vi];
            if src.dontfork {
                continue;
            }
            let mut dst: Vma = src.clone_without_ptes();
            dst.ptes = tables.next().expect("one table per copied VMA");
            // dup_userfaultfd(): without UFFD_FEATURE_EVENT_FORK the child is unregistered.
            dst.uffd_wp = src.uffd_wp && src.uffd_event_fork;
            dst.uffd_event_fork = dst.uffd_wp;
            let src_anon_vma = src.anon_vma;
            let wipe = src.wipeonfork;
            let ctx = CopyCtx {
                start: src.start,
                is_cow: src.is_cow(),
                shared: src.shared,
                dst_uffd_wp: dst.uffd_wp,
                dst_prot: dst.prot,
                flags: p
                    .fpb
                    .map(|form| {
                        FpbFlags::from_bits(
                            form.flag_family(),
                            FpbFlags::fork_bits(form, src.shared, src.soft_dirty_tracking(caps)),
                        )
                        .expect("fork flags are valid for their own form")
                    })
                    .unwrap_or_default(),
                has_pinned: self.mms[k].has_pinned,
                dst_mm_id: pid,
                zero_pfn: self.zero_pfn,
            };
            dst.anon_vma = if src_anon_vma != 0 && !wipe { self.new_anon_vma() } else { 0 };
            // vma_needs_copy(): uffd-wp in the child, or anonymous pages in the parent.
            if !wipe && (dst.uffd_wp || src_anon_vma != 0) {
                self.copy_huge_pmds(l, p, k, vi, ctx.dst_mm_id, ctx.has_pinned, &mut dst, &mut rss);
                self.copy_page_range(l, p, &ctx, k, vi, &mut dst.ptes, &mut rss)?;
            }
            self.mms[c].vmas.push(dst);
        }
        self.mms[c].rss = rss;
        // flush_tlb_mm() of the parent after write-protecting its COW PTEs.
        self.op.tlb_flush_ranges += 1;
        Ok(pid)
    }

    /// `copy_page_range()`: one `copy_pte_range()` per page table (PMD range).
    #[allow(clippy::too_many_arguments)]
    fn copy_page_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, ctx: &CopyCtx, k: usize, vi: usize, dst: &mut [u64], rss: &mut [i64; 3]) -> Result<()> {
        let len = dst.len();
        let ptrs = self.ptrs_per_pte as usize;
        let mut a = 0usize;
        while a < len {
            let to_pmd = ptrs - ((ctx.start as usize + a) & (ptrs - 1));
            let e = len.min(a + to_pmd);
            // A huge PMD copy_huge_pmds() copied has no page table to walk.
            if !self.mms[k].vmas[vi].pmds.contains_key(&(ctx.start + a as u64)) {
                self.copy_pte_range(l, p, ctx, k, vi, dst, a, e, rss)?;
            }
            self.ticker.tick((e - a) as u64)?;
            a = e;
        }
        Ok(())
    }

    /// [`copy_pte_range`] over entries `[a, e)` of VMA `vi`'s table, with the -EAGAIN retry
    /// that preallocates one order-0 page for a pinned exclusive page.
    #[allow(clippy::too_many_arguments)]
    fn copy_pte_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, ctx: &CopyCtx, k: usize, vi: usize, dst: &mut [u64], a: usize, e: usize, rss: &mut [i64; 3]) -> Result<()> {
        let mut prealloc: Option<u64> = None;
        let mut i = a;
        loop {
            let State { mem, mms, op, .. } = self;
            let mut env = CopyEnv { src: &mut mms[k].vmas[vi].ptes[..], dst: &mut *dst, mem, stats: op, rss: &mut *rss, plan: None };
            match copy_pte_range(l, p, ctx, &mut env, i, e, &mut prealloc) {
                Ok(()) => break,
                Err(Again(at)) => i = at,
            }
            self.op.fork_eagain_retries += 1;
            let pf = self.mem.alloc(0).ok_or_else(|| {
                Error::out_of_memory("fork: out of memory preallocating a page for a pinned page")
            })?;
            self.op.allocated(0);
            prealloc = Some(pf);
        }
        if let Some(pf) = prealloc {
            self.rmap(p).put_refs(pf, 1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::arch::Layout;
    use crate::kernel::KernelProfile;
    use crate::mm::Prot;
    use crate::sim::Simulation;

    /// A parent with every kind of entry the unpinned loop takes: runs of order-0 pages
    /// (written, read as the zero page, with holes), whole and partly unmapped large folios
    /// of several sizes, read-only ranges, private and shared file pages.
    fn parent(kernel: &str, has_pinned: bool) -> (Simulation, u32) {
        let layout = Layout::by_name("x86-64", None).unwrap();
        let mut s = Simulation::new(layout, KernelProfile::parse(kernel).unwrap(), 64 << 20, 11).unwrap();
        let p = s.spawn();
        let rw = Prot { read: true, write: true, exec: false };
        let ro = Prot { read: true, write: false, exec: false };
        // Runs of one folio that are not linear inside one VMA, for batch_and_child() to
        // reject: holes (MADV_DONTNEED) and pages whose COW a write broke while an earlier
        // child shared them (the first and a middle page of a folio).
        let mixed = s.mmap(p, None, 1 << 20, rw, false, None, Some(&[64 << 10]), false, false, false).unwrap();
        s.touch(p, mixed, 1 << 20, true).unwrap();
        s.madvise(p, mixed + 21 * 4096, 3 * 4096, "dontneed").unwrap();
        s.madvise(p, mixed + 79 * 4096, 4096, "dontneed").unwrap();
        s.fork(p).unwrap();
        s.touch(p, mixed + 39 * 4096, 4096, true).unwrap();
        s.touch(p, mixed + 48 * 4096, 4096, true).unwrap();
        let small = s.mmap(p, None, 4 << 20, rw, false, None, Some(&[]), false, false, false).unwrap();
        s.touch(p, small, 4 << 20, true).unwrap();
        s.munmap(p, small + 37 * 4096, 5 * 4096).unwrap();
        s.madvise(p, small + 300 * 4096, 3 * 4096, "dontneed").unwrap();
        s.touch(p, small + 300 * 4096, 4096, false).unwrap();
        s.mprotect(p, small + 100 * 4096, 20 * 4096, ro).unwrap();
        let large = s.mmap(p, None, 8 << 20, rw, false, None, Some(&[16 << 10, 64 << 10, 2 << 20]), false, false, false).unwrap();
        s.touch(p, large, 6 << 20, true).unwrap();
        s.touch(p, large + (6 << 20), 1 << 20, false).unwrap();
        s.munmap(p, large + (3 << 20) + 21 * 4096, 7 * 4096).unwrap();
        s.mprotect(p, large + (1 << 20) + 8 * 4096, 40 * 4096, ro).unwrap();
        for shmem in [false, true] {
            let f = s.create_file(1 << 20, 64 << 10, shmem, None).unwrap();
            for shared in [false, true] {
                let a = s.mmap(p, None, 1 << 20, rw, shared, Some((f, 0)), None, false, false, false).unwrap();
                s.touch(p, a, 1 << 20, shared).unwrap();
            }
        }
        let k = s.st.mms.iter().position(|m| m.pid == p).unwrap();
        s.st.mms[k].has_pinned = has_pinned;
        (s, p)
    }

    /// Without pinned folios, MMF_HAS_PINNED changes nothing a fork does; it sends every
    /// entry through copy_present_ptes() instead of the unpinned loop (blocks of order-0
    /// pages, linear batches): the same tables, counts and counters.
    #[test]
    fn the_unpinned_loop_matches_copy_present_ptes() {
        for kernel in ["6.8", "6.9", "6.12", "6.15", "6.18"] {
            let (mut fast, p) = parent(kernel, false);
            let (mut slow, _) = parent(kernel, true);
            let before = fast.st.total.clone();
            fast.fork(p).unwrap();
            slow.fork(p).unwrap();
            assert!(fast.st.total.batches > before.batches);
            assert_eq!(fast.st.total, slow.st.total, "{kernel}");
            let (a, b) = (&fast.st.mem, &slow.st.mem);
            assert_eq!((&a.order, &a.flags, &a.mapcount, &a.refcount), (&b.order, &b.flags, &b.mapcount, &b.refcount), "{kernel}");
            assert_eq!(a.large_folios(), b.large_folios(), "{kernel}");
            for (x, y) in fast.st.mms.iter().zip(&slow.st.mms) {
                assert_eq!(x.rss, y.rss, "{kernel}");
                for (v, w) in x.vmas.iter().zip(&y.vmas) {
                    assert_eq!(&v.ptes[..], &w.ptes[..], "{kernel}");
                }
            }
        }
    }
}

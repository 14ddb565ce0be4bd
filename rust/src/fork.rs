//! fork(): `dup_mmap()` → `copy_page_range()` → `copy_pte_range()` → `copy_present_ptes()`
//! → `__copy_present_ptes()` (mm/memory.c, kernel/fork.c; v6.8 per PTE, v6.9+ batched;
//! docs/simulation.md, "fork").

use crate::arch::PteLayout;
use crate::batch::{folio_pte_batch_unchecked, Folio, FpbFlags, Table};
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::memory::PG_ANON;
use crate::mm::{mm_counter, Mm, Vma, MM_ANONPAGES};
use crate::contpte::{folio_of, Cont};
use crate::rmap::Rmap;
use crate::sim::State;

/// What one VMA's copy needs to know about source and destination.
struct CopyCtx {
    k: usize,
    vi: usize,
    start: u64,
    is_cow: bool,
    shared: bool,
    dst_uffd_wp: bool,
    dst_prot_write: bool,
    dst_prot: crate::mm::Prot,
    flags: FpbFlags,
    has_pinned: bool,
    dst_mm_id: u32,
}

/// `copy_present_ptes()` asks for a preallocated page (-EAGAIN).
struct Again;

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
            tables.push(crate::alloc::try_filled(v.ptes.len(), none, "a page table")?);
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
                k,
                vi,
                start: src.start,
                is_cow: src.is_cow(),
                shared: src.shared,
                dst_uffd_wp: dst.uffd_wp,
                dst_prot_write: dst.prot.write,
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
            };
            dst.anon_vma = if src_anon_vma != 0 && !wipe { self.new_anon_vma() } else { 0 };
            // vma_needs_copy(): uffd-wp in the child, or anonymous pages in the parent.
            if !wipe && (dst.uffd_wp || src_anon_vma != 0) {
                self.copy_huge_pmds(l, p, k, vi, ctx.dst_mm_id, ctx.has_pinned, &mut dst, &mut rss);
                self.copy_page_range(l, p, &ctx, &mut dst.ptes, &mut rss)?;
            }
            self.mms[c].vmas.push(dst);
        }
        self.mms[c].rss = rss;
        // flush_tlb_mm() of the parent after write-protecting its COW PTEs.
        self.op.tlb_flush_ranges += 1;
        Ok(pid)
    }

    /// `copy_page_range()`: one `copy_pte_range()` per page table (PMD range).
    fn copy_page_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, ctx: &CopyCtx, dst: &mut [u64], rss: &mut [i64; 3]) -> Result<()> {
        let len = dst.len();
        let ptrs = self.ptrs_per_pte as usize;
        let mut a = 0usize;
        while a < len {
            let to_pmd = ptrs - ((ctx.start as usize + a) & (ptrs - 1));
            let e = len.min(a + to_pmd);
            // A huge PMD copy_huge_pmds() copied has no page table to walk.
            if !self.mms[ctx.k].vmas[ctx.vi].pmds.contains_key(&(ctx.start + a as u64)) {
                self.copy_pte_range(l, p, ctx, dst, a, e, rss)?;
            }
            self.ticker.tick((e - a) as u64)?;
            a = e;
        }
        Ok(())
    }

    /// `copy_pte_range()` over entries `[a, e)` of one page table, with the -EAGAIN retry
    /// that preallocates one order-0 page for a pinned exclusive page.
    #[allow(clippy::too_many_arguments)]
    fn copy_pte_range<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, ctx: &CopyCtx, dst: &mut [u64], a: usize, e: usize, rss: &mut [i64; 3]) -> Result<()> {
        let mut prealloc: Option<u64> = None;
        let mut i = a;
        loop {
            let mut again = false;
            while i < e {
                let pte = self.ptep_get(l, p, ctx.k, ctx.vi, i);
                self.op.pte_reads += 1;
                if l.pte_none(pte) {
                    i += 1;
                    continue;
                }
                match self.copy_present_ptes(l, p, ctx, dst, i, pte, e - i, &mut prealloc, rss) {
                    Ok(nr) => {
                        if let Some(pf) = prealloc.take() {
                            // A preallocated page is never kept for another address.
                            Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p }.put_refs(pf, 1);
                        }
                        i += nr;
                    }
                    Err(Again) => {
                        again = true;
                        break;
                    }
                }
            }
            if !again {
                break;
            }
            self.op.fork_eagain_retries += 1;
            let pf = self.mem.alloc(0).ok_or_else(|| {
                Error::out_of_memory("fork: out of memory preallocating a page for a pinned page")
            })?;
            self.op.allocated(0);
            prealloc = Some(pf);
        }
        if let Some(pf) = prealloc {
            Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p }.put_refs(pf, 1);
        }
        Ok(())
    }

    /// `copy_present_ptes()`: a run of PTEs of one large folio at once where the kernel
    /// batches, else one PTE (with the pinned-page copy through `copy_present_page()`).
    #[allow(clippy::too_many_arguments)]
    fn copy_present_ptes<L: PteLayout>(
        &mut self,
        l: &L,
        p: &KernelProfile,
        ctx: &CopyCtx,
        dst: &mut [u64],
        i: usize,
        pte: u64,
        max_nr: usize,
        prealloc: &mut Option<u64>,
        rss: &mut [i64; 3],
    ) -> std::result::Result<usize, Again> {
        let Some(page) = self.vm_normal_page(l, pte) else {
            self.op.batch(1);
            self.copy_ptes_tail(l, p, ctx, dst, i, pte, 1);
            return Ok(1);
        };
        let head = self.mem.folio_head(page);
        let order = self.mem.folio_order(head);
        let anon = self.mem.test(head, PG_ANON);
        let file_counter = mm_counter(&self.mem, head);
        if let (None, true, true, Some(form)) = (&prealloc, order > 0, max_nr != 1, p.fpb.filter(|_| p.fork_batched)) {
            let table = Table { ptes: &self.mms[ctx.k].vmas[ctx.vi].ptes, first_vpn: ctx.start };
            let folio = Folio { pfn: head, nr_pages: 1 << order };
            let b = folio_pte_batch_unchecked(l, form, table, i, max_nr, folio, ctx.flags);
            self.op.folio_pte_batch_calls += 1;
            self.op.pte_reads += b.nr as u64;
            let nr = b.nr as u64;
            let mut r = Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p };
            r.ref_add(head, nr as i32);
            if anon {
                if !r.try_dup_anon_ptes(head, page, nr, ctx.dst_mm_id, ctx.has_pinned) {
                    r.put_refs(head, nr as i32);
                    return Err(Again);
                }
                rss[MM_ANONPAGES] += nr as i64;
            } else {
                r.dup_file_ptes(head, page, nr, ctx.dst_mm_id);
                rss[file_counter] += nr as i64;
            }
            let mut tpl = b.pte;
            if b.any_writable == Some(true) {
                tpl = l.pte_mkwrite(tpl);
            }
            self.op.batch(b.nr);
            self.copy_ptes_tail(l, p, ctx, dst, i, tpl, b.nr);
            return Ok(b.nr);
        }
        let mut r = Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p };
        r.ref_add(head, 1);
        if anon {
            if !r.try_dup_anon_ptes(head, page, 1, ctx.dst_mm_id, ctx.has_pinned) {
                r.put_refs(head, 1);
                return self.copy_present_page(l, p, ctx, dst, i, pte, page, prealloc, rss);
            }
            rss[MM_ANONPAGES] += 1;
        } else {
            r.dup_file_ptes(head, page, 1, ctx.dst_mm_id);
            rss[file_counter] += 1;
        }
        self.op.batch(1);
        self.copy_ptes_tail(l, p, ctx, dst, i, pte, 1);
        Ok(1)
    }

    /// `copy_present_page()`: the child gets its own copy of a page the parent may have
    /// pinned; the parent's PTE and exclusivity stay as they are.
    #[allow(clippy::too_many_arguments)]
    fn copy_present_page<L: PteLayout>(
        &mut self,
        l: &L,
        p: &KernelProfile,
        ctx: &CopyCtx,
        dst: &mut [u64],
        i: usize,
        pte: u64,
        page: u64,
        prealloc: &mut Option<u64>,
        rss: &mut [i64; 3],
    ) -> std::result::Result<usize, Again> {
        let Some(new) = prealloc.take() else { return Err(Again) };
        self.mem.token[new as usize] = self.mem.token[page as usize];
        self.op.pages_copied += 1;
        Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p }.add_new_anon(new, ctx.dst_mm_id);
        rss[MM_ANONPAGES] += 1;
        // mk_pte(new, vm_page_prot) without pte_sw_mkyoung(): young only where the arch's
        // user template is (x86, arm64), then maybe_mkwrite(pte_mkdirty()).
        let mut n = l.pte_mkdirty(l.pfn_pte_template(new, ctx.dst_prot.exec, ctx.dst_prot.none()));
        if ctx.dst_prot_write {
            n = l.pte_mkwrite(n);
        }
        if ctx.dst_uffd_wp && l.pte_uffd_wp(pte) {
            n = l.set_uffd_wp_bit(n);
        }
        self.child_set_ptes(l, p, ctx, dst, i, n, 1);
        self.op.batch(1);
        Ok(1)
    }

    /// `__copy_present_ptes()`: write-protect the parent's run if the mapping is COW and the
    /// template is writable, then `set_ptes()` the child's run from the template made old,
    /// clean if shared, and without uffd-wp unless the child VMA has it.
    #[allow(clippy::too_many_arguments)]
    fn copy_ptes_tail<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, ctx: &CopyCtx, dst: &mut [u64], i: usize, tpl: u64, nr: usize) {
        let mut t = tpl;
        if ctx.is_cow && l.pte_write(t) {
            // wrprotect_ptes(): blocks covered in part are unfolded, whole ones keep PTE_CONT.
            self.unfold_partial(l, p, ctx.k, ctx.vi, i, nr);
            let src = &mut self.mms[ctx.k].vmas[ctx.vi].ptes;
            for e in &mut src[i..i + nr] {
                *e = l.pte_wrprotect(*e);
            }
            self.op.pte_writes += nr as u64;
            t = l.pte_wrprotect(t);
        }
        if ctx.shared {
            t = l.pte_mkclean(t);
        }
        t = l.pte_mkold(t);
        if !ctx.dst_uffd_wp {
            t = l.clear_uffd_wp_bit(t);
        }
        self.child_set_ptes(l, p, ctx, dst, i, t, nr);
    }

    /// `set_ptes()` into the child's table (not yet part of the child mm).
    #[allow(clippy::too_many_arguments)]
    fn child_set_ptes<L: PteLayout>(&mut self, l: &L, p: &KernelProfile, ctx: &CopyCtx, dst: &mut [u64], i: usize, pte: u64, nr: usize) {
        self.op.pte_writes += nr as u64;
        let Some(n) = State::cont_ptes(l, p) else {
            for (j, e) in dst[i..i + nr].iter_mut().enumerate() {
                *e = l.pte_advance_pfn(pte, j as u64);
            }
            return;
        };
        let mut c = Cont { t: dst, first_vpn: ctx.start, n };
        if nr == 1 {
            let mem = &self.mem;
            c.set_pte(l, i, pte, |pfn| folio_of(mem, pfn), &mut self.op);
        } else {
            c.set_ptes(l, i, pte, nr);
        }
    }
}

//! The whole-system simulation: physical memory, processes, files and pins, and the
//! operations on them. Each operation lives in its own module (fault, fork, zap, mprotect,
//! gup); this one holds the state, argument checks and the "all or nothing" rule.
//!
//! Every public operation either succeeds or returns an error with the state untouched: it
//! checks its arguments first, and an operation that may run out of memory half-way runs on
//! a copy of the state when free memory is short of its worst case.

use crate::arch::{Layout, PteLayout};
use crate::error::{Error, Result};
use crate::kernel::KernelProfile;
use crate::memory::Memory;
use crate::mm::{File, Mm, Pin, Prot, ShmemKind, Vma, NOT_CACHED};
use crate::shmem::{ShmemHuge, ShmemPolicy, ShmemSize};
use crate::rmap::Rmap;
use crate::stats::Stats;
use crate::watch::{Ticker, Watch};
use crate::with_layout;

/// Where the first mmap of a process goes (bytes), and the gap between mappings.
const MMAP_BASE: u64 = 0x10_0000_0000;

/// The largest mapping the model takes, in pages (its page table is one array).
pub const MAX_VMA_PAGES: u64 = 1 << 31;

/// Work (pages or PTEs) from which a step may be interrupted: such a step runs on a copy of
/// the state, so that stopping it leaves the state as it was. Smaller steps (a tenth of a
/// second or so) finish, and a stop asked meanwhile takes effect when they end.
pub const INTERRUPTIBLE_WORK: u64 = 1 << 20;

/// The largest state (host bytes) that a long step copies only to be interruptible: beyond
/// it, the copy would double the host memory of exactly the steps that need the most, so the
/// step runs in place and a stop asked meanwhile takes effect when it ends. 64 MiB is a state
/// of about 8 GiB of simulated memory, whose longest steps take a fraction of a second.
pub const DEFAULT_STEP_COPY_LIMIT: u64 = 64 << 20;

/// The simulated system.
#[derive(Clone, Debug)]
pub struct State {
    pub mem: Memory,
    pub mms: Vec<Mm>,
    pub files: Vec<File>,
    pub pins: Vec<Pin>,
    /// Counters of the last operation, and of the whole run.
    pub op: Stats,
    pub total: Stats,
    /// The next content token a write stores (0 is "zero-filled").
    pub next_token: u32,
    pub next_anon_vma: u32,
    /// The shared zero page's pfn (one past the end of RAM; never allocated).
    pub zero_pfn: u64,
    pub page_shift: u32,
    pub ptrs_per_pte: u64,
    pub pmd_order: u32,
    /// The sysfs THP controls for anonymous memory ([`crate::policy`]).
    pub thp: crate::policy::ThpPolicy,
    /// `fault_around_bytes` in pages (mm/memory.c `fault_around_pages`; 1 = no fault-around).
    pub fault_around_pages: u64,
    /// The sysfs shmem THP controls.
    pub shmem_policy: ShmemPolicy,
    /// Asks the watch, if any, whether a long step may go on (not part of the state).
    pub ticker: Ticker,
    /// On a step's copy of the state: the page-table stores copied, for
    /// [`State::adopt_exported`] (not part of the state; empty otherwise).
    pub copies: crate::ptes::StoreCopies,
}

/// A simulation: a layout, a kernel profile and the state.
#[derive(Clone, Debug)]
pub struct Simulation {
    pub layout: Layout,
    pub profile: KernelProfile,
    pub st: State,
    /// See [`DEFAULT_STEP_COPY_LIMIT`] and [`Simulation::set_step_copy_limit`].
    pub step_copy_limit: u64,
}

/// What one access does: read, write, or GUP's unshare of a R/O longterm pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
}

pub fn order_of_size(size: u64, page_shift: u32) -> Option<u32> {
    if size == 0 || !size.is_power_of_two() || size < (1 << page_shift) {
        return None;
    }
    Some(size.trailing_zeros() - page_shift)
}

impl Simulation {
    /// `memory_bytes` of RAM (a multiple of the page size) on `layout`, running `profile`.
    pub fn new(layout: Layout, profile: KernelProfile, memory_bytes: u64, seed: u64) -> Result<Simulation> {
        let g = layout.geometry();
        let page = 1u64 << g.page_shift;
        if memory_bytes == 0 || memory_bytes % page != 0 {
            return Err(Error::value(format!(
                "memory {memory_bytes} bytes is not a positive multiple of the {page}-byte page"
            )));
        }
        let nr_pages = memory_bytes / page;
        if nr_pages + 1 > g.max_pfn {
            return Err(Error::value(format!(
                "{nr_pages} pages do not fit the {} PFN field",
                layout.name()
            )));
        }
        let pmd_order = g.ptrs_per_pte.trailing_zeros();
        let mem = Memory::new(nr_pages, pmd_order, seed)?;
        Ok(Simulation {
            layout,
            profile,
            step_copy_limit: DEFAULT_STEP_COPY_LIMIT,
            st: State {
                mem,
                mms: Vec::new(),
                files: Vec::new(),
                pins: Vec::new(),
                op: Stats::default(),
                total: Stats::default(),
                next_token: 1,
                next_anon_vma: 1,
                zero_pfn: nr_pages,
                page_shift: g.page_shift,
                ptrs_per_pte: g.ptrs_per_pte,
                pmd_order,
                thp: crate::policy::ThpPolicy::default_for(pmd_order),
                fault_around_pages: (65536 >> g.page_shift).max(1),
                shmem_policy: ShmemPolicy::new(pmd_order),
                ticker: Ticker::default(),
                copies: Default::default(),
            },
        })
    }

    /// Sets the simulated fragmentation: allocations of `order` fail with probability `p`.
    pub fn set_fallback(&mut self, order: u32, p: f64) -> Result<()> {
        if order == 0 || order > self.st.pmd_order {
            return Err(Error::value(format!(
                "fragmentation applies to folio orders 1..={}, not {order}",
                self.st.pmd_order
            )));
        }
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::value(format!("fallback probability {p} is not in [0, 1]")));
        }
        self.st.mem.fallback[order as usize] = p;
        Ok(())
    }

    /// Lets `watch` stop long steps (see [`crate::watch`]).
    pub fn set_watch(&mut self, watch: Option<std::sync::Arc<dyn Watch>>) {
        self.st.ticker.set_watch(watch);
    }

    /// Long steps of a state of at most `bytes` run on a copy, so that a stop abandons them
    /// whole; larger states run them in place (see [`DEFAULT_STEP_COPY_LIMIT`]). A step that
    /// may run out of simulated memory half-way is copied whatever the limit.
    pub fn set_step_copy_limit(&mut self, bytes: u64) {
        self.step_copy_limit = bytes;
    }

    fn begin(&mut self) {
        self.st.op = Stats::default();
    }

    fn end(&mut self) {
        let op = self.st.op.clone();
        self.st.total.add(&op);
    }

    /// Runs `f`, a step of `work` pages or PTEs, on the state. The step runs on a copy that
    /// replaces the state only when `f` succeeds if it may fail half-way: when free memory is
    /// below `worst_case` pages, or when it is long enough to be interrupted by the watch and
    /// the state is within the step copy limit. Otherwise (and where the host cannot hold a
    /// copy made only to be interruptible) it runs on the state, uninterruptibly: nothing
    /// else can fail once a step has checked its arguments.
    fn guarded<T>(
        &mut self,
        worst_case: u64,
        work: u64,
        f: impl FnOnce(&Layout, &KernelProfile, &mut State) -> Result<T>,
    ) -> Result<T> {
        self.begin();
        let short_of_memory = self.st.mem.free_pages < worst_case;
        let interruptible =
            work >= INTERRUPTIBLE_WORK && self.st.ticker.watched() && self.st.host_bytes() <= self.step_copy_limit;
        let trial = if short_of_memory || interruptible {
            // The copy may be stopped too: nothing has changed yet.
            self.st.ticker.start(work, interruptible);
            let copy = self.st.try_clone();
            // Told to stop during the copy of a step that cannot be abandoned: it is not asked again.
            let still_watching = self.st.ticker.watching();
            self.st.ticker.stop();
            match copy {
                Ok(t) => Some((t, still_watching)),
                Err(e) if short_of_memory || e.kind == crate::error::ErrorKind::Interrupted => {
                    self.end();
                    return Err(e);
                }
                Err(_) => None,
            }
        } else {
            None
        };
        let r = match trial {
            Some((mut trial, watching)) => {
                trial.ticker.start(work, interruptible);
                if !watching {
                    trial.ticker.stop();
                }
                let r = f(&self.layout, &self.profile, &mut trial);
                trial.ticker.stop();
                if r.is_ok() {
                    trial.adopt_exported(&mut self.st);
                    self.st = trial;
                }
                r
            }
            None => {
                self.st.ticker.start(work, false);
                f(&self.layout, &self.profile, &mut self.st)
            }
        };
        self.end();
        r
    }

    /// Runs a read-only pass of `work` units, which may always be interrupted.
    fn watched<T>(&self, work: u64, f: impl FnOnce(&Layout, &KernelProfile, &State) -> Result<T>) -> Result<T> {
        self.st.ticker.start(work, true);
        let r = f(&self.layout, &self.profile, &self.st);
        self.st.ticker.stop();
        r
    }

    /// `check()`: every invariant, rescanned from the page tables.
    pub fn check(&self) -> Result<()> {
        let work = self.st.mem.nr_pages() + self.st.mms.iter().flat_map(|m| &m.vmas).map(|v| v.ptes.len() as u64).sum::<u64>();
        self.watched(work, |layout, p, st| with_layout!(layout, l => st.check(l, p)))
    }

    // ---- argument checks ----------------------------------------------------------------

    pub fn page_size(&self) -> u64 {
        1 << self.st.page_shift
    }

    fn mm_index(&self, pid: u32) -> Result<usize> {
        let k = (pid as usize).checked_sub(1).filter(|&k| k < self.st.mms.len());
        match k {
            Some(k) if !self.st.mms[k].exited => Ok(k),
            Some(_) => Err(Error::value(format!("process {pid} has exited"))),
            None => Err(Error::value(format!("no process {pid}"))),
        }
    }

    /// Checks that `[addr, addr + len)` is a non-empty page-aligned user range; returns vpns.
    fn vrange(&self, addr: u64, len: u64) -> Result<(u64, u64)> {
        let ps = self.page_size();
        if addr % ps != 0 || len % ps != 0 {
            return Err(Error::value(format!(
                "range {addr:#x}+{len:#x} is not aligned to the {ps}-byte page"
            )));
        }
        if len == 0 {
            return Err(Error::value("empty range"));
        }
        let end = addr.checked_add(len).filter(|&e| e <= 1 << 56).ok_or_else(|| {
            Error::value(format!("range {addr:#x}+{len:#x} leaves the 56-bit user address space"))
        })?;
        Ok((addr >> self.st.page_shift, end >> self.st.page_shift))
    }

    fn mapped_range(&self, k: usize, addr: u64, len: u64) -> Result<(u64, u64)> {
        let (a, b) = self.vrange(addr, len)?;
        if !self.st.mms[k].fully_mapped(a, b) {
            return Err(Error::value(format!(
                "range {addr:#x}+{len:#x} is not entirely mapped in process {}",
                self.st.mms[k].pid
            )));
        }
        Ok((a, b))
    }

    /// `BufferError` if applying `change` to the VMAs of `[a, b)` of process `k` would merge
    /// one with a neighbour in other storage, moving PTEs a numpy view holds (see
    /// [`Mm::merge_would_move_exported`]).
    fn refuse_moving_views(&self, k: usize, a: u64, b: u64, change: impl Fn(&mut Vma)) -> Result<()> {
        match self.st.mms[k].merge_would_move_exported(a, b, change) {
            None => Ok(()),
            Some((s, e)) => Err(Error::buffer(format!(
                "the PTEs of process {}'s mapping {:#x}-{:#x} are viewed by a numpy array, and this \
                 change would merge that mapping with a neighbour mapped separately, which moves \
                 them; release the view (del it) first",
                self.st.mms[k].pid,
                s << self.st.page_shift,
                e << self.st.page_shift
            ))),
        }
    }

    // ---- processes and mappings ---------------------------------------------------------

    /// A new process with an empty address space.
    pub fn spawn(&mut self) -> u32 {
        let pid = self.st.mms.len() as u32 + 1;
        self.st.mms.push(Mm {
            pid,
            mm_id: pid,
            vmas: Vec::new(),
            rss: [0; 3],
            has_pinned: false,
            exited: false,
            next_vpn: MMAP_BASE >> self.st.page_shift,
            thp_disable: crate::policy::ThpDisable::No,
        });
        pid
    }

    /// A file (or shmem object) of `size` bytes. A regular file's page cache is filled with
    /// folios of `folio_size` (its readahead / large-folio size). A shmem object on a tmpfs
    /// mount with `huge` chooses its folio sizes as the kernel's shmem code does (then
    /// `folio_size` is the page size); without `huge` it is filled with folios of `folio_size`.
    pub fn create_file(&mut self, size: u64, folio_size: u64, shmem: bool, huge: Option<&str>) -> Result<u32> {
        let ps = self.page_size();
        let order = order_of_size(folio_size, self.st.page_shift)
            .filter(|&o| o <= self.st.pmd_order)
            .ok_or_else(|| {
                Error::value(format!(
                    "folio size {folio_size} is not a power of two between the page size and the \
                     PMD size"
                ))
            })?;
        let kind = match huge {
            None => ShmemKind::Fixed,
            Some(h) => {
                if !shmem {
                    return Err(Error::value("huge= is a tmpfs mount option: it needs shmem=True"));
                }
                let v = ShmemHuge::parse(h).filter(|v| !matches!(v, ShmemHuge::Deny | ShmemHuge::Force)).ok_or_else(|| {
                    Error::value(format!("huge={h:?}: a tmpfs mount takes never, always, within_size or advise"))
                })?;
                if order != 0 {
                    return Err(Error::value(format!(
                        "folio size {folio_size} with huge={h:?}: on a tmpfs mount the shmem policy \
                         chooses the folio size (leave folio_size at the page size)"
                    )));
                }
                ShmemKind::Tmpfs(v)
            }
        };
        if size == 0 || size % (ps << order) != 0 {
            return Err(Error::value(format!(
                "file size {size} is not a positive multiple of its folio size {folio_size}"
            )));
        }
        let nr = size / ps;
        let len = File::cache_len(nr, shmem, self.st.ptrs_per_pte);
        let cache = crate::alloc::try_filled(len as usize, NOT_CACHED, "a page cache")?;
        self.st.files.push(File { nr_pages: nr, folio_order: order, shmem, kind, cache });
        Ok(self.st.files.len() as u32 - 1)
    }

    /// Sets `fault_around_bytes` as the kernel's debugfs file does, but strictly: a power of
    /// two from the page size (no fault-around) to a page table's worth of pages.
    pub fn set_fault_around_bytes(&mut self, bytes: u64) -> Result<()> {
        let ps = self.page_size();
        let max = ps * self.st.ptrs_per_pte;
        if !bytes.is_power_of_two() || bytes < ps || bytes > max {
            return Err(Error::value(format!(
                "fault_around_bytes {bytes} is not a power of two from {ps} to {max} (the kernel \
                 rounds other values down and refuses ones above {max})"
            )));
        }
        self.st.fault_around_pages = bytes / ps;
        Ok(())
    }

    pub fn fault_around_bytes(&self) -> u64 {
        self.st.fault_around_pages * self.page_size()
    }

    /// Sets the sysfs shmem controls: the top-level `shmem_enabled` (always, within_size,
    /// advise, never, deny, force) and per folio size in bytes `hugepages-<size>kB/shmem_enabled`
    /// (always, inherit, within_size, advise, never; from v6.11). Unnamed sizes keep their value.
    pub fn set_shmem_policy(&mut self, enabled: Option<&str>, sizes: &[(u64, String)]) -> Result<()> {
        let top = match enabled {
            None => None,
            Some(e) => Some(ShmemHuge::parse(e).ok_or_else(|| {
                Error::value(format!("shmem_enabled {e:?}; known: {}", ShmemHuge::NAMES.join(", ")))
            })?),
        };
        let mut per = Vec::with_capacity(sizes.len());
        for (size, v) in sizes {
            let o = order_of_size(*size, self.st.page_shift).ok_or_else(|| {
                Error::value(format!("shmem folio size {size} is not a power of two of at least a page"))
            })?;
            let val = ShmemSize::parse(v).ok_or_else(|| {
                Error::value(format!("shmem_enabled {v:?} for size {size}; known: {}", ShmemSize::NAMES.join(", ")))
            })?;
            per.push((o, val));
        }
        self.st.shmem_policy = self.st.shmem_policy.updated(&self.profile, self.st.pmd_order, top, &per)?;
        Ok(())
    }

    /// `mmap()`: returns the start address. `file` maps a file object from byte `offset`;
    /// a shared anonymous mapping gets its own shmem object. `mthp`, when given, lists the
    /// anonymous folio sizes in bytes the mapping may use in place of the THP policy's sysfs
    /// controls (a model shortcut); `None` follows the policy. `pmd` lets faults map PMD
    /// THPs (huge_memory.rs) whatever the policy says.
    #[allow(clippy::too_many_arguments)]
    pub fn mmap(
        &mut self,
        pid: u32,
        addr: Option<u64>,
        len: u64,
        prot: Prot,
        shared: bool,
        file: Option<(u32, u64)>,
        mthp: Option<&[u64]>,
        uffd_wp: bool,
        uffd_event_fork: bool,
        pmd: bool,
    ) -> Result<u64> {
        let k = self.mm_index(pid)?;
        let ps = self.page_size();
        let shift = self.st.page_shift;
        let mut orders = if mthp.is_some() { 1u32 } else { 0 };
        for &size in mthp.unwrap_or_default() {
            let o = order_of_size(size, shift).filter(|&o| o <= self.st.pmd_order && o != 1);
            match o {
                Some(o) => orders |= 1 << o,
                None => {
                    return Err(Error::value(format!(
                        "mTHP size {size} is not one of the page size, 4 pages … the PMD size"
                    )))
                }
            }
        }
        if len == 0 || len % ps != 0 {
            return Err(Error::value(format!("length {len} is not a positive multiple of {ps}")));
        }
        let nr = len / ps;
        if nr > MAX_VMA_PAGES {
            return Err(Error::value(format!(
                "a mapping of {nr} pages is beyond the model's {MAX_VMA_PAGES} pages per mapping"
            )));
        }
        if let Some((f, off)) = file {
            let fo = self.st.files.get(f as usize).ok_or_else(|| Error::value(format!("no file {f}")))?;
            if off % ps != 0 || off / ps + nr > fo.nr_pages {
                return Err(Error::value(format!(
                    "file range {off:#x}+{len:#x} is unaligned or beyond the file's {} pages",
                    fo.nr_pages
                )));
            }
        }
        if uffd_wp && !self.layout.caps().uffd_wp {
            return Err(Error::value(format!("{} has no uffd-wp PTE bit", self.layout.name())));
        }
        let pmd_pages = self.st.ptrs_per_pte;
        let start = match addr {
            Some(a) => {
                let (a, b) = self.vrange(a, len)?;
                let mm = &self.st.mms[k];
                if mm.vmas.iter().any(|v| v.start < b && a < v.end()) {
                    return Err(Error::value(format!(
                        "address {:#x}+{len:#x} overlaps an existing mapping",
                        a << shift
                    )));
                }
                a
            }
            None => {
                let mm = &self.st.mms[k];
                mm.next_vpn.div_ceil(pmd_pages) * pmd_pages
            }
        };
        if (start + nr) << shift > 1 << 56 {
            return Err(Error::value("the address space is full"));
        }
        let ptes = crate::ptes::PteTable::filled(nr as usize, self.layout.geometry().none_value, "a page table")?;
        let (file_id, pgoff) = match file {
            Some((f, off)) => (Some(f), off / ps),
            None if shared => {
                // Shared anonymous memory is a shmem object of the mapping's size.
                let len = File::cache_len(nr, true, pmd_pages);
                let cache = crate::alloc::try_filled(len as usize, NOT_CACHED, "a page cache")?;
                self.st.files.push(File { nr_pages: nr, folio_order: 0, shmem: true, kind: ShmemKind::Anon, cache });
                (Some(self.st.files.len() as u32 - 1), 0)
            }
            None => (None, 0),
        };
        let vma = Vma {
            start,
            ptes,
            prot,
            shared,
            file: file_id,
            pgoff,
            vm_softdirty: true,
            uffd_wp,
            uffd_event_fork,
            dontfork: false,
            wipeonfork: false,
            anon_vma: 0,
            mthp: orders,
            hugepage: false,
            nohugepage: false,
            thp_pmd: pmd,
            pmds: Default::default(),
        };
        let pos = self.st.mms[k].vmas.partition_point(|v| v.start < start);
        {
            // A new mapping that would merge with a viewed neighbour would move its PTEs.
            let vmas = &self.st.mms[k].vmas;
            let viewed_merge = (pos > 0 && vmas[pos - 1].can_merge(&vma) && vmas[pos - 1].ptes.store().exported())
                || (pos < vmas.len() && vma.can_merge(&vmas[pos]) && vmas[pos].ptes.store().exported());
            if viewed_merge {
                return Err(Error::buffer(format!(
                    "a mapping at {:#x} would merge with a neighbour whose PTEs a numpy view holds, \
                     which moves them; release the view (del it) first, or map elsewhere",
                    start << shift
                )));
            }
        }
        let mm = &mut self.st.mms[k];
        mm.vmas.insert(pos, vma);
        mm.merge_around(pos..pos + 1);
        mm.next_vpn = mm.next_vpn.max(start + nr + pmd_pages);
        Ok(start << shift)
    }

    /// Reads or writes every page of a range, faulting as the kernel would. A write stores a
    /// fresh content token in each page.
    pub fn touch(&mut self, pid: u32, addr: u64, len: u64, write: bool) -> Result<()> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.mapped_range(k, addr, len)?;
        let access = if write { Access::Write } else { Access::Read };
        with_layout!(&self.layout, l => self.st.check_access(l, k, a, b, access))?;
        let worst = with_layout!(&self.layout, l => self.st.worst_case_pages(l, k, a, b));
        self.guarded(worst, b - a, |layout, p, st| {
            with_layout!(layout, l => st.access_range(l, p, k, a, b, access))
        })
    }

    /// Reads one page: the content token the process sees there (0 = zero-filled).
    pub fn read(&mut self, pid: u32, addr: u64) -> Result<u32> {
        let ps = self.page_size();
        self.touch(pid, addr & !(ps - 1), ps, false)?;
        let k = self.mm_index(pid)?;
        Ok(with_layout!(&self.layout, l => self.st.token_at(l, k, addr >> self.st.page_shift)))
    }

    /// Writes one page; returns the token written.
    pub fn write(&mut self, pid: u32, addr: u64) -> Result<u32> {
        let ps = self.page_size();
        self.touch(pid, addr & !(ps - 1), ps, true)?;
        let k = self.mm_index(pid)?;
        Ok(with_layout!(&self.layout, l => self.st.token_at(l, k, addr >> self.st.page_shift)))
    }

    /// `fork()`: returns the child's pid.
    pub fn fork(&mut self, pid: u32) -> Result<u32> {
        let k = self.mm_index(pid)?;
        // Each copied pinned page needs one page, plus one preallocation that may go unused.
        let worst = if self.st.mms[k].has_pinned {
            self.st.mms[k].vmas.iter().map(|v| v.ptes.len() as u64).sum::<u64>() + 1
        } else {
            0
        };
        let work = self.st.mms[k].vmas.iter().map(|v| v.ptes.len() as u64).sum();
        self.guarded(worst, work, |layout, p, st| with_layout!(layout, l => st.fork(l, p, k)))
    }

    /// `munmap()`; unmapped holes inside the range are allowed, as in the kernel.
    pub fn munmap(&mut self, pid: u32, addr: u64, len: u64) -> Result<()> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.vrange(addr, len)?;
        self.guarded(0, b - a, |layout, p, st| with_layout!(layout, l => st.munmap(l, p, k, a, b)))?;
        self.st.mms[k].shrink_stores(a, b);
        Ok(())
    }

    /// `exit()`: tears the address space down (pins stay until unpinned).
    pub fn exit(&mut self, pid: u32) -> Result<()> {
        let k = self.mm_index(pid)?;
        let work = self.st.mms[k].vmas.iter().map(|v| v.ptes.len() as u64).sum();
        self.guarded(0, work, |layout, p, st| with_layout!(layout, l => st.exit_mm(l, p, k)))
    }

    /// `madvise()`: "dontneed", "dontfork", "dofork", "wipeonfork", "keeponfork", "hugepage",
    /// "nohugepage".
    pub fn madvise(&mut self, pid: u32, addr: u64, len: u64, advice: &str) -> Result<()> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.mapped_range(k, addr, len)?;
        match advice {
            "dontneed" => {
                self.guarded(0, b - a, |layout, p, st| with_layout!(layout, l => st.madv_dontneed(l, p, k, a, b)))
            }
            "dontfork" | "dofork" | "wipeonfork" | "keeponfork" | "hugepage" | "nohugepage" => {
                if advice == "wipeonfork" {
                    let mm = &self.st.mms[k];
                    let mut at = a;
                    while at < b {
                        let v = &mm.vmas[mm.find_vma(at).expect("range checked")];
                        if !v.is_anon() {
                            return Err(Error::value(
                                "MADV_WIPEONFORK applies to private anonymous mappings only",
                            ));
                        }
                        at = v.end();
                    }
                }
                let apply = |v: &mut Vma| match advice {
                    "dontfork" => v.dontfork = true,
                    "dofork" => v.dontfork = false,
                    "wipeonfork" => v.wipeonfork = true,
                    "keeponfork" => v.wipeonfork = false,
                    // hugepage_madvise() (mm/huge_memory.c): each flag clears the other.
                    "hugepage" => (v.hugepage, v.nohugepage) = (true, false),
                    _ => (v.hugepage, v.nohugepage) = (false, true),
                };
                self.refuse_moving_views(k, a, b, apply)?;
                self.begin();
                // The model keeps contpte blocks inside one VMA: a block a split would cut is
                // unfolded (the kernel may leave it folded across the two VMAs).
                let (layout, profile) = (&self.layout, &self.profile);
                with_layout!(layout, l => {
                    self.st.split_huge_pmd_at(l, profile, k, a);
                    self.st.split_huge_pmd_at(l, profile, k, b);
                    self.st.unfold_at_split(l, profile, k, a);
                    self.st.unfold_at_split(l, profile, k, b);
                });
                self.st.mms[k].modify(&self.profile, a, b, apply);
                self.end();
                Ok(())
            }
            _ => Err(Error::value(format!(
                "unknown advice {advice:?}; known: dontneed, dontfork, dofork, wipeonfork, keeponfork, \
                 hugepage, nohugepage"
            ))),
        }
    }

    /// `prctl(PR_SET_THP_DISABLE, disable, except_advised ? PR_THP_DISABLE_EXCEPT_ADVISED : 0)`:
    /// sets or clears the mm's MMF_DISABLE_THP* flag, which every later fault of the process
    /// reads, for existing and new VMAs alike, and which fork passes on.
    pub fn prctl_thp_disable(&mut self, pid: u32, disable: bool, except_advised: bool) -> Result<()> {
        let k = self.mm_index(pid)?;
        let state = crate::policy::prctl_thp_disable_state(&self.profile, disable, except_advised)?;
        self.st.mms[k].thp_disable = state;
        Ok(())
    }

    /// Writes the sysfs THP controls: the top-level `enabled` (when given) and per-size
    /// `hugepages-<size>kB/enabled` values (size in bytes). All are checked before any is set.
    pub fn set_thp_policy(&mut self, enabled: Option<&str>, sizes: &[(u64, String)]) -> Result<()> {
        let mut policy = self.st.thp;
        if let Some(e) = enabled {
            policy.enabled = crate::policy::ThpEnabled::parse(e).ok_or_else(|| {
                Error::value(format!(
                    "enabled {e:?} is not one of {}",
                    crate::policy::ThpEnabled::NAMES.join(", ")
                ))
            })?;
        }
        let anon = crate::policy::thp_orders_all_anon(self.st.pmd_order);
        for (size, mode) in sizes {
            let order = order_of_size(*size, self.st.page_shift).filter(|&o| o < 32 && anon & (1 << o) != 0).ok_or_else(|| {
                Error::value(format!(
                    "sizes: {size} bytes has no hugepages-<size>kB control for anonymous memory here \
                     (4 pages … the PMD size, {} bytes, in powers of two)",
                    (1u64 << self.st.pmd_order) << self.st.page_shift
                ))
            })?;
            let m = crate::policy::SizeEnabled::parse(mode).ok_or_else(|| {
                Error::value(format!(
                    "sizes: {mode:?} for {size} bytes is not one of {}",
                    crate::policy::SizeEnabled::NAMES.join(", ")
                ))
            })?;
            policy.set_size_mode(order, m);
        }
        self.st.thp = policy;
        Ok(())
    }

    /// `mprotect()`.
    pub fn mprotect(&mut self, pid: u32, addr: u64, len: u64, prot: Prot) -> Result<()> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.mapped_range(k, addr, len)?;
        self.refuse_moving_views(k, a, b, |v| v.prot = prot)?;
        self.guarded(0, b - a, |layout, p, st| with_layout!(layout, l => st.mprotect(l, p, k, a, b, prot)))
    }

    /// `ioctl(UFFDIO_WRITEPROTECT)` on a range registered in write-protect mode.
    pub fn uffd_writeprotect(&mut self, pid: u32, addr: u64, len: u64, enable: bool) -> Result<()> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.mapped_range(k, addr, len)?;
        let mm = &self.st.mms[k];
        let mut at = a;
        while at < b {
            let v = &mm.vmas[mm.find_vma(at).expect("range checked")];
            if !v.uffd_wp {
                return Err(Error::value(format!(
                    "{:#x} is not registered with userfaultfd in write-protect mode",
                    at << self.st.page_shift
                )));
            }
            at = v.end();
        }
        self.guarded(0, b - a, |layout, p, st| with_layout!(layout, l => st.uffd_writeprotect(l, p, k, a, b, enable)))
    }

    /// `pin_user_pages()` with FOLL_PIN (and FOLL_WRITE / FOLL_LONGTERM): returns a pin id.
    pub fn pin(&mut self, pid: u32, addr: u64, len: u64, write: bool, longterm: bool) -> Result<u32> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.mapped_range(k, addr, len)?;
        let access = if write { Access::Write } else { Access::Read };
        with_layout!(&self.layout, l => self.st.check_access(l, k, a, b, access))?;
        let worst = with_layout!(&self.layout, l => self.st.worst_case_pages(l, k, a, b));
        self.guarded(worst, b - a, |layout, p, st| with_layout!(layout, l => st.pin(l, p, k, a, b, write, longterm)))
    }

    pub fn unpin(&mut self, pin: u32) -> Result<()> {
        let ok = self.st.pins.get(pin as usize).is_some_and(|p| p.active);
        if !ok {
            return Err(Error::value(format!("no active pin {pin}")));
        }
        self.begin();
        let pfns = std::mem::take(&mut self.st.pins[pin as usize].pfns);
        self.st.pins[pin as usize].active = false;
        let mut r = Rmap { mem: &mut self.st.mem, stats: &mut self.st.op, profile: &self.profile };
        for pfn in pfns {
            // The shared zero page is not reference-counted.
            if pfn != self.st.zero_pfn {
                let head = r.mem.folio_head(pfn);
                r.unpin(head);
            }
        }
        self.end();
        Ok(())
    }

    fn pin_page(&self, pin: u32, index: u64) -> Result<u64> {
        let p = self.st.pins.get(pin as usize).filter(|p| p.active).ok_or_else(|| Error::value(format!("no active pin {pin}")))?;
        p.pfns.get(index as usize).copied().ok_or_else(|| {
            Error::value(format!("pin {pin} covers {} pages, not page {index}", p.pfns.len()))
        })
    }

    /// What a device reading page `index` of a pin sees.
    pub fn pin_read(&self, pin: u32, index: u64) -> Result<u32> {
        let pfn = self.pin_page(pin, index)?;
        if pfn == self.st.zero_pfn {
            return Ok(0);
        }
        Ok(self.st.mem.token[pfn as usize])
    }

    /// A device write (DMA) into page `index` of a pin; returns the token written.
    pub fn pin_write(&mut self, pin: u32, index: u64) -> Result<u32> {
        let pfn = self.pin_page(pin, index)?;
        if !self.st.pins[pin as usize].write {
            return Err(Error::value(format!("pin {pin} is read-only (taken without FOLL_WRITE)")));
        }
        let t = self.st.new_token();
        self.st.mem.token[pfn as usize] = t;
        Ok(t)
    }

    /// Soft-dirty reset (`echo 4 > /proc/pid/clear_refs`): clears VM_SOFTDIRTY and the PTEs'
    /// soft-dirty bits, write-protecting them, so tracking starts.
    pub fn clear_soft_dirty(&mut self, pid: u32) -> Result<()> {
        let k = self.mm_index(pid)?;
        if !self.layout.caps().soft_dirty {
            return Err(Error::value(format!("{} has no soft-dirty bit", self.layout.name())));
        }
        let work = self.st.mms[k].vmas.iter().map(|v| v.ptes.len() as u64).sum();
        self.guarded(0, work, |layout, _p, st| with_layout!(layout, l => st.clear_soft_dirty(l, k)))
    }

    /// /proc/<pid>/pagemap of `[addr, addr + len)`.
    pub fn pagemap(&self, pid: u32, addr: u64, len: u64) -> Result<Vec<u64>> {
        let k = self.mm_index(pid)?;
        let (a, b) = self.vrange(addr, len)?;
        self.watched(b - a, |layout, p, st| with_layout!(layout, l => st.pagemap(l, p, k, a, b)))
    }

    pub fn vma_index(&self, pid: u32, addr: u64) -> Result<(usize, usize)> {
        let k = self.mm_index(pid)?;
        let vpn = addr >> self.st.page_shift;
        let v = self.st.mms[k].find_vma(vpn).ok_or_else(|| Error::value(format!("no mapping at {addr:#x} in process {pid}")))?;
        Ok((k, v))
    }

    pub fn mm(&self, pid: u32) -> Result<&Mm> {
        let k = (pid as usize).checked_sub(1).filter(|&k| k < self.st.mms.len()).ok_or_else(|| Error::value(format!("no process {pid}")))?;
        Ok(&self.st.mms[k])
    }
}

impl State {
    /// Bytes of page-table storage (each store once, however many VMAs share it).
    pub fn page_table_bytes(&self) -> usize {
        let mut seen: Vec<(*const u64, usize)> = self.mms.iter().flat_map(|mm| &mm.vmas).map(|v| v.ptes.store().as_raw()).collect();
        seen.sort_unstable();
        seen.dedup();
        seen.iter().map(|&(_, n)| n * 8).sum()
    }

    /// Before this state (a copy a step ran on) replaces `old`: storage that numpy views of
    /// `old` hold gets this state's contents and is used again, so that views stay live.
    /// Every viewed store is written back, also one the step dropped (an unmap or exit).
    pub fn adopt_exported(&mut self, old: &mut State) {
        self.mem.adopt_exported(&mut old.mem);
        let back = std::mem::take(&mut self.copies).adopt();
        if !back.is_empty() {
            for v in self.mms.iter_mut().flat_map(|mm| &mut mm.vmas) {
                v.ptes.repoint(&back);
            }
        }
    }

    /// A copy of the state for a step to run on, which shares the views' counts with this
    /// state so that [`State::adopt_exported`] can hand the views the result; or a host
    /// out-of-memory error where the host cannot hold it (or a stop from the ticker, when armed).
    /// About the host memory the state takes (what a copy of it costs): the per-page arrays
    /// and every mapping's PTEs, page cache and pins (not the large-folio records).
    pub fn host_bytes(&self) -> u64 {
        let ptes: u64 = self.mms.iter().flat_map(|m| &m.vmas).map(|v| v.ptes.len() as u64 * 8).sum();
        let files: u64 = self.files.iter().map(|f| std::mem::size_of_val(&f.cache[..]) as u64).sum();
        let pins: u64 = self.pins.iter().map(|p| p.pfns.len() as u64 * 8).sum();
        // order, flags, mapcount, refcount, token and the large-folio index: 15 bytes a page.
        self.mem.nr_pages() * 15 + ptes + files + pins
    }

    pub fn try_clone(&self) -> Result<State> {
        self.copy(true)
    }

    /// An independent copy (`Simulation.clone()`): views of either never bind the other.
    pub fn try_clone_detached(&self) -> Result<State> {
        self.copy(false)
    }

    fn copy(&self, share: bool) -> Result<State> {
        let t = &self.ticker;
        let mut copies = crate::ptes::StoreCopies::new(share);
        let mut mms = crate::alloc::try_with_capacity(self.mms.len(), "the processes")?;
        for mm in &self.mms {
            mms.push(mm.try_clone(t, &mut copies)?);
        }
        let mut files = crate::alloc::try_with_capacity(self.files.len(), "the files")?;
        for f in &self.files {
            files.push(File { cache: crate::alloc::try_copy(&f.cache, "a page cache", t)?, ..*f });
        }
        let mut pins = crate::alloc::try_with_capacity(self.pins.len(), "the pins")?;
        for p in &self.pins {
            pins.push(Pin { pfns: crate::alloc::try_copy(&p.pfns, "a pin", t)?, ..*p });
        }
        Ok(State {
            mem: self.mem.try_clone(t, share)?,
            mms,
            files,
            pins,
            op: self.op.clone(),
            total: self.total.clone(),
            next_token: self.next_token,
            next_anon_vma: self.next_anon_vma,
            zero_pfn: self.zero_pfn,
            page_shift: self.page_shift,
            ptrs_per_pte: self.ptrs_per_pte,
            pmd_order: self.pmd_order,
            thp: self.thp,
            fault_around_pages: self.fault_around_pages,
            shmem_policy: self.shmem_policy,
            ticker: self.ticker.clone(),
            copies: if share { copies } else { Default::default() },
        })
    }

    pub fn new_token(&mut self) -> u32 {
        let t = self.next_token;
        self.next_token = self.next_token.wrapping_add(1).max(1);
        t
    }

    /// The content token process `k` sees at `vpn` (0 for none PTEs and the zero page).
    pub fn token_at<L: PteLayout>(&self, l: &L, k: usize, vpn: u64) -> u32 {
        let mm = &self.mms[k];
        let Some(v) = mm.find_vma(vpn) else { return 0 };
        if let Some(page) = self.huge_pmd_page(l, k, v, vpn) {
            return page.map(|pg| self.mem.token[pg as usize]).unwrap_or(0);
        }
        let vma = &mm.vmas[v];
        let pte = vma.ptes[(vpn - vma.start) as usize];
        if l.pte_none(pte) {
            return 0;
        }
        self.vm_normal_page(l, pte).map(|p| self.mem.token[p as usize]).unwrap_or(0)
    }

    /// An upper bound on the pages faults over `[a, b)` can allocate, read from the page
    /// tables: one per entry that is not a present writable PTE (a new folio's pages, a page
    /// cache page, a COW copy, a THP replacing the huge zero page), two per such entry of a
    /// private file mapping (its page-cache page and the copy), plus, per mapping, one
    /// largest folio at either end (a folio may reach beyond the range, and a page-cache folio
    /// beyond the mapping). Entries under a huge PMD are none, so they count too.
    fn worst_case_pages<L: PteLayout>(&self, l: &L, k: usize, a: u64, b: u64) -> u64 {
        // Counting every entry unsettled reads none: the entries are read only when the free
        // pages do not cover that bound (the step guard compares no more).
        let unread = self.worst_case_bound(l, k, a, b, false);
        if unread <= self.mem.free_pages {
            return unread;
        }
        self.worst_case_bound(l, k, a, b, true)
    }

    fn worst_case_bound<L: PteLayout>(&self, l: &L, k: usize, a: u64, b: u64, read: bool) -> u64 {
        let mm = &self.mms[k];
        let mut worst = 0u64;
        let mut at = a;
        while at < b {
            let Some(v) = mm.find_vma(at) else { break };
            let vma = &mm.vmas[v];
            let mut max_order = self.vma_max_order(k, v);
            if vma.thp_pmd {
                max_order = max_order.max(self.pmd_order);
            }
            if let Some(f) = vma.file {
                let file = &self.files[f as usize];
                let order = if file.kind == ShmemKind::Fixed { file.folio_order } else { self.pmd_order };
                max_order = max_order.max(order);
            }
            let end = vma.end().min(b);
            let per_entry = if vma.file.is_some() && !vma.shared { 2 } else { 1 };
            let ptes = &vma.ptes[(at - vma.start) as usize..(end - vma.start) as usize];
            let settled = if read { ptes.iter().filter(|&&e| l.pte_present(e) && l.pte_write(e)).count() as u64 } else { 0 };
            worst += per_entry * (ptes.len() as u64 - settled) + 2 * (1u64 << max_order);
            at = vma.end();
        }
        worst
    }

    /// `vm_normal_page()`: the page a present PTE maps, or `None` for special PTEs and the
    /// shared zero page.
    #[inline]
    pub fn vm_normal_page<L: PteLayout>(&self, l: &L, pte: u64) -> Option<u64> {
        if l.pte_special(pte) {
            return None;
        }
        let pfn = l.pte_pfn(pte);
        (pfn != self.zero_pfn).then_some(pfn)
    }

    pub fn rmap<'a>(&'a mut self, p: &'a KernelProfile) -> Rmap<'a> {
        Rmap { mem: &mut self.mem, stats: &mut self.op, profile: p }
    }

    /// vm_page_prot's write bit: shared mappings without write-notify (shmem, no soft-dirty
    /// tracking) map writable directly; private ones never (COW).
    pub fn page_prot_write<L: PteLayout>(&self, l: &L, vma: &Vma) -> bool {
        vma.prot.write && vma.shared && !self.wants_writenotify(l, vma)
    }

    /// `vma_wants_writenotify()` for a shared mapping: page-cache files account dirty pages;
    /// soft-dirty tracking needs write faults too.
    pub fn wants_writenotify<L: PteLayout>(&self, l: &L, vma: &Vma) -> bool {
        let file_accounts_dirty = vma.file.is_some_and(|f| !self.files[f as usize].shmem);
        file_accounts_dirty || vma.soft_dirty_tracking(l.caps())
    }

    pub fn new_anon_vma(&mut self) -> u32 {
        let a = self.next_anon_vma;
        self.next_anon_vma += 1;
        a
    }
}

#[cfg(test)]
mod tests;

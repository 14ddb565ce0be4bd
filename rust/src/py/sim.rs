//! `Simulation`: the binding of [`crate::sim::Simulation`]. Converts arguments, releases
//! the GIL around the operations and hands state out as numpy arrays (copies: the state
//! moves under them, so a borrowed view could dangle).

use numpy::{IntoPyArray, PyArray1, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::arch::{Layout, PteLayout};
use crate::error::Error;
use crate::kernel::KernelProfile;
use crate::memory::{FREE, PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_FILE, PG_MAYBE_SHARED, PG_PARTIALLY_MAPPED, PG_SWAPBACKED};
use crate::mm::Prot;
use crate::sim::Simulation;
use crate::stats::{Stats, COUNTER_NAMES};
use crate::with_layout;

fn prot_arg(s: &str) -> PyResult<Prot> {
    Prot::parse(s).ok_or_else(|| {
        Error::value(format!("prot {s:?}: use letters r, w, x (e.g. \"rw\") or \"none\"")).into()
    })
}

fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, v) in COUNTER_NAMES.iter().zip(s.values()) {
        d.set_item(name, v)?;
    }
    d.set_item("batch_histogram", s.batch_histogram.clone())?;
    d.set_item("alloc_by_order", s.alloc_by_order.clone())?;
    Ok(d)
}

fn table<'py>(py: Python<'py>, rows: Vec<Vec<i64>>, width: usize) -> PyResult<Bound<'py, PyAny>> {
    let n = rows.len();
    let flat: Vec<i64> = rows.into_iter().flatten().collect();
    Ok(PyArray1::from_vec(py, flat).reshape([n, width])?.into_any())
}

/// A whole simulated system: physical memory, processes, files and pins.
#[pyclass(name = "Simulation", module = "ptebatch._core")]
#[derive(Clone)]
pub struct PySimulation {
    pub inner: Simulation,
    arch: String,
    kernel: String,
    batching: bool,
}

#[pymethods]
impl PySimulation {
    #[new]
    #[pyo3(signature = (arch, kernel, memory, seed = 0, batching = true))]
    fn new(arch: &str, kernel: &str, memory: u64, seed: u64, batching: bool) -> PyResult<Self> {
        let layout = Layout::by_name(arch, None)?;
        let mut profile = KernelProfile::parse(kernel)?;
        if !batching {
            profile = profile.unbatched();
        }
        Ok(PySimulation {
            inner: Simulation::new(layout, profile, memory, seed)?,
            arch: arch.to_string(),
            kernel: kernel.to_string(),
            batching,
        })
    }

    #[getter]
    fn arch(&self) -> &str {
        &self.arch
    }
    #[getter]
    fn kernel(&self) -> &str {
        &self.kernel
    }
    #[getter]
    fn batching(&self) -> bool {
        self.batching
    }
    #[getter]
    fn zero_pfn(&self) -> u64 {
        self.inner.st.zero_pfn
    }
    #[getter]
    fn page_size(&self) -> u64 {
        self.inner.page_size()
    }
    #[getter]
    fn nr_pages(&self) -> u64 {
        self.inner.st.mem.nr_pages()
    }
    #[getter]
    fn free_pages(&self) -> u64 {
        self.inner.st.mem.free_pages
    }

    fn __repr__(&self) -> String {
        format!(
            "Simulation(arch={:?}, kernel={:?}, memory={}, batching={}, processes={})",
            self.arch,
            self.kernel,
            self.inner.st.mem.nr_pages() * self.inner.page_size(),
            self.batching,
            self.inner.st.mms.iter().filter(|m| !m.exited).count()
        )
    }

    fn clone(&self) -> PySimulation {
        Clone::clone(self)
    }

    fn set_fallback(&mut self, order: u32, p: f64) -> PyResult<()> {
        Ok(self.inner.set_fallback(order, p)?)
    }

    fn spawn(&mut self) -> u32 {
        self.inner.spawn()
    }

    #[pyo3(signature = (size, folio_size, shmem = false))]
    fn create_file(&mut self, size: u64, folio_size: u64, shmem: bool) -> PyResult<u32> {
        Ok(self.inner.create_file(size, folio_size, shmem)?)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (pid, length, prot = "rw", shared = false, file = None, offset = 0, mthp = Vec::new(), addr = None, uffd_wp = false, uffd_event_fork = false))]
    fn mmap(
        &mut self,
        pid: u32,
        length: u64,
        prot: &str,
        shared: bool,
        file: Option<u32>,
        offset: u64,
        mthp: Vec<u64>,
        addr: Option<u64>,
        uffd_wp: bool,
        uffd_event_fork: bool,
    ) -> PyResult<u64> {
        let prot = prot_arg(prot)?;
        Ok(self.inner.mmap(pid, addr, length, prot, shared, file.map(|f| (f, offset)), &mthp, uffd_wp, uffd_event_fork)?)
    }

    #[pyo3(signature = (pid, addr, length, write = false))]
    fn touch(&mut self, py: Python<'_>, pid: u32, addr: u64, length: u64, write: bool) -> PyResult<()> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.touch(pid, addr, length, write))?)
    }

    fn read(&mut self, pid: u32, addr: u64) -> PyResult<u32> {
        Ok(self.inner.read(pid, addr)?)
    }

    fn write(&mut self, pid: u32, addr: u64) -> PyResult<u32> {
        Ok(self.inner.write(pid, addr)?)
    }

    fn fork(&mut self, py: Python<'_>, pid: u32) -> PyResult<u32> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.fork(pid))?)
    }

    fn munmap(&mut self, py: Python<'_>, pid: u32, addr: u64, length: u64) -> PyResult<()> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.munmap(pid, addr, length))?)
    }

    fn exit(&mut self, py: Python<'_>, pid: u32) -> PyResult<()> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.exit(pid))?)
    }

    fn madvise(&mut self, py: Python<'_>, pid: u32, addr: u64, length: u64, advice: &str) -> PyResult<()> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.madvise(pid, addr, length, advice))?)
    }

    fn mprotect(&mut self, py: Python<'_>, pid: u32, addr: u64, length: u64, prot: &str) -> PyResult<()> {
        let prot = prot_arg(prot)?;
        let s = &mut self.inner;
        Ok(py.detach(|| s.mprotect(pid, addr, length, prot))?)
    }

    #[pyo3(signature = (pid, addr, length, write = true, longterm = true))]
    fn pin(&mut self, py: Python<'_>, pid: u32, addr: u64, length: u64, write: bool, longterm: bool) -> PyResult<u32> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.pin(pid, addr, length, write, longterm))?)
    }

    /// `ioctl(UFFDIO_WRITEPROTECT)`: `enable` write-protects, otherwise resolves.
    #[pyo3(signature = (pid, addr, length, enable = true))]
    fn uffd_writeprotect(&mut self, py: Python<'_>, pid: u32, addr: u64, length: u64, enable: bool) -> PyResult<()> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.uffd_writeprotect(pid, addr, length, enable))?)
    }

    fn unpin(&mut self, pin: u32) -> PyResult<()> {
        Ok(self.inner.unpin(pin)?)
    }

    fn pin_read(&self, pin: u32, index: u64) -> PyResult<u32> {
        Ok(self.inner.pin_read(pin, index)?)
    }

    fn pin_write(&mut self, pin: u32, index: u64) -> PyResult<u32> {
        Ok(self.inner.pin_write(pin, index)?)
    }

    fn clear_soft_dirty(&mut self, pid: u32) -> PyResult<()> {
        Ok(self.inner.clear_soft_dirty(pid)?)
    }

    /// /proc/<pid>/pagemap entries of a range, as root would read them.
    fn pagemap<'py>(&self, py: Python<'py>, pid: u32, addr: u64, length: u64) -> PyResult<Bound<'py, PyArray1<u64>>> {
        Ok(self.inner.pagemap(pid, addr, length)?.into_pyarray(py))
    }

    fn kpagecount(&self, pfn: u64) -> PyResult<u64> {
        Ok(self.inner.st.kpagecount(pfn)?)
    }

    /// Rescans every page table and compares with the stored counters.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        let s = &self.inner;
        Ok(py.detach(|| with_layout!(&s.layout, l => s.st.check(l, &s.profile)))?)
    }

    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.inner.st.total)
    }

    #[getter]
    fn last_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.inner.st.op)
    }

    /// The VMAs of a process, as dicts (addresses in bytes).
    fn vmas<'py>(&self, py: Python<'py>, pid: u32) -> PyResult<Bound<'py, PyList>> {
        let mm = self.inner.mm(pid)?;
        let shift = self.inner.st.page_shift;
        let out = PyList::empty(py);
        for v in &mm.vmas {
            let d = PyDict::new(py);
            d.set_item("start", v.start << shift)?;
            d.set_item("end", v.end() << shift)?;
            d.set_item("prot", v.prot.as_string())?;
            d.set_item("shared", v.shared)?;
            d.set_item("file", v.file)?;
            d.set_item("offset", v.pgoff << shift)?;
            d.set_item("vm_softdirty", v.vm_softdirty)?;
            d.set_item("uffd_wp", v.uffd_wp)?;
            d.set_item("dontfork", v.dontfork)?;
            d.set_item("wipeonfork", v.wipeonfork)?;
            d.set_item("anon_vma", v.anon_vma)?;
            let sizes: Vec<u64> = (0..32).filter(|o| v.mthp & (1 << o) != 0).map(|o| 1u64 << (o + shift)).collect();
            d.set_item("mthp", sizes)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// A copy of the PTE array of the VMA holding `addr`.
    fn ptes<'py>(&self, py: Python<'py>, pid: u32, addr: u64) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let (k, v) = self.inner.vma_index(pid, addr)?;
        Ok(PyArray1::from_slice(py, &self.inner.st.mms[k].vmas[v].ptes))
    }

    /// rss counters of a process: {"file", "anon", "shmem"}.
    fn rss<'py>(&self, py: Python<'py>, pid: u32) -> PyResult<Bound<'py, PyDict>> {
        let mm = self.inner.mm(pid)?;
        let d = PyDict::new(py);
        for (name, v) in crate::mm::RSS_NAMES.iter().zip(mm.rss) {
            d.set_item(name, v)?;
        }
        Ok(d)
    }

    /// One page's state, with the kernel's meaning of every count.
    fn page<'py>(&self, py: Python<'py>, pfn: u64) -> PyResult<Bound<'py, PyDict>> {
        let st = &self.inner.st;
        let d = PyDict::new(py);
        if pfn == st.zero_pfn {
            d.set_item("zero_page", true)?;
            d.set_item("free", false)?;
            d.set_item("mapcount", 0)?;
            return Ok(d);
        }
        let m = &st.mem;
        if pfn >= m.nr_pages() {
            return Err(Error::value(format!("pfn {pfn:#x} is beyond the {} pages of memory", m.nr_pages())).into());
        }
        d.set_item("zero_page", false)?;
        d.set_item("free", m.is_free(pfn))?;
        if m.is_free(pfn) {
            return Ok(d);
        }
        let head = m.folio_head(pfn);
        let f = |flag: u8| m.test(head, flag);
        d.set_item("folio", head)?;
        d.set_item("order", m.folio_order(head))?;
        d.set_item("mapcount", m.mapcount[pfn as usize])?;
        d.set_item("anon_exclusive", m.test(pfn, PG_ANON_EXCLUSIVE))?;
        d.set_item("token", m.token[pfn as usize])?;
        d.set_item("refcount", m.refcount[head as usize])?;
        d.set_item("folio_mapcount", m.folio_mapcount(head))?;
        d.set_item("anon", f(PG_ANON))?;
        d.set_item("file", f(PG_FILE))?;
        d.set_item("swapbacked", f(PG_SWAPBACKED))?;
        d.set_item("dirty", f(PG_DIRTY))?;
        d.set_item("partially_mapped", f(PG_PARTIALLY_MAPPED))?;
        d.set_item("maybe_mapped_shared", f(PG_MAYBE_SHARED))?;
        d.set_item("maybe_dma_pinned", m.folio_maybe_dma_pinned(head))?;
        if let Some(lf) = m.large_folio(head) {
            d.set_item("large_mapcount", lf.large_mapcount + 1)?;
            d.set_item("entire_mapcount", lf.entire_mapcount + 1)?;
            d.set_item("nr_pages_mapped", lf.nr_pages_mapped)?;
            d.set_item("pincount", lf.pincount)?;
            d.set_item("mm_ids", lf.mm_id.to_vec())?;
            d.set_item("mm_id_mapcounts", vec![lf.mm_id_mapcount[0] + 1, lf.mm_id_mapcount[1] + 1])?;
        }
        Ok(d)
    }

    /// A copy of one per-page array: "order" (255 = free), "flags", "mapcount", "refcount",
    /// "token".
    fn memory_array<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let m = &self.inner.st.mem;
        Ok(match name {
            "order" => PyArray1::from_slice(py, &m.order).into_any(),
            "flags" => PyArray1::from_slice(py, &m.flags).into_any(),
            "mapcount" => PyArray1::from_slice(py, &m.mapcount).into_any(),
            "refcount" => m.folio_refcounts().into_pyarray(py).into_any(),
            "token" => PyArray1::from_slice(py, &m.token).into_any(),
            _ => {
                return Err(Error::value(format!(
                    "unknown memory array {name:?}; known: order, flags, mapcount, refcount, token"
                ))
                .into())
            }
        })
    }

    /// The whole state in the canonical form the reference simulation also produces.
    fn state<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let st = &self.inner.st;
        let m = &st.mem;
        let d = PyDict::new(py);
        d.set_item("order", PyArray1::from_slice(py, &m.order))?;
        d.set_item("flags", PyArray1::from_slice(py, &m.flags))?;
        d.set_item("mapcount", PyArray1::from_slice(py, &m.mapcount))?;
        d.set_item("refcount", m.folio_refcounts().into_pyarray(py))?;
        d.set_item("token", PyArray1::from_slice(py, &m.token))?;
        let rows = m
            .large_folios()
            .into_iter()
            .map(|(h, lf)| {
                vec![
                    h as i64,
                    lf.large_mapcount as i64,
                    lf.entire_mapcount as i64,
                    lf.nr_pages_mapped as i64,
                    lf.pincount as i64,
                    lf.mm_id[0] as i64,
                    lf.mm_id[1] as i64,
                    lf.mm_id_mapcount[0] as i64,
                    lf.mm_id_mapcount[1] as i64,
                ]
            })
            .collect();
        d.set_item("large", table(py, rows, 9)?)?;
        let rows = m.free_blocks().into_iter().map(|(p, o)| vec![p as i64, o as i64]).collect();
        d.set_item("free_blocks", table(py, rows, 2)?)?;
        d.set_item("free_pages", m.free_pages)?;
        d.set_item("next_token", st.next_token)?;
        d.set_item("next_anon_vma", st.next_anon_vma)?;
        d.set_item("rng", m.rng.0)?;
        let mut mms = Vec::new();
        let mut vmas = Vec::new();
        let mut ptes: Vec<u64> = Vec::new();
        for mm in &st.mms {
            mms.push(vec![
                mm.pid as i64,
                mm.mm_id as i64,
                mm.rss[0],
                mm.rss[1],
                mm.rss[2],
                mm.has_pinned as i64,
                mm.exited as i64,
                mm.next_vpn as i64,
            ]);
            for v in &mm.vmas {
                vmas.push(vec![
                    mm.pid as i64,
                    v.start as i64,
                    v.ptes.len() as i64,
                    v.prot.read as i64,
                    v.prot.write as i64,
                    v.prot.exec as i64,
                    v.shared as i64,
                    v.file.map(|f| f as i64).unwrap_or(-1),
                    v.pgoff as i64,
                    v.vm_softdirty as i64,
                    v.uffd_wp as i64,
                    v.uffd_event_fork as i64,
                    v.dontfork as i64,
                    v.wipeonfork as i64,
                    v.anon_vma as i64,
                    v.mthp as i64,
                ]);
                ptes.extend_from_slice(&v.ptes);
            }
        }
        d.set_item("mms", table(py, mms, 8)?)?;
        d.set_item("vmas", table(py, vmas, 16)?)?;
        d.set_item("ptes", ptes.into_pyarray(py))?;
        let files = st.files.iter().map(|f| vec![f.nr_pages as i64, f.folio_order as i64, f.shmem as i64]).collect();
        d.set_item("files", table(py, files, 3)?)?;
        let cache: Vec<u64> = st.files.iter().flat_map(|f| f.cache.iter().copied()).collect();
        d.set_item("file_cache", cache.into_pyarray(py))?;
        let pins = st.pins.iter().map(|p| vec![p.active as i64, p.longterm as i64, p.pfns.len() as i64]).collect();
        d.set_item("pins", table(py, pins, 3)?)?;
        let pin_pfns: Vec<u64> = st.pins.iter().flat_map(|p| p.pfns.iter().copied()).collect();
        d.set_item("pin_pfns", pin_pfns.into_pyarray(py))?;
        Ok(d)
    }

    /// Bytes of simulation state per simulated page (memory arrays, page tables, folio
    /// records), for the memory-cost figure.
    fn state_bytes(&self) -> u64 {
        let st = &self.inner.st;
        let ptes: usize = st.mms.iter().flat_map(|mm| mm.vmas.iter()).map(|v| v.ptes.capacity() * 8).sum();
        (st.mem.state_bytes() + ptes) as u64
    }

    /// The name a free page's order has in `memory_array("order")`.
    #[classattr]
    const FREE_ORDER: u8 = FREE;

    /// Places a captured folio at pfn `head`: `kind` "anon", or "file" with the file id and
    /// the file page of its first page.
    #[pyo3(signature = (head, order, kind, file = None, index = 0, dirty = false))]
    fn place_folio(&mut self, head: u64, order: u32, kind: &str, file: Option<u32>, index: u64, dirty: bool) -> PyResult<()> {
        let k = match (kind, file) {
            ("anon", None) => crate::restore::FolioKind::Anon,
            ("file", Some(fid)) => crate::restore::FolioKind::File { fid, index },
            _ => return Err(Error::value("kind must be \"anon\", or \"file\" with file=<id>").into()),
        };
        Ok(self.inner.place_folio(head, order, k, dirty)?)
    }

    /// Writes one captured PTE.
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (pid, addr, pfn, write = false, dirty = false, young = true, soft_dirty = false, uffd_wp = false))]
    fn place_pte(&mut self, pid: u32, addr: u64, pfn: u64, write: bool, dirty: bool, young: bool, soft_dirty: bool, uffd_wp: bool) -> PyResult<()> {
        Ok(self.inner.place_pte(pid, addr, pfn, write, dirty, young, soft_dirty, uffd_wp)?)
    }

    /// Writes many captured PTEs of one process; `bits` per PTE: write 1, dirty 2, young 4,
    /// soft-dirty 8, uffd-wp 16. Stops at the first bad entry (the caller rebuilds or drops
    /// the simulation, which is under construction).
    fn place_ptes(&mut self, py: Python<'_>, pid: u32, addr: numpy::PyReadonlyArray1<'_, u64>, pfn: numpy::PyReadonlyArray1<'_, u64>, bits: numpy::PyReadonlyArray1<'_, u8>) -> PyResult<()> {
        let (a, p, b) = (addr.as_slice()?, pfn.as_slice()?, bits.as_slice()?);
        if a.len() != p.len() || a.len() != b.len() {
            return Err(Error::value("addr, pfn and bits must have the same length").into());
        }
        let s = &mut self.inner;
        Ok(py.detach(|| {
            for i in 0..a.len() {
                let f = b[i];
                s.place_pte(pid, a[i], p[i], f & 1 != 0, f & 2 != 0, f & 4 != 0, f & 8 != 0, f & 16 != 0)?;
            }
            Ok::<(), Error>(())
        })?)
    }

    /// Places many anonymous folios (`dirty` per folio).
    fn place_anon_folios(&mut self, py: Python<'_>, heads: numpy::PyReadonlyArray1<'_, u64>, orders: numpy::PyReadonlyArray1<'_, u8>, dirty: numpy::PyReadonlyArray1<'_, bool>) -> PyResult<()> {
        let (h, o, d) = (heads.as_slice()?, orders.as_slice()?, dirty.as_slice()?);
        if h.len() != o.len() || h.len() != d.len() {
            return Err(Error::value("heads, orders and dirty must have the same length").into());
        }
        let s = &mut self.inner;
        Ok(py.detach(|| {
            for i in 0..h.len() {
                s.place_folio(h[i], o[i] as u32, crate::restore::FolioKind::Anon, d[i])?;
            }
            Ok::<(), Error>(())
        })?)
    }

    /// Recomputes every counter from the page tables after placing folios and PTEs.
    fn rebuild_accounting(&mut self, py: Python<'_>) -> PyResult<()> {
        let s = &mut self.inner;
        Ok(py.detach(|| s.rebuild_accounting())?)
    }

    /// Decodes a PTE of this simulation's layout into its logical bits.
    fn decode_pte<'py>(&self, py: Python<'py>, pte: u64) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        with_layout!(&self.inner.layout, l => {
            d.set_item("none", l.pte_none(pte))?;
            d.set_item("present", l.pte_present(pte))?;
            d.set_item("pfn", l.pte_pfn(pte))?;
            d.set_item("write", l.pte_write(pte))?;
            d.set_item("dirty", l.pte_dirty(pte))?;
            d.set_item("young", l.pte_young(pte))?;
            d.set_item("soft_dirty", l.pte_soft_dirty(pte))?;
            d.set_item("uffd_wp", l.pte_uffd_wp(pte))?;
            d.set_item("special", l.pte_special(pte))?;
        });
        Ok(d)
    }
}

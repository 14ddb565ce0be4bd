//! `Simulation`: the binding of [`crate::sim::Simulation`]. Converts arguments, releases
//! the GIL around the operations and hands state out as numpy arrays: read-only views of
//! the simulation's own storage for the per-page arrays and page tables (`super::views`),
//! copies for everything assembled on request (`state()`, `pagemap()`).
//!
//! Threads: the simulation sits behind a mutex, so calls from several threads run one at a
//! time, each whole; a thread waits for the mutex with the GIL released. Ctrl-C: long steps
//! ask [`SignalWatch`] every 50 ms, which runs Python's signal handlers; a handler that raises
//! (KeyboardInterrupt) abandons the step, which ran on a copy, and the exception propagates
//! with the state unchanged.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

use numpy::{IntoPyArray, PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::arch::{Layout, PteLayout};
use crate::error::Error;
use crate::kernel::KernelProfile;
use crate::memory::{FREE, PG_ANON, PG_ANON_EXCLUSIVE, PG_DIRTY, PG_FILE, PG_MAYBE_SHARED, PG_PARTIALLY_MAPPED, PG_SWAPBACKED};
use crate::mm::Prot;
use crate::sim::Simulation;
use crate::error::ErrorKind;
use crate::stats::{Stats, COUNTER_NAMES};
use crate::watch::Watch;
use crate::with_layout;

/// Runs Python's signal handlers, then the progress callback, for a long step; keeps the
/// exception either raised.
#[derive(Default)]
struct SignalWatch {
    raised: Mutex<Option<PyErr>>,
    progress: Mutex<Option<Py<PyAny>>>,
}

impl Watch for SignalWatch {
    fn keep_going(&self, done: u64, total: u64) -> bool {
        Python::attach(|py| {
            let r = py.check_signals().and_then(|()| {
                let cb = self.progress.lock().ok().and_then(|c| c.as_ref().map(|c| c.clone_ref(py)));
                match cb {
                    Some(cb) => cb.call1(py, (done, total)).map(drop),
                    None => Ok(()),
                }
            });
            match r {
                Ok(()) => true,
                Err(e) => {
                    if let Ok(mut r) = self.raised.lock() {
                        *r = Some(e);
                    }
                    false
                }
            }
        })
    }
}

impl SignalWatch {
    /// The exception a signal handler or the progress callback raised during the last step.
    fn pending(&self) -> Option<PyErr> {
        self.raised.lock().ok().and_then(|mut r| r.take())
    }
}

/// A small number per OS thread, to recognise a call that re-enters a simulation its own
/// thread is already running.
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local!(static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed));
    TAG.with(|t| *t)
}

/// The locked simulation; clears the holder's tag when dropped.
struct Held<'a> {
    guard: MutexGuard<'a, Simulation>,
    holder: &'a AtomicU64,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.holder.store(0, Ordering::Release);
    }
}

impl std::ops::Deref for Held<'_> {
    type Target = Simulation;
    fn deref(&self) -> &Simulation {
        &self.guard
    }
}

impl std::ops::DerefMut for Held<'_> {
    fn deref_mut(&mut self) -> &mut Simulation {
        &mut self.guard
    }
}

fn prot_arg(s: &str) -> PyResult<Prot> {
    Prot::parse(s).ok_or_else(|| {
        Error::value(format!("prot {s:?}: use letters r, w, x (e.g. \"rw\") or \"none\"")).into()
    })
}

pub(super) fn stats_dict<'py>(py: Python<'py>, s: &Stats) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    for (name, v) in COUNTER_NAMES.iter().zip(s.values()) {
        d.set_item(name, v)?;
    }
    d.set_item("batch_histogram", s.batch_histogram.clone())?;
    d.set_item("alloc_by_order", s.alloc_by_order.clone())?;
    Ok(d)
}

/// A table of `width` columns from its rows laid end to end.
fn table<'py>(py: Python<'py>, flat: Vec<i64>, width: usize) -> PyResult<Bound<'py, PyAny>> {
    let n = flat.len() / width;
    Ok(PyArray1::from_vec(py, flat).reshape([n, width])?.into_any())
}

/// Rows of `width` columns built by `row` for each item, allocated fallibly.
fn rows<I: ExactSizeIterator>(items: I, width: usize, what: &str, row: impl Fn(I::Item) -> Vec<i64>) -> crate::error::Result<Vec<i64>> {
    let mut flat = crate::alloc::try_with_capacity(items.len() * width, what)?;
    for item in items {
        flat.extend(row(item));
    }
    Ok(flat)
}

/// A new numpy array holding a copy of `s`, or OutOfMemoryError(host=True) where numpy
/// cannot allocate it (rust-numpy's own constructors would panic).
fn array_from_slice<'py, T: numpy::Element + Copy>(py: Python<'py>, s: &[T], what: &str) -> PyResult<Bound<'py, PyArray1<T>>> {
    let empty = py.import("numpy")?.getattr("empty")?;
    let a = match empty.call1((s.len(), numpy::dtype::<T>(py))) {
        Ok(a) => a,
        Err(e) if e.is_instance_of::<pyo3::exceptions::PyMemoryError>(py) => {
            return Err(Error::host_memory::<T>(what, s.len()).into())
        }
        Err(e) => return Err(e),
    };
    let a = a.cast_into::<PyArray1<T>>()?;
    // SAFETY: the array was just made here; nothing else refers to it yet.
    unsafe { a.as_slice_mut()? }.copy_from_slice(s);
    Ok(a)
}

/// A whole simulated system: physical memory, processes, files and pins.
#[pyclass(name = "Simulation", module = "ptebatch._core", frozen)]
pub struct PySimulation {
    inner: Mutex<Simulation>,
    /// [`thread_tag`] of the thread holding `inner`, 0 when free.
    holder: AtomicU64,
    watch: Arc<SignalWatch>,
    arch: String,
    kernel: String,
    batching: bool,
}

impl PySimulation {
    fn wrap(mut sim: Simulation, arch: String, kernel: String, batching: bool) -> PySimulation {
        let watch = Arc::new(SignalWatch::default());
        sim.set_watch(Some(watch.clone() as Arc<dyn Watch>));
        PySimulation { inner: Mutex::new(sim), holder: AtomicU64::new(0), watch, arch, kernel, batching }
    }

    /// Locks the simulation; waits, with the GIL released, while another thread holds it.
    fn lock(&self, py: Python<'_>) -> PyResult<Held<'_>> {
        let me = thread_tag();
        loop {
            match self.inner.try_lock() {
                Ok(guard) => {
                    self.holder.store(me, Ordering::Release);
                    return Ok(Held { guard, holder: &self.holder });
                }
                Err(TryLockError::Poisoned(_)) => {
                    return Err(PyRuntimeError::new_err("the simulation is unusable: an earlier call panicked"));
                }
                Err(TryLockError::WouldBlock) => {
                    if self.holder.load(Ordering::Acquire) == me {
                        return Err(PyRuntimeError::new_err(
                            "the simulation was called from inside one of its own running steps (e.g. from a signal handler)",
                        ));
                    }
                    // Wait without the GIL, looking for Ctrl-C every 50 ms.
                    py.detach(|| {
                        for _ in 0..50 {
                            if self.inner.try_lock().is_ok() {
                                return;
                            }
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                    });
                    py.check_signals()?;
                }
            }
        }
    }

    /// Runs `f` on the locked simulation with the GIL released; the one place where core
    /// errors of a simulation step become Python exceptions. A step too short to be
    /// abandoned finishes when Ctrl-C (or a progress callback) asks it to stop; the
    /// exception is raised when it has.
    fn run<T: Send>(&self, py: Python<'_>, f: impl FnOnce(&mut Simulation) -> crate::error::Result<T> + Send) -> PyResult<T> {
        let mut held = self.lock(py)?;
        let s: &mut Simulation = &mut held;
        let r = py.detach(move || f(s));
        drop(held);
        if let Some(e) = self.watch.pending() {
            return Err(e);
        }
        match r {
            Ok(v) => Ok(v),
            Err(e) if e.kind == ErrorKind::Interrupted => Err(PyKeyboardInterrupt::new_err("interrupted")),
            Err(e) => Err(e.into()),
        }
    }
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
        let sim = Simulation::new(layout, profile, memory, seed)?;
        Ok(PySimulation::wrap(sim, arch.to_string(), kernel.to_string(), batching))
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
    fn zero_pfn(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.lock(py)?.st.zero_pfn)
    }
    #[getter]
    fn page_size(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.lock(py)?.page_size())
    }
    #[getter]
    fn nr_pages(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.lock(py)?.st.mem.nr_pages())
    }
    #[getter]
    fn free_pages(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.lock(py)?.st.mem.free_pages)
    }

    fn __repr__(&self, py: Python<'_>) -> PyResult<String> {
        let s = self.lock(py)?;
        Ok(format!(
            "Simulation(arch={:?}, kernel={:?}, memory={}, batching={}, processes={})",
            self.arch,
            self.kernel,
            s.st.mem.nr_pages() * s.page_size(),
            self.batching,
            s.st.mms.iter().filter(|m| !m.exited).count()
        ))
    }

    /// An independent copy (an A/B experiment's other arm).
    fn clone(&self, py: Python<'_>) -> PyResult<PySimulation> {
        let copy = self.run(py, |s| {
            Ok(Simulation { layout: s.layout.clone(), profile: s.profile, st: s.st.try_clone_detached()?, step_copy_limit: s.step_copy_limit })
        })?;
        Ok(PySimulation::wrap(copy, self.arch.clone(), self.kernel.clone(), self.batching))
    }

    /// Calls `callback(done, total)` about every 50 ms during long steps (and, before that,
    /// Python's signal handlers). An exception it raises abandons the step, which leaves the
    /// state unchanged, and propagates. `None` removes it.
    #[pyo3(signature = (callback))]
    fn set_progress(&self, py: Python<'_>, callback: Option<Py<PyAny>>) -> PyResult<()> {
        if let Some(cb) = &callback {
            if !cb.bind(py).is_callable() {
                return Err(pyo3::exceptions::PyTypeError::new_err(format!(
                    "callback must be callable (done, total) or None, not {}",
                    cb.bind(py).get_type().name()?
                )));
            }
        }
        if let Ok(mut p) = self.watch.progress.lock() {
            *p = callback;
        }
        Ok(())
    }

    fn set_fallback(&self, py: Python<'_>, order: u32, p: f64) -> PyResult<()> {
        self.run(py, |s| s.set_fallback(order, p))
    }

    fn spawn(&self, py: Python<'_>) -> PyResult<u32> {
        self.run(py, |s| Ok(s.spawn()))
    }

    #[pyo3(signature = (size, folio_size, shmem = false, huge = None))]
    fn create_file(&self, py: Python<'_>, size: u64, folio_size: u64, shmem: bool, huge: Option<&str>) -> PyResult<u32> {
        self.run(py, |s| s.create_file(size, folio_size, shmem, huge))
    }

    // ---- fault-around and the shmem controls (filemap.rs, shmem.rs) ----

    /// `fault_around_bytes` (debugfs): the read-fault window, a power of two from the page
    /// size (none) to a page table's worth.
    #[getter]
    fn get_fault_around_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.lock(py)?.fault_around_bytes())
    }
    #[setter]
    fn set_fault_around_bytes(&self, py: Python<'_>, bytes: u64) -> PyResult<()> {
        self.run(py, |s| s.set_fault_around_bytes(bytes))
    }

    /// The largest state (host bytes) whose long steps run on a copy, so that Ctrl-C or the
    /// progress callback abandons them whole (64 MiB by default).
    #[getter]
    fn get_step_copy_limit(&self, py: Python<'_>) -> PyResult<u64> {
        Ok(self.lock(py)?.step_copy_limit)
    }
    #[setter]
    fn set_step_copy_limit(&self, py: Python<'_>, bytes: u64) -> PyResult<()> {
        self.run(py, |s| {
            s.set_step_copy_limit(bytes);
            Ok(())
        })
    }

    /// Sets the sysfs shmem controls; `sizes` maps folio sizes in bytes to their
    /// `hugepages-<size>kB/shmem_enabled` value. Unnamed controls keep their values.
    #[pyo3(signature = (enabled = None, sizes = Vec::new()))]
    fn set_shmem_policy(&self, py: Python<'_>, enabled: Option<String>, sizes: Vec<(u64, String)>) -> PyResult<()> {
        self.run(py, |s| s.set_shmem_policy(enabled.as_deref(), &sizes))
    }

    /// The sysfs shmem controls: `{"enabled": str, "sizes": {bytes: str}}` (sizes from 6.11).
    #[getter]
    fn shmem_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock(py)?;
        let pol = s.st.shmem_policy;
        let d = PyDict::new(py);
        d.set_item("enabled", pol.enabled.name())?;
        let sizes = PyDict::new(py);
        if s.profile.shmem.per_size() {
            for o in 1..=s.st.pmd_order {
                sizes.set_item(s.page_size() << o, pol.sizes[o as usize].name())?;
            }
        }
        d.set_item("sizes", sizes)?;
        Ok(d)
    }

    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (pid, length, prot = "rw", shared = false, file = None, offset = 0, mthp = None, addr = None, uffd_wp = false, uffd_event_fork = false, pmd = false))]
    fn mmap(
        &self,
        py: Python<'_>,
        pid: u32,
        length: u64,
        prot: &str,
        shared: bool,
        file: Option<u32>,
        offset: u64,
        mthp: Option<Vec<u64>>,
        addr: Option<u64>,
        uffd_wp: bool,
        uffd_event_fork: bool,
        pmd: bool,
    ) -> PyResult<u64> {
        let prot = prot_arg(prot)?;
        self.run(py, |s| s.mmap(pid, addr, length, prot, shared, file.map(|f| (f, offset)), mthp.as_deref(), uffd_wp, uffd_event_fork, pmd))
    }

    #[pyo3(signature = (pid, addr, length, write = false))]
    fn touch(&self, py: Python<'_>, pid: u32, addr: u64, length: u64, write: bool) -> PyResult<()> {
        self.run(py, |s| s.touch(pid, addr, length, write))
    }

    fn read(&self, py: Python<'_>, pid: u32, addr: u64) -> PyResult<u32> {
        self.run(py, |s| s.read(pid, addr))
    }

    fn write(&self, py: Python<'_>, pid: u32, addr: u64) -> PyResult<u32> {
        self.run(py, |s| s.write(pid, addr))
    }

    fn fork(&self, py: Python<'_>, pid: u32) -> PyResult<u32> {
        self.run(py, |s| s.fork(pid))
    }

    fn munmap(&self, py: Python<'_>, pid: u32, addr: u64, length: u64) -> PyResult<()> {
        self.run(py, |s| s.munmap(pid, addr, length))
    }

    fn exit(&self, py: Python<'_>, pid: u32) -> PyResult<()> {
        self.run(py, |s| s.exit(pid))
    }

    fn madvise(&self, py: Python<'_>, pid: u32, addr: u64, length: u64, advice: &str) -> PyResult<()> {
        self.run(py, |s| s.madvise(pid, addr, length, advice))
    }

    /// `prctl(PR_SET_THP_DISABLE, disable, except_advised ? PR_THP_DISABLE_EXCEPT_ADVISED : 0)`.
    #[pyo3(signature = (pid, disable, except_advised = false))]
    fn prctl_thp_disable(&self, py: Python<'_>, pid: u32, disable: bool, except_advised: bool) -> PyResult<()> {
        self.run(py, |s| s.prctl_thp_disable(pid, disable, except_advised))
    }

    /// `prctl(PR_GET_THP_DISABLE)`: 0, 1, or 3 with PR_THP_DISABLE_EXCEPT_ADVISED.
    fn prctl_get_thp_disable(&self, py: Python<'_>, pid: u32) -> PyResult<u32> {
        Ok(self.lock(py)?.mm(pid)?.thp_disable.prctl_value())
    }

    /// Writes the sysfs THP controls: `enabled` (top level) and `(size in bytes, mode)` pairs.
    #[pyo3(signature = (enabled = None, sizes = Vec::new()))]
    fn set_thp_policy(&self, py: Python<'_>, enabled: Option<String>, sizes: Vec<(u64, String)>) -> PyResult<()> {
        self.run(py, |s| s.set_thp_policy(enabled.as_deref(), &sizes))
    }

    /// The sysfs THP controls: {"enabled": mode, "sizes": {size in bytes: mode}} for every
    /// anonymous size (4 pages … the PMD size).
    #[getter]
    fn thp_policy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock(py)?;
        let st = &s.st;
        let d = PyDict::new(py);
        d.set_item("enabled", st.thp.enabled.name())?;
        let sizes = PyDict::new(py);
        for o in 2..=st.pmd_order {
            sizes.set_item((1u64 << o) << st.page_shift, st.thp.size_mode(o).name())?;
        }
        d.set_item("sizes", sizes)?;
        Ok(d)
    }

    fn mprotect(&self, py: Python<'_>, pid: u32, addr: u64, length: u64, prot: &str) -> PyResult<()> {
        let prot = prot_arg(prot)?;
        self.run(py, |s| s.mprotect(pid, addr, length, prot))
    }

    #[pyo3(signature = (pid, addr, length, write = true, longterm = true))]
    fn pin(&self, py: Python<'_>, pid: u32, addr: u64, length: u64, write: bool, longterm: bool) -> PyResult<u32> {
        self.run(py, |s| s.pin(pid, addr, length, write, longterm))
    }

    /// `ioctl(UFFDIO_WRITEPROTECT)`: `enable` write-protects, otherwise resolves.
    #[pyo3(signature = (pid, addr, length, enable = true))]
    fn uffd_writeprotect(&self, py: Python<'_>, pid: u32, addr: u64, length: u64, enable: bool) -> PyResult<()> {
        self.run(py, |s| s.uffd_writeprotect(pid, addr, length, enable))
    }

    fn unpin(&self, py: Python<'_>, pin: u32) -> PyResult<()> {
        self.run(py, |s| s.unpin(pin))
    }

    fn pin_read(&self, py: Python<'_>, pin: u32, index: u64) -> PyResult<u32> {
        self.run(py, |s| s.pin_read(pin, index))
    }

    fn pin_write(&self, py: Python<'_>, pin: u32, index: u64) -> PyResult<u32> {
        self.run(py, |s| s.pin_write(pin, index))
    }

    fn clear_soft_dirty(&self, py: Python<'_>, pid: u32) -> PyResult<()> {
        self.run(py, |s| s.clear_soft_dirty(pid))
    }

    /// /proc/<pid>/pagemap entries of a range, as root would read them.
    fn pagemap<'py>(&self, py: Python<'py>, pid: u32, addr: u64, length: u64) -> PyResult<Bound<'py, PyArray1<u64>>> {
        Ok(self.run(py, |s| s.pagemap(pid, addr, length))?.into_pyarray(py))
    }

    fn kpagecount(&self, py: Python<'_>, pfn: u64) -> PyResult<u64> {
        self.run(py, |s| s.st.kpagecount(pfn))
    }

    /// /proc/kpageflags of a page: the KPF_* bits the model knows.
    fn kpageflags(&self, py: Python<'_>, pfn: u64) -> PyResult<u64> {
        self.run(py, |s| s.st.kpageflags(pfn))
    }

    /// Rescans every page table and compares with the stored counters.
    fn check(&self, py: Python<'_>) -> PyResult<()> {
        self.run(py, |s| s.check())
    }

    #[getter]
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.lock(py)?.st.total)
    }

    #[getter]
    fn last_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.lock(py)?.st.op)
    }

    /// The VMAs of a process, as dicts (addresses in bytes).
    fn vmas<'py>(&self, py: Python<'py>, pid: u32) -> PyResult<Bound<'py, PyList>> {
        let s = self.lock(py)?;
        let mm = s.mm(pid)?;
        let shift = s.st.page_shift;
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
            if v.mthp == 0 {
                d.set_item("mthp", py.None())?;
            } else {
                let sizes: Vec<u64> = (0..32).filter(|o| v.mthp & (1 << o) != 0).map(|o| 1u64 << (o + shift)).collect();
                d.set_item("mthp", sizes)?;
            }
            d.set_item("hugepage", v.hugepage)?;
            d.set_item("nohugepage", v.nohugepage)?;
            d.set_item("pmd", v.thp_pmd)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// Huge PMDs of the VMA holding `addr`: (address, PMD entry) pairs in address order.
    fn pmds(&self, py: Python<'_>, pid: u32, addr: u64) -> PyResult<Vec<(u64, u64)>> {
        let s = self.lock(py)?;
        let (k, v) = s.vma_index(pid, addr)?;
        let shift = s.st.page_shift;
        Ok(s.st.mms[k].vmas[v].pmds.iter().map(|(&b, &e)| (b << shift, e)).collect())
    }

    /// smaps' AnonHugePages of every VMA of a process, in bytes, in VMA order.
    fn anon_huge_pages(&self, py: Python<'_>, pid: u32) -> PyResult<Vec<u64>> {
        let s = self.lock(py)?;
        s.mm(pid)?;
        let k = pid as usize - 1;
        let ps = s.page_size();
        let n = s.st.mms[k].vmas.len();
        Ok((0..n).map(|v| with_layout!(&s.layout, l => s.st.anon_huge_pages(l, k, v)) * ps).collect())
    }

    /// The PTE array of the VMA holding `addr`: a read-only view of the simulation's page
    /// table (O(1); it follows every later step while the VMA lives).
    fn ptes<'py>(&self, py: Python<'py>, pid: u32, addr: u64) -> PyResult<Bound<'py, PyArray1<u64>>> {
        let s = self.lock(py)?;
        let (k, v) = s.vma_index(pid, addr)?;
        let t = &s.st.mms[k].vmas[v].ptes;
        // SAFETY: a store never moves or shrinks, and the owner keeps it alive.
        unsafe { super::views::view(py, t.as_ptr(), t.len(), super::views::ViewOwner::ptes(t.store())) }
    }

    /// rss counters of a process: {"file", "anon", "shmem"}.
    fn rss<'py>(&self, py: Python<'py>, pid: u32) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock(py)?;
        let mm = s.mm(pid)?;
        let d = PyDict::new(py);
        for (name, v) in crate::mm::RSS_NAMES.iter().zip(mm.rss) {
            d.set_item(name, v)?;
        }
        Ok(d)
    }

    /// One page's state, with the kernel's meaning of every count.
    fn page<'py>(&self, py: Python<'py>, pfn: u64) -> PyResult<Bound<'py, PyDict>> {
        let s = self.lock(py)?;
        let st = &s.st;
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

    /// One per-page array as a read-only view of the simulation's own (O(1)): "order"
    /// (255 = free), "flags", "mapcount", "refcount", "token".
    fn memory_array<'py>(slf: &Bound<'py, Self>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        use super::views::{view, ViewOwner};
        let py = slf.py();
        let this = slf.get();
        let s = this.lock(py)?;
        let m = &s.st.mem;
        let owner = || ViewOwner::memory(slf.clone().into_any().unbind(), &m.exports);
        // SAFETY: the per-page arrays keep their length for the simulation's life, and a
        // step run on a copy writes back into them while they are viewed
        // (Memory::adopt_exported); the owner keeps the simulation alive.
        Ok(match name {
            "order" => unsafe { view(py, m.order.as_ptr(), m.order.len(), owner())? }.into_any(),
            "flags" => unsafe { view(py, m.flags.as_ptr(), m.flags.len(), owner())? }.into_any(),
            "mapcount" => unsafe { view(py, m.mapcount.as_ptr(), m.mapcount.len(), owner())? }.into_any(),
            "refcount" => unsafe { view(py, m.refcount.as_ptr(), m.refcount.len(), owner())? }.into_any(),
            "token" => unsafe { view(py, m.token.as_ptr(), m.token.len(), owner())? }.into_any(),
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
        let s = self.lock(py)?;
        let st = &s.st;
        let m = &st.mem;
        let d = PyDict::new(py);
        d.set_item("order", array_from_slice(py, &m.order, "a copy of the page orders")?)?;
        d.set_item("flags", array_from_slice(py, &m.flags, "a copy of the page flags")?)?;
        d.set_item("mapcount", array_from_slice(py, &m.mapcount, "a copy of the mapcounts")?)?;
        d.set_item("refcount", array_from_slice(py, &m.refcount, "a copy of the refcounts")?)?;
        d.set_item("token", array_from_slice(py, &m.token, "a copy of the tokens")?)?;
        let mut large: Vec<i64> = crate::alloc::try_with_capacity(m.nr_large_folios() * 9, "the large-folio table")?;
        for (h, lf) in m.large_folio_iter() {
            large.extend([
                h as i64,
                lf.large_mapcount as i64,
                lf.entire_mapcount as i64,
                lf.nr_pages_mapped as i64,
                lf.pincount as i64,
                lf.mm_id[0] as i64,
                lf.mm_id[1] as i64,
                lf.mm_id_mapcount[0] as i64,
                lf.mm_id_mapcount[1] as i64,
            ]);
        }
        d.set_item("large", table(py, large, 9)?)?;
        let free = m.free_blocks();
        d.set_item("free_blocks", table(py, rows(free.into_iter(), 2, "the free-block table", |(p, o)| vec![p as i64, o as i64])?, 2)?)?;
        d.set_item("free_pages", m.free_pages)?;
        d.set_item("next_token", st.next_token)?;
        d.set_item("next_anon_vma", st.next_anon_vma)?;
        d.set_item("rng", m.rng.0)?;
        let nr_vmas: usize = st.mms.iter().map(|mm| mm.vmas.len()).sum();
        let nr_ptes: usize = st.mms.iter().flat_map(|mm| &mm.vmas).map(|v| v.ptes.len()).sum();
        let mut mms: Vec<i64> = crate::alloc::try_with_capacity(st.mms.len() * 9, "the process table")?;
        let mut vmas: Vec<i64> = crate::alloc::try_with_capacity(nr_vmas * 18, "the VMA table")?;
        let mut ptes: Vec<u64> = crate::alloc::try_with_capacity(nr_ptes, "a copy of every page table")?;
        let mut vma_pmd: Vec<i64> = Vec::new();
        let mut pmd_keys: Vec<i64> = Vec::new();
        let mut pmds: Vec<u64> = Vec::new();
        for mm in &st.mms {
            mms.extend([
                mm.pid as i64,
                mm.mm_id as i64,
                mm.rss[0],
                mm.rss[1],
                mm.rss[2],
                mm.has_pinned as i64,
                mm.exited as i64,
                mm.next_vpn as i64,
                mm.thp_disable.prctl_value() as i64,
            ]);
            for v in &mm.vmas {
                vmas.extend([
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
                    v.hugepage as i64,
                    v.nohugepage as i64,
                ]);
                ptes.extend_from_slice(&v.ptes);
                vma_pmd.push(v.thp_pmd as i64);
                for (&b, &e) in &v.pmds {
                    pmd_keys.extend([mm.pid as i64, b as i64]);
                    pmds.push(e);
                }
            }
        }
        d.set_item("mms", table(py, mms, 9)?)?;
        d.set_item("vmas", table(py, vmas, 18)?)?;
        let thp = &st.thp;
        let enabled = crate::policy::ThpEnabled::NAMES.iter().position(|n| *n == thp.enabled.name()).unwrap_or(0);
        d.set_item("thp", vec![enabled as i64, thp.orders_always as i64, thp.orders_madvise as i64, thp.orders_inherit as i64])?;
        d.set_item("ptes", ptes.into_pyarray(py))?;
        d.set_item("vma_pmd", vma_pmd.into_pyarray(py))?;
        d.set_item("pmd_keys", table(py, pmd_keys, 2)?)?;
        d.set_item("pmds", pmds.into_pyarray(py))?;
        // Kind: 0 a file or fixed-order shmem object, 1 shared anonymous memory, 2 + i a tmpfs
        // file mounted with huge=FILE_HUGE[i].
        let kind = |f: &crate::mm::File| match f.kind {
            crate::mm::ShmemKind::Fixed => 0,
            crate::mm::ShmemKind::Anon => 1,
            crate::mm::ShmemKind::Tmpfs(h) => 2 + ["never", "always", "within_size", "advise"].iter().position(|n| *n == h.name()).unwrap_or(0) as i64,
        };
        let files = rows(st.files.iter(), 4, "the file table", |f| vec![f.nr_pages as i64, f.folio_order as i64, f.shmem as i64, kind(f)])?;
        d.set_item("files", table(py, files, 4)?)?;
        let mut shmem = vec![st.shmem_policy.enabled.name()];
        shmem.extend((0..=st.pmd_order).map(|o| st.shmem_policy.sizes[o as usize].name()));
        d.set_item("shmem", shmem)?;
        d.set_item("fault_around_pages", st.fault_around_pages)?;
        let mut cache: Vec<u64> = crate::alloc::try_with_capacity(st.files.iter().map(|f| f.cache.len()).sum(), "a copy of the page caches")?;
        st.files.iter().for_each(|f| cache.extend_from_slice(&f.cache));
        d.set_item("file_cache", cache.into_pyarray(py))?;
        let pins = rows(st.pins.iter(), 3, "the pin table", |p| vec![p.active as i64, p.longterm as i64, p.pfns.len() as i64])?;
        d.set_item("pins", table(py, pins, 3)?)?;
        let mut pin_pfns: Vec<u64> = crate::alloc::try_with_capacity(st.pins.iter().map(|p| p.pfns.len()).sum(), "the pinned pages")?;
        st.pins.iter().for_each(|p| pin_pfns.extend_from_slice(&p.pfns));
        d.set_item("pin_pfns", pin_pfns.into_pyarray(py))?;
        Ok(d)
    }

    /// Bytes of simulation state per simulated page (memory arrays, page tables, folio
    /// records), for the memory-cost figure.
    fn state_bytes(&self, py: Python<'_>) -> PyResult<u64> {
        let s = self.lock(py)?;
        let st = &s.st;
        Ok((st.mem.state_bytes() + st.page_table_bytes()) as u64)
    }

    /// The name a free page's order has in `memory_array("order")`.
    #[classattr]
    const FREE_ORDER: u8 = FREE;

    /// Places a captured folio at pfn `head`: `kind` "anon", or "file" with the file id and
    /// the file page of its first page.
    #[pyo3(signature = (head, order, kind, file = None, index = 0, dirty = false))]
    #[allow(clippy::too_many_arguments)]
    fn place_folio(&self, py: Python<'_>, head: u64, order: u32, kind: &str, file: Option<u32>, index: u64, dirty: bool) -> PyResult<()> {
        let k = match (kind, file) {
            ("anon", None) => crate::restore::FolioKind::Anon,
            ("file", Some(fid)) => crate::restore::FolioKind::File { fid, index },
            _ => return Err(Error::value("kind must be \"anon\", or \"file\" with file=<id>").into()),
        };
        self.run(py, |s| s.place_folio(head, order, k, dirty))
    }

    /// Decodes a PTE of this simulation's layout into its logical bits.
    fn decode_pte<'py>(&self, py: Python<'py>, pte: u64) -> PyResult<Bound<'py, PyDict>> {
        let d = PyDict::new(py);
        let layout = self.lock(py)?.layout.clone();
        with_layout!(&layout, l => {
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

// ---- Building a state from arrays (issue 12 item 3; rust/src/restore.rs) ------------------

/// One VMA of `Simulation.from_arrays` (the Python layer has checked types and dtypes).
#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct VmaArg<'py> {
    start: u64,
    ptes: PyReadonlyArray1<'py, u64>,
    prot: String,
    shared: bool,
    file: Option<u32>,
    offset: u64,
    vm_softdirty: bool,
    uffd_wp: bool,
    uffd_event_fork: bool,
    dontfork: bool,
    wipeonfork: bool,
    anon_vma: u32,
    mthp: Option<Vec<u64>>,
    hugepage: bool,
    nohugepage: bool,
    pmd: bool,
    /// (address, PMD entry) pairs.
    pmds: Vec<(u64, u64)>,
}

#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct ProcArg<'py> {
    vmas: Vec<VmaArg<'py>>,
    exited: bool,
    has_pinned: bool,
    next_mmap: Option<u64>,
    /// PR_SET_THP_DISABLE as `prctl(PR_GET_THP_DISABLE)` reads it: 0, 1, or 3 (except advised).
    thp_disable: u32,
}

#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct FolioArg<'py> {
    pfn: PyReadonlyArray1<'py, u64>,
    order: PyReadonlyArray1<'py, u8>,
    kind: PyReadonlyArray1<'py, u8>,
    file: PyReadonlyArray1<'py, u32>,
    index: PyReadonlyArray1<'py, u64>,
    dirty: PyReadonlyArray1<'py, bool>,
    partially_mapped: Option<PyReadonlyArray1<'py, bool>>,
    maybe_shared: Option<PyReadonlyArray1<'py, bool>>,
    mm_ids: Option<PyReadonlyArray1<'py, u32>>,
    mm_id_mapcounts: Option<PyReadonlyArray1<'py, i32>>,
}

#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct PinArg<'py> {
    pfns: PyReadonlyArray1<'py, u64>,
    write: bool,
    longterm: bool,
    active: bool,
}

#[derive(FromPyObject)]
#[pyo3(from_item_all)]
struct FileArg {
    size: u64,
    folio_size: u64,
    shmem: bool,
    huge: Option<String>,
    anon: bool,
}

fn opt_slice<'a, T: numpy::Element>(a: &'a Option<PyReadonlyArray1<'_, T>>) -> PyResult<Option<&'a [T]>> {
    Ok(match a {
        Some(a) => Some(a.as_slice()?),
        None => None,
    })
}

#[pymethods]
impl PySimulation {
    /// A simulation built from arrays (see `ptebatch.Simulation.from_arrays`, which checks the
    /// arguments' types and dtypes first): the page tables are borrowed and copied once into
    /// the simulation, with the GIL released.
    #[staticmethod]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (arch, kernel, memory, seed, batching, files, folios, processes, pins, token, anon_exclusive, next_token, next_anon_vma))]
    fn from_arrays(
        py: Python<'_>,
        arch: &str,
        kernel: &str,
        memory: u64,
        seed: u64,
        batching: bool,
        files: Vec<FileArg>,
        folios: FolioArg<'_>,
        processes: Vec<ProcArg<'_>>,
        pins: Vec<PinArg<'_>>,
        token: Option<PyReadonlyArray1<'_, u32>>,
        anon_exclusive: Option<PyReadonlyArray1<'_, bool>>,
        next_token: Option<u32>,
        next_anon_vma: Option<u32>,
    ) -> PyResult<PySimulation> {
        use crate::restore::{Build, FileSpec, Folios, MmSpec, PinSpec, VmaSpec};
        let layout = Layout::by_name(arch, None)?;
        let mut profile = KernelProfile::parse(kernel)?;
        if !batching {
            profile = profile.unbatched();
        }
        let shift = layout.geometry().page_shift;
        let page = 1u64 << shift;
        let mut mms = Vec::with_capacity(processes.len());
        for (k, p) in processes.iter().enumerate() {
            let mut vmas = Vec::with_capacity(p.vmas.len());
            for (i, v) in p.vmas.iter().enumerate() {
                if v.start % page != 0 || v.offset % page != 0 || v.pmds.iter().any(|&(a, _)| a % page != 0) {
                    return Err(Error::value(format!("processes[{k}][\"vmas\"][{i}]: start {:#x} and offset {:#x} must be multiples of the {page}-byte page", v.start, v.offset)).into());
                }
                vmas.push(VmaSpec {
                    start: v.start >> shift,
                    ptes: v.ptes.as_slice()?,
                    prot: prot_arg(&v.prot)?,
                    shared: v.shared,
                    file: v.file,
                    pgoff: v.offset >> shift,
                    vm_softdirty: v.vm_softdirty,
                    uffd_wp: v.uffd_wp,
                    uffd_event_fork: v.uffd_event_fork,
                    dontfork: v.dontfork,
                    wipeonfork: v.wipeonfork,
                    anon_vma: v.anon_vma,
                    mthp: v.mthp.clone(),
                    hugepage: v.hugepage,
                    nohugepage: v.nohugepage,
                    thp_pmd: v.pmd,
                    pmds: v.pmds.iter().map(|&(a, e)| (a >> shift, e)).collect(),
                });
            }
            if p.next_mmap.is_some_and(|a| a % page != 0) {
                return Err(Error::value(format!("processes[{k}]: next_mmap must be a multiple of the {page}-byte page")).into());
            }
            let thp_disable = match p.thp_disable {
                0 => crate::policy::ThpDisable::No,
                1 => crate::policy::ThpDisable::Completely,
                3 => crate::policy::ThpDisable::ExceptAdvised,
                v => return Err(Error::value(format!("processes[{k}]: thp_disable {v} is not 0, 1 or 3 (PR_GET_THP_DISABLE)")).into()),
            };
            mms.push(MmSpec { vmas, exited: p.exited, has_pinned: p.has_pinned, next_vpn: p.next_mmap.map(|a| a >> shift), thp_disable });
        }
        let mut pin_specs = Vec::with_capacity(pins.len());
        for p in &pins {
            pin_specs.push(PinSpec { pfns: p.pfns.as_slice()?, write: p.write, longterm: p.longterm, active: p.active });
        }
        let b = Build {
            files: files.iter().map(|f| FileSpec { size: f.size, folio_size: f.folio_size, shmem: f.shmem, huge: f.huge.clone(), anon: f.anon }).collect(),
            folios: Folios {
                pfn: folios.pfn.as_slice()?,
                order: folios.order.as_slice()?,
                kind: folios.kind.as_slice()?,
                file: folios.file.as_slice()?,
                index: folios.index.as_slice()?,
                dirty: folios.dirty.as_slice()?,
                partially_mapped: opt_slice(&folios.partially_mapped)?,
                maybe_shared: opt_slice(&folios.maybe_shared)?,
                mm_ids: opt_slice(&folios.mm_ids)?,
                mm_id_mapcounts: opt_slice(&folios.mm_id_mapcounts)?,
            },
            mms,
            pins: pin_specs,
            token: opt_slice(&token)?,
            anon_exclusive: opt_slice(&anon_exclusive)?,
            next_token,
            next_anon_vma,
        };
        // Ctrl-C (and nothing else: no progress callback can be set yet) stops the build.
        let watch = Arc::new(SignalWatch::default());
        let w = watch.clone() as Arc<dyn Watch>;
        let r = py.detach(|| Simulation::from_arrays(layout, profile, memory, seed, &b, Some(w)));
        if let Some(e) = watch.pending() {
            return Err(e);
        }
        let sim = match r {
            Ok(sim) => sim,
            Err(e) if e.kind == ErrorKind::Interrupted => return Err(PyKeyboardInterrupt::new_err("interrupted")),
            Err(e) => return Err(e.into()),
        };
        Ok(PySimulation { inner: Mutex::new(sim), holder: AtomicU64::new(0), watch, arch: arch.to_string(), kernel: kernel.to_string(), batching })
    }

    /// The pins, for `to_arrays`: dicts of pfns (uint64), write, longterm, active.
    fn pins<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let s = self.lock(py)?;
        let out = PyList::empty(py);
        for p in &s.st.pins {
            let d = PyDict::new(py);
            d.set_item("pfns", array_from_slice(py, &p.pfns, "a copy of a pin's pages")?)?;
            d.set_item("write", p.write)?;
            d.set_item("longterm", p.longterm)?;
            d.set_item("active", p.active)?;
            out.append(d)?;
        }
        Ok(out)
    }

    /// The simulated-fragmentation probability per folio order (`set_fallback`).
    fn fallback(&self, py: Python<'_>) -> PyResult<Vec<f64>> {
        Ok(self.lock(py)?.st.mem.fallback.clone())
    }
}

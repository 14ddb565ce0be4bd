//! The kernel's batched helpers over arrays the caller owns (`ptebatch.helpers`,
//! docs/helpers.md): argument checks at the boundary (dtype, C-contiguity, writeability,
//! lengths, ranges; nothing is written when one fails), the update in place with the GIL
//! released, and the simulation's counters as a dict. The algorithms are the simulation's own
//! (crate::pgtable, crate::rmap, crate::fork, crate::zap).

use numpy::{PyArrayDyn, PyArrayMethods, PyReadwriteArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::args::{index_arg, u64_scalar};
use super::batch::{layout_arg, profile_arg};
use super::sim::stats_dict;
use crate::arch::{Layout, PteLayout};
use crate::batch::FpbFlags;
use crate::error::Error;
use crate::fork::{copy_pte_range_arrays, CopyCtx, CopyEnv};
use crate::kernel::KernelProfile;
use crate::memory::{MM_ID_DUMMY, PG_ANON};
use crate::mm::Prot;
use crate::pgtable::{self, check_run, check_table};
use crate::rmap::{check_folio, FolioArrays, FolioCounts, Rmap};
use crate::stats::Stats;
use crate::with_layout;
use crate::zap::{new_gather, zap_pte_range_arrays, ZapCtx, ZapEnv};

/// A writeable, C-contiguous numpy array of exactly `T` with `ndim` dimensions, borrowed
/// for writing (numpy's borrow checking refuses the same array passed twice).
fn rw_array<'py, T: numpy::Element>(obj: &Bound<'py, PyAny>, name: &str, dtype: &str, ndim: usize) -> PyResult<PyReadwriteArrayDyn<'py, T>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy {dtype} array, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let typed = untyped.cast::<PyArrayDyn<T>>().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a numpy {dtype} array, got dtype {}", untyped.dtype()))
    })?;
    if typed.ndim() != ndim {
        return Err(PyValueError::new_err(format!("{name} must have {ndim} dimension(s), got {}", typed.ndim())));
    }
    if !typed.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous (it is updated in place, never copied); use np.ascontiguousarray"
        )));
    }
    typed.try_readwrite().map_err(|e| match e {
        numpy::BorrowError::NotWriteable => PyValueError::new_err(format!("{name} is read-only; the helpers update it in place")),
        _ => PyValueError::new_err(format!("{name} cannot be borrowed for writing ({e}); is the same array passed twice?")),
    })
}

/// A read-only, C-contiguous one-dimensional numpy array of exactly `T`.
fn ro_array<'py, T: numpy::Element>(obj: &Bound<'py, PyAny>, name: &str, dtype: &str) -> PyResult<numpy::PyReadonlyArrayDyn<'py, T>> {
    let untyped = obj.cast::<PyUntypedArray>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy {dtype} array, not {}",
            obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
        ))
    })?;
    let typed = untyped.cast::<PyArrayDyn<T>>().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a numpy {dtype} array, got dtype {}", untyped.dtype()))
    })?;
    if typed.ndim() != 1 || !typed.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{name} must be a one-dimensional C-contiguous array")));
    }
    typed.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

fn slice_mut<'a, T: numpy::Element>(a: &'a mut PyReadwriteArrayDyn<'_, T>, name: &str) -> PyResult<&'a mut [T]> {
    a.as_slice_mut().map_err(|_| PyValueError::new_err(format!("{name} must be C-contiguous")))
}

/// The count arrays of a `ptebatch.helpers.FolioCounts` (or any object with those
/// attributes), borrowed for writing.
struct Counts<'py> {
    order: PyReadwriteArrayDyn<'py, u8>,
    flags: PyReadwriteArrayDyn<'py, u8>,
    mapcount: PyReadwriteArrayDyn<'py, i32>,
    refcount: PyReadwriteArrayDyn<'py, i32>,
    large_mapcount: PyReadwriteArrayDyn<'py, i32>,
    nr_pages_mapped: PyReadwriteArrayDyn<'py, i32>,
    pincount: PyReadwriteArrayDyn<'py, i32>,
    mm_id: PyReadwriteArrayDyn<'py, u32>,
    mm_id_mapcount: PyReadwriteArrayDyn<'py, i32>,
}

impl<'py> Counts<'py> {
    fn extract(obj: &Bound<'py, PyAny>) -> PyResult<Counts<'py>> {
        let get = |field: &str| {
            obj.getattr(field).map_err(|_| {
                PyTypeError::new_err(format!(
                    "counts must be a ptebatch.helpers.FolioCounts (no attribute {field:?} on {})",
                    obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
                ))
            })
        };
        let c = Counts {
            order: rw_array(&get("order")?, "counts.order", "uint8", 1)?,
            flags: rw_array(&get("flags")?, "counts.flags", "uint8", 1)?,
            mapcount: rw_array(&get("mapcount")?, "counts.mapcount", "int32", 1)?,
            refcount: rw_array(&get("refcount")?, "counts.refcount", "int32", 1)?,
            large_mapcount: rw_array(&get("large_mapcount")?, "counts.large_mapcount", "int32", 1)?,
            nr_pages_mapped: rw_array(&get("nr_pages_mapped")?, "counts.nr_pages_mapped", "int32", 1)?,
            pincount: rw_array(&get("pincount")?, "counts.pincount", "int32", 1)?,
            mm_id: rw_array(&get("mm_id")?, "counts.mm_id", "uint32", 2)?,
            mm_id_mapcount: rw_array(&get("mm_id_mapcount")?, "counts.mm_id_mapcount", "int32", 2)?,
        };
        let n = c.order.shape()[0];
        for (name, shape) in [("counts.mm_id", c.mm_id.shape()), ("counts.mm_id_mapcount", c.mm_id_mapcount.shape())] {
            if shape != [n, 2] {
                return Err(PyValueError::new_err(format!("{name} has shape {shape:?}; it must be (nr_pages, 2) = ({n}, 2)")));
            }
        }
        Ok(c)
    }

    fn arrays(&mut self) -> PyResult<FolioArrays<'_>> {
        Ok(FolioArrays::new(
            slice_mut(&mut self.order, "counts.order")?,
            slice_mut(&mut self.flags, "counts.flags")?,
            slice_mut(&mut self.mapcount, "counts.mapcount")?,
            slice_mut(&mut self.refcount, "counts.refcount")?,
            slice_mut(&mut self.large_mapcount, "counts.large_mapcount")?,
            slice_mut(&mut self.nr_pages_mapped, "counts.nr_pages_mapped")?,
            slice_mut(&mut self.pincount, "counts.pincount")?,
            slice_mut(&mut self.mm_id, "counts.mm_id")?,
            slice_mut(&mut self.mm_id_mapcount, "counts.mm_id_mapcount")?,
        )?)
    }
}

fn table_arg<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadwriteArrayDyn<'py, u64>> {
    rw_array(obj, name, "uint64", 1)
}

fn mm_id_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u32> {
    let v = u64_scalar(obj, name)?;
    match u32::try_from(v) {
        Ok(id) if id != MM_ID_DUMMY => Ok(id),
        _ => Err(PyValueError::new_err(format!("{name}={v}: an MM-ID is between 1 and 2**32 - 1 (0 is MM_ID_DUMMY)"))),
    }
}

fn i32_count(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i32> {
    let v = u64_scalar(obj, name)?;
    i32::try_from(v).ok().filter(|&v| v >= 1).ok_or_else(|| PyValueError::new_err(format!("{name}={v} must be between 1 and 2**31 - 1")))
}

/// The virtual pages of a table of `len` entries from `first_vpn` fit 64 bits.
fn check_vpn(first_vpn: u64, len: usize) -> PyResult<()> {
    if first_vpn.checked_add(len as u64).is_none() {
        return Err(PyValueError::new_err(format!("first_vpn={first_vpn:#x}: the table's {len} pages would pass 2**64")));
    }
    Ok(())
}

fn cont_of(layout: &Layout, p: &KernelProfile) -> Option<usize> {
    with_layout!(layout, l => pgtable::cont_ptes(l, p))
}

/// The run `[index, index + nr)` of one folio, checked; returns (head, page, nr).
fn folio_run(order: &[u8], page: u64, nr: u64) -> crate::Result<(u64, u64, u64)> {
    let n = order.len() as u64;
    if page >= n {
        return Err(Error::value(format!("page={page} is beyond the {n} pages of the count arrays")));
    }
    let o = order[page as usize];
    if o == crate::memory::FREE {
        return Err(Error::value(format!("page={page} is a free page (order 255)")));
    }
    let head = if o >= 32 { page } else { page & !((1u64 << o) - 1) };
    let o = check_folio(order, head, "the folio's first page")?;
    if nr == 0 || nr > head + (1u64 << o) - page {
        return Err(Error::value(format!(
            "nr={nr}: the run from page {page} must hold at least one page and stay inside its folio [{head}, {})",
            head + (1u64 << o)
        )));
    }
    Ok((head, page, nr))
}

/// [`folio_run`] of an anonymous folio (the anon rmap helpers warn on any other).
fn anon_run(a: &FolioArrays<'_>, page: u64, nr: u64) -> crate::Result<(u64, u64, u64)> {
    let run = folio_run(a.order, page, nr)?;
    if !a.test(run.0, PG_ANON) {
        return Err(Error::value(format!("the folio at pfn {} is not anonymous (PG_ANON clear in counts.flags)", run.0)));
    }
    Ok(run)
}

// ---- PTE helpers -------------------------------------------------------------------------

/// `ptep_get()`, with the arm64 contpte young/dirty gather.
#[pyfunction]
#[pyo3(signature = (ptes, index, *, layout, kernel, first_vpn=None))]
pub fn ptep_get(ptes: &Bound<'_, PyAny>, index: &Bound<'_, PyAny>, layout: &Bound<'_, PyAny>, kernel: &Bound<'_, PyAny>, first_vpn: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    let p = profile_arg(kernel)?;
    let layout = layout_arg(layout)?;
    let t = super::args::u64_table(ptes, "ptes")?;
    let t = t.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let i = index_arg(index, "index")?;
    check_run(t.len(), i, 1)?;
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    check_vpn(first_vpn, t.len())?;
    let cont = cont_of(&layout, &p);
    Ok(with_layout!(&layout, l => pgtable::ptep_get(l, cont, t, first_vpn, i)))
}

/// `set_ptes()`: entries `index .. index + nr` get `pte` with the pfn advancing.
#[pyfunction]
#[pyo3(signature = (ptes, index, pte, nr, *, layout, kernel, first_vpn=None, order=None))]
#[allow(clippy::too_many_arguments)]
pub fn set_ptes<'py>(
    py: Python<'py>,
    ptes: &Bound<'py, PyAny>,
    index: &Bound<'py, PyAny>,
    pte: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    first_vpn: Option<&Bound<'py, PyAny>>,
    order: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = profile_arg(kernel)?;
    let layout = layout_arg(layout)?;
    let mut arr = table_arg(ptes, "ptes")?;
    let (i, nr) = (index_arg(index, "index")?, index_arg(nr, "nr")?);
    let pte = u64_scalar(pte, "pte")?;
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let order = order.filter(|o| !o.is_none()).map(|o| ro_array::<u8>(o, "order", "uint8")).transpose()?;
    let order = order.as_ref().map(|o| o.as_slice()).transpose().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let t = slice_mut(&mut arr, "ptes")?;
    check_run(t.len(), i, nr)?;
    check_vpn(first_vpn, t.len())?;
    let g = layout.geometry();
    if with_layout!(&layout, l => l.pte_present(pte) && !l.pte_none(pte)) {
        let pfn = with_layout!(&layout, l => l.pte_pfn(pte));
        if pfn.checked_add(nr as u64 - 1).map_or(true, |last| last > g.max_pfn) {
            return Err(PyValueError::new_err(format!(
                "pte maps pfn {pfn:#x}; {nr} entries from it pass the largest pfn {:#x} of {}",
                g.max_pfn,
                layout.name()
            )));
        }
    }
    let cont = cont_of(&layout, &p);
    let mut st = Stats::default();
    py.detach(|| {
        let folio_of = |pfn: u64| -> Option<(u64, u64)> {
            let o = order?;
            let k = *o.get(pfn as usize)?;
            (k != crate::memory::FREE).then(|| (pfn & !((1u64 << k) - 1), 1u64 << k))
        };
        with_layout!(&layout, l => pgtable::set_ptes(l, cont, t, first_vpn, i, pte, nr, folio_of, &mut st))
    });
    stats_dict(py, &st)
}

/// `wrprotect_ptes()`.
#[pyfunction]
#[pyo3(signature = (ptes, index, nr, *, layout, kernel, first_vpn=None))]
#[allow(clippy::too_many_arguments)]
pub fn wrprotect_ptes<'py>(
    py: Python<'py>,
    ptes: &Bound<'py, PyAny>,
    index: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    first_vpn: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = profile_arg(kernel)?;
    let layout = layout_arg(layout)?;
    let mut arr = table_arg(ptes, "ptes")?;
    let (i, nr) = (index_arg(index, "index")?, index_arg(nr, "nr")?);
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let t = slice_mut(&mut arr, "ptes")?;
    check_run(t.len(), i, nr)?;
    check_vpn(first_vpn, t.len())?;
    let cont = cont_of(&layout, &p);
    let mut st = Stats::default();
    py.detach(|| with_layout!(&layout, l => pgtable::wrprotect_ptes(l, cont, t, first_vpn, i, nr, &mut st)));
    stats_dict(py, &st)
}

/// `clear_full_ptes()`.
#[pyfunction]
#[pyo3(signature = (ptes, index, nr, *, layout, kernel, full=false, first_vpn=None))]
#[allow(clippy::too_many_arguments)]
pub fn clear_full_ptes<'py>(
    py: Python<'py>,
    ptes: &Bound<'py, PyAny>,
    index: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    full: bool,
    first_vpn: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = profile_arg(kernel)?;
    let layout = layout_arg(layout)?;
    let mut arr = table_arg(ptes, "ptes")?;
    let (i, nr) = (index_arg(index, "index")?, index_arg(nr, "nr")?);
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let t = slice_mut(&mut arr, "ptes")?;
    check_run(t.len(), i, nr)?;
    check_vpn(first_vpn, t.len())?;
    let cont = cont_of(&layout, &p);
    let mut st = Stats::default();
    py.detach(|| with_layout!(&layout, l => pgtable::clear_full_ptes(l, cont, t, first_vpn, i, nr, full, &mut st)));
    stats_dict(py, &st)
}

/// `get_and_clear_full_ptes()`: the first entry with the run's dirty and young bits.
#[pyfunction]
#[pyo3(signature = (ptes, index, nr, *, layout, kernel, full=false, first_vpn=None))]
#[allow(clippy::too_many_arguments)]
pub fn get_and_clear_full_ptes<'py>(
    py: Python<'py>,
    ptes: &Bound<'py, PyAny>,
    index: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    full: bool,
    first_vpn: Option<&Bound<'py, PyAny>>,
) -> PyResult<u64> {
    let p = profile_arg(kernel)?;
    let layout = layout_arg(layout)?;
    let mut arr = table_arg(ptes, "ptes")?;
    let (i, nr) = (index_arg(index, "index")?, index_arg(nr, "nr")?);
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let t = slice_mut(&mut arr, "ptes")?;
    check_run(t.len(), i, nr)?;
    check_vpn(first_vpn, t.len())?;
    let cont = cont_of(&layout, &p);
    let mut st = Stats::default();
    Ok(py.detach(|| with_layout!(&layout, l => pgtable::get_and_clear_full_ptes(l, cont, t, first_vpn, i, nr, full, &mut st))))
}

// ---- Folio reference and rmap helpers ----------------------------------------------------

/// Runs `f` on the rmap context of the counts, with the GIL released.
/// `check` reads the arrays before anything is written and gives `f` what it found.
fn with_rmap<'py, R: Send, T: Send>(
    py: Python<'py>,
    counts: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    check: impl FnOnce(&FolioArrays<'_>) -> crate::Result<R>,
    f: impl FnOnce(&mut Rmap<'_, FolioArrays<'_>>, R) -> T + Send,
) -> PyResult<(T, Stats)> {
    let p = profile_arg(kernel)?;
    let mut c = Counts::extract(counts)?;
    let mut arrays = c.arrays()?;
    let found = check(&arrays)?;
    let mut st = Stats::default();
    let out = py.detach(|| f(&mut Rmap { mem: &mut arrays, stats: &mut st, profile: &p }, found));
    Ok((out, st))
}

/// `folio_ref_add()`.
#[pyfunction]
#[pyo3(signature = (counts, head, nr, *, kernel))]
pub fn folio_ref_add<'py>(py: Python<'py>, counts: &Bound<'py, PyAny>, head: &Bound<'py, PyAny>, nr: &Bound<'py, PyAny>, kernel: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyDict>> {
    let (head, nr) = (u64_scalar(head, "head")?, i32_count(nr, "nr")?);
    let check = |a: &FolioArrays<'_>| -> crate::Result<()> {
        check_folio(a.order, head, "head")?;
        if a.refcount[head as usize].checked_add(nr).is_none() {
            return Err(Error::value(format!("refcount[{head}] + {nr} overflows int32")));
        }
        Ok(())
    };
    let ((), st) = with_rmap(py, counts, kernel, check, |r, ()| r.ref_add(head, nr))?;
    stats_dict(py, &st)
}

/// `folio_put_refs()`: True when the last reference went and the folio was freed.
#[pyfunction]
#[pyo3(signature = (counts, head, nr, *, kernel))]
pub fn folio_put_refs<'py>(py: Python<'py>, counts: &Bound<'py, PyAny>, head: &Bound<'py, PyAny>, nr: &Bound<'py, PyAny>, kernel: &Bound<'py, PyAny>) -> PyResult<bool> {
    let (head, nr) = (u64_scalar(head, "head")?, i32_count(nr, "nr")?);
    let check = |a: &FolioArrays<'_>| -> crate::Result<()> {
        check_folio(a.order, head, "head")?;
        let r = a.refcount[head as usize];
        if r < nr {
            return Err(Error::value(format!("refcount[{head}]={r} is below nr={nr}: a folio's refcount never goes negative")));
        }
        Ok(())
    };
    let (freed, _) = with_rmap(py, counts, kernel, check, |r, ()| {
        let before = r.stats.folios_freed;
        r.put_refs(head, nr);
        r.stats.folios_freed > before
    })?;
    Ok(freed)
}

/// `folio_add_anon_rmap_ptes()` (RMAP_EXCLUSIVE when `exclusive`).
#[pyfunction]
#[pyo3(signature = (counts, page, nr, *, kernel, mm_id, exclusive=false))]
#[allow(clippy::too_many_arguments)]
pub fn folio_add_anon_rmap_ptes<'py>(
    py: Python<'py>,
    counts: &Bound<'py, PyAny>,
    page: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    mm_id: &Bound<'py, PyAny>,
    exclusive: bool,
) -> PyResult<Bound<'py, PyDict>> {
    let (page, nr, mm_id) = (u64_scalar(page, "page")?, u64_scalar(nr, "nr")?, mm_id_arg(mm_id, "mm_id")?);
    let check = |a: &FolioArrays<'_>| anon_run(a, page, nr);
    let (_, st) = with_rmap(py, counts, kernel, check, |r, run| r.add_anon_ptes(run.0, run.1, run.2, mm_id, exclusive))?;
    stats_dict(py, &st)
}

/// `folio_try_dup_anon_rmap_ptes()`: False (nothing changed) when the folio may be pinned
/// (`src_has_pinned` and `folio_maybe_dma_pinned()`) and a page of the run is exclusive.
#[pyfunction]
#[pyo3(signature = (counts, page, nr, *, kernel, dst_mm_id, src_has_pinned=false))]
#[allow(clippy::too_many_arguments)]
pub fn folio_try_dup_anon_rmap_ptes<'py>(
    py: Python<'py>,
    counts: &Bound<'py, PyAny>,
    page: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    dst_mm_id: &Bound<'py, PyAny>,
    src_has_pinned: bool,
) -> PyResult<bool> {
    let (page, nr, mm_id) = (u64_scalar(page, "page")?, u64_scalar(nr, "nr")?, mm_id_arg(dst_mm_id, "dst_mm_id")?);
    let check = |a: &FolioArrays<'_>| anon_run(a, page, nr);
    let (ok, _) = with_rmap(py, counts, kernel, check, |r, run| r.try_dup_anon_ptes(run.0, run.1, run.2, mm_id, src_has_pinned))?;
    Ok(ok)
}

/// `folio_dup_file_rmap_ptes()`.
#[pyfunction]
#[pyo3(signature = (counts, page, nr, *, kernel, dst_mm_id))]
pub fn folio_dup_file_rmap_ptes<'py>(
    py: Python<'py>,
    counts: &Bound<'py, PyAny>,
    page: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    dst_mm_id: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let (page, nr, mm_id) = (u64_scalar(page, "page")?, u64_scalar(nr, "nr")?, mm_id_arg(dst_mm_id, "dst_mm_id")?);
    let check = |a: &FolioArrays<'_>| folio_run(a.order, page, nr);
    let (_, st) = with_rmap(py, counts, kernel, check, |r, run| r.dup_file_ptes(run.0, run.1, run.2, mm_id))?;
    stats_dict(py, &st)
}

/// `folio_remove_rmap_ptes()`.
#[pyfunction]
#[pyo3(signature = (counts, page, nr, *, kernel, mm_id))]
pub fn folio_remove_rmap_ptes<'py>(
    py: Python<'py>,
    counts: &Bound<'py, PyAny>,
    page: &Bound<'py, PyAny>,
    nr: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    mm_id: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let (page, nr, mm_id) = (u64_scalar(page, "page")?, u64_scalar(nr, "nr")?, mm_id_arg(mm_id, "mm_id")?);
    let check = |a: &FolioArrays<'_>| -> crate::Result<(u64, u64, u64)> {
        let run = folio_run(a.order, page, nr)?;
        if let Some(p) = (page..page + nr).find(|&p| a.mapcount[p as usize] < 1) {
            return Err(Error::value(format!("counts.mapcount[{p}]={}: a page that is not mapped cannot lose a mapping", a.mapcount[p as usize])));
        }
        Ok(run)
    };
    let (_, st) = with_rmap(py, counts, kernel, check, |r, run| r.remove_ptes(run.0, run.1, run.2, mm_id))?;
    stats_dict(py, &st)
}

// ---- Whole page tables ---------------------------------------------------------------------

fn result_dict<'py>(py: Python<'py>, st: &Stats, rss: [i64; 3]) -> PyResult<Bound<'py, PyDict>> {
    let d = stats_dict(py, st)?;
    let r = PyDict::new(py);
    for (name, v) in crate::mm::RSS_NAMES.iter().zip(rss) {
        r.set_item(name, v)?;
    }
    d.set_item("rss", r)?;
    Ok(d)
}

fn profile_for(kernel: &Bound<'_, PyAny>, batched: bool) -> PyResult<KernelProfile> {
    let p = profile_arg(kernel)?;
    Ok(if batched { p } else { p.unbatched() })
}

fn zero_pfn_arg(zero_pfn: Option<&Bound<'_, PyAny>>) -> PyResult<u64> {
    // Without a zero page, no pfn is it.
    Ok(zero_pfn.filter(|z| !z.is_none()).map(|z| u64_scalar(z, "zero_pfn")).transpose()?.unwrap_or(u64::MAX))
}

/// `copy_page_range()` of one VMA's table on fork: `src` (the parent's) is write-protected
/// where the mapping is COW, `dst` (the child's) is filled, the counts take the child's
/// mappings. Returns the counters and the child's rss.
#[pyfunction]
#[pyo3(signature = (src, dst, counts, *, layout, kernel, dst_mm_id, batched=true, first_vpn=None,
                    shared=false, cow=None, soft_dirty_tracking=false, dst_uffd_wp=false, zero_pfn=None))]
#[allow(clippy::too_many_arguments)]
pub fn copy_pte_range<'py>(
    py: Python<'py>,
    src: &Bound<'py, PyAny>,
    dst: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    dst_mm_id: &Bound<'py, PyAny>,
    batched: bool,
    first_vpn: Option<&Bound<'py, PyAny>>,
    shared: bool,
    cow: Option<bool>,
    soft_dirty_tracking: bool,
    dst_uffd_wp: bool,
    zero_pfn: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = profile_for(kernel, batched)?;
    let layout = layout_arg(layout)?;
    let dst_mm_id = mm_id_arg(dst_mm_id, "dst_mm_id")?;
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let zero_pfn = zero_pfn_arg(zero_pfn)?;
    if soft_dirty_tracking && !layout.caps().soft_dirty {
        return Err(PyValueError::new_err(format!("{} has no soft-dirty bit, so soft-dirty tracking cannot be on", layout.name())));
    }
    if dst_uffd_wp && !layout.caps().uffd_wp {
        return Err(PyValueError::new_err(format!("{} has no uffd-wp bit, so dst_uffd_wp cannot be on", layout.name())));
    }
    let flags = match p.fpb {
        Some(form) => FpbFlags::from_bits(form.flag_family(), FpbFlags::fork_bits(form, shared, soft_dirty_tracking))?,
        None => FpbFlags::default(),
    };
    let mut src_arr = table_arg(src, "src")?;
    let mut dst_arr = table_arg(dst, "dst")?;
    let mut c = Counts::extract(counts)?;
    let src = slice_mut(&mut src_arr, "src")?;
    let dst = slice_mut(&mut dst_arr, "dst")?;
    if src.len() != dst.len() {
        return Err(PyValueError::new_err(format!("dst has {} entries but src has {}: the child's table mirrors the parent's", dst.len(), src.len())));
    }
    check_vpn(first_vpn, src.len())?;
    let mut mem = c.arrays()?;
    let ctx = CopyCtx {
        start: first_vpn,
        is_cow: cow.unwrap_or(!shared),
        shared,
        dst_uffd_wp,
        // Used only by copy_present_page(), which the array form never reaches.
        dst_prot: Prot { read: true, write: true, exec: false },
        flags,
        has_pinned: false,
        dst_mm_id,
        zero_pfn,
    };
    let mut st = Stats::default();
    let mut rss = [0i64; 3];
    py.detach(|| -> crate::Result<()> {
        // copy_pte_range_arrays() checks src before it writes anything.
        let mut env = CopyEnv { src, dst, mem: &mut mem, stats: &mut st, rss: &mut rss, plan: None };
        with_layout!(&layout, l => copy_pte_range_arrays(l, &p, &ctx, &mut env))
    })?;
    result_dict(py, &st, rss)
}

/// `unmap_page_range()` of one table (munmap, MADV_DONTNEED, or exit with `full`): every
/// entry cleared, rmap removed, references dropped after the flush. Returns the counters
/// and the rss change.
#[pyfunction]
#[pyo3(signature = (ptes, counts, *, layout, kernel, mm_id, batched=true, first_vpn=None, full=false, zero_pfn=None))]
#[allow(clippy::too_many_arguments)]
pub fn zap_pte_range<'py>(
    py: Python<'py>,
    ptes: &Bound<'py, PyAny>,
    counts: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    mm_id: &Bound<'py, PyAny>,
    batched: bool,
    first_vpn: Option<&Bound<'py, PyAny>>,
    full: bool,
    zero_pfn: Option<&Bound<'py, PyAny>>,
) -> PyResult<Bound<'py, PyDict>> {
    let p = profile_for(kernel, batched)?;
    let layout = layout_arg(layout)?;
    let mm_id = mm_id_arg(mm_id, "mm_id")?;
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let zero_pfn = zero_pfn_arg(zero_pfn)?;
    let mut arr = table_arg(ptes, "ptes")?;
    let mut c = Counts::extract(counts)?;
    let t = slice_mut(&mut arr, "ptes")?;
    check_vpn(first_vpn, t.len())?;
    let mut mem = c.arrays()?;
    let ctx = ZapCtx { start: first_vpn, fullmm: full, mm_id, zero_pfn };
    let mut st = Stats::default();
    let mut rss = [0i64; 3];
    let mut gather = new_gather()?;
    py.detach(|| -> crate::Result<()> {
        with_layout!(&layout, l => check_table(l, t, zero_pfn, &mem, "ptes"))?;
        let mut env = ZapEnv { ptes: t, mem: &mut mem, stats: &mut st, rss: &mut rss, gather: &mut gather };
        with_layout!(&layout, l => zap_pte_range_arrays(l, &p, &ctx, &mut env));
        Ok(())
    })?;
    result_dict(py, &st, rss)
}

//! `folio_pte_batch()` and `batch_lengths()` for Python: argument checks, GIL release, results.

use numpy::{IntoPyArray, PyArray1};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::args::{i64_table, index_arg, u64_scalar, u64_table};
use super::layout::PyLayout;
use crate::arch::Layout;
use crate::batch::{self, Folio, Folios, FpbFlags, Table};
use crate::error::Error;
use crate::kernel::{FlagFamily, FpbForm, KernelProfile, RELEASES};
use crate::with_layout;

/// What one `folio_pte_batch()` call reports.
#[pyclass(frozen, name = "Batch", module = "ptebatch._core")]
pub struct PyBatch {
    inner: batch::Batch,
    kernel: String,
}

#[pymethods]
impl PyBatch {
    /// PTEs in the batch.
    #[getter]
    fn nr(&self) -> usize {
        self.inner.nr
    }
    /// The caller's copy of the first PTE after the call (merged in 6.17+).
    #[getter]
    fn pte(&self) -> u64 {
        self.inner.pte
    }
    /// `any_writable` out-parameter (seed … 6.16), else None.
    #[getter]
    fn any_writable(&self) -> Option<bool> {
        self.inner.any_writable
    }
    /// `any_young` out-parameter (6.10 … 6.16), else None.
    #[getter]
    fn any_young(&self) -> Option<bool> {
        self.inner.any_young
    }
    /// `any_dirty` out-parameter (6.10 … 6.16), else None.
    #[getter]
    fn any_dirty(&self) -> Option<bool> {
        self.inner.any_dirty
    }
    /// The kernel version whose `folio_pte_batch()` formed the batch.
    #[getter]
    fn kernel(&self) -> &str {
        &self.kernel
    }
    fn __repr__(&self) -> String {
        let opt = |b: Option<bool>| b.map_or("None".to_string(), |b| if b { "True".into() } else { "False".into() });
        format!(
            "Batch(nr={}, pte={:#x}, any_writable={}, any_young={}, any_dirty={}, kernel={:?})",
            self.inner.nr,
            self.inner.pte,
            opt(self.inner.any_writable),
            opt(self.inner.any_young),
            opt(self.inner.any_dirty),
            self.kernel
        )
    }
}

pub(super) fn profile_arg(kernel: &Bound<'_, PyAny>) -> PyResult<KernelProfile> {
    let s: String = kernel
        .extract()
        .map_err(|_| PyTypeError::new_err("kernel must be a version string such as \"6.18\" or \"seed\""))?;
    Ok(KernelProfile::parse(&s)?)
}

pub(super) fn layout_arg(layout: &Bound<'_, PyAny>) -> PyResult<Layout> {
    if let Ok(l) = layout.cast::<PyLayout>() {
        return Ok(l.get().inner.clone());
    }
    if let Ok(name) = layout.extract::<String>() {
        return Ok(Layout::by_name(&name, None)?);
    }
    Err(PyTypeError::new_err("layout must be a ptebatch.Layout or a layout name"))
}

fn family_name(f: FlagFamily) -> &'static str {
    match f {
        FlagFamily::Ignore => "ignore",
        FlagFamily::Respect => "respect",
    }
}

/// Reads `flags`: None or 0, or an `FpbFlags` (`ptebatch._flags`). A plain int other than 0
/// is refused: FPB_IGNORE_DIRTY (≤ 6.16) and FPB_RESPECT_DIRTY (6.17+) share a bit value, so
/// the number alone does not say what was meant. `form` None (6.8) checks the type only.
fn flags_arg(flags: Option<&Bound<'_, PyAny>>, form: Option<FpbForm>, kernel: &str) -> PyResult<FpbFlags> {
    let none = || match form {
        Some(f) => Ok(FpbFlags::from_bits(f.flag_family(), 0)?),
        None => Ok(FpbFlags::default()),
    };
    let Some(obj) = flags.filter(|o| !o.is_none()) else {
        return none();
    };
    let fpb_type = obj.py().import("ptebatch._flags")?.getattr("FpbFlags")?;
    if !obj.is_instance(&fpb_type)? {
        if let Ok(n) = index_arg(obj, "flags") {
            if n == 0 {
                return none();
            }
            return Err(PyTypeError::new_err(format!(
                "flags={n} is a plain int; pass ptebatch.FPB_* constants: FPB_IGNORE_DIRTY (≤ 6.16) \
                 and FPB_RESPECT_DIRTY (6.17+) share the same bit value"
            )));
        }
        return Err(PyTypeError::new_err(format!(
            "flags must be ptebatch.FPB_* constants (FpbFlags), 0 or None, not {}",
            obj.get_type().name()?
        )));
    }
    let Some(form) = form else {
        return Ok(FpbFlags::default());
    };
    let family: String = obj.getattr("family")?.extract()?;
    let want = family_name(form.flag_family());
    if family != want {
        let hint = match form.flag_family() {
            FlagFamily::Ignore => "FPB_IGNORE_DIRTY / FPB_IGNORE_SOFT_DIRTY",
            FlagFamily::Respect => "FPB_RESPECT_* / FPB_MERGE_*",
        };
        return Err(PyValueError::new_err(format!(
            "flags {} are not flags of kernel {kernel}, which knows {hint}",
            obj.repr()?
        )));
    }
    let bits = u32::try_from(u64_scalar(&obj.call_method0("__int__")?, "flags")?)
        .map_err(|_| PyValueError::new_err("flags out of range"))?;
    Ok(FpbFlags::from_bits(form.flag_family(), bits)?)
}

/// `k` is the folio's index in the arrays of `batch_lengths`, None for `folio_pte_batch`.
#[cold]
fn folio_error(pfn: u64, nr_pages: u64, k: Option<usize>) -> Error {
    let (pfn_name, nr_name) = match k {
        None => ("folio_pfn".to_string(), "folio_nr_pages".to_string()),
        Some(k) => (format!("folio_start[{k}]"), format!("folio_nr_pages[{k}]")),
    };
    if !nr_pages.is_power_of_two() {
        Error::value(format!("{nr_name}={nr_pages} is not a power of two: a folio has 2**order pages"))
    } else {
        Error::value(format!(
            "{pfn_name}={pfn:#x} is not a multiple of {nr_name}={nr_pages}: folios are naturally aligned"
        ))
    }
}

/// Folios are naturally aligned powers of two (the buddy allocator hands out 2**order pages
/// at a multiple of their size), so a folio that is not cannot come from a kernel.
fn check_folio(pfn: u64, nr_pages: u64, k: Option<usize>) -> crate::Result<()> {
    if nr_pages.is_power_of_two() && pfn % nr_pages == 0 {
        Ok(())
    } else {
        Err(folio_error(pfn, nr_pages, k))
    }
}

/// `pfn_to_folio` is a lookup table for the folio arrays and must agree with them: every page
/// of every folio maps to that folio (a folio cut short would be copied page by page).
/// `Folios::new` has checked that every entry that names a folio lies inside it.
fn check_map_covers_folios(starts: &[u64], nrs: &[u64], map: &[i64]) -> crate::Result<()> {
    for (k, (&s, &n)) in starts.iter().zip(nrs).enumerate() {
        for pfn in s..s + n {
            let got = usize::try_from(pfn).ok().and_then(|p| map.get(p)).copied();
            if got != Some(k as i64) {
                let what = got.map_or_else(|| format!("pfn_to_folio has only {} entries", map.len()), |v| {
                    format!("pfn_to_folio[{pfn:#x}]={v}")
                });
                return Err(Error::value(format!(
                    "{what}, but folio {k} is [{s:#x}, {:#x}): pfn_to_folio must map every page of \
                     every folio to its index",
                    s + n
                )));
            }
        }
    }
    Ok(())
}

/// `folio_pte_batch()` as the chosen kernel defines it (docs/semantics.md §3).
#[pyfunction]
#[pyo3(signature = (ptes, start=None, max_nr=None, *, folio_pfn, folio_nr_pages, layout, kernel, flags=None, first_vpn=None))]
#[allow(clippy::too_many_arguments)]
pub fn folio_pte_batch(
    py: Python<'_>,
    ptes: &Bound<'_, PyAny>,
    start: Option<&Bound<'_, PyAny>>,
    max_nr: Option<&Bound<'_, PyAny>>,
    folio_pfn: &Bound<'_, PyAny>,
    folio_nr_pages: &Bound<'_, PyAny>,
    layout: &Bound<'_, PyAny>,
    kernel: &Bound<'_, PyAny>,
    flags: Option<&Bound<'_, PyAny>>,
    first_vpn: Option<&Bound<'_, PyAny>>,
) -> PyResult<PyBatch> {
    let profile = profile_arg(kernel)?;
    let kernel_name = profile.version.to_string();
    let form = profile.fpb.ok_or_else(|| {
        PyValueError::new_err(format!(
            "kernel {kernel_name} has no folio_pte_batch() (it arrived in 6.9; \"seed\" is the posted series)"
        ))
    })?;
    let layout = layout_arg(layout)?;
    let flags = flags_arg(flags, Some(form), &kernel_name)?;
    let table = u64_table(ptes, "ptes")?;
    let slice = table.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let start = start.map(|s| index_arg(s, "start")).transpose()?.unwrap_or(0);
    let max_nr = match max_nr {
        Some(m) => index_arg(m, "max_nr")?,
        None => slice.len().saturating_sub(start),
    };
    let folio = Folio {
        pfn: u64_scalar(folio_pfn, "folio_pfn")?,
        nr_pages: u64_scalar(folio_nr_pages, "folio_nr_pages")?,
    };
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    check_folio(folio.pfn, folio.nr_pages, None)?;
    let t = Table { ptes: slice, first_vpn };
    let result = py.detach(|| {
        with_layout!(&layout, l => batch::folio_pte_batch(l, form, t, start, max_nr, folio, flags))
    })?;
    Ok(PyBatch { inner: result, kernel: kernel_name })
}

/// The batches the fork loop cuts a whole table into (docs/semantics.md §4), as lengths.
#[pyfunction]
#[pyo3(signature = (ptes, *, layout, kernel, folio_start, folio_nr_pages, pfn_to_folio=None,
                    first_vpn=None, flags=None, shared=false, soft_dirty_tracking=false))]
#[allow(clippy::too_many_arguments)]
pub fn batch_lengths<'py>(
    py: Python<'py>,
    ptes: &Bound<'py, PyAny>,
    layout: &Bound<'py, PyAny>,
    kernel: &Bound<'py, PyAny>,
    folio_start: &Bound<'py, PyAny>,
    folio_nr_pages: &Bound<'py, PyAny>,
    pfn_to_folio: Option<&Bound<'py, PyAny>>,
    first_vpn: Option<&Bound<'py, PyAny>>,
    flags: Option<&Bound<'py, PyAny>>,
    shared: bool,
    soft_dirty_tracking: bool,
) -> PyResult<Bound<'py, PyArray1<u32>>> {
    let profile = profile_arg(kernel)?;
    let kernel_name = profile.version.to_string();
    let layout = layout_arg(layout)?;
    if soft_dirty_tracking && !layout.caps().soft_dirty {
        return Err(PyValueError::new_err(format!(
            "{} has no soft-dirty bit, so soft-dirty tracking cannot be on",
            layout.name()
        )));
    }
    // Under 6.8 nothing is batched; flags are still checked for their type.
    let fpb_flags = match (profile.fpb, flags.filter(|f| !f.is_none())) {
        (Some(form), None) => {
            FpbFlags::from_bits(form.flag_family(), FpbFlags::fork_bits(form, shared, soft_dirty_tracking))?
        }
        (form, _) => flags_arg(flags, form, &kernel_name)?,
    };
    let table = u64_table(ptes, "ptes")?;
    let starts = u64_table(folio_start, "folio_start")?;
    let nrs = u64_table(folio_nr_pages, "folio_nr_pages")?;
    let map = pfn_to_folio.filter(|m| !m.is_none()).map(|m| i64_table(m, "pfn_to_folio")).transpose()?;
    let slice = table.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let starts = starts.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let nrs = nrs.as_slice().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let map = map.as_ref().map(|m| m.as_slice()).transpose().map_err(|e| PyValueError::new_err(e.to_string()))?;
    let first_vpn = first_vpn.map(|v| u64_scalar(v, "first_vpn")).transpose()?.unwrap_or(0);
    let lengths = py.detach(|| -> crate::Result<Vec<u32>> {
        let folios = Folios::new(starts, nrs, map)?;
        for (k, (&s, &n)) in starts.iter().zip(nrs).enumerate() {
            check_folio(s, n, Some(k))?;
        }
        if let Some(map) = map {
            check_map_covers_folios(starts, nrs, map)?;
        }
        let t = Table { ptes: slice, first_vpn };
        with_layout!(&layout, l => batch::batch_lengths(l, &profile, t, &folios, fpb_flags))
    })?;
    Ok(lengths.into_pyarray(py))
}

/// `(family, bits)` of the flags `copy_present_ptes()` passes on fork.
#[pyfunction]
#[pyo3(signature = (kernel, shared=false, soft_dirty_tracking=false))]
pub fn fork_flag_bits(kernel: &Bound<'_, PyAny>, shared: bool, soft_dirty_tracking: bool) -> PyResult<(&'static str, u32)> {
    let profile = profile_arg(kernel)?;
    let form = profile.fpb.ok_or_else(|| {
        PyValueError::new_err(format!("kernel {} copies PTEs one at a time on fork", profile.version))
    })?;
    Ok((family_name(form.flag_family()), FpbFlags::fork_bits(form, shared, soft_dirty_tracking)))
}

/// The `folio_pte_batch()` form of a kernel ("seed", "v6.9", "v6.10", "v6.15", "v6.17"), or None.
#[pyfunction]
pub fn fpb_form(kernel: &Bound<'_, PyAny>) -> PyResult<Option<&'static str>> {
    Ok(profile_arg(kernel)?.fpb.map(|f| f.name()))
}

/// Every kernel version string accepted, oldest release first, then "seed".
pub fn kernel_versions() -> Vec<String> {
    let mut v: Vec<String> = RELEASES.iter().map(|(a, b)| format!("{a}.{b}")).collect();
    v.insert(0, "seed".to_string());
    v
}

//! `ptebatch.Layout`: one architecture's PTE encoding, with accessors vectorised over numpy
//! arrays of any shape (or applied to a Python int).

use numpy::ndarray::{ArrayD, IxDyn};
use numpy::ndarray::Dimension;
use numpy::IntoPyArray;
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyAny;

use super::args::{u64_scalar, u64_table, BoolArg, U64Arg};
use crate::arch::{Layout, PteBits, PteLayout, LAYOUT_NAMES};
use crate::with_layout;

/// One architecture's PTE layout (`ptebatch.layout(name)`).
#[pyclass(frozen, name = "Layout", module = "ptebatch._core")]
pub struct PyLayout {
    pub(crate) inner: Layout,
}

/// Applies `f` to a scalar or every element, releasing the GIL for arrays.
fn map_u64<'py, T, F>(py: Python<'py>, arg: &U64Arg<'py>, f: F) -> PyResult<Bound<'py, PyAny>>
where
    T: numpy::Element + Send + IntoPyObjectOwned,
    F: Fn(u64) -> T + Sync,
{
    match arg {
        U64Arg::Scalar(v) => f(*v).into_owned_py(py),
        U64Arg::Array(a) => {
            let view = a.as_array();
            let out: ArrayD<T> = py.detach(|| view.mapv(&f));
            Ok(out.into_pyarray(py).into_any())
        }
    }
}

/// Scalars convert to Python objects; a small helper to keep `map_u64` generic.
pub trait IntoPyObjectOwned {
    fn into_owned_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>>;
}

impl IntoPyObjectOwned for u64 {
    fn into_owned_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        Ok(self.into_pyobject(py)?.into_any())
    }
}

impl IntoPyObjectOwned for bool {
    fn into_owned_py(self, py: Python<'_>) -> PyResult<Bound<'_, PyAny>> {
        Ok(pyo3::types::PyBool::new(py, self).to_owned().into_any())
    }
}

macro_rules! unary {
    ($($name:ident -> $t:ty, $doc:literal;)*) => {
        #[pymethods]
        impl PyLayout {
            $(
                #[doc = $doc]
                fn $name<'py>(&self, py: Python<'py>, pte: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
                    let arg = U64Arg::extract(pte, "pte")?;
                    with_layout!(&self.inner, l => map_u64::<$t, _>(py, &arg, |v| l.$name(v)))
                }
            )*
        }
    };
}

unary! {
    pte_pfn -> u64, "`pte_pfn()`: the page frame number (x86: undoing the L1TF inversion).";
    pte_none -> bool, "`pte_none()`: an empty entry.";
    pte_present -> bool, "`pte_present()`: present to Linux (PROT_NONE entries included).";
    pte_protnone -> bool, "`pte_protnone()`: a PROT_NONE / NUMA-hinting entry.";
    pte_write -> bool, "`pte_write()`.";
    pte_dirty -> bool, "`pte_dirty()` (arm64: software or hardware dirty; x86: D or SavedDirty).";
    pte_young -> bool, "`pte_young()`.";
    pte_soft_dirty -> bool, "`pte_soft_dirty()`; always false where the arch has no such bit.";
    pte_uffd_wp -> bool, "`pte_uffd_wp()`; always false where the arch has no such bit.";
    pte_special -> bool, "`pte_special()`.";
    pte_exec -> bool, "Whether user execution is allowed (no NX / UXN / NOEXEC).";
    pte_cont -> bool, "`pte_cont()`: arm64 PTE_CONT; false elsewhere.";
    pte_wrprotect -> u64, "`pte_wrprotect()` (x86 moves Dirty to SavedDirty, arm64 hw dirt to PTE_DIRTY).";
    pte_mkwrite -> u64, "`pte_mkwrite(pte, vma)` for an ordinary VMA.";
    pte_mkold -> u64, "`pte_mkold()`.";
    pte_mkyoung -> u64, "`pte_mkyoung()`.";
    pte_mkclean -> u64, "`pte_mkclean()`.";
    pte_mkdirty -> u64, "`pte_mkdirty()` (also sets soft-dirty where the arch has it).";
    pte_clear_soft_dirty -> u64, "`pte_clear_soft_dirty()`; identity where the arch has no bit.";
    pte_mksoft_dirty -> u64, "`pte_mksoft_dirty()`; identity where the arch has no bit.";
}

#[pymethods]
impl PyLayout {
    #[new]
    #[pyo3(signature = (name, *, ballooned_pfns=None))]
    fn new(name: &Bound<'_, PyAny>, ballooned_pfns: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        layout(name, ballooned_pfns)
    }

    /// The layout's name, e.g. "arm64-4k".
    #[getter]
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    /// `PAGE_SHIFT`.
    #[getter]
    fn page_shift(&self) -> u32 {
        self.inner.geometry().page_shift
    }
    /// `PAGE_SIZE` in bytes.
    #[getter]
    fn page_size(&self) -> u64 {
        1 << self.inner.geometry().page_shift
    }
    /// `PTRS_PER_PTE`: entries of one page table (one PMD's worth).
    #[getter]
    fn ptrs_per_pte(&self) -> u64 {
        self.inner.geometry().ptrs_per_pte
    }
    /// `CONT_PTES`: entries of an arm64 contpte block; 1 where there is none.
    #[getter]
    fn cont_ptes(&self) -> u64 {
        self.inner.geometry().cont_ptes
    }
    /// `PFN_PTE_SHIFT`, or None where the arch advances PFNs its own way (arm64).
    #[getter]
    fn pfn_pte_shift(&self) -> Option<u32> {
        self.inner.geometry().pfn_pte_shift
    }
    /// The PTE bits that hold the page frame number.
    #[getter]
    fn pfn_mask(&self) -> u64 {
        self.inner.geometry().pfn_mask
    }
    /// One past the largest page frame number a PTE can hold.
    #[getter]
    fn max_pfn(&self) -> u64 {
        self.inner.geometry().max_pfn
    }
    /// The value of an empty (`pte_none`) entry.
    #[getter]
    fn none_value(&self) -> u64 {
        self.inner.geometry().none_value
    }
    /// Whether the architecture has a soft-dirty PTE bit.
    #[getter]
    fn has_soft_dirty(&self) -> bool {
        self.inner.caps().soft_dirty
    }
    /// Whether the architecture has a uffd-wp PTE bit.
    #[getter]
    fn has_uffd_wp(&self) -> bool {
        self.inner.caps().uffd_wp
    }
    /// Whether the layout folds contpte blocks (arm64).
    #[getter]
    fn has_contpte(&self) -> bool {
        self.inner.caps().contpte
    }
    /// How `pte_advance_pfn` works here.
    #[getter]
    fn advance_rule(&self) -> &'static str {
        self.inner.advance_rule()
    }
    /// The ballooned PFNs of an x86-64-xenpv layout (empty elsewhere).
    #[getter]
    fn ballooned_pfns(&self) -> Vec<u64> {
        match &self.inner {
            Layout::X86_64XenPv(x) => x.ballooned().to_vec(),
            _ => vec![],
        }
    }

    fn __repr__(&self) -> String {
        format!("ptebatch.layout({:?})", self.inner.name())
    }

    fn __eq__(&self, other: &Bound<'_, PyAny>) -> bool {
        other
            .cast::<PyLayout>()
            .map(|o| {
                let o = o.get();
                o.inner.name() == self.inner.name() && self.ballooned_pfns() == o.ballooned_pfns()
            })
            .unwrap_or(false)
    }

    fn __hash__(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.inner.name().hash(&mut h);
        self.ballooned_pfns().hash(&mut h);
        h.finish()
    }

    /// Builds PTEs from PFNs and logical bits, as docs/semantics.md §1.1 describes. Each flag
    /// is a bool or a bool array of the shape of `pfns`.
    #[pyo3(signature = (pfns, *, present=None, write=None, dirty=None, young=None, soft_dirty=None,
                        uffd_wp=None, exec=None, special=None, prot_none=None, cont=None))]
    #[allow(clippy::too_many_arguments)]
    fn mk_pte<'py>(
        &self,
        py: Python<'py>,
        pfns: &Bound<'py, PyAny>,
        present: Option<&Bound<'py, PyAny>>,
        write: Option<&Bound<'py, PyAny>>,
        dirty: Option<&Bound<'py, PyAny>>,
        young: Option<&Bound<'py, PyAny>>,
        soft_dirty: Option<&Bound<'py, PyAny>>,
        uffd_wp: Option<&Bound<'py, PyAny>>,
        exec: Option<&Bound<'py, PyAny>>,
        special: Option<&Bound<'py, PyAny>>,
        prot_none: Option<&Bound<'py, PyAny>>,
        cont: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let pfns = U64Arg::extract(pfns, "pfns")?;
        let shape = pfns.shape();
        let flag = |obj: Option<&Bound<'py, PyAny>>, name: &str, default: bool| -> PyResult<BoolArg<'py>> {
            match obj {
                None => Ok(BoolArg::Scalar(default)),
                Some(o) => BoolArg::extract(o, name, shape.as_deref()),
            }
        };
        let flags = [
            flag(present, "present", true)?,
            flag(write, "write", false)?,
            flag(dirty, "dirty", false)?,
            flag(young, "young", false)?,
            flag(soft_dirty, "soft_dirty", false)?,
            flag(uffd_wp, "uffd_wp", false)?,
            flag(exec, "exec", false)?,
            flag(special, "special", false)?,
            flag(prot_none, "prot_none", false)?,
            flag(cont, "cont", false)?,
        ];
        let views: Vec<_> = flags.iter().map(|f| f.view()).collect();
        let bits_at = |idx: &IxDyn| -> PteBits {
            let g = |k: usize| flags[k].get(&views[k], idx);
            PteBits {
                present: g(0),
                write: g(1),
                dirty: g(2),
                young: g(3),
                soft_dirty: g(4),
                uffd_wp: g(5),
                exec: g(6),
                special: g(7),
                prot_none: g(8),
                cont: g(9),
            }
        };
        let layout = &self.inner;
        match (pfns.scalar(), pfns.view()) {
            (Some(pfn), _) => {
                let v = with_layout!(layout, l => l.mk_pte(pfn, bits_at(&IxDyn(&[]))))?;
                Ok(v.into_pyobject(py)?.into_any())
            }
            (None, Some(view)) => {
                let mut out = Vec::with_capacity(view.len());
                for (idx, &pfn) in view.indexed_iter() {
                    let bits = bits_at(&idx);
                    out.push(with_layout!(layout, l => l.mk_pte(pfn, bits)).map_err(|e| {
                        PyValueError::new_err(format!("pfns{:?}: {}", idx.slice(), e.message))
                    })?);
                }
                let arr = ArrayD::from_shape_vec(view.raw_dim(), out)
                    .map_err(|e| PyValueError::new_err(e.to_string()))?;
                Ok(arr.into_pyarray(py).into_any())
            }
            (None, None) => unreachable!("U64Arg is a scalar or an array"),
        }
    }

    /// `pte_advance_pfn(pte, nr)` (v6.9): the PTE of the page `nr` pages further on.
    fn pte_advance_pfn<'py>(
        &self,
        py: Python<'py>,
        pte: &Bound<'py, PyAny>,
        nr: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let arg = U64Arg::extract(pte, "pte")?;
        let nr = u64_scalar(nr, "nr")?;
        with_layout!(&self.inner, l => map_u64::<u64, _>(py, &arg, |v| l.pte_advance_pfn(v, nr)))
    }

    /// `pte_batch_hint(ptep, pte)`: entries to the end of the arm64 contpte block; 1 elsewhere.
    /// `index` is the entry's position in its page table (or the virtual page number).
    fn pte_batch_hint<'py>(
        &self,
        py: Python<'py>,
        index: &Bound<'py, PyAny>,
        pte: &Bound<'py, PyAny>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let idx = U64Arg::extract(index, "index")?;
        let arg = U64Arg::extract(pte, "pte")?;
        let layout = &self.inner;
        match (idx.scalar(), arg.scalar()) {
            (Some(i), Some(v)) => {
                Ok(with_layout!(layout, l => l.pte_batch_hint(i, v)).into_pyobject(py)?.into_any())
            }
            (Some(i), None) => with_layout!(layout, l => map_u64::<u64, _>(py, &arg, |v| l.pte_batch_hint(i, v))),
            (None, Some(v)) => with_layout!(layout, l => map_u64::<u64, _>(py, &idx, |i| l.pte_batch_hint(i, v))),
            (None, None) => {
                let (iv, pv) = (idx.view().unwrap(), arg.view().unwrap());
                if iv.shape() != pv.shape() {
                    return Err(PyValueError::new_err(format!(
                        "index has shape {:?} but pte has shape {:?}",
                        iv.shape(),
                        pv.shape()
                    )));
                }
                let mut out = ArrayD::<u64>::zeros(pv.raw_dim());
                with_layout!(layout, l => numpy::ndarray::Zip::from(&mut out).and(&iv).and(&pv)
                    .for_each(|o, &i, &v| *o = l.pte_batch_hint(i, v)));
                Ok(out.into_pyarray(py).into_any())
            }
        }
    }
}

/// `ptebatch.layout(name)`.
#[pyfunction]
#[pyo3(signature = (name, *, ballooned_pfns=None))]
pub fn layout(name: &Bound<'_, PyAny>, ballooned_pfns: Option<&Bound<'_, PyAny>>) -> PyResult<PyLayout> {
    let name: String = name
        .extract()
        .map_err(|_| pyo3::exceptions::PyTypeError::new_err("layout name must be a str"))?;
    let ballooned = match ballooned_pfns.filter(|o| !o.is_none()) {
        None => None,
        Some(obj) => Some(u64_table(obj, "ballooned_pfns")?.as_array().to_vec()),
    };
    Ok(PyLayout { inner: Layout::by_name(&name, ballooned)? })
}

/// Names `layout()` accepts.
pub fn layout_names() -> Vec<&'static str> {
    LAYOUT_NAMES.to_vec()
}

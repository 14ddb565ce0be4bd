//! Zero-copy numpy views of a simulation's state: read-only arrays whose memory is the
//! simulation's own per-page arrays or a VMA's page-table store.
//!
//! A view holds what it points at alive (the simulation for the per-page arrays, the store
//! for PTEs) and is counted on it: while counted, a step that would move the storage either
//! keeps it in place (a step run on a copy writes its result back, see
//! `State::adopt_exported`) or is refused with `BufferError` before it changes anything.
//! numpy refuses writes (the arrays are not writeable, and their base exposes no writable
//! buffer, so `flags.writeable = True` is refused too).

use std::ffi::c_void;
use std::sync::Arc;

use numpy::npyffi::{self, npy_intp, PY_ARRAY_API};
use numpy::{Element, PyArray1, PyArrayDescrMethods, PyUntypedArrayMethods};
use pyo3::ffi;
use pyo3::prelude::*;

use crate::ptes::{Exports, PteStore};

/// What a view keeps alive, and the count it releases when it goes.
enum Keep {
    Ptes(Arc<PteStore>),
    Memory(#[allow(dead_code)] Py<PyAny>, Exports),
}

/// The base object of a view (`array.base`): keeps the storage alive.
#[pyclass(name = "StateView", module = "ptebatch._core", frozen)]
pub struct ViewOwner {
    keep: Keep,
}

impl ViewOwner {
    /// Keeps a page-table store alive and counts a view of it.
    pub fn ptes(store: &Arc<PteStore>) -> ViewOwner {
        store.exports.add();
        ViewOwner { keep: Keep::Ptes(store.clone()) }
    }

    /// Keeps the simulation `owner` alive and counts a view of its per-page arrays.
    pub fn memory(owner: Py<PyAny>, exports: &Exports) -> ViewOwner {
        exports.add();
        ViewOwner { keep: Keep::Memory(owner, exports.share()) }
    }
}

impl Drop for ViewOwner {
    fn drop(&mut self) {
        match &self.keep {
            Keep::Ptes(s) => s.exports.release(),
            Keep::Memory(_, e) => e.release(),
        }
    }
}

#[pymethods]
impl ViewOwner {
    fn __repr__(&self) -> String {
        match &self.keep {
            Keep::Ptes(s) => format!("<ptebatch page-table store of {} entries>", s.as_raw().1),
            Keep::Memory(..) => "<ptebatch per-page arrays>".into(),
        }
    }
}

/// A read-only 1-D numpy array of the `len` elements at `ptr`, with `owner` as its base.
///
/// # Safety
/// `ptr .. ptr + len` must stay valid and unmoved for as long as `owner` lives.
pub unsafe fn view<'py, T: Element>(py: Python<'py>, ptr: *const T, len: usize, owner: ViewOwner) -> PyResult<Bound<'py, PyArray1<T>>> {
    let owner = Bound::new(py, owner)?;
    let mut dims = [len as npy_intp];
    // Flags 0: not writeable; numpy works out contiguity and alignment itself.
    let arr = unsafe {
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, npyffi::NpyTypes::PyArray_Type),
            T::get_dtype(py).into_dtype_ptr(),
            1,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            ptr as *mut c_void,
            0,
            std::ptr::null_mut(),
        )
    };
    if arr.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference to an array made just above.
    let arr: Bound<'py, PyAny> = unsafe { Bound::from_owned_ptr(py, arr) };
    // PyArray_SetBaseObject steals the reference to the owner, also when it fails.
    let rc = unsafe { PY_ARRAY_API.PyArray_SetBaseObject(py, arr.as_ptr() as *mut npyffi::PyArrayObject, owner.into_ptr() as *mut ffi::PyObject) };
    if rc < 0 {
        return Err(PyErr::fetch(py));
    }
    let arr = arr.cast_into::<PyArray1<T>>()?;
    debug_assert!(!arr.is_empty() || len == 0);
    Ok(arr)
}

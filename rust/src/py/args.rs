//! Argument checks at the boundary: type, dtype, shape, contiguity and range, each a clear
//! `TypeError` or `ValueError` naming the argument. Integers are read exactly: Python ints and
//! numpy integer scalars, never bools, floats or strings. Arrays must have the exact dtype
//! (no conversion that could wrap or truncate) and are borrowed, never copied: tables must be
//! C-contiguous, element-wise accessors read any strides. Sequences of ints (which have no
//! buffer to borrow) are converted one element at a time.

use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::{PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyByteArray, PyBytes, PyDict, PyFrozenSet, PyInt, PySet, PyString};

/// A `u64` argument: a Python int or a numpy `uint64` array of any shape.
pub enum U64Arg<'py> {
    Scalar(u64),
    Array(PyReadonlyArrayDyn<'py, u64>),
}

fn dtype_name(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype().to_string()
}

fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "?".into())
}

/// Python's bool and numpy's `bool_`: ints to `operator.index` (or not), never meant as one.
fn is_bool(obj: &Bound<'_, PyAny>) -> bool {
    obj.is_instance_of::<PyBool>() || matches!(type_name(obj).as_str(), "bool" | "bool_")
}

/// The Python int `obj` stands for: an int, or an object with `__index__` (numpy integer
/// scalars); bools, floats (even 4096.0), strings and the rest are a `TypeError`.
fn as_int<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<Bound<'py, PyInt>> {
    if is_bool(obj) {
        return Err(PyTypeError::new_err(format!("{name} must be an integer, not bool")));
    }
    if let Ok(i) = obj.cast::<PyInt>() {
        return Ok(i.clone());
    }
    let not_int = || PyTypeError::new_err(format!("{name} must be an integer, not {}", type_name(obj)));
    if !obj.get_type().hasattr("__index__").unwrap_or(false) {
        return Err(not_int());
    }
    obj.call_method0("__index__")
        .ok()
        .and_then(|i| i.cast_into::<PyInt>().ok())
        .ok_or_else(not_int)
}

/// `value` for a message; Python refuses to print ints of more than 4300 digits.
fn int_text(i: &Bound<'_, PyInt>) -> String {
    match i.extract::<i128>() {
        Ok(v) => v.to_string(),
        Err(_) => {
            let bits = i.call_method0("bit_length").and_then(|b| b.extract::<u64>()).unwrap_or(0);
            let sign = if i.lt(0).unwrap_or(false) { "-" } else { "" };
            format!("an integer of {sign}{bits} bits")
        }
    }
}

fn range_error(i: &Bound<'_, PyInt>, name: &str, bits: u32) -> PyErr {
    if i.lt(0).unwrap_or(false) {
        PyValueError::new_err(format!("{name} must be a non-negative integer, not {}", int_text(i)))
    } else {
        PyValueError::new_err(format!("{name} must be below 2**{bits}, not {}", int_text(i)))
    }
}

/// An integer argument in `0 .. 2**64-1`.
pub fn u64_scalar(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    let i = as_int(obj, name)?;
    i.extract::<u64>().map_err(|_| range_error(&i, name, 64))
}

/// A non-negative index that must fit `usize`.
pub fn index_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    let i = as_int(obj, name)?;
    i.extract::<usize>().map_err(|_| range_error(&i, name, usize::BITS))
}

/// An entry of a PFN-indexed folio map: -1 (no folio) or a folio index.
fn map_entry(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<i64> {
    let i = as_int(obj, name)?;
    i.extract::<i64>()
        .ok()
        .filter(|&v| v >= -1)
        .ok_or_else(|| PyValueError::new_err(format!("{name} must be -1 or a folio index, not {}", int_text(&i))))
}

impl<'py> U64Arg<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<U64Arg<'py>> {
        if let Ok(arr) = obj.cast::<PyUntypedArray>() {
            let typed = arr.cast::<PyArrayDyn<u64>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{name} must be a numpy uint64 array, got dtype {} (use np.asarray(x, dtype=np.uint64))",
                    dtype_name(arr)
                ))
            })?;
            // Read through ndarray views, which follow any strides.
            return Ok(U64Arg::Array(typed.try_readonly().map_err(|e| {
                PyValueError::new_err(format!("{name} is being written elsewhere: {e}"))
            })?));
        }
        if as_int(obj, name).is_err() {
            return Err(PyTypeError::new_err(format!(
                "{name} must be an integer or a numpy uint64 array, not {}",
                type_name(obj)
            )));
        }
        Ok(U64Arg::Scalar(u64_scalar(obj, name)?))
    }

    pub fn shape(&self) -> Option<Vec<usize>> {
        match self {
            U64Arg::Scalar(_) => None,
            U64Arg::Array(a) => Some(a.shape().to_vec()),
        }
    }

    pub fn view(&self) -> Option<ArrayViewD<'_, u64>> {
        match self {
            U64Arg::Scalar(_) => None,
            U64Arg::Array(a) => Some(a.as_array()),
        }
    }

    /// The value of a scalar argument.
    pub fn scalar(&self) -> Option<u64> {
        match self {
            U64Arg::Scalar(v) => Some(*v),
            U64Arg::Array(_) => None,
        }
    }
}

/// A boolean flag: a Python bool or a numpy bool array of the main argument's shape.
pub enum BoolArg<'py> {
    Scalar(bool),
    Array(PyReadonlyArrayDyn<'py, bool>),
}

impl<'py> BoolArg<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, name: &str, shape: Option<&[usize]>) -> PyResult<BoolArg<'py>> {
        if let Ok(arr) = obj.cast::<PyUntypedArray>() {
            let typed = arr.cast::<PyArrayDyn<bool>>().map_err(|_| {
                PyTypeError::new_err(format!("{name} must be a bool or a numpy bool array, got dtype {}", dtype_name(arr)))
            })?;
            let r = typed.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))?;
            match shape {
                Some(s) if s == r.shape() => {}
                _ => {
                    return Err(PyValueError::new_err(format!(
                        "{name} has shape {:?}; a flag array must have the shape of pfns ({})",
                        r.shape(),
                        shape.map(|s| format!("{s:?}")).unwrap_or_else(|| "a scalar".into())
                    )))
                }
            }
            return Ok(BoolArg::Array(r));
        }
        if is_bool(obj) {
            // Python bools and numpy.bool_ scalars.
            if let Ok(b) = obj.extract::<bool>() {
                return Ok(BoolArg::Scalar(b));
            }
        }
        Err(PyTypeError::new_err(format!(
            "{name} must be a bool or a numpy bool array, not {}",
            type_name(obj)
        )))
    }

    #[inline]
    pub fn get(&self, view: &Option<ArrayViewD<'_, bool>>, idx: &IxDyn) -> bool {
        match (self, view) {
            (BoolArg::Scalar(b), _) => *b,
            (BoolArg::Array(_), Some(v)) => v[idx.clone()],
            (BoolArg::Array(_), None) => false,
        }
    }

    pub fn view(&self) -> Option<ArrayViewD<'_, bool>> {
        match self {
            BoolArg::Scalar(_) => None,
            BoolArg::Array(a) => Some(a.as_array()),
        }
    }
}

/// A one-dimensional table: a C-contiguous numpy array of `T` (borrowed), or a
/// sequence whose items `item` converts exactly. Other dtypes, strings, mappings and sets are
/// refused rather than guessed at.
fn table<'py, T: numpy::Element>(
    obj: &Bound<'py, PyAny>,
    name: &str,
    dtype: &str,
    item: fn(&Bound<'py, PyAny>, &str) -> PyResult<T>,
) -> PyResult<PyReadonlyArray1<'py, T>> {
    let py = obj.py();
    if let Ok(untyped) = obj.cast::<PyUntypedArray>() {
        if untyped.ndim() != 1 {
            return Err(PyValueError::new_err(format!(
                "{name} must be one-dimensional, got {} dimensions",
                untyped.ndim()
            )));
        }
        let typed = untyped.cast::<PyArray1<T>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "{name} must be a numpy {dtype} array, got dtype {} (use np.asarray(x, dtype=np.{dtype}))",
                dtype_name(untyped)
            ))
        })?;
        if !typed.is_c_contiguous() {
            // Borrowed as a slice, never copied behind the caller's back (a table can be GiBs).
            return Err(PyValueError::new_err(format!(
                "{name} must be C-contiguous (a page table is one run of entries); use np.ascontiguousarray"
            )));
        }
        return typed.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")));
    }
    let refused = obj.is_instance_of::<PyString>()
        || obj.is_instance_of::<PyBytes>()
        || obj.is_instance_of::<PyByteArray>()
        || obj.is_instance_of::<PyDict>()
        || obj.is_instance_of::<PySet>()
        || obj.is_instance_of::<PyFrozenSet>()
        || !obj.hasattr("__len__").unwrap_or(false);
    if refused {
        return Err(PyTypeError::new_err(format!(
            "{name} must be a one-dimensional numpy {dtype} array or a list of ints, not {}",
            type_name(obj)
        )));
    }
    if let Ok(ndim) = obj.getattr("ndim") {
        if ndim.extract::<usize>().ok() != Some(1) {
            return Err(PyValueError::new_err(format!("{name} must be one-dimensional, got ndim {ndim}")));
        }
    }
    let mut out = Vec::with_capacity(obj.len().unwrap_or(0));
    let iter = obj.try_iter().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a numpy {dtype} array or a list of ints, not {}", type_name(obj)))
    })?;
    for (i, v) in iter.enumerate() {
        out.push(item(&v?, &format!("{name}[{i}]"))?);
    }
    Ok(PyArray1::from_vec(py, out).readonly())
}

/// A table of `u64` (PTEs, PFNs, page counts).
pub fn u64_table<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray1<'py, u64>> {
    table(obj, name, "uint64", u64_scalar)
}

/// A PFN-indexed map of `int64`: -1 or a folio index per PFN.
pub fn i64_table<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<PyReadonlyArray1<'py, i64>> {
    table(obj, name, "int64", map_entry)
}

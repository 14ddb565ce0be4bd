//! Argument checks at the boundary: dtype, shape, contiguity and range, each with a clear
//! `TypeError` or `ValueError`. Arrays are borrowed, never copied; only Python sequences
//! (which have no buffer to borrow) are converted.

use numpy::ndarray::{ArrayViewD, IxDyn};
use numpy::{PyArrayDyn, PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyBool;

/// A `u64` argument: a Python int or a numpy `uint64` array of any shape.
pub enum U64Arg<'py> {
    Scalar(u64),
    Array(PyReadonlyArrayDyn<'py, u64>),
}

fn dtype_name(arr: &Bound<'_, PyUntypedArray>) -> String {
    arr.dtype().to_string()
}

/// Reads an integer argument that must fit `u64`.
pub fn u64_scalar(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<u64> {
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{name} must be an int, not bool")));
    }
    obj.extract::<u64>().map_err(|e| {
        if e.is_instance_of::<PyOverflowError>(obj.py()) {
            PyValueError::new_err(format!("{name} must be in 0 .. 2**64-1"))
        } else {
            PyTypeError::new_err(format!(
                "{name} must be an int or a numpy uint64 array, not {}",
                obj.get_type().name().map(|n| n.to_string()).unwrap_or_default()
            ))
        }
    })
}

impl<'py> U64Arg<'py> {
    pub fn extract(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<U64Arg<'py>> {
        if let Ok(arr) = obj.cast::<PyUntypedArray>() {
            let typed = arr.cast::<PyArrayDyn<u64>>().map_err(|_| {
                PyTypeError::new_err(format!(
                    "{name} must be a numpy uint64 array, got dtype {}",
                    dtype_name(arr)
                ))
            })?;
            return Ok(U64Arg::Array(typed.try_readonly().map_err(|e| {
                PyValueError::new_err(format!("{name} is being written elsewhere: {e}"))
            })?));
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

    /// The value at flat position `i` (scalars broadcast).
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
        if let Ok(b) = obj.cast::<PyBool>() {
            return Ok(BoolArg::Scalar(b.is_true()));
        }
        if let Ok(b) = obj.extract::<bool>() {
            // numpy.bool_ scalars.
            return Ok(BoolArg::Scalar(b));
        }
        Err(PyTypeError::new_err(format!("{name} must be a bool or a numpy bool array")))
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

/// A 1-D, C-contiguous `uint64` array borrowed as a slice; Python sequences are converted.
pub fn u64_table<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<numpy::PyReadonlyArray1<'py, u64>> {
    let py = obj.py();
    let arr = if obj.cast::<PyUntypedArray>().is_ok() {
        obj.clone()
    } else if obj.hasattr("__len__")? && !obj.is_instance_of::<pyo3::types::PyString>() {
        let np = py.import("numpy")?;
        np.call_method1("asarray", (obj, np.getattr("uint64")?)).map_err(|e| {
            if e.is_instance_of::<PyOverflowError>(py) {
                PyValueError::new_err(format!("{name}: every value must be in 0 .. 2**64-1"))
            } else {
                PyTypeError::new_err(format!("{name} must be a numpy uint64 array: {e}"))
            }
        })?
    } else {
        return Err(PyTypeError::new_err(format!("{name} must be a 1-D numpy uint64 array")));
    };
    let untyped = arr.cast::<PyUntypedArray>()?;
    if untyped.ndim() != 1 {
        return Err(PyValueError::new_err(format!("{name} must be 1-D, got {} dimensions", untyped.ndim())));
    }
    let typed = untyped.cast::<numpy::PyArray1<u64>>().map_err(|_| {
        PyTypeError::new_err(format!(
            "{name} must be a numpy uint64 array, got dtype {} (use np.asarray(x, dtype=np.uint64))",
            dtype_name(untyped)
        ))
    })?;
    if !typed.is_c_contiguous() {
        return Err(PyValueError::new_err(format!(
            "{name} must be C-contiguous (a page table is one contiguous run); use np.ascontiguousarray"
        )));
    }
    typed.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// A 1-D, C-contiguous `int64` array (PFN-indexed maps).
pub fn i64_table<'py>(obj: &Bound<'py, PyAny>, name: &str) -> PyResult<numpy::PyReadonlyArray1<'py, i64>> {
    let untyped = obj
        .cast::<PyUntypedArray>()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be a 1-D numpy int64 array")))?;
    if untyped.ndim() != 1 {
        return Err(PyValueError::new_err(format!("{name} must be 1-D")));
    }
    let typed = untyped.cast::<numpy::PyArray1<i64>>().map_err(|_| {
        PyTypeError::new_err(format!("{name} must be a numpy int64 array, got dtype {}", dtype_name(untyped)))
    })?;
    if !typed.is_c_contiguous() {
        return Err(PyValueError::new_err(format!("{name} must be C-contiguous")));
    }
    typed.try_readonly().map_err(|e| PyValueError::new_err(format!("{name}: {e}")))
}

/// A non-negative index that must fit `usize`.
pub fn index_arg(obj: &Bound<'_, PyAny>, name: &str) -> PyResult<usize> {
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err(format!("{name} must be an int, not bool")));
    }
    let v: i128 = obj
        .extract()
        .map_err(|_| PyTypeError::new_err(format!("{name} must be an int")))?;
    usize::try_from(v).map_err(|_| PyValueError::new_err(format!("{name} must be >= 0, got {v}")))
}

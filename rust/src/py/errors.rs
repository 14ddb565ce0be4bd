//! The package's exception classes, and the one place where core errors become Python ones.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::PyErr;

use crate::error::{Error, ErrorKind};

create_exception!(_core, PtebatchError, PyException, "Base class of ptebatch's own errors.");
create_exception!(_core, InvariantError, PtebatchError, "A kernel invariant does not hold.");
create_exception!(_core, SnapshotError, PtebatchError, "A snapshot file is corrupt or unreadable.");
create_exception!(_core, CaptureError, PtebatchError, "Page tables could not be captured from /proc.");

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e.kind {
            ErrorKind::Value => PyValueError::new_err(e.message),
            ErrorKind::Type => PyTypeError::new_err(e.message),
        }
    }
}

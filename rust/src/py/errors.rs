//! The package's exception classes, and the one place where core errors become Python ones.

use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyTypeError, PyValueError};
use pyo3::types::PyAnyMethods;
use pyo3::{PyErr, Python};

use crate::error::{Error, ErrorKind};

create_exception!(_core, PtebatchError, PyException, "Base class of ptebatch's own errors.");
create_exception!(_core, InvariantError, PtebatchError, "A kernel invariant does not hold.");
create_exception!(_core, SnapshotError, PtebatchError, "A snapshot file is corrupt or unreadable.");
create_exception!(_core, CaptureError, PtebatchError, "Page tables could not be captured from /proc.");
create_exception!(_core, OutOfMemoryError, PtebatchError, "The simulated machine ran out of memory.");
create_exception!(
    _core,
    AccessFault,
    PtebatchError,
    "An access the simulated process may not make: it would get SIGSEGV or wait for a userfaultfd monitor."
);

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e.kind {
            ErrorKind::Value => PyValueError::new_err(e.message),
            ErrorKind::Type => PyTypeError::new_err(e.message),
            ErrorKind::OutOfMemory => OutOfMemoryError::new_err(e.message),
            ErrorKind::Fault => AccessFault::new_err(e.message),
            ErrorKind::Invariant => Python::attach(|py| {
                let err = InvariantError::new_err(e.message);
                // The rule's name, for tests that expect a particular violation.
                let _ = err.value(py).setattr("rule", e.rule.unwrap_or("unknown"));
                err
            }),
        }
    }
}

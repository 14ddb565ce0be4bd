//! The one place where core errors become Python exceptions. The package's exception classes
//! are defined in Python (`ptebatch/errors.py`), where they can have two bases
//! (`OutOfMemoryError` is also a `MemoryError`); the extension raises those same classes.

use pyo3::exceptions::{PyBufferError, PyKeyboardInterrupt, PyTypeError, PyValueError};
use pyo3::{import_exception, PyErr};

use crate::error::{Error, ErrorKind};

import_exception!(ptebatch.errors, PtebatchError);
import_exception!(ptebatch.errors, InvariantError);
import_exception!(ptebatch.errors, SnapshotError);
import_exception!(ptebatch.errors, CaptureError);
import_exception!(ptebatch.errors, OutOfMemoryError);
import_exception!(ptebatch.errors, AccessFault);

/// Names of the classes `_core` re-exports.
pub const NAMES: [&str; 6] = ["PtebatchError", "InvariantError", "SnapshotError", "CaptureError", "OutOfMemoryError", "AccessFault"];

impl From<Error> for PyErr {
    fn from(e: Error) -> PyErr {
        match e.kind {
            ErrorKind::Value => PyValueError::new_err(e.message),
            ErrorKind::Type => PyTypeError::new_err(e.message),
            ErrorKind::OutOfMemory => OutOfMemoryError::new_err((e.message, false)),
            ErrorKind::HostMemory => OutOfMemoryError::new_err((e.message, true)),
            ErrorKind::Interrupted => PyKeyboardInterrupt::new_err(e.message),
            ErrorKind::Fault => AccessFault::new_err(e.message),
            ErrorKind::Buffer => PyBufferError::new_err(e.message),
            ErrorKind::Invariant => InvariantError::new_err((e.message, e.rule.unwrap_or("unknown"))),
        }
    }
}

//! Errors of the core. The Python layer maps each kind once (rust/src/py/errors.rs).

use std::fmt;

/// What went wrong, by the Python exception it becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A bad argument value (`ValueError`).
    Value,
    /// A bad argument type (`TypeError`).
    Type,
    /// The simulated machine ran out of memory (`pb.OutOfMemoryError`, `host=False`).
    OutOfMemory,
    /// The host could not allocate what the model needs (`pb.OutOfMemoryError`, `host=True`).
    HostMemory,
    /// A [`crate::watch::Watch`] asked a long step to stop (Ctrl-C: `KeyboardInterrupt`).
    Interrupted,
    /// The access would kill the process or block it (`pb.AccessFault`): SIGSEGV, a
    /// uffd-wp userfault.
    Fault,
    /// A kernel invariant does not hold (`pb.InvariantError`).
    Invariant,
    /// The step would move or free storage a numpy view holds (`BufferError`).
    Buffer,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
    /// The invariant broken, for [`ErrorKind::Invariant`].
    pub rule: Option<&'static str>,
}

impl Error {
    pub fn value(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Value, message: message.into(), rule: None }
    }

    pub fn type_error(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Type, message: message.into(), rule: None }
    }

    pub fn out_of_memory(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::OutOfMemory, message: message.into(), rule: None }
    }

    /// The host could not allocate `what` (`n` entries of `T`).
    pub fn host_memory<T>(what: &str, n: usize) -> Self {
        let bytes = (n as u128) * std::mem::size_of::<T>() as u128;
        Error {
            kind: ErrorKind::HostMemory,
            message: format!("the host cannot allocate {what} ({n} entries, {bytes} bytes)"),
            rule: None,
        }
    }

    pub fn interrupted() -> Self {
        Error { kind: ErrorKind::Interrupted, message: "interrupted; the step was abandoned".into(), rule: None }
    }

    pub fn fault(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Fault, message: message.into(), rule: None }
    }

    pub fn buffer(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Buffer, message: message.into(), rule: None }
    }

    pub fn invariant(message: impl Into<String>) -> Self {
        Error { kind: ErrorKind::Invariant, message: message.into(), rule: None }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

pub type Result<T> = std::result::Result<T, Error>;

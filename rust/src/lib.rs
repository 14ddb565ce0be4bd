//! ptebatch: exact models of Linux PTE layouts and PTE batching.
//!
//! The core is plain Rust and tests with `cargo test`; the `python` feature adds the PyO3
//! bindings in [`py`], which only convert arguments, release the GIL and map errors.

mod alloc;
pub mod arch;
pub mod batch;
pub mod check;
pub mod contpte;
pub mod error;
pub mod fault;
pub mod filemap;
pub mod fork;
pub mod huge_memory;
pub mod kernel;
pub mod memory;
pub mod mm;
pub mod mprotect;
pub mod pgtable;
pub mod policy;
pub mod procfs;
pub mod ptes;
pub mod restore;
pub mod rmap;
pub mod shmem;
pub mod sim;
pub mod stats;
pub mod watch;
pub mod zap;

#[cfg(feature = "python")]
mod py;

pub use arch::{Layout, PteBits, PteLayout};
pub use batch::{batch_lengths, folio_pte_batch, Batch, Folio, Folios, FpbFlags, Table};
pub use error::{Error, ErrorKind, Result};
pub use kernel::{FpbForm, KernelProfile, KernelVersion};
pub use sim::Simulation;

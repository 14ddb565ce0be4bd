//! The `ptebatch._core` extension module: registration only.

mod args;
mod batch;
mod errors;
mod helpers;
mod layout;
mod sim;
mod views;

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add_class::<layout::PyLayout>()?;
    m.add_class::<batch::PyBatch>()?;
    m.add_class::<sim::PySimulation>()?;
    m.add_class::<views::ViewOwner>()?;
    m.add_function(wrap_pyfunction!(layout::layout, m)?)?;
    m.add_function(wrap_pyfunction!(batch::folio_pte_batch, m)?)?;
    m.add_function(wrap_pyfunction!(batch::batch_lengths, m)?)?;
    m.add_function(wrap_pyfunction!(batch::fork_flag_bits, m)?)?;
    m.add_function(wrap_pyfunction!(batch::fpb_form, m)?)?;
    for f in [
        wrap_pyfunction!(helpers::ptep_get, m)?,
        wrap_pyfunction!(helpers::set_ptes, m)?,
        wrap_pyfunction!(helpers::wrprotect_ptes, m)?,
        wrap_pyfunction!(helpers::clear_full_ptes, m)?,
        wrap_pyfunction!(helpers::get_and_clear_full_ptes, m)?,
        wrap_pyfunction!(helpers::folio_ref_add, m)?,
        wrap_pyfunction!(helpers::folio_put_refs, m)?,
        wrap_pyfunction!(helpers::folio_add_anon_rmap_ptes, m)?,
        wrap_pyfunction!(helpers::folio_try_dup_anon_rmap_ptes, m)?,
        wrap_pyfunction!(helpers::folio_dup_file_rmap_ptes, m)?,
        wrap_pyfunction!(helpers::folio_remove_rmap_ptes, m)?,
        wrap_pyfunction!(helpers::copy_pte_range, m)?,
        wrap_pyfunction!(helpers::zap_pte_range, m)?,
    ] {
        m.add_function(f)?;
    }
    m.add("LAYOUT_NAMES", layout::layout_names())?;
    m.add("KERNEL_VERSIONS", batch::kernel_versions())?;
    // The one version, Cargo's: ptebatch.__version__ reads it from here.
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    // The exception classes live in ptebatch.errors; _core re-exports them.
    let classes = py.import("ptebatch.errors")?;
    for name in errors::NAMES {
        m.add(name, classes.getattr(name)?)?;
    }
    Ok(())
}

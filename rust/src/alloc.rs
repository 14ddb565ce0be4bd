//! Large output buffers backed by transparent huge pages where the kernel allows it.
//!
//! A fresh 64 MiB `Vec` costs one page fault per 4 KiB page on first write; on the VMs we
//! measure on that was more than the whole scan. numpy asks for THP on its large arrays, and
//! so do we (`MADV_HUGEPAGE`; a no-op where THP is off or on other systems).

/// `Vec::with_capacity(n)`, with THP requested for the 2 MiB-aligned part of a large buffer.
pub(crate) fn vec_with_capacity_huge<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n.saturating_mul(std::mem::size_of::<T>());
        if bytes >= 2 * HUGE {
            let start = v.as_ptr() as usize;
            let aligned = (start + HUGE - 1) & !(HUGE - 1);
            let end = (start + bytes) & !(HUGE - 1);
            if end > aligned {
                // SAFETY: the range lies inside the allocation `v` owns; madvise only changes
                // how the kernel backs it and cannot affect memory safety.
                unsafe {
                    libc::madvise(aligned as *mut libc::c_void, end - aligned, libc::MADV_HUGEPAGE);
                }
            }
        }
    }
    v
}

/// `n` copies of `v`, or an out-of-memory error instead of an abort when the allocation
/// cannot be made.
pub fn try_filled<T: Clone>(n: usize, v: T, what: &str) -> crate::error::Result<Vec<T>> {
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| {
        crate::error::Error::out_of_memory(format!("cannot allocate {what} of {n} entries"))
    })?;
    out.resize(n, v);
    Ok(out)
}

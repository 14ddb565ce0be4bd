//! Host allocations sized by user input or by the simulated machine: fallible, so that a
//! request the host cannot satisfy becomes [`Error::host_memory`] instead of an abort; and
//! large output buffers backed by transparent huge pages where the kernel allows it.

use crate::error::{Error, Result};

/// An empty `Vec` with room for `n` entries, with THP requested for the 2 MiB-aligned part of
/// a large buffer; or a host out-of-memory error.
///
/// A fresh 64 MiB `Vec` costs one page fault per 4 KiB page on first write; on the VMs we
/// measure on that was more than the whole scan. numpy asks for THP on its large arrays, and
/// so do we (`MADV_HUGEPAGE`; a no-op where THP is off or on other systems).
pub(crate) fn try_with_capacity_huge<T>(n: usize, what: &str) -> Result<Vec<T>> {
    let v: Vec<T> = try_with_capacity(n, what)?;
    advise_huge(v.as_ptr(), n);
    Ok(v)
}

/// `n` zeros, THP-backed as [`try_with_capacity_huge`]; the zeroing is the kernel's where
/// the allocator maps fresh memory (no pass over the buffer), or a host out-of-memory error.
pub(crate) fn try_zeroed_huge(n: usize, what: &str) -> Result<Vec<u64>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    ensure_host_room(n as u128 * 8, what)?;
    let layout = std::alloc::Layout::array::<u64>(n).map_err(|_| Error::host_memory::<u64>(what, n))?;
    // SAFETY: the layout has a non-zero size.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) } as *mut u64;
    if ptr.is_null() {
        return Err(Error::host_memory::<u64>(what, n));
    }
    advise_huge(ptr, n);
    // SAFETY: `ptr` comes from the global allocator with the layout of `n` u64s, all
    // initialised (zero is a valid u64).
    Ok(unsafe { Vec::from_raw_parts(ptr, n, n) })
}

/// MADV_HUGEPAGE on the 2 MiB-aligned part of a buffer of `n` `T`s at `ptr`.
fn advise_huge<T>(ptr: *const T, n: usize) {
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let bytes = n.saturating_mul(std::mem::size_of::<T>());
        if bytes >= 2 * HUGE {
            let start = ptr as usize;
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
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, n);
}

/// Requests from which [`ensure_host_room`] asks the kernel how much memory is left.
const ASK_FROM: u128 = 64 << 20;

/// Fails with a host out-of-memory error when `bytes` (about to be written) exceed what the
/// host has available (`MemAvailable` plus `SwapFree` of /proc/meminfo): with overcommit the
/// allocation itself would succeed, and the writes would wake the OOM killer instead.
pub fn ensure_host_room(bytes: u128, what: &str) -> Result<()> {
    if bytes < ASK_FROM {
        return Ok(());
    }
    match host_available() {
        Some(avail) if bytes > avail => Err(Error {
            kind: crate::error::ErrorKind::HostMemory,
            message: format!(
                "the host cannot hold {what} ({bytes} bytes): {avail} bytes of memory and swap are available"
            ),
            rule: None,
        }),
        _ => Ok(()),
    }
}

/// `MemAvailable + SwapFree` in bytes, where /proc/meminfo tells.
fn host_available() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u128> {
        let line = text.lines().find(|l| l.starts_with(name))?;
        line.split_whitespace().nth(1)?.parse::<u128>().ok().map(|kb| kb * 1024)
    };
    Some(field("MemAvailable:")? + field("SwapFree:").unwrap_or(0))
}

/// An empty `Vec` with room for `n` entries, or a host out-of-memory error.
pub fn try_with_capacity<T>(n: usize, what: &str) -> Result<Vec<T>> {
    ensure_host_room(n as u128 * std::mem::size_of::<T>() as u128, what)?;
    let mut out = Vec::new();
    out.try_reserve_exact(n).map_err(|_| Error::host_memory::<T>(what, n))?;
    Ok(out)
}

/// `n` copies of `v`, or a host out-of-memory error instead of an abort.
pub fn try_filled<T: Clone>(n: usize, v: T, what: &str) -> Result<Vec<T>> {
    let mut out = try_with_capacity(n, what)?;
    out.resize(n, v);
    Ok(out)
}

/// A copy of `s`, or a host out-of-memory error. Copies in pieces between which `ticker`
/// may stop it (a copy of the state for a long step takes long itself).
pub fn try_copy<T: Clone>(s: &[T], what: &str, ticker: &crate::watch::Ticker) -> Result<Vec<T>> {
    let mut out = try_with_capacity(s.len(), what)?;
    for piece in s.chunks(1 << 20) {
        ticker.poll()?;
        out.extend_from_slice(piece);
    }
    Ok(out)
}

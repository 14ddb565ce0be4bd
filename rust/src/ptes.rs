//! Page-table storage that Python can look at without copying.
//!
//! A VMA's PTEs are a window (`off`, `len`) into a fixed-size [`PteStore`] that VMAs split
//! from one mapping share, much as the kernel's VMAs share page-table pages: splitting a VMA
//! moves no entry, and merging two VMAs cut from the same store only widens the window. A
//! store never moves or shrinks once made (it only fills room past its windows while no
//! view holds it), so a numpy view of it (which holds the store alive) never dangles. The one operation that would have to move entries — merging
//! VMAs of two different stores — is refused while either store is viewed (see
//! [`crate::mm::Mm::merge_would_move_exported`]), as Python refuses to resize an exported
//! `bytearray`.

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::error::Result;

/// How many numpy views hold a piece of storage. A state's copy made for a step shares its
/// original's count ([`Exports::share`]); an ordinary clone starts at zero.
#[derive(Debug, Default)]
pub struct Exports(Arc<AtomicUsize>);

impl Exports {
    pub fn share(&self) -> Exports {
        Exports(self.0.clone())
    }

    pub fn exported(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }

    /// Counts one more view; the view calls [`Exports::release`] when it goes.
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }

    pub fn release(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Clone for Exports {
    /// A count for an independent copy of the storage: no views yet.
    fn clone(&self) -> Exports {
        Exports::default()
    }
}

/// A fixed-size array of PTEs, shared by the VMAs cut from it and by numpy views. Windows lie
/// in the first `len` entries; a store made by a join has room for as many again past them
/// (`cap`), which later joins onto the table ending at `len` fill in place while no view
/// holds the store, so growing a mapping by adjacent mmaps stays linear (as `Vec` was).
pub struct PteStore {
    ptr: NonNull<u64>,
    /// Entries written (every window lies below); only a join in place raises it.
    len: AtomicUsize,
    /// Entries allocated.
    cap: usize,
    /// Numpy views of this store (shared with the copies a step runs on).
    pub exports: Exports,
}

// SAFETY: the store is a plain heap array. Mutable access goes through `PteTable`, whose
// windows on one store never overlap and which is only written through `&mut`.
unsafe impl Send for PteStore {}
unsafe impl Sync for PteStore {}

impl PteStore {
    fn from_vec(v: Vec<u64>, exports: Exports) -> Arc<PteStore> {
        let mut v = std::mem::ManuallyDrop::new(v);
        let (len, cap) = (v.len(), v.capacity());
        let ptr = NonNull::new(v.as_mut_ptr()).expect("Vec pointers are not null");
        Arc::new(PteStore { ptr, len: AtomicUsize::new(len), cap, exports })
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// The first entry's address and the number of entries in use.
    pub fn as_raw(&self) -> (*const u64, usize) {
        (self.ptr.as_ptr(), self.len())
    }

    pub fn exported(&self) -> bool {
        self.exports.exported()
    }

    /// Copies `src` (the copy of this store a step ran on) over this store's entries.
    /// Callers make sure no `PteTable` of this store is borrowed.
    fn overwrite_from(&self, src: &PteStore) {
        debug_assert_eq!(self.len(), src.len());
        // SAFETY: both hold `len` written entries; `self` is not borrowed by anyone (the
        // state that owned its windows is being replaced), and numpy views only read.
        unsafe { std::ptr::copy_nonoverlapping(src.ptr.as_ptr(), self.ptr.as_ptr(), self.len()) }
    }
}

impl Drop for PteStore {
    fn drop(&mut self) {
        // SAFETY: the buffer of a `Vec<u64>` of capacity `cap` (`from_vec`); u64 needs no drop.
        unsafe { drop(Vec::from_raw_parts(self.ptr.as_ptr(), 0, self.cap)) }
    }
}

impl std::fmt::Debug for PteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PteStore({} entries, {} views)", self.len(), self.exports.0.load(Ordering::Relaxed))
    }
}

/// The stores a copy of the state made for a step copied, keyed by the original's address:
/// (original, copy). Tables sharing a store share its copy, and after the step every original
/// that numpy still views gets its copy's contents back ([`StoreCopies::adopt`]), even where no
/// VMA of the copy uses the copy any more (an unmap or exit on the copy dropped it).
/// Not part of the state: an ordinary clone starts with none.
#[derive(Default)]
pub struct StoreCopies {
    map: HashMap<usize, (Arc<PteStore>, Arc<PteStore>)>,
    /// Copies share their original's view count (a step's copy), or start at none (a
    /// detached copy: `Simulation.clone()`).
    share: bool,
}

impl StoreCopies {
    /// For a step's copy of the state (`share`: the copies count the originals' views), or
    /// for a detached copy.
    pub fn new(share: bool) -> StoreCopies {
        StoreCopies { map: HashMap::new(), share }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }

    /// Writes each copy back into its original where numpy views the original, and returns
    /// the map from such a copy (by address) to the original, which its tables should use
    /// again ([`PteTable::repoint`]).
    /// Callers make sure no `PteTable` of the originals is borrowed.
    pub fn adopt(self) -> HashMap<usize, Arc<PteStore>> {
        let mut back = HashMap::new();
        for (orig, copy) in self.map.into_values() {
            if orig.exported() && orig.len() == copy.len() {
                orig.overwrite_from(&copy);
                back.insert(Arc::as_ptr(&copy) as usize, orig);
            }
        }
        back
    }
}

impl Clone for StoreCopies {
    /// None: the copies belong to the one state a step ran on.
    fn clone(&self) -> StoreCopies {
        StoreCopies::default()
    }
}

impl std::fmt::Debug for StoreCopies {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StoreCopies({} stores)", self.map.len())
    }
}

/// One VMA's PTEs: entries `[off, off + len)` of a store. Reads and writes as a `[u64]`.
pub struct PteTable {
    store: Arc<PteStore>,
    off: usize,
    len: usize,
}

impl PteTable {
    /// A new table of `n` entries, all `none`; fallible, as every user-sized allocation.
    pub fn filled(n: usize, none: u64, what: &str) -> Result<PteTable> {
        let v = crate::alloc::try_filled(n, none, what)?;
        Ok(PteTable { store: PteStore::from_vec(v, Default::default()), off: 0, len: n })
    }

    /// An empty table.
    pub fn empty() -> PteTable {
        PteTable { store: PteStore::from_vec(Vec::new(), Default::default()), off: 0, len: 0 }
    }

    pub fn store(&self) -> &Arc<PteStore> {
        &self.store
    }

    /// Where the window starts in its store.
    pub fn offset(&self) -> usize {
        self.off
    }

    /// Cuts the table at entry `k`: this one keeps `[0, k)`, the result holds `[k, len)`, in
    /// the same store (no entry moves).
    pub fn split_off(&mut self, k: usize) -> PteTable {
        assert!(k <= self.len, "split inside the table");
        let tail = PteTable { store: self.store.clone(), off: self.off + k, len: self.len - k };
        self.len = k;
        tail
    }

    /// Whether `next` continues this table in the same store, so that joining them moves
    /// nothing.
    pub fn continues_into(&self, next: &PteTable) -> bool {
        Arc::ptr_eq(&self.store, &next.store) && self.off + self.len == next.off
    }

    /// Joins `next` (which follows this table in the address space) onto this one: by
    /// widening the window when it continues it in the same store; by copying `next` into
    /// the room past this window when it ends the store's written entries and no view holds
    /// the store; else by copying both into a new store with as much room again. `Err`
    /// (nothing changed) when the host cannot hold the copy.
    pub fn join(&mut self, next: PteTable) -> std::result::Result<(), PteTable> {
        if self.continues_into(&next) {
            self.len += next.len;
            return Ok(());
        }
        let end = self.off + self.len;
        if !self.store.exported() && end == self.store.len() && self.store.cap - end >= next.len {
            // SAFETY: `[end, end + next.len)` is allocated and past every window of the
            // store (all lie below `len`), so no table or view reads it; `next` is another store.
            unsafe { std::ptr::copy_nonoverlapping(next.as_ptr(), self.store.ptr.as_ptr().add(end), next.len) };
            self.store.len.store(end + next.len, Ordering::Release);
            self.len += next.len;
            return Ok(());
        }
        let n = self.len + next.len;
        let what = "the page table of a merged VMA";
        let mut v = match crate::alloc::try_with_capacity(n.saturating_mul(2), what) {
            Ok(v) => v,
            Err(_) => match crate::alloc::try_with_capacity(n, what) {
                Ok(v) => v,
                Err(_) => return Err(next),
            },
        };
        v.extend_from_slice(self);
        v.extend_from_slice(&next);
        self.store = PteStore::from_vec(v, Default::default());
        self.off = 0;
        self.len += next.len;
        Ok(())
    }

    /// A copy in a store of its own (or a host out-of-memory error, or a stop from `t`).
    /// `copies` records each original store and its copy (found in O(1)), so that tables
    /// sharing a store share its copy too.
    pub fn try_clone(&self, t: &crate::watch::Ticker, copies: &mut StoreCopies) -> Result<PteTable> {
        let key = Arc::as_ptr(&self.store) as usize;
        let store = match copies.map.get(&key) {
            Some((_, c)) => c.clone(),
            None => {
                // SAFETY: `len` written entries, only read here.
                let all = unsafe { std::slice::from_raw_parts(self.store.ptr.as_ptr(), self.store.len()) };
                let v = crate::alloc::try_copy(all, "a page table", t)?;
                let exports = if copies.share { self.store.exports.share() } else { Exports::default() };
                let c = PteStore::from_vec(v, exports);
                copies.map.insert(key, (self.store.clone(), c.clone()));
                c
            }
        };
        Ok(PteTable { store, off: self.off, len: self.len })
    }

    /// Copies the windows of `tables` (consecutive ones of one store, in order) into a new
    /// store that holds just them, so the old store, mostly unmapped, can be freed. `false`
    /// (nothing changed) where the host cannot hold the copy.
    pub fn rehome(tables: &mut [&mut PteTable]) -> bool {
        let n = tables.iter().map(|t| t.len).sum();
        let Ok(mut v) = crate::alloc::try_with_capacity(n, "a page table") else { return false };
        for t in tables.iter() {
            v.extend_from_slice(t);
        }
        let store = PteStore::from_vec(v, Default::default());
        let mut off = 0;
        for t in tables.iter_mut() {
            t.store = store.clone();
            t.off = off;
            off += t.len;
        }
        true
    }

    /// After [`StoreCopies::adopt`]: a table on a copy that was written back into its viewed
    /// original uses the original again (same window), so the views see the step's result.
    pub fn repoint(&mut self, back: &HashMap<usize, Arc<PteStore>>) {
        if let Some(orig) = back.get(&(Arc::as_ptr(&self.store) as usize)) {
            self.store = orig.clone();
        }
    }
}

impl std::ops::Deref for PteTable {
    type Target = [u64];
    fn deref(&self) -> &[u64] {
        // SAFETY: `[off, off + len)` lies in the store, which lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.store.ptr.as_ptr().add(self.off), self.len) }
    }
}

impl std::ops::DerefMut for PteTable {
    fn deref_mut(&mut self) -> &mut [u64] {
        // SAFETY: as for `deref`; tables on one store never overlap (split and join keep
        // windows disjoint, and `Clone` copies into a new store), so `&mut self` is the only
        // mutable access to these entries. Numpy views only read, between steps.
        unsafe { std::slice::from_raw_parts_mut(self.store.ptr.as_ptr().add(self.off), self.len) }
    }
}

impl Clone for PteTable {
    /// A copy in a new store of its own.
    fn clone(&self) -> PteTable {
        PteTable { store: PteStore::from_vec(self.to_vec(), Default::default()), off: 0, len: self.len }
    }
}

impl std::fmt::Debug for PteTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter().map(|e| format!("{e:#x}"))).finish()
    }
}

impl PartialEq for PteTable {
    fn eq(&self, other: &PteTable) -> bool {
        **self == **other
    }
}

impl From<Vec<u64>> for PteTable {
    fn from(v: Vec<u64>) -> PteTable {
        let len = v.len();
        PteTable { store: PteStore::from_vec(v, Default::default()), off: 0, len }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join_move_nothing() {
        let mut a = PteTable::from((0..10u64).collect::<Vec<_>>());
        let p = a.as_ptr();
        let mut b = a.split_off(4);
        assert_eq!(&*a, &[0, 1, 2, 3]);
        assert_eq!(&*b, &[4, 5, 6, 7, 8, 9]);
        assert_eq!(b.as_ptr(), unsafe { p.add(4) });
        b[0] = 40;
        a[3] = 30;
        assert!(a.continues_into(&b));
        a.join(b).unwrap();
        assert_eq!(a.as_ptr(), p);
        assert_eq!(&*a, &[0, 1, 2, 30, 40, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn join_of_two_stores_copies_and_clone_is_deep() {
        let mut a = PteTable::from(vec![1, 2]);
        let b = PteTable::from(vec![3]);
        assert!(!a.continues_into(&b));
        a.join(b).unwrap();
        assert_eq!(&*a, &[1, 2, 3]);
        let mut c = a.clone();
        c[0] = 9;
        assert_eq!(a[0], 1);
    }

    #[test]
    fn copies_share_stores_and_write_back_into_viewed_ones() {
        let mut a = PteTable::from(vec![1, 2, 3, 4]);
        let b = a.split_off(2);
        a.store().exports.add();
        let t = crate::watch::Ticker::default();
        let mut copies = StoreCopies::new(true);
        let mut ca = a.try_clone(&t, &mut copies).unwrap();
        let mut cb = b.try_clone(&t, &mut copies).unwrap();
        assert_eq!(copies.len(), 1);
        assert!(ca.continues_into(&cb));
        ca[0] = 10;
        cb[1] = 40;
        let (viewed, _) = a.store().as_raw();
        let back = copies.adopt();
        ca.repoint(&back);
        cb.repoint(&back);
        assert_eq!(ca.store().as_raw().0, viewed);
        assert_eq!(cb.store().as_raw().0, viewed);
        drop((a, b));
        assert_eq!(&*ca, &[10, 2]);
        assert_eq!(&*cb, &[3, 40]);
        ca.store().exports.release();
    }

    #[test]
    fn a_dropped_copy_is_still_written_back() {
        let a = PteTable::from(vec![1, 2, 3]);
        a.store().exports.add();
        let mut copies = StoreCopies::new(true);
        let mut ca = a.try_clone(&crate::watch::Ticker::default(), &mut copies).unwrap();
        ca.fill(0);
        drop(ca);
        assert!(copies.adopt().len() == 1);
        assert_eq!(&*a, &[0, 0, 0]);
        a.store().exports.release();
    }

    #[test]
    fn a_detached_copy_counts_no_views() {
        let a = PteTable::from(vec![1]);
        a.store().exports.add();
        let mut copies = StoreCopies::new(false);
        let ca = a.try_clone(&crate::watch::Ticker::default(), &mut copies).unwrap();
        assert!(!ca.store().exported());
        a.store().exports.release();
    }

    #[test]
    fn joins_onto_the_end_fill_the_room_in_place_unless_viewed() {
        let mut a = PteTable::from(vec![1]);
        a.join(PteTable::from(vec![2])).unwrap();
        let store = a.store().as_raw().0;
        for k in 3..=4 {
            a.join(PteTable::from(vec![k])).unwrap();
        }
        assert_eq!(a.store().as_raw(), (store, 4), "two joins filled the room of the first");
        a.join(PteTable::from(vec![5])).unwrap();
        assert_ne!(a.store().as_raw().0, store, "no room left: a new store");
        let mut b = a.split_off(2);
        assert!(PteTable::rehome(&mut [&mut a]));
        b.store().exports.add();
        let viewed = b.store().as_raw();
        b.join(PteTable::from(vec![6])).unwrap();
        assert_ne!(b.store().as_raw().0, viewed.0, "a viewed store is never written past its end");
        assert_eq!((&*a, &*b), (&[1, 2][..], &[3, 4, 5, 6][..]));
        assert_eq!(viewed.1, 5);
    }
}

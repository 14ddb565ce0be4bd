//! Watching long steps: a [`Watch`] is asked now and then whether a step may go on (the
//! Python layer answers "no" on Ctrl-C), and [`Ticker`] decides when to ask.
//!
//! A step that may be stopped runs on a copy of the state (see `Simulation::guarded`), so a
//! stop abandons it whole: the caller sees [`Error::interrupted`] and the state it had.

use std::cell::Cell;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// Asked by long loops whether they may go on; `done` of `total` work units are finished.
pub trait Watch: Send + Sync {
    fn keep_going(&self, done: u64, total: u64) -> bool;
}

/// Work units between two looks at the clock: cheap enough for the hottest loop.
const CLOCK_EVERY: u64 = 1 << 14;
/// Time between two calls of the watch (each may take the GIL).
const ASK_EVERY: Duration = Duration::from_millis(50);

/// Counts work and asks the [`Watch`] at the first clock look of a step, then at most every
/// [`ASK_EVERY`]. Ticks take `&self`, so
/// that read-only passes such as `check()` can be watched too.
#[derive(Clone, Default)]
pub struct Ticker {
    watch: Option<Arc<dyn Watch>>,
    /// Whether the running step is watched (progress, signals).
    watching: Cell<bool>,
    /// Whether the running step may be stopped (it runs on a copy, or changes nothing). A
    /// step that may not be stopped goes on when the watch says stop, and stops asking.
    armed: Cell<bool>,
    done: Cell<u64>,
    total: Cell<u64>,
    until_clock: Cell<u64>,
    last_ask: Cell<Option<Instant>>,
}

impl fmt::Debug for Ticker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticker").field("watched", &self.watch.is_some()).field("armed", &self.armed.get()).finish()
    }
}

impl Ticker {
    pub fn set_watch(&mut self, watch: Option<Arc<dyn Watch>>) {
        self.watch = watch;
    }

    pub fn watched(&self) -> bool {
        self.watch.is_some()
    }

    /// Whether the running step still asks the watch (it stops asking once told to stop).
    pub fn watching(&self) -> bool {
        self.watching.get()
    }

    /// Starts a step of `total` work units; `armed` if it may be stopped.
    pub fn start(&self, total: u64, armed: bool) {
        self.watching.set(self.watch.is_some());
        self.armed.set(armed && self.watch.is_some());
        self.done.set(0);
        self.total.set(total);
        self.until_clock.set(CLOCK_EVERY);
        self.last_ask.set(None);
    }

    /// Ends the step: later ticks never ask anything.
    pub fn stop(&self) {
        self.watching.set(false);
        self.armed.set(false);
    }

    /// `n` more units done; an error when the watch says stop.
    #[inline]
    pub fn tick(&self, n: u64) -> Result<()> {
        if !self.watching.get() {
            return Ok(());
        }
        self.done.set(self.done.get() + n);
        let left = self.until_clock.get();
        if n < left {
            self.until_clock.set(left - n);
            return Ok(());
        }
        self.until_clock.set(CLOCK_EVERY);
        self.ask()
    }

    /// Asks the watch (at most every [`ASK_EVERY`]) without counting work: for a step's
    /// preparation, such as copying the state it will run on.
    pub fn poll(&self) -> Result<()> {
        if !self.watching.get() {
            return Ok(());
        }
        self.ask()
    }

    #[cold]
    fn ask(&self) -> Result<()> {
        // The first look of a step asks at once (so every watched step of more than
        // CLOCK_EVERY units reports at least once), later ones every ASK_EVERY.
        let now = Instant::now();
        if self.last_ask.get().is_some_and(|last| now.duration_since(last) < ASK_EVERY) {
            return Ok(());
        }
        self.last_ask.set(Some(now));
        match &self.watch {
            Some(w) if !w.keep_going(self.done.get(), self.total.get()) => {
                if self.armed.get() {
                    return Err(Error::interrupted());
                }
                // The step cannot be abandoned: it finishes, and the watch's reason to stop
                // is for the caller to act on afterwards.
                self.watching.set(false);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct StopAfter(AtomicU64);
    impl Watch for StopAfter {
        fn keep_going(&self, _done: u64, _total: u64) -> bool {
            self.0.fetch_sub(1, Ordering::SeqCst) > 1
        }
    }

    #[test]
    fn unarmed_ticker_never_stops() {
        let mut t = Ticker::default();
        let watch = Arc::new(StopAfter(AtomicU64::new(0)));
        t.set_watch(Some(watch.clone()));
        t.start(1 << 30, false);
        for _ in 0..1000 {
            t.tick(1 << 20).unwrap();
        }
        // Asked once (it said stop), then left alone for the rest of the step.
        assert_eq!(watch.0.load(Ordering::SeqCst), u64::MAX);
    }

    #[test]
    fn armed_ticker_stops_when_the_watch_says_so() {
        let mut t = Ticker::default();
        let _ = &mut t;
        t.set_watch(Some(Arc::new(StopAfter(AtomicU64::new(2)))));
        t.start(u64::MAX, true);
        let begun = Instant::now();
        let err = loop {
            if let Err(e) = t.tick(CLOCK_EVERY) {
                break e;
            }
            assert!(begun.elapsed() < Duration::from_secs(10), "the watch was never asked twice");
        };
        assert_eq!(err.kind, crate::error::ErrorKind::Interrupted);
    }
}

//! Connection limits and the TCP idle timeout, shared by both front ends.
//!
//! Admission is lock-free: one `fetch_add` on the global count and one on the
//! frontend's, undone when over the limit. A refusal is logged once per burst
//! (the first, then at most one line every [`LOG_EVERY`] with the count since)
//! and counted in `ringvip_limit_hits_total`.
//!
//! The idle timeout costs one `Cell` increment per read: a per-connection
//! watchdog wakes every quarter of the timeout and closes the relay after four
//! quiet checks in a row, so no timer is armed or reset per read, and an idle
//! connection is closed between 1 and 1.25 times the timeout after its last byte.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::state::Frontend;
use crate::telemetry::{Counter, Gauge, LimitHits};

/// At most one "limit reached" line per limit this often while hits go on.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Which limit refused a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `--max-connections`.
    Global,
    /// `--max-connections-per-frontend`.
    Frontend,
}

/// Logs "limit reached" for the first refusal of a burst, then at most once
/// per [`LOG_EVERY`], with how many were refused since the last line.
#[derive(Debug, Default)]
pub struct BurstLog {
    /// Milliseconds since `origin` of the last line, plus one (0: never).
    last: AtomicU64,
    /// Refusals since the last line.
    since: AtomicU64,
}

impl BurstLog {
    /// Counts a refusal at `now_ms` (milliseconds on any monotonic clock);
    /// returns `Some(refused since the last line)` when a line is due.
    pub fn hit(&self, now_ms: u64) -> Option<u64> {
        self.since.fetch_add(1, Ordering::Relaxed);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == 0 || now_ms + 1 >= last + LOG_EVERY.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now_ms + 1, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            return Some(self.since.swap(0, Ordering::Relaxed));
        }
        None
    }

    /// An admission succeeded: the next refusal starts a new burst.
    pub fn calm(&self) {
        if self.last.load(Ordering::Relaxed) != 0 {
            self.last.store(0, Ordering::Relaxed);
        }
    }
}

/// Global and per-frontend connection limits (0: unlimited).
#[derive(Debug)]
pub struct ConnLimits {
    max_total: usize,
    max_per_frontend: usize,
    total: AtomicUsize,
    /// TCP idle timeout; `None` disables it.
    pub idle_timeout: Option<Duration>,
    /// Counters of `ringvip_limit_hits_total`.
    pub hits: LimitHits,
    log_global: BurstLog,
    log_frontend: BurstLog,
    origin: Instant,
}

impl ConnLimits {
    /// Limits with `0` meaning unlimited and a zero idle timeout meaning none.
    pub fn new(max_total: usize, max_per_frontend: usize, idle_timeout: Duration) -> Self {
        Self {
            max_total,
            max_per_frontend,
            total: AtomicUsize::new(0),
            idle_timeout: (!idle_timeout.is_zero()).then_some(idle_timeout),
            hits: LimitHits::default(),
            log_global: BurstLog::default(),
            log_frontend: BurstLog::default(),
            origin: Instant::now(),
        }
    }

    /// `--max-connections` (0: unlimited).
    pub fn max_total(&self) -> usize {
        self.max_total
    }

    /// `--max-connections-per-frontend` (0: unlimited).
    pub fn max_per_frontend(&self) -> usize {
        self.max_per_frontend
    }

    /// Connections admitted and not yet released, over every front end.
    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }

    /// Admits a new TCP connection through `fe`, or refuses it (counted and
    /// logged). The slot is held until the returned guard drops.
    pub fn admit<'a>(&'a self, fe: &Frontend) -> Option<Slot<'a>> {
        match self.try_admit(&fe.admitted) {
            Ok(slot) => Some(slot),
            Err(why) => {
                self.refused(why, fe);
                None
            }
        }
    }

    /// The admission decision alone (no logging): both counts are raised, and
    /// lowered again when either is over its limit.
    pub fn try_admit<'a>(&'a self, frontend: &Gauge) -> Result<Slot<'a>, Refused> {
        let before = self.total.fetch_add(1, Ordering::Relaxed);
        if self.max_total != 0 && before >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Global);
        }
        let before_fe = frontend.inc();
        if self.max_per_frontend != 0 && before_fe >= self.max_per_frontend as i64 {
            frontend.dec();
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refused::Frontend);
        }
        self.log_global.calm();
        self.log_frontend.calm();
        Ok(Slot {
            total: &self.total,
            frontend: Some(frontend.clone()),
        })
    }

    fn refused(&self, why: Refused, fe: &Frontend) {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        match why {
            Refused::Global => {
                self.hits.max_connections.inc();
                if let Some(n) = self.log_global.hit(now_ms) {
                    tracing::warn!(
                        max = self.max_total,
                        refused_since_last_line = n,
                        "connection limit reached (--max-connections): new connections are refused"
                    );
                }
            }
            Refused::Frontend => {
                self.hits.max_connections_per_frontend.inc();
                if let Some(n) = self.log_frontend.hit(now_ms) {
                    tracing::warn!(
                        max = self.max_per_frontend,
                        service = %fe.service,
                        port = %fe.port_name,
                        refused_since_last_line = n,
                        "per-frontend connection limit reached (--max-connections-per-frontend): new connections are refused"
                    );
                }
            }
        }
    }
}

/// An admitted connection's place under the limits, released on drop.
#[derive(Debug)]
pub struct Slot<'a> {
    total: &'a AtomicUsize,
    /// Always set until [`Slot::keep`] takes it.
    frontend: Option<Gauge>,
}

impl Slot<'_> {
    /// Keeps the admission past the borrow of the limits, for an owner that
    /// holds the limits itself (the engine's connection table): released by
    /// [`ConnLimits::release`], never by a drop.
    pub fn keep(mut self) -> Kept {
        Kept {
            frontend: self.frontend.take().unwrap_or_default(),
        }
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        // None once kept: the keeper releases it.
        if let Some(frontend) = self.frontend.take() {
            frontend.dec();
            self.total.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// An admission kept by [`Slot::keep`]; give it back to
/// [`ConnLimits::release`] of the limits that admitted it.
#[derive(Debug)]
#[must_use = "an admission kept and dropped is never released"]
pub struct Kept {
    frontend: Gauge,
}

impl ConnLimits {
    /// Releases an admission kept by [`Slot::keep`].
    pub fn release(&self, kept: Kept) {
        kept.frontend.dec();
        self.total.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Reads seen on one relay, both directions (one thread: a `Cell`).
#[derive(Debug, Default)]
pub struct Activity {
    reads: Cell<u64>,
    idle: Cell<bool>,
}

impl Activity {
    /// Notes a read that moved bytes.
    #[inline]
    pub fn touch(&self) {
        self.reads.set(self.reads.get().wrapping_add(1));
    }

    /// Whether the watchdog closed the relay for idleness.
    pub fn timed_out(&self) -> bool {
        self.idle.get()
    }
}

/// Quiet checks in a row that make a relay idle; the watchdog checks every
/// `timeout / CHECKS`.
pub const CHECKS: u32 = 4;

/// The watchdog's pure part: fed the read count at each check, says when the
/// relay has been quiet for [`CHECKS`] checks in a row.
#[derive(Debug, Default)]
pub struct IdleCheck {
    last: u64,
    quiet: u32,
}

impl IdleCheck {
    /// One check with the current read count; true when idle.
    pub fn check(&mut self, reads: u64) -> bool {
        if reads == self.last {
            self.quiet += 1;
        } else {
            self.last = reads;
            self.quiet = 0;
        }
        self.quiet >= CHECKS
    }
}

/// Resolves once `activity` has seen no read for `timeout` (never when
/// `timeout` is `None`), marking it timed out and counting the hit.
pub async fn idle_watchdog(activity: &Activity, timeout: Option<Duration>, hits: &Counter) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    let tick = timeout / CHECKS;
    let mut check = IdleCheck::default();
    loop {
        tokio::time::sleep(tick).await;
        if check.check(activity.reads.get()) {
            activity.idle.set(true);
            hits.inc();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_and_frontend_limits_refuse_and_release() {
        let l = ConnLimits::new(3, 2, Duration::ZERO);
        let (a, b) = (Gauge::default(), Gauge::default());
        let a1 = l.try_admit(&a).unwrap();
        let _a2 = l.try_admit(&a).unwrap();
        assert_eq!(l.try_admit(&a).unwrap_err(), Refused::Frontend);
        assert_eq!((l.total(), a.get()), (2, 2));
        let _b1 = l.try_admit(&b).unwrap();
        assert_eq!(l.try_admit(&b).unwrap_err(), Refused::Global);
        assert_eq!((l.total(), b.get()), (3, 1));
        drop(a1);
        assert_eq!((l.total(), a.get()), (2, 1));
        let _b2 = l.try_admit(&b).unwrap();
        assert_eq!(b.get(), 2);
    }

    #[test]
    fn a_kept_admission_holds_until_released() {
        let l = ConnLimits::new(1, 0, Duration::ZERO);
        let g = Gauge::default();
        let kept = l.try_admit(&g).unwrap().keep();
        assert_eq!((l.total(), g.get()), (1, 1));
        assert_eq!(l.try_admit(&g).unwrap_err(), Refused::Global);
        l.release(kept);
        assert_eq!((l.total(), g.get()), (0, 0));
    }

    #[test]
    fn zero_means_unlimited() {
        let l = ConnLimits::new(0, 0, Duration::ZERO);
        let g = Gauge::default();
        let slots: Vec<_> = (0..1000).map(|_| l.try_admit(&g).unwrap()).collect();
        assert_eq!(l.total(), 1000);
        drop(slots);
        assert_eq!((l.total(), g.get()), (0, 0));
        assert_eq!(l.idle_timeout, None);
    }

    #[test]
    fn burst_log_says_once_then_every_period_with_the_count() {
        let log = BurstLog::default();
        assert_eq!(log.hit(0), Some(1));
        for t in 1..1000 {
            assert_eq!(log.hit(t), None);
        }
        assert_eq!(log.hit(10_000), Some(1000));
        assert_eq!(log.hit(10_001), None);
        // A success ends the burst: the next refusal is logged at once.
        log.calm();
        assert_eq!(log.hit(10_002), Some(2));
    }

    #[test]
    fn idle_needs_four_quiet_checks_in_a_row() {
        let mut c = IdleCheck::default();
        assert!(!c.check(0));
        assert!(!c.check(0));
        assert!(!c.check(0));
        assert!(!c.check(5)); // activity resets the count
        assert!(!c.check(5));
        assert!(!c.check(5));
        assert!(!c.check(5));
        assert!(c.check(5));
    }
}

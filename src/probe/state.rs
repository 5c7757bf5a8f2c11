//! The pure state machines that turn single check results into a verdict:
//! the kubelet's probe thresholds and HAProxy's rise/fall health counter.

/// The kubelet's prober worker (`pkg/kubelet/prober/worker.go`): a result
/// becomes the published one only after `successThreshold` consecutive
/// successes or `failureThreshold` consecutive failures; a readiness probe
/// starts as failure (not ready).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeletThresholds {
    success_threshold: u32,
    failure_threshold: u32,
    last: Option<bool>,
    run: u32,
    published: bool,
}

impl KubeletThresholds {
    /// A readiness worker: not ready until enough successes.
    pub fn readiness(success_threshold: u32, failure_threshold: u32) -> Self {
        KubeletThresholds {
            success_threshold,
            failure_threshold,
            last: None,
            run: 0,
            published: false,
        }
    }

    /// Takes one probe result; returns the new published result when it
    /// changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        if self.last == Some(ok) {
            self.run = self.run.saturating_add(1);
        } else {
            self.last = Some(ok);
            self.run = 1;
        }
        let threshold = if ok {
            self.success_threshold
        } else {
            self.failure_threshold
        };
        if self.run < threshold || self.published == ok {
            return None;
        }
        self.published = ok;
        Some(ok)
    }

    /// The published result.
    pub fn ready(&self) -> bool {
        self.published
    }
}

/// HAProxy's check health counter (`src/check.c`): `health` runs from 0 to
/// `rise + fall - 1`; the server is up while `health >= rise`. A new server
/// starts up at `health = rise` (`init-state up`, the default), so its first
/// failed check takes it down; from fully up it takes `fall` failures, and
/// from down `rise` successes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RiseFall {
    rise: u32,
    fall: u32,
    health: u32,
}

impl RiseFall {
    /// A new server with `rise` and `fall` (each at least 1).
    pub fn new(rise: u32, fall: u32) -> Self {
        let rise = rise.max(1);
        RiseFall {
            rise,
            fall: fall.max(1),
            health: rise,
        }
    }

    /// Up (usable).
    pub fn up(&self) -> bool {
        self.health >= self.rise
    }

    /// Takes one check result; returns the new state when it changed.
    pub fn observe(&mut self, ok: bool) -> Option<bool> {
        let was = self.up();
        let top = self.rise + self.fall - 1;
        if ok {
            self.health = if was { top } else { self.health + 1 };
            if !was && self.up() {
                self.health = top;
            }
        } else if was && self.health > self.rise {
            self.health -= 1;
        } else {
            self.health = 0;
        }
        (self.up() != was).then_some(self.up())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `results` (`+` success, `-` failure) to `f`; returns what it
    /// published, one character per result: `.` nothing, `U` up/ready, `D`
    /// down/unready.
    fn run(mut f: impl FnMut(bool) -> Option<bool>, results: &str) -> String {
        results
            .chars()
            .map(|c| match f(c == '+') {
                None => '.',
                Some(true) => 'U',
                Some(false) => 'D',
            })
            .collect()
    }

    #[test]
    fn kubelet_readiness_needs_its_thresholds() {
        // Defaults 1/3: ready on the first success, unready on the third
        // consecutive failure; a success in between resets the run.
        let mut k = KubeletThresholds::readiness(1, 3);
        assert!(!k.ready(), "not ready before the first result");
        assert_eq!(run(|ok| k.observe(ok), "-+--+---+"), ".U.....DU");
        // successThreshold 2: two successes in a row.
        let mut k = KubeletThresholds::readiness(2, 1);
        assert_eq!(run(|ok| k.observe(ok), "+-++-"), "...UD");
    }

    #[test]
    fn haproxy_rise_fall_from_init_state_up() {
        // rise 2, fall 3: starts up, the first failure takes it down.
        let mut h = RiseFall::new(2, 3);
        assert!(h.up());
        assert_eq!(run(|ok| h.observe(ok), "-"), "D");
        // rise successes bring it up; fall failures from fully up take it down.
        assert_eq!(run(|ok| h.observe(ok), "+-++--+---"), "...U.....D");
        // A first success after start makes it fully up: then fall failures.
        let mut h = RiseFall::new(2, 3);
        assert_eq!(run(|ok| h.observe(ok), "+---"), "...D");
        let mut h = RiseFall::new(1, 1);
        assert_eq!(run(|ok| h.observe(ok), "-+-"), "DUD");
    }
}

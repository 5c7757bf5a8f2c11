//! Endpoint pickers. Pure: the clock (`Instant`) and the random source are
//! arguments, so every decision is reproducible in tests.

pub(crate) mod affinity;
pub(crate) mod health;
pub(crate) mod random;

pub use affinity::AffinityTable;
pub use health::PassiveHealth;
pub use random::{pick_avoiding, pick_random, pick_retry};

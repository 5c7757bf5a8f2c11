//! Endpoint pickers. Pure: the clock (`Instant`) and the random source are
//! arguments, so every decision is reproducible in tests.

pub(crate) mod affinity;
pub mod algorithm;
pub(crate) mod health;
pub mod maglev;
pub(crate) mod random;
pub mod slow_start;

pub use affinity::AffinityTable;
pub use algorithm::{choose, Balancer, Inputs};
pub use health::PassiveHealth;
pub use maglev::Maglev;
pub use random::{pick_avoiding, pick_random, pick_retry};
pub use slow_start::{Joined, Warmup};

//! Endpoint pickers. Pure: the clock (`Instant`) and the random source are
//! arguments, so every decision is reproducible in tests.

pub mod affinity;
pub mod random;

pub use affinity::AffinityTable;
pub use random::{pick_random, pick_retry};

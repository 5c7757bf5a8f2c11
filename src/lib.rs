//! ringvip: Kubernetes Services in userspace, on io_uring.
//!
//! The shape is described in DESIGN.md: sources → [`state::Store`] →
//! [`state::Snapshot`] (ArcSwap) → data plane. See README.md for usage.

// Nothing input can reach may panic: no unwrap/expect/panic and no indexing
// or slicing that can go out of bounds, outside tests (the `testing` module,
// whose panics are its reports, allows these by name).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

pub mod access_log;
pub(crate) mod admin;
pub mod app;
pub mod balance;
pub mod config;
pub mod dataplane;
pub mod demo;
pub mod discovery;
pub mod dns;
pub mod envvars;
pub mod explain;
pub mod handover;
pub(crate) mod healthcheck;
pub mod heap;
pub mod logging;
pub mod model;
pub mod netns;
pub(crate) mod privileges;
pub mod probe;
pub mod sharded;
pub mod state;
pub mod status;
pub mod telemetry;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

//! ClusterIP capture: a TUN device receives traffic for the service CIDRs and a
//! smoltcp stack terminates it; connections and UDP flows are spliced to
//! backends with the same resolve, pick, connect and relay rules as the
//! kernel-socket path.

pub mod bridge;
pub mod device;
pub mod link;
pub mod offload;
pub mod opening;
pub mod stack;

#[cfg(test)]
mod proptests;

pub use device::{Tun, TunError};
pub use link::{configure, LinkConfig, LinkError};
pub use stack::{classify, run, Classified, TunSettings};

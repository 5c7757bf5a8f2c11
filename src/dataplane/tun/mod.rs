//! ClusterIP capture: a TUN device receives traffic for the service CIDRs and a
//! smoltcp stack terminates it; connections and UDP flows are spliced to
//! backends with the same resolve, pick, connect and relay rules as the
//! kernel-socket path.
//!
//! - [`device`], [`link`]: the multi-queue TUN device and its netlink setup;
//!   [`offload`]: checksum and segmentation offload across it;
//! - [`packet`]: what a packet is (pure);
//! - [`conns`]: the connection table, held SYN to closed socket (pure);
//!   [`stack`]: the smoltcp interface, its sharded sockets and that table;
//!   [`rings`]: the sockets' ring storage, kept for the next connections;
//! - [`driver`]: the per-queue loop, its reads and writes on io_uring
//!   ([`uring`]); [`tcp`] and [`udp`]: what happens to a
//!   new connection and a datagram; [`bridge`]: the TCP relay between a
//!   smoltcp socket and a backend; [`flows`]: the UDP flow state;
//!   [`ctx`]: what the queue's tasks share; [`peer`]: which thread (and,
//!   during an upgrade, which process) handles a packet.

pub mod bridge;
pub mod conns;
pub mod ctx;
pub mod device;
pub mod driver;
pub mod flows;
pub mod link;
pub mod offload;
pub mod packet;
pub mod peer;
pub mod rings;
pub mod stack;
pub mod tcp;
pub mod udp;
pub mod uring;

#[cfg(test)]
mod proptests;

pub use device::{Tun, TunError};
pub use driver::{run, Queue, TunCmd};
pub use link::{configure, LinkConfig, LinkError};
pub use packet::{classify, udp_packet, Classified};
pub use stack::TunSettings;

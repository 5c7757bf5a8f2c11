//! The control plane's state: one writer ([`Store`]) applies source updates and
//! compiles immutable [`Snapshot`]s that the data plane reads lock-free.

pub(crate) mod health;
mod selection;
pub(crate) mod snapshot;
pub mod store;
pub(crate) mod topology;

#[cfg(test)]
mod proptests;

pub use health::{Health, HealthReport};
pub use snapshot::{
    CompileCache, EmptyAction, Frontend, FrontendKey, FrontendKind, HealthCheck, ListenerMode,
    ListenerSpec, NodeContext, PortCandidates, Snapshot,
};
pub use store::{Changes, Store};
pub use topology::{explain_endpoint, Candidate, Eligibility};

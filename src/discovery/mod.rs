//! Sources of Kubernetes objects. Every source speaks the same typed [`Update`]
//! protocol into the store, so the file source, the API source (later) and test
//! fakes are interchangeable.

pub mod convert;
pub mod file;
pub mod kube;
pub mod selector;

#[cfg(test)]
mod proptests;

use crate::model::{Kind, Object, ObjectKey};

/// One change from a source.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The source's complete current set: everything it sent before is replaced.
    Reset(Vec<Object>),
    /// An object was added or changed.
    Upsert(Box<Object>),
    /// An object is gone.
    Delete(Kind, ObjectKey),
}

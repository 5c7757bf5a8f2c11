//! The snapshot's frontends by key, structurally shared between snapshots
//! (see [`crate::sharded`]): the next snapshot copies only the shards a
//! change touches, so a change costs the same at 1,000 and at 100,000
//! Services, and a lookup stays two fast hashes.

use std::sync::Arc;

use super::{Frontend, FrontendKey};
use crate::sharded::Sharded;

/// Frontends by key.
pub type Frontends = Sharded<FrontendKey, Arc<Frontend>>;

//! The snapshot's frontends by key, structurally shared between snapshots.
//!
//! A flat map would have to be copied whole for every snapshot that changes
//! one Service (O(all frontends) per change, and as much again to drop the
//! old one). This map is split into [`SHARDS`] shards, each behind an `Arc`:
//! the next snapshot clones the shard pointers (a fixed cost) and copies only
//! the shards a change touches (O(frontends / SHARDS) each), so a change
//! costs the same at 1,000 and at 100,000 Services. A lookup hashes its key
//! once to pick the shard and once in the shard's table (foldhash, seeded
//! per process, a few nanoseconds each): no slower than one SipHash lookup
//! in a flat map.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use foldhash::fast::RandomState;

use super::{Frontend, FrontendKey};

/// Number of shards: enough that at 1M frontends a shard holds ~1,000, few
/// enough that cloning the shard pointers stays a few microseconds.
pub const SHARDS: usize = 1024;

/// Which bits of the key's hash pick the shard: the middle ones, because
/// the shard's own table uses the low bits (bucket) and the top 7 bits
/// (control byte); keys of one shard must still differ there.
const SHARD_SHIFT: u32 = 32;

type Shard = HashMap<FrontendKey, Arc<Frontend>, RandomState>;

/// Frontends by key (see the module documentation).
#[derive(Debug, Clone)]
pub struct Frontends {
    hasher: RandomState,
    shards: Box<[Arc<Shard>]>,
    len: usize,
}

impl Default for Frontends {
    fn default() -> Self {
        Frontends::new(RandomState::default())
    }
}

impl Frontends {
    /// An empty map hashing with `hasher` (every shard one shared empty
    /// table until something is put in it).
    pub fn new(hasher: RandomState) -> Self {
        let empty = Arc::new(Shard::with_hasher(hasher.clone()));
        Frontends {
            shards: (0..SHARDS).map(|_| empty.clone()).collect(),
            hasher,
            len: 0,
        }
    }

    #[inline]
    fn shard_of(&self, key: &FrontendKey) -> usize {
        let h = self.hasher.hash_one(key);
        (h >> SHARD_SHIFT) as usize % SHARDS
    }

    /// The frontend at `key`.
    #[inline]
    pub fn get(&self, key: &FrontendKey) -> Option<&Arc<Frontend>> {
        self.shards.get(self.shard_of(key))?.get(key)
    }

    /// The shard of `key`, copied first if another map shares it.
    fn shard_mut(&mut self, key: &FrontendKey) -> Option<&mut Shard> {
        let i = self.shard_of(key);
        self.shards.get_mut(i).map(Arc::make_mut)
    }

    /// Puts `fe` at `key`; hands back what was there.
    pub fn insert(&mut self, key: FrontendKey, fe: Arc<Frontend>) -> Option<Arc<Frontend>> {
        let old = self.shard_mut(&key)?.insert(key, fe);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Puts `fe` at `key` unless a frontend is there already; hands back
    /// that one.
    pub fn insert_new(&mut self, key: FrontendKey, fe: Arc<Frontend>) -> Result<(), Arc<Frontend>> {
        use std::collections::hash_map::Entry;
        let Some(shard) = self.shard_mut(&key) else {
            return Ok(());
        };
        match shard.entry(key) {
            Entry::Occupied(prev) => Err(prev.get().clone()),
            Entry::Vacant(v) => {
                v.insert(fe);
                self.len += 1;
                Ok(())
            }
        }
    }

    /// Takes the frontend at `key` out.
    pub fn remove(&mut self, key: &FrontendKey) -> Option<Arc<Frontend>> {
        // Not copying a shared shard that does not hold the key.
        let i = self.shard_of(key);
        if !self.shards.get(i)?.contains_key(key) {
            return None;
        }
        let old = self.shards.get_mut(i).map(Arc::make_mut)?.remove(key);
        if old.is_some() {
            self.len -= 1;
        }
        old
    }

    /// Number of frontends.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Every frontend, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&FrontendKey, &Arc<Frontend>)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// How many shards this map shares with `other` (for tests).
    #[cfg(test)]
    pub fn shared_shards(&self, other: &Frontends) -> usize {
        self.shards
            .iter()
            .zip(other.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b) && !a.is_empty())
            .count()
    }
}

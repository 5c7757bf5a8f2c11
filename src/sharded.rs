//! A hash map structurally shared between its versions.
//!
//! A flat map would have to be copied whole for every version that changes
//! one entry (O(all entries) per change, and as much again to drop the old
//! one). This map is split into [`SHARDS`] shards, each behind an `Arc`: the
//! next version clones the shard pointers (a fixed cost) and copies only the
//! shards a change touches (O(entries / SHARDS) each), so a change costs
//! the same at 1,000 and at 1,000,000 entries. A lookup hashes its key once
//! to pick the shard and once in the shard's table (foldhash, seeded per
//! process, a few nanoseconds each): no slower than one SipHash lookup in a
//! flat map. The snapshot's frontends and the DNS zone's names use it.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::Arc;

use foldhash::fast::RandomState;

/// Number of shards: enough that at 1M entries a shard holds ~1,000, few
/// enough that cloning the shard pointers stays a few microseconds.
pub const SHARDS: usize = 1024;

/// Which bits of the key's hash pick the shard: the middle ones, because
/// the shard's own table uses the low bits (bucket) and the top 7 bits
/// (control byte); keys of one shard must still differ there.
const SHARD_SHIFT: u32 = 32;

type Shard<K, V> = HashMap<K, V, RandomState>;

/// Values by key (see the module documentation).
#[derive(Debug)]
pub struct Sharded<K, V> {
    hasher: RandomState,
    shards: Box<[Arc<Shard<K, V>>]>,
    len: usize,
}

// By hand: cloning shares the shards, so K and V need not be Clone for it.
impl<K, V> Clone for Sharded<K, V> {
    fn clone(&self) -> Self {
        Sharded {
            hasher: self.hasher.clone(),
            shards: self.shards.clone(),
            len: self.len,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Default for Sharded<K, V> {
    fn default() -> Self {
        Sharded::new(RandomState::default())
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Sharded<K, V> {
    /// An empty map hashing with `hasher` (every shard one shared empty
    /// table until something is put in it).
    pub fn new(hasher: RandomState) -> Self {
        let empty = Arc::new(Shard::with_hasher(hasher.clone()));
        Sharded {
            shards: (0..SHARDS).map(|_| empty.clone()).collect(),
            hasher,
            len: 0,
        }
    }

    #[inline]
    fn shard_of<Q: Hash + ?Sized>(&self, key: &Q) -> usize {
        let h = self.hasher.hash_one(key);
        (h >> SHARD_SHIFT) as usize % SHARDS
    }

    /// The value at `key`.
    #[inline]
    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shards.get(self.shard_of(key))?.get(key)
    }

    /// The shard of `key`, copied first if another map shares it.
    fn shard_mut(&mut self, key: &K) -> Option<&mut Shard<K, V>> {
        let i = self.shard_of(key);
        self.shards.get_mut(i).map(Arc::make_mut)
    }

    /// Puts `value` at `key`; hands back what was there.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let old = self.shard_mut(&key)?.insert(key, value);
        if old.is_none() {
            self.len += 1;
        }
        old
    }

    /// Puts `value` at `key` unless a value is there already; hands back
    /// that one.
    pub fn insert_new(&mut self, key: K, value: V) -> Result<(), V> {
        use std::collections::hash_map::Entry;
        let Some(shard) = self.shard_mut(&key) else {
            return Ok(());
        };
        match shard.entry(key) {
            Entry::Occupied(prev) => Err(prev.get().clone()),
            Entry::Vacant(v) => {
                v.insert(value);
                self.len += 1;
                Ok(())
            }
        }
    }

    /// Takes the value at `key` out.
    pub fn remove(&mut self, key: &K) -> Option<V> {
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

    /// Number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when it holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards.iter().flat_map(|s| s.iter())
    }

    /// How many shards this map shares with `other` (for tests).
    #[cfg(test)]
    pub fn shared_shards(&self, other: &Sharded<K, V>) -> usize {
        self.shards
            .iter()
            .zip(other.shards.iter())
            .filter(|(a, b)| Arc::ptr_eq(a, b) && !a.is_empty())
            .count()
    }
}

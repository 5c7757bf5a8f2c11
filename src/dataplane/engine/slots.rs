//! A table of live entries addressed by a small index (what a completion's
//! user data carries), reusing freed indices first so the table stays as
//! large as the most entries ever live at once.

/// Entries by index; see the module documentation.
pub struct Slots<T> {
    items: Vec<Option<T>>,
    free: Vec<u32>,
    len: usize,
}

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<T> Slots<T> {
    /// Stores `item`; returns its index.
    pub fn insert(&mut self, item: T) -> u32 {
        self.len += 1;
        if let Some(i) = self.free.pop() {
            if let Some(slot) = self.items.get_mut(i as usize) {
                *slot = Some(item);
                return i;
            }
        }
        self.items.push(Some(item));
        (self.items.len() - 1) as u32
    }

    /// The entry at `i`, if live.
    #[inline]
    pub fn get_mut(&mut self, i: u32) -> Option<&mut T> {
        self.items.get_mut(i as usize).and_then(Option::as_mut)
    }

    /// The entry at `i`, if live.
    #[inline]
    pub fn get(&self, i: u32) -> Option<&T> {
        self.items.get(i as usize).and_then(Option::as_ref)
    }

    /// Takes the entry at `i` out; its index may be handed out again.
    pub fn remove(&mut self, i: u32) -> Option<T> {
        let item = self.items.get_mut(i as usize)?.take()?;
        self.free.push(i);
        self.len -= 1;
        Some(item)
    }

    /// Live entries.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is live.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Indices of the live entries, appended to `out` (a reused vector, so
    /// a periodic sweep does not allocate once warm).
    pub fn indices(&self, out: &mut Vec<u32>) {
        out.extend(
            self.items
                .iter()
                .enumerate()
                .filter(|(_, s)| s.is_some())
                .map(|(i, _)| i as u32),
        );
    }

    /// Takes every entry out.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.free.clear();
        self.len = 0;
        self.items.drain(..).flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_indices_are_reused_and_stale_ones_find_nothing() {
        let mut s = Slots::default();
        let a = s.insert("a");
        let b = s.insert("b");
        assert_eq!(s.remove(a), Some("a"));
        assert_eq!(s.get(a), None);
        assert_eq!(s.remove(a), None);
        let c = s.insert("c");
        assert_eq!(c, a);
        assert_eq!((s.get(b), s.len()), (Some(&"b"), 2));
        let mut idx = Vec::new();
        s.indices(&mut idx);
        assert_eq!(idx, vec![a, b]);
        assert_eq!(s.drain().count(), 2);
        assert!(s.is_empty());
    }
}

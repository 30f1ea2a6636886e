//! A bounded map that, when full, forgets its least recently used half.
//!
//! The GPU launch tables of the multi-adapter kernels are kept by content (cuda/sgmv.rs): a decode
//! step seen once is captured into a CUDA graph at its next step, and the capture cannot upload,
//! so it must find every table the step before uploaded. Starting over when the map is full lost
//! them whenever a step's uploads crossed the limit (a 64-row NF4 batch with 8 adapters then ran
//! without a graph at 74 % of its graphed speed). Forgetting the least recently used half keeps the
//! tables of the steps running now.

use std::collections::HashMap;
use std::hash::Hash;

/// Entries with the lookup that last used them.
#[derive(Debug)]
pub(crate) struct RecentCache<K, V> {
    entries: HashMap<K, (V, u64)>,
    /// Lookups and inserts so far: the stamp of the latest use.
    clock: u64,
    max: usize,
}

impl<K: Hash + Eq, V: Clone> RecentCache<K, V> {
    /// A cache of at most `max` entries (at least 2).
    pub(crate) fn new(max: usize) -> Self {
        Self {
            entries: HashMap::new(),
            clock: 0,
            max: max.max(2),
        }
    }

    /// The value under `key`, marked as just used.
    pub(crate) fn get(&mut self, key: &K) -> Option<V> {
        self.clock += 1;
        let now = self.clock;
        self.entries.get_mut(key).map(|(v, used)| {
            *used = now;
            v.clone()
        })
    }

    /// Stores `value` under `key`; a full cache first drops its least recently used half.
    pub(crate) fn insert(&mut self, key: K, value: V) {
        if self.entries.len() >= self.max && !self.entries.contains_key(&key) {
            self.forget_older_half();
        }
        self.clock += 1;
        self.entries.insert(key, (value, self.clock));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }

    fn forget_older_half(&mut self) {
        let mut stamps: Vec<u64> = self.entries.values().map(|(_, used)| *used).collect();
        let mid = stamps.len() / 2;
        // Stamps are distinct (one per use), so this keeps exactly the newer half.
        let (_, cut, _) = stamps.select_nth_unstable(mid);
        let cut = *cut;
        self.entries.retain(|_, (_, used)| *used >= cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cache_keeps_what_was_used_last() {
        let mut c = RecentCache::new(8);
        for k in 0..8 {
            c.insert(k, k * 10);
        }
        // 6 and 7 were inserted last; 0 and 1 are used again: those four are the recent half.
        assert_eq!(c.get(&0), Some(0));
        assert_eq!(c.get(&1), Some(10));
        c.insert(8, 80);
        assert_eq!(c.len(), 5, "half of 8 kept, then the new entry");
        for k in [0, 1, 6, 7, 8] {
            assert_eq!(c.get(&k), Some(k * 10), "entry {k} should have been kept");
        }
        for k in 2..6 {
            assert_eq!(c.get(&k), None, "entry {k} should have been forgotten");
        }
    }

    #[test]
    fn a_step_crossing_the_limit_keeps_its_own_entries() {
        // A step uploads 5 tables into a cache of 8 that already holds 6 older ones: every table
        // of the step must still be there for the capture that follows.
        let mut c = RecentCache::new(8);
        for k in 100..106 {
            c.insert(k, k);
        }
        let step: Vec<i32> = (0..5).collect();
        for &k in &step {
            if c.get(&k).is_none() {
                c.insert(k, k);
            }
        }
        for &k in &step {
            assert_eq!(c.get(&k), Some(k), "table {k} of the step was lost");
        }
        assert!(c.len() <= 8);
    }

    #[test]
    fn replacing_a_key_does_not_evict() {
        let mut c = RecentCache::new(2);
        c.insert("a", 1);
        c.insert("b", 2);
        c.insert("b", 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.get(&"b"), Some(3));
    }
}

//! A bounded cache of recent edits' attention maps for `/attention/{edit_id}`, bounded by count
//! and by bytes (each entry holds its input image); the oldest edit is evicted first.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use image::RgbImage;

use crate::backend::AttentionSummary;

pub struct CachedEdit {
    pub instruction: String,
    /// The input the overlay is drawn on.
    pub image: Arc<RgbImage>,
    pub attention: AttentionSummary,
}

impl CachedEdit {
    /// About what the entry holds in memory.
    pub fn bytes(&self) -> u64 {
        let maps = self.attention.instruction_map.len()
            + self
                .attention
                .words
                .iter()
                .map(|w| w.map.len())
                .sum::<usize>();
        (self.image.as_raw().len() + maps * 4 + self.instruction.len()) as u64
    }
}

pub struct AttentionCache {
    capacity: usize,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, (Arc<CachedEdit>, u64)>,
    order: VecDeque<String>,
    bytes: u64,
}

impl Inner {
    fn evict_oldest(&mut self) {
        if let Some(old) = self.order.pop_front() {
            if let Some((_, bytes)) = self.by_id.remove(&old) {
                self.bytes -= bytes;
            }
        }
    }
}

impl AttentionCache {
    pub fn new(capacity: usize, max_bytes: u64) -> Self {
        Self {
            capacity,
            max_bytes,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Bytes the cached edits hold.
    pub fn bytes(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).bytes
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn insert(&self, edit_id: String, edit: CachedEdit) {
        let bytes = edit.bytes();
        // An edit larger than the whole cache is not kept (its maps answer 404).
        if self.capacity == 0 || bytes > self.max_bytes {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while !inner.order.is_empty()
            && (inner.order.len() >= self.capacity || inner.bytes + bytes > self.max_bytes)
        {
            inner.evict_oldest();
        }
        inner.order.push_back(edit_id.clone());
        inner.bytes += bytes;
        inner.by_id.insert(edit_id, (Arc::new(edit), bytes));
    }

    pub fn get(&self, edit_id: &str) -> Option<Arc<CachedEdit>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.get(edit_id).map(|(edit, _)| edit.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn edit() -> CachedEdit {
        CachedEdit {
            instruction: "x".into(),
            image: Arc::new(RgbImage::new(1, 1)),
            attention: AttentionSummary {
                height: 1,
                width: 1,
                instruction_map: vec![1.0],
                words: vec![],
            },
        }
    }

    #[test]
    fn evicts_oldest_first() {
        let cache = AttentionCache::new(2, u64::MAX);
        for id in ["a", "b", "c"] {
            cache.insert(id.into(), edit());
        }
        assert!(cache.get("a").is_none());
        assert!(cache.get("b").is_some() && cache.get("c").is_some());
    }

    #[test]
    fn bytes_bound_the_cache_oldest_first() {
        let one = edit().bytes();
        let cache = AttentionCache::new(100, 2 * one);
        for id in ["a", "b", "c"] {
            cache.insert(id.into(), edit());
        }
        assert!(cache.get("a").is_none(), "evicted to make room");
        assert!(cache.get("b").is_some() && cache.get("c").is_some());
        assert_eq!(cache.bytes(), 2 * one);
        let small = AttentionCache::new(100, one - 1);
        small.insert("big".into(), edit());
        assert!(small.get("big").is_none() && small.bytes() == 0);
    }
}

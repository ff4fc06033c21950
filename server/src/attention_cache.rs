//! A bounded cache of recent edits' attention maps for `/attention/{edit_id}`; the oldest edit
//! is evicted first.

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

pub struct AttentionCache {
    capacity: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_id: HashMap<String, Arc<CachedEdit>>,
    order: VecDeque<String>,
}

impl AttentionCache {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            inner: Mutex::new(Inner::default()),
        }
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn insert(&self, edit_id: String, edit: CachedEdit) {
        if self.capacity == 0 {
            return;
        }
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        while inner.order.len() >= self.capacity {
            if let Some(old) = inner.order.pop_front() {
                inner.by_id.remove(&old);
            }
        }
        inner.order.push_back(edit_id.clone());
        inner.by_id.insert(edit_id, Arc::new(edit));
    }

    pub fn get(&self, edit_id: &str) -> Option<Arc<CachedEdit>> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.by_id.get(edit_id).cloned()
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
        let cache = AttentionCache::new(2);
        for id in ["a", "b", "c"] {
            cache.insert(id.into(), edit());
        }
        assert!(cache.get("a").is_none());
        assert!(cache.get("b").is_some() && cache.get("c").is_some());
    }
}

//! The bounds on the reloads that requests cause: a token bucket, how long a requested version
//! stays protected from being unloaded, and one gate per name for single-flight reads.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::AdapterError;

/// The bounds on reloads that requests cause.
pub(crate) struct ReloadLimits {
    per_min: u32,
    min_resident: Duration,
    bucket: Mutex<Bucket>,
    /// One per name a request had to read again.
    gates: Mutex<HashMap<String, Arc<Gate>>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Single flight for one name: the holder of `last` reads; who waited behind it and finds
/// `finished` moved on shares its result instead of reading again.
#[derive(Default)]
pub(super) struct Gate {
    pub(super) finished: AtomicU64,
    pub(super) last: tokio::sync::Mutex<Option<AdapterError>>,
}

impl ReloadLimits {
    pub(super) fn new(per_min: u32, min_resident: Duration) -> Self {
        Self {
            per_min: per_min.max(1),
            min_resident,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(per_min.max(1)),
                at: Instant::now(),
            }),
            gates: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one reload from the bucket, or says in how many seconds one is there.
    pub(super) fn take(&self) -> Result<(), u64> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        let per_s = f64::from(self.per_min) / 60.0;
        let now = Instant::now();
        let refilled = bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * per_s;
        bucket.tokens = refilled.min(f64::from(self.per_min));
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(((1.0 - bucket.tokens) / per_s).ceil().max(1.0) as u64)
        }
    }

    /// Some(how much longer) a version may not be unloaded by a request's reload;
    /// `Duration::MAX` for as long as it is the default or in use.
    pub(super) fn protected_for(
        &self,
        is_default_or_in_use: bool,
        requested_at: Option<Instant>,
        now: Instant,
    ) -> Option<Duration> {
        if is_default_or_in_use {
            return Some(Duration::MAX);
        }
        let since = now.duration_since(requested_at?);
        (since < self.min_resident).then(|| self.min_resident - since)
    }

    pub(super) fn gate(&self, name: &str) -> Arc<Gate> {
        per_name(&self.gates, name)
    }
}

/// What `map` keeps for `name`, made on first use.
pub(super) fn per_name<T: Default>(map: &Mutex<HashMap<String, Arc<T>>>, name: &str) -> Arc<T> {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.to_string())
        .or_default()
        .clone()
}

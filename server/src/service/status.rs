//! What the service reports about itself for `/info`.

use crate::adapters::AdapterUsage;

use super::state::Service;

/// The parts of `/info` that change while serving.
pub struct ServiceStatus {
    /// Edits whose attention maps are kept; 0: capture is off.
    pub attention_cache: usize,
    /// Adapter names a request may ask for.
    pub adapters: Vec<String>,
    /// Applied when a request names no adapter; None: the base model.
    pub default_adapter: Option<String>,
    pub adapter_memory: AdapterUsage,
    pub queue_depth: usize,
}

impl Service {
    pub fn status(&self) -> ServiceStatus {
        ServiceStatus {
            attention_cache: self.attention.capacity(),
            adapters: self.adapters.names(),
            default_adapter: self.adapters.default_name(),
            adapter_memory: self.adapters.usage(),
            queue_depth: self.queue.depth(),
        }
    }
}

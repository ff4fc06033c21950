//! rl4pix-server: the HTTP editing service.
//!
//! A request's path: `http` (routes: parse and check the request; the only place that knows
//! statuses) -> `service` (admission, async jobs, adapters, attention maps; answers with domain
//! values or an `error::ServiceError`) -> `queue` (bounded, dynamic batching) -> `worker` (one thread that
//! owns the model) -> `backend` (the narrow trait over the model). Beside them: `adapters` (the
//! registry of LoRA files), `watcher` (keeps it in line with its folder), `jobs` (async job
//! records), `attention_cache`, `codec` (image bytes in and out), `edit` (an edit's domain
//! types), `config` (flags), `metrics`, `openapi`, and `server`, which wires it all together.
//! See `docs/architecture.md`, "The request path".

pub mod adapter_store;
pub mod adapters;
pub mod attention_cache;
pub mod backend;
pub mod budget;
pub mod codec;
pub mod config;
pub mod edit;
pub mod error;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod queue;
pub mod server;
pub mod service;
pub mod watcher;
pub mod worker;
pub mod working_size;

pub use config::Args;
pub use server::{start, start_with_backend, RunningServer};

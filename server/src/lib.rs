//! rl4pix-server: the HTTP editing service.
//!
//! Layers, each with its own error type: `config` (flags) -> `http` (routes; the only place
//! errors become statuses, in `error`) -> `queue` (bounded, dynamic batching) -> `worker` (one
//! thread that owns the model) -> `backend` (the narrow trait over the model). `metrics` and
//! `openapi` describe it; `server` wires it together. See `docs/architecture.md`, "The request path".

pub mod adapters;
pub mod attention_cache;
pub mod backend;
pub mod config;
pub mod error;
pub mod http;
pub mod jobs;
pub mod metrics;
pub mod openapi;
pub mod queue;
pub mod server;
pub mod watcher;
pub mod worker;

pub use config::Args;
pub use server::{start, start_with_backend, RunningServer};

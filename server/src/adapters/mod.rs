//! The adapters the server can apply, by name (the file stem in `--adapters DIR`).
//!
//! - A request pins the version it was admitted with (an `Arc<AdapterEntry>`): replacing or
//!   removing a name never changes or fails a request already admitted, and a version is only
//!   ever swapped in whole, after validation.
//! - A file that fails validation is refused with its reason (logged, listed, named in the error
//!   a request for it gets); the previous good version of that name keeps serving.
//! - At most `--max-adapters` versions and `--max-adapter-bytes` of weights are held; past that
//!   the least recently used is unloaded and read from its (unchanged) file again when next
//!   requested. A version whose file has since changed to something refused cannot be read
//!   again, so it is never unloaded.
//!
//! Every read of the folder (start, watcher, uploads, reloads) goes through `file_lock`, so they
//!
//! The files: `registry` (the versions of every name and the least-recently-used bound),
//! `requests` (the version a request runs with), `admin` (add, remove, default, reports),
//! `files` (what may be read or written inside the folder), `names` (what a name may be),
//! `report` and `error` (what the registry tells its callers).

pub mod admin;
pub mod error;
pub mod files;
pub mod names;
pub mod registry;
mod reload_limits;
pub mod report;
mod requests;

#[cfg(test)]
mod tests;

pub use error::AdapterError;
pub use files::{adapter_name_of, FileStamp};
pub use registry::{AdapterEntry, AdapterRegistry, SyncOutcome};
pub use report::{AdapterInfo, AdapterUsage};

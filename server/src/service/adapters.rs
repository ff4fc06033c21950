//! The admin operations on adapters. The registry reads and writes files, so its work runs
//! off the async workers.

use crate::adapters::{AdapterError, AdapterInfo};

use super::state::Service;
use crate::error::ServiceError;

impl Service {
    pub fn list_adapters(&self) -> Vec<AdapterInfo> {
        self.adapters.list()
    }

    /// The largest adapter whose weights the registry keeps.
    pub fn max_adapter_bytes(&self) -> u64 {
        self.adapters.max_adapter_bytes()
    }

    /// Adding or removing needs a folder of our own (`--adapters`): not an object store's
    /// cache, not the shipped adapters. Checked before an upload's body is read; the registry
    /// checks again when it writes.
    pub fn check_adapters_folder(&self) -> Result<(), ServiceError> {
        self.adapters
            .writable_dir()
            .map(drop)
            .map_err(ServiceError::from_admin)
    }

    /// Validates `file` against the base, then writes it as the new version of `name`.
    pub async fn add_adapter_file(
        &self,
        name: String,
        file: Vec<u8>,
    ) -> Result<AdapterInfo, ServiceError> {
        let registry = self.adapters.clone();
        blocking(move || registry.add_bytes(&name, &file)).await
    }

    /// Adds the file at `path` (inside the adapters folder) under `name`.
    pub async fn add_adapter_from_path(
        &self,
        name: String,
        path: String,
    ) -> Result<AdapterInfo, ServiceError> {
        let registry = self.adapters.clone();
        blocking(move || registry.add_from_path(&name, &path)).await
    }

    /// Deletes the file and forgets the name; returns whether it was the default.
    pub async fn remove_adapter(&self, name: String) -> Result<bool, ServiceError> {
        self.check_adapters_folder()?;
        let registry = self.adapters.clone();
        blocking(move || registry.remove(&name)).await
    }

    /// Sets or clears the default adapter; a refused name is as unknown as to a request.
    pub fn set_default_adapter(&self, name: Option<&str>) -> Result<Option<String>, ServiceError> {
        Ok(self.adapters.set_default(name)?)
    }
}

/// Registry work off the async workers, its errors as the admin routes report them.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AdapterError> + Send + 'static,
) -> Result<T, ServiceError> {
    super::blocking("adapter", move || f().map_err(ServiceError::from_admin)).await
}

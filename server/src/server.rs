//! Wiring: load the backend on the worker thread, bind, serve, and shut down gracefully
//! (stop accepting, answer what is admitted, drain the queue, join the worker).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::adapter_store::{self, PollReport, StoreMirror, StorePoller};
use crate::adapters::AdapterRegistry;
use crate::backend::{Backend, BackendError, ModelBackend};
use crate::config::{default_model_dir, Args};
use crate::http::hosts::HostPolicy;
use crate::http::{router, AppState};
use crate::metrics::Metrics;
use crate::queue::Queue;
use crate::service::{Service, ServiceParts};
use crate::watcher::AdapterWatcher;
use crate::worker;

pub struct RunningServer {
    pub addr: SocketAddr,
    pub service: Arc<Service>,
    shutdown_tx: Option<oneshot::Sender<()>>,
    serve: JoinHandle<std::io::Result<()>>,
    worker: std::thread::JoinHandle<()>,
    watcher: Option<AdapterWatcher>,
    poller: Option<StorePoller>,
    // The default adapter cache of an object store; removed after the poller stops.
    _cache: Option<tempfile::TempDir>,
}

/// Checks the model folder before anything heavy, with a message that says what to do.
pub fn check_model_dir(model: &Path) -> anyhow::Result<PathBuf> {
    if model.join("model_index.json").is_file() {
        return Ok(model.to_path_buf());
    }
    let default = default_model_dir();
    if model == default {
        bail!(
            "the default model `{}` is not there (a binary built elsewhere needs a copy of model/assets in its working directory); \
             pass --model DIR (or RL4PIX_MODEL) with a diffusers InstructPix2Pix folder, e.g. --model tests/fixtures/pipelines/sd1",
            default.display()
        );
    }
    bail!(
        "--model {}: not a diffusers pipeline folder (no model_index.json there)",
        model.display()
    )
}

/// Serves the real model described by `args`.
pub async fn start(args: &Args) -> anyhow::Result<RunningServer> {
    let model = check_model_dir(&args.model)?;
    use rl4pix_model::ops::amx;
    if amx::set_matmul_precision(args.matmul_precision) != args.matmul_precision {
        bail!(
            "--matmul-precision bf16 needs a CPU with AMX (amx-tile, amx-bf16); this one has none"
        );
    }
    tracing::info!(precision = ?args.matmul_precision, "matmul precision");
    let (device, dtype) = (args.device.clone(), args.dtype.clone());
    let capture = args.attention_cache > 0;
    start_with_backend(args, move || {
        ModelBackend::load(&model, &device, &dtype, capture)
    })
    .await
}

/// Serves any backend; `factory` runs on the worker thread, which then owns the backend.
pub async fn start_with_backend<B, F>(args: &Args, factory: F) -> anyhow::Result<RunningServer>
where
    B: Backend,
    F: FnOnce() -> Result<B, BackendError> + Send + 'static,
{
    args.validate().map_err(anyhow::Error::msg)?;
    let batching = args.batching();
    let metrics = Metrics::new(batching.max_batch_size);
    let queue = Arc::new(Queue::new(batching.max_queue, metrics.clone()));
    let mut adapter_settings = args.adapter_settings();
    // An object store is mirrored into a cache folder that the registry reads like any other;
    // the first full copy is made before the model loads, so `/ready` means "adapters too".
    let (mut mirror, first_copy, cache) = open_adapter_store(args).await?;
    if let Some(mirror) = &mirror {
        adapter_settings.dir = Some(mirror.cache_dir().to_path_buf());
    }
    let adapters = Arc::new(AdapterRegistry::new(&adapter_settings).map_err(anyhow::Error::msg)?);
    if let Some(mirror) = &mirror {
        adapters.set_store(mirror.url().to_string());
    }

    // On the worker thread, right after the model: the folder is read before `/ready` says
    // ready, and the loader is then shared with the watcher and the admin routes.
    let registry = adapters.clone();
    let factory = move || {
        let backend = factory()?;
        if let Some(loader) = backend.adapter_loader() {
            registry.set_loader(loader);
        }
        registry.load_folder();
        Ok(backend)
    };
    let handle = worker::start(factory, queue.clone(), batching.clone(), metrics.clone())
        .await
        .with_context(|| format!("cannot load the model from {}", args.model.display()))?;
    let startup_error = if args.max_steps > handle.info.max_steps {
        Some(anyhow::anyhow!(
            "--max-steps {} is more than this model's schedulers accept ({})",
            args.max_steps,
            handle.info.max_steps
        ))
    } else if let Some(name) = &args.default_adapter {
        adapters
            .set_default(Some(name))
            .err()
            .map(|e| anyhow::anyhow!("--default-adapter {name}: {e}"))
    } else {
        None
    };
    if let Some(error) = startup_error {
        handle.alive.store(false, Ordering::SeqCst);
        queue.close();
        let _ = handle.thread.join();
        return Err(error);
    }
    // After the worker's first read of the folder, which forgets names without a file.
    for (name, reason) in first_copy.refused {
        adapters.refuse_unread(&name, reason);
    }
    let poller = mirror.take().map(|mirror| {
        StorePoller::start(
            mirror,
            adapters.clone(),
            Duration::from_secs_f64(args.adapter_poll_s),
        )
    });
    let watcher = match adapters.dir() {
        Some(_) if poller.is_none() => Some(
            AdapterWatcher::start(adapters.clone(), adapter_settings.debounce)
                .context("cannot start the adapters folder watcher")?,
        ),
        _ => None,
    };
    let info = handle.info;
    let (model_name, device) = (info.model.clone(), info.device.clone());
    let service = Arc::new(Service::new(ServiceParts {
        info,
        limits: args.limits(),
        batching,
        queue,
        adapters,
        attention_capacity: args.attention_cache,
        job_ttl: Duration::try_from_secs_f64(args.job_ttl_s).unwrap_or(Duration::MAX),
        max_jobs: args.max_jobs,
        input: crate::service::InputBounds {
            max_concurrent_decodes: args.max_concurrent_decodes,
            costs: args.costs(),
            max_job_bytes: args.max_job_bytes,
            attention_cache_bytes: args.attention_cache_bytes,
        },
        metrics,
        worker_alive: handle.alive,
    }));
    let state = Arc::new(AppState {
        service: service.clone(),
        api_key: args.api_key.clone(),
        openai_api_key: args.openai_api_key.clone(),
        hosts: HostPolicy::new(args.allowed_hosts.as_deref(), &args.host),
        body_timeout: args.connection_limits().body_timeout,
        // The document as this server's limits make it (issue 17: exact for clients and fuzzers).
        openapi_json: crate::openapi::json_for(&crate::openapi::DocumentLimits::of(&args.limits())),
    });
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = oneshot::channel::<()>();
    let app = router(state);
    let connection_limits = args.connection_limits();
    let serve = tokio::spawn(async move {
        // The accept loop also records each connection's peer address, which edits are
        // charged to when they send no configured key.
        crate::http::connections::serve(listener, app, connection_limits, async {
            let _ = shutdown_rx.await;
        })
        .await
    });
    tracing::info!(%addr, model = %model_name, device = %device, "serving");
    Ok(RunningServer {
        addr,
        service,
        shutdown_tx: Some(shutdown_tx),
        serve,
        worker: handle.thread,
        watcher,
        poller,
        _cache: cache,
    })
}

/// The mirror of `--adapters URL` after its first full copy (whose downloads the registry
/// reads with the folder; the refusals are returned), and the temporary cache folder it copies
/// into when `--adapter-cache` is not given.
async fn open_adapter_store(
    args: &Args,
) -> anyhow::Result<(Option<StoreMirror>, PollReport, Option<tempfile::TempDir>)> {
    let Some(url) = args
        .adapters
        .as_ref()
        .filter(|a| adapter_store::is_store_url(a))
    else {
        return Ok((None, PollReport::default(), None));
    };
    let url = url.to_string_lossy().into_owned();
    let (cache_dir, temporary) = match &args.adapter_cache {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = tempfile::Builder::new()
                .prefix("rl4pix-adapters-")
                .tempdir()
                .context("cannot create a folder for the adapters store's cache")?;
            (dir.path().to_path_buf(), Some(dir))
        }
    };
    let mut mirror =
        StoreMirror::open(&url, &cache_dir, args.max_adapter_bytes).map_err(anyhow::Error::msg)?;
    let report = mirror.poll().await;
    if let Some(failure) = report.failed.first() {
        bail!("--adapters {url}: cannot copy the store at start ({failure}); check the URL, the credentials (AWS_* variables) and that the store is reachable");
    }
    tracing::info!(
        store = %url,
        adapters = report.changed.len(),
        refused = report.refused.len(),
        cache = %cache_dir.display(),
        "adapters store copied"
    );
    Ok((Some(mirror), report, temporary))
}

impl RunningServer {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets admitted requests finish, then stops the worker.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        self.service.begin_shutdown();
        drop(self.watcher.take());
        drop(self.poller.take());
        if let Some(tx) = self.shutdown_tx.take() {
            let _ = tx.send(());
        }
        let served = self.serve.await;
        self.service.close_queue();
        let worker = self.worker;
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .context("joining the worker")?
            .map_err(|_| anyhow::anyhow!("the worker thread panicked"))?;
        served.context("the HTTP task failed")??;
        Ok(())
    }
}

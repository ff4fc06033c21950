//! Command-line flags (each also read from an `RL4PIX_*` environment variable) and the limits
//! derived from them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::working_size::SizeMode;

/// Where the embedded default model lives: the model crate's folder (found from where it was
/// built, so the binary works from any directory), else `model/assets/toy` under the working
/// directory (a binary copied next to a copy of `model/assets`, as in the container image).
pub fn default_model_dir() -> PathBuf {
    rl4pix_model::default_model_dir().unwrap_or_else(|_| PathBuf::from("model/assets/toy"))
}

/// The adapters shipped beside the embedded default model (`model/assets/adapters`), when
/// `model` is that model's folder (however the path is spelled) and they are there.
fn shipped_adapters_for(model: &std::path::Path) -> Option<PathBuf> {
    let model = model.canonicalize().ok()?;
    if model != default_model_dir().canonicalize().ok()? {
        return None;
    }
    let dir = model.parent()?.join("adapters");
    let name = rl4pix_model::SHIPPED_DEFAULT_ADAPTER;
    dir.join(format!("{name}.safetensors"))
        .is_file()
        .then_some(dir)
}

/// Guidance scales above these are never useful and only make the sampler diverge.
pub const MAX_GUIDANCE_SCALE: f64 = 50.0;
pub const MAX_IMAGE_GUIDANCE_SCALE: f64 = 20.0;
/// Adapter names are file stems: short, and no path separators.
pub const MAX_ADAPTER_NAME_CHARS: usize = 64;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "rl4pix-server",
    version,
    about = "Instruction-based image editing over HTTP (InstructPix2Pix on Candle)"
)]
pub struct Args {
    /// Model folder in the diffusers InstructPix2Pix layout.
    #[arg(long, env = "RL4PIX_MODEL", default_value_os_t = default_model_dir())]
    pub model: PathBuf,
    /// Folder of LoRA adapters (`*.safetensors`, name = file stem), loaded at start and
    /// watched: new, replaced and removed files are picked up while serving. Or an object
    /// store every replica reads (`s3://bucket/prefix`, `file:///folder`, `gs://bucket/prefix`
    /// with the `gcs` feature), polled every `--adapter-poll-s`. With the embedded default
    /// model and no flag: the shipped `model/assets/adapters`, read-only.
    #[arg(long, env = "RL4PIX_ADAPTERS")]
    pub adapters: Option<PathBuf>,
    /// With an object store: seconds between listings of it.
    #[arg(long, env = "RL4PIX_ADAPTER_POLL_S", default_value_t = 10.0)]
    pub adapter_poll_s: f64,
    /// With an object store: the local folder its adapters are downloaded to (default: a
    /// temporary folder removed at exit).
    #[arg(long, env = "RL4PIX_ADAPTER_CACHE")]
    pub adapter_cache: Option<PathBuf>,
    /// Set by [`Args::with_shipped_adapters`]: `adapters` is the shipped folder, which the admin
    /// routes must not write to.
    #[arg(skip)]
    pub shipped_adapters: bool,
    /// Adapter applied when a request names none (`adapter=none` still asks for the base);
    /// changeable at run time with `PUT /adapters/default`. `none`: the base model. With the
    /// embedded default model and no `--adapters`, the shipped `toy-rl`.
    #[arg(long, env = "RL4PIX_DEFAULT_ADAPTER")]
    pub default_adapter: Option<String>,
    /// Adapters whose weights are kept in memory; past it the least recently used is unloaded
    /// (and read from its file again when next requested).
    #[arg(long, env = "RL4PIX_MAX_ADAPTERS", default_value_t = 16)]
    pub max_adapters: usize,
    /// Bytes of adapter weights kept in memory (same policy); also the largest upload.
    #[arg(long, env = "RL4PIX_MAX_ADAPTER_BYTES", default_value_t = 1 << 30)]
    pub max_adapter_bytes: u64,
    /// How long an adapter file must stay unchanged before it is (re)loaded.
    #[arg(long, env = "RL4PIX_ADAPTER_DEBOUNCE_MS", default_value_t = 300)]
    pub adapter_debounce_ms: u64,
    // ---- adapter reloads under abuse (issue 17) ----
    /// Reads of unloaded adapters that requests may cause per minute (a token bucket); past
    /// it, a request for an unloaded adapter gets 503 with Retry-After instead of a reload.
    #[arg(long, env = "RL4PIX_ADAPTER_RELOADS_PER_MIN", default_value_t = 60)]
    pub adapter_reloads_per_min: u32,
    /// An adapter a request used within this many seconds (and the default adapter, and any a
    /// request is running with) is never unloaded to make room for a request's reload; such a
    /// reload gets 503 with Retry-After instead. 0: plain least-recently-used.
    #[arg(long, env = "RL4PIX_ADAPTER_MIN_RESIDENT_S", default_value_t = 30.0)]
    pub adapter_min_resident_s: f64,
    #[arg(long, env = "RL4PIX_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// 0 picks a free port (the address is printed on stdout).
    #[arg(long, env = "RL4PIX_PORT", default_value_t = 8080)]
    pub port: u16,
    /// `cpu` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, env = "RL4PIX_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weights' dtype: f32, or f16 / bf16 on CUDA.
    #[arg(long, env = "RL4PIX_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// The CPU kernels' matrix products: `f32` (diffusers' numerics), or `bf16` (inputs rounded
    /// to bf16, f32 accumulation, on the AMX tile unit of recent Xeons: several times faster,
    /// within the tolerance docs/performance.md states). bf16 on a CPU without AMX is refused.
    #[arg(long, env = "RL4PIX_MATMUL_PRECISION", default_value = "f32")]
    pub matmul_precision: rl4pix_model::ops::amx::MatmulPrecision,
    #[arg(long, env = "RL4PIX_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for companions.
    #[arg(long, env = "RL4PIX_MAX_BATCH_WAIT_MS", default_value_t = 5)]
    pub max_batch_wait_ms: u64,
    /// Requests waiting for the worker beyond this are refused with 429.
    #[arg(long, env = "RL4PIX_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    #[arg(long, env = "RL4PIX_MAX_BODY_BYTES", default_value_t = 20 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Largest width x height accepted, read from the image header before decoding.
    #[arg(long, env = "RL4PIX_MAX_PIXELS", default_value_t = 1024 * 1024)]
    pub max_pixels: u64,
    #[arg(long, env = "RL4PIX_MAX_STEPS", default_value_t = 100)]
    pub max_steps: usize,
    /// Steps when a request gives none.
    #[arg(long, env = "RL4PIX_DEFAULT_STEPS", default_value_t = 20)]
    pub default_steps: usize,
    #[arg(long, env = "RL4PIX_MAX_INSTRUCTION_CHARS", default_value_t = 1000)]
    pub max_instruction_chars: usize,
    /// From arrival to answer; past it the request gets 504 and its work is dropped.
    #[arg(long, env = "RL4PIX_REQUEST_TIMEOUT_S", default_value_t = 300.0)]
    pub request_timeout_s: f64,
    /// On SIGTERM, seconds `/ready` answers 503 while requests are still admitted, before the
    /// listener closes: load balancers that poll `/ready` stop sending first. (On Kubernetes
    /// the pod's preStop sleep plays this part.)
    #[arg(long, env = "RL4PIX_SHUTDOWN_DRAIN_S", default_value_t = 0.0)]
    pub shutdown_drain_s: f64,
    /// Bearer token of the admin routes; without it they are closed (401).
    #[arg(long, env = "RL4PIX_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Bearer token the OpenAI-compatible `/v1` routes need; without it they take any.
    #[arg(long, env = "RL4PIX_OPENAI_API_KEY", hide_env_values = true)]
    pub openai_api_key: Option<String>,
    /// Recent edits whose attention maps are kept for `/attention`; 0 turns capture off.
    #[arg(long, env = "RL4PIX_ATTENTION_CACHE", default_value_t = 64)]
    pub attention_cache: usize,
    /// Seconds a finished async job (`Prefer: respond-async`) and its result are kept.
    #[arg(long, env = "RL4PIX_JOB_TTL_S", default_value_t = 600.0)]
    pub job_ttl_s: f64,
    /// Finished async jobs kept at most; the oldest finished are evicted first.
    #[arg(long, env = "RL4PIX_MAX_JOBS", default_value_t = 1000)]
    pub max_jobs: usize,
    /// Where edits run by default: `model` (the model's recorded working size, the result scaled
    /// back to the picture's size) or `input` (the picture's own size); a request's
    /// `working_size` overrides it.
    #[arg(long, env = "RL4PIX_WORKING_SIZE", value_enum, default_value_t = SizeMode::Model)]
    pub working_size: SizeMode,
    // --- Limits and hardening: input decoding and cost (issue 17) ---
    /// Images decoded at once (each on a blocking thread); further requests wait their turn
    /// before their image is inflated.
    #[arg(long, env = "RL4PIX_MAX_CONCURRENT_DECODES", default_value_t = 2)]
    pub max_concurrent_decodes: usize,
    /// Most an edit may cost, in pixel-steps: steps x the pixels the model runs at (after the
    /// working size and the VAE grid). Default: --max-pixels x --max-steps.
    #[arg(long, env = "RL4PIX_MAX_EDIT_COST")]
    pub max_edit_cost: Option<u64>,
    /// Pixel-steps of all admitted, unfinished edits together; past it edits get 429.
    /// Default: 4 x the largest edit's cost.
    #[arg(long, env = "RL4PIX_MAX_QUEUED_COST")]
    pub max_queued_cost: Option<u64>,
    /// Share of --max-queued-cost one client may hold (a client: the configured API key it
    /// sends, else its IP address).
    #[arg(long, env = "RL4PIX_MAX_CLIENT_SHARE", default_value_t = 0.5)]
    pub max_client_share: f64,
    /// Bytes of encoded results the finished async jobs may hold together; the oldest
    /// finished are evicted first.
    #[arg(long, env = "RL4PIX_MAX_JOB_BYTES", default_value_t = 256 << 20)]
    pub max_job_bytes: u64,
    /// Bytes the attention cache may hold (inputs and maps); the oldest edit is evicted first.
    #[arg(long, env = "RL4PIX_ATTENTION_CACHE_BYTES", default_value_t = 64 << 20)]
    pub attention_cache_bytes: u64,
    // --- end of input decoding and cost ---
    // --- Limits and hardening: connections and HTTP (docs/server.md) ---
    /// Seconds a connection may take to send a request head (the request line and headers);
    /// the same timer runs while a kept-alive connection waits for its next request.
    #[arg(long, env = "RL4PIX_HEADER_TIMEOUT_S", default_value_t = 10.0)]
    pub header_timeout_s: f64,
    /// Seconds from a request's head to the last byte of its body; a slower body gets 408.
    #[arg(long, env = "RL4PIX_BODY_TIMEOUT_S", default_value_t = 60.0)]
    pub body_timeout_s: f64,
    /// Open connections at most; one more is answered 503 and closed at once.
    #[arg(long, env = "RL4PIX_MAX_CONNECTIONS", default_value_t = 512)]
    pub max_connections: usize,
    /// On shutdown, seconds the open connections get to finish; the rest are then dropped.
    #[arg(long, env = "RL4PIX_SHUTDOWN_DEADLINE_S", default_value_t = 30.0)]
    pub shutdown_deadline_s: f64,
    /// Host header values accepted (names or addresses, any port; `*`: any), comma-separated.
    /// Default: bound to a loopback address, only localhost, 127.0.0.1 and [::1]; else any.
    #[arg(long, env = "RL4PIX_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Option<Vec<String>>,
    // --- end of connections and HTTP ---
    /// Print the OpenAPI document and exit.
    #[arg(long)]
    pub print_openapi: bool,
}

impl Args {
    /// Rejects settings that cannot work, before anything is loaded.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--max-batch-size", self.max_batch_size),
            ("--max-queue", self.max_queue),
            ("--max-body-bytes", self.max_body_bytes),
            ("--max-steps", self.max_steps),
            ("--default-steps", self.default_steps),
            ("--max-instruction-chars", self.max_instruction_chars),
            ("--max-jobs", self.max_jobs),
        ];
        for (flag, value) in positive {
            if value == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.max_adapters == 0 {
            return Err("--max-adapters must be at least 1".into());
        }
        if self.max_adapter_bytes == 0 {
            return Err("--max-adapter-bytes must be at least 1".into());
        }
        if self.default_adapter.is_some() && self.adapters.is_none() {
            return Err("--default-adapter needs --adapters DIR or URL".into());
        }
        if self.adapter_reloads_per_min == 0 {
            return Err("--adapter-reloads-per-min must be at least 1".into());
        }
        if !(self.adapter_min_resident_s.is_finite() && self.adapter_min_resident_s >= 0.0) {
            return Err(
                "--adapter-min-resident-s must be zero or a positive number of seconds".into(),
            );
        }
        if !(self.adapter_poll_s.is_finite() && self.adapter_poll_s > 0.0) {
            return Err("--adapter-poll-s must be a positive number of seconds".into());
        }
        if self.max_pixels == 0 {
            return Err("--max-pixels must be at least 1".into());
        }
        if self.default_steps > self.max_steps {
            return Err(format!(
                "--default-steps {} exceeds --max-steps {}",
                self.default_steps, self.max_steps
            ));
        }
        if !(self.request_timeout_s.is_finite() && self.request_timeout_s > 0.0) {
            return Err("--request-timeout-s must be a positive number of seconds".into());
        }
        if !(self.shutdown_drain_s.is_finite() && self.shutdown_drain_s >= 0.0) {
            return Err("--shutdown-drain-s must be zero or a positive number of seconds".into());
        }
        if !(self.job_ttl_s.is_finite() && self.job_ttl_s > 0.0) {
            return Err("--job-ttl-s must be a positive number of seconds".into());
        }
        self.validate_cost_limits()?;
        self.validate_connections()
    }

    /// The connection and HTTP settings (timeouts, cap, keys, hosts).
    fn validate_connections(&self) -> Result<(), String> {
        for (flag, seconds) in [
            ("--header-timeout-s", self.header_timeout_s),
            ("--body-timeout-s", self.body_timeout_s),
            ("--shutdown-deadline-s", self.shutdown_deadline_s),
        ] {
            if !(seconds.is_finite() && seconds > 0.0 && seconds <= 86_400.0) {
                return Err(format!(
                    "{flag} must be a positive number of seconds (at most a day)"
                ));
            }
        }
        if self.max_connections == 0 {
            return Err("--max-connections must be at least 1".into());
        }
        for (flag, key) in [
            ("--api-key (RL4PIX_API_KEY)", &self.api_key),
            (
                "--openai-api-key (RL4PIX_OPENAI_API_KEY)",
                &self.openai_api_key,
            ),
        ] {
            if key.as_deref().is_some_and(|k| k.trim().is_empty()) {
                return Err(format!("{flag} is set but empty: give a key, or unset it"));
            }
        }
        if let Some(hosts) = &self.allowed_hosts {
            if hosts.iter().any(|h| h.trim().is_empty()) {
                return Err("--allowed-hosts has an empty entry".into());
            }
        }
        Ok(())
    }

    /// Input decoding and cost limits (issue 17).
    fn validate_cost_limits(&self) -> Result<(), String> {
        if self.max_concurrent_decodes == 0 {
            return Err("--max-concurrent-decodes must be at least 1".into());
        }
        if self.max_job_bytes == 0 {
            return Err("--max-job-bytes must be at least 1".into());
        }
        if !(self.max_client_share.is_finite()
            && self.max_client_share > 0.0
            && self.max_client_share <= 1.0)
        {
            return Err("--max-client-share must be in (0, 1]".into());
        }
        let costs = self.costs();
        if costs.max_edit_cost == 0 {
            return Err("--max-edit-cost must be at least 1".into());
        }
        if costs.max_client_cost < costs.max_edit_cost {
            return Err(format!(
                "--max-queued-cost {} x --max-client-share {} = {} is less than one edit's most ({}, --max-edit-cost): no edit could ever be admitted",
                costs.max_queued_cost, self.max_client_share, costs.max_client_cost, costs.max_edit_cost
            ));
        }
        Ok(())
    }

    /// The cost budget's bounds, defaults filled in.
    pub fn costs(&self) -> CostLimits {
        let max_edit_cost = self
            .max_edit_cost
            .unwrap_or_else(|| self.max_pixels.saturating_mul(self.max_steps as u64));
        let max_queued_cost = self
            .max_queued_cost
            .unwrap_or_else(|| max_edit_cost.saturating_mul(4));
        CostLimits {
            max_edit_cost,
            max_queued_cost,
            max_client_cost: (max_queued_cost as f64 * self.max_client_share).floor() as u64,
        }
    }

    pub fn limits(&self) -> Limits {
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_pixels: self.max_pixels,
            max_steps: self.max_steps,
            default_steps: self.default_steps,
            max_instruction_chars: self.max_instruction_chars,
            max_guidance_scale: MAX_GUIDANCE_SCALE,
            max_image_guidance_scale: MAX_IMAGE_GUIDANCE_SCALE,
            max_adapter_name_chars: MAX_ADAPTER_NAME_CHARS,
            request_timeout_s: self.request_timeout_s,
            working_size: self.working_size,
        }
    }

    pub fn adapter_settings(&self) -> AdapterSettings {
        AdapterSettings {
            dir: self.adapters.clone(),
            read_only: self.shipped_adapters,
            max_adapters: self.max_adapters,
            max_adapter_bytes: self.max_adapter_bytes,
            debounce: Duration::from_millis(self.adapter_debounce_ms),
            reloads_per_min: self.adapter_reloads_per_min,
            min_resident: Duration::from_secs_f64(self.adapter_min_resident_s),
        }
    }

    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs_f64(self.header_timeout_s),
            body_timeout: Duration::from_secs_f64(self.body_timeout_s),
            max_connections: self.max_connections,
            shutdown_deadline: Duration::from_secs_f64(self.shutdown_deadline_s),
        }
    }

    pub fn batching(&self) -> BatchingConfig {
        BatchingConfig {
            max_batch_size: self.max_batch_size,
            max_batch_wait_ms: self.max_batch_wait_ms,
            max_queue: self.max_queue,
        }
    }

    /// The command line's meaning of what it leaves out: the embedded default model comes with
    /// its shipped adapters (read-only) and serves the RL-fine-tuned `toy-rl` unless
    /// `--default-adapter` says otherwise; `--default-adapter none` is the base model. Any
    /// `--adapters` or another `--model` leaves all of this out.
    pub fn with_shipped_adapters(mut self) -> Self {
        if self.adapters.is_none() {
            if let Some(dir) = shipped_adapters_for(&self.model) {
                self.adapters = Some(dir);
                self.shipped_adapters = true;
                if self.default_adapter.is_none() {
                    self.default_adapter = Some(rl4pix_model::SHIPPED_DEFAULT_ADAPTER.into());
                }
            }
        }
        if self.default_adapter.as_deref() == Some("none") {
            self.default_adapter = None;
        }
        self
    }

    /// Defaults for tests and the benchmark: the given model, a free port on loopback.
    pub fn for_model(model: impl Into<PathBuf>) -> Self {
        let mut args = Self::parse_from(["rl4pix-server"]);
        args.model = model.into();
        args.port = 0;
        args
    }
}

/// What a request may ask for; checked before any decoding or model work.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_pixels: u64,
    pub max_steps: usize,
    pub default_steps: usize,
    pub max_instruction_chars: usize,
    pub max_guidance_scale: f64,
    pub max_image_guidance_scale: f64,
    pub max_adapter_name_chars: usize,
    pub request_timeout_s: f64,
    /// Where an edit runs when the request does not say (`--working-size`).
    pub working_size: SizeMode,
}

impl Limits {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_s)
    }
}

#[derive(Debug, Clone)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_batch_wait_ms: u64,
    pub max_queue: usize,
}

impl BatchingConfig {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_batch_wait_ms)
    }
}

/// The adapter registry's folder and its bounds on what it keeps in memory.
#[derive(Debug, Clone)]
pub struct AdapterSettings {
    pub dir: Option<PathBuf>,
    /// The shipped adapters: served, watched, never written or deleted by the admin routes.
    pub read_only: bool,
    pub max_adapters: usize,
    pub max_adapter_bytes: u64,
    pub debounce: Duration,
    /// Reloads requests may cause per minute (`--adapter-reloads-per-min`).
    pub reloads_per_min: u32,
    /// Versions used this recently are not unloaded for a request's reload.
    pub min_resident: Duration,
}

/// Bounds on what edits may cost, in pixel-steps (steps x working pixels).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostLimits {
    /// One edit.
    pub max_edit_cost: u64,
    /// All admitted, unfinished edits.
    pub max_queued_cost: u64,
    /// What one client's admitted, unfinished edits may hold.
    pub max_client_cost: u64,
}

/// How long connections may take and how many may be open (`--header-timeout-s` ...).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub max_connections: usize,
    pub shutdown_deadline: Duration,
}

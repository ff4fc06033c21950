//! Command-line flags (each also read from an `RL4PIX_*` environment variable) and the limits
//! derived from them.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::working_size::SizeMode;

/// Where the embedded default model lives: relative to the working directory (the repository
/// root, or the image's working directory). The one place the server decides this; the model
/// crate's own default-folder function can replace the body.
pub fn default_model_dir() -> PathBuf {
    PathBuf::from("model/assets/toy")
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
    /// with the `gcs` feature), polled every `--adapter-poll-s`.
    #[arg(long, env = "RL4PIX_ADAPTERS")]
    pub adapters: Option<PathBuf>,
    /// With an object store: seconds between listings of it.
    #[arg(long, env = "RL4PIX_ADAPTER_POLL_S", default_value_t = 10.0)]
    pub adapter_poll_s: f64,
    /// With an object store: the local folder its adapters are downloaded to (default: a
    /// temporary folder removed at exit).
    #[arg(long, env = "RL4PIX_ADAPTER_CACHE")]
    pub adapter_cache: Option<PathBuf>,
    /// Adapter applied when a request names none (`adapter=none` still asks for the base);
    /// changeable at run time with `PUT /adapters/default`.
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
        Ok(())
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
            max_adapters: self.max_adapters,
            max_adapter_bytes: self.max_adapter_bytes,
            debounce: Duration::from_millis(self.adapter_debounce_ms),
            reloads_per_min: self.adapter_reloads_per_min,
            min_resident: Duration::from_secs_f64(self.adapter_min_resident_s),
        }
    }

    pub fn batching(&self) -> BatchingConfig {
        BatchingConfig {
            max_batch_size: self.max_batch_size,
            max_batch_wait_ms: self.max_batch_wait_ms,
            max_queue: self.max_queue,
        }
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
    pub max_adapters: usize,
    pub max_adapter_bytes: u64,
    pub debounce: Duration,
    /// Reloads requests may cause per minute (`--adapter-reloads-per-min`).
    pub reloads_per_min: u32,
    /// Versions used this recently are not unloaded for a request's reload.
    pub min_resident: Duration,
}

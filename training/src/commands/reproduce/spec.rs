//! The parameters that identify what `reproduce` made: a synthetic set and the evaluation
//! sampler. The caches compare them to decide what to keep; the tables print them.

use serde::{Deserialize, Serialize};

use super::EvalSampler;

/// What one synthetic folder holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthSpec {
    pub seed: u64,
    pub count: u64,
    pub size: u32,
}

/// The sampler every row of a table is evaluated with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplerSpec {
    pub kind: EvalSampler,
    /// `None`: the model's own scheduler.
    pub scheduler: Option<String>,
    pub eta: f64,
    pub steps: Option<usize>,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    pub seed: u64,
}

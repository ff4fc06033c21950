//! The trainer's view of the crate's one AdamW ([`crate::optim`]): the same optimizer, with its
//! errors in DDPO's terms (a non-finite gradient norm stops training and names the last good
//! checkpoint; bad saved moments are a checkpoint error).

use std::collections::HashMap;

use candle_core::Tensor;

pub use crate::optim::AdamWParams;
use crate::optim::OptimError;

use super::{DdpoError, Result};

pub struct AdamW(crate::optim::AdamW);

impl From<OptimError> for DdpoError {
    fn from(e: OptimError) -> Self {
        match e {
            e @ OptimError::NonFiniteGradient { .. } => DdpoError::NonFinite {
                what: e.to_string(),
                epoch: 0,
                last_checkpoint: None,
            },
            OptimError::State(message) => DdpoError::Checkpoint {
                path: Default::default(),
                message,
            },
            OptimError::Candle(e) => DdpoError::Candle(e),
        }
    }
}

impl AdamW {
    pub fn new(named_vars: Vec<(String, candle_core::Var)>, params: AdamWParams) -> Result<Self> {
        Ok(Self(crate::optim::AdamW::new(named_vars, params)?))
    }

    pub fn params(&self) -> AdamWParams {
        self.0.params()
    }

    pub fn steps_taken(&self) -> usize {
        self.0.steps_taken()
    }

    /// See [`crate::optim::AdamW::step`].
    pub fn step(&mut self, grads: &[Option<Tensor>], max_norm: f64) -> Result<f64> {
        Ok(self.0.step(grads, Some(max_norm))?)
    }

    /// Moments keyed `m.<name>` / `v.<name>`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        self.0.state()
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        Ok(self.0.load_state(state, step)?)
    }
}

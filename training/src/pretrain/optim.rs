//! AdamW whose moments can be saved and restored (candle_nn's keeps them private, so a resumed
//! run would restart its moment estimates), global-norm gradient clipping, and EMA weights.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{PretrainError, Result};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

struct Slot {
    name: String,
    var: Var,
    first_moment: Tensor,
    second_moment: Tensor,
    /// Norm and bias parameters are not decayed.
    decay: bool,
}

pub struct AdamW {
    params: AdamWParams,
    slots: Vec<Slot>,
    step: usize,
}

impl AdamW {
    /// `vars`: (name, variable) pairs; the names key the saved state.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let slots = vars
            .into_iter()
            .map(|(name, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                let decay = var.rank() >= 2;
                Ok(Slot {
                    name,
                    first_moment: zeros.clone(),
                    second_moment: zeros,
                    var,
                    decay,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            params,
            slots,
            step: 0,
        })
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// Global L2 norm of the gradients of the optimised variables.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0f64;
        for slot in &self.slots {
            if let Some(g) = grads.get(slot.var.as_tensor()) {
                total += g.detach().sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        Ok(total.sqrt())
    }

    /// One update; gradients are scaled down so their global norm is at most `max_norm`.
    /// Returns the norm before clipping.
    pub fn step(&mut self, grads: &GradStore, max_norm: Option<f64>) -> Result<f64> {
        let norm = self.grad_norm(grads)?;
        if !norm.is_finite() {
            return Err(PretrainError::Config(format!(
                "gradient norm is {norm} at step {}: training diverged (lower the learning rate)",
                self.step
            )));
        }
        let clip = match max_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let p = self.params;
        let bias1 = 1.0 - p.beta1.powi(self.step as i32);
        let bias2 = 1.0 - p.beta2.powi(self.step as i32);
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            // Gradients carry the step's autograd graph; detached moments must not keep it alive.
            let g = (g.detach() * clip)?;
            slot.first_moment = ((&slot.first_moment * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            slot.second_moment =
                ((&slot.second_moment * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&slot.first_moment / bias1)?
                / ((&slot.second_moment / bias2)?.sqrt()? + p.eps)?)?;
            let decay = if slot.decay {
                1.0 - p.lr * p.weight_decay
            } else {
                1.0
            };
            slot.first_moment = slot.first_moment.detach();
            slot.second_moment = slot.second_moment.detach();
            let next = ((slot.var.as_tensor().detach() * decay)? - (update * p.lr)?)?;
            slot.var.set(&next)?;
        }
        Ok(norm)
    }

    /// Moments keyed `m.<name>` / `v.<name>`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::with_capacity(2 * self.slots.len());
        for slot in &self.slots {
            out.insert(format!("m.{}", slot.name), slot.first_moment.clone());
            out.insert(format!("v.{}", slot.name), slot.second_moment.clone());
        }
        out
    }

    /// Restores moments saved by [`AdamW::state`] after `step` updates; every slot must be present
    /// with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for slot in &mut self.slots {
            for (key, target) in [
                (format!("m.{}", slot.name), &mut slot.first_moment),
                (format!("v.{}", slot.name), &mut slot.second_moment),
            ] {
                let saved = state.get(&key).ok_or_else(|| {
                    PretrainError::Config(format!("optimizer state has no tensor `{key}`"))
                })?;
                if saved.dims() != target.dims() {
                    return Err(PretrainError::Config(format!(
                        "optimizer state `{key}` has shape {:?}, the model needs {:?}",
                        saved.dims(),
                        target.dims()
                    )));
                }
                *target = saved.to_device(target.device())?.to_dtype(target.dtype())?;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Exponential moving average of the weights, with the usual warm-up of the decay
/// (min(decay, (1 + n) / (10 + n))) so early averages are not dominated by the random init.
pub struct Ema {
    decay: f64,
    shadow: Vec<(String, Var, Tensor)>,
}

impl Ema {
    pub fn new(vars: &[(String, Var)], decay: f64) -> Result<Self> {
        let shadow = vars
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.clone(), var.as_tensor().detach().copy()?)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { decay, shadow })
    }

    pub fn update(&mut self, step: usize) -> Result<()> {
        let n = step as f64;
        let decay = self.decay.min((1.0 + n) / (10.0 + n));
        for (_, var, avg) in &mut self.shadow {
            *avg = ((&*avg * decay)? + (var.as_tensor().detach() * (1.0 - decay))?)?.detach();
        }
        Ok(())
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.shadow
            .iter()
            .map(|(name, _, avg)| (name.clone(), avg.clone()))
            .collect()
    }

    pub fn load(&mut self, saved: &HashMap<String, Tensor>) -> Result<()> {
        for (name, _, avg) in &mut self.shadow {
            let tensor = saved.get(name).ok_or_else(|| {
                PretrainError::Config(format!("EMA weights have no tensor `{name}`"))
            })?;
            if tensor.dims() != avg.dims() {
                return Err(PretrainError::Config(format!(
                    "EMA tensor `{name}` has shape {:?}, the model needs {:?}",
                    tensor.dims(),
                    avg.dims()
                )));
            }
            *avg = tensor.to_dtype(avg.dtype())?;
        }
        Ok(())
    }
}

/// The (name, variable) pairs of a VarMap, sorted by name so the order is stable.
pub fn named_vars(varmap: &candle_nn::VarMap) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    let mut vars: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

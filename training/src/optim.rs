//! The optimizer every training loop here uses: AdamW with the update rule of `candle_nn::AdamW`
//! (and PyTorch's), whose moments can be saved and restored (candle_nn keeps them private, so a
//! resumed run would restart its moment estimates), global-norm gradient clipping as
//! `clip_grad_norm_`, and EMA weights.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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

impl AdamWParams {
    /// The defaults with learning rate `lr`.
    pub fn with_lr(lr: f64) -> Self {
        Self {
            lr,
            ..Self::default()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// The gradients' global norm is NaN or infinite; nothing was updated. `step` is the
    /// number of updates taken before.
    #[error("gradient norm ({norm}) at optimizer step {}", step + 1)]
    NonFiniteGradient { norm: f64, step: usize },

    /// Saved state (moments or EMA weights) that does not fit the variables.
    #[error("{0}")]
    State(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, OptimError>;

struct Slot {
    name: String,
    var: Var,
    first_moment: Tensor,
    second_moment: Tensor,
    /// Vectors (norm scales, biases) are not decayed, matrices and kernels are.
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

    pub fn params(&self) -> AdamWParams {
        self.params
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// The gradients of the optimised variables in a backward pass's store, in their order.
    pub fn gradients_in(&self, grads: &GradStore) -> Vec<Option<Tensor>> {
        self.slots
            .iter()
            .map(|slot| grads.get(slot.var.as_tensor()).cloned())
            .collect()
    }

    /// One update from `grads` (one per variable, in the order given to `new`; `None` = no
    /// gradient this step), after scaling them to a global L2 norm of at most `max_norm`
    /// (`None` or infinity: no clipping). Returns the norm before clipping; a non-finite norm
    /// is an error and nothing is updated.
    pub fn step(&mut self, grads: &[Option<Tensor>], max_norm: Option<f64>) -> Result<f64> {
        let norm = global_norm(grads)?;
        if !norm.is_finite() {
            return Err(OptimError::NonFiniteGradient {
                norm,
                step: self.step,
            });
        }
        let clip = match max_norm {
            Some(max) if norm > max => max / (norm + 1e-6),
            _ => 1.0,
        };
        self.step += 1;
        let p = self.params;
        let bias1 = 1.0 - p.beta1.powi(self.step as i32);
        let bias2 = 1.0 - p.beta2.powi(self.step as i32);
        for (slot, grad) in self.slots.iter_mut().zip(grads) {
            let Some(g) = grad else { continue };
            // Gradients carry the step's autograd graph; detached moments must not keep it alive.
            let g = (g.detach() * clip)?;
            let m = ((&slot.first_moment * p.beta1)? + (&g * (1.0 - p.beta1))?)?.detach();
            let v = ((&slot.second_moment * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?.detach();
            let update = ((&m / bias1)? / ((&v / bias2)?.sqrt()? + p.eps)?)?;
            let decay = if slot.decay {
                1.0 - p.lr * p.weight_decay
            } else {
                1.0
            };
            let next = ((slot.var.as_tensor().detach() * decay)? - (update * p.lr)?)?;
            slot.var.set(&next)?;
            slot.first_moment = m;
            slot.second_moment = v;
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

    /// Restores moments saved by [`AdamW::state`] after `step` updates; every variable's must be
    /// present with its shape.
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for slot in &mut self.slots {
            for (key, target) in [
                (format!("m.{}", slot.name), &mut slot.first_moment),
                (format!("v.{}", slot.name), &mut slot.second_moment),
            ] {
                let saved = state.get(&key).ok_or_else(|| {
                    OptimError::State(format!("optimizer state has no tensor `{key}`"))
                })?;
                if saved.dims() != target.dims() {
                    return Err(OptimError::State(format!(
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

/// Global L2 norm over all gradients (f64 accumulation).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.iter().flatten() {
        total += g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(total.sqrt())
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
            let tensor = saved
                .get(name)
                .ok_or_else(|| OptimError::State(format!("EMA weights have no tensor `{name}`")))?;
            if tensor.dims() != avg.dims() {
                return Err(OptimError::State(format!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_nn_adamw_and_clips() -> Result<()> {
        use candle_nn::Optimizer;
        let dev = Device::Cpu;
        let init = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.25]], &dev)?;
        let ours_var = Var::from_tensor(&init)?;
        let theirs_var = Var::from_tensor(&init)?;
        let params = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        };
        let mut ours = AdamW::new(vec![("w".into(), ours_var.clone())], params)?;
        let mut theirs = candle_nn::AdamW::new(
            vec![theirs_var.clone()],
            candle_nn::ParamsAdamW {
                lr: 0.1,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 1e-2,
            },
        )?;
        for k in 0..3 {
            let loss = (theirs_var.as_tensor().sqr()?.sum_all()? * (k + 1) as f64)?;
            let grads = loss.backward()?;
            let g = grads.get(theirs_var.as_tensor()).unwrap().clone();
            theirs.step(&grads)?;
            let ours_grads =
                (ours_var.as_tensor().sqr()?.sum_all()? * (k + 1) as f64)?.backward()?;
            let g_ours = ours.gradients_in(&ours_grads);
            assert_eq!(
                g.to_vec2::<f32>()?,
                g_ours[0].as_ref().unwrap().to_vec2::<f32>()?
            );
            ours.step(&g_ours, None)?;
        }
        let a = ours_var.as_tensor().to_vec2::<f32>()?;
        let b = theirs_var.as_tensor().to_vec2::<f32>()?;
        for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
            assert!((x - y).abs() < 1e-6, "{a:?} vs {b:?}");
        }

        // Clipping: a gradient of norm 5 is scaled to norm 1 before the moments see it.
        let var = Var::from_tensor(&Tensor::zeros(2, candle_core::DType::F32, &dev)?)?;
        let mut opt = AdamW::new(vec![("v".into(), var)], params)?;
        let g = Tensor::new(&[3.0f32, 4.0], &dev)?;
        assert!((opt.step(&[Some(g)], Some(1.0))? - 5.0).abs() < 1e-9);
        let m = opt.state()["m.v"].to_vec1::<f32>()?;
        assert!(
            (m[0] - 0.1 * 0.6).abs() < 1e-6 && (m[1] - 0.1 * 0.8).abs() < 1e-6,
            "{m:?}"
        );
        let nan = Tensor::new(&[f32::NAN, 0.0], &dev)?;
        let err = opt.step(&[Some(nan)], Some(1.0)).unwrap_err();
        assert!(
            matches!(err, OptimError::NonFiniteGradient { step: 1, .. }),
            "{err}"
        );
        assert_eq!(opt.steps_taken(), 1);
        Ok(())
    }

    #[test]
    fn saved_state_restores_and_checks_shapes() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[[1f32, 2.0]], &dev)?)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], AdamWParams::default())?;
        opt.step(&[Some(Tensor::new(&[[0.5f32, -0.5]], &dev)?)], None)?;
        let saved = opt.state();
        let mut other = AdamW::new(vec![("w".into(), var)], AdamWParams::default())?;
        other.load_state(&saved, 1)?;
        assert_eq!(other.steps_taken(), 1);
        assert_eq!(
            other.state()["m.w"].to_vec2::<f32>()?,
            saved["m.w"].to_vec2::<f32>()?
        );
        let wrong = Var::from_tensor(&Tensor::zeros(3, candle_core::DType::F32, &dev)?)?;
        let mut mismatched = AdamW::new(vec![("w".into(), wrong)], AdamWParams::default())?;
        assert!(matches!(
            mismatched.load_state(&saved, 1),
            Err(OptimError::State(_))
        ));
        Ok(())
    }
}

//! AdamW over the LoRA variables with the update rule of `candle_nn::AdamW` (and PyTorch's), whose
//! moments can be saved and restored (candle_nn keeps them private, so a resumed run would not
//! continue exactly), plus global-norm gradient clipping as `clip_grad_norm_`.

use std::collections::HashMap;

use candle_core::{Tensor, Var};

use super::{DdpoError, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWParams {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

pub struct AdamW {
    params: AdamWParams,
    names: Vec<String>,
    vars: Vec<Var>,
    first: Vec<Tensor>,
    second: Vec<Tensor>,
    step: usize,
}

impl AdamW {
    pub fn new(named_vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        let mut names = Vec::new();
        let mut vars = Vec::new();
        let mut first = Vec::new();
        for (name, var) in named_vars {
            first.push(var.as_tensor().zeros_like()?);
            names.push(name);
            vars.push(var);
        }
        Ok(Self {
            params,
            names,
            second: first.clone(),
            first,
            vars,
            step: 0,
        })
    }

    pub fn params(&self) -> AdamWParams {
        self.params
    }

    pub fn steps_taken(&self) -> usize {
        self.step
    }

    /// One update from `grads` (one per variable, in the order given to `new`; `None` = no
    /// gradient this step), after scaling them to a global L2 norm of at most `max_norm`.
    /// Returns the norm before clipping; a non-finite norm is an error and nothing is updated.
    pub fn step(&mut self, grads: &[Option<Tensor>], max_norm: f64) -> Result<f64> {
        let norm = global_norm(grads)?;
        if !norm.is_finite() {
            return Err(DdpoError::NonFinite {
                what: format!("gradient norm ({norm}) at optimizer step {}", self.step + 1),
                epoch: 0,
                last_checkpoint: None,
            });
        }
        let clip = if norm > max_norm {
            max_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let p = self.params;
        let scale_m = 1.0 / (1.0 - p.beta1.powi(self.step as i32));
        let scale_v = 1.0 / (1.0 - p.beta2.powi(self.step as i32));
        for (i, grad) in grads.iter().enumerate() {
            let Some(g) = grad else { continue };
            let g = (g * clip)?;
            let m = ((&self.first[i] * p.beta1)? + (&g * (1.0 - p.beta1))?)?;
            let v = ((&self.second[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + p.eps)?)?;
            let theta = self.vars[i].as_tensor();
            let next = ((theta * (1.0 - p.lr * p.weight_decay))? - (update * p.lr)?)?;
            self.vars[i].set(&next)?;
            self.first[i] = m;
            self.second[i] = v;
        }
        Ok(norm)
    }

    /// Moments keyed `m.<name>` / `v.<name>`.
    pub fn state(&self) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (i, name) in self.names.iter().enumerate() {
            out.insert(format!("m.{name}"), self.first[i].clone());
            out.insert(format!("v.{name}"), self.second[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, name) in self.names.iter().enumerate() {
            for (key, slot) in [
                (format!("m.{name}"), &mut self.first[i]),
                (format!("v.{name}"), &mut self.second[i]),
            ] {
                let saved = state.get(&key).ok_or_else(|| DdpoError::Checkpoint {
                    path: Default::default(),
                    message: format!("optimizer state has no tensor `{key}`"),
                })?;
                if saved.dims() != slot.dims() {
                    return Err(DdpoError::Checkpoint {
                        path: Default::default(),
                        message: format!(
                            "optimizer tensor `{key}` is {:?}, this run needs {:?}",
                            saved.dims(),
                            slot.dims()
                        ),
                    });
                }
                *slot = saved.to_dtype(slot.dtype())?.to_device(slot.device())?;
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
        let sq = g
            .to_dtype(candle_core::DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
        total += sq;
    }
    Ok(total.sqrt())
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
            let g_ours = (ours_var.as_tensor().sqr()?.sum_all()? * (k + 1) as f64)?
                .backward()?
                .get(ours_var.as_tensor())
                .unwrap()
                .clone();
            assert_eq!(g.to_vec2::<f32>()?, g_ours.to_vec2::<f32>()?);
            ours.step(&[Some(g_ours)], f64::INFINITY)?;
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
        assert!((opt.step(&[Some(g)], 1.0)? - 5.0).abs() < 1e-9);
        let m = opt.state()["m.v"].to_vec1::<f32>()?;
        assert!(
            (m[0] - 0.1 * 0.6).abs() < 1e-6 && (m[1] - 0.1 * 0.8).abs() < 1e-6,
            "{m:?}"
        );
        let nan = Tensor::new(&[f32::NAN, 0.0], &dev)?;
        assert!(opt.step(&[Some(nan)], 1.0).is_err());
        assert_eq!(opt.steps_taken(), 1);
        Ok(())
    }
}

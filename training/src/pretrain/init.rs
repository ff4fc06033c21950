//! Reproducible initial weights. candle's `VarMap` draws fresh variables from an unseeded
//! thread-local generator, so two runs of one config started from different weights (and a
//! test comparing a trained model with an untrained one was at the mercy of that draw). Here
//! each variable is drawn from a generator seeded by the run's seed and the variable's name,
//! with the distribution candle's initialiser hint asks for: the same config gives the same
//! initial model, whatever order the layers are built in.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A `VarMap` whose new variables are drawn reproducibly from `seed`.
struct SeededVarMap {
    varmap: VarMap,
    seed: u64,
}

/// A builder over `varmap` that creates missing variables from `seed` (see the module docs).
pub fn seeded_var_builder(varmap: &VarMap, seed: u64, device: &Device) -> VarBuilder<'static> {
    let backend = SeededVarMap {
        varmap: varmap.clone(),
        seed,
    };
    VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone())
}

/// FNV-1a: a stable hash of the name (std's hasher may change between releases).
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `init`'s distribution over `shape`, drawn from a generator seeded by `seed` and `name`.
fn draw(shape: &Shape, name: &str, init: Init, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ name_hash(name));
    let count = shape.elem_count();
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..count)
            .map(|_| rng.random_range(lo..up) as f32)
            .collect()
    };
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        (0..count)
            .map(|_| {
                let z: f64 = StandardNormal.sample(rng);
                (mean + std * z) as f32
            })
            .collect()
    };
    match init {
        Init::Const(v) => vec![v as f32; count],
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Kaiming {
            dist,
            fan,
            non_linearity,
        } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
            }
        }
    }
}

impl SimpleBackend for SeededVarMap {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(var) = vars.get(name) {
            if var.shape() != &s {
                candle_core::bail!("shape mismatch on {name}: {s:?} <> {:?}", var.shape());
            }
            return Ok(var.as_tensor().clone());
        }
        let data = draw(&s, name, h, self.seed);
        let var = Var::from_tensor(
            &Tensor::from_vec(data, s, &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(dev)?,
        )?;
        let tensor = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: a seeded VarMap creates variables from their shape; use get")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|vars| vars.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn build(seed: u64) -> Vec<(String, Vec<f32>)> {
        let varmap = VarMap::new();
        let vb = seeded_var_builder(&varmap, seed, &Device::Cpu);
        candle_nn::linear(6, 4, vb.pp("a")).unwrap();
        candle_nn::conv2d(3, 5, 3, Default::default(), vb.pp("b")).unwrap();
        let mut vars: Vec<_> = varmap
            .data()
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let data = v
                    .as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                (k.clone(), data)
            })
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let (first, again, other) = (build(7), build(7), build(8));
        assert_eq!(first, again);
        assert_eq!(first.len(), 4);
        for ((name, a), (_, b)) in first.iter().zip(&other) {
            assert_ne!(a, b, "{name}");
        }
        // A linear bias is uniform in +-1/sqrt(fan_in), as candle draws it.
        let bias = &first.iter().find(|(n, _)| n == "a.bias").unwrap().1;
        let bound = 1.0 / 6f32.sqrt();
        assert!(bias.iter().all(|b| b.abs() <= bound), "{bias:?}");
    }
}

//! transformers' `CLIPTextModel`: token + learned position embeddings, pre-LayerNorm causal
//! transformer layers, final LayerNorm. Output is `last_hidden_state` (what the diffusers
//! pipelines feed the UNet) and, for CLIP scores, the pooled EOS hidden state.
//!
//! [`ClipTextTransformer`] knows nothing about diffusers, so a full `CLIPModel` can reuse it;
//! [`ClipTextEncoder`] is the diffusers `text_encoder/` folder around it.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use crate::ops::modules::composed_linear;
use serde::Deserialize;
use serde_json::Value;

use crate::config::unsupported;
use crate::error::{ModelError, Result};
use crate::weights::WeightStorage;

/// The text tower's `config.json` fields (transformers' `CLIPTextConfig`, with its defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "defaults::vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::max_position_embeddings")]
    pub max_position_embeddings: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
    /// Picks the pooled position; may be an int or a list in the file (the first entry is used).
    #[serde(
        default = "defaults::eos_token_id",
        deserialize_with = "int_or_first_of_list"
    )]
    pub eos_token_id: u32,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    /// Width of `text_projection` in a `CLIPModel`; unused by the text tower itself.
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

mod defaults {
    pub fn vocab_size() -> usize {
        49408
    }
    pub fn hidden_size() -> usize {
        512
    }
    pub fn intermediate_size() -> usize {
        2048
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        8
    }
    pub fn max_position_embeddings() -> usize {
        77
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
    pub fn eos_token_id() -> u32 {
        49407
    }
}

fn int_or_first_of_list<'de, De: serde::Deserializer<'de>>(
    deserializer: De,
) -> std::result::Result<u32, De::Error> {
    use serde::de::Error;
    let value = Value::deserialize(deserializer)?;
    let as_id = |v: &Value| v.as_u64().and_then(|v| u32::try_from(v).ok());
    match &value {
        Value::Null => Some(defaults::eos_token_id()),
        Value::Array(items) => items.first().and_then(as_id),
        other => as_id(other),
    }
    .ok_or_else(|| {
        De::Error::custom(format!(
            "expected a token id or a list of them, found {value}"
        ))
    })
}

impl ClipTextConfig {
    /// Reads a `CLIPTextModel` config.json, or the `text_config` of a `CLIPModel` config.json
    /// (whose top-level `projection_dim` then fills in `projection_dim`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: Value = crate::config::read_json(path)?;
        let nested = ["text_config", "text_config_dict"]
            .into_iter()
            .find_map(|key| {
                raw.get(key)
                    .filter(|v| v.is_object())
                    .map(|v| (key, v.clone()))
            });
        let (section, mut config) = match nested {
            Some((key, text_config)) => (key, Self::parse(text_config, path, key)?),
            None => ("", Self::parse(raw.clone(), path, "")?),
        };
        if !section.is_empty() && config.projection_dim.is_none() {
            config.projection_dim = raw
                .get("projection_dim")
                .and_then(Value::as_u64)
                .map(|v| v as usize);
        }
        config.validate(path, section)?;
        Ok(config)
    }

    fn parse(value: Value, path: &Path, section: &str) -> Result<Self> {
        serde_json::from_value(value).map_err(|e| ModelError::Config {
            file: path.to_path_buf(),
            message: if section.is_empty() {
                e.to_string()
            } else {
                format!("{section}: {e}")
            },
        })
    }

    /// Checks what the file could get wrong; errors name `file` and the key (inside `section`).
    fn validate(&self, file: &Path, section: &str) -> Result<()> {
        let key = |name: &str| {
            if section.is_empty() {
                name.to_string()
            } else {
                format!("{section}.{name}")
            }
        };
        Activation::parse(&self.hidden_act)
            .ok_or_else(|| unsupported(file, &key("hidden_act"), &self.hidden_act))?;
        for (name, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if value == 0 {
                return Err(unsupported(file, &key(name), 0));
            }
        }
        if self.head_dim() * self.num_attention_heads != self.hidden_size {
            return Err(unsupported(
                file,
                &key("num_attention_heads"),
                format!(
                    "{} (does not divide hidden_size {})",
                    self.num_attention_heads, self.hidden_size
                ),
            ));
        }
        Ok(())
    }

    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

/// The activations transformers' `ACT2FN` maps these `hidden_act` names to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activation {
    /// x * sigmoid(1.702 x), the original CLIP's.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// tanh-approximated GELU ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Self::QuickGelu,
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            _ => return None,
        })
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
            Self::Relu => xs.relu(),
        }
    }
}

struct TextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
    max_positions: usize,
    /// The compute dtype (the tables may be kept narrower, see `WeightStorage`).
    dtype: DType,
}

impl TextEmbeddings {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                vb.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embedding"),
            )?,
            max_positions: cfg.max_position_embeddings,
            dtype: vb.dtype(),
        })
    }

    fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let seq_len = ids.dim(1)?;
        if seq_len > self.max_positions {
            candle_core::bail!(
                "text encoder: sequence length {seq_len} exceeds max_position_embeddings {}",
                self.max_positions
            );
        }
        let positions = Tensor::arange(0u32, seq_len as u32, ids.device())?;
        let position_embeds = self
            .position_embedding
            .forward(&positions)?
            .to_dtype(self.dtype)?
            .unsqueeze(0)?;
        self.token_embedding
            .forward(ids)?
            .to_dtype(self.dtype)?
            .broadcast_add(&position_embeds)
    }
}

struct SelfAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    num_heads: usize,
    head_dim: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(d, d, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            num_heads: cfg.num_attention_heads,
            head_dim: cfg.head_dim(),
        })
    }

    /// `causal_mask`: (T, T) additive mask, -inf above the diagonal.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let heads = |proj: &Linear| -> candle_core::Result<Tensor> {
            composed_linear(proj, xs)?
                .reshape((b, t, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let scale = (self.head_dim as f64).powf(-0.5);
        let q = (heads(&self.q_proj)? * scale)?;
        let k = heads(&self.k_proj)?;
        let v = heads(&self.v_proj)?;
        let scores = q.matmul(&k.t()?)?;
        let dtype = scores.dtype();
        // transformers takes the softmax in f32 whatever the model dtype.
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(causal_mask)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        composed_linear(&self.out_proj, &out)
    }
}

struct EncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    activation: Activation,
}

impl EncoderLayer {
    fn new(
        vb: VarBuilder,
        cfg: &ClipTextConfig,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        let d = cfg.hidden_size;
        let mlp = vb.pp("mlp");
        Ok(Self {
            self_attn: SelfAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm1: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm1"))?,
            fc1: candle_nn::linear(d, cfg.intermediate_size, mlp.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, d, mlp.pp("fc2"))?,
            layer_norm2: candle_nn::layer_norm(d, cfg.layer_norm_eps, vb.pp("layer_norm2"))?,
            activation,
        })
    }

    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> candle_core::Result<Tensor> {
        let attn = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + attn)?;
        let hidden = composed_linear(&self.fc1, &self.layer_norm2.forward(&xs)?)?;
        let mlp = composed_linear(&self.fc2, &self.activation.apply(&hidden)?)?;
        xs + mlp
    }
}

/// transformers' `CLIPTextTransformer` (the `text_model` of `CLIPTextModel` / `CLIPModel`).
pub struct ClipTextTransformer {
    embeddings: TextEmbeddings,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    eos_token_id: u32,
}

impl ClipTextTransformer {
    /// `vb` is rooted so that the weights are at `embeddings.*`, `encoder.layers.{i}.*`,
    /// `final_layer_norm.*`.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        let activation = Activation::parse(&cfg.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "text encoder: unsupported hidden_act {:?}",
                cfg.hidden_act
            ))
        })?;
        if cfg.num_attention_heads == 0
            || cfg.head_dim() * cfg.num_attention_heads != cfg.hidden_size
        {
            candle_core::bail!(
                "text encoder: num_attention_heads {} does not divide hidden_size {}",
                cfg.num_attention_heads,
                cfg.hidden_size
            );
        }
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| EncoderLayer::new(layers_vb.pp(i), cfg, activation))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: TextEmbeddings::new(vb.pp("embeddings"), cfg)?,
            layers,
            final_layer_norm: candle_nn::layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Token ids (B, T) (u32 or i64) -> last hidden state (B, T, D), after the final layer norm.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.embeddings.forward(ids)?;
        let causal_mask = causal_mask(ids.dim(1)?, ids.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, &causal_mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// Last hidden state (B, T, D) and the pooled output (B, D): the hidden state at the EOS
    /// position as transformers picks it (argmax of the ids for legacy configs with
    /// `eos_token_id == 2`, else the first position holding `eos_token_id`, or 0 if none does).
    pub fn forward_with_pooled(&self, ids: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let hidden = self.forward(ids)?;
        let (batch, seq_len, _) = hidden.dims3()?;
        let rows: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
        let flat_positions: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(b, row)| (b * seq_len + self.pooled_position(row)) as u32)
            .collect();
        let index = Tensor::from_vec(flat_positions, batch, hidden.device())?;
        let pooled = hidden
            .reshape((batch * seq_len, ()))?
            .index_select(&index, 0)?;
        Ok((hidden, pooled))
    }

    fn pooled_position(&self, row: &[i64]) -> usize {
        if self.eos_token_id == 2 {
            // torch.argmax returns the first maximum.
            let mut best = 0;
            for (i, &id) in row.iter().enumerate() {
                if id > row[best] {
                    best = i;
                }
            }
            best
        } else {
            let eos = i64::from(self.eos_token_id);
            row.iter().position(|&id| id == eos).unwrap_or(0)
        }
    }
}

/// (T, T) f32 additive mask: 0 on and below the diagonal, -inf above.
fn causal_mask(seq_len: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..seq_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (seq_len, seq_len), device)
}

/// The diffusers `text_encoder/` folder: `config.json` + `model.safetensors` of a `CLIPTextModel`
/// (keys with or without the `text_model.` prefix).
pub struct ClipTextEncoder {
    pub config: ClipTextConfig,
    transformer: ClipTextTransformer,
}

impl ClipTextEncoder {
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_storage(dir, dtype, WeightStorage::default(), device)
    }

    /// [`Self::load`] with the weights held as `storage` says.
    pub fn load_with_storage(
        dir: &Path,
        dtype: DType,
        storage: WeightStorage,
        device: &Device,
    ) -> Result<Self> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let (weight_file, vb) = crate::weights::component_var_builder(dir, dtype, storage, device)?;
        // Checkpoints written before transformers 5 nest everything under `text_model.`; 5.x
        // writes `CLIPTextModel` keys from the root.
        let vb = if vb.contains_tensor("text_model.final_layer_norm.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let transformer =
            ClipTextTransformer::new(vb, &config).map_err(|e| ModelError::Weights {
                path: weight_file.clone(),
                message: e.to_string(),
            })?;
        Ok(Self {
            config,
            transformer,
        })
    }

    /// Token ids (B, T) -> `last_hidden_state` (B, T, D), the UNet's `encoder_hidden_states`.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        self.transformer.forward(ids)
    }

    pub fn transformer(&self) -> &ClipTextTransformer {
        &self.transformer
    }

    /// Hidden-state width (the UNet's `cross_attention_dim`).
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::max_abs_diff;
    use candle_core::IndexOp;
    use std::collections::HashMap;

    fn tiny_config(hidden_act: &str, eos_token_id: u32) -> ClipTextConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 6, "hidden_act": hidden_act,
            "eos_token_id": eos_token_id
        }))
        .unwrap()
    }

    fn random_transformer(cfg: &ClipTextConfig) -> ClipTextTransformer {
        let varmap = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        ClipTextTransformer::new(vb, cfg).unwrap()
    }

    #[test]
    fn config_reads_clip_model_text_config_and_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"projection_dim": 32, "text_config": {"hidden_size": 16, "num_attention_heads": 4, "eos_token_id": [5, 6]}}"#,
        )
        .unwrap();
        let cfg = ClipTextConfig::from_file(&path).unwrap();
        assert_eq!(cfg.hidden_size, 16);
        assert_eq!(cfg.projection_dim, Some(32));
        assert_eq!(cfg.eos_token_id, 5);
        assert_eq!(cfg.hidden_act, "quick_gelu");
        assert_eq!(cfg.max_position_embeddings, 77);
    }

    #[test]
    fn unsupported_hidden_act_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(&path, r#"{"hidden_act": "swish"}"#).unwrap();
        let err = ClipTextConfig::from_file(&path).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(&err, ModelError::Unsupported { key, .. } if key == "hidden_act"),
            "{message}"
        );
        assert!(
            message.contains("config.json") && message.contains("swish"),
            "{message}"
        );
    }

    #[test]
    fn bad_head_count_and_bad_types_are_config_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        std::fs::write(
            &path,
            r#"{"text_config": {"hidden_size": 10, "num_attention_heads": 3}}"#,
        )
        .unwrap();
        let message = ClipTextConfig::from_file(&path).unwrap_err().to_string();
        assert!(
            message.contains("text_config.num_attention_heads"),
            "{message}"
        );
        std::fs::write(&path, r#"{"hidden_size": "wide"}"#).unwrap();
        let err = ClipTextConfig::from_file(&path).unwrap_err();
        assert!(matches!(err, ModelError::Config { .. }), "{err}");
        let missing = ClipTextConfig::from_file(&dir.path().join("nope.json")).unwrap_err();
        assert!(matches!(missing, ModelError::MissingFile { .. }));
    }

    #[test]
    fn activations_match_torch() {
        // torch.nn.functional values for x = [-3, -1, -0.5, 0, 0.5, 1, 3].
        let x = Tensor::new(&[-3f32, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], &Device::Cpu).unwrap();
        let expected: HashMap<&str, [f32; 7]> = HashMap::from([
            (
                "quick_gelu",
                [
                    -0.018_071_31,
                    -0.154_204_23,
                    -0.149_611_56,
                    0.0,
                    0.350_388_44,
                    0.845_795_75,
                    2.981_928_8,
                ],
            ),
            (
                "gelu",
                [
                    -0.004_050_225,
                    -0.158_655_26,
                    -0.154_268_77,
                    0.0,
                    0.345_731_23,
                    0.841_344_7,
                    2.995_949_7,
                ],
            ),
            (
                "gelu_pytorch_tanh",
                [
                    -0.003_637_433,
                    -0.158_808,
                    -0.154_286,
                    0.0,
                    0.345_714,
                    0.841_192,
                    2.996_362_7,
                ],
            ),
            ("relu", [0.0, 0.0, 0.0, 0.0, 0.5, 1.0, 3.0]),
        ]);
        for (name, values) in expected {
            let got: Vec<f32> = Activation::parse(name)
                .unwrap()
                .apply(&x)
                .unwrap()
                .to_vec1()
                .unwrap();
            for (g, e) in got.iter().zip(values) {
                assert!((g - e).abs() < 1e-5, "{name}: {got:?} vs {values:?}");
            }
        }
    }

    #[test]
    fn causal_mask_hides_later_tokens() {
        let cfg = tiny_config("gelu", 9);
        let model = random_transformer(&cfg);
        let a = Tensor::new(&[[1u32, 2, 3, 9, 9]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[1u32, 2, 3, 4, 5]], &Device::Cpu).unwrap();
        let ha = model.forward(&a).unwrap().i((0, ..3)).unwrap();
        let hb = model.forward(&b).unwrap().i((0, ..3)).unwrap();
        assert_eq!(max_abs_diff(&ha, &hb), 0.0);
        let too_long = Tensor::zeros((1, 7), DType::U32, &Device::Cpu).unwrap();
        assert!(model.forward(&too_long).is_err());
    }

    #[test]
    fn pooled_position_follows_transformers() {
        let cfg = tiny_config("quick_gelu", 9);
        let model = random_transformer(&cfg);
        assert_eq!(model.pooled_position(&[1, 4, 9, 9, 9]), 2);
        assert_eq!(model.pooled_position(&[1, 4, 5]), 0);
        let legacy = random_transformer(&tiny_config("quick_gelu", 2));
        assert_eq!(legacy.pooled_position(&[0, 7, 8, 8, 1]), 2);
        let ids = Tensor::new(&[[1u32, 4, 9, 9, 9], [1, 9, 9, 9, 9]], &Device::Cpu).unwrap();
        let (hidden, pooled) = model.forward_with_pooled(&ids).unwrap();
        assert_eq!(pooled.dims(), &[2, 8]);
        let expected =
            Tensor::stack(&[hidden.i((0, 2)).unwrap(), hidden.i((1, 1)).unwrap()], 0).unwrap();
        assert_eq!(max_abs_diff(&pooled, &expected), 0.0);
    }
}

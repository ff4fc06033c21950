//! The toy model's text side: a word-level vocabulary of the synthetic world, written as a
//! `tokenizer.json` that [`rl4pix_model::tokenizer::ClipTokenizer`] reads, and a trainable CLIP
//! text transformer with exactly the weights and arithmetic of
//! [`rl4pix_model::text_encoder::ClipTextTransformer`] but differentiable throughout (candle's
//! fused layer-norm and softmax kernels have no backward).

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rl4pix_model::text_encoder::ClipTextConfig;
use serde_json::json;

use super::{io_error, Result};
use crate::synth::{scene_caption, SynthWorld};

pub const BOS: &str = "<|startoftext|>";
pub const EOS: &str = "<|endoftext|>";
pub const UNK: &str = "[UNK]";

/// Splits like the `Whitespace` pre-tokenizer (`\w+|[^\w\s]+`) after lower-casing.
pub fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut current_is_word = false;
    for ch in text.to_lowercase().chars() {
        if ch.is_whitespace() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            continue;
        }
        let is_word = ch.is_alphanumeric() || ch == '_';
        if !current.is_empty() && is_word != current_is_word {
            out.push(std::mem::take(&mut current));
        }
        current_is_word = is_word;
        current.push(ch);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Every word of `samples` instructions, local descriptions and captions of the world, and the
/// most words in one instruction or local description.
pub fn world_vocabulary(world: &SynthWorld, samples: usize) -> (Vec<String>, usize) {
    let mut rng = ChaCha8Rng::seed_from_u64(0x70c4b);
    let mut vocab = BTreeSet::new();
    let mut longest = 0;
    for _ in 0..samples {
        let turn = world.random_turn(&mut rng);
        for text in [
            turn.turn.instruction.as_str(),
            turn.turn.local_description.as_deref().unwrap_or(""),
        ] {
            let w = words(text);
            longest = longest.max(w.len());
            vocab.extend(w);
        }
        // Whole-scene captions only widen the vocabulary (CLIP may see them); they are long.
        vocab.extend(words(&scene_caption(&turn.after)));
    }
    (vocab.into_iter().collect(), longest)
}

/// Writes `tokenizer.json` (word level: BOS = 0, EOS = 1, UNK = 2, then `vocab`) and
/// `tokenizer_config.json` into `dir`.
pub fn write_tokenizer(dir: &Path, vocab: &[String], max_length: usize) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let mut ids = serde_json::Map::new();
    for (i, token) in [BOS, EOS, UNK]
        .iter()
        .map(|s| s.to_string())
        .chain(vocab.iter().cloned())
        .enumerate()
    {
        ids.insert(token, json!(i));
    }
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(0, BOS), special(1, EOS), special(2, UNK)],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": ids, "unk_token": UNK}
    });
    let path = dir.join("tokenizer.json");
    super::write_json(&path, &tokenizer)?;
    let config = json!({
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "tokenizer_class": "PreTrainedTokenizerFast"
    });
    super::write_json(&dir.join("tokenizer_config.json"), &config)
}

/// Token ids of prompts as a (B, T) u32 tensor.
pub fn encode_batch(
    tokenizer: &rl4pix_model::tokenizer::ClipTokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<Tensor> {
    let mut ids = Vec::with_capacity(prompts.len() * tokenizer.max_length());
    for prompt in prompts {
        ids.extend(tokenizer.encode(prompt)?);
    }
    Ok(Tensor::from_vec(
        ids,
        (prompts.len(), tokenizer.max_length()),
        device,
    )?)
}

pub(crate) fn layer_norm(norm: &LayerNorm, xs: &Tensor) -> candle_core::Result<Tensor> {
    match norm.bias() {
        Some(bias) => candle_nn::ops::layer_norm_slow(xs, norm.weight(), bias, norm.eps() as f32),
        None => norm.forward(xs),
    }
}

/// A pre-norm CLIP transformer layer (quick_gelu MLP), as transformers' `CLIPEncoderLayer`.
pub(crate) struct Layer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
}

impl Layer {
    pub(crate) fn new(
        vb: VarBuilder,
        d: usize,
        intermediate: usize,
        eps: f64,
    ) -> candle_core::Result<Self> {
        let attn = vb.pp("self_attn");
        Ok(Layer {
            q: candle_nn::linear(d, d, attn.pp("q_proj"))?,
            k: candle_nn::linear(d, d, attn.pp("k_proj"))?,
            v: candle_nn::linear(d, d, attn.pp("v_proj"))?,
            out: candle_nn::linear(d, d, attn.pp("out_proj"))?,
            norm1: candle_nn::layer_norm(d, eps, vb.pp("layer_norm1"))?,
            fc1: candle_nn::linear(d, intermediate, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(intermediate, d, vb.pp("mlp").pp("fc2"))?,
            norm2: candle_nn::layer_norm(d, eps, vb.pp("layer_norm2"))?,
        })
    }

    /// `mask`: additive (T, T) attention mask (causal for text), or none.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        heads: usize,
        mask: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, d) = xs.dims3()?;
        let head_dim = d / heads;
        let h = layer_norm(&self.norm1, xs)?;
        let split = |proj: &Linear| -> candle_core::Result<Tensor> {
            proj.forward(&h)?
                .reshape((b, t, heads, head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = (split(&self.q)? * (head_dim as f64).powf(-0.5))?;
        let k = split(&self.k)?;
        let v = split(&self.v)?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax(&scores, D::Minus1)?;
        let attn = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let xs = (xs + self.out.forward(&attn)?)?;
        let h = self.fc1.forward(&layer_norm(&self.norm2, &xs)?)?;
        let h = (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?;
        &xs + self.fc2.forward(&h)?
    }
}

/// Trainable `CLIPTextTransformer` (quick_gelu, pre-norm, causal), weights at `embeddings.*`,
/// `encoder.layers.{i}.*`, `final_layer_norm.*`.
pub struct TrainTextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
    heads: usize,
    eos_token_id: u32,
}

impl TrainTextEncoder {
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> candle_core::Result<Self> {
        if cfg.hidden_act != "quick_gelu" {
            candle_core::bail!("the trainable text encoder supports quick_gelu only");
        }
        let d = cfg.hidden_size;
        let eps = cfg.layer_norm_eps;
        let emb = vb.pp("embeddings");
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(layers_vb.pp(i), d, cfg.intermediate_size, eps))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: candle_nn::embedding(cfg.vocab_size, d, emb.pp("token_embedding"))?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                d,
                emb.pp("position_embedding"),
            )?,
            layers,
            final_norm: candle_nn::layer_norm(d, eps, vb.pp("final_layer_norm"))?,
            heads: cfg.num_attention_heads,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// (B, T) ids -> last hidden state (B, T, D).
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let t = ids.dim(1)?;
        let positions = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut xs = self
            .token_embedding
            .forward(ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?.unsqueeze(0)?)?;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        let mask = Tensor::from_vec(mask, (t, t), ids.device())?;
        for layer in &self.layers {
            xs = layer.forward(&xs, self.heads, Some(&mask))?;
        }
        layer_norm(&self.final_norm, &xs)
    }

    /// Hidden state at the first EOS of each row (CLIP's pooled output; `eos_token_id` != 2).
    pub fn pooled(&self, ids: &Tensor, hidden: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, _) = hidden.dims3()?;
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let index: Vec<u32> = rows
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let pos = row
                    .iter()
                    .position(|&id| id == self.eos_token_id)
                    .unwrap_or(0);
                (i * t + pos) as u32
            })
            .collect();
        let index = Tensor::from_vec(index, b, hidden.device())?;
        hidden.reshape((b * t, ()))?.index_select(&index, 0)
    }
}

/// The text encoder config of the toy model.
pub fn text_config(
    vocab_size: usize,
    hidden: usize,
    layers: usize,
    heads: usize,
    max_len: usize,
) -> serde_json::Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": max_len,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "projection_dim": hidden,
        "torch_dtype": "float32"
    })
}

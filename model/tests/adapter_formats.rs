//! LoRA adapter files: the diffusers and kohya fixtures written by `tests/make_model_fixtures.py`
//! (diffusers' `save_lora_weights`, rank 4, alpha 8), every other accepted spelling derived from
//! them, our own writer, and every refusal.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::Device;
use rl4pix_model::adapter::{AdapterFormat, AdapterMetadata, LoraAdapter, LoraLayer, LoraTargets};
use rl4pix_model::ModelError;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

fn pipelines_dir() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join("tests/fixtures/pipelines")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The sd1 UNet's LoRA-capable projections, from the base weights themselves: (out, in) matrices.
fn sd1_targets() -> LoraTargets {
    let bytes = read(&pipelines_dir().join("sd1/unet/diffusion_pytorch_model.safetensors"));
    let file = SafeTensors::deserialize(&bytes).expect("sd1 unet weights");
    let mut modules = BTreeMap::new();
    for (key, view) in file.tensors() {
        let Some(module) = key.strip_suffix(".weight") else {
            continue;
        };
        if [".to_q", ".to_k", ".to_v", ".to_out.0"]
            .iter()
            .any(|s| module.ends_with(s))
        {
            let shape = view.shape();
            modules.insert(module.to_string(), (shape[1], shape[0]));
        }
    }
    assert_eq!(
        modules.len(),
        32,
        "sd1 has 4 attention modules x 4 projections x 2"
    );
    LoraTargets {
        modules,
        fingerprint: None,
    }
}

fn sd1_reference_lora() -> Value {
    let text = String::from_utf8(read(&pipelines_dir().join("sd1.reference.json"))).expect("utf-8");
    let reference: Value = serde_json::from_str(&text).expect("reference json");
    reference["lora"].clone()
}

fn load_fixture(file: &str, targets: &LoraTargets) -> LoraAdapter {
    LoraAdapter::load(&pipelines_dir().join(file), targets, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{file}: {e}"))
}

type LayerValues = BTreeMap<String, (Vec<usize>, Vec<f32>, Vec<usize>, Vec<f32>, f64)>;

fn layer_values(adapter: &LoraAdapter) -> LayerValues {
    adapter
        .layers
        .iter()
        .map(|(module, layer)| {
            let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let value = (
                layer.down.dims().to_vec(),
                flat(&layer.down),
                layer.up.dims().to_vec(),
                flat(&layer.up),
                layer.scale,
            );
            (module.clone(), value)
        })
        .collect()
}

type RawTensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;
type Header = HashMap<String, String>;
type NamedTensor = (String, Vec<usize>, Vec<f32>);
type Rename = Box<dyn Fn(&str) -> Option<String>>;

/// Raw tensors and header of a safetensors file, as f32.
fn raw_tensors(bytes: &[u8]) -> (RawTensors, Header) {
    let file = SafeTensors::deserialize(bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(bytes).unwrap();
    let tensors = file
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            assert_eq!(view.dtype(), Dtype::F32, "{key}");
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (key, (view.shape().to_vec(), values))
        })
        .collect();
    (tensors, header.metadata().clone().unwrap_or_default())
}

fn build_file(tensors: &[NamedTensor], metadata: Option<HashMap<String, String>>) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, values)| values.iter().flat_map(|v| v.to_le_bytes()).collect())
        .collect();
    let views: Vec<(&str, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((key, shape, _), data)| {
            (
                key.as_str(),
                TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize(views, metadata).unwrap()
}

/// The diffusers fixture with its keys renamed by `rename` (None drops a key), header kept or not.
fn respelled(
    rename: impl Fn(&str) -> Option<String>,
    keep_header: bool,
    extra: &[NamedTensor],
) -> Vec<u8> {
    let (tensors, header) = raw_tensors(&read(&pipelines_dir().join("sd1.lora.safetensors")));
    let mut out: Vec<_> = tensors
        .into_iter()
        .filter_map(|(key, (shape, values))| rename(&key).map(|k| (k, shape, values)))
        .collect();
    out.extend_from_slice(extra);
    build_file(&out, keep_header.then_some(header))
}

#[test]
fn diffusers_fixture_parses_with_alpha_from_metadata() {
    let targets = sd1_targets();
    let adapter = load_fixture("sd1.lora.safetensors", &targets);
    let reference = sd1_reference_lora();

    assert_eq!(adapter.name, "sd1.lora");
    assert_eq!(adapter.metadata.format, AdapterFormat::DiffusersPeft);
    assert_eq!(adapter.metadata.rank, 4);
    assert_eq!(adapter.metadata.alpha, 8.0);
    assert_eq!(
        adapter.metadata.target_modules,
        ["to_k", "to_out.0", "to_q", "to_v"]
    );
    assert_eq!(adapter.metadata.base_fingerprint, None);
    let expected_paths: Vec<String> =
        serde_json::from_value(reference["adapted_module_paths"].clone()).unwrap();
    assert_eq!(
        adapter.layers.keys().cloned().collect::<Vec<_>>(),
        expected_paths
    );
    assert_eq!(
        adapter.layers.keys().collect::<Vec<_>>(),
        targets.modules.keys().collect::<Vec<_>>()
    );
    for (module, layer) in &adapter.layers {
        let (in_features, out_features) = targets.modules[module];
        assert_eq!(layer.down.dims(), [4, in_features], "{module}");
        assert_eq!(layer.up.dims(), [out_features, 4], "{module}");
        assert_eq!(layer.rank(), 4);
        assert_eq!(layer.scale, 2.0, "{module}: alpha 8 / rank 4");
        assert_eq!(layer.down.dtype(), candle_core::DType::F32);
    }
    assert_eq!(reference["scale"], json!(2.0));

    // Values arrive bit for bit.
    let (raw, _) = raw_tensors(&read(&pipelines_dir().join("sd1.lora.safetensors")));
    let values = layer_values(&adapter);
    for (module, (_, down, _, up, _)) in &values {
        assert_eq!(
            down,
            &raw[&format!("unet.{module}.lora_A.weight")].1,
            "{module}"
        );
        assert_eq!(
            up,
            &raw[&format!("unet.{module}.lora_B.weight")].1,
            "{module}"
        );
    }
    let parameters: usize = raw.values().map(|(_, v)| v.len()).sum();
    assert_eq!(adapter.num_parameters(), parameters);
    assert_eq!(adapter.size_bytes(), 4 * parameters);
}

#[test]
fn kohya_fixture_gives_the_same_layers() {
    let targets = sd1_targets();
    let diffusers = load_fixture("sd1.lora.safetensors", &targets);
    let kohya = load_fixture("sd1.lora_kohya.safetensors", &targets);
    assert_eq!(kohya.metadata.format, AdapterFormat::Kohya);
    assert_eq!(kohya.metadata.rank, 4);
    assert_eq!(
        kohya.metadata.alpha, 8.0,
        "from the per-layer `.alpha` tensors"
    );
    assert_eq!(
        kohya.metadata.target_modules,
        ["to_k", "to_out.0", "to_q", "to_v"]
    );
    assert_eq!(layer_values(&kohya), layer_values(&diffusers));
}

#[test]
fn every_spelling_gives_the_same_layers() {
    let targets = sd1_targets();
    let expected = layer_values(&load_fixture("sd1.lora.safetensors", &targets));
    let device = Device::Cpu;

    let attn_processor = |key: &str| {
        let key = key.strip_prefix("unet.").unwrap();
        let (module, part) = key.rsplit_once(".lora_").unwrap();
        let part = if part == "A.weight" { "down" } else { "up" };
        let module = module.strip_suffix(".0").unwrap_or(module);
        let (attn, projection) = module.rsplit_once('.').unwrap();
        Some(format!("{attn}.processor.{projection}_lora.{part}.weight"))
    };
    let spellings: Vec<(&str, Rename, AdapterFormat)> = vec![
        (
            "no prefix",
            Box::new(|k: &str| Some(k.strip_prefix("unet.").unwrap().to_string())),
            AdapterFormat::DiffusersPeft,
        ),
        (
            "peft prefix",
            Box::new(|k: &str| Some(k.replacen("unet.", "base_model.model.", 1))),
            AdapterFormat::DiffusersPeft,
        ),
        (
            "lora.down / lora.up",
            Box::new(|k: &str| {
                Some(
                    k.replace(".lora_A.", ".lora.down.")
                        .replace(".lora_B.", ".lora.up."),
                )
            }),
            AdapterFormat::DiffusersLegacy,
        ),
        (
            "lora_down / lora_up",
            Box::new(|k: &str| {
                Some(
                    k.replace(".lora_A.", ".lora_down.")
                        .replace(".lora_B.", ".lora_up."),
                )
            }),
            AdapterFormat::DiffusersLegacy,
        ),
        (
            "attention processor",
            Box::new(attn_processor),
            AdapterFormat::AttnProcessor,
        ),
    ];
    for (what, rename, format) in spellings {
        let bytes = respelled(rename, true, &[]);
        let adapter = LoraAdapter::from_bytes(what, &bytes, &targets, &device)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(adapter.metadata.format, format, "{what}");
        assert_eq!(layer_values(&adapter), expected, "{what}");
    }

    // Without metadata diffusers takes alpha = rank; a per-layer `.alpha` tensor overrides that.
    let bare = LoraAdapter::from_bytes(
        "bare",
        &respelled(|k| Some(k.to_string()), false, &[]),
        &targets,
        &device,
    )
    .unwrap();
    assert_eq!(bare.metadata.alpha, 4.0);
    assert!(bare.layers.values().all(|l| l.scale == 1.0));
    let alphas: Vec<_> = targets
        .modules
        .keys()
        .map(|m| (format!("unet.{m}.alpha"), vec![], vec![8.0f32]))
        .collect();
    let with_alpha = LoraAdapter::from_bytes(
        "alpha",
        &respelled(|k| Some(k.to_string()), false, &alphas),
        &targets,
        &device,
    )
    .unwrap();
    assert_eq!(layer_values(&with_alpha), expected);
}

#[test]
fn alpha_and_rank_patterns_are_honoured() {
    let targets = sd1_targets();
    let (_, header) = raw_tensors(&read(&pipelines_dir().join("sd1.lora.safetensors")));
    let mut config: Value = serde_json::from_str(&header["lora_adapter_metadata"]).unwrap();
    config["unet.alpha_pattern"] =
        json!({"attn2.to_k": 2, "mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 1.0});
    let mut header = header.clone();
    header.insert("lora_adapter_metadata".to_string(), config.to_string());
    let (tensors, _) = raw_tensors(&read(&pipelines_dir().join("sd1.lora.safetensors")));
    let tensors: Vec<_> = tensors.into_iter().map(|(k, (s, v))| (k, s, v)).collect();
    let adapter = LoraAdapter::from_bytes(
        "patterns",
        &build_file(&tensors, Some(header.clone())),
        &targets,
        &Device::Cpu,
    )
    .unwrap();
    for (module, layer) in &adapter.layers {
        let expected = if module.ends_with("attn2.to_k") {
            0.5
        } else if module == "mid_block.attentions.0.transformer_blocks.0.attn1.to_q" {
            0.25
        } else {
            2.0
        };
        assert_eq!(layer.scale, expected, "{module}");
    }

    // rank_pattern must agree with the tensors.
    config["unet.rank_pattern"] = json!({"attn1.to_v": 8});
    header.insert("lora_adapter_metadata".to_string(), config.to_string());
    let error = LoraAdapter::from_bytes(
        "patterns",
        &build_file(&tensors, Some(header)),
        &targets,
        &Device::Cpu,
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(
        message.contains("says rank 8") && message.contains("attn1.to_v"),
        "{message}"
    );
}

#[test]
fn round_trip_keeps_layers_and_metadata() {
    let targets = LoraTargets {
        fingerprint: Some("sha256:base".to_string()),
        ..sd1_targets()
    };
    let mut adapter = load_fixture("sd1.lora_kohya.safetensors", &targets);
    adapter.metadata.base_fingerprint = Some("sha256:base".to_string());
    adapter.metadata.created = Some("2025-01-02T03:04:05Z".to_string());
    adapter.metadata.training_config =
        Some(json!({"lr": 0.125, "steps": 100, "targets": ["to_q"]}));
    adapter.metadata.reward_summary = Some(json!({"mean": 0.25}));
    let bytes = adapter.to_bytes().unwrap();

    let (raw, header) = raw_tensors(&bytes);
    assert_eq!(raw.len(), 64);
    assert!(raw.contains_key(
        "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_A.weight"
    ));
    assert_eq!(header["format"], "pt");
    assert_eq!(header["rl4pix.base_fingerprint"], "sha256:base");
    assert_eq!(header["rl4pix.created"], "2025-01-02T03:04:05Z");
    let config: Value = serde_json::from_str(&header["lora_adapter_metadata"]).unwrap();
    assert_eq!(config["unet.r"], json!(4));
    assert_eq!(config["unet.lora_alpha"], json!(8));
    assert_eq!(
        config["unet.target_modules"],
        json!(["to_k", "to_out.0", "to_q", "to_v"])
    );
    assert_eq!(config["unet.peft_type"], json!("LORA"));
    assert_eq!(config["unet.rank_pattern"], json!({}));
    assert_eq!(config["unet.alpha_pattern"], json!({}));
    // Laid out as diffusers writes it: keys sorted, two-space indent.
    let text = &header["lora_adapter_metadata"];
    assert!(
        text.starts_with("{\n  \"unet.alpha_pattern\": {},\n"),
        "{text}"
    );
    assert!(
        text.contains("\n  \"unet.target_modules\": [\n    \"to_k\",\n"),
        "{text}"
    );

    let back = LoraAdapter::from_bytes("back", &bytes, &targets, &Device::Cpu).unwrap();
    assert_eq!(layer_values(&back), layer_values(&adapter));
    assert_eq!(
        back.metadata,
        AdapterMetadata {
            format: AdapterFormat::DiffusersPeft,
            ..adapter.metadata.clone()
        }
    );

    // Atomic save: the file appears whole under its name, no temporary left behind.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("my_adapter.safetensors");
    adapter.save(&path).unwrap();
    adapter.save(&path).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["my_adapter.safetensors"]);
    let loaded = LoraAdapter::load(&path, &targets, &Device::Cpu).unwrap();
    assert_eq!(loaded.name, "my_adapter");
    assert_eq!(layer_values(&loaded), layer_values(&adapter));
}

#[test]
fn round_trip_keeps_per_layer_ranks_and_scales() {
    let device = Device::Cpu;
    let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
    let k = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    let layer = |rank: usize, in_f: usize, out_f: usize, scale: f64| LoraLayer {
        down: candle_core::Tensor::arange(0f32, (rank * in_f) as f32, &device)
            .unwrap()
            .reshape((rank, in_f))
            .unwrap(),
        up: candle_core::Tensor::ones((out_f, rank), candle_core::DType::F32, &device).unwrap(),
        scale,
    };
    let adapter = LoraAdapter {
        name: "mixed".to_string(),
        metadata: AdapterMetadata::new(4, 4.0, vec![]),
        layers: BTreeMap::from([
            (q.to_string(), layer(4, 16, 16, 1.5)),
            (k.to_string(), layer(2, 32, 16, 1.0)),
        ]),
    };
    let bytes = adapter.to_bytes().unwrap();
    let (_, header) = raw_tensors(&bytes);
    let config: Value = serde_json::from_str(&header["lora_adapter_metadata"]).unwrap();
    assert_eq!(config["unet.rank_pattern"], json!({ k: 2 }));
    assert_eq!(config["unet.alpha_pattern"], json!({ q: 6, k: 2 }));
    assert_eq!(config["unet.target_modules"], json!(["to_k", "to_q"]));

    let back = LoraAdapter::from_bytes("mixed", &bytes, &sd1_targets(), &device).unwrap();
    assert_eq!(layer_values(&back), layer_values(&adapter));
    assert_eq!(back.layers[k].rank(), 2);
    assert_eq!(adapter.num_parameters(), 4 * 16 + 16 * 4 + 2 * 32 + 16 * 2);
}

// ---------------------------------------------------------------------------------------------
// Refusals, on small hand-built files.

const Q: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
const K2: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";

fn small_targets() -> LoraTargets {
    LoraTargets {
        modules: BTreeMap::from([(Q.to_string(), (8, 8)), (K2.to_string(), (6, 8))]),
        fingerprint: Some("base-a".to_string()),
    }
}

fn tensor(key: &str, shape: &[usize]) -> NamedTensor {
    let n = shape.iter().product::<usize>();
    (
        key.to_string(),
        shape.to_vec(),
        (0..n).map(|i| i as f32 * 0.01).collect(),
    )
}

fn valid_tensors() -> Vec<NamedTensor> {
    vec![
        tensor(&format!("unet.{Q}.lora_A.weight"), &[2, 8]),
        tensor(&format!("unet.{Q}.lora_B.weight"), &[8, 2]),
        tensor(&format!("unet.{K2}.lora_A.weight"), &[2, 6]),
        tensor(&format!("unet.{K2}.lora_B.weight"), &[8, 2]),
    ]
}

fn header(pairs: &[(&str, &str)]) -> Option<HashMap<String, String>> {
    Some(
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

fn refusal(bytes: &[u8]) -> String {
    match LoraAdapter::from_bytes("bad", bytes, &small_targets(), &Device::Cpu) {
        Ok(_) => panic!("accepted a bad adapter"),
        Err(error @ ModelError::Adapter { .. }) => error.to_string(),
        Err(other) => panic!("wrong error kind: {other:?}"),
    }
}

fn assert_refused(bytes: &[u8], needles: &[&str]) {
    let message = refusal(bytes);
    assert!(message.starts_with("adapter bad: "), "{message}");
    for needle in needles {
        assert!(message.contains(needle), "`{needle}` not in: {message}");
    }
}

#[test]
fn hand_built_valid_file_loads() {
    let bytes = build_file(
        &valid_tensors(),
        header(&[("rl4pix.base_fingerprint", "base-a")]),
    );
    let adapter = LoraAdapter::from_bytes("ok", &bytes, &small_targets(), &Device::Cpu).unwrap();
    assert_eq!(adapter.layers.len(), 2);
    assert_eq!(adapter.metadata.base_fingerprint.as_deref(), Some("base-a"));
    // A fingerprint on one side only is no conflict.
    let unfingerprinted = LoraTargets {
        fingerprint: None,
        ..small_targets()
    };
    LoraAdapter::from_bytes("ok", &bytes, &unfingerprinted, &Device::Cpu).unwrap();
    LoraAdapter::from_bytes(
        "ok",
        &build_file(&valid_tensors(), None),
        &small_targets(),
        &Device::Cpu,
    )
    .unwrap();
}

#[test]
fn refuses_what_is_not_a_safetensors_file() {
    assert_refused(
        b"definitely not safetensors",
        &["not a valid safetensors file"],
    );
    assert_refused(b"", &["not a valid safetensors file"]);
    let bytes = build_file(&valid_tensors(), None);
    assert_refused(&bytes[..bytes.len() - 7], &["not a valid safetensors file"]);
    assert_refused(&bytes[..20], &["not a valid safetensors file"]);
}

#[test]
fn refuses_files_without_lora_keys() {
    assert_refused(
        &build_file(
            &[tensor("down_blocks.0.resnets.0.conv1.weight", &[4, 4])],
            None,
        ),
        &["no LoRA keys", "down_blocks.0.resnets.0.conv1.weight"],
    );
    assert_refused(&build_file(&[], None), &["no LoRA keys"]);
}

#[test]
fn refuses_unknown_modules() {
    let mut tensors = valid_tensors();
    tensors.push(tensor(
        "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
        &[2, 8],
    ));
    tensors.push(tensor(
        "unet.down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight",
        &[8, 2],
    ));
    assert_refused(
        &build_file(&tensors, None),
        &[
            "down_blocks.7.attentions.0.transformer_blocks.0.attn1.to_q",
            "not a LoRA target",
        ],
    );
    let kohya = [
        tensor(
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_down.weight",
            &[2, 8],
        ),
        tensor(
            "lora_unet_down_blocks_7_attentions_0_proj_in.lora_up.weight",
            &[8, 2],
        ),
    ];
    assert_refused(
        &build_file(&kohya, None),
        &[
            "lora_unet_down_blocks_7_attentions_0_proj_in",
            "not a LoRA target",
        ],
    );
}

#[test]
fn refuses_half_pairs() {
    let mut tensors = valid_tensors();
    tensors.remove(3);
    assert_refused(
        &build_file(&tensors, None),
        &[
            &format!("unet.{K2}.lora_A.weight"),
            "up (B) weight is missing",
        ],
    );
    let mut tensors = valid_tensors();
    tensors.remove(0);
    assert_refused(
        &build_file(&tensors, None),
        &[
            &format!("unet.{Q}.lora_B.weight"),
            "down (A) weight is missing",
        ],
    );
    let mut tensors = valid_tensors();
    tensors.push((
        format!("unet.{}.alpha", "mid_block.attentions.0.proj_out"),
        vec![],
        vec![4.0],
    ));
    assert_refused(
        &build_file(&tensors, None),
        &["mid_block.attentions.0.proj_out.alpha", "no LoRA weights"],
    );
}

#[test]
fn refuses_shape_mismatches() {
    let mut tensors = valid_tensors();
    tensors[2] = tensor(&format!("unet.{K2}.lora_A.weight"), &[2, 8]);
    assert_refused(
        &build_file(&tensors, None),
        &[
            &format!("unet.{K2}.lora_A.weight"),
            "[2, 8]",
            "takes 6 input features",
        ],
    );
    let mut tensors = valid_tensors();
    tensors[1] = tensor(&format!("unet.{Q}.lora_B.weight"), &[6, 2]);
    assert_refused(
        &build_file(&tensors, None),
        &[
            &format!("unet.{Q}.lora_B.weight"),
            "[6, 2]",
            "gives 8 output features",
        ],
    );
    let mut tensors = valid_tensors();
    tensors[1] = tensor(&format!("unet.{Q}.lora_B.weight"), &[8, 3]);
    assert_refused(
        &build_file(&tensors, None),
        &["has rank 2", "has rank 3", Q],
    );
    let mut tensors = valid_tensors();
    tensors[0] = tensor(&format!("unet.{Q}.lora_A.weight"), &[2, 8, 3]);
    assert_refused(
        &build_file(&tensors, None),
        &[&format!("unet.{Q}.lora_A.weight"), "expected a matrix"],
    );
    // The metadata's rank must be the tensors' rank.
    let config = r#"{"unet.r": 4, "unet.lora_alpha": 4}"#;
    assert_refused(
        &build_file(
            &valid_tensors(),
            header(&[("lora_adapter_metadata", config)]),
        ),
        &["says rank 4", Q],
    );
}

#[test]
fn refuses_non_finite_values() {
    let mut tensors = valid_tensors();
    tensors[3].2[5] = f32::NAN;
    assert_refused(
        &build_file(&tensors, None),
        &[&format!("unet.{K2}.lora_B.weight"), "non-finite", "index 5"],
    );
    let mut tensors = valid_tensors();
    tensors[0].2[0] = f32::INFINITY;
    assert_refused(
        &build_file(&tensors, None),
        &[&format!("unet.{Q}.lora_A.weight"), "non-finite"],
    );
    let mut tensors = valid_tensors();
    tensors.push((format!("unet.{Q}.alpha"), vec![], vec![f32::NAN]));
    assert_refused(
        &build_file(&tensors, None),
        &[&format!("unet.{Q}.alpha"), "non-finite"],
    );

    // One bad layer among many refuses the whole real adapter.
    let targets = sd1_targets();
    let last = format!(
        "unet.{}.lora_B.weight",
        targets.modules.keys().last().unwrap()
    );
    let bytes = respelled(|k| Some(k.to_string()), true, &[]);
    let (raw, header) = raw_tensors(&bytes);
    let tensors: Vec<_> = raw
        .into_iter()
        .map(|(k, (s, mut v))| {
            if k == last {
                v[0] = f32::NEG_INFINITY;
            }
            (k, s, v)
        })
        .collect();
    let error = LoraAdapter::from_bytes(
        "x",
        &build_file(&tensors, Some(header)),
        &targets,
        &Device::Cpu,
    )
    .unwrap_err();
    assert!(error.to_string().contains(&last), "{error}");
}

#[test]
fn refuses_a_different_base() {
    let bytes = build_file(
        &valid_tensors(),
        header(&[("rl4pix.base_fingerprint", "base-b")]),
    );
    assert_refused(&bytes, &["base-b", "base-a"]);
}

#[test]
fn refuses_text_encoder_dora_and_stray_keys() {
    let mut tensors = valid_tensors();
    tensors.push(tensor(
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
        &[2, 8],
    ));
    assert_refused(
        &build_file(&tensors, None),
        &["text-encoder", "only UNet adapters"],
    );
    let kohya_te = [tensor(
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        &[2, 8],
    )];
    assert_refused(
        &build_file(&kohya_te, None),
        &["text-encoder", "lora_te_text_model"],
    );

    let mut tensors = valid_tensors();
    tensors.push(tensor(&format!("unet.{Q}.lora_magnitude_vector"), &[8]));
    assert_refused(&build_file(&tensors, None), &["DoRA"]);

    let mut tensors = valid_tensors();
    tensors.push(tensor(&format!("unet.{Q}.lora_B.bias"), &[8]));
    assert_refused(
        &build_file(&tensors, None),
        &["unrecognized key", &format!("unet.{Q}.lora_B.bias")],
    );

    let mut tensors = valid_tensors();
    tensors.push(tensor(&format!("unet.{Q}.lora.down.weight"), &[2, 8]));
    assert_refused(&build_file(&tensors, None), &["same weight twice"]);
}

#[test]
fn refuses_bad_metadata_and_dtypes() {
    assert_refused(
        &build_file(
            &valid_tensors(),
            header(&[("lora_adapter_metadata", "{not json")]),
        ),
        &["lora_adapter_metadata", "not valid JSON"],
    );
    assert_refused(
        &build_file(
            &valid_tensors(),
            header(&[("lora_adapter_metadata", r#"{"unet.lora_alpha": "eight"}"#)]),
        ),
        &["unet.lora_alpha", "finite number"],
    );
    assert_refused(
        &build_file(
            &valid_tensors(),
            header(&[("rl4pix.training_config", "{oops")]),
        ),
        &["rl4pix.training_config", "not valid JSON"],
    );

    let ints: Vec<u8> = (0..16i32).flat_map(|v| v.to_le_bytes()).collect();
    let mut views: Vec<(String, TensorView)> = Vec::new();
    let floats: Vec<Vec<u8>> = valid_tensors()
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    for ((key, shape, _), data) in valid_tensors().iter().zip(&floats).skip(1) {
        views.push((
            key.clone(),
            TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
        ));
    }
    views.push((
        format!("unet.{Q}.lora_A.weight"),
        TensorView::new(Dtype::I32, vec![2, 8], &ints).unwrap(),
    ));
    assert_refused(
        &safetensors::serialize(views, None).unwrap(),
        &["I32", "expected a float type"],
    );
}

#[test]
fn writer_refuses_broken_adapters() {
    let device = Device::Cpu;
    let mut adapter = LoraAdapter::from_bytes(
        "w",
        &build_file(&valid_tensors(), None),
        &small_targets(),
        &device,
    )
    .unwrap();
    let nan = candle_core::Tensor::new(&[[f32::NAN; 2]; 8], &device).unwrap();
    adapter.layers.get_mut(Q).unwrap().up = nan;
    let message = adapter.to_bytes().unwrap_err().to_string();
    assert!(
        message.contains(&format!("unet.{Q}.lora_B.weight")) && message.contains("non-finite"),
        "{message}"
    );
    adapter.layers.clear();
    assert!(adapter.to_bytes().is_err());
}

//! The tensor-key spellings adapter files use (diffusers PEFT `lora_A`/`lora_B`, diffusers
//! legacy `lora.down`/`lora.up`, kohya `lora_unet_...`), mapped to a module and a part.

use super::AdapterFormat;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Part {
    Down,
    Up,
    Alpha,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ModuleRef {
    /// A dotted diffusers path (prefix already stripped).
    Path(String),
    /// A kohya name: the path with every '.' replaced by '_', resolved against the targets.
    Kohya(String),
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum KeyClass {
    Lora {
        module: ModuleRef,
        part: Part,
        /// `None` for `.alpha`, which every spelling shares.
        format: Option<AdapterFormat>,
    },
    TextEncoder,
    Dora,
    Unrecognized,
}

pub(super) fn classify_key(key: &str) -> KeyClass {
    if key.starts_with("text_encoder") || key.starts_with("lora_te") {
        return KeyClass::TextEncoder;
    }
    if key.contains("lora_magnitude_vector") || key.ends_with(".dora_scale") {
        return KeyClass::Dora;
    }
    if let Some(rest) = key.strip_prefix("lora_unet_") {
        let Some((name, suffix)) = rest.split_once('.') else {
            return KeyClass::Unrecognized;
        };
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            _ => return KeyClass::Unrecognized,
        };
        let format = (part != Part::Alpha).then_some(AdapterFormat::Kohya);
        return KeyClass::Lora {
            module: ModuleRef::Kohya(name.to_string()),
            part,
            format,
        };
    }

    let path = key.strip_prefix("base_model.model.").unwrap_or(key);
    let path = path.strip_prefix("unet.").unwrap_or(path);

    if let Some((owner, tail)) = path.split_once(".processor.") {
        let Some((projection, rest)) = tail.split_once("_lora.") else {
            return KeyClass::Unrecognized;
        };
        let module = match projection {
            "to_q" | "to_k" | "to_v" => format!("{owner}.{projection}"),
            "to_out" => format!("{owner}.to_out.0"),
            _ => return KeyClass::Unrecognized,
        };
        let part = match rest {
            "down.weight" => Part::Down,
            "up.weight" => Part::Up,
            _ => return KeyClass::Unrecognized,
        };
        return KeyClass::Lora {
            module: ModuleRef::Path(module),
            part,
            format: Some(AdapterFormat::AttnProcessor),
        };
    }

    const SUFFIXES: [(&str, Part, Option<AdapterFormat>); 7] = [
        (
            ".lora_A.weight",
            Part::Down,
            Some(AdapterFormat::DiffusersPeft),
        ),
        (
            ".lora_B.weight",
            Part::Up,
            Some(AdapterFormat::DiffusersPeft),
        ),
        (
            ".lora.down.weight",
            Part::Down,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (
            ".lora.up.weight",
            Part::Up,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (
            ".lora_down.weight",
            Part::Down,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (
            ".lora_up.weight",
            Part::Up,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (".alpha", Part::Alpha, None),
    ];
    for (suffix, part, format) in SUFFIXES {
        if let Some(module) = path.strip_suffix(suffix) {
            if module.is_empty() {
                return KeyClass::Unrecognized;
            }
            return KeyClass::Lora {
                module: ModuleRef::Path(module.to_string()),
                part,
                format,
            };
        }
    }
    KeyClass::Unrecognized
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(module: &str, part: Part, format: Option<AdapterFormat>) -> KeyClass {
        KeyClass::Lora {
            module: ModuleRef::Path(module.to_string()),
            part,
            format,
        }
    }

    #[test]
    fn classifies_every_spelling() {
        let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
        let q = format!("{attn}.to_q");
        let peft = Some(AdapterFormat::DiffusersPeft);
        let legacy = Some(AdapterFormat::DiffusersLegacy);
        assert_eq!(
            classify_key(&format!("unet.{q}.lora_A.weight")),
            lora(&q, Part::Down, peft)
        );
        assert_eq!(
            classify_key(&format!("{q}.lora_B.weight")),
            lora(&q, Part::Up, peft)
        );
        assert_eq!(
            classify_key(&format!("base_model.model.{q}.lora_A.weight")),
            lora(&q, Part::Down, peft)
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.lora.down.weight")),
            lora(&q, Part::Down, legacy)
        );
        assert_eq!(
            classify_key(&format!("{q}.lora_up.weight")),
            lora(&q, Part::Up, legacy)
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.alpha")),
            lora(&q, Part::Alpha, None)
        );
        assert_eq!(
            classify_key(&format!("unet.{attn}.processor.to_out_lora.up.weight")),
            lora(
                &format!("{attn}.to_out.0"),
                Part::Up,
                Some(AdapterFormat::AttnProcessor)
            )
        );
        assert_eq!(
            classify_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"),
            KeyClass::Lora {
                module: ModuleRef::Kohya("mid_block_attentions_0_proj_in".to_string()),
                part: Part::Down,
                format: Some(AdapterFormat::Kohya),
            }
        );
        assert_eq!(
            classify_key("text_encoder.text_model.x.lora_A.weight"),
            KeyClass::TextEncoder
        );
        assert_eq!(
            classify_key("lora_te1_text_model_x.lora_down.weight"),
            KeyClass::TextEncoder
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.lora_magnitude_vector")),
            KeyClass::Dora
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.weight")),
            KeyClass::Unrecognized
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.lora_B.bias")),
            KeyClass::Unrecognized
        );
    }
}

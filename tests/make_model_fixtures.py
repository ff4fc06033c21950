"""Model parity fixtures for rl4pix-model (tokenizer, text encoder, VAE, UNet, attention capture,
DDIM / Euler-ancestral schedulers, the InstructPix2Pix pipeline, LoRA files).

How to rerun
------------
    cd /work/main && /work/pyenv/bin/python tests/make_model_fixtures.py

Needs torch, diffusers, transformers, peft, safetensors, Pillow and open_clip_torch (only for the CLIP BPE
vocabulary file it ships, `open_clip/bpe_simple_vocab_16e6.txt.gz`). No network access: nothing is downloaded,
every model is built from a config with random weights from fixed torch seeds. Runs on CPU in float32 with
deterministic algorithms and one thread; a rerun with the same package versions rewrites identical files. CI never
runs this script; the outputs are committed.

What it writes (all under tests/fixtures/)
-----------------------------------------
tokenizer/clip/
    vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json
        The real CLIP BPE (49408 tokens, 48894 merges) in the layout of the SD-1 checkpoints' tokenizer folder.
    reference.json
        {"cases": [{"text", "ids" (77 ints), "pad_token"}...]}: ids from transformers' CLIPTokenizer loaded from
        this folder, called as the diffusers pipeline calls it (padding="max_length", truncation=True,
        max_length=77), once with pad "<|endoftext|>" (SD-1) and once with pad "!" (SD-2).
pipelines/sd1/, pipelines/sd2/
    Tiny random-weight StableDiffusionInstructPix2PixPipeline folders written by `save_pretrained`
    (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/; no safety checker). The tokenizer is a
    truncated CLIP BPE (all byte tokens + the first 1000 merges + the two special tokens). sd1 is laid out like
    the published InstructPix2Pix repository (tokenizer as vocab.json + merges.txt; text encoder keys with the
    `text_model.` prefix and the position_ids buffer, as transformers 4 wrote them); sd2 as today's libraries
    write it (tokenizer.json with pad token "!"; text encoder keys without the prefix, as transformers 5 writes).
    Every weight is rounded to f16 precision and stored as f16 (to stay small); the references below are computed
    in f32 from exactly those values, so a loader that upcasts the stored f16 weights to f32 must reproduce them.
pipelines/<name>.reference.safetensors + pipelines/<name>.reference.json
    Reference tensors (text encoder, VAE, UNet at an aligned and an odd latent size, cross-attention maps of every
    attn2, DDIM eta 0/1 chains with log-probabilities, Euler-ancestral chain, pipeline float outputs). The json
    records every input (prompts, sizes, seeds, steps, guidance), the attn2 module paths in execution order, the
    VAE scale factor, scaling_factor, the effective scheduler configs and the package versions.
pipelines/<name>.pipeline.input.png, <name>.pipeline.latents.safetensors (one tensor `latents`),
pipelines/<name>.pipeline.output.png, <name>.pipeline.lora.output.png
    One full InstructPix2Pix run (DDIM, eta 0, given latents) without and with the LoRA.
pipelines/<name>.lora.safetensors
    A peft LoRA (rank 4, alpha 8) on to_q/to_k/to_v/to_out.0 of the UNet, written by the pipeline class's
    `save_lora_weights` (keys `unet.<path>.lora_A.weight` / `.lora_B.weight`, metadata `lora_adapter_metadata`).
pipelines/sd1.lora_kohya.safetensors
    The same adapter in kohya spelling (`lora_unet_<path with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`).

Self-checks (the script fails if one does not hold): the saved pipeline folder, reloaded with
`StableDiffusionInstructPix2PixPipeline.from_pretrained`, reproduces pipeline.output.png exactly; a fresh pipeline
with `load_lora_weights(<name>.lora.safetensors)` (and the kohya file) loads with no missing/unexpected keys and
reproduces the LoRA output; the attention-recording processor gives the same UNet output as diffusers' default one;
no reference tensor is degenerate.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import diffusers
import open_clip
import peft
import safetensors
import tokenizers
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

TESTS_DIR = Path(__file__).resolve().parent
FIXTURES = TESTS_DIR / "fixtures"
TOKENIZER_DIR = FIXTURES / "tokenizer" / "clip"
PIPELINES_DIR = FIXTURES / "pipelines"
BPE_FILE = Path(open_clip.__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"

MAX_LENGTH = 77
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# Number of BPE merges in the real CLIP vocabulary (49408 = 2 * 256 bytes + merges + 2 specials).
CLIP_MERGES = 49408 - 512 - 2
TINY_MERGES = 1000

VERSIONS = {
    "torch": torch.__version__,
    "diffusers": diffusers.__version__,
    "transformers": transformers.__version__,
    "tokenizers": tokenizers.__version__,
    "peft": peft.__version__,
    "safetensors": safetensors.__version__,
    "numpy": np.__version__,
    "open_clip_torch": open_clip.__version__,
    "python": sys.version.split()[0],
}


def set_determinism() -> None:
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    torch.use_deterministic_algorithms(True)
    # One thread: reduction order (and so every rounding) does not depend on the machine's core count.
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------------------------
# CLIP BPE vocabulary
# ----------------------------------------------------------------------------------------------


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for the raw bytes, in vocabulary order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in printable] + [mapping[b] for b in range(256) if b not in printable]


def clip_bpe(num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary (token -> id) and merge list, built the way CLIP builds them from the open_clip file.

    With fewer than all merges the result is still a closed BPE: every merge only uses bytes or tokens made by
    earlier merges."""
    lines = gzip.open(BPE_FILE).read().decode("utf-8").split("\n")
    # lines[0] is a version header.
    merges = [tuple(line.split()) for line in lines[1 : 1 + num_merges]]
    assert all(len(m) == 2 for m in merges)
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate token in the BPE vocabulary"
    return vocab, merges


def added_token(content: str) -> dict:
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": True,
        "rstrip": False,
        "single_word": False,
    }


def write_vocab_merges_tokenizer(folder: Path, vocab: dict[str, int], merges, pad_token: str) -> None:
    """The slow-tokenizer layout of the SD-1 / InstructPix2Pix repositories."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False, separators=(",", ":"))
    with open(folder / "merges.txt", "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        f.writelines(f"{a} {b}\n" for a, b in merges)
    config = {
        "add_prefix_space": False,
        "bos_token": added_token(BOS),
        "do_lower_case": True,
        "eos_token": added_token(EOS),
        "errors": "replace",
        "model_max_length": MAX_LENGTH,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": added_token(EOS),
    }
    write_json(folder / "tokenizer_config.json", config, indent=2)
    special = {
        "bos_token": {k: v for k, v in added_token(BOS).items() if k != "__type"},
        "eos_token": {k: v for k, v in added_token(EOS).items() if k != "__type"},
        "pad_token": pad_token,
        "unk_token": {k: v for k, v in added_token(EOS).items() if k != "__type"},
    }
    write_json(folder / "special_tokens_map.json", special, indent=2)


def write_json(path: Path, value, indent=None) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(value, f, ensure_ascii=False, indent=indent, separators=None if indent else (",", ":"))
        f.write("\n")


def canonicalize_safetensors(path: Path) -> None:
    """Rewrite the header with sorted metadata keys. safetensors keeps metadata in a hash map, so its order (and
    thus the file's bytes) changes from run to run otherwise; tensor entries and data are left as they are."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    data = raw[8 + header_len :]
    metadata = header.pop("__metadata__", None)
    ordered = {}
    if metadata is not None:
        ordered["__metadata__"] = dict(sorted(metadata.items()))
    ordered.update(header)
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def plain_config(config) -> dict:
    """A scheduler config as a json-able dict without diffusers' bookkeeping (whose set order varies by run)."""
    return {k: v for k, v in dict(config).items() if k != "_use_default_values"}


def call_like_pipeline(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
    assert len(ids) == MAX_LENGTH
    return list(ids)


LONG_TEXT = (
    "A very long instruction that keeps going: replace the old wooden fishing boat in the harbour with a bright "
    "red sailboat, make the clouds pink and orange like a sunset, add three seagulls flying over the water, turn "
    "the lighthouse on the left into a tall stone tower with a glowing lamp, put snow on the distant mountains, "
    "and finally paint everything in the style of an impressionist oil painting with thick visible brush strokes."
)

TOKENIZER_CASES = [
    "",
    "a",
    "a photo of a cat",
    "Turn the sky into a STARRY night, in the style of Van Gogh!!!",
    "Café crème brûlée",
    "Cafe\u0301 (combining accent)",
    "🐶🔥 dog on fire 🎉🎉",
    "东京的夜景，下雨",
    "日本語のテキストと한국어",
    "it's I'd we'll they're you've I'm don't IT'S He'D",
    "it\u2019s a curly apostrophe",
    "multiple   spaces\n\nnewlines\ttabs\r\nand   more  ",
    "   leading and trailing whitespace   ",
    "non\u00a0breaking\u2003em\u3000ideographic spaces",
    "zero\u200bwidth joiner",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;x&#39;",
    "numbers 1234567890 3.14 1,000,000 2nd 10x 007",
    "punctuation!?.,;:-_()[]{}<>/\\|@#$%^&*+=~`\"'",
    "\u00a1Hola! \u00bfQu\u00e9 tal? Stra\u00dfe \u00c5ngstr\u00f6m na\u00efve \u0152uvre",
    "\ufb01 ligature and \uff26\uff55\uff4c\uff4c\uff57\uff49\uff44\uff54\uff48 letters",
    "<|startoftext|>special tokens<|endoftext|> inline",
    "hello-world e-mail o'clock rock'n'roll",
    "x" * 300,
    LONG_TEXT,
    LONG_TEXT + " " + LONG_TEXT,
]


_OPEN_CLIP_TOKENIZER = []


def open_clip_ids(text: str) -> list[int]:
    """open_clip's own Python BPE (ftfy + html unescape + whitespace cleanup), for information only."""
    if not _OPEN_CLIP_TOKENIZER:
        from open_clip.tokenizer import SimpleTokenizer

        _OPEN_CLIP_TOKENIZER.append(SimpleTokenizer())
    tok = _OPEN_CLIP_TOKENIZER[0]
    return [tok.sot_token_id] + tok.encode(text)[: MAX_LENGTH - 2] + [tok.eot_token_id]


def make_tokenizer_fixture() -> None:
    if TOKENIZER_DIR.exists():
        shutil.rmtree(TOKENIZER_DIR)
    vocab, merges = clip_bpe(CLIP_MERGES)
    assert len(vocab) == 49408
    write_vocab_merges_tokenizer(TOKENIZER_DIR, vocab, merges, pad_token=EOS)
    cases = []
    notes = []
    for pad_token in (EOS, "!"):
        tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, pad_token=pad_token)
        assert tokenizer.model_max_length == MAX_LENGTH
        assert tokenizer.pad_token == pad_token
        for text in TOKENIZER_CASES:
            ids = call_like_pipeline(tokenizer, text)
            cases.append({"text": text, "ids": ids, "pad_token": pad_token, "pad_token_id": tokenizer.pad_token_id})
            if pad_token == EOS:
                reference = open_clip_ids(text)
                if reference + [vocab[EOS]] * (MAX_LENGTH - len(reference)) != ids:
                    notes.append(text)
    assert sum(1 for c in cases if len(c["text"]) > 200) >= 4
    document = {
        "generated_by": "tests/make_model_fixtures.py",
        "versions": VERSIONS,
        "call": "CLIPTokenizer.from_pretrained(dir, pad_token=pad_token)(text, padding='max_length', "
        "max_length=77, truncation=True).input_ids",
        "note": "transformers >= 5 has a single CLIPTokenizer (tokenizers-backed; CLIPTokenizerFast is an alias), "
        "so there is no slow/fast disagreement to record. open_clip's own Python tokenizer (ftfy, html.unescape) "
        "gives other ids for the texts in open_clip_differs; the ids here are transformers', which is what the "
        "diffusers pipeline uses.",
        "pad_bang_note": "with pad_token '!' transformers registers '!' as a special added token (matched before "
        "BPE, like <|startoftext|>/<|endoftext|>): every '!' in the text becomes id 0 and never merges, e.g. "
        "'gogh!!!' -> ..., 0, 0, 0 instead of the merged '!!!</w>' token. Special tokens written inline in the text "
        "are recognized as special ids with either pad token.",
        "open_clip_differs": notes,
        "cases": cases,
    }
    write_json(TOKENIZER_DIR / "reference.json", document)


# ----------------------------------------------------------------------------------------------
# Tiny random-weight models
# ----------------------------------------------------------------------------------------------

PIPELINE_SPECS = {
    "sd1": {
        "text_encoder": dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="quick_gelu",
            projection_dim=32,
        ),
        "unet": dict(
            sample_size=16,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=32,
            attention_head_dim=2,
            use_linear_projection=False,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=4,
            sample_size=32,
            scaling_factor=0.18215,
        ),
        "scheduler": (
            DDIMScheduler,
            dict(
                num_train_timesteps=1000,
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="scaled_linear",
                clip_sample=False,
                set_alpha_to_one=False,
                steps_offset=1,
                timestep_spacing="leading",
                prediction_type="epsilon",
            ),
        ),
        "pad_token": EOS,
        "tokenizer_layout": "vocab.json+merges.txt",
        "text_encoder_layout": "transformers4",
        "seed": 1001,
    },
    "sd2": {
        "text_encoder": dict(
            hidden_size=24,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=3,
            hidden_act="gelu",
            projection_dim=24,
        ),
        "unet": dict(
            sample_size=16,
            in_channels=8,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(8, 16, 24),
            layers_per_block=2,
            norm_num_groups=4,
            cross_attention_dim=24,
            attention_head_dim=[2, 2, 3],
            use_linear_projection=True,
        ),
        "vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
            scaling_factor=0.13025,
        ),
        "scheduler": (
            EulerAncestralDiscreteScheduler,
            dict(
                num_train_timesteps=1000,
                beta_start=0.00085,
                beta_end=0.012,
                beta_schedule="linear",
                steps_offset=0,
                timestep_spacing="trailing",
                prediction_type="epsilon",
                # Not Euler's own keys: kept in the config file (as in the real InstructPix2Pix scheduler config)
                # and used by DDIMScheduler.from_config. set_alpha_to_one=False keeps the last DDIM step's
                # variance non-zero under trailing spacing; clip_sample=True exercises x0 clipping.
                clip_sample=True,
                set_alpha_to_one=False,
                skip_prk_steps=True,
            ),
        ),
        "pad_token": "!",
        "tokenizer_layout": "tokenizer.json",
        "text_encoder_layout": "transformers5",
        "seed": 2002,
    },
}

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm)


@torch.no_grad()
def randomize_weights(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter so no layer is an identity or zero map (diffusers zero-initializes some
    projections), keeping activations O(1): norms 1 +- 0.1, biases ~0.1, weights ~1/sqrt(fan_in). Then round to
    f16 precision, so f16 and f32 copies of the fixture weights are the same numbers."""
    generator = torch.Generator().manual_seed(seed)
    norm_params = set()
    for module in model.modules():
        if isinstance(module, NORM_TYPES):
            norm_params.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if id(param) in norm_params and name.endswith("weight"):
            value = 1.0 + 0.1 * noise
        elif param.ndim == 1:
            value = 0.1 * noise
        else:
            fan_in = param[0].numel()
            value = noise / math.sqrt(fan_in)
        param.copy_(value.half().float())


def round_to_f16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.half().float()


def build_tokenizer(spec: dict) -> CLIPTokenizer:
    vocab, merges = clip_bpe(TINY_MERGES)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        pad_token=spec["pad_token"],
        model_max_length=MAX_LENGTH,
    )


def build_pipeline(name: str) -> StableDiffusionInstructPix2PixPipeline:
    spec = PIPELINE_SPECS[name]
    seed = spec["seed"]
    tokenizer = build_tokenizer(spec)
    vocab_size = len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=MAX_LENGTH,
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **spec["text_encoder"],
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(text_config).eval()
    unet = UNet2DConditionModel(**spec["unet"]).eval()
    vae = AutoencoderKL(**spec["vae"]).eval()
    randomize_weights(text_encoder, seed + 1)
    randomize_weights(unet, seed + 2)
    randomize_weights(vae, seed + 3)
    scheduler_class, scheduler_config = spec["scheduler"]
    scheduler = scheduler_class.from_config(scheduler_config)
    return StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )


def save_pipeline(pipe, name: str) -> Path:
    folder = PIPELINES_DIR / name
    if folder.exists():
        shutil.rmtree(folder)
    # The weights are f16-exact (see randomize_weights), so storing them as f16 loses nothing and halves the size.
    for component in (pipe.unet, pipe.vae, pipe.text_encoder):
        component.half()
    pipe.save_pretrained(folder, safe_serialization=True)
    spec = PIPELINE_SPECS[name]
    if spec["text_encoder_layout"] == "transformers4":
        # transformers >= 5 writes CLIPTextModel keys without the `text_model.` prefix; the published SD-1 /
        # InstructPix2Pix checkpoints (written by transformers 4) have it, plus the int64 position_ids buffer.
        weights_file = folder / "text_encoder" / "model.safetensors"
        flat = load_file(weights_file)
        prefixed = {"text_model." + key: value for key, value in flat.items()}
        prefixed["text_model.embeddings.position_ids"] = torch.arange(MAX_LENGTH, dtype=torch.int64)[None]
        save_file(prefixed, weights_file, metadata={"format": "pt"})
    for weights_file in folder.rglob("*.safetensors"):
        canonicalize_safetensors(weights_file)
    if spec["tokenizer_layout"] == "vocab.json+merges.txt":
        # Same tokenizer, written the way the real timbrooks/instruct-pix2pix repository ships it.
        tokenizer_dir = folder / "tokenizer"
        shutil.rmtree(tokenizer_dir)
        vocab, merges = clip_bpe(TINY_MERGES)
        write_vocab_merges_tokenizer(tokenizer_dir, vocab, merges, pad_token=spec["pad_token"])
    return folder


# ----------------------------------------------------------------------------------------------
# Cross-attention capture
# ----------------------------------------------------------------------------------------------


class CrossAttentionRecorder:
    """An attention processor with the default processor's math, done explicitly so the head-averaged
    probabilities can be kept. Installed on every attn2 (cross-attention) module."""

    def __init__(self, module_path: str, log: dict, order: list):
        self.module_path = module_path
        self.log = log
        self.order = order

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        assert attention_mask is None, "the UNet is called without an attention mask"
        assert attn.spatial_norm is None and attn.group_norm is None and hidden_states.ndim == 3
        residual = hidden_states
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        batch, queries, _ = hidden_states.shape
        keys = context.shape[1]
        heads = attn.heads

        def split_heads(x, length):
            return x.reshape(batch, length, heads, -1).transpose(1, 2)

        q = split_heads(attn.to_q(hidden_states), queries)
        k = split_heads(attn.to_k(context), keys)
        v = split_heads(attn.to_v(context), keys)
        probs = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) * attn.scale, dim=-1)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, queries, -1)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        out = out / attn.rescale_output_factor
        self.log[self.module_path] = probs.mean(dim=1)
        self.order.append(self.module_path)
        return out


def cross_attention_modules(unet) -> list[str]:
    return [name for name, _ in unet.named_modules() if name.endswith("attn2")]


def unet_with_recorders(unet):
    """Installs recorders on every attn2; returns (maps dict, execution order list, restore function)."""
    saved = {name: proc for name, proc in unet.attn_processors.items()}
    maps: dict[str, torch.Tensor] = {}
    order: list[str] = []
    processors = {}
    for key, proc in saved.items():
        module_path = key[: -len(".processor")]
        processors[key] = CrossAttentionRecorder(module_path, maps, order) if module_path.endswith("attn2") else proc
    unet.set_attn_processor(processors)

    def restore():
        unet.set_attn_processor(saved)

    return maps, order, restore


# ----------------------------------------------------------------------------------------------
# Reference tensors
# ----------------------------------------------------------------------------------------------


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=gen(seed))


def check_not_degenerate(name: str, tensor: torch.Tensor, min_std: float = 1e-3) -> float:
    t = tensor.float()
    assert torch.isfinite(t).all(), f"{name} has non-finite values"
    std = t.std().item() if t.numel() > 1 else 1.0
    assert std > min_std, f"{name} is degenerate (std {std})"
    return std


TEXT_PROMPTS = [
    "",
    "a photo of a cat",
    "Turn the sky into a STARRY night, in the style of Van Gogh!!! 🌌",
    LONG_TEXT,
]


def text_references(pipe, tensors: dict, info: dict) -> None:
    batch = pipe.tokenizer(
        TEXT_PROMPTS, padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="pt"
    )
    ids = batch.input_ids.to(torch.int64)
    hidden = pipe.text_encoder(ids)[0]
    tensors["text.ids"] = ids
    tensors["text.hidden"] = hidden
    info["text_prompts"] = TEXT_PROMPTS
    info["text_pad_token"] = pipe.tokenizer.pad_token
    info["text_pad_token_id"] = pipe.tokenizer.pad_token_id


def vae_references(pipe, tensors: dict, info: dict, seed: int) -> None:
    height, width = 24, 40
    image = (torch.rand((1, 3, height, width), generator=gen(seed)) * 2 - 1) * 0.95
    decode_in = randn((1, 4, 5, 8), seed + 1)
    tensors["vae.image"] = image
    tensors["vae.mode"] = pipe.vae.encode(image).latent_dist.mode()
    tensors["vae.decode_in"] = decode_in
    tensors["vae.decoded"] = pipe.vae.decode(decode_in).sample
    info["vae"] = {
        "image": "uniform in [-0.95, 0.95), torch.rand with seed",
        "image_shape": list(image.shape),
        "decode_in_shape": list(decode_in.shape),
        "seed": seed,
        "mode": "vae.encode(image).latent_dist.mode() (no scaling)",
        "decoded": "vae.decode(decode_in).sample (no scaling)",
    }


def unet_references(pipe, tensors: dict, info: dict, seed: int) -> None:
    unet = pipe.unet
    text_dim = pipe.text_encoder.config.hidden_size
    for prefix, (h, w), timesteps in (
        ("unet", (4, 8), [981, 437, 3]),
        ("unet_odd", (5, 7), [999, 1]),
    ):
        batch = len(timesteps)
        sample = randn((batch, 8, h, w), seed)
        context = randn((batch, MAX_LENGTH, text_dim), seed + 1)
        steps = torch.tensor(timesteps, dtype=torch.int64)
        out = unet(sample, steps, encoder_hidden_states=context).sample
        tensors[f"{prefix}.sample"] = sample
        tensors[f"{prefix}.timesteps"] = steps
        tensors[f"{prefix}.encoder_hidden_states"] = context
        tensors[f"{prefix}.out"] = out
        info[prefix] = {
            "sample_shape": list(sample.shape),
            "timesteps": timesteps,
            "encoder_hidden_states_shape": list(context.shape),
            "seed_sample": seed,
            "seed_encoder_hidden_states": seed + 1,
            "call": "unet(sample, timesteps, encoder_hidden_states=...).sample",
        }
        if prefix == "unet":
            maps, order, restore = unet_with_recorders(unet)
            recorded_out = unet(sample, steps, encoder_hidden_states=context).sample
            restore()
            diff = (recorded_out - out).abs().max().item()
            assert diff < 1e-4, f"recording processor changes the UNet output by {diff}"
            expected = cross_attention_modules(unet)
            assert sorted(order) == sorted(expected) and len(order) == len(set(order)), (order, expected)
            for path in order:
                probs = maps[path]
                assert probs.shape[0] == batch and probs.shape[2] == MAX_LENGTH
                assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
                tensors[f"attn.{path}"] = probs
            info["attn2_modules"] = order
            info["attn"] = {
                "recorded_during": "unet",
                "value": "softmax(Q K^T * attn.scale) averaged over heads, shape (B, H_l*W_l, 77)",
                "max_abs_diff_recorder_vs_default_processor": diff,
                "shapes": {path: list(maps[path].shape) for path in order},
                "max_prob": {path: maps[path].max().item() for path in order},
            }
            h_mult = 2 ** (len(unet.config.block_out_channels) - 1)
            info["unet_total_downsampling"] = h_mult


def ddim_log_prob(prev_sample, mean, std):
    per_element = (
        -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - torch.log(torch.sqrt(torch.tensor(2 * math.pi)))
    )
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def ddim_references(pipe, tensors: dict, info: dict, seed: int) -> None:
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    steps = 5
    shape = (2, 4, 4, 6)
    scheduler.set_timesteps(steps)
    tensors["ddim.timesteps"] = scheduler.timesteps.to(torch.int64).clone()
    tensors["ddim.alphas_cumprod"] = scheduler.alphas_cumprod.float().clone()
    info["ddim"] = {
        "num_inference_steps": steps,
        "latent_shape": list(shape),
        "config": plain_config(scheduler.config),
        "seed": seed,
        "etas": [0.0, 1.0],
        "prev_timestep": "t - num_train_timesteps // num_inference_steps",
        "log_prob": "mean over (C,H,W) of -(x-mean)^2/(2 std^2) - log(std) - log(sqrt(2 pi)), std = eta * "
        "sqrt(_get_variance(t, prev_t)); mean = step(..., variance_noise=0).prev_sample",
        "variance": [],
    }
    for eta in (0.0, 1.0):
        prefix = f"ddim.eta{int(eta)}."
        sample = randn(shape, seed + int(eta) * 100)
        stacks = {k: [] for k in ("model_output", "sample", "noise", "prev_sample", "log_prob")}
        for i, t in enumerate(scheduler.timesteps):
            model_output = randn(shape, seed + int(eta) * 100 + 10 + i)
            noise = randn(shape, seed + int(eta) * 100 + 50 + i)
            prev = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
            stacks["model_output"].append(model_output)
            stacks["sample"].append(sample)
            stacks["noise"].append(noise)
            stacks["prev_sample"].append(prev)
            if eta > 0:
                mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros(shape)).prev_sample
                prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
                variance = scheduler._get_variance(t, prev_t)
                std = eta * variance.sqrt()
                assert torch.allclose(prev, mean + std * noise, atol=1e-5)
                stacks["log_prob"].append(ddim_log_prob(prev, mean, std))
                info["ddim"]["variance"].append(float(variance))
            sample = prev
        for key, values in stacks.items():
            if values:
                tensors[prefix + key] = torch.stack(values)


def euler_references(pipe, tensors: dict, info: dict, seed: int) -> None:
    scheduler = EulerAncestralDiscreteScheduler.from_config(pipe.scheduler.config)
    steps = 5
    shape = (2, 4, 4, 6)
    scheduler.set_timesteps(steps)
    tensors["euler.timesteps"] = scheduler.timesteps.float().clone()
    tensors["euler.sigmas"] = scheduler.sigmas.float().clone()
    tensors["euler.init_noise_sigma"] = torch.tensor([float(scheduler.init_noise_sigma)], dtype=torch.float32)
    sample = randn(shape, seed) * scheduler.init_noise_sigma
    stacks = {k: [] for k in ("sample", "scaled_input", "model_output", "noise", "prev_sample")}
    injected: list[torch.Tensor] = []
    original_randn = scheduling_euler_ancestral_discrete.randn_tensor

    def recorded_noise(shape_, **kwargs):
        assert tuple(shape_) == shape
        return injected[-1]

    scheduling_euler_ancestral_discrete.randn_tensor = recorded_noise
    try:
        for i, t in enumerate(scheduler.timesteps):
            scaled = scheduler.scale_model_input(sample, t)
            model_output = randn(shape, seed + 10 + i)
            noise = randn(shape, seed + 50 + i)
            injected.append(noise)
            prev = scheduler.step(model_output, t, sample).prev_sample
            for key, value in (
                ("sample", sample),
                ("scaled_input", scaled),
                ("model_output", model_output),
                ("noise", noise),
                ("prev_sample", prev),
            ):
                stacks[key].append(value)
            sample = prev
    finally:
        scheduling_euler_ancestral_discrete.randn_tensor = original_randn
    for key, values in stacks.items():
        tensors["euler." + key] = torch.stack(values)
    info["euler"] = {
        "num_inference_steps": steps,
        "latent_shape": list(shape),
        "config": plain_config(scheduler.config),
        "seed": seed,
        "initial_sample": "randn(seed) * init_noise_sigma",
        "noise": "the exact tensor the step added (sigma_up * noise); randn_tensor in the scheduler module was "
        "replaced to return it",
    }


# ----------------------------------------------------------------------------------------------
# Full pipeline runs and LoRA
# ----------------------------------------------------------------------------------------------

PIPELINE_RUN = {
    "prompt": "turn the square red and add a moon",
    "steps": 4,
    "guidance_scale": 7.5,
    "image_guidance_scale": 1.5,
    "scheduler": "ddim",
    "eta": 0.0,
    "negative_prompt": None,
    "width": 40,
    "height": 24,
}


def synthetic_input_image(width: int, height: int) -> Image.Image:
    """A deterministic picture with gradients and hard edges (no randomness, no file dependency)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    rgb = np.stack(
        [
            40 + 180 * x / (width - 1),
            60 + 150 * y / (height - 1),
            200 - 120 * (x + y) / (width + height - 2),
        ],
        axis=-1,
    )
    rgb[4:12, 6:16] = (30, 200, 60)  # a green rectangle
    circle = (x - 28) ** 2 + (y - 14) ** 2 <= 36
    rgb[circle] = (250, 240, 40)  # a yellow disc
    return Image.fromarray(np.clip(np.round(rgb), 0, 255).astype(np.uint8), mode="RGB")


def run_pipeline(pipe, image: Image.Image, latents: torch.Tensor, output_type: str):
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    original = pipe.scheduler
    pipe.scheduler = ddim
    try:
        result = pipe(
            prompt=PIPELINE_RUN["prompt"],
            image=image,
            num_inference_steps=PIPELINE_RUN["steps"],
            guidance_scale=PIPELINE_RUN["guidance_scale"],
            image_guidance_scale=PIPELINE_RUN["image_guidance_scale"],
            negative_prompt=PIPELINE_RUN["negative_prompt"],
            eta=PIPELINE_RUN["eta"],
            latents=latents.clone(),
            output_type=output_type,
        ).images
    finally:
        pipe.scheduler = original
    if output_type == "np":
        return torch.from_numpy(np.asarray(result)).float()
    return result[0]


def pil_equal(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


def png_stats(image_float: torch.Tensor) -> dict:
    return {
        "mean": image_float.mean().item(),
        "std": image_float.std().item(),
        "fraction_clipped": ((image_float <= 0) | (image_float >= 1)).float().mean().item(),
    }


def lora_target_paths(unet) -> list[str]:
    return sorted(
        name
        for name, _ in unet.named_modules()
        if name.endswith((".to_q", ".to_k", ".to_v", ".to_out.0")) and ".lora_" not in name
    )


@torch.no_grad()
def add_random_lora(unet, seed: int, rank: int, alpha: int) -> LoraConfig:
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian",
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
    )
    unet.add_adapter(config)
    generator = gen(seed)
    for name, param in unet.named_parameters():
        if ".lora_A." in name:
            fan_in = param.shape[1]
            param.copy_(round_to_f16(torch.randn(param.shape, generator=generator) / math.sqrt(fan_in)))
        elif ".lora_B." in name:
            # lora_B starts at zero in peft; a non-zero one makes the adapter change the output.
            param.copy_(round_to_f16(0.3 * torch.randn(param.shape, generator=generator) / math.sqrt(rank)))
    return config


def adapter_metadata(config: LoraConfig) -> dict:
    """peft's config dict with sets turned into sorted lists, so the written metadata is the same every run."""
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}


def kohya_state_dict(lora_state: dict, alpha: float) -> dict:
    out = {}
    for key, value in lora_state.items():
        for peft_part, kohya_part in ((".lora_A.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_up.weight")):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                stem = "lora_unet_" + module.replace(".", "_")
                out[stem + kohya_part] = value.contiguous()
                out[stem + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
    return out


class WarningCollector(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_lora_fresh(folder: Path, lora_file: Path, reference_state: dict) -> tuple:
    """A newly loaded pipeline with the LoRA file applied; checks every LoRA tensor arrived unchanged."""
    fresh = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, dtype=torch.float32)
    collector = WarningCollector()
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(collector)
    try:
        fresh.load_lora_weights(str(lora_file.parent), weight_name=lora_file.name, adapter_name="default")
    finally:
        diffusers_logger.removeHandler(collector)
    loaded = get_peft_model_state_dict(fresh.unet, adapter_name="default")
    missing = sorted(set(reference_state) - set(loaded))
    unexpected = sorted(set(loaded) - set(reference_state))
    mismatched = sorted(k for k in reference_state if k in loaded and not torch.equal(loaded[k], reference_state[k]))
    key_warnings = [m for m in collector.messages if "missing keys" in m.lower() or "unexpected keys" in m.lower()]
    lora_alpha = fresh.unet.peft_config["default"].lora_alpha
    rank = fresh.unet.peft_config["default"].r
    return fresh, {
        "missing_keys": missing,
        "unexpected_keys": unexpected,
        "mismatched_values": mismatched,
        "key_warnings": key_warnings,
        "loaded_rank": rank,
        "loaded_lora_alpha": lora_alpha,
    }


def make_pipeline_fixture(name: str) -> dict:
    spec = PIPELINE_SPECS[name]
    seed = spec["seed"]
    pipe = build_pipeline(name)
    built = {
        part: {key: value.detach().clone() for key, value in getattr(pipe, part).state_dict().items()}
        for part in ("unet", "vae", "text_encoder")
    }
    folder = save_pipeline(pipe, name)
    # Reference everything from the reloaded folder, so the tensors belong to exactly the files on disk
    # (including the tokenizer as written there).
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    for part, expected in built.items():
        component = getattr(pipe, part).eval()
        assert all(p.dtype == torch.float32 for p in component.parameters())
        loaded = component.state_dict()
        # A silently skipped tensor would keep its random init; insist on bit-equal weights.
        assert loaded.keys() == expected.keys(), f"{name}/{part}: key sets differ after reload"
        for key, value in expected.items():
            assert torch.equal(loaded[key], value.to(loaded[key].dtype)), f"{name}/{part}: {key} changed on reload"

    tensors: dict[str, torch.Tensor] = {}
    vae_scale_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    info: dict = {
        "name": name,
        "generated_by": "tests/make_model_fixtures.py",
        "versions": VERSIONS,
        "pipeline_dir": name,
        "vae_scale_factor": vae_scale_factor,
        "scaling_factor": pipe.vae.config.scaling_factor,
        "tokenizer_files": sorted(p.name for p in (folder / "tokenizer").iterdir()),
        "text_encoder_keys": "text_model.<path> plus text_model.embeddings.position_ids (i64), as transformers 4 "
        "wrote them"
        if spec["text_encoder_layout"] == "transformers4"
        else "<path> without the text_model. prefix, as transformers 5 writes them",
        "dtype": "every tensor f32 except text.ids, unet.timesteps, unet_odd.timesteps, ddim.timesteps (i64); "
        "computed on CPU in f32 from the pipeline folder's weights (stored f16, loaded and upcast to f32)",
        "weights_dtype_on_disk": "float16 (values exactly representable; load and upcast to f32)",
    }

    with torch.no_grad():
        text_references(pipe, tensors, info)
        vae_references(pipe, tensors, info, seed + 10)
        unet_references(pipe, tensors, info, seed + 20)
    ddim_references(pipe, tensors, info, seed + 30)
    euler_references(pipe, tensors, info, seed + 40)

    # Pipeline run.
    width, height = PIPELINE_RUN["width"], PIPELINE_RUN["height"]
    image = synthetic_input_image(width, height)
    input_png = PIPELINES_DIR / f"{name}.pipeline.input.png"
    image.save(input_png)
    image = Image.open(input_png).convert("RGB")
    latents = randn((1, 4, height // vae_scale_factor, width // vae_scale_factor), seed + 60)
    latents_file = PIPELINES_DIR / f"{name}.pipeline.latents.safetensors"
    save_file({"latents": latents.contiguous()}, latents_file)
    with torch.no_grad():
        output_png = run_pipeline(pipe, image, latents, "pil")
        output_float = run_pipeline(pipe, image, latents, "np")
    output_path = PIPELINES_DIR / f"{name}.pipeline.output.png"
    output_png.save(output_path)
    assert output_float.shape == (1, height, width, 3)
    expected_png = (output_float[0].numpy() * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(output_png), expected_png)
    tensors["pipeline.output_float"] = output_float

    info["pipeline"] = {
        **PIPELINE_RUN,
        "pipeline_class": "StableDiffusionInstructPix2PixPipeline",
        "scheduler_construction": "DDIMScheduler.from_config(pipe.scheduler.config)",
        "scheduler_config": plain_config(DDIMScheduler.from_config(pipe.scheduler.config).config),
        "input_png": input_png.name,
        "latents_file": latents_file.name,
        "latents_shape": list(latents.shape),
        "latents_seed": seed + 60,
        "output_png": output_path.name,
        "output_float_key": "pipeline.output_float",
        "output_stats": png_stats(output_float),
        "call": "pipe(prompt, image=PIL input, num_inference_steps=steps, guidance_scale, image_guidance_scale, "
        "eta, latents=latents, output_type='pil' / 'np')",
    }

    # Self-check: a second, independent load of the saved folder reproduces the PNG bit for bit.
    reloaded = StableDiffusionInstructPix2PixPipeline.from_pretrained(folder, dtype=torch.float32)
    reloaded.set_progress_bar_config(disable=True)
    with torch.no_grad():
        again = run_pipeline(reloaded, image, latents, "pil")
    assert pil_equal(again, Image.open(output_path)), f"{name}: reloaded pipeline does not reproduce the PNG"
    info["self_check"] = {"reloaded_folder_reproduces_output_png": True}
    del reloaded

    # LoRA.
    rank, alpha = 4, 8
    lora_config = add_random_lora(pipe.unet, seed + 70, rank, alpha)
    lora_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(pipe.unet).items()}
    lora_file = PIPELINES_DIR / f"{name}.lora.safetensors"
    StableDiffusionInstructPix2PixPipeline.save_lora_weights(
        save_directory=str(PIPELINES_DIR),
        unet_lora_layers=lora_state,
        weight_name=lora_file.name,
        unet_lora_adapter_metadata=adapter_metadata(pipe.unet.peft_config["default"]),
        safe_serialization=True,
    )
    canonicalize_safetensors(lora_file)
    with torch.no_grad():
        lora_png = run_pipeline(pipe, image, latents, "pil")
        lora_float = run_pipeline(pipe, image, latents, "np")
    lora_png_path = PIPELINES_DIR / f"{name}.pipeline.lora.output.png"
    lora_png.save(lora_png_path)
    tensors["pipeline.lora.output_float"] = lora_float
    change = (lora_float - output_float).abs().max().item()
    assert change > 0.02, f"{name}: LoRA barely changes the output ({change})"

    fresh, load_report = load_lora_fresh(folder, lora_file, lora_state)
    fresh.set_progress_bar_config(disable=True)
    with torch.no_grad():
        fresh_float = run_pipeline(fresh, image, latents, "np")
        fresh_png = run_pipeline(fresh, image, latents, "pil")
    load_report["max_abs_diff_output_float"] = (fresh_float - lora_float).abs().max().item()
    load_report["png_identical"] = pil_equal(fresh_png, Image.open(lora_png_path))
    assert not (load_report["missing_keys"] or load_report["unexpected_keys"] or load_report["mismatched_values"])
    assert not load_report["key_warnings"], load_report["key_warnings"]
    assert load_report["loaded_lora_alpha"] == alpha and load_report["loaded_rank"] == rank
    assert load_report["png_identical"] and load_report["max_abs_diff_output_float"] == 0.0
    del fresh

    targets = lora_target_paths(pipe.unet)
    info["lora"] = {
        "file": lora_file.name,
        "rank": rank,
        "lora_alpha": alpha,
        "scale": alpha / rank,
        "target_modules": sorted(lora_config.target_modules),
        "adapted_module_paths": targets,
        "num_tensors": len(lora_state),
        "seed": seed + 70,
        "init": "lora_A ~ N(0, 1/in), lora_B ~ N(0, 0.09/rank), rounded to f16 precision, stored f32",
        "saved_with": "StableDiffusionInstructPix2PixPipeline.save_lora_weights(unet_lora_layers="
        "get_peft_model_state_dict(unet), unet_lora_adapter_metadata=unet.peft_config['default'].to_dict() "
        "with sets sorted)",
        "output_png": lora_png_path.name,
        "output_float_key": "pipeline.lora.output_float",
        "output_stats": png_stats(lora_float),
        "max_abs_change_vs_base_output": change,
        "reload_check": {
            "how": "from_pretrained(pipeline dir) then load_lora_weights(file); compared every LoRA tensor and "
            "the pipeline output",
            **load_report,
        },
    }
    assert len(targets) * 2 == len(lora_state)

    if name == "sd1":
        kohya = kohya_state_dict(lora_state, alpha)
        kohya_file = PIPELINES_DIR / f"{name}.lora_kohya.safetensors"
        save_file(
            kohya, kohya_file, metadata={"format": "pt", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha)}
        )
        canonicalize_safetensors(kohya_file)
        fresh, kohya_report = load_lora_fresh(folder, kohya_file, lora_state)
        fresh.set_progress_bar_config(disable=True)
        with torch.no_grad():
            kohya_float = run_pipeline(fresh, image, latents, "np")
        kohya_report["max_abs_diff_output_float"] = (kohya_float - lora_float).abs().max().item()
        del fresh
        assert not (kohya_report["missing_keys"] or kohya_report["unexpected_keys"])
        assert kohya_report["max_abs_diff_output_float"] < 1e-5, kohya_report
        info["lora"]["kohya_file"] = kohya_file.name
        info["lora"]["kohya_keys"] = (
            "lora_unet_<module path, '.' -> '_'>.lora_down.weight (= lora_A), .lora_up.weight (= lora_B), "
            ".alpha (f32 scalar, shape ())"
        )
        info["lora"]["kohya_reload_check"] = {"how": "diffusers load_lora_weights on the kohya file", **kohya_report}

    for key, value in tensors.items():
        if value.dtype.is_floating_point:
            tensors[key] = value.detach().float().contiguous()
            if key != "pipeline.output_float" and not key.startswith("pipeline.lora"):
                check_not_degenerate(key, value)
        else:
            tensors[key] = value.detach().to(torch.int64).contiguous()
    reference_file = PIPELINES_DIR / f"{name}.reference.safetensors"
    save_file(tensors, reference_file, metadata={"generated_by": "tests/make_model_fixtures.py"})
    info["reference_file"] = reference_file.name
    info["tensors"] = {
        key: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")} for key, v in tensors.items()
    }
    info["stats"] = {
        key: {"mean": v.float().mean().item(), "std": v.float().std().item()}
        for key, v in tensors.items()
        if v.dtype.is_floating_point and v.numel() > 1
    }
    write_json(PIPELINES_DIR / f"{name}.reference.json", info, indent=1)
    return info


def main() -> None:
    set_determinism()
    FIXTURES.mkdir(parents=True, exist_ok=True)
    PIPELINES_DIR.mkdir(parents=True, exist_ok=True)
    make_tokenizer_fixture()
    for name in PIPELINE_SPECS:
        info = make_pipeline_fixture(name)
        print(f"{name}: {len(info['tensors'])} reference tensors, attn2 modules: {len(info['attn2_modules'])}")
    written = [p for d in (TOKENIZER_DIR, PIPELINES_DIR) for p in d.rglob("*") if p.is_file()]
    total = sum(p.stat().st_size for p in written)
    print(f"files written by this script: {len(written)}, {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

"""Reference fixtures for rl4pix-training's metrics, data readers and CLIP-T.

Rerun from the repository root:

    /work/pyenv/bin/python tests/make_metrics_fixtures.py

Writes (deterministically):
  tests/fixtures/metrics/      image pairs of odd sizes with scikit-image's SSIM and PSNR and the L1/L2
                               MagicBrush's script computes; PIL bicubic resizes of two images.
  tests/fixtures/clip/tiny/    a tiny random transformers CLIPModel (config.json + model.safetensors),
                               a CLIP BPE tokenizer cut down to 1000 merges, preprocessor_config.json.
  tests/fixtures/clip/         expected.json + expected.safetensors: pixel values from CLIPImageProcessor,
                               token ids, projected image/text embeddings from transformers.
  tests/fixtures/magicbrush/   a MagicBrush-layout folder (2 sessions, masks as L, RGB and RGBA), a
                               generated/ folder named the way MagicBrush's tools name it, and
                               expected_eval.json computed here the way the Rust evaluator must.
  tests/fixtures/magicbrush_parquet/  the same sessions as hub-style parquet shards (image columns as
                               {bytes, path} structs with the `huggingface` schema metadata), plus a
                               shard for another split and one shard without `instruction`.
"""

import gzip
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import save_file
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

ROOT = Path(__file__).resolve().parent / "fixtures"
RNG = np.random.RandomState(1234)


def structured_image(w, h, rng):
    """Smooth gradients, a few blocks and a little noise: SSIM lands in a meaningful range."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack(
        [
            0.5 + 0.4 * np.sin(x / max(w, 1) * 3.0 + rng.rand() * 6),
            0.5 + 0.4 * np.cos(y / max(h, 1) * 2.5 + rng.rand() * 6),
            0.3 + 0.5 * (x + y) / (w + h),
        ],
        axis=-1,
    )
    for _ in range(3):
        x0, y0 = rng.randint(0, w), rng.randint(0, h)
        img[y0 : y0 + rng.randint(2, max(3, h // 2)), x0 : x0 + rng.randint(2, max(3, w // 2))] = rng.rand(3)
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def degrade(img, rng):
    out = img.astype(np.float64) + rng.normal(0, 12, img.shape)
    out = np.roll(out, 1, axis=1)
    h, w = img.shape[:2]
    out[h // 3 : h // 2, w // 4 : w // 2] += 40
    return np.clip(out, 0, 255).round().astype(np.uint8)


def to_float(a):
    return a.astype(np.float64) / 255.0


def pixel_metrics(gen, gt):
    """MagicBrush's image_eval.py: ToTensor() of both, mean |d| and mean d^2; PSNR per image."""
    g, t = to_float(gen), to_float(gt)
    mse = float(np.mean((g - t) ** 2))
    return {
        "l1": float(np.mean(np.abs(g - t))),
        "l2": mse,
        "psnr": float(peak_signal_noise_ratio(t, g, data_range=1)),
        "ssim": float(
            structural_similarity(
                t, g, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
            )
        ),
    }


def save_png(arr, path, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path)


# ----------------------------------------------------------------------------- metrics


def make_metrics():
    out = ROOT / "metrics"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cases = []
    for i, (w, h) in enumerate([(11, 11), (13, 17), (32, 32), (37, 29), (64, 48)]):
        gt = structured_image(w, h, RNG)
        gen = degrade(gt, RNG)
        save_png(gt, out / f"gt_{i}.png")
        save_png(gen, out / f"gen_{i}.png")
        cases.append({"gt": f"gt_{i}.png", "gen": f"gen_{i}.png", **pixel_metrics(gen, gt)})
    resizes = []
    for name, (w, h) in [("resize_src_a.png", (37, 29)), ("resize_src_b.png", (20, 24))]:
        src = structured_image(w, h, RNG)
        if name.endswith("b.png"):
            src = RNG.randint(0, 256, src.shape).astype(np.uint8)  # noise: worst case for rounding
        save_png(src, out / name)
        for tw, th in [(64, 64), (16, 20), (32, 32), (13, 41), (w, 10), (100, h)]:
            dst = f"{name[:-4]}_{tw}x{th}.png"
            Image.open(out / name).convert("RGB").resize((tw, th)).save(out / dst)
            resizes.append({"src": name, "width": tw, "height": th, "expected": dst})
    (out / "expected.json").write_text(json.dumps({"pairs": cases, "resizes": resizes}, indent=1))


# ----------------------------------------------------------------------------- CLIP


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def make_tokenizer_files(dst, merges_kept=1000):
    """OpenAI CLIP's BPE (shipped by open_clip), keeping only the first merges so the files stay small."""
    import open_clip

    bpe_path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe_path).read().decode("utf-8").split("\n")[1 : 1 + merges_kept]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (dst / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (dst / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return len(vocab)


def perturb(model, generator):
    """Random weights well away from the initialiser's tiny ones, so parity tests can fail."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.dim() == 1:
                p.copy_(0.05 * noise)
            else:
                p.copy_(noise * (1.0 / max(p.shape[-1], 1)) ** 0.5)


CLIP_TEXTS = [
    "a large red circle in the top left",
    "empty background in the center",
    "a small Blue STAR, next to the square!",
    "",
]


def make_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    out = ROOT / "clip"
    model_dir = out / "tiny"
    shutil.rmtree(out, ignore_errors=True)
    model_dir.mkdir(parents=True)
    vocab_size = make_tokenizer_files(model_dir)
    tokenizer = CLIPTokenizer(str(model_dir / "vocab.json"), str(model_dir / "merges.txt"), model_max_length=77)
    for f in ["vocab.json", "merges.txt"]:
        os.remove(model_dir / f)
    tokenizer.save_pretrained(model_dir)
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = CLIPVisionConfig(
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        hidden_act="quick_gelu",
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=24)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    perturb(model, torch.Generator().manual_seed(1))
    model.save_pretrained(model_dir)
    processor_args = dict(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPImageProcessor(**processor_args)
    processor.save_pretrained(model_dir)

    # Odd sizes, portrait and landscape, one upscaled and one needing no resize.
    images = []
    for i, (w, h) in enumerate([(37, 29), (29, 50), (32, 32), (12, 20)]):
        arr = structured_image(w, h, RNG)
        save_png(arr, out / f"image_{i}.png")
        images.append(Image.open(out / f"image_{i}.png").convert("RGB"))
    pixel_values = torch.cat([processor(images=im, return_tensors="pt").pixel_values for im in images])
    pil_values = torch.cat(
        [CLIPImageProcessorPil(**processor_args)(images=im, return_tensors="pt").pixel_values for im in images]
    )
    print("CLIP preprocessing, torchvision vs PIL backend, max |diff|:", float((pixel_values - pil_values).abs().max()))
    ids = tokenizer(CLIP_TEXTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        image_embeds = model.visual_projection(model.vision_model(pixel_values=pixel_values).pooler_output)
        text_embeds = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "pixel_values_pil": pil_values.contiguous(),
            "input_ids": ids.to(torch.int64).contiguous(),
            "image_embeds": image_embeds.contiguous(),
            "text_embeds": text_embeds.contiguous(),
        },
        out / "expected.safetensors",
    )
    (out / "expected.json").write_text(
        json.dumps({"images": [f"image_{i}.png" for i in range(len(images))], "texts": CLIP_TEXTS}, indent=1)
    )
    return model, processor, tokenizer


def clip_t(clip, gen_path, text):
    model, processor, tokenizer = clip
    image = Image.open(gen_path).convert("RGB")
    pv = processor(images=image, return_tensors="pt").pixel_values
    ids = tokenizer([text], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        i = model.visual_projection(model.vision_model(pixel_values=pv).pooler_output)
        t = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return float(torch.nn.functional.cosine_similarity(i, t).item())


# ----------------------------------------------------------------------------- MagicBrush layout


def mask_values(path):
    """White = edited region; with alpha, composited over black (as the Rust reader does)."""
    rgba = np.asarray(Image.open(path).convert("RGBA")).astype(np.float64) / 255.0
    luma = 0.299 * rgba[..., 0] + 0.587 * rgba[..., 1] + 0.114 * rgba[..., 2]
    return np.clip(luma * rgba[..., 3], 0, 1)


def region_metrics(gen, gt, src, mask):
    g, t, s = to_float(gen), to_float(gt), to_float(src)
    inside = np.abs(g - t).mean(axis=-1)
    outside = np.abs(g - s).mean(axis=-1)
    return {
        "edit_l1": float((inside * mask).sum() / mask.sum()),
        "preserve_l1": float((outside * (1 - mask)).sum() / (1 - mask).sum()),
    }


SESSIONS = {
    "101": [("add a red square in the top left", (2, 2, 9, 9), (220, 30, 30), "a red square in the top left")],
    "202": [
        ("remove the blue block", (12, 4, 20, 10), (240, 240, 240), "empty background in the top right"),
        ("make the bottom green", (3, 15, 21, 22), (30, 160, 60), "a green stripe at the bottom"),
    ],
}
SIZE = 24


def write_parquet(path, rows, drop=None):
    features = {
        "img_id": {"dtype": "string", "_type": "Value"},
        "turn_index": {"dtype": "int32", "_type": "Value"},
        "source_img": {"_type": "Image"},
        "mask_img": {"_type": "Image"},
        "instruction": {"dtype": "string", "_type": "Value"},
        "target_img": {"_type": "Image"},
    }
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    fields = [
        pa.field("img_id", pa.string()),
        pa.field("turn_index", pa.int32()),
        pa.field("source_img", image_type),
        pa.field("mask_img", image_type),
        pa.field("instruction", pa.string()),
        pa.field("target_img", image_type),
    ]
    if drop:
        fields = [f for f in fields if f.name != drop]
        features.pop(drop)
    metadata = {b"huggingface": json.dumps({"info": {"features": features}}).encode()}
    schema = pa.schema(fields, metadata=metadata)
    table = pa.Table.from_pylist([{k: v for k, v in r.items() if k != drop} for r in rows], schema=schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    # datasets writes image columns in small row groups; two here so the reader crosses a boundary.
    pq.write_table(table, path, row_group_size=2)


def image_struct(path):
    return {"bytes": path.read_bytes(), "path": path.name}


def make_magicbrush(clip):
    out = ROOT / "magicbrush"
    shutil.rmtree(out, ignore_errors=True)
    index, descriptions, rows = {}, {}, []
    per_turn = []
    for sid, turns in SESSIONS.items():
        img_dir = out / "images" / sid
        current = structured_image(SIZE, SIZE, RNG)
        save_png(current, img_dir / f"{sid}-input.png")
        index[sid] = []
        descriptions[sid] = {}
        for k, (instruction, (x0, y0, x1, y1), colour, caption) in enumerate(turns, start=1):
            target = current.copy()
            target[y0:y1, x0:x1] = colour
            region = np.zeros((SIZE, SIZE), np.uint8)
            region[y0:y1, x0:x1] = 255
            input_name = f"{sid}-input.png" if k == 1 else f"{sid}-output{k - 1}.png"
            save_png(target, img_dir / f"{sid}-output{k}.png")
            mask_path = img_dir / f"{sid}-mask{k}.png"
            if (sid, k) == ("101", 1):
                save_png(region, mask_path, "L")
            elif (sid, k) == ("202", 1):
                save_png(np.stack([region] * 3, -1), mask_path)
            else:  # white everywhere, the region opaque, the rest transparent
                save_png(np.dstack([np.full((SIZE, SIZE, 3), 255, np.uint8), region]), mask_path, "RGBA")
            index[sid].append(
                {"input": input_name, "mask": mask_path.name, "instruction": instruction, "output": f"{sid}-output{k}.png"}
            )
            descriptions[sid][f"{sid}-output{k}.png"] = caption
            rows.append(
                {
                    "img_id": sid,
                    "turn_index": k,
                    "source_img": image_struct(img_dir / input_name),
                    "mask_img": image_struct(mask_path),
                    "instruction": instruction,
                    "target_img": image_struct(img_dir / f"{sid}-output{k}.png"),
                }
            )
            per_turn.append((sid, k, len(turns), current, target, mask_values(mask_path), caption))
            current = target
    (out / "edit_sessions.json").write_text(json.dumps(index, indent=1))
    (out / "local_descriptions.json").write_text(json.dumps(descriptions, indent=1))

    # Generated edits, named as MagicBrush's tools name them; one of another size (resized on scoring).
    gen_dir = out / "generated"
    scored = {"all_turn": [], "final_turn": []}
    for sid, k, n, src, gt, mask, caption in per_turn:
        names = []
        if k == 1:
            names.append((f"{sid}_1.png", ["all_turn"] + (["final_turn"] if n == 1 else [])))
        else:
            names.append((f"{sid}_inde_{k}.png", ["all_turn"]))
            if k == n:
                names.append((f"{sid}_iter_{k}.png", ["final_turn"]))
        for name, settings in names:
            gen = degrade(gt, RNG)
            path = gen_dir / sid / name
            if name == "202_inde_2.png":
                gen = np.asarray(Image.fromarray(gen).resize((32, 32)))
            save_png(gen, path)
            gen_scored = np.asarray(Image.open(path).convert("RGB").resize((SIZE, SIZE)))
            metrics = {**pixel_metrics(gen_scored, gt), **region_metrics(gen_scored, gt, src, mask)}
            metrics["clip_t"] = clip_t(clip, path, caption)
            for s in settings:
                scored[s].append(metrics)
    expected = {
        setting: {"count": len(ms), **{key: float(np.mean([m[key] for m in ms])) for key in ms[0]}}
        for setting, ms in scored.items()
    }
    (out / "expected_eval.json").write_text(json.dumps(expected, indent=1))

    pq_dir = ROOT / "magicbrush_parquet"
    shutil.rmtree(pq_dir, ignore_errors=True)
    write_parquet(pq_dir / "data" / "test-00000-of-00001.parquet", rows)
    other = dict(rows[0], img_id="909", instruction="a row of the train split")
    write_parquet(pq_dir / "data" / "train-00000-of-00001.parquet", [other])
    write_parquet(ROOT / "magicbrush_bad" / "no_instruction.parquet", rows[:1], drop="instruction")


if __name__ == "__main__":
    make_metrics()
    clip = make_clip()
    make_magicbrush(clip)
    total = sum(f.stat().st_size for d in ["metrics", "clip", "magicbrush", "magicbrush_parquet", "magicbrush_bad"] for f in (ROOT / d).rglob("*") if f.is_file())
    print(f"fixtures written under {ROOT} ({total / 1024:.0f} KiB)")

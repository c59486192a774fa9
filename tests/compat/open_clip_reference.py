"""Cross-check of `kind: hf-clip` (CLIP) against open_clip itself, on a tiny random open_clip model.

    tests/compat/open_clip_reference.sh [WORKDIR]     # does both steps below

1. `reference DIR` (in a venv with open-clip-torch and torchvision): builds a tiny CLIP in open_clip (vision 64 wide,
   2 layers, patch 16, image 64; text 64 wide, 2 layers, context 77, the real BPE vocabulary shipped in the wheel,
   QuickGELU as OpenAI's CLIP), saves its state dict, and embeds IMAGES / TEXTS with open_clip's own `preprocess`,
   tokenizer and `encode_image` / `encode_text` (normalised); writes DIR/reference.npz.
2. `compare DIR` (in whichever venv runs the project): converts the open_clip weights into a transformers CLIPModel
   folder (our own name mapping below, not open_clip's or transformers' converters), with a CLIPTokenizer made from
   the same BPE file and a CLIPImageProcessor set to open_clip's preprocessing (shortest side -> 64 bicubic, centre
   crop 64, OpenAI mean / std), loads it as a user would (`kind: hf-clip`) and prints, per item, whether token ids are
   equal, the pixel tensors' max abs difference and the cosine to open_clip's vector; exit status 1 when ids differ or
   a cosine is below 0.99999.
"""
from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
IMAGES = ["0000.png", "0060.png", "0180.png", "0300.png", "0360.png", "0480.png"]  # portrait, square, landscape
TEXTS = ["strawberry", "clip art of food, fruit", "A Photo of a   small dog  sleeping on the sofa!",
         "café naïve résumé", "an image of 3 red-and-blue cars, parked (badly) on 5th Ave."]
WIDTH, LAYERS, HEADS, EMBED, IMAGE, PATCH, CONTEXT, VOCAB = 64, 2, 2, 32, 64, 16, 77, 49408
OPENAI_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_STD = [0.26862954, 0.26130258, 0.27577711]


def reference(out: Path) -> None:
    import open_clip
    import torch
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    from PIL import Image

    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=EMBED, quick_gelu=True,
        vision_cfg=CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH,
                                 image_size=IMAGE),
        text_cfg=CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS)).eval()
    with torch.no_grad():  # random weights with some spread (open_clip inits biases and LN to 0 / 1)
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(0.05 * torch.randn_like(p))
    preprocess = open_clip.image_transform(IMAGE, is_train=False, mean=OPENAI_MEAN, std=OPENAI_STD)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # SimpleTokenizer on bpe_simple_vocab_16e6.txt.gz, context 77
    pixels = torch.stack([preprocess(Image.open(ROOT / "data/demo/images" / n)) for n in IMAGES])
    ids = tokenizer(TEXTS)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(ids, normalize=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "open_clip_state.pt")
    bpe = Path(open_clip.tokenizer.default_bpe())
    (out / "bpe_simple_vocab_16e6.txt.gz").write_bytes(bpe.read_bytes())
    np.savez(out / "reference.npz", pixels=pixels.numpy(), ids=ids.numpy(), img=img.numpy(), txt=txt.numpy())
    import torchvision

    (out / "versions.json").write_text(json.dumps({"open_clip": open_clip.__version__, "torch": torch.__version__,
                                                   "torchvision": torchvision.__version__}))
    print(f"reference: open_clip {open_clip.__version__}, torch {torch.__version__}, "
          f"torchvision {torchvision.__version__}; {len(IMAGES)} images, {len(TEXTS)} texts")


def _bytes_to_unicode() -> dict:
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to 256 + n."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(bpe_gz: Path, folder: Path) -> None:
    """vocab.json / merges.txt of the BPE file as CLIP builds its vocabulary: the 256 byte symbols, the same with
    `</w>`, one token per merge (the first 49152 - 256 - 2 merges), then <|startoftext|>, <|endoftext|>."""
    merges = gzip.open(bpe_gz).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def convert(sd: dict) -> dict:
    """open_clip CLIP state dict -> transformers CLIPModel state dict."""
    out = {}

    def tower(src: str, dst: str) -> None:
        for i in range(LAYERS):
            s, d = f"{src}transformer.resblocks.{i}.", f"{dst}encoder.layers.{i}."
            q, k, v = sd[s + "attn.in_proj_weight"].chunk(3)
            qb, kb, vb = sd[s + "attn.in_proj_bias"].chunk(3)
            for name, w, b in (("q", q, qb), ("k", k, kb), ("v", v, vb)):
                out[f"{d}self_attn.{name}_proj.weight"], out[f"{d}self_attn.{name}_proj.bias"] = w, b
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                for p in ("weight", "bias"):
                    out[f"{d}{b}.{p}"] = sd[f"{s}{a}.{p}"]

    tower("visual.", "vision_model.")
    tower("", "text_model.")
    v, t = "vision_model.", "text_model."
    out[v + "embeddings.class_embedding"] = sd["visual.class_embedding"]
    out[v + "embeddings.patch_embedding.weight"] = sd["visual.conv1.weight"]
    out[v + "embeddings.position_embedding.weight"] = sd["visual.positional_embedding"]
    for a, b in (("visual.ln_pre", v + "pre_layrnorm"), ("visual.ln_post", v + "post_layernorm"),
                 ("ln_final", t + "final_layer_norm")):
        for p in ("weight", "bias"):
            out[f"{b}.{p}"] = sd[f"{a}.{p}"]
    out["visual_projection.weight"] = sd["visual.proj"].T  # open_clip: x @ proj; nn.Linear: x @ W.T
    out["text_projection.weight"] = sd["text_projection"].T
    out[t + "embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out[t + "embeddings.position_embedding.weight"] = sd["positional_embedding"]
    out["logit_scale"] = sd["logit_scale"]
    return {k: x.contiguous().clone() for k, x in out.items()}


def save_converted(work: Path) -> Path:
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = work / "hf-clip"
    folder.mkdir(parents=True, exist_ok=True)
    common = dict(hidden_size=WIDTH, intermediate_size=4 * WIDTH, num_hidden_layers=LAYERS,
                  num_attention_heads=HEADS, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    config = CLIPConfig(text_config=dict(common, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407),
                        vision_config=dict(common, image_size=IMAGE, patch_size=PATCH),
                        projection_dim=EMBED)
    model = CLIPModel(config).eval()
    sd = convert(torch.load(work / "open_clip_state.pt", weights_only=True))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    assert not missing and not unexpected, (missing, unexpected)
    model.save_pretrained(folder)
    write_tokenizer(work / "bpe_simple_vocab_16e6.txt.gz", folder)
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=CONTEXT)
    images = CLIPImageProcessor(do_resize=True, size={"shortest_edge": IMAGE}, resample=3,  # PIL bicubic
                                do_center_crop=True, crop_size={"height": IMAGE, "width": IMAGE},
                                do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                image_mean=OPENAI_MEAN, image_std=OPENAI_STD, do_convert_rgb=True)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def compare(work: Path) -> int:
    import torch
    import transformers
    from PIL import Image

    from pipeline.config import TeacherConfig
    from pipeline.teachers import load_teacher

    ref = np.load(work / "reference.npz")
    versions = json.loads((work / "versions.json").read_text())
    folder = save_converted(work)
    teacher = load_teacher(TeacherConfig(kind="hf-clip", model=str(folder), dtype="float32", device="cpu"))
    try:
        import torchvision
        tv = f"torchvision {torchvision.__version__}"
    except ImportError:
        tv = "no torchvision"
    print(f"compare: transformers {transformers.__version__}, torch {torch.__version__}, {tv}, image processor "
          f"{type(teacher.processor.image_processor).__name__}; reference open_clip {versions['open_clip']}, "
          f"torchvision {versions['torchvision']}")
    ok = True
    tok = teacher.processor.tokenizer
    got = teacher.embed(TEXTS, [None] * len(TEXTS), "query")  # one batch: shorter texts are padded
    for text, ids_ref, vec_ref, vec in zip(TEXTS, ref["ids"], ref["txt"], got):
        eot = int(np.flatnonzero(ids_ref == 49407)[0])
        ids_ref = ids_ref[:eot + 1].tolist()  # open_clip pads with 0 after <|endoftext|>
        ids = tok(text, truncation=True, max_length=CONTEXT)["input_ids"]
        cos = float(vec @ vec_ref)
        ok &= ids == ids_ref and cos >= 0.99999
        print(f"text  {text[:40]!r:44} ids equal {ids == ids_ref} ({len(ids)} tokens)  cosine {cos:.7f}")
    pil = [Image.open(ROOT / "data/demo/images" / n) for n in IMAGES]
    got = teacher.embed([""] * len(pil), pil, "candidate")
    for name, im, px_ref, vec_ref, vec in zip(IMAGES, pil, ref["pixels"], ref["img"], got):
        px = teacher.processor(images=teacher.prepare_image(im), return_tensors="pt")["pixel_values"][0].numpy()
        diff = float(np.abs(px - px_ref).max())
        cos = float(vec @ vec_ref)
        ok &= cos >= 0.99999
        print(f"image {name} {im.size[0]}x{im.size[1]}  pixels max abs diff {diff:.2e}  cosine {cos:.7f}")
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    step, work = sys.argv[1], Path(sys.argv[2])
    if step == "reference":
        reference(work)
    else:
        sys.path.insert(0, str(ROOT))
        sys.exit(compare(work))

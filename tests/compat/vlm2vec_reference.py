"""Cross-check of configs/vlm2vec.yaml's teacher against VLM2Vec's own Qwen2-VL code (TIGER-AI-Lab/VLM2Vec), run
unmodified beside ours.

    tests/compat/vlm2vec_reference.sh VLM2VEC_CLONE     # does both steps below

1. `reference DIR VLM2VEC_SRC` (in a venv with VLM2Vec's pinned transformers 4.52.3): builds a tiny random Qwen2-VL
   checkpoint with VLM2Vec's vendored classes (`src/model/vlm_backbone/qwen2_vl`), its processor with VLM2Vec's
   training defaults (resize_min_pixels 3136, resize_max_pixels 1003520), and encodes CASES the way its training
   path does: `<|image_1|>` replaced by `<|image_pad|>` (mmeb_dataset.py), images RGB and blown up to 56 x 56 below
   28 px (Qwen2_VL_process_fn), one processor call per item, the model's last hidden state at the last token,
   normalised (MMEBModel.encode_input / _pooling). Writes DIR/reference.npz (vectors, ids, its position ids, grids).
2. `compare DIR` (in the project's venv): embeds CASES with configs/vlm2vec.yaml's teacher section and prints the
   cosines and whether ids, position ids and grids are identical; exit status 1 below 0.99999.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

CASES = [("<|image_1|>\nRepresent the given image for classification", (900, 700)),
         ("<|image_1|>", (200, 100)),
         ("<|image_1|> Find a caption for the news in the given photo.", (60, 20)),
         ("A red fire truck parked by the station. ", None)]


from tiny_vlms import picture  # noqa: E402  (tests/ is on the path above)


def reference(out: Path, src: Path) -> None:
    import torch
    import transformers

    sys.path.insert(0, str(src))
    from src.model.vlm_backbone.qwen2_vl.configuration_qwen2_vl import Qwen2VLConfig
    from src.model.vlm_backbone.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from src.model.vlm_backbone.qwen2_vl.modeling_qwen2_vl import Qwen2VLForConditionalGeneration
    from src.model.vlm_backbone.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
    from tiny_vlms import _byte_tokenizer
    from transformers.image_utils import ChannelDimension

    ckpt = out / "ckpt"
    tok = _byte_tokenizer(["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                           "<|video_pad|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|image_pad|>", "<|video_pad|>",
                                                      "<|vision_start|>", "<|vision_end|>")}
    config = Qwen2VLConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=4096, rope_theta=1e4,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_chans=3, initializer_range=0.02),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|endoftext|>"], pad_token_id=ids["<|endoftext|>"])
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.save_pretrained(ckpt)
    image_processor = Qwen2VLImageProcessor(min_pixels=3136, max_pixels=1003520)
    tok.save_pretrained(ckpt)
    from src.model.vlm_backbone.qwen2_vl.tokenization_qwen2_fast import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(ckpt)  # VLM2Vec's load_processor: its own tokenizer class
    processor = Qwen2VLProcessor(image_processor=image_processor, tokenizer=tok)
    image_processor.save_pretrained(ckpt)
    (ckpt / "processor_config.json").write_text('{"processor_class": "Qwen2VLProcessor"}')
    arrays = {"transformers": np.array(transformers.__version__)}
    for i, (text, size) in enumerate(CASES):
        text = text.replace("<|image_1|>", "<|image_pad|>")  # mmeb_dataset.py
        if size:
            image = picture(size).convert("RGB")
            if image.size[0] < 28 or image.size[1] < 28:  # Qwen2_VL_process_fn
                image = image.resize((56, 56))
            enc = processor(text=[text], images=[image], return_tensors="np", input_data_format=ChannelDimension.LAST)
        else:
            enc = processor(text=[text], images=None, return_tensors="np")
        input_ids = torch.from_numpy(enc["input_ids"]).long()
        mask = torch.from_numpy(enc["attention_mask"]).long()
        batch = {"input_ids": input_ids, "attention_mask": mask,
                 "pixel_values": [enc["pixel_values"]] if size else [None],
                 "image_grid_thw": [enc["image_grid_thw"]] if size else [None]}
        with torch.inference_mode():
            hidden = model(**batch, return_dict=True, output_hidden_states=True).hidden_states[-1]
            grid = torch.from_numpy(enc["image_grid_thw"]) if size else None
            positions, _ = model.get_rope_index(input_ids, grid, None, mask)
        vec = hidden[0, -1].float().numpy()
        arrays.update({f"vector{i}": vec / np.linalg.norm(vec), f"input_ids{i}": enc["input_ids"][0],
                       f"position_ids{i}": positions.numpy()[:, 0]})
        if size:
            arrays[f"image_grid_thw{i}"] = enc["image_grid_thw"]
    np.savez(out / "reference.npz", **arrays)
    print(f"VLM2Vec's Qwen2-VL code under transformers {transformers.__version__}: {len(CASES)} reference vectors")


def compare(out: Path) -> int:
    import transformers
    import yaml

    from pipeline.config import config_from_dict
    from pipeline.teachers import load_teacher

    ref = np.load(out / "reference.npz")
    section = yaml.safe_load((ROOT / "configs/vlm2vec.yaml").read_text())["teacher"]
    section.update(model=str(out / "ckpt"), dtype="float32", device="cpu", attn_implementation=None)
    teacher = load_teacher(config_from_dict({"input": {"pairs": ["x.jsonl"]}, "teacher": section}).teacher)
    worst = 1.0
    for i, (text, size) in enumerate(CASES):
        image = picture(size) if size else None
        batch = teacher.model_inputs([teacher.format(text, image is not None, "query")],
                                     [teacher.prepare_image(image)] if image else None)
        vec = teacher.embed([text], [image], "query")[0]
        cos = float(vec @ ref[f"vector{i}"])
        worst = min(worst, cos)
        same = {"input_ids": np.array_equal(batch["input_ids"][0].numpy(), ref[f"input_ids{i}"]),
                "position_ids": np.array_equal(batch["position_ids"][:, 0].numpy(), ref[f"position_ids{i}"])}
        if size:
            same["image_grid_thw"] = np.array_equal(batch["image_grid_thw"].numpy(), ref[f"image_grid_thw{i}"])
        print(f"case {i} image={size} tokens={batch['input_ids'].shape[1]} cosine={cos:.7f} identical={same}")
    print(f"configs/vlm2vec.yaml under transformers {transformers.__version__} vs VLM2Vec's code under "
          f"{ref['transformers']}: worst cosine {worst:.7f}")
    return 0 if worst >= 0.99999 else 1


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    if step == "reference":
        reference(folder, Path(sys.argv[3]).resolve())
    else:
        sys.exit(compare(folder))

"""Cross-check of `kind: qqmm` against QQMM-embed's own published code (QQ-MM/QQMM-embed), run unmodified beside ours.

    tests/compat/qqmm_reference.sh QQMM_EMBED_CLONE     # does both steps below

1. `reference DIR QQMM_SRC` (in a venv with QQMM's pinned transformers 4.44.2): saves a tiny random QQMM checkpoint to
   DIR/ckpt (tests/tiny_vlms.py), makes a copy that QQMM's loader accepts (its NaViT code files beside it, as in its
   own model folder), builds QQMM's processor from its MMEB config (`configs/embed/qqmm-embed/mmeb.yaml`, the tiny
   tokenizer in place of Qwen2.5's) and embeds CASES with its `EmbedBot.chat`; writes DIR/reference.npz.
2. `compare DIR` (in the project's venv): embeds CASES with `kind: qqmm` and prints, per case, the cosine to QQMM's
   vector and whether input ids, position ids and grid sizes are identical; exit status 1 below 0.99999.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ (tiny_vlms)

CASES = [("Represent the given image for classification.", (900, 700)),
         ("Find a caption for the news in the given photo.", (200, 100)),
         ("Represent the given image.", (300, 2000)),
         ("Represent the following answer to an image classification task: a lovely dog.", None)]


from tiny_vlms import picture  # noqa: E402  (tests/ is on the path above)


def reference(out: Path, src: Path) -> None:
    import torch
    import yaml

    from tiny_vlms import save_tiny_qqmm

    ckpt = save_tiny_qqmm(out / "ckpt")
    ref = out / "ckpt-reference-loader"
    shutil.copytree(ckpt, ref, dirs_exist_ok=True)
    navit = src / "qqmm/models/Qwen2-VL-7B-Instruct-NaViT"
    for name in ("configuration_qwen2vl_navit.py", "modeling_qwen2vl_navit.py"):
        shutil.copy(navit / name, ref / name)
    config = json.loads((ref / "config.json").read_text())
    config["vision_model_config"]["auto_map"] = json.loads((navit / "config.json").read_text())["auto_map"]
    config["vision_model_config"]["_name_or_path"] = str(ref)  # where QQMM's config class looks for the NaViT code
    (ref / "config.json").write_text(json.dumps(config))

    sys.path.insert(0, str(src))
    from qqmm.models import build_processor
    from qqmm.models.qqmm_nav_qwen2.modeling_qqmm import QQMMForCausalLM
    from qqmm.utils.chat import EmbedBot

    proc_cfg = yaml.safe_load((src / "configs/embed/qqmm-embed/mmeb.yaml").read_text())["PROCESSOR_CONFIG"]
    proc_cfg.update(tokenizer_path=str(ckpt), image_processor_path=str(navit))
    processor = build_processor(proc_cfg, inferring=True)
    model = QQMMForCausalLM.from_pretrained(str(ref), torch_dtype=torch.float32).eval()
    bot = EmbedBot(model, processor)
    seen = {}
    original = bot.gen_embed

    def spy(input_ids, *args, **kwargs):  # what QQMM's own processor handed the model
        seen.update(input_ids=input_ids[0].tolist(), position_ids=kwargs["position_ids"][0].tolist(),
                    grid_sizes=kwargs["grid_sizes"].tolist() if "grid_sizes" in kwargs else [])
        return original(input_ids, *args, **kwargs)

    bot.gen_embed = spy
    arrays = {}
    for i, (text, size) in enumerate(CASES):
        vec = bot.chat(text=text, image=[picture(size)] if size else [])
        arrays[f"vector{i}"] = vec[0].numpy()
        for key, value in seen.items():
            arrays[f"{key}{i}"] = np.array(value)
    import transformers

    arrays["transformers"] = np.array(transformers.__version__)
    np.savez(out / "reference.npz", **arrays)
    print(f"QQMM-embed's code under transformers {transformers.__version__}: {len(CASES)} reference vectors")


def compare(out: Path) -> int:
    import transformers

    from pipeline.config import config_from_dict
    from pipeline.teachers import load_teacher

    ref = np.load(out / "reference.npz")
    cfg = config_from_dict({"input": {"pairs": ["x.jsonl"]}, "teacher": {
        "kind": "qqmm", "model": str(out / "ckpt"), "dtype": "float32", "device": "cpu"}}).teacher
    teacher = load_teacher(cfg)
    worst = 1.0
    for i, (text, size) in enumerate(CASES):
        image = picture(size) if size else None
        batch = teacher.model_inputs([teacher.format(text, image is not None, "query")], [image] if image else None)
        vec = teacher.embed([text], [image], "query")[0]
        cos = float(vec @ (ref[f"vector{i}"] / np.linalg.norm(ref[f"vector{i}"])))
        worst = min(worst, cos)
        same = {k: np.array_equal(np.asarray(batch[k].tolist()).ravel(), ref[f"{k}{i}"].ravel())
                for k in ("input_ids", "position_ids", "grid_sizes") if f"{k}{i}" in ref and k in batch}
        print(f"case {i} image={size} tokens={batch['input_ids'].shape[1]} cosine={cos:.7f} identical={same}")
    print(f"kind: qqmm under transformers {transformers.__version__} vs QQMM-embed's code under "
          f"{ref['transformers']}: worst cosine {worst:.7f}")
    return 0 if worst >= 0.99999 else 1


if __name__ == "__main__":
    step, folder = sys.argv[1], Path(sys.argv[2])
    folder.mkdir(parents=True, exist_ok=True)
    if step == "reference":
        reference(folder, Path(sys.argv[3]).resolve())
    else:
        sys.exit(compare(folder))

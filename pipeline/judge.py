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
one per GPU / fractional CPUs as for embedding) runs the model. The epoch judges per query block
(pipeline/epoch.py `judge_epoch`): the driver handles file names and counts, never the pairs.
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

from .blocks import take_rows
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


def plan_pairs(pairs: np.ndarray, items: pa.Table, batch_size: int, images: bool) -> pa.Table:
    """One row per judge call: the pairs' item ids, texts (embed_text) and image paths ("" when not sent).
    `pairs`: (n, 2) item rows; only the items they name are read from `items` (memory-mapped)."""
    used, at = np.unique(pairs, return_inverse=True)
    at = at.reshape(-1, 2)
    taken = {c: take_rows(items.column(c), used).to_pylist() for c in ("item_id", "embed_text", "image_path")}
    ids, texts = taken["item_id"], taken["embed_text"]
    paths = [p or "" for p in taken["image_path"]] if images else [""] * len(used)
    rows = {k: [] for k in ("query_item_ids", "item_ids", "q_texts", "c_texts", "q_image_paths", "c_image_paths")}
    for start in range(0, len(at), batch_size):
        a, b = at[start:start + batch_size, 0].tolist(), at[start:start + batch_size, 1].tolist()
        rows["query_item_ids"].append([ids[i] for i in a])
        rows["item_ids"].append([ids[i] for i in b])
        rows["q_texts"].append([texts[i] for i in a])
        rows["c_texts"].append([texts[i] for i in b])
        rows["q_image_paths"].append([paths[i] for i in a])
        rows["c_image_paths"].append([paths[i] for i in b])
    return pa.table(rows)


def takes_images(cfg: Config) -> bool:
    j = cfg.judge
    return judge_class(j).takes_images if j.kind != "bi-encoder" else \
        bi_encoder_teacher(j).kind != "sentence-transformers"


def _read_piece(batch: pa.Table) -> pa.Table:
    """Judge calls [start, stop) of one plan file."""
    path, start, stop = (batch.column(c)[0].as_py() for c in ("path", "start", "stop"))
    return pq.read_table(path).slice(start, stop - start)


def score_plans(plans: list[tuple[str, int]], images: bool, cfg: Config, cache: JudgeCache) -> int:
    """Score the pairs of the plan files ((path, judge calls) each) as a Ray Data stage (plan-reading and decode
    task stages of half a CPU, judge actors) and add the scores to the cache part by part as they come; returns the
    number of judge actors. The driver holds file names and row ranges only."""
    import ray

    from .embed import DECODE_CPUS, decode_stage, pool_shape
    from .teachers.base import max_pixels_of

    j = cfg.judge
    shape = pool_shape(dataclasses.replace(cfg, embed=dataclasses.replace(cfg.embed, num_actors=j.num_actors),
                                           teacher=dataclasses.replace(cfg.teacher, device=j.device)))
    rows = sum(n for _, n in plans)
    actors = min(shape["actors"], rows)
    step = -(-rows // min(rows, max(4, 2 * actors)))  # pieces of the plans, so every actor gets work
    pieces = [{"path": path, "start": start, "stop": min(start + step, n)} for path, n in plans
              for start in range(0, n, step)]
    ds = ray.data.from_items(pieces, override_num_blocks=len(pieces)).map_batches(
        _read_piece, batch_size=1, batch_format="pyarrow", num_cpus=DECODE_CPUS)
    if images:
        ds = decode_stage(ds, cfg, {"q_image_paths": "q_images", "c_image_paths": "c_images"},
                          cfg.teacher.min_pixels, max_pixels_of(cfg.teacher) or VLM_DEFAULT_MAX_PIXELS)
    ds = ds.map_batches(JudgeActor, batch_size=1, batch_format="pyarrow",
                        compute=ray.data.ActorPoolStrategy(size=actors), num_cpus=shape["num_cpus"],
                        num_gpus=shape["num_gpus"],
                        fn_constructor_kwargs=dict(judge_cfg=j, placeholder=cfg.teacher.image_placeholder,
                                                   threads=shape["threads"]))
    pending, held = [], 0
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        pending.append(batch)
        held += batch.num_rows
        if held >= CACHE_PART_ROWS:
            table = pa.concat_tables(pending)
            cache.write(table.slice(0, CACHE_PART_ROWS))
            pending, held = [table.slice(CACHE_PART_ROWS)], table.num_rows - CACHE_PART_ROWS
    if held:
        cache.write(pa.concat_tables(pending))
    return actors


# -- the judge over query blocks (pipeline/epoch.py runs these as block tasks) ------------------------------------

@dataclasses.dataclass
class JudgePlan:
    """What a block task needs to judge its candidates: the filters the judge sees the survivors of, and the sorted
    pair codes and scores the run's judge cache holds (`known`: a folder of two .npy files, memory-mapped)."""

    filters: dict             # {dataset: FilterConfig}: the configured filters with each dataset's score cap
    work: str                 # the epoch's scratch folder (wanted pairs, plans, known codes)
    known: str = ""
    cfg: JudgeConfig | None = None
    rule: str = "decision"
    probabilistic: bool = True


def block_pairs(block, verdict: np.ndarray, n_items: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols) of the candidates every other filter kept, and their (query item, candidate) and (query item,
    positive) pair codes `query_item_row * n_items + item_row`."""
    from .filters import KEPT

    rows, cols = np.nonzero(verdict == KEPT)
    qry = block.qry_idx.astype(np.int64)[rows]
    return rows, cols, qry * n_items + block.cand[rows, cols], qry * n_items + block.pos_idx.astype(np.int64)[rows]


def wanted_codes(block, verdict: np.ndarray, n_items: int, rule: str) -> np.ndarray:
    """The sorted pair codes one block needs scores for."""
    _, _, cand, pos = block_pairs(block, verdict, n_items)
    return np.unique(np.concatenate([cand, pos if rule == "positive" else pos[:0]]))


def save_known(spec: tuple[str, str, str]) -> str:
    """The cache's pairs over the run's items as sorted codes and scores in `dest` (one task reads the cache).
    `spec`: (cache folder, items.arrow, dest)."""
    from .blocks import open_ipc

    cache_dir, items_path, dest = spec
    codes, scores = JudgeCache(Path(cache_dir)).codes(open_ipc(Path(items_path)).column("item_id").combine_chunks())
    Path(dest).mkdir(parents=True, exist_ok=True)
    np.save(Path(dest) / "codes.npy", codes)
    np.save(Path(dest) / "scores.npy", scores)
    return dest


def _known(folder: str) -> tuple[np.ndarray, np.ndarray]:
    from .blocks import _mmap

    return _mmap(Path(folder) / "codes.npy"), _mmap(Path(folder) / "scores.npy")


def lookup(known: np.ndarray, known_scores: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """The kept score of each pair code, NaN where the cache has none."""
    if not len(known):
        return np.full(len(codes), np.nan, np.float32)
    at = np.minimum(np.searchsorted(known, codes), len(known) - 1)
    return np.where(known[at] == codes, known_scores[at], np.nan).astype(np.float32)


def block_drops(block, verdict: np.ndarray, n_items: int, plan: JudgePlan) -> tuple[np.ndarray, dict]:
    """(rows, k) bool: the candidates that every other filter kept (`verdict == KEPT`) and the judge says match,
    with the counts `_stats.json` reports (dropped, abstained)."""
    known, known_scores = _known(plan.known)
    rows, cols, cand, pos = block_pairs(block, verdict, n_items)
    scores = lookup(known, known_scores, cand)
    positive = lookup(known, known_scores, pos) if plan.rule == "positive" else np.full(len(rows), np.nan,
                                                                                      np.float32)
    match = decide(scores, positive, plan.cfg, plan.probabilistic)
    drop = np.zeros(verdict.shape, bool)
    drop[rows[match], cols[match]] = True
    return drop, {"dropped": int(match.sum()), "abstained": int(np.isnan(scores).sum())}


@dataclasses.dataclass
class RangeSpec:
    """One dedup task: the pair codes of query items [lo, hi) over every block's wanted file."""

    work: str
    known: str
    items_path: str
    n_items: int
    lo: int
    hi: int
    index: int
    batch_size: int
    images: bool


def plan_range(spec: RangeSpec) -> dict:
    """The distinct pairs of this range of query items that blocks want, and those the cache lacks written as a
    plan file of judge calls (`path`, `rows`; `images`: some call sends an image). A query repeated in several
    blocks counts once, so the counts do not depend on the blocks."""
    from .blocks import open_ipc

    work = Path(spec.work)
    lo, hi = spec.lo * spec.n_items, spec.hi * spec.n_items
    parts = []
    for path in sorted(work.glob("wanted-*.npy")):
        codes = np.load(path, mmap_mode="r")
        parts.append(np.asarray(codes[np.searchsorted(codes, lo):np.searchsorted(codes, hi)]))
    wanted = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    known, _ = _known(spec.known)
    known = np.asarray(known[np.searchsorted(known, lo):np.searchsorted(known, hi)])
    missing = np.setdiff1d(wanted, known, assume_unique=True)
    out = {"pairs": len(wanted), "missing": len(missing), "path": None, "rows": 0, "images": False}
    if not len(missing):
        return out
    plan = plan_pairs(np.stack([missing // spec.n_items, missing % spec.n_items], 1),
                      open_ipc(Path(spec.items_path)), spec.batch_size, spec.images)
    path = work / f"plan-{spec.index:05d}.parquet"
    pq.write_table(plan, path)
    images = any(p for col in ("q_image_paths", "c_image_paths") for p in pc.list_flatten(plan.column(col)).to_pylist())
    return {**out, "path": str(path), "rows": plan.num_rows, "images": images}

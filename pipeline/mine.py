"""The mining run: read -> embed -> retrieve (once per run, kept in OUT/_run) -> filter -> sample -> write (per epoch).

Retrieval results are kept, so another epoch only re-filters and re-samples: seconds, no model and no index.
A run folder belongs to one retrieval config; asking it for another config is refused unless `overwrite` is given.
The folder itself (ownership, the writer lock, binding, atomic epochs) is pipeline/run.py's.
"""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .blocks import RunStore, is_legacy, upgrade, write_state
from .config import EPOCH, RETRIEVAL, RUN, Config, check_epoch, config_view
from .embed import embed_or_reject
from .epoch import write_epoch
from .read import InputError, input_items, load_corpus
from .read_blocks import read_blocks
from .search import CorpusMeta, retrieve_run, write_corpus
from .ray_session import ray_active
from .teachers import teacher_fingerprint
from .run import RunFolder, RunMismatch, claim, epoch_dir, is_run_folder

RUN_VERSION = 1
BINDS_EPOCH = (RUN, RETRIEVAL, EPOCH)  # what an epoch already written must match to be reused; `free` keys need not


@dataclass
class MineResult:
    out: Path
    epoch_dir: Path
    stats: dict
    reused_retrieval: bool
    skipped: bool = False


def ensure_ray(cfg: Config, n_items: int | None = None) -> bool:
    """Join `run.ray_address` / RAY_ADDRESS, or start a local Ray, or reuse a session that is already up, when a
    job of `n_items` items runs on Ray (`use_ray`; always when `n_items` is None). Whether it does."""
    from .ray_session import start_ray, use_ray

    if n_items is not None and not use_ray(cfg, n_items):
        return False
    start_ray(cfg.run.ray_address)
    return True


def run_identity(cfg: Config) -> dict:
    """What a run folder is bound to: the input files' bytes and the keys classified `run` in pipeline/config.py
    (KEY_CLASSES). The teacher's weights are left out (each epoch may re-mine with a new checkpoint), and so are
    filters and sampling (each epoch may change them) and runtime settings."""
    digests = {p: _file_digest(p) for p in [*cfg.input.pairs, cfg.input.candidates, cfg.input.captions] if p}
    return _jsonable({"version": RUN_VERSION, "config": config_view(cfg.to_dict(), (RUN,)), "inputs_sha": digests})


def retrieval_id(cfg: Config, base: Config | None, mix: float) -> str:
    """Names one retrieval inside a run: the teacher's fingerprints (and the mixed-in teacher's, if any)."""
    parts = [teacher_fingerprint(cfg.teacher, role) for role in ("query", "candidate")]
    if base is not None and mix:
        parts += [teacher_fingerprint(base.teacher, role) for role in ("query", "candidate")] + [repr(mix)]
    return hashlib.blake2b("|".join(parts).encode(), digest_size=6).hexdigest()


def _file_digest(path: str) -> str:
    if "://" in path:
        return "uri"
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def with_checkpoint(cfg: Config, checkpoint: str | Path) -> Config:
    """The same config with the teacher's weights taken from `checkpoint` (a folder `from_pretrained` reads)."""
    out = copy.deepcopy(cfg)
    out.teacher.model = str(checkpoint)
    return out


def mine(cfg: Config, out: str | Path, epoch: int = 0, overwrite: bool = False, resume: bool = False,
         checkpoint: str | Path | None = None, mix_teacher: float = 0.0, wait_lock: float = 0.0) -> MineResult:
    """Mine one epoch into OUT/epoch=NNNN.

    Retrieval runs once per teacher and is kept under OUT/_run/<retrieval id>/, so another epoch with the same
    teacher only re-filters and re-samples. `checkpoint` re-embeds and re-mines with new weights (a student);
    `mix_teacher` in [0, 1] blends the configured teacher's scores into the checkpoint's. OUT is locked for the
    whole call: another writer makes it refuse at once, or wait up to `wait_lock` seconds (math.inf: no limit).
    """
    check_epoch(epoch)  # before the folder is claimed: a bad epoch creates nothing
    if resume and not is_run_folder(out):
        raise RunMismatch(f"{out} holds no run to resume; drop --resume to start one")
    with claim(out, wait_lock) as run:
        return _mine(run, cfg, epoch, overwrite, checkpoint, mix_teacher)


def _mine(run: RunFolder, cfg: Config, epoch: int, overwrite: bool, checkpoint, mix_teacher: float) -> MineResult:
    out = run.out
    started = time.time()
    cfg = cfg.for_epoch(epoch)
    base = cfg
    if checkpoint is not None:
        cfg = with_checkpoint(cfg, checkpoint)
    if not 0.0 <= mix_teacher <= 1.0 or (mix_teacher and checkpoint is None):
        raise ValueError("mix_teacher must be in [0, 1] and needs a checkpoint to mix with")
    identity = run_identity(cfg)
    run_dir = out / "_run"
    saved = run.identity()
    if saved is not None and saved != identity:
        if not overwrite:
            raise RunMismatch(run.mismatch_message(saved, identity))
        run.clear(keep=[checkpoint] if checkpoint is not None else ())
        saved = None
    if saved is None:
        run.drop_unbound()
    rid = retrieval_id(cfg, base, mix_teacher)
    final = epoch_dir(out, epoch)
    config = _jsonable({**cfg.to_dict(), "mix_teacher": mix_teacher})
    if final.exists() and not overwrite:
        manifest = _read_json(final / "_manifest.json") or {}
        if config_view(manifest.get("config"), BINDS_EPOCH) == config_view(config, BINDS_EPOCH):
            return MineResult(out, final, _read_json(final / "_stats.json") or {}, True, skipped=True)
        raise RunMismatch(f"{final} was written with a different filter, sampling or teacher config; use "
                          "--overwrite to replace it or another --epoch")
    state_dir = run_dir / rid
    reused = (state_dir / "state.json").exists()
    if reused and is_legacy(state_dir):
        upgrade(state_dir, cfg.retrieve.block_rows)
    t0 = time.time()
    # Ray or not, decided once for the job from counts known before any read (a new run's input rows,
    # `read.input_items`): the epoch runs where the retrieval ran, and a job without Ray keeps Arrow's system pool
    # for all of it
    on_ray = ensure_ray(cfg, RunStore(state_dir).n_items if reused else input_items(cfg.input))
    with nullcontext() if on_ray else system_memory_pool():
        if not reused:
            build_run(cfg, state_dir, on_ray, base if mix_teacher else None, mix_teacher, t0)
            if saved is None:  # bound only now: a run that fails before this leaves the folder free
                run.bind(identity)
        extra = {"retrieval_id": rid, "teacher_model": cfg.teacher.model, "mix_teacher": mix_teacher,
                 "reused_retrieval": reused}
        stats = write_epoch(RunStore(state_dir), cfg, out, epoch, config, extra, started, on_ray)
    return MineResult(out, final, stats, reused)


def build_run(cfg: Config, state_dir: Path, on_ray: bool, base: Config | None, mix: float, t0: float) -> None:
    """Retrieve once for every epoch into `state_dir` (pipeline/search.py's block tasks); state.json last. A job
    without Ray (`on_ray` False) runs every stage in this process."""
    if not on_ray:
        cfg = copy.deepcopy(cfg)
        cfg.run.executor, cfg.index.distributed = "local", "never"
    _build_run(cfg, state_dir, base, mix, t0)


@contextmanager
def system_memory_pool():
    """Arrow's buffers from the C library's allocator for a while, then the default pool (mimalloc) again. A fresh
    process's mimalloc segments are new memory: on a kernel with transparent huge pages always on, touching them
    faulted in 2 MB pages that cost a warm 4,000 x 22,565 job's fresh process 0.4-0.8 s of system CPU time (of
    2.6 s after imports, docs/benchmarks.md "Small jobs"). Only for a job without Ray: a Ray job's driver and
    workers keep the default. Entered once per local job, where `_mine` decides it runs without Ray."""
    previous = pa.default_memory_pool()
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        pa.set_memory_pool(previous)


def _build_run(cfg: Config, state_dir: Path, base: Config | None, mix: float, t0: float) -> None:
    state_dir = Path(state_dir)
    if state_dir.exists():
        shutil.rmtree(state_dir)
    meta = read_input(cfg, state_dir)
    if cfg.run.max_errored_blocks:  # the user allows failed embedding blocks: reject their items, go on
        meta = embed_or_reject(state_dir, meta, cfg)
    t_read = time.time()
    meta = retrieve_run(meta, cfg, state_dir, base, mix)
    meta["info"]["timings"] = {"read_s": round(t_read - t0, 3), "embed_and_retrieve_s": round(time.time() - t_read, 3)}
    write_state(state_dir, **meta)


def read_input(cfg: Config, state_dir: Path) -> CorpusMeta:
    """The read stage: on Ray as block tasks and one assembling task (pipeline/read_blocks.py: no process holds the
    corpus), else here in one pass (`read_stage`): the corpus files in `state_dir` (`search.write_corpus`'s, the
    same bytes either way), and their metadata. An error in the input reaches the user as the reader raised it."""
    use_ray = ray_active(cfg)
    meta = read_blocks(cfg, state_dir, use_ray) if use_ray else read_stage(cfg, state_dir)
    if isinstance(meta, InputError):
        raise meta
    return meta


def read_stage(cfg: Config, state_dir: Path) -> CorpusMeta | InputError:
    """`load_corpus` and `write_corpus` in this process; an InputError is returned, as `read_blocks` returns it."""
    try:
        corpus = load_corpus(cfg.input, caption_mode=cfg.teacher.image_mode == "caption")
    except InputError as exc:
        return exc
    return write_corpus(corpus, state_dir, cfg.retrieve.block_rows)


def _read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None


def _jsonable(data):
    return json.loads(json.dumps(data, sort_keys=True, default=str))

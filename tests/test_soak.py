"""Soak: mine the same corpus again and again in one process; memory, open files and threads stay flat.

Bounded in time (the measured loop stops starting rounds after SOAK_SECONDS). Most rounds reuse the embedding
cache (read, FAISS, filter, sample, write: the per-epoch path), and every few rounds embed from scratch through a
fresh Ray Data pass (actor pool), so the driver's side of Ray Data is soaked too. Two epochs per round, then the
round's output is deleted. The teacher is the package's model-free HashingTeacher: the pipeline is what soaks.
"""
from __future__ import annotations

import gc
import shutil
import time

import psutil

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import config_from_dict
from pipeline.mine import mine

SOAK_SECONDS = 30
FRESH_EVERY = 4          # every 4th round embeds again through a new actor pool
RSS_TOLERANCE = 48 << 20  # allocator slack over ~dozens of rounds; a leak of a shard or a vector matrix per round
FD_TOLERANCE = 2          # would exceed these after the first few rounds
THREAD_TOLERANCE = 2


def snapshot(proc: psutil.Process) -> dict:
    gc.collect()
    return {"rss": proc.memory_info().rss, "fds": proc.num_fds(), "threads": proc.num_threads()}


def test_repeated_mining_keeps_memory_and_open_files_flat(ray_session, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(60))
    raw = base_config(pairs, str(tmp_path / "cache-shared"), output={"rows_per_shard": 16},
                      teacher={"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher"},
                      embed={"num_actors": 1, "cpus_per_actor": 0.5})
    proc = psutil.Process()

    def round_(i: int, fresh: bool) -> None:
        cache = tmp_path / f"cache-{i}" if fresh else tmp_path / "cache-shared"
        cfg = config_from_dict({**raw, "embed": {**raw["embed"], "cache_dir": str(cache)}})
        out = tmp_path / f"out-{i}"
        first = mine(cfg, out, epoch=0)
        assert first.stats["embed"]["queries"]["embedded"] == (60 if fresh or i == 0 else 0)
        assert mine(cfg, out, epoch=1).reused_retrieval
        shutil.rmtree(out)
        if fresh:
            shutil.rmtree(cache)

    for i in range(3):  # warm-up: imports, the first actor pool, FAISS and Arrow pools
        round_(i, fresh=(i == 1))
    before = snapshot(proc)
    start, i, fresh_rounds = time.time(), 3, 0
    while time.time() - start < SOAK_SECONDS:
        fresh = i % FRESH_EVERY == 0
        round_(i, fresh)
        fresh_rounds += fresh
        i += 1
    after = snapshot(proc)
    rounds = i - 3
    report = (f"{rounds} rounds ({fresh_rounds} with a new actor pool) in {time.time() - start:.0f}s: "
              f"rss {before['rss'] / 2**20:.0f} -> {after['rss'] / 2**20:.0f} MiB, fds {before['fds']} -> "
              f"{after['fds']}, threads {before['threads']} -> {after['threads']}")
    print(report)
    assert rounds >= 5 and fresh_rounds >= 1, report
    assert after["fds"] - before["fds"] <= FD_TOLERANCE, report
    assert after["threads"] - before["threads"] <= THREAD_TOLERANCE, report
    assert after["rss"] - before["rss"] <= RSS_TOLERANCE, report

"""`run.executor`: a small job runs in the driver process without Ray (pipeline/ray_session.py `use_ray`), and
writes the same bytes as the same job on Ray."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from corpus import base_config, text_pairs, write_jsonl
from pipeline import ray_session
from pipeline.config import config_from_dict
from pipeline.mine import mine
from pipeline.ray_session import LOCAL_MAX_ITEMS, use_ray

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def config(**run) -> object:
    return config_from_dict({"input": {"pairs": ["p.jsonl"]}, "run": run})


@pytest.mark.parametrize("run, env, n, up, want", [
    ({}, {}, 1000, False, False),                                  # small, on this machine: in-process
    ({}, {}, LOCAL_MAX_ITEMS, False, False),
    ({}, {}, LOCAL_MAX_ITEMS + 1, False, True),                    # large: Ray
    ({}, {"RAY_ADDRESS": "10.0.0.1:6379"}, 10, False, True),       # a cluster is named
    ({"ray_address": "10.0.0.1:6379"}, {}, 10, False, True),
    ({}, {}, 10, True, True),                                      # a Ray session is up already
    ({"executor": "local"}, {"RAY_ADDRESS": "10.0.0.1:6379"}, 10**9, True, False),  # asked for: always
    ({"executor": "ray"}, {}, 10, False, True),
])
def test_use_ray_decides_from_executor_address_session_and_size(run, env, n, up, want, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(ray_session, "ray_is_up", lambda: up)
    assert use_ray(config(**run), n) is want


def test_several_actors_or_distributed_search_want_ray(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray_session, "ray_is_up", lambda: False)
    for raw in ({"embed": {"num_actors": 2}}, {"index": {"distributed": "always"}}):
        cfg = config_from_dict({"input": {"pairs": ["p.jsonl"]}, **raw})
        assert use_ray(cfg, 10) is True


def test_a_new_run_counts_its_items_before_reading(tmp_path):
    """`use_ray` is asked before the read (so the read runs where the job does): two items a pairs row, one a
    candidates row, from Parquet metadata and JSONL lines; a file that cannot be counted counts 0 (the read says
    what is wrong with it)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.config import InputConfig
    from pipeline.read import input_items

    pairs = write_jsonl(tmp_path / "p.jsonl", text_pairs(30))
    with open(pairs, "a") as f:
        f.write('{"id": "last", "qry": "a", "pos_text": "b"}')  # no newline at the end
    pq.write_table(pa.table({"text": [f"c{i}" for i in range(7)]}), tmp_path / "c.parquet")
    assert input_items(InputConfig(pairs=[str(pairs)], candidates=str(tmp_path / "c.parquet"))) == 2 * 31 + 7
    assert input_items(InputConfig(pairs=[str(tmp_path / "missing.jsonl")])) == 0


def test_an_input_error_from_the_read_task_reaches_the_user_as_it_is(ray_session, tmp_path):
    """On Ray the read is a task; the reader's InputError comes back as the reader raised it (one line, exit 2)."""
    from pipeline.config import InputConfig
    from pipeline.read import InputError, load_corpus

    path = tmp_path / "p.jsonl"
    path.write_text('{"qry": "a"}\n')  # no positive column
    with pytest.raises(InputError) as in_process:
        load_corpus(InputConfig(pairs=[str(path)]), caption_mode=False)
    raw = base_config(path, str(tmp_path / "cache"), run={"executor": "ray"})
    with pytest.raises(InputError) as from_task:
        mine(config_from_dict(raw), tmp_path / "out")
    assert type(from_task.value) is InputError and str(from_task.value) == str(in_process.value)
    assert "\n" not in str(from_task.value)


def test_local_and_ray_runs_write_identical_shards_and_candidates(ray_session, tmp_path):
    """The same config, executor ray vs local (each with its own empty cache): the same shard and `_candidates`
    bytes, and the vectors each wrote to its cache are the same bytes."""
    import numpy as np
    import pyarrow as pa

    from pipeline.embed import EmbeddingCache

    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(70))
    out = {}
    for executor in ("ray", "local"):
        raw = base_config(pairs, str(tmp_path / f"cache-{executor}"), teacher={"batch_size": 16},
                          output={"rows_per_shard": 32}, run={"executor": executor},
                          embed={"threads_per_actor": 2})  # one thread count for both, whatever the machine
        out[executor] = mine(config_from_dict(raw), tmp_path / executor)
    for executor, result in out.items():
        assert {s["executor"] for s in result.stats["embed"].values()} == {executor}
        assert result.stats["retrieval"]["t2t"]["index"]["mode"] == "in_process"
    files = {e: sorted(p.relative_to(r.epoch_dir) for p in r.epoch_dir.rglob("*.parquet")) for e, r in out.items()}
    assert files["ray"] == files["local"] and any(p.parts[0] == "_candidates" for p in files["ray"])
    assert len(files["ray"]) == 6  # 70 queries in 3 shards, and their candidates
    for rel in files["ray"]:
        assert (out["ray"].epoch_dir / rel).read_bytes() == (out["local"].epoch_dir / rel).read_bytes(), rel
    # the kept retrieval too (the read ran in a Ray task on one side, in this process on the other)
    state = {e: sorted(p.relative_to(tmp_path / e) for p in (tmp_path / e / "_run").rglob("*")
                       if p.is_file() and p.name not in ("state.json", "lock", "hardneg.json", "run.json"))
             for e in out}
    assert state["ray"] == state["local"] and any(p.name == "queries.arrow" for p in state["ray"])
    for rel in state["ray"]:
        assert (tmp_path / "ray" / rel).read_bytes() == (tmp_path / "local" / rel).read_bytes(), rel

    fp = out["ray"].stats["embed"]["candidates"]["fingerprint"]
    keys = []
    for executor in ("ray", "local"):
        cache = EmbeddingCache(str(tmp_path / f"cache-{executor}"), fp)
        import pyarrow.parquet as pq
        table = pq.read_table(cache.parts()).sort_by("key")
        keys.append((table.column("key").to_pylist(), np.asarray(table.column("vector").combine_chunks().flatten())))
    assert keys[0][0] == keys[1][0]
    assert keys[0][1].tobytes() == keys[1][1].tobytes()


def test_a_small_cli_run_starts_no_ray_and_says_so(tmp_path):
    """What the README promises: `hardneg mine` of a small job on this machine runs in its own process (no Ray
    imported, no Ray session folder), and `_stats.json` names the executor."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(30))
    raw = {"input": {"pairs": [str(pairs)]},
           "teacher": {"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher", "batch_size": 8},
           "embed": {"cache_dir": str(tmp_path / "cache")}, "retrieve": {"top_k": 10}, "sample": {"n_negatives": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(raw))
    child = ("import sys, pipeline.cli as cli; rc = cli.main(sys.argv[1:]); "
             "print('RAY_IMPORTED', 'ray' in sys.modules); sys.exit(rc)")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    started = time.time() - 1
    proc = subprocess.Popen([sys.executable, "-c", child, "mine", "--config", str(tmp_path / "config.yaml"),
                             "--out", str(tmp_path / "out"), "--no-progress"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "RAY_IMPORTED False" in stdout
    stats = json.loads((tmp_path / "out" / "epoch=0000" / "_stats.json").read_text())
    assert {s["executor"] for s in stats["embed"].values()} == {"local"}
    ray_root = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"
    # a local Ray names its session folder after the driver (an older folder may carry a reused pid)
    assert not [d for d in ray_root.glob(f"session_*_{proc.pid}") if d.stat().st_mtime >= started]
    readme = (ROOT / "README.md").read_text()
    sentence = re.search(r"Which executor runs a job\b.*?(?:\n\n|$)", readme, re.S)
    assert sentence, "README lost its sentence on the executor"
    assert f"{LOCAL_MAX_ITEMS:,}" in sentence.group(0) and "run.executor" in sentence.group(0)
    assert "RAY_ADDRESS" in sentence.group(0) and "_stats.json" in sentence.group(0)


def test_a_local_job_takes_arrow_buffers_from_the_system_allocator_and_gives_the_default_back(tmp_path, monkeypatch):
    """Without Ray, the retrieval runs with Arrow's system pool (mimalloc's fresh segments cost a small job's fresh
    process seconds of page faults on a THP-always kernel); afterwards, and after an error, the default is back."""
    import pyarrow as pa

    from pipeline import mine as mine_module

    default = pa.default_memory_pool().backend_name
    seen = []
    build = mine_module._build_run

    def spy(*args):
        seen.append(pa.default_memory_pool().backend_name)
        return build(*args)

    monkeypatch.setattr(mine_module, "_build_run", spy)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(30))
    mine(config_from_dict(base_config(pairs, str(tmp_path / "cache"), run={"executor": "local"})), tmp_path / "out")
    assert seen == ["system"] and pa.default_memory_pool().backend_name == default
    with pytest.raises(RuntimeError), mine_module.system_memory_pool():
        raise RuntimeError("a failed stage")
    assert pa.default_memory_pool().backend_name == default

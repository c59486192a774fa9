"""Faults: a worker node killed during embedding, a driver killed mid-run, a block that fails in the embedding pass.

The multi-node test runs a simulated cluster (`ray.cluster_utils.Cluster`: a head with no CPUs and two 1-CPU worker
nodes) in a subprocess, because Ray allows one connection per process and the session fixture holds this one. The
subprocess is this file run as a script; it writes a JSON report that the test checks against an undisturbed run
made here. The teacher is the package's model-free HashingTeacher (actors start and restart in seconds); the Ray
machinery under test is the same as with a real model, which tests/test_mine.py covers.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from pipeline.teachers.examples import HashingTeacher

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
BATCH = 8


class MarkedTeacher(HashingTeacher):
    """HashingTeacher (same vectors), plus a marker file per batch (node, pid, role, time) in HARDNEG_TEST_MARKS and
    a delay per batch (HARDNEG_TEST_DELAY), so the test can see where work ran and strike while it runs."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.marks = os.environ.get("HARDNEG_TEST_MARKS")
        self.delay = float(os.environ.get("HARDNEG_TEST_DELAY", "0"))
        self._mark("init", 0)

    def embed(self, texts, images, role, dataset=None):
        time.sleep(self.delay)
        vectors = super().embed(texts, images, role, dataset=dataset)
        self._mark("batch", len(texts), hashlib.blake2b("\0".join(texts).encode(), digest_size=8).hexdigest())
        return vectors

    def _mark(self, what, n, batch=None):
        if not self.marks:
            return
        import ray

        rec = {"what": what, "n": n, "batch": batch, "pid": os.getpid(), "t": time.time(),
               "node": ray.get_runtime_context().get_node_id()}
        tmp = Path(self.marks) / f".{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(rec))
        os.replace(tmp, Path(self.marks) / f"{time.time_ns()}-{uuid.uuid4().hex[:6]}.json")


def read_marks(folder: Path) -> list[dict]:
    marks = []
    for p in sorted(Path(folder).glob("*.json")):
        try:
            marks.append(json.loads(p.read_text()))
        except (OSError, json.JSONDecodeError):
            pass
    return sorted(marks, key=lambda m: m["t"])


def fault_config(pairs: Path, cache: str, **extra) -> dict:
    from corpus import base_config

    sections = {"teacher": {"kind": "custom", "cls": "test_faults:MarkedTeacher", "batch_size": BATCH},
                "embed": {"num_actors": 1, "cpus_per_actor": 0.25, "threads_per_actor": 1},
                "run": {"executor": "ray"}}  # actor pools, restarts and killed nodes are Ray's
    for name, values in extra.items():
        sections.setdefault(name, {}).update(values)
    return base_config(pairs, cache, **sections)


def shard_digests(epoch_dir: Path) -> list:
    manifest = json.loads((Path(epoch_dir) / "_manifest.json").read_text())
    return [[f["path"], f["rows"], f["sha256"]] for f in manifest["files"] + manifest["candidate_files"]]


# ------------------------------------------------------------------------------------------------ in this process

def test_ray_data_actor_pool_restarts_actors_and_retries_their_tasks():
    """The recovery the pipeline relies on is Ray Data's default for actor pools; fail loudly if Ray changes it."""
    from ray.data import DataContext
    from ray.data._internal.execution.operators.actor_pool_map_operator import ActorPoolMapOperator

    args = ActorPoolMapOperator._apply_default_remote_args({"num_cpus": 0.25}, DataContext.get_current())
    assert args["max_restarts"] == -1 and args["max_task_retries"] == -1
    assert DataContext.get_current().max_errored_blocks == 0


def lose_after_read(monkeypatch, vanishing, pairs, tmp_path, executor: str) -> dict:
    """A config of 6 embedding blocks whose run loses `vanishing` after the reader checked and hashed it, before it
    is embedded (as when storage loses a file mid-run)."""
    import pipeline.mine
    from corpus import base_config

    real_read = pipeline.mine.read_input

    def read_then_lose_a_file(*args, **kwargs):
        meta = real_read(*args, **kwargs)
        if vanishing.exists():
            vanishing.rename(vanishing.with_suffix(".gone"))
        return meta

    monkeypatch.setattr(pipeline.mine, "read_input", read_then_lose_a_file)
    return base_config(pairs, str(tmp_path / "cache"),
                       teacher={"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher",
                                "image_mode": "native", "batch_size": 4},
                       embed={"num_actors": 1, "cpus_per_actor": 0.5, "num_blocks": 6}, input={"group_key": None},
                       run={"executor": executor})


@pytest.mark.parametrize("executor", ["ray", "local"])
def test_a_failing_block_stops_the_run_unless_the_user_allows_it(executor, request, tmp_path, monkeypatch):
    """An error in the embedding pass itself (here: an image that passed the reader's check is gone when the
    decode stage opens it, as when storage loses a file mid-run). By default the run stops and publishes nothing;
    with run.max_errored_blocks the failed block's items are rejected (`embed_failed`), counted in the summary,
    and everything else is mined."""
    from corpus import copy_images, demo_items, write_jsonl

    if executor == "ray":
        request.getfixturevalue("ray_session")

    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    items = demo_items(24)
    root = copy_images(tmp_path / "root", items)
    pairs = [{"id": f"q{i}", "dataset": "t2i", "qry": it["caption"], "pos_image_path": it["image_path"]}
             for i, it in enumerate(items)]
    path = write_jsonl(root / "pairs.jsonl", pairs)
    vanishing = root / items[5]["image_path"]
    raw = lose_after_read(monkeypatch, vanishing, path, tmp_path, executor)  # Ray Data skips errored blocks, so
    # does the local loop
    with pytest.raises(Exception, match="does not exist|No such file"):
        mine(config_from_dict(raw), tmp_path / "strict")
    assert not (tmp_path / "strict" / "epoch=0000").exists()  # nothing half-written is visible

    vanishing.with_suffix(".gone").rename(vanishing)
    raw["run"]["max_errored_blocks"] = 1
    result = mine(config_from_dict(raw), tmp_path / "lenient")
    stats = result.stats
    rejects = [json.loads(x) for x in (result.epoch_dir / "_rejects.jsonl").read_text().splitlines()]
    failed = [r for r in rejects if r["reason"] == "embed_failed" and r["kind"] == "query"]
    assert "q5" in {r["query_id"] for r in failed}
    assert all(r["field"] == "pos_image_path" for r in failed)
    # 6 blocks of one planned batch of 4 images each: one block failed, its queries (and only those) are rejected
    assert 1 <= len(failed) <= 4
    assert stats["rejects_by_reason"] == {"embed_failed": len(failed)}
    assert stats["queries_written"] == 24 - len(failed) and stats["queries_rejected"] == len(failed)


# ------------------------------------------------------------------------------------------------ the cluster

def test_killed_worker_node_and_killed_driver_cost_only_in_flight_work(ray_session, tmp_path):
    """(A) an undisturbed run, here. On a head + 2 worker cluster: (B) the same run with the worker node of the busy
    embedding actor killed mid-embedding; (C) the driver (`hardneg mine` with RAY_ADDRESS) SIGKILLed mid-embedding,
    then run again. B and C write the same shard bytes as A; B runs again at most the batches the dead node had
    run (its in-flight and not yet fetched work); C's second run embeds exactly what had not reached the cache, and
    the killed driver left no epoch folder behind."""
    from corpus import text_pairs, write_jsonl

    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(64))
    undisturbed = fault_config(pairs, str(tmp_path / "cache-A"),
                               teacher={"cls": "pipeline.teachers.examples:HashingTeacher"})
    a = mine(config_from_dict(undisturbed), tmp_path / "out-A")

    report = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, __file__, "cluster", str(tmp_path), str(report)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0 and report.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    r = json.loads(report.read_text())

    assert r["B"]["digests"] == shard_digests(a.epoch_dir), "a node lost during embedding changed the output"
    assert r["C"]["digests"] == shard_digests(a.epoch_dir), "a killed and restarted driver changed the output"
    kill, b = r["B"]["kill"], r["B"]
    assert kill["victim_batches"] >= 1                      # the dead node had been embedding
    assert kill["done_at_kill"] < b["distinct_batches"]     # mid-way through the embedding pass
    assert kill["batches_after_kill_elsewhere"] >= 1        # and the work went on on the other node
    redone = b["batch_runs"] - b["distinct_batches"]
    assert 0 <= redone <= kill["victim_batches"], (redone, kill)  # only work the dead node had done ran again
    assert b["alive_nodes_after"] == 2                      # head + the surviving worker
    c = r["C"]
    assert c["killed_rc"] == -signal.SIGKILL and c["epoch_visible_after_kill"] is False
    total = sum(s["items"] for s in c["rerun_embed"].values())
    kept = c["vectors_in_cache_at_kill"]
    assert 0 < kept <= total  # work had reached the cache when the driver died...
    assert sum(s["embedded"] for s in c["rerun_embed"].values()) == total - kept  # ...and was not done again
    print(json.dumps({"timings": r["timings"], "B": {k: v for k, v in b.items() if k != "digests"},
                      "C": {k: c[k] for k in ("killed_rc", "vectors_in_cache_at_kill")}, "total": total}))


def _cluster_main(work: Path, report: Path) -> None:
    """Runs in the subprocess: builds the cluster, runs B and C, writes the report."""
    from ray.cluster_utils import Cluster

    t0 = time.time()
    marks = {name: work / f"marks-{name}" for name in "BC"}
    for m in marks.values():
        m.mkdir()
    os.environ["HARDNEG_TEST_DELAY"] = "0.25"
    os.environ["HARDNEG_TEST_MARKS"] = str(marks["C"])  # the nodes' own env: what the CLI driver's workers see
    system = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 0}
    # Keep the cluster private: Cluster records its address in /tmp/ray/ray_current_cluster, where any other
    # ray.init() on this machine would find and join it (taking its CPUs), and clears that file on shutdown
    # (whoever wrote it). Neither here. Its own temp dir also keeps its sessions apart and socket paths short.
    import ray._common.utils
    import ray._private.utils

    ray._private.utils.write_ray_address = lambda *a, **k: None
    ray._common.utils.reset_ray_address = lambda *a, **k: None
    temp_dir = tempfile.mkdtemp(prefix="hnft-", dir="/tmp")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": system, "temp_dir": temp_dir})
    try:
        workers = [cluster.add_node(num_cpus=1, temp_dir=temp_dir) for _ in range(2)]
        cluster.wait_for_nodes()
        timings = {"cluster_up_s": round(time.time() - t0, 1)}
        out = _scenarios(cluster, workers, work, marks, work / "pairs.jsonl", timings)
        out["timings"] = timings
        report.write_text(json.dumps(out, indent=1, default=str))
    finally:
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _scenarios(cluster, workers, work: Path, marks: dict, pairs: Path, timings: dict) -> dict:
    import threading

    import ray
    import yaml

    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    out: dict = {}

    def connect(name: str) -> None:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"HARDNEG_TEST_MARKS": str(marks[name]), "HARDNEG_TEST_DELAY": "0.25"}})
        ray.data.DataContext.get_current().enable_progress_bars = False

    # B: kill the worker node of the busy actor once two batches are done
    t = time.time()
    kill: dict = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            done = [m for m in read_marks(marks["B"]) if m["what"] == "batch"]
            if len(done) >= 2:
                victim_id = done[-1]["node"]
                victim = next(w for w in workers if w.node_id == victim_id)
                kill.update(node=victim_id, done_at_kill=len(done))
                cluster.remove_node(victim, allow_graceful=False)
                kill["t"] = time.time()
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    connect("B")
    try:
        result = mine(config_from_dict(fault_config(pairs, str(work / "cache-B"))), work / "out-B")
        out["B"] = {"digests": shard_digests(result.epoch_dir),
                    "alive_nodes_after": sum(1 for n in ray.nodes() if n["Alive"])}
    finally:
        ray.shutdown()
    thread.join(5)
    batches = [m for m in read_marks(marks["B"]) if m["what"] == "batch"]
    kill["batches_after_kill_elsewhere"] = sum(m["node"] != kill.get("node") and m["t"] > kill.get("t", 1e18)
                                               for m in batches)
    kill["victim_batches"] = sum(m["node"] == kill.get("node") for m in batches)
    out["B"].update(kill=kill, batch_runs=len(batches), distinct_batches=len({m["batch"] for m in batches}))
    timings["B_s"] = round(time.time() - t, 1)

    # C: the driver is a `hardneg mine` process on the cluster, flushing its embedding cache every 16 vectors
    # (CACHE_PART_ROWS, 65,536 by default); SIGKILL it as soon as the first part is in the cache, run it again
    t = time.time()
    cache = work / "cache-C"
    cfg_path = work / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(fault_config(pairs, str(cache))))
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "HARDNEG_TEST_MARKS": str(marks["C"])}
    child = ("import sys, pipeline.embed as e, pipeline.cli as cli; assert hasattr(e, 'CACHE_PART_ROWS'); "
             "e.CACHE_PART_ROWS = 16; sys.exit(cli.main(sys.argv[1:]))")
    driver = subprocess.Popen([sys.executable, "-c", child, "mine", "--config", str(cfg_path), "--out",
                               str(work / "out-C"), "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and driver.poll() is None:
        if any(cache.glob("*/part-*.parquet")):
            driver.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    killed_rc = driver.wait(60)
    visible = (work / "out-C" / "epoch=0000").exists()
    import pyarrow.parquet as pq

    def in_cache():
        return sum(pq.ParquetFile(p).metadata.num_rows for p in cache.glob("*/part-*.parquet"))

    # the actors write the cache: the dead driver's actor may add a part before Ray ends it (one every 0.5 s alive)
    kept, settle = in_cache(), time.time() + 30
    while time.time() < settle:
        time.sleep(1.5)
        if in_cache() == kept:
            break
        kept = in_cache()
    timings["C_killed_s"] = round(time.time() - t, 1)
    connect("C")
    try:
        result = mine(config_from_dict(yaml.safe_load(cfg_path.read_text())), work / "out-C")
    finally:
        ray.shutdown()
    out["C"] = {"digests": shard_digests(result.epoch_dir), "killed_rc": killed_rc,
                "vectors_in_cache_at_kill": kept, "epoch_visible_after_kill": visible,
                "rerun_embed": {k: v for k, v in result.stats["embed"].items() if k in ("candidates", "queries")}}
    timings["C_s"] = round(time.time() - t, 1)
    return out


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "cluster":
    _cluster_main(Path(sys.argv[2]), Path(sys.argv[3]))


def test_an_input_negative_whose_embedding_failed_is_left_out_with_max_errored_blocks(tmp_path, monkeypatch):
    """An item that is only an input negative (`neg_image_path`, in no pool) and fails to embed: with
    run.max_errored_blocks its query is still mined, without that negative, and the item is a candidate reject."""
    import pyarrow.parquet as pq

    from corpus import copy_images, demo_items, write_jsonl

    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    items = demo_items(25)
    root = copy_images(tmp_path / "root", items)
    pairs = [{"id": f"q{i}", "dataset": "t2i", "qry": it["caption"], "pos_image_path": it["image_path"]}
             for i, it in enumerate(items[:24])]
    pairs[6]["neg_image_path"] = items[24]["image_path"]
    path = write_jsonl(root / "pairs.jsonl", pairs)
    raw = lose_after_read(monkeypatch, root / items[24]["image_path"], path, tmp_path, "local")
    raw["run"]["max_errored_blocks"] = 1
    result = mine(config_from_dict(raw), tmp_path / "out")
    rejects = [json.loads(x) for x in (result.epoch_dir / "_rejects.jsonl").read_text().splitlines()]
    failed = [r for r in rejects if r["reason"] == "embed_failed"]
    assert any(r["kind"] == "candidate" for r in failed)  # the input negative (and its block's other items)
    lost = {r["query_id"] for r in failed if r["kind"] == "query"}
    train = pq.read_table(result.epoch_dir / "part-00000.parquet").to_pylist()
    assert {r["query_id"] for r in train} | lost == {p["id"] for p in pairs} and len(train) + len(lost) == 24
    assert all(items[24]["image_path"] not in r["neg_image_path"] for r in train)

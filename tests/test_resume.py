"""Kill the run (the driver, or a Ray actor) at several points, run it again, compare with an undisturbed run."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest
import yaml

from corpus import base_config, text_pairs, write_jsonl


def start(config, out, ray_address, *extra):
    env = {**os.environ, "RAY_ADDRESS": ray_address, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "mine", "--config", str(config), "--out", str(out),
                             "--no-progress", *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(proc, timeout=300):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out.decode()[-3000:]


def embed_workers():
    """Embedding actors of this test's Ray cluster only (children of its raylet), never another process's."""
    import ray

    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    found = []
    for p in psutil.Process(raylet).children(recursive=True):
        try:
            if any("EmbedActor" in part for part in p.cmdline()):
                found.append(p)
        except psutil.Error:
            pass
    return found


def wait_for(condition, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    raise AssertionError("milestone not reached")


def digests(out):
    manifest = json.loads((out / "epoch=0000" / "_manifest.json").read_text())
    return [f["sha256"] for f in manifest["files"]]


@pytest.fixture(scope="module")
def setup(ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    pairs = write_jsonl(tmp / "pairs.jsonl", text_pairs(300))
    address = ray_session.get_runtime_context().gcs_address

    def config(name, cache):
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(base_config(pairs, str(tmp / cache), output={"rows_per_shard": 2},
                                                   embed={"num_actors": 1, "cpus_per_actor": 0.5},
                                                   teacher={"batch_size": 8})))
        return path

    reference = tmp / "reference"
    finish(start(config("ref", "cache-ref"), reference, address))
    return tmp, config, address, reference


def check_same(out, reference):
    assert digests(out) == digests(reference)
    rows = pd.read_parquet(out / "epoch=0000")
    assert rows.query_id.is_unique and len(rows) == 300
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no partial folder left behind


def test_driver_killed_while_embedding(setup):
    tmp, config, address, reference = setup
    cfg, out = config("a", "cache-a"), tmp / "a"
    proc = start(cfg, out, address)
    wait_for(lambda: embed_workers())
    time.sleep(3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "epoch=0000").exists()
    finish(start(cfg, out, address))
    check_same(out, reference)


def test_driver_killed_while_writing_the_epoch(setup):
    tmp, config, address, reference = setup
    cfg, out = config("b", "cache-ref"), tmp / "b"  # warm cache: straight to retrieval and writing
    proc = start(cfg, out, address)
    wait_for(lambda: len(list(out.glob(".epoch=0000.partial-*/part-*.parquet"))) >= 5)  # this writer's partial
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "epoch=0000").exists()  # a reader never sees the half-written epoch
    state = list((out / "_run").glob("*/state.json"))
    assert state, "retrieval had finished and is kept"
    before = state[0].stat().st_mtime_ns
    finish(start(cfg, out, address, "--resume"))
    assert state[0].stat().st_mtime_ns == before  # retrieval was not repeated
    check_same(out, reference)


def embed_calls(**filters):
    """Ray's record of embedding calls (task attempts) matching `filters`, e.g. worker_pid=..., state="RUNNING"."""
    from ray.util.state import list_tasks

    return [t for t in list_tasks(filters=[(k, "=", v) for k, v in filters.items()], detail=True, limit=10_000,
                                  raise_on_missing_output=False)
            if t.type == "ACTOR_TASK"]


def test_embedding_actor_killed_mid_run(setup):
    """SIGKILL the embedding actor while one of its calls runs: Ray records that call as failed with the actor and
    runs it again on the restarted actor, and the run still writes the undisturbed run's bytes."""
    tmp, config, address, reference = setup
    cfg, out = config("c", "cache-c"), tmp / "c"
    proc = start(cfg, out, address)
    wait_for(lambda: any(embed_calls(worker_pid=w.pid, state="RUNNING") for w in embed_workers()))
    killed = []
    for worker in embed_workers():
        worker.kill()
        worker.wait(timeout=30)  # returns once the process is gone: the kill took effect
        killed.append(worker.pid)
    assert killed and not list((out / "_run").glob("*/state.json"))  # embedding had not finished
    finish(proc)
    check_same(out, reference)
    interrupted = [t for pid in killed for t in embed_calls(worker_pid=pid) if t.state == "FAILED"]
    assert interrupted, "no embedding call was running on the killed actor"
    assert {t.error_type for t in interrupted} <= {"ACTOR_DIED", "WORKER_DIED"}
    for call in interrupted:  # each interrupted call ran again, to the end, in another process
        retries = [t for t in embed_calls(task_id=call.task_id) if t.attempt_number > call.attempt_number]
        assert any(t.state == "FINISHED" and t.worker_pid not in killed for t in retries), call

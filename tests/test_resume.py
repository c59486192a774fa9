"""Kill the run (the driver, or a Ray actor) at several points, run it again, compare with an undisturbed run."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

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

    def config(name, cache, **sections):
        path = tmp / f"{name}.yaml"
        raw = base_config(pairs, str(tmp / cache), output={"rows_per_shard": 2},
                          embed={"num_actors": 1, "cpus_per_actor": 0.5}, teacher={"batch_size": 8}, **sections)
        raw["run"]["executor"] = "ray"  # killed drivers and actors of a Ray run
        path.write_text(yaml.safe_dump(raw))
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


EMBED_BAR = re.compile(r"embed [^:\r\n]*:\s*\d+%\|[^|]*\|\s*(\d+)/(\d+)")


def embed_progress(log: Path) -> tuple[int, int]:
    """The driver's last printed embedding progress (items done, items to embed); (0, 0) before it starts."""
    found = EMBED_BAR.findall(log.read_text(errors="replace")) if log.exists() else []
    return tuple(map(int, found[-1])) if found else (0, 0)


def test_embedding_actor_killed_mid_run(setup):
    """SIGKILL the one embedding actor while the driver still waits for most of the vectors: a restarted actor
    embeds the rest, and the run writes the undisturbed run's bytes."""
    tmp, config, address, reference = setup
    cfg, out, log = config("c", "cache-c", run={"progress": True}), tmp / "c", tmp / "c.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "mine", "--config", str(cfg), "--out",
                                 str(out)], env={**os.environ, "RAY_ADDRESS": address, "HF_HUB_OFFLINE": "1",
                                                 "RAY_AUTH_MODE": "disabled"}, stdout=sink, stderr=subprocess.STDOUT)
    wait_for(lambda: 0 < embed_progress(log)[0] < embed_progress(log)[1] // 2 and embed_workers())
    killed = []
    for worker in embed_workers():
        worker.kill()
        worker.wait(timeout=30)  # returns once the process is gone: the kill took effect
        killed.append(worker.pid)
    done, total = embed_progress(log)  # read after the kill: at the kill, no more than this was done
    assert killed and done < total, (killed, done, total)
    wait_for(lambda: any(w.pid not in killed for w in embed_workers()) or proc.poll() is not None)
    restarted = [w.pid for w in embed_workers() if w.pid not in killed]
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert restarted, "no actor took over from the killed one"
    assert embed_progress(log) == (total, total)  # the restarted actor embedded the rest
    check_same(out, reference)

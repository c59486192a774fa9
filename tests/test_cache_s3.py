"""The embedding cache on an object store: a real S3 API server (moto in server mode, started here) reached through
s3fs, as a cluster's nodes would reach a bucket. The actors write their parts there; the driver gets no vectors."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
import yaml

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import config_from_dict
from pipeline.mine import mine

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "hardneg-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(storage_options, s3fs filesystem) of a moto S3 server on 127.0.0.1 with one empty bucket."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    # the options a user gives as `embed.storage_options`: the driver and every actor open the bucket with them
    options = {"endpoint_url": f"http://{host}:{port}", "key": "testing", "secret": "testing"}
    # moto's buckets live in this process, not in the server: an earlier module's would still be there
    urllib.request.urlopen(urllib.request.Request(f"{options['endpoint_url']}/moto-api/reset", method="POST"))
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(BUCKET)
    yield options, fs
    server.stop()


def bucket_parts(fs, prefix: str) -> list[str]:
    fs.invalidate_cache()
    return sorted(fs.glob(f"{BUCKET}/{prefix}/*/part-*.parquet"))


def digests(epoch_dir) -> list:
    manifest = json.loads((epoch_dir / "_manifest.json").read_text())
    return [[f["path"], f["rows"], f["sha256"]] for f in manifest["files"] + manifest["candidate_files"]]


def embedded(result) -> tuple[int, int]:
    """(items embedded, items served by the cache) over both roles of a run."""
    embed = result.stats["embed"]
    return (sum(embed[r]["embedded"] for r in ("queries", "candidates")),
            sum(embed[r]["cached"] for r in ("queries", "candidates")))


@pytest.fixture(scope="module")
def corpus(s3, ray_session, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3-cache")
    pairs = write_jsonl(tmp / "pairs.jsonl", text_pairs(120))
    options, _ = s3

    def config(prefix: str) -> dict:
        return base_config(pairs, f"s3://{BUCKET}/{prefix}", teacher={"batch_size": 8},
                           embed={"storage_options": options, "num_actors": 1, "cpus_per_actor": 0.5},
                           run={"executor": "ray"})  # Ray actors write the parts to the bucket

    first = mine(config_from_dict(config("cache")), tmp / "first")
    return tmp, config, first


def test_embed_stage_returns_part_names_and_counts_never_vectors(s3, ray_session, tmp_path):
    """The Ray Data output of the embedding stage (what reaches the driver) has no vector column; the vectors are
    in the bucket, under the keys the driver looks up. The stage reads plan specs, its actors the texts."""
    import numpy as np
    import pyarrow as pa

    from pipeline.blocks import _write_ipc
    from pipeline.embed import EmbeddingCache, PARTS_SCHEMA, PlanSpec, embed_stage, input_keys, plan_range
    from pipeline.teachers import teacher_fingerprint

    options, fs = s3
    cfg = config_from_dict({"input": {"pairs": ["unused.jsonl"]}, "teacher": {"batch_size": 4},
                            "embed": {"cache_dir": f"s3://{BUCKET}/unit", "storage_options": options},
                            "run": {"progress": False}})
    texts = [r["qry"] for r in text_pairs(10)]
    items = pa.table({"item_id": [f"i{i}" for i in range(10)], "embed_text": texts, "image_path": [""] * 10})
    _write_ipc(items, tmp_path / "items.arrow", 4)
    fp = teacher_fingerprint(cfg.teacher, "candidate")
    np.save(tmp_path / "rows.npy", np.arange(10))
    planned = plan_range(PlanSpec(str(tmp_path / "items.arrow"), str(tmp_path / "plan.arrow"),
                                  ((0, 0, ((str(tmp_path / "rows.npy"), 0, 10),)),), ((fp, None, "candidate"),), ("candidate",),
                                  cfg.embed.cache_dir, options, cfg.teacher.model, 4, None, None))
    assert planned["embedded"] == 10 and planned["sections"] == [((0, 0), 0, 3)]
    specs = [{"items": str(tmp_path / "items.arrow"), "plan": planned["plan"], "start": s, "end": e}
             for s, e in ((0, 2), (2, 3))]
    ds = embed_stage(ray_session.data.from_items(specs, override_num_blocks=2), cfg, "candidate",
                     {"num_cpus": 0.5, "num_gpus": 0.0, "threads": 1}, 1)
    out = ds.to_arrow_refs()
    tables = ray_session.get(out)
    assert all(t.schema.equals(PARTS_SCHEMA) for t in tables)  # fingerprint, part, rows: no `vector`
    written = pa.concat_tables(tables)
    assert "vector" not in written.column_names
    assert sum(written.column("rows").to_pylist()) == 10
    assert len(written) == 2  # one part per block (2 blocks, fewer rows than CACHE_PART_ROWS each)
    assert sorted(written.column("part").to_pylist()) == bucket_parts(fs, "unit")
    found, vectors = EmbeddingCache(cfg.embed.cache_dir, fp, options).lookup(input_keys(items))
    assert found.all() and vectors.shape == (10, 384)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)


def test_mine_writes_parts_to_the_bucket_and_a_rerun_embeds_nothing(corpus, s3, shared_cache):
    tmp, config, first = corpus
    _, fs = s3
    done, cached = embedded(first)
    assert done > 0
    parts = bucket_parts(fs, "cache")
    assert parts and sum(pq.ParquetFile(fs.open(p)).metadata.num_rows for p in parts) >= done
    assert not (tmp / "s3:").exists() and not os.path.exists("s3:")  # the URI was never taken for a local path

    again = mine(config_from_dict(config("cache")), tmp / "again")  # a new out-folder, the same bucket
    assert embedded(again) == (0, done + cached)
    assert digests(again.epoch_dir) == digests(first.epoch_dir)
    assert bucket_parts(fs, "cache") == parts  # nothing written twice

    local = config("cache")
    local["embed"] = {"cache_dir": shared_cache, "num_actors": 1, "cpus_per_actor": 0.5}
    assert digests(mine(config_from_dict(local), tmp / "local").epoch_dir) == digests(first.epoch_dir)


def test_driver_killed_mid_embedding_resumes_and_embeds_only_the_rest(corpus, s3, ray_session):
    """`hardneg mine` with parts of 16 vectors, SIGKILLed once the first part is in the bucket: the rerun serves
    what was written from the bucket, embeds the rest, and writes the undisturbed run's bytes."""
    tmp, config, first = corpus
    _, fs = s3
    total = sum(embedded(first))
    cfg_path = tmp / "killed.yaml"
    cfg_path.write_text(yaml.safe_dump(config("killed")))
    child = ("import sys, pipeline.embed as e, pipeline.cli as cli; e.CACHE_PART_ROWS = 16; "
             "sys.exit(cli.main(sys.argv[1:]))")
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-c", child, "mine", "--config", str(cfg_path), "--out",
                             str(tmp / "killed"), "--no-progress"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not bucket_parts(fs, "killed"):
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before its first part reached the bucket"
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    assert not (tmp / "killed" / "epoch=0000").exists()
    time.sleep(2)  # the dead job's actor may finish the part it was writing
    kept = sum(pq.ParquetFile(fs.open(p)).metadata.num_rows for p in bucket_parts(fs, "killed"))
    assert 0 < kept < total

    result = mine(config_from_dict(config("killed")), tmp / "killed")
    done, cached = embedded(result)
    assert cached >= kept and done == total - cached and done > 0  # only what the bucket lacked
    assert digests(result.epoch_dir) == digests(first.epoch_dir)


WRITE_AND_READ = """
import numpy as np, pyarrow as pa
from pipeline.embed import EmbeddingCache
cache = EmbeddingCache("s3://%s/env-%s", "fp")
vectors = np.eye(3, 4, dtype=np.float32)
cache.write(pa.table({"key": ["a", "b", "c"], "vector": pa.FixedSizeListArray.from_arrays(vectors.reshape(-1), 4)}))
found, got = cache.lookup(pa.array(["c", "x", "a"]))
assert found.tolist() == [True, False, True] and np.array_equal(got, vectors[[2, 0]]), (found, got)
print(len(cache.parts()))
"""


@pytest.mark.parametrize("style", ["aws", "fsspec"])
def test_the_endpoint_and_credentials_may_come_from_the_usual_env_vars(s3, style):
    """What docs/cluster.md promises: without `embed.storage_options`, botocore's AWS_* or fsspec's FSSPEC_S3_*
    env vars (read by each process that opens the cache) reach the bucket."""
    options, fs = s3
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FSSPEC_"))}
    if style == "aws":
        env.update(AWS_ENDPOINT_URL=options["endpoint_url"], AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    else:
        env.update(FSSPEC_S3_ENDPOINT_URL=options["endpoint_url"], FSSPEC_S3_KEY="testing",
                   FSSPEC_S3_SECRET="testing")
    proc = subprocess.run([sys.executable, "-c", WRITE_AND_READ % (BUCKET, style)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "1" and len(bucket_parts(fs, f"env-{style}")) == 1

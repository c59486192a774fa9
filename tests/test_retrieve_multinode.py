"""Several Ray nodes simulated on one machine (ray.cluster_utils.Cluster: one raylet per node, fractional-CPU actors).

The cluster runs in a subprocess: one process can hold one Ray session, and the rest of the suite shares the
single-node session of tests/conftest.py. The subprocess writes its results to disk; the comparison with
single-process exact search happens here.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import index as ix
from test_index import brute, clustered

ROOT = Path(__file__).resolve().parents[1]

CLUSTER = """
import json, os, sys
os.environ["RAY_AUTH_MODE"] = "disabled"
sys.path[:0] = [{root!r}, {tests!r}]
import faiss
faiss.omp_set_num_threads(1)
import numpy as np
import ray
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": 1, "include_dashboard": False}})
for _ in range({workers}):
    cluster.add_node(num_cpus=1)
ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
ray.data.DataContext.get_current().enable_progress_bars = False
cluster.wait_for_nodes()
assert len([n for n in ray.nodes() if n["Alive"]]) == {workers} + 1
out = {out!r}
try:
{body}
finally:
    ray.shutdown()
    cluster.shutdown()
"""


def run_on_cluster(body: str, out: Path, workers: int = 2, timeout: int = 600):
    code = CLUSTER.format(root=str(ROOT), tests=str(ROOT / "tests"), workers=workers, out=str(out),
                          body=textwrap.indent(textwrap.dedent(body), "    "))
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(ROOT))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]


def test_three_node_retrieval_equals_single_process_exact_search(tmp_path):
    x = clustered(9000, 24, seed=21)
    q = clustered(1200, 24, seed=22)
    for j, (lo, hi) in enumerate([(0, 4000), (4000, 9000)]):
        np.save(tmp_path / f"pool-{j}.npy", x[lo:hi])
    np.save(tmp_path / "q.npy", q)
    run_on_cluster(f"""
        from pipeline.config import IndexConfig
        from pipeline.retrieve import retrieve
        q = np.load(out + "/q.npy")
        pool = [out + "/pool-0.npy", out + "/pool-1.npy"]
        res = {{}}
        # exact index, shards on the three nodes, queries through the Ray Data stage (3 blocks of 400)
        s, i, info = retrieve(pool, q, 40, IndexConfig(kind="flat", distributed="always", num_shards=3,
                                                       actor_cpus=0.5, client_cpus=0.25, query_batch=400))
        np.save(out + "/flat_s.npy", s); np.save(out + "/flat_i.npy", i); res["flat"] = info
        # IVF: one quantizer trained in the driver, lists filled on three nodes
        s, i, info = retrieve(np.concatenate([np.load(p) for p in pool]), q, 40,
                              IndexConfig(kind="ivf_flat", nprobe=8, distributed="always", num_shards=3,
                                          query_batch=400, add_batch=1000))
        np.save(out + "/ivf_i.npy", i); res["ivf"] = info
        # fast-scan codes, trained in a Ray task from the pool files, candidates rescored in the search stage from
        # the same files
        s, i, info = retrieve(pool, q, 40, IndexConfig(kind="ivf_fs", nprobe=8, recall_floor=None,
                                                       distributed="always", num_shards=3, query_batch=400))
        np.save(out + "/fs_s.npy", s); np.save(out + "/fs_i.npy", i); res["fs"] = info
        json.dump(res, open(out + "/info.json", "w"))
    """, tmp_path)
    info = json.loads((tmp_path / "info.json").read_text())
    assert info["flat"]["mode"] == "ray" and info["flat"]["num_shards"] == 3
    assert info["flat"]["nodes"] >= 2  # SPREAD put the shards on different raylets
    from pipeline.config import IndexConfig
    ms, mi = np.load(tmp_path / "flat_s.npy"), np.load(tmp_path / "flat_i.npy")
    ss, si = ix.search(ix.build_index(x, IndexConfig(kind="flat")), q, 40)  # single process, one exact index
    assert np.array_equal(mi, si) and np.array_equal(ms, ss)  # same neighbours, same order, same bits
    es, ei = ix.exact_search(x, q, 40, batch_rows=1000)
    assert np.array_equal(mi, ei)
    bs, _ = brute(x, q, 40)  # numpy's own float32 matmul: equal up to rounding (it may swap 1-ulp ties)
    assert np.allclose(ms, bs, atol=1e-5)
    # the 3-node sharded IVF returns exactly what one in-process IVF index with the same settings returns
    built = ix.build_index(x, IndexConfig(kind="ivf_flat", nprobe=8))
    _, single = ix.search(built, q, 40)
    assert info["ivf"]["factory"] == built.info["factory"] and info["ivf"]["nodes"] >= 2
    assert np.array_equal(np.load(tmp_path / "ivf_i.npy"), single)
    # and so does the fast-scan index, scores included
    built = ix.build_index(x, IndexConfig(kind="ivf_fs", nprobe=8))
    fs, fi = ix.search(built, q, 40)
    assert (info["fs"]["kind"], info["fs"]["factory"]) == ("ivf_fs", built.info["factory"]) and info["fs"]["nodes"] >= 2
    assert np.array_equal(np.load(tmp_path / "fs_i.npy"), fi) and np.array_equal(np.load(tmp_path / "fs_s.npy"), fs)


def test_mine_gives_the_same_negatives_on_three_nodes_as_on_one(ray_session, shared_cache, tmp_path):
    from corpus import base_config, text_pairs, write_jsonl
    from pipeline.config import config_from_dict
    from pipeline.mine import mine

    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(120))
    raw = base_config(pairs, shared_cache, index={"distributed": "never"})
    single = mine(config_from_dict(raw), tmp_path / "single")
    raw_multi = base_config(pairs, shared_cache, index={"distributed": "always", "num_shards": 3,
                                                        "query_batch": 32})
    (tmp_path / "raw.json").write_text(json.dumps(raw_multi))
    run_on_cluster("""
        from pipeline.config import config_from_dict
        from pipeline.mine import mine
        res = mine(config_from_dict(json.load(open(out + "/raw.json"))), out + "/multi")
        json.dump(res.stats, open(out + "/stats.json", "w"))
    """, tmp_path)
    cols = ["query_id", "neg_item_ids", "neg_scores", "neg_ranks"]
    a = pd.read_parquet(single.epoch_dir)[cols].sort_values("query_id").reset_index(drop=True)
    b = pd.read_parquet(tmp_path / "multi" / "epoch=0000")[cols].sort_values("query_id").reset_index(drop=True)
    assert len(a) == len(b) == 120
    assert (a.neg_item_ids.map(list) == b.neg_item_ids.map(list)).all()
    assert (a.neg_ranks.map(list) == b.neg_ranks.map(list)).all()
    assert np.allclose(np.concatenate(a.neg_scores.to_list()), np.concatenate(b.neg_scores.to_list()), atol=1e-6)
    multi = json.loads((tmp_path / "stats.json").read_text())["retrieval"]["t2t"]["index"]
    one = single.stats["retrieval"]["t2t"]["index"]
    assert (one["mode"], multi["mode"], multi["num_shards"]) == ("in_process", "ray", 3) and multi["nodes"] >= 2
    assert one["recall_at_k"] == multi["recall_at_k"] == 1.0  # recall is measured and reported in _stats.json

"""Input files on an object store: pairs and candidates as `s3://` URIs on a real S3 API server (moto, the
embedding-cache tests' server) read through fsspec, with the node's usual credentials (the AWS_* env vars here).
A JSONL input there is read, cut into blocks and counted as its local copy is."""
import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from corpus import base_config, text_pairs, write_jsonl
from pipeline.config import ConfigError, config_from_dict, load_config
from pipeline.mine import mine
from pipeline.read import READ_BLOCK_ROWS, InputError, input_items, load_corpus, plan_spans
from pipeline.read_blocks import plan, read_blocks
from pipeline.search import write_corpus
from test_cache_s3 import BUCKET, digests, s3  # noqa: F401 (s3: the moto server fixture)
from test_cli_errors import hardneg
from test_read_blocks import _files, _input


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The s3 server's endpoint and credentials as the AWS_* env vars every process that reads the input reads."""
    import s3fs

    options, fs = s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", options["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", options["key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", options["secret"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()  # an instance made under other env vars would be reused
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


def _upload(fs, local, prefix: str) -> str:
    fs.put(str(local), f"{BUCKET}/{prefix}/{local.name}")
    return f"s3://{BUCKET}/{prefix}/{local.name}"


def test_a_jsonl_input_on_s3_mines_the_shards_of_its_local_copy(s3_env, tmp_path):
    """`hardneg mine` (local executor: the one-pass read) over JSONL pairs and candidates in the bucket writes the
    shards the local copies give; `input_items` counts the remote files' lines."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(40))
    cands = write_jsonl(tmp_path / "cands.jsonl", [{"text": f"clip art of a thing number {i}"} for i in range(9)])
    # its own cache: vectors embedded here in other batches would be served to other tests' runs of these texts
    local = base_config(pairs, str(tmp_path / "cache"), run={"executor": "local", "progress": False})
    local["input"]["candidates"] = str(cands)
    remote = {**local, "input": {**local["input"], "pairs": [_upload(s3_env, pairs, "mine")],
                                 "candidates": _upload(s3_env, cands, "mine")}}

    assert input_items(config_from_dict(remote).input) == input_items(config_from_dict(local).input) == 2 * 40 + 9
    expected = digests(mine(config_from_dict(local), tmp_path / "local").epoch_dir)
    assert digests(mine(config_from_dict(remote), tmp_path / "remote").epoch_dir) == expected


def write_config(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def _remote_input(tmp_path, fs, prefix: str):
    """test_read_blocks' input (JSONL pairs with broken lines, Parquet pairs, JSONL candidates, images): the local
    config, and the same with its three files in the bucket."""
    cfg = _input(tmp_path)
    files = [Path(p) for p in cfg.input.pairs]
    return cfg, replace(cfg, input=replace(cfg.input, pairs=[_upload(fs, p, prefix) for p in files],
                                           candidates=_upload(fs, Path(cfg.input.candidates), prefix)))


def _same_meta(remote_meta, local_meta, tmp_path, prefix: str) -> None:
    """The metadata of both reads alike, but for the files' names in the rejects (the URIs, the local paths)."""
    names = json.dumps(remote_meta.rejects).replace(f"s3://{BUCKET}/{prefix}", str(tmp_path))
    assert replace(remote_meta, rejects=json.loads(names)) == local_meta


def test_the_block_read_of_a_jsonl_file_on_s3_writes_its_local_copy_s_files(s3_env, tmp_path):
    """The block read cuts the remote JSONL file where it cuts the local one and writes the same files, whatever
    the block size."""
    cfg, remote = _remote_input(tmp_path, s3_env, "blocks")
    for block_rows in (1, 7, 10_000):
        assert plan_spans(remote.input.pairs[0], block_rows) == plan_spans(cfg.input.pairs[0], block_rows)
        assert plan_spans(remote.input.candidates, block_rows) == plan_spans(cfg.input.candidates, block_rows)
    one = write_corpus(load_corpus(cfg.input, caption_mode=False), tmp_path / "one", cfg.retrieve.block_rows)
    for block_rows in (1, 7, 10_000):
        meta = read_blocks(remote, tmp_path / f"blocks-{block_rows}", use_ray=False, block_rows=block_rows)
        _same_meta(meta, one, tmp_path, "blocks")
        assert _files(tmp_path / f"blocks-{block_rows}") == _files(tmp_path / "one"), block_rows


RAY_BLOCKS = """
import os, pickle, sys, ray
from pipeline.read_blocks import read_blocks
cfg, out, address = pickle.load(open(sys.argv[1], "rb"))
ray.init(address=address, log_to_driver=False, configure_logging=False,  # the workers get this job's AWS_* env vars
         runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith("AWS_")}})
pickle.dump(read_blocks(cfg, out, use_ray=True, block_rows=5), open(sys.argv[2], "wb"))
"""


def test_the_block_read_on_ray_reads_a_jsonl_file_on_s3_as_its_local_copy(s3_env, ray_session, tmp_path):
    """The block tasks in Ray workers, each reading its span of the bucket's files: the local copy's files."""
    cfg, remote = _remote_input(tmp_path, s3_env, "ray")
    one = write_corpus(load_corpus(cfg.input, caption_mode=False), tmp_path / "one", cfg.retrieve.block_rows)
    task, result = tmp_path / "task.pkl", tmp_path / "meta.pkl"
    task.write_bytes(pickle.dumps((remote, str(tmp_path / "ray"), ray_session.get_runtime_context().gcs_address)))
    proc = subprocess.run([sys.executable, "-c", RAY_BLOCKS, str(task), str(result)], capture_output=True, text=True,
                          timeout=300, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _same_meta(pickle.loads(result.read_bytes()), one, tmp_path, "ray")
    assert _files(tmp_path / "ray") == _files(tmp_path / "one")


def test_a_missing_object_is_named_with_what_to_do(s3_env, tmp_path):
    """A URI with no object behind it: the one-pass read and the block read name it and say what to do; it counts
    0 items (the read says what is wrong)."""
    for name in ("missing.jsonl", "missing.parquet"):
        uri = f"s3://{BUCKET}/nowhere/{name}"
        cfg = config_from_dict(base_config(tmp_path / name, str(tmp_path / "cache")))
        cfg.input.pairs = [uri]
        message = f"{uri} does not exist; fix the URI or upload the file"
        with pytest.raises(InputError) as error:
            load_corpus(cfg.input, caption_mode=False)
        assert str(error.value) == message
        assert str(read_blocks(cfg, tmp_path / name, use_ray=False)) == message
        assert input_items(cfg.input) == 0


def test_a_pattern_of_uris_reads_the_objects_it_matches_in_order(s3_env, tmp_path):
    """`input.pairs: [s3://bucket/train/part-*.jsonl]` expands to the matching objects, sorted, as a local pattern
    does; a pattern that matches nothing stops the run with the config's name."""
    rows = text_pairs(30)
    for i in (1, 0):  # uploaded out of order
        _upload(s3_env, write_jsonl(tmp_path / f"part-{i}.jsonl", rows[15 * i:15 * (i + 1)]), "train")
    raw = base_config(tmp_path / "part-*.jsonl", str(tmp_path / "cache"))
    local = write_config(tmp_path / "local.yaml", raw)
    remote = write_config(tmp_path / "remote.yaml", {**raw, "input": {**raw["input"],
                                                                     "pairs": [f"s3://{BUCKET}/train/part-*.jsonl"]}})
    assert load_config(remote).input.pairs == [f"s3://{BUCKET}/train/part-{i}.jsonl" for i in (0, 1)]
    assert [Path(p).name for p in load_config(local).input.pairs] == ["part-0.jsonl", "part-1.jsonl"]
    nothing = write_config(tmp_path / "nothing.yaml", {**raw, "input": {**raw["input"],
                                                                       "pairs": [f"s3://{BUCKET}/none/*.jsonl"]}})
    with pytest.raises(ConfigError, match=f"no file matches 's3://{BUCKET}/none/\\*.jsonl'"):
        load_config(nothing)


def test_hardneg_mine_names_a_missing_object_before_any_work(s3_env, tmp_path):
    """The CLI's checks ask the object store whether a URI input is there: exit 2, one line, nothing written."""
    raw = base_config(tmp_path / "pairs.jsonl", str(tmp_path / "cache"))
    raw["input"]["pairs"] = [f"s3://{BUCKET}/nowhere/pairs.jsonl"]
    r = hardneg("mine", "--config", str(write_config(tmp_path / "c.yaml", raw)), "--out", str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == (f"hardneg: error: input.pairs: s3://{BUCKET}/nowhere/pairs.jsonl does not exist; "
                                "fix the URI or upload the file")
    assert not (tmp_path / "o").exists()


def test_the_driver_downloads_a_jsonl_input_once_to_count_and_plan_it(s3_env, tmp_path, monkeypatch):
    """A job on Ray counts its input in the driver (`input_items`, to decide on Ray) and then plans its block read
    there (`read_blocks.plan`: the files' line boundaries): one download of a JSONL object gives both, the same
    spans as a scan of its local copy."""
    from s3fs.core import S3File

    fetched = []  # (key, bytes) of every range read from the bucket
    fetch = S3File._fetch_range
    monkeypatch.setattr(S3File, "_fetch_range", lambda self, start, end: fetched.append((self.key, end - start))
                        or fetch(self, start, end))
    pairs = write_jsonl(tmp_path / "pairs.jsonl", text_pairs(40))
    local = config_from_dict(base_config(pairs, str(tmp_path / "cache")))
    remote = replace(local, input=replace(local.input, pairs=[_upload(s3_env, pairs, "once")]))

    assert input_items(remote.input) == 2 * 40
    specs, errors = plan(remote.input, False, tmp_path / "staging")
    assert sum(n for key, n in fetched if key == "once/pairs.jsonl") == pairs.stat().st_size
    assert errors == [None] and [s.span for s in specs] == plan_spans(str(pairs), READ_BLOCK_ROWS)
    write_jsonl(tmp_path / "pairs.jsonl", text_pairs(41))  # the object changed: read again
    _upload(s3_env, pairs, "once")
    assert input_items(remote.input) == 2 * 41

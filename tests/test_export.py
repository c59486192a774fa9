"""`hardneg export` around the formats: lineage in every export, streaming, and the guarded destination folder.
All on a real mined run (tests/export_run.py)."""
from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from export_run import mined_run
from pipeline.cli import main as cli_main
from pipeline.export import FORMATS, ExportError, export
from pipeline.export.common import LINEAGE_FILE, LOCK_FILE, EpochSource


@pytest.fixture(scope="module")
def run(ray_session, shared_cache, tmp_path_factory):
    return mined_run(tmp_path_factory, shared_cache)


def _manifest(run):
    return json.loads((run / "epoch=0000" / "_manifest.json").read_text())


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_every_format_carries_the_run_lineage(run, tmp_path, fmt):
    record = export(run, 0, fmt, tmp_path / fmt)
    saved = yaml.safe_load((tmp_path / fmt / LINEAGE_FILE).read_text())
    manifest = _manifest(run)
    config_hash = hashlib.sha256(json.dumps(manifest["config"], sort_keys=True, separators=(",", ":")).encode())
    assert saved["config_hash"] == config_hash.hexdigest()
    assert saved["teacher_fingerprint"] == {"query": manifest["teacher"]["queries"]["fingerprint"],
                                            "candidate": manifest["teacher"]["candidates"]["fingerprint"]}
    assert saved["teacher_fingerprint"]["query"]
    assert saved["epoch"] == 0 and saved["format"] == fmt and saved["hardneg_version"] == "0.1.0"
    assert saved["retrieval_id"] == manifest["retrieval_id"]
    # every file written is listed with its checksum, and nothing else is in the folder
    listed = {f["path"]: f["sha256"] for f in saved["files"]}
    present = {str(p.relative_to(tmp_path / fmt)) for p in (tmp_path / fmt).rglob("*") if p.is_file()}
    assert present == set(listed) | {LINEAGE_FILE}
    for rel, digest in listed.items():
        assert hashlib.sha256((tmp_path / fmt / rel).read_bytes()).hexdigest() == digest
        if rel.endswith(".parquet"):  # Parquet files carry the lineage in their own metadata too
            meta = json.loads(pq.read_schema(tmp_path / fmt / rel).metadata[b"hardneg"])
            assert meta["config_hash"] == saved["config_hash"] and meta["epoch"] == 0
    assert record["exported"] == saved["exported"]


def test_export_streams_in_batches_and_the_batch_size_does_not_change_the_output(run, tmp_path):
    source = EpochSource(run, 0, batch_rows=7)
    sizes = [b.num_rows for b in source.batches(["query_id"])]
    assert max(sizes) <= 7 and sum(sizes) == source.rows == 120
    readers = {"jsonl": lambda p: p.read_bytes(), "parquet": lambda p: pq.read_table(p).to_pylist(),
               "arrow": lambda p: pa.ipc.open_stream(p.read_bytes()).read_all().to_pylist()}
    for fmt in ("flagembedding", "ranked", "mme5"):
        a = export(run, 0, fmt, tmp_path / f"{fmt}-a", batch_rows=7)
        b = export(run, 0, fmt, tmp_path / f"{fmt}-b")
        assert [f["path"] for f in a["files"]] == [f["path"] for f in b["files"]]
        for f in a["files"]:
            read = readers.get(f["path"].rsplit(".", 1)[-1])
            if read:
                assert read(tmp_path / f"{fmt}-a" / f["path"]) == read(tmp_path / f"{fmt}-b" / f["path"])


def test_a_non_empty_folder_is_refused_without_overwrite_and_nothing_is_touched(run, tmp_path):
    to = tmp_path / "to"
    to.mkdir()
    (to / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        export(run, 0, "tevatron", to)
    assert sorted(p.name for p in to.iterdir()) == ["notes.txt"]
    # --overwrite does not help: the folder holds no previous export
    with pytest.raises(ExportError, match="did not write"):
        export(run, 0, "tevatron", to, overwrite=True)
    assert (to / "notes.txt").read_text() == "mine" and sorted(p.name for p in to.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_only_what_the_previous_export_wrote(run, tmp_path):
    to = tmp_path / "to"
    export(run, 0, "flagembedding", to)
    old = {f["path"] for f in yaml.safe_load((to / LINEAGE_FILE).read_text())["files"]}
    with pytest.raises(ExportError, match="--overwrite"):
        export(run, 0, "tevatron", to)
    export(run, 0, "tevatron", to, overwrite=True)
    new = yaml.safe_load((to / LINEAGE_FILE).read_text())
    assert new["format"] == "tevatron"
    assert not any((to / p).exists() for p in old - {f["path"] for f in new["files"]})
    # a user's file next to an export: --overwrite refuses and deletes nothing
    (to / "user.jsonl").write_text("{}\n")
    before = sorted(p.name for p in to.rglob("*"))
    with pytest.raises(ExportError, match="user.jsonl"):
        export(run, 0, "hf", to, overwrite=True)
    assert sorted(p.name for p in to.rglob("*")) == before


def test_refuses_the_run_folder_a_missing_epoch_and_a_folder_another_export_holds(run, tmp_path):
    with pytest.raises(ExportError, match="overlaps the run folder"):
        export(run, 0, "hf", run / "exports")
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export(run, 0, "hf", tmp_path / "afile")
    with pytest.raises(ExportError, match="epoch 3 .* committed epochs there: epoch=0000"):
        export(run, 3, "hf", tmp_path / "x")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / LOCK_FILE).write_text(str(__import__("os").getpid()))  # a live writer
    with pytest.raises(ExportError, match="another export"):
        export(run, 0, "hf", busy)
    (busy / LOCK_FILE).write_text("999999999")  # a writer that is gone: its lock is taken over
    export(run, 0, "hf", busy)
    assert not (busy / LOCK_FILE).exists() and (busy / LINEAGE_FILE).exists()


def test_cli_export_and_its_errors(run, tmp_path, capsys):
    to = tmp_path / "st"
    assert cli_main(["export", str(run), "--format", "sentence-transformers", "--style", "n-tuple", "--scores",
                     "--to", str(to)]) == 0
    assert "wrote sentence-transformers export" in capsys.readouterr().out
    table = pq.read_table(to / "data")
    assert table.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4",
                                  "scores"]
    assert cli_main(["export", str(run), "--format", "hf", "--to", str(to)]) == 2
    assert "not empty" in capsys.readouterr().err

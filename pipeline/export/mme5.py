"""mmE5 training data: one `datasets.save_to_disk` folder per subset (`dataset`), what mmE5 opens with
`load_from_disk(os.path.join(--dataset_path, subset))`. Its loader `eval()`s `neg_text` and `neg_image_path`, so
they are Python list literals in strings (`repr(list)`), aligned; image paths are relative to `--image_dir`.

Written with pyarrow alone (Arrow IPC stream + `state.json` + `dataset_info.json`, the layout `save_to_disk`
writes), batch by batch.
"""
from __future__ import annotations

import json

import pyarrow as pa

from .common import PerDataset, dataset_runs, safe_name

SCHEMA = pa.schema([
    ("query_id", pa.string()), ("qry", pa.string()), ("qry_image_path", pa.string()), ("pos_text", pa.string()),
    ("pos_image_path", pa.string()), ("neg_text", pa.string()), ("neg_image_path", pa.string()),
    ("pos_score", pa.float32()), ("neg_scores", pa.string()),
])
DATA_FILE = "data-00000-of-00001.arrow"


class _DiskDataset:
    def __init__(self, folder, name: str):
        self.name = name
        self.folder = folder
        self.sink = pa.OSFile(str(folder.stage(f"{name}/{DATA_FILE}")), "wb")
        self.writer = pa.ipc.new_stream(self.sink, SCHEMA)

    def write(self, table: pa.Table) -> None:
        self.writer.write_table(table)

    def close(self) -> list[str]:
        self.writer.close()
        self.sink.close()
        features = {f.name: {"dtype": "float32" if f.type == pa.float32() else "string", "_type": "Value"}
                    for f in SCHEMA}
        info = {"citation": "", "description": "hardneg export (lineage: ../_hardneg_export.yaml)",
                "features": features, "homepage": "", "license": ""}
        state = {"_data_files": [{"filename": DATA_FILE}], "_fingerprint": "hardneg-" + self.name,
                 "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
                 "_split": None}
        self.folder.stage(f"{self.name}/dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        self.folder.stage(f"{self.name}/state.json").write_text(json.dumps(state, indent=2) + "\n")
        return [f"{self.name}/{DATA_FILE}"]


def write(source, folder, lineage, options) -> dict:
    writers = PerDataset(lambda ds: _DiskDataset(folder, safe_name(ds)))
    counts = {"queries": 0, "rows": 0, "subsets": {}}
    for batch in source.batches(["dataset", "query_id", "qry", "qry_image_path", "pos_text", "pos_image_path",
                                 "pos_score", "neg_text", "neg_image_path", "neg_scores"]):
        for ds, run in dataset_runs(batch):
            rows = run.to_pylist()
            table = pa.table({
                **{c: [r[c] for r in rows] for c in ("query_id", "qry", "qry_image_path", "pos_text",
                                                     "pos_image_path", "pos_score")},
                "neg_text": [repr(list(r["neg_text"])) for r in rows],
                "neg_image_path": [repr(list(r["neg_image_path"])) for r in rows],
                "neg_scores": [repr([round(float(s), 6) for s in r["neg_scores"]]) for r in rows],
            }, schema=SCHEMA)
            writers[ds].write(table)
            counts["queries"] += table.num_rows
            counts["rows"] += table.num_rows
            counts["subsets"][safe_name(ds)] = counts["subsets"].get(safe_name(ds), 0) + table.num_rows
    writers.close()
    return counts

"""Rebuild the bundled demo corpus from the public-domain clip-art sample (../shared/data/clipart).

Three tasks over the same 600 images, in the MMEB / VLM2Vec pair layout:
- clipart_t2i: caption -> image; group = caption (images sharing a caption are not negatives of each other)
- clipart_i2t: image -> caption; group = caption
- clipart_cls: image -> "clip art of <category>"; group = top-level category, so a parent or sibling label
  ("clip art of food" for a "food, fruit" image) is a natural false negative that the group filter removes.
"""
import json
import shutil
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

here = Path(__file__).resolve().parent
source = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parents[2] / "shared" / "data" / "clipart"
items = pq.read_table(source / "items.parquet").to_pylist()
(here / "images").mkdir(exist_ok=True)
rows = []
for it in items:
    shutil.copyfile(source / it["image_path"], here / it["image_path"])
    label = "clip art of " + it["category"].replace("/", ", ")
    top = it["category"].split("/")[0]
    rows.append({"id": f"t2i-{it['id']}", "dataset": "clipart_t2i", "qry": it["caption"], "qry_image_path": "",
                 "pos_text": "", "pos_image_path": it["image_path"], "group": it["caption"]})
    rows.append({"id": f"i2t-{it['id']}", "dataset": "clipart_i2t", "qry": "", "qry_image_path": it["image_path"],
                 "pos_text": it["caption"], "pos_image_path": "", "group": it["caption"]})
    rows.append({"id": f"cls-{it['id']}", "dataset": "clipart_cls", "qry": "", "qry_image_path": it["image_path"],
                 "pos_text": label, "pos_image_path": "", "group": top})
with open(here / "pairs.jsonl", "w") as f:
    for row in rows:
        f.write(json.dumps(row) + "\n")
pq.write_table(pa.Table.from_pylist([{"image_path": it["image_path"], "caption": it["caption"],
                                      "category": it["category"]} for it in items]), here / "captions.parquet")
shutil.copyfile(source / "README.md", here / "SOURCE.md")
print(f"{len(rows)} pairs, {len(items)} images -> {here}")

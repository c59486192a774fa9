"""benchmarks/read_memory.py at a tiny size, end to end (child processes, the real reader): every figure is there and
the corpus it measured is the whole input."""
import json

from benchmarks.read_memory import main


def test_read_memory_result_file(tmp_path):
    out = tmp_path / "read_memory.json"
    assert main(["--sizes", "2000", "--work", str(tmp_path / "work"), "--out", str(out), "--block-rows", "700"]) == 0
    r = json.loads(out.read_text())["runs"]["2000"]
    assert r["queries"] == 2000 and r["items"] > 2000  # every pair accepted; queries and positives are items
    assert r["peak_rss"] >= r["rss_before"] > 0 and r["tables_bytes"] > 0 and r["wall_s"] > 0
    assert r["growth_bytes_per_pair"] == round((r["peak_rss"] - r["rss_before"]) / 2000)
    blocks = r["blocks"]  # the same read as block tasks (pipeline/read_blocks.py): the same corpus
    assert blocks["assemble"]["queries"] == 2000 and blocks["assemble"]["items"] == r["items"]
    assert blocks["blocks"]["blocks"] >= 1 and all(b["peak_rss"] >= b["rss_before"] > 0 for b in blocks.values())

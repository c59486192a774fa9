"""benchmarks/read_memory.py at tiny sizes, end to end (child processes, the real reader): every figure is there, the
corpus it measured is the whole input, and the assembling task's working set does not grow with the corpus."""
import json

from benchmarks.read_memory import main


def test_read_memory_result_file(tmp_path):
    out = tmp_path / "read_memory.json"
    assert main(["--sizes", "2000", "16000", "--work", str(tmp_path / "work"), "--out", str(out),
                 "--block-rows", "500"]) == 0
    result = json.loads(out.read_text())
    r = result["runs"]["2000"]
    assert r["queries"] == 2000 and r["items"] > 2000  # every pair accepted; queries and positives are items
    assert r["peak_rss"] >= r["rss_before"] > 0 and r["tables_bytes"] > 0 and r["wall_s"] > 0
    assert r["growth_bytes_per_pair"] == round((r["peak_rss"] - r["rss_before"]) / 2000)
    blocks = r["blocks"]  # the same read as block tasks (pipeline/read_blocks.py): the same corpus
    assert blocks["assemble"]["queries"] == 2000 and blocks["assemble"]["items"] == r["items"]
    assert blocks["blocks"]["blocks"] >= 1 and all(b["peak_rss"] >= b["rss_before"] > 0 for b in blocks.values())
    assert blocks["assemble"]["peak_anon"] >= blocks["assemble"]["anon_before"] > 0
    assert blocks["assemble-traced"]["python_mb"] > 0 and blocks["assemble-traced"]["arrow_mb"] > 0
    # 8x the pairs in blocks of the same 500 rows: the assembling task holds about the same (measured +10 bytes a
    # pair). Before it worked a block / id range at a time, and kept the dedup hashes in files, +319 bytes a pair.
    assert result["assemble_growth"]["16000"]["traced_bytes_per_pair"] < 30, result["assemble_growth"]

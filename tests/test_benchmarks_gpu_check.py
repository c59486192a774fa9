"""The prepared GPU check (benchmarks/gpu_check.sh) in its CPU mode, as CI can run it: every step's logic runs
(bf16 teacher, batch_size auto, forced OOM halving, FAISS), and without a GPU the plain command says so and stops."""
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
ENV = {**os.environ, "PYTHON": os.environ.get("PYTHON", str(Path(os.sys.executable)))}


def test_cpu_mode_runs_every_step_and_writes_the_result(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([str(SCRIPT), "--cpu", "--out", str(out)], capture_output=True, text=True, env=ENV,
                       timeout=480)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(out.read_text())
    assert r["mode"] == "cpu" and r["ok"] is True
    c = r["checks"]
    assert c["vlm_bf16"]["ok"] and c["vlm_bf16"]["model_dtype"] == "torch.bfloat16"
    assert c["vlm_bf16"]["min_cosine_bf16_vs_fp32"] > 0.98
    assert c["batch_auto"]["ok"] and c["batch_auto"]["batch_size"] >= 1 and c["batch_auto"]["items_per_s"] > 0
    oom = c["oom_halving"]
    sizes = oom["forward_batch_sizes"]
    assert oom["ok"] and oom["forced_by"].startswith("hook")
    # the whole batch fails, then halves until every piece fits the cap (a quarter of the batch): 32, 16, 8, 8, ...
    cap = oom["batch"] // 4
    assert sizes[0] == oom["batch"] and sizes.count(oom["batch"] // 2) == 2 and sizes.count(cap) == 4
    assert sum(s for s in sizes if s <= cap) == oom["batch"]
    assert oom["min_cosine_vs_one_by_one"] > 0.99
    f = c["faiss_gpu"]
    assert f["ok"] is None and "GPU FAISS not run" in f["gpu_skipped"] and f["cpu"]["qps"] > 0
    assert "all checks passed" in p.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible: the plain command runs the GPU check")
def test_without_a_gpu_the_plain_command_stops_with_a_message(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([str(SCRIPT), "--out", str(out)], capture_output=True, text=True, env=ENV, timeout=120)
    assert p.returncode == 2
    assert "no CUDA GPU visible" in p.stderr and "--cpu" in p.stderr
    assert not out.exists()


def test_a_failing_step_is_recorded_the_others_still_run_and_the_exit_is_1(tmp_path, monkeypatch):
    import benchmarks.gpu_check as gc

    def broken(*a, **k):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(gc, "check_vlm_bf16", broken)
    for name in ("check_batch_auto", "check_oom_halving", "check_faiss"):
        monkeypatch.setattr(gc, name, lambda *a, **k: {"ok": True})
    out = tmp_path / "gpu.json"
    assert gc.main(["--cpu", "--out", str(out)]) == 1
    r = json.loads(out.read_text())
    assert r["ok"] is False and "planted failure" in r["checks"]["vlm_bf16"]["error"]
    assert all(r["checks"][s]["ok"] for s in ("batch_auto", "oom_halving", "faiss_gpu"))

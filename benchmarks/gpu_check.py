"""The prepared GPU check (issue 15): what only a GPU machine can show, in a few minutes, without network access.

Run through `benchmarks/gpu_check.sh` (one command; it sets the offline environment and the time limit):

1. `vlm_bf16`: the hf-vlm teacher on a tiny Qwen2-VL checkpoint built here from a config (tests/tiny_vlms.py),
   loaded in bfloat16 on the GPU; text, image and image+text items embed to finite unit vectors that agree with the
   same checkpoint in float32 (cosine per item).
2. `batch_auto`: `teacher.batch_size: auto` resolved for the device's memory by the teacher class (the rule
   `pipeline.embed.resolve_batch_size` applies to a GPU actor), then items/s at that batch size.
3. `oom_halving`: a real CUDA out-of-memory, forced by capping this process's share of the GPU
   (`torch.cuda.set_per_process_memory_fraction`) just above what a few items take; a batch of long texts must come
   back whole through the teacher's halving (`VLMRunner.split_oom`), equal to the uncapped vectors; the allocator's
   `num_ooms` and the batch sizes the model saw are recorded.
4. `faiss_gpu`: when the FAISS build has GPU support, `pipeline.index.build_index` with `index.gpu: true` against
   `false` on clustered vectors (benchmarks/scale.py's mixture): same neighbours (recall of the GPU ids against the
   CPU ids), search q/s of each. Skipped with the reason otherwise (faiss-cpu, or FAISS not installed).

`--cpu` runs the same steps on the CPU so CI exercises the script: bfloat16 on the CPU, the memory-derived batch
size, the OOM raised by a forward hook above a batch size (no CUDA allocator to cap: marked `forced_by: hook`), and
CPU FAISS only. Without `--cpu` and without a GPU it stops at once with a message (exit 2). Results:
`benchmarks/results/gpu.json` (`--out`). Exit 1 when a check fails.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

OUT = REPO / "benchmarks" / "results" / "gpu.json"


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), bf16=torch.cuda.is_bf16_supported())
    try:
        import transformers
        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    try:
        import faiss
        env.update(faiss=faiss.__version__, faiss_gpus=faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0)
    except ImportError:
        env["faiss"] = None
    return env


def _teacher(folder: Path, device: str, dtype: str, **kw):
    from pipeline.config import TeacherConfig
    from pipeline.teachers.base import load_teacher

    return load_teacher(TeacherConfig(kind="hf-vlm", model=str(folder), device=device, dtype=dtype, **kw))


def _items(n: int, seed: int = 0, words: int = 12) -> tuple[list[str], list]:
    from tiny_vlms import picture

    rng = np.random.default_rng(seed)
    vocab = ["red", "square", "river", "a", "the", "of", "flag", "bird", "over", "small", "blue", "house", "cat"]
    texts, images = [], []
    for i in range(n):
        body = " ".join(rng.choice(vocab, size=words))
        kind = i % 3  # image + text, text, image
        texts.append(f"<|image_1|> {body}" if kind == 0 else body if kind == 1 else "")
        images.append(None if kind == 1 else picture((40 + i % 50, 30 + i % 40)))
    return texts, images


def check_vlm_bf16(ckpt: Path, device: str) -> dict:
    import torch

    texts, images = _items(24)
    bf = _teacher(ckpt, device, "bfloat16")
    ref = _teacher(ckpt, device, "float32")
    v, r = bf.embed(texts, images, "query"), ref.embed(texts, images, "query")
    dtype = next(bf.runner.model.parameters()).dtype
    cos = (v * r).sum(1)
    norms = np.linalg.norm(v, axis=1)
    ok = (dtype == torch.bfloat16 and np.isfinite(v).all() and np.allclose(norms, 1.0, atol=1e-3)
          and float(cos.min()) > 0.98)
    return {"ok": bool(ok), "items": len(texts), "dim": bf.dim, "model_dtype": str(dtype),
            "min_cosine_bf16_vs_fp32": round(float(cos.min()), 5), "mean_cosine": round(float(cos.mean()), 5),
            "max_norm_error": float(np.abs(norms - 1).max())}


def check_batch_auto(ckpt: Path, device: str) -> dict:
    import psutil
    import torch

    from pipeline.config import TeacherConfig
    from pipeline.teachers.base import teacher_class

    cfg = TeacherConfig(kind="hf-vlm", model=str(ckpt), batch_size="auto", device=device, dtype="bfloat16")
    on_gpu = device.startswith("cuda")
    memory = torch.cuda.get_device_properties(0).total_memory if on_gpu else psutil.virtual_memory().available
    bs = teacher_class(cfg).auto_batch_size(cfg, memory, on_gpu)
    t = _teacher(ckpt, device, "bfloat16", batch_size="auto")
    texts, images = _items((4 if on_gpu else 1) * bs, seed=1)  # the CPU run only exercises the steps
    t.embed(texts[:8], images[:8], "query")  # warm-up (kernels, processor)
    if on_gpu:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(texts), bs):
        v = t.embed(texts[i:i + bs], images[i:i + bs], "query")
    if on_gpu:
        torch.cuda.synchronize()
    dt = time.perf_counter() - start
    return {"ok": bool(bs >= 1 and np.isfinite(v).all()), "memory_gb": round(memory / 2**30, 1), "batch_size": bs,
            "items": len(texts), "items_per_s": round(len(texts) / dt, 1),
            "peak_gpu_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if on_gpu else None}


def check_oom_halving(ckpt: Path, device: str, n: int = 64, words: int = 150) -> dict:
    """A batch of `n` long texts under a memory cap that holds a quarter of it: split_oom must halve and finish.
    Eager attention, so a batch's memory grows with rows x tokens^2 and the cap is easy to place."""
    import torch

    on_gpu = device.startswith("cuda")
    t = _teacher(ckpt, device, "bfloat16", attn_implementation="eager")
    texts = [x.replace("<|image_1|>", "") or "blank" for x in _items(n, seed=2, words=words)[0]]
    nones = [None] * n
    seen: list[int] = []
    cap_rows = n // 4

    def hook(module, args, kwargs):
        rows = int(kwargs["input_ids"].shape[0])
        seen.append(rows)
        if not on_gpu and rows > cap_rows:
            raise torch.cuda.OutOfMemoryError(f"forced by gpu_check: {rows} rows > {cap_rows}")

    info = {}
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        whole = t.embed(texts, nones, "query")  # uncapped: one forward
        peak_n = torch.cuda.max_memory_reserved() - base
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t.embed(texts[:1], nones[:1], "query")
        peak_1 = torch.cuda.max_memory_reserved() - base
        torch.cuda.empty_cache()
        limit = base + max(peak_n // 4, 3 * peak_1)
        info.update(forced_by="memory cap", batch_mb=round(peak_n / 2**20, 1), one_item_mb=round(peak_1 / 2**20, 1),
                    cap_over_base_mb=round((limit - base) / 2**20, 1))
        torch.cuda.set_per_process_memory_fraction(limit / torch.cuda.get_device_properties(0).total_memory)
        ooms_before = torch.cuda.memory_stats().get("num_ooms", 0)
    else:
        whole = None
        info.update(forced_by="hook (no CUDA allocator on CPU)")
    handle = t.base.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        v = t.embed(texts, nones, "query")
    finally:
        handle.remove()
        if on_gpu:
            torch.cuda.set_per_process_memory_fraction(1.0)
            torch.cuda.empty_cache()
    if on_gpu:
        info["num_ooms"] = int(torch.cuda.memory_stats().get("num_ooms", 0) - ooms_before)
    alone = np.concatenate([t.embed(texts[i:i + 1], [None], "query") for i in range(0, n, 8)])
    cos = float((v[::8] * alone).sum(1).min())
    if whole is not None:
        info["min_cosine_vs_uncapped_batch"] = round(float((v * whole).sum(1).min()), 5)
    halved = len(seen) > 1 and seen[0] == n and max(seen[1:]) < n
    return {"ok": bool(halved and v.shape == (n, t.dim) and np.isfinite(v).all() and cos > 0.99), **info,
            "batch": n, "words_per_text": words, "forward_batch_sizes": seen, "forward_calls": len(seen),
            "min_cosine_vs_one_by_one": round(cos, 5)}


def check_faiss(device: str, n: int, queries: int, k: int = 50) -> dict:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return {"ok": None, "skipped": "FAISS is not installed here (carry a faiss-gpu wheel to test it)"}
    from benchmarks.scale import Mixture
    from pipeline.config import IndexConfig
    from pipeline.index import build_index, num_gpus, recall_at_k, search

    mix = Mixture(128, centres=1024)
    pool, q = mix.draw(n, seed=1), mix.draw(queries, seed=2)
    out = {"n": n, "dim": 128, "queries": queries, "k": k}
    runs = {"cpu": IndexConfig(gpu="false")}
    has_gpu = device.startswith("cuda") and num_gpus() > 0 and hasattr(faiss, "index_cpu_to_gpu")
    if has_gpu:
        runs["gpu"] = IndexConfig(gpu="true")
    else:
        out["gpu_skipped"] = ("GPU FAISS not run (--cpu); CPU FAISS ran" if not device.startswith("cuda") else
                              "this FAISS build has no GPU support (faiss-cpu): GPU FAISS not checked")
    ids = {}
    for name, cfg in runs.items():
        built = build_index(pool, cfg, k_hint=k)
        search(built, q[:256], k)  # warm-up
        start = time.perf_counter()
        _, ids[name] = search(built, q, k)
        dt = time.perf_counter() - start
        out[name] = {"factory": built.info["factory"], "gpu": built.info.get("gpu"),
                     "build_s": round(float(built.info.get("build_s") or 0), 2), "qps": round(queries / dt, 1)}
    if "gpu" in ids:
        out["recall_gpu_vs_cpu"] = round(recall_at_k(ids["gpu"], ids["cpu"], k), 4)
        out["ok"] = bool(out["recall_gpu_vs_cpu"] >= 0.99 and out["gpu"]["gpu"])
    else:
        out["ok"] = None
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="run every step on the CPU (CI): no GPU figures")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--faiss-n", type=int, default=1_000_000)
    ap.add_argument("--faiss-queries", type=int, default=20_000)
    a = ap.parse_args(argv)
    import torch

    if not a.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch %s, CUDA %s). Run it on a GPU machine, or with --cpu "
              "to exercise the script on the CPU." % (torch.__version__, torch.version.cuda), file=sys.stderr)
        return 2
    device = "cpu" if a.cpu else "cuda"
    if a.cpu:
        a.faiss_n, a.faiss_queries = min(a.faiss_n, 20_000), min(a.faiss_queries, 1_000)
    result = {"mode": device, "environment": environment(), "checks": {}}
    started = time.perf_counter()
    from tiny_vlms import save_tiny_qwen2_vl

    with tempfile.TemporaryDirectory(prefix="hardneg-gpu-check-") as tmp:
        ckpt = save_tiny_qwen2_vl(Path(tmp) / "qwen2_vl")
        steps = [("vlm_bf16", lambda: check_vlm_bf16(ckpt, device)),
                 ("batch_auto", lambda: check_batch_auto(ckpt, device)),
                 ("oom_halving", lambda: check_oom_halving(ckpt, device, *((64, 150) if not a.cpu else (32, 60)))),
                 ("faiss_gpu", lambda: check_faiss(device, a.faiss_n, a.faiss_queries))]
        for name, fn in steps:
            t = time.perf_counter()
            try:
                r = fn()
            except Exception as e:  # a failed step is a result; the next steps still run
                r = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            r["seconds"] = round(time.perf_counter() - t, 2)
            result["checks"][name] = r
            state = {True: "ok", False: "FAILED", None: "skipped"}[r.get("ok")]
            note = r.get("skipped") or r.get("gpu_skipped") or r.get("error") or ""
            print(f"{name:<12} {state:<8} {r['seconds']:7.1f}s  {note}", flush=True)
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["ok"] = all(r.get("ok") is not False for r in result["checks"].values())
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"{'all checks passed' if result['ok'] else 'SOME CHECKS FAILED'} in {result['seconds']} s -> {out}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

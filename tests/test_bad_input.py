"""Bad input, end to end: every kind of broken row mixed into good data; the run completes, the good rows are mined
exactly as without the bad ones, each bad row is in `_rejects.jsonl` with its reason, and a decompression bomb is
refused on its header with memory staying flat (our bound does it, not PIL's)."""
from __future__ import annotations

import json
import shutil
import struct
import threading
import time
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
from PIL import Image

from corpus import base_config, copy_images, demo_items, text_pairs, write_jsonl
from pipeline.cli import main as cli_main
from pipeline.config import InputConfig, config_from_dict
from pipeline.mine import mine
from pipeline.read import ImageProbe, InputError, load_corpus

BOMB_SIDE = 30_000  # 900 M pixels declared: PIL would allocate ~900 MB for this 1-bit image, ~3.6 GB as RGB


def png_bomb(path: Path, side: int = BOMB_SIDE) -> Path:
    """A complete, valid 1-bit PNG of side x side black pixels: ~110 KB on disk, ~side**2 bytes once decoded."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    step = 1000
    idat = b"".join(comp.compress(row * min(step, side - i)) for i in range(0, side, step)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


@contextmanager
def peak_rss(interval: float = 0.002):
    """Samples this process's RSS in a thread; yields a dict that gets `growth` (peak minus start, bytes)."""
    proc, result, stop = psutil.Process(), {}, threading.Event()
    start = proc.memory_info().rss
    peak = [start]

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(interval)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], proc.memory_info().rss)
        result["growth"] = peak[0] - start


@pytest.fixture
def no_pil_guard(monkeypatch):
    """PIL's own bomb guard off (as many training scripts set it): only our bound stands between us and the bomb."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)


def test_the_rss_sampler_sees_a_real_allocation():
    with peak_rss() as m:
        block = np.ones(200 * 2**20, np.uint8)
        time.sleep(0.02)
        del block
    assert m["growth"] > 150 * 2**20


@pytest.mark.parametrize("pil_guard", [False, True], ids=["pil-guard-off", "pil-guard-on"])
def test_decompression_bomb_is_refused_on_its_header_with_flat_memory(tmp_path, monkeypatch, pil_guard):
    bomb = png_bomb(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 300_000
    if not pil_guard:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    if not pil_guard:
        with Image.open(bomb) as im:  # the header really declares 30000x30000 (opening reads only the header)
            assert im.size == (BOMB_SIDE, BOMB_SIDE)
    probe = ImageProbe(str(tmp_path), max_pixels=64_000_000)
    with peak_rss() as m:
        digest, reason, detail = probe.check("bomb.png")
    assert (digest, reason) == (None, "image_too_large")
    # our bound fired, with the size it read from the header; or PIL's guard (above twice its limit) first, said
    # in our words: the file, the limit, what to do
    size = f"{BOMB_SIDE}x{BOMB_SIDE}" if not pil_guard else f"more than {2 * Image.MAX_IMAGE_PIXELS}"
    assert detail == (f"{tmp_path / 'bomb.png'}: {size} pixels is above input.max_image_pixels=64000000; shrink "
                      "the image or drop it from the input, or raise input.max_image_pixels if images this large "
                      "are wanted")
    assert m["growth"] < 48 * 2**20, f"reading the bomb grew RSS by {m['growth'] / 2**20:.0f} MiB"


def test_a_bomb_under_our_bound_but_over_pils_says_which_limit_refused_it(tmp_path):
    """input.max_image_pixels above Pillow's own guard does not lift it: the detail names Pillow's limit."""
    probe = ImageProbe(str(tmp_path), max_pixels=BOMB_SIDE ** 2 + 1)
    digest, reason, detail = probe.check(png_bomb(tmp_path / "bomb.png").name)
    assert (digest, reason) == (None, "image_too_large")
    assert detail == (f"{tmp_path / 'bomb.png'}: more than {2 * Image.MAX_IMAGE_PIXELS} pixels is above Pillow's "
                      "decompression-bomb limit (twice PIL.Image.MAX_IMAGE_PIXELS), which "
                      f"input.max_image_pixels={BOMB_SIDE ** 2 + 1} does not lift; shrink the image or drop it "
                      "from the input")


def test_oversized_files_and_special_files_are_refused_before_reading(tmp_path):
    import os

    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "huge.png").write_bytes(b"\x89PNG" + b"\0" * 5000)
    os.mkfifo(tmp_path / "fifo.png")  # open() on it would block until a writer comes: never, here
    (tmp_path / "dir.png").mkdir()
    probe = ImageProbe(str(tmp_path), max_pixels=10_000, max_bytes=4096)
    assert probe.check("ok.png")[1] is None
    assert probe.check("huge.png")[1:] == ("image_too_large", f"{tmp_path / 'huge.png'}: 5004 bytes is above "
                                           "input.max_image_bytes=4096")
    for special in ("fifo.png", "dir.png"):
        digest, reason, detail = probe.check(special)
        assert reason == "missing_image" and "not a regular file" in detail, detail
    assert probe.check("a\x00b.png")[1] == "bad_path"
    assert probe.check("images/../../x.png")[1] == "path_escapes_root"


# ------------------------------------------------------------------------------------------------ end to end

N_TEXT, N_IMAGE = 40, 12

# id -> (field, reason) of every bad row in the mixed corpus
EXPECTED = {
    "missing": ("pos_image_path", "missing_image"),
    "notimage": ("pos_image_path", "corrupt_image"),
    "truncated": ("pos_image_path", "corrupt_image"),
    "bomb": ("pos_image_path", "image_too_large"),
    "dotdot": ("pos_image_path", "path_escapes_root"),
    "absolute": ("qry_image_path", "path_escapes_root"),
    "symlink": ("pos_image_path", "path_escapes_root"),
    "http": ("pos_image_path", "bad_uri_scheme"),
    "file-uri": ("pos_image_path", "bad_uri_scheme"),
    "nul": ("pos_image_path", "bad_path"),
    "empty": ("qry", "empty_text"),
    "blank-pos": ("pos_text", "empty_text"),
    "int-text": ("qry", "bad_type"),
    "list-text": ("pos_text", "bad_type"),
    "dict-dataset": ("dataset", "bad_type"),
    "t2t-3": ("id", "duplicate_id"),  # the id of a good row, with other content
}


def good_rows(root: Path) -> list[dict]:
    rows = []
    for p in text_pairs(N_TEXT):
        rows.append({**p, "id": f"t2t-{p['id'][1:]}"})
    for i, it in enumerate(demo_items(N_IMAGE)):
        rows.append({"id": f"t2i-{i}", "dataset": "t2i", "qry": f"find the picture: {it['caption']}",
                     "pos_image_path": it["image_path"], "group": it["category"].split("/")[0]})
    return rows


def bad_rows() -> list[dict]:
    img = {"dataset": "t2i", "qry": "a picture", "group": "x"}
    txt = {"dataset": "t2t", "group": "x"}
    return [
        {**img, "id": "missing", "pos_image_path": "images/nope.png"},
        {**img, "id": "notimage", "pos_image_path": "images/notimage.png"},
        {**img, "id": "truncated", "pos_image_path": "images/truncated.png"},
        {**img, "id": "bomb", "pos_image_path": "images/bomb.png"},
        {**img, "id": "dotdot", "pos_image_path": "../outside.png"},
        {**img, "id": "absolute", "qry_image_path": "/etc/hostname", "pos_text": "a caption"},
        {**img, "id": "symlink", "pos_image_path": "images/escape.png"},
        {**img, "id": "http", "pos_image_path": "http://example.com/x.png"},
        {**img, "id": "file-uri", "pos_image_path": "file:///etc/passwd"},
        {**img, "id": "nul", "pos_image_path": "images/a\x00.png"},
        {**txt, "id": "empty", "qry": " \t ", "pos_text": "something"},
        {**txt, "id": "blank-pos", "qry": "a query", "pos_text": "\n"},
        {**txt, "id": "int-text", "qry": 42, "pos_text": "x"},
        {**txt, "id": "list-text", "qry": "a query", "pos_text": [7, "b"]},  # a list's first entry is the positive
        {**txt, "id": "dict-dataset", "dataset": {"name": "t2t"}, "qry": "a query", "pos_text": "b"},
        {**txt, "id": "t2t-3", "qry": "another query entirely", "pos_text": "another positive"},
    ]


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("badinput") / "root"
    items = demo_items(N_IMAGE)
    copy_images(root, items)
    good = (root / items[0]["image_path"]).read_bytes()
    (root / "images" / "truncated.png").write_bytes(good[: len(good) // 2])
    (root / "images" / "notimage.png").write_bytes(b"plain text, not an image")
    png_bomb(root / "images" / "bomb.png")
    (root.parent / "outside.png").write_bytes(good)
    (root / "images" / "escape.png").symlink_to(root.parent / "outside.png")
    return root


def mixed_lines(root: Path) -> str:
    """Good and bad rows interleaved, plus a line that is not JSON and one that is a JSON list."""
    good, bad = good_rows(root), bad_rows()
    lines, b = [], iter(bad)
    for i, row in enumerate(good):
        lines.append(json.dumps(row))
        if i % 3 == 1:
            nxt = next(b, None)
            if nxt is not None:
                lines.append(json.dumps(nxt))
    lines += [json.dumps(r) for r in b]
    lines.insert(7, "{not json")
    lines.insert(20, "[1, 2, 3]")
    return "\n".join(lines) + "\n"


def config_for(root: Path, pairs: Path, cache: str, **sections) -> dict:
    """Images embedded natively (decoded by the workers) by the package's model-free HashingTeacher, so the test
    spends its time on the input, not on loading a model."""
    raw = base_config(pairs, cache, **sections)
    raw["input"]["image_root"] = str(root)
    raw["teacher"] = {"kind": "custom", "cls": "pipeline.teachers.examples:HashingTeacher", "image_mode": "native",
                      "batch_size": 16}
    raw["embed"].update(num_actors=1, cpus_per_actor=0.5)
    return raw


@pytest.fixture(scope="module")
def runs(tree, ray_session, shared_cache, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("badinput-runs")
    (tmp / "mixed.jsonl").write_text(mixed_lines(tree))
    write_jsonl(tmp / "good.jsonl", good_rows(tree))
    mixed = mine(config_from_dict(config_for(tree, tmp / "mixed.jsonl", shared_cache)), tmp / "out-mixed")
    clean = mine(config_from_dict(config_for(tree, tmp / "good.jsonl", shared_cache)), tmp / "out-good")
    return mixed, clean, tmp


def test_good_rows_are_mined_exactly_as_without_the_bad_ones(runs):
    mixed, clean, _ = runs
    manifests = [json.loads((r.epoch_dir / "_manifest.json").read_text()) for r in (mixed, clean)]
    assert [(f["path"], f["rows"], f["sha256"]) for f in manifests[0]["files"]] == \
        [(f["path"], f["rows"], f["sha256"]) for f in manifests[1]["files"]]
    assert [f["sha256"] for f in manifests[0]["candidate_files"]] == [f["sha256"] for f in manifests[1]["candidate_files"]]
    assert manifests[0]["counts"]["queries_written"] == N_TEXT + N_IMAGE


def test_every_bad_row_is_in_the_rejects_with_its_reason_and_counted(runs):
    mixed, _, tmp = runs
    rejects = [json.loads(x) for x in (mixed.epoch_dir / "_rejects.jsonl").read_text().splitlines()]
    by_id = {}
    for r in rejects:
        by_id.setdefault(r["query_id"], []).append(r)
    for qid, (field, reason) in EXPECTED.items():
        got = [(r["field"], r["reason"]) for r in by_id.get(qid, [])]
        assert got == [(field, reason)], (qid, got)
        r = by_id[qid][0]
        assert r["source"] == str(tmp / "mixed.jsonl") and isinstance(r["row"], int) and r["detail"]
    bad_json = [r for r in rejects if r["reason"] == "bad_json"]
    assert len(bad_json) == 2 and {"line 8 is not valid JSON", "line 21 is a JSON list"} <= \
        {d for r in bad_json for d in [r["detail"].split(" (")[0].replace(", not an object", "")]}
    assert len(rejects) == len(EXPECTED) + 2
    stats = mixed.stats
    n_bad = len(EXPECTED) + 2
    assert stats["queries_in"] == N_TEXT + N_IMAGE + n_bad
    assert stats["queries_rejected"] == n_bad and stats["queries_written"] == N_TEXT + N_IMAGE
    expected_counts: dict[str, int] = {"bad_json": 2}
    for _, reason in EXPECTED.values():
        expected_counts[reason] = expected_counts.get(reason, 0) + 1
    assert stats["rejects_by_reason"] == dict(sorted(expected_counts.items()))
    bomb = by_id["bomb"][0]["detail"]  # the read runs in a Ray task: PIL's own guard there may fire before ours
    assert "pixels is above input.max_image_pixels=" in bomb and "drop it from the input" in bomb
    assert "decompression bomb DOS" not in bomb  # PIL's words are not passed on
    # each reject's row is its line in the file, after the broken lines too; details name files, not Python objects
    lines = (tmp / "mixed.jsonl").read_text().splitlines()
    for qid in EXPECTED:
        assert json.loads(lines[by_id[qid][0]["row"] - 1])["id"] == qid
    assert not [r["detail"] for r in rejects if " object at 0x" in r["detail"]]


def test_reading_the_mixed_corpus_keeps_memory_flat(tree, runs, no_pil_guard):
    _, _, tmp = runs
    cfg = InputConfig(pairs=[str(tmp / "mixed.jsonl")], image_root=str(tree), group_key="group")
    with peak_rss() as m:
        corpus = load_corpus(cfg, caption_mode=False)
    assert corpus.queries.num_rows == N_TEXT + N_IMAGE
    assert m["growth"] < 64 * 2**20, f"reading grew RSS by {m['growth'] / 2**20:.0f} MiB"


def test_mostly_broken_input_stops_the_run_with_a_clear_message(tree, runs, shared_cache, tmp_path, capsys):
    _, _, tmp = runs
    raw = config_for(tree, tmp / "mixed.jsonl", shared_cache, input={"max_rejects": 5})
    with pytest.raises(InputError, match=r"18 of 70 input rows are unusable \(above input.max_rejects=5\)"):
        mine(config_from_dict(raw), tmp_path / "strict")
    assert not (tmp_path / "strict" / "epoch=0000").exists()
    import yaml

    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(config_for(tree, tmp / "mixed.jsonl", shared_cache,
                                              input={"max_reject_fraction": 0.1})))
    assert cli_main(["mine", "--config", str(path), "--out", str(tmp_path / "cli"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "hardneg: error:" in err and "above input.max_reject_fraction=0.1" in err and "Fix the input" in err
    shutil.rmtree(tmp_path / "cli", ignore_errors=True)

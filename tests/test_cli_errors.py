"""Errors a person can act on: every user error is one line on stderr that names what to fix, exit code 2, no
traceback (`--debug` shows it), and it comes before Ray or a model starts (each case runs in seconds)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from corpus import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def hardneg(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def config(tmp: Path, **sections) -> Path:
    pairs = write_jsonl(tmp / "pairs.jsonl", [{"qry": f"q{i}", "pos_text": f"p{i}"} for i in range(4)])
    raw = {"input": {"pairs": [str(pairs)]}, "embed": {"cache_dir": str(tmp / "cache")}}
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def case_missing_input(tmp):
    return ["mine", "--config", str(config(tmp, input={"pairs": [str(tmp / "nope.jsonl")]})), "--out", str(tmp / "o")], \
        "nope.jsonl does not exist"


def case_input_is_a_folder(tmp):
    (tmp / "data").mkdir()
    return ["mine", "--config", str(config(tmp, input={"pairs": [str(tmp / "data")]})), "--out", str(tmp / "o")], \
        "data is a folder"


def case_empty_jsonl(tmp):
    (tmp / "empty.jsonl").write_text("\n  \n")
    return ["mine", "--config", str(config(tmp, input={"pairs": [str(tmp / "empty.jsonl")]})), "--out",
            str(tmp / "o")], "empty.jsonl is empty"


def case_out_is_a_file(tmp):
    (tmp / "out.txt").write_text("notes")
    return ["mine", "--config", str(config(tmp)), "--out", str(tmp / "out.txt")], "--out " + str(tmp / "out.txt")


def case_config_is_a_folder(tmp):
    return ["mine", "--config", str(tmp), "--out", str(tmp / "o")], f"--config {tmp} is a folder"


def case_config_is_binary(tmp):
    (tmp / "model.yaml").write_bytes(bytes(range(256)) * 4)
    return ["mine", "--config", str(tmp / "model.yaml"), "--out", str(tmp / "o")], "is not a YAML text file"


def case_config_is_not_yaml(tmp):
    (tmp / "broken.yaml").write_text("input:\n  pairs: [a.jsonl\n teacher: {\n")
    return ["mine", "--config", str(tmp / "broken.yaml"), "--out", str(tmp / "o")], "broken.yaml: not valid YAML"


def case_model_folder_missing(tmp):
    cfg = config(tmp, teacher={"kind": "hf-clip", "model": str(tmp / "no-such-model")})
    return ["mine", "--config", str(cfg), "--out", str(tmp / "o")], "teacher.model: " + str(tmp / "no-such-model")


def case_hub_id_not_cached_offline(tmp):
    cfg = config(tmp, teacher={"kind": "hf-clip", "model": "nobody-here/no-such-model-7f3a"})
    return ["mine", "--config", str(cfg), "--out", str(tmp / "o")], "nobody-here/no-such-model-7f3a"


def case_checkpoint_missing(tmp):
    return ["mine", "--config", str(config(tmp)), "--out", str(tmp / "o"), "--teacher-checkpoint",
            str(tmp / "ckpt-9")], "--teacher-checkpoint: " + str(tmp / "ckpt-9")


def case_pkg_module_missing(tmp):
    cfg = config(tmp, teacher={"model": "pkg:no_such_model_package"})
    return ["mine", "--config", str(cfg), "--out", str(tmp / "o")], "no_such_model_package"


def case_custom_teacher_module_missing(tmp):
    cfg = config(tmp, teacher={"kind": "custom", "cls": "no_such_module:MyTeacher"})
    return ["mine", "--config", str(cfg), "--out", str(tmp / "o")], "no_such_module"


def case_judge_model_missing(tmp):
    cfg = config(tmp, judge={"kind": "cross-encoder", "model": str(tmp / "no-judge")})
    return ["mine", "--config", str(cfg), "--out", str(tmp / "o")], "judge.model: " + str(tmp / "no-judge")


def case_port_out_of_range(tmp):
    return ["inspect", str(tmp), "--port", "99999"], "--port 99999"


def case_report_out_unwritable(tmp):
    return ["report", str(tmp), "--out", str(tmp / "no-such-dir" / "r.html")], "no-such-dir"


CASES = [case_missing_input, case_input_is_a_folder, case_empty_jsonl, case_out_is_a_file, case_config_is_a_folder,
         case_config_is_binary, case_config_is_not_yaml, case_model_folder_missing, case_hub_id_not_cached_offline,
         case_checkpoint_missing, case_pkg_module_missing, case_custom_teacher_module_missing,
         case_judge_model_missing, case_port_out_of_range, case_report_out_unwritable]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_a_user_error_is_one_line_exit_2_no_traceback(tmp_path, case):
    args, names = case(tmp_path)
    started = time.monotonic()
    r = hardneg(*args)
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert len(lines) == 1 and lines[0].startswith("hardneg: error: ") and names in lines[0], r.stderr
    assert not (tmp_path / "o").exists()  # refused before any work
    assert time.monotonic() - started < 60  # no Ray start, no model load


def test_debug_shows_the_traceback(tmp_path):
    args, _ = case_missing_input(tmp_path)
    r = hardneg("--debug", *args)
    assert r.returncode == 2 and "Traceback" in r.stderr and "nope.jsonl does not exist" in r.stderr

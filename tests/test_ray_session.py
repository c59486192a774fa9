"""The Ray edge of `hardneg mine`: a healthy run prints no error, warning or INFO line; an address where no cluster
answers fails in seconds with one line; a local Ray whose driver was killed is cleaned up at the next start.

Each test runs `hardneg mine` in a subprocess (its own Ray, as a user's command has), on a small text corpus with a
model-free teacher."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import psutil
import yaml

from corpus import text_pairs, write_jsonl
from pipeline.ray_session import RECORD, sweep_stale_sessions
from pipeline.teachers.examples import HashingTeacher

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
# Ray's log formats: C++ "[2026-... E 123 456] file.cc:1: ...", Python "2026-... WARNING file.py:1 -- ...";
# and any traceback
NOISE = re.compile(r"\[[\d\- :,]+ [EWF] \d+ \d+\]|\b(ERROR|WARNING|WARN|INFO|CRITICAL)\b|Traceback|Error:|Warning:")


class SlowTeacher(HashingTeacher):
    """HashingTeacher with a pause per batch, so a run is still embedding when the test kills its driver."""

    def embed(self, texts, images, role, dataset=None):
        time.sleep(0.5)
        return super().embed(texts, images, role, dataset=dataset)


def mine_cmd(tmp: Path, n: int = 40, cls: str = "pipeline.teachers.examples:HashingTeacher") -> list[str]:
    pairs = write_jsonl(tmp / "pairs.jsonl", text_pairs(n))
    raw = {"input": {"pairs": [str(pairs)], "group_key": "group"},
           "teacher": {"kind": "custom", "cls": cls, "batch_size": 8},
           "embed": {"cache_dir": str(tmp / "cache"), "num_actors": 1, "cpus_per_actor": 0.5},
           "retrieve": {"top_k": 10}, "sample": {"n_negatives": 2}, "run": {"executor": "ray"}}
    (tmp / "config.yaml").write_text(yaml.safe_dump(raw))
    return [sys.executable, "-m", "pipeline.cli", "mine", "--config", str(tmp / "config.yaml"), "--out", str(tmp / "out")]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out.update(HF_HUB_OFFLINE="1", RAY_AUTH_MODE="disabled", PYTHONPATH=os.pathsep.join([str(TESTS), str(ROOT)]))
    out.update(extra)
    return out


def session_dirs_of(pid: int, since: float) -> list[Path]:
    """A local Ray's session folder is named after the driver that started it: session_<date>_<time>_<pid>. Pids
    are reused on a long-lived machine, so only the folders named at or after `since` (a time.time()) count."""
    root = Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"
    return [p for p in root.glob(f"session_*_{pid}") if p.is_dir() and
            datetime.strptime("_".join(p.name.split("_")[1:4]), "%Y-%m-%d_%H-%M-%S_%f").timestamp() >= since - 1]


def holders(session_dir: Path) -> list[psutil.Process]:
    """Live processes of this user with a file open inside the session folder."""
    prefix = f"{session_dir.resolve()}{os.sep}"
    found = []
    for proc in psutil.process_iter(["uids", "status"]):
        if proc.info["uids"] is None or proc.info["uids"].real != os.getuid() or \
                proc.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if any(f.path.startswith(prefix) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_healthy_run_prints_no_error_warning_or_info_line_and_leaves_no_process(tmp_path):
    since = time.time()
    proc = subprocess.Popen(mine_cmd(tmp_path), cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "wrote " in out and (tmp_path / "out" / "epoch=0000" / "_manifest.json").exists()
    noisy = [line for line in re.split(r"[\r\n]", err) if NOISE.search(line)]
    assert noisy == [], "\n".join(noisy)
    (session,) = session_dirs_of(proc.pid, since)
    assert not (session / RECORD).exists()  # cleaned up at exit
    assert holders(session) == []


def test_an_address_where_no_cluster_answers_fails_in_seconds_with_one_line(tmp_path):
    started = time.monotonic()
    r = subprocess.run(mine_cmd(tmp_path), cwd=ROOT, env=env(RAY_ADDRESS="127.0.0.1:1"), capture_output=True,
                       text=True, timeout=120)
    took = time.monotonic() - started
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(lines) == 1 and "RAY_ADDRESS=127.0.0.1:1: no Ray cluster answers there" in lines[0], r.stderr
    assert took < 30, f"took {took:.0f}s"


def test_the_processes_of_a_killed_driver_are_ended_at_the_next_start(tmp_path):
    since = time.time()
    proc = subprocess.Popen(mine_cmd(tmp_path, n=200, cls="test_ray_session:SlowTeacher"), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not any((d / RECORD).exists() for d in session_dirs_of(proc.pid, since)):  # Ray is up
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before Ray was up"
            time.sleep(0.5)
        (session,) = session_dirs_of(proc.pid, since)
        while not list((session / "logs").glob("worker-*")):  # and its workers have started
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its workers started"
            time.sleep(0.5)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    ended = sweep_stale_sessions()  # what the next `hardneg mine` does first
    assert not (session / RECORD).exists()
    left = holders(session)
    settle = time.monotonic() + 15  # a process the sweep ended may still be exiting on a loaded machine
    while left and time.monotonic() < settle:
        time.sleep(0.5)
        left = holders(session)
    assert left == [], [(p.pid, p.name()) for p in left]
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE for pid in ended)


def test_the_sweep_leaves_live_drivers_and_other_users_alone(tmp_path):
    me = psutil.Process()
    live = tmp_path / "ray" / "session_live"
    other = tmp_path / "ray" / "session_other_user"
    for folder, record in ((live, {"pid": me.pid, "create_time": me.create_time(), "uid": os.getuid()}),
                           (other, {"pid": 1, "create_time": 0.0, "uid": os.getuid() + 1})):
        (folder / "logs").mkdir(parents=True)
        (folder / RECORD).write_text(json.dumps(record))
    with open(live / "logs" / "held.log", "w"):  # this process holds a file of the "live" session
        assert sweep_stale_sessions(tmp_path / "ray") == []
    assert (live / RECORD).exists() and (other / RECORD).exists()

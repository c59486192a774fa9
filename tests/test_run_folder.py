"""The run folder (pipeline/run.py): hardneg deletes only what it wrote, refuses folders it did not make, lets one
writer at a time in, never binds a folder to a run that failed before retrieval, and swaps epochs in atomically."""
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from corpus import base_config, text_pairs, write_jsonl
from pipeline.cli import main as cli_main
from pipeline.config import config_from_dict
from pipeline.mine import RunMismatch, mine
from pipeline.read import InputError
from pipeline.refresh import Refresher
from pipeline.write import sha256_file

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}


def verify_epoch(folder: Path) -> int:
    """The epoch's manifest holds: every listed file is there with its sha256, and pandas reads every row."""
    manifest = json.loads((folder / "_manifest.json").read_text())
    for entry in manifest["files"]:
        assert sha256_file(folder / entry["path"]) == entry["sha256"], entry["path"]
    for entry in manifest["candidate_files"]:
        assert sha256_file(folder / "_candidates" / entry["path"]) == entry["sha256"], entry["path"]
    rows = sum(f["rows"] for f in manifest["files"])
    assert len(pd.read_parquet(folder)) == rows
    return rows


def snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("run-folder") / "pairs.jsonl", text_pairs(60))


def config(pairs, cache, **sections):
    return config_from_dict(base_config(pairs, cache, **sections))


# ---- item 1: never delete what hardneg did not write ----------------------------------------------------------

def user_project(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True)
    (folder / "config.yaml").write_text("teacher: {model: mine}\n")
    (folder / "data" / "pairs.jsonl").write_text('{"qry": "a", "pos_text": "b"}\n')
    (folder / "notes.md").write_text("experiment notes\n")
    (folder / "blocklist.jsonl").write_text('{"query_id": "q1", "item_id": "x", "who": "me"}\n')
    return folder


def test_a_folder_hardneg_did_not_make_is_refused_before_any_work(ray_session, pairs, tmp_path, monkeypatch,
                                                                  capsys):
    project = user_project(tmp_path / "project")
    before = snapshot(project)
    cache = tmp_path / "cache"
    for overwrite in (False, True):
        with pytest.raises(RunMismatch, match="not a hardneg run folder"):
            mine(config(pairs, str(cache)), project, overwrite=overwrite)
    assert snapshot(project) == before and not cache.exists()  # nothing written, nothing embedded
    # `--out .` from inside the project: one line, exit 2, nothing touched
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(base_config(pairs, str(cache))))
    monkeypatch.chdir(project)
    assert cli_main(["mine", "--config", str(tmp_path / "cfg.yaml"), "--out", ".", "--overwrite",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not a hardneg run folder" in err and "new or empty --out" in err and "--overwrite" not in err
    assert snapshot(project) == before and not cache.exists()


def test_overwrite_deletes_only_what_hardneg_wrote(ray_session, shared_cache, pairs, tmp_path):
    out = tmp_path / "out"
    mine(config(pairs, shared_cache), out, epoch=0)
    mine(config(pairs, shared_cache), out, epoch=1)
    user_files = {"notes.md": b"mine\n", "blocklist.jsonl": b"", "sub/table.csv": b"a,b\n1,2\n"}
    for name, data in user_files.items():
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(data)
    (out / "_checkpoints" / "epoch=0001").mkdir(parents=True)
    changed = config(pairs, shared_cache, retrieve={"top_k": 12})
    with pytest.raises(RunMismatch) as refused:
        mine(changed, out, epoch=0)
    assert (out / "epoch=0001").is_dir()  # refused: nothing deleted
    result = mine(changed, out, epoch=0, overwrite=True)
    for name, data in user_files.items():
        assert (out / name).read_bytes() == data
    assert not (out / "epoch=0001").exists() and not (out / "_checkpoints").exists()
    assert json.loads((result.epoch_dir / "_manifest.json").read_text())["config"]["retrieve"]["top_k"] == 12
    assert json.loads((out / "_run" / "run.json").read_text())["identity"]["config"]["retrieve"]["top_k"] == 12
    assert sorted(p.name for p in out.iterdir()) == ["_run", "blocklist.jsonl", "epoch=0000", "notes.md", "sub"]
    verify_epoch(result.epoch_dir)
    # the refusal said what changed, and what --overwrite deletes and keeps
    message = str(refused.value)
    assert "changed: retrieve.top_k" in message and "new --out" in message and "blocklist.jsonl and other files stay" in message


# ---- item 5: a run that fails before retrieval is saved does not bind the folder ------------------------------

def test_a_run_that_failed_on_bad_input_does_not_bind_the_folder(ray_session, shared_cache, tmp_path, capsys):
    rows = text_pairs(30)
    broken = [dict(r, qry="") for r in rows[:10]] + rows[10:]
    path = write_jsonl(tmp_path / "pairs.jsonl", broken)
    raw = base_config(path, shared_cache, input={"max_rejects": 2})
    out = tmp_path / "out"
    with pytest.raises(InputError):
        mine(config_from_dict(raw), out)
    assert not (out / "_run" / "run.json").exists()
    write_jsonl(path, rows)  # the user fixes the file and runs the same command again: no --overwrite needed
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert cli_main(["mine", "--config", str(cfg_path), "--out", str(out), "--no-progress"]) == 0, \
        capsys.readouterr().err
    assert verify_epoch(out / "epoch=0000") == 30


# ---- item 2: one writer at a time ------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from pipeline.run import claim
    with claim(sys.argv[1]):
        print("held", flush=True)
        time.sleep(600)
""")


def hold_lock(out: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_refuses_at_once_and_a_killed_writer_leaves_no_lock(tmp_path):
    from pipeline.run import FolderLocked, claim

    out = tmp_path / "out"
    holder = hold_lock(out)
    try:
        started = time.monotonic()
        with pytest.raises(FolderLocked) as refused:
            with claim(out):
                pass
        assert time.monotonic() - started < 1
        assert str(out) in str(refused.value) and f"pid {holder.pid} on {socket.gethostname()}" in str(refused.value)
        with pytest.raises(FolderLocked, match="after waiting 0.5s"):
            with claim(out, wait=0.5):
                pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    started = time.monotonic()
    with claim(out) as run:  # the lock died with its process: no stale lock, no waiting
        assert run.out == out
    assert time.monotonic() - started < 1


def test_a_waiting_writer_goes_on_when_the_holder_finishes(tmp_path):
    from pipeline.run import claim

    out = tmp_path / "out"
    holder = hold_lock(out)
    threading.Timer(1.0, holder.terminate).start()
    started = time.monotonic()
    with claim(out, wait=60):
        pass
    assert 0.5 < time.monotonic() - started < 30
    holder.wait()


def start_mine(cfg_path: Path, out: Path, address: str, *extra) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "mine", "--config", str(cfg_path), "--out",
                             str(out), "--no-progress", *extra], env={**ENV, "RAY_ADDRESS": address},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def lock_holder_pid(out: Path):
    try:
        return json.loads((out / "_run" / "lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


def wait_for(condition, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def test_two_mine_processes_on_one_folder(ray_session, pairs, tmp_path):
    """The first holds OUT for its whole run; a second refuses at once naming it; a third with --wait-lock waits,
    then finds the epoch complete. The committed epoch is whole."""
    address = ray_session.get_runtime_context().gcs_address
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(base_config(pairs, str(tmp_path / "cache"), output={"rows_per_shard": 4},
                                                   embed={"num_actors": 1, "cpus_per_actor": 0.5})))
    out = tmp_path / "out"
    first = start_mine(cfg_path, out, address, "--epoch", "2")
    wait_for(lambda: lock_holder_pid(out) == first.pid)
    first.send_signal(signal.SIGSTOP)  # the first run holds the lock for as long as the test needs
    try:
        second = start_mine(cfg_path, out, address, "--epoch", "2")
        text = second.communicate(timeout=120)[0]
        assert second.returncode == 2, text
        assert f"{out} is being written by pid {first.pid} on {socket.gethostname()}" in text
        assert "Traceback" not in text
        third = start_mine(cfg_path, out, address, "--epoch", "2", "--wait-lock")
        time.sleep(8)
        assert third.poll() is None  # waiting, not failing and not writing
    finally:
        first.send_signal(signal.SIGCONT)
    text = first.communicate(timeout=600)[0]
    assert first.returncode == 0, text
    text = third.communicate(timeout=300)[0]
    assert third.returncode == 0 and "already complete" in text and "waiting for it to finish" in text, text
    assert verify_epoch(out / "epoch=0002") == 60
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_refresh_from_every_rank_is_safe(ray_session, shared_cache, pairs, tmp_path):
    """DDP ranks that all call refresh take turns: one mines, the others find the epoch complete."""
    cfg = config(pairs, shared_cache)
    out = tmp_path / "out"
    results, errors = {}, []

    def rank(r):
        try:
            refresher = Refresher(cfg, out)
            results[r] = (refresher.refresh(0), refresher.last.skipped)
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    assert {path for path, _ in results.values()} == {out / "epoch=0000"}
    assert sorted(skipped for _, skipped in results.values()) == [False, True, True]
    verify_epoch(out / "epoch=0000")


def test_partial_folders_belong_to_one_writer(tmp_path):
    from pipeline.run import EpochFolder, claim

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="holding its lock"):
        EpochFolder(out, 0)
    with claim(out):
        pass
    stale = out / ".epoch=0000.partial-999999-deadbeef"  # left by a writer that was killed
    (stale / "_candidates").mkdir(parents=True)
    with claim(out):
        folder = EpochFolder(out, 0)
        assert not stale.exists() and folder.tmp.name.startswith(f".epoch=0000.partial-{os.getpid()}-")
        (folder.tmp / "_manifest.json").write_text("{}")
        folder.commit()
    assert sorted(p.name for p in out.iterdir()) == ["_run", "epoch=0000"]


# ---- item 4: an epoch is replaced in one step ------------------------------------------------------------------

def test_overwriting_an_epoch_never_leaves_it_missing_or_torn(ray_session, shared_cache, pairs, tmp_path,
                                                              monkeypatch):
    """After every rename the writer makes, `OUT/epoch=0000` exists and its manifest holds."""
    out = tmp_path / "out"
    first = mine(config(pairs, shared_cache), out)
    checked = []
    for name in ("replace", "rename"):
        real = getattr(os, name)

        def checking(src, dst, *args, _real=real, **kwargs):
            _real(src, dst, *args, **kwargs)
            verify_epoch(first.epoch_dir)
            checked.append(dst)

        monkeypatch.setattr(os, name, checking)
    again = mine(config(pairs, shared_cache, sample={"n_negatives": 2}), out, overwrite=True)
    monkeypatch.undo()
    assert checked  # the writer renamed files while the checks ran
    assert json.loads((again.epoch_dir / "_manifest.json").read_text())["config"]["sample"]["n_negatives"] == 2
    verify_epoch(again.epoch_dir)
    assert sorted(p.name for p in out.iterdir()) == ["_run", "epoch=0000"]


READER = textwrap.dedent("""
    import json, os, sys, time
    import pandas as pd
    from pipeline.write import sha256_file
    folder, stop = sys.argv[1], sys.argv[2]
    polls = missing = torn = swapped = 0
    while not os.path.exists(stop):
        try:
            before = os.stat(folder).st_ino
        except FileNotFoundError:
            missing += 1
            continue
        try:
            manifest = json.load(open(os.path.join(folder, "_manifest.json")))
            ok = all(sha256_file(os.path.join(folder, f["path"])) == f["sha256"] for f in manifest["files"])
            ok = ok and len(pd.read_parquet(folder)) == sum(f["rows"] for f in manifest["files"])
        except (OSError, ValueError):
            ok = False
        if os.stat(folder).st_ino != before:  # swapped while this poll read: the reader polls again
            swapped += 1
            continue
        polls += 1
        torn += not ok
    print(json.dumps({"polls": polls, "missing": missing, "torn": torn, "swapped": swapped}))
""")


def test_a_reader_polling_during_overwrites_always_sees_a_whole_epoch(ray_session, shared_cache, pairs, tmp_path):
    out = tmp_path / "out"
    mine(config(pairs, shared_cache, output={"rows_per_shard": 8}), out)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(out / "epoch=0000"), str(stop)],
                              stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        time.sleep(3)
        for i in range(6):
            mine(config(pairs, shared_cache, output={"rows_per_shard": 8}, sample={"n_negatives": 2 + i % 2}), out,
                 overwrite=True)
    finally:
        stop.touch()
    seen = json.loads(reader.communicate(timeout=120)[0])
    assert seen["missing"] == 0 and seen["torn"] == 0 and seen["polls"] > 0, seen


def test_exchange_swaps_and_the_fallback_still_commits(tmp_path, monkeypatch):
    import pipeline.run as run

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if run.exchange(a, b):  # Linux (renameat2) and macOS (renamex_np) on local filesystems
        assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"
    out = tmp_path / "out"
    monkeypatch.setattr(run, "exchange", lambda *_: False)  # NFS and the like: two renames
    with run.claim(out):
        for n in range(2):
            folder = run.EpochFolder(out, 0)
            (folder.tmp / "_manifest.json").write_text(str(n))
            folder.commit()
    assert (out / "epoch=0000" / "_manifest.json").read_text() == "1"
    assert sorted(p.name for p in out.iterdir()) == ["_run", "epoch=0000"]


def test_a_new_folder_holding_only_a_blocklist_is_accepted(tmp_path):
    """Marks brought from another run (the only file a user may put into a new --out) do not make it foreign."""
    from pipeline.run import NotARunFolder, check_ownable

    out = tmp_path / "out"
    out.mkdir()
    (out / "blocklist.jsonl").write_text('{"query_id": "q1", "item_id": "i1"}\n')
    check_ownable(out)
    (out / "notes.md").write_text("mine\n")
    with pytest.raises(NotARunFolder):
        check_ownable(out)

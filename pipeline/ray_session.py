"""The Ray edge of a hardneg command: decide whether a run needs Ray at all (`use_ray`), join the cluster the user
names or start a local Ray, quietly, and leave no processes behind.

* Small jobs stay small: with `run.executor: auto` a job of at most `LOCAL_MAX_ITEMS` items on this machine runs in
  the driver process (the same stage code, no Ray processes, no Ray start-up). A new run counts its items before
  reading the input (`read.input_items`: two a pairs row, one a candidates row), so the read itself runs where the
  job does.

* An address that answers nothing fails in seconds with one line (`ray.init` would retry for minutes).
* A healthy run prints no Ray INFO or WARNING lines: Ray Data's messages go to its log file in the session folder
  (`logs/ray-data/`), only its errors reach the terminal.
* A local Ray that hardneg started is hardneg's to clean up: its session folder carries a `hardneg-driver.json`
  record; when the command exits, and at the next start for a driver that was killed, processes still holding files
  of that session are ended. Only sessions with that record are touched: never a cluster hardneg joined, never
  another user's processes.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import sys
from pathlib import Path
from typing import Iterable, Optional

from .errors import UserError

RECORD = "hardneg-driver.json"
CONNECT_TIMEOUT_S = 10.0
# `run.executor: auto` runs jobs of at most this many items (queries + candidates) in the driver process. Measured on
# 2 cores (docs/benchmarks.md): the in-process run is faster at every size tried (no Ray start, no object store),
# and its whole process tree needs about a third of the memory; what Ray adds is several model actors at once, on
# a cluster or on a machine with GPUs, and restarts of lost workers, which pay off on long jobs. 100k long texts
# take about 20 minutes on 2 cores; a job that fails is resumed from the embedding cache either way.
LOCAL_MAX_ITEMS = 100_000


def use_ray(cfg, n_items: int) -> bool:
    """Whether a job over `n_items` items runs on Ray. `run.executor: ray` / `local` decide; `auto` picks Ray when a
    cluster is named (`run.ray_address`, RAY_ADDRESS), a Ray session is already up in this process, the job is
    larger than `LOCAL_MAX_ITEMS`, or it wants several model actors (`embed.num_actors` > 1, more than one GPU) or
    distributed search (`index.distributed: always`); otherwise the driver process runs every stage itself."""
    mode = cfg.run.executor
    if mode != "auto":
        return mode == "ray"
    if cfg.run.ray_address or os.environ.get("RAY_ADDRESS") or ray_is_up():
        return True
    if n_items > LOCAL_MAX_ITEMS or (cfg.embed.num_actors or 1) > 1 or cfg.index.distributed == "always":
        return True
    return cuda_devices(cfg.teacher.device) > 1


def ray_is_up() -> bool:
    """A Ray session is initialised in this process (asked without importing Ray: its import alone costs seconds)."""
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


def ray_active(cfg) -> bool:
    """Whether the stages run on Ray: never with `run.executor: local`, else whenever a session is up (the one
    `start_ray` started or joined, or the caller's own)."""
    return cfg.run.executor != "local" and ray_is_up()


def cuda_devices(device: str) -> int:
    """CUDA devices a teacher on `device` would use; asks torch only when it is imported already or CUDA is named."""
    if device in ("cpu", "mps", "xpu"):
        return 0
    if device.startswith("cuda:"):
        return 1
    if "torch" not in sys.modules and not os.environ.get("CUDA_VISIBLE_DEVICES") and not Path("/dev/nvidiactl").exists():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def start_ray(address: Optional[str]) -> None:
    """Join `address` (else RAY_ADDRESS), or start a local Ray; reuse a session that is already up."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    source = "run.ray_address" if address else "RAY_ADDRESS"
    # No address: a fresh local Ray, never whichever cluster happens to run on this machine (RAY_ADDRESS=auto joins it)
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    local = address == "local"
    if local:
        sweep_stale_sessions()
    else:
        check_reachable(address, source)
    ctx = ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False,
                   ignore_reinit_error=True)
    if local:
        _record(Path(ctx.address_info["session_dir"]))
    quiet_ray_data()
    _spend_restart_warning()


def check_reachable(address: str, source: str = "RAY_ADDRESS") -> None:
    """A TCP connection to the cluster's GCS (or Ray Client server), so a wrong address fails in seconds."""
    if address == "auto":
        return  # Ray looks for a cluster started on this machine and says so at once when there is none
    hostport = address.split("://", 1)[1] if "://" in address else address
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"{source}={address} is not an address of a Ray cluster; give HOST:PORT (the head's GCS "
                        "port, 6379 by default), ray://HOST:PORT, or leave it unset to run on this machine")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, socket.timeout) else (exc.strerror or str(exc))
        raise UserError(f"{source}={address}: no Ray cluster answers there ({reason}); start one with "
                        "`ray start --head`, fix the address, or unset it to run on this machine") from None


def quiet_ray_data() -> None:
    """Ray Data's console handler shows errors only; INFO and WARNING lines (execution plans, "Progress bars
    disabled": hardneg draws its own bars) stay in its log file."""
    import ray.data  # noqa: F401  (configures the "ray.data" logger)

    for handler in logging.getLogger("ray.data").handlers:
        if type(handler).__name__ == "PlainRayHandler" or (
                isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stderr,
                                                                                                    sys.stdout)):
            handler.setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False


def _spend_restart_warning() -> None:
    """Ray Data gives every pool actor its function and DataContext as object refs and runs the pool with
    max_restarts=-1 (our fault tolerance: tests/test_faults.py); Ray core then logs, once per process, an ERROR
    that a restart would fail if those objects were lost (ray-project/ray#53727). They are not lost: the operator
    holds them for as long as its pool lives, and the driver that owns them outlives it. The once-per-process line
    is spent here, with stderr pointed at /dev/null (it is in the driver's log file in the session folder too), on a
    tiny actor that is killed at once, so that a healthy run prints no error line."""
    import ray

    @ray.remote(num_cpus=0, max_restarts=1)
    class _Probe:
        def __init__(self, arg):
            pass

    ref = ray.put(0)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            try:
                actor = _Probe.remote(ref)
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)
    ray.kill(actor, no_restart=True)


# ------------------------------------------------------------------------------------------- local session cleanup

def _ray_temp_root() -> Path:
    """Where Ray puts its session folders (Ray's own rule: RAY_TMPDIR, else TMPDIR, else /tmp)."""
    return Path(os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp") / "ray"


def _record(session_dir: Path) -> None:
    import psutil

    me = psutil.Process()
    record = {"pid": me.pid, "create_time": me.create_time(), "uid": os.getuid()}
    (session_dir / RECORD).write_text(json.dumps(record))
    atexit.register(_shutdown_and_sweep, session_dir)


def _shutdown_and_sweep(session_dir: Path) -> None:
    """At exit: Ray's own shutdown, then whatever of this session outlived it (Ray's agents sometimes do)."""
    import ray

    ray.shutdown()
    sweep([session_dir])


def sweep_stale_sessions(root: Optional[Path] = None) -> list[int]:
    """End the processes of local sessions whose hardneg driver is gone (killed before it could clean up)."""
    import psutil

    stale = []
    for record in (root or _ray_temp_root()).glob(f"session_*/{RECORD}"):
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if data.get("uid") != os.getuid():
            continue
        try:
            alive = abs(psutil.Process(data["pid"]).create_time() - data["create_time"]) < 1.0
        except (psutil.Error, KeyError, TypeError):
            alive = False
        if not alive:
            stale.append(record.parent)
    return sweep(stale) if stale else []


def sweep(session_dirs: Iterable[Path]) -> list[int]:
    """Terminate (then kill) this user's processes that hold files open inside `session_dirs`; drop the records.
    Returns the pids that were ended."""
    import psutil

    dirs = [Path(d) for d in session_dirs]
    prefixes = tuple(f"{d.resolve()}{os.sep}" for d in dirs)
    if not prefixes:
        return []
    since = min((_driver_start(d) for d in dirs), default=0.0) - 1.0  # a session's processes are younger
    ended: list = []
    for _ in range(2):  # a second look finds what was still starting, or not yet holding its files, at the first
        found = _holders(prefixes, since)
        if not found:
            break
        for proc in found:
            try:
                proc.terminate()
            except psutil.Error:
                pass
        _, left = psutil.wait_procs(found, timeout=3)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                pass
        ended += found
    for d in dirs:
        try:
            (d / RECORD).unlink()
        except OSError:
            pass
    return [p.pid for p in ended]


def _holders(prefixes: tuple[str, ...], since: float) -> list:
    """This user's live processes, younger than `since`, that hold a file open under one of `prefixes`."""
    import psutil

    me, uid, found = os.getpid(), os.getuid(), []
    for proc in psutil.process_iter(["pid", "uids", "create_time", "status"]):
        info = proc.info
        if info["pid"] == me or not info["uids"] or info["uids"].real != uid or (info["create_time"] or 0) < since \
                or info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if any(f.path.startswith(prefixes) for f in proc.open_files()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _driver_start(session_dir: Path) -> float:
    try:
        return float(json.loads((session_dir / RECORD).read_text())["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0.0

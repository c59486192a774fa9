"""The container images, the KubeRay RayJob and the `ray job submit` example, checked statically (no Docker engine
is needed): manifests parse and have the fields KubeRay requires, every COPY source exists, the images install
through docker/install.sh like CI does, and every `hardneg` command line in them is one the CLI accepts."""
from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile", "gpu": DOCKER / "Dockerfile.gpu"}
IMAGE_WORKDIR = "/opt/hardneg"  # where the Dockerfiles put the repository's files


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue
        buf += line.rstrip()
        if buf.endswith("\\"):
            buf = buf[:-1] + " "
            continue
        op, _, args = buf.strip().partition(" ")
        out.append((op.upper(), args.strip()))
        buf = ""
    assert not buf, f"{path}: dangling line continuation"
    return out


def hardneg_args(argv: list[str]):
    """Parse a `hardneg ...` command line with the real CLI parser; returns the argparse namespace."""
    from pipeline.cli import build_parser

    assert argv[0] == "hardneg", argv
    try:
        return build_parser().parse_args(argv[1:])
    except SystemExit as exc:  # argparse exits on unknown options or subcommands
        raise AssertionError(f"not a valid hardneg command line: {shlex.join(argv)}") from exc


def image_path(path: str) -> Path:
    """A path inside the image mapped to the repository file it was copied from."""
    assert path.startswith(IMAGE_WORKDIR + "/"), path
    return ROOT / path[len(IMAGE_WORKDIR) + 1:]


def check_mine_command(argv: list[str], in_image: bool) -> None:
    args = hardneg_args(argv)
    assert args.command == "mine"
    if in_image and args.config.startswith(IMAGE_WORKDIR):  # a config baked into the image: load it for real
        from pipeline.config import load_config

        cfg = load_config(image_path(args.config), args.set)
        assert cfg.input.pairs and all(Path(p).exists() for p in cfg.input.pairs)


# ------------------------------------------------------------------------------------------------ Dockerfiles

@pytest.mark.parametrize("target", sorted(DOCKERFILES))
def test_dockerfile_copies_only_what_exists_and_installs_through_the_one_script(target):
    steps = instructions(DOCKERFILES[target])
    ops = [op for op, _ in steps]
    assert ops[0] == "FROM" and "WORKDIR" in ops and "CMD" in ops
    assert all(op in {"FROM", "RUN", "ENV", "WORKDIR", "COPY", "ARG", "USER", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE"}
               for op in ops), ops
    assert dict(steps)["WORKDIR"] == IMAGE_WORKDIR
    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")]
    copied = []
    for op, args in steps:
        if op != "COPY":
            continue
        parts = [p for p in shlex.split(args) if not p.startswith("--")]
        assert len(parts) >= 2, args
        for src in parts[:-1]:
            assert (ROOT / src).exists(), f"{DOCKERFILES[target].name}: COPY {src}: no such path in the repository"
            assert not any(Path(src).match(pattern) or src.split("/")[0] == pattern for pattern in ignored), src
            copied.append(src)
    assert {"pyproject.toml", "pipeline", "docker/install.sh", "configs"} <= set(copied)
    runs = [args for op, args in steps if op == "RUN"]
    install = [r for r in runs if "docker/install.sh" in r]
    assert len(install) == 1, runs
    assert re.search(rf"\bbash docker/install\.sh {target}\b", install[0]), install[0]
    assert "PYTHON=/opt/venv/bin/python" in install[0]
    # the install step comes after everything it reads is copied in
    install_at = next(i for i, (op, args) in enumerate(steps) if op == "RUN" and "docker/install.sh" in args)
    for need in ("pyproject.toml", "docker/install.sh", "pipeline"):
        copy_at = next(i for i, (op, args) in enumerate(steps) if op == "COPY" and need in args)
        assert copy_at < install_at, need


@pytest.mark.parametrize("target", sorted(DOCKERFILES))
def test_dockerfile_default_command_is_a_real_hardneg_command(target):
    steps = dict(instructions(DOCKERFILES[target]))
    cmd = json.loads(steps["CMD"])
    assert cmd[0] == "hardneg"
    if cmd[-1] == "--help":  # `hardneg mine --help` is valid: the subcommand must exist
        from pipeline.cli import build_parser

        sub = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001
        assert cmd[1] in sub
    else:
        check_mine_command(cmd, in_image=True)
    assert json.loads(steps["ENTRYPOINT"])[0] == "tini"


def test_gpu_image_swaps_in_gpu_faiss_and_cuda_torch():
    script = (DOCKER / "install.sh").read_text()
    gpu = script[script.index('if [ "$TARGET" = gpu ]'):]
    assert gpu.index("uninstall --quiet --yes faiss-cpu") < gpu.index("install --quiet faiss-gpu-cu12")
    assert script.index('-e ".[demo,test]"') < script.index('if [ "$TARGET" = gpu ]')  # faiss-cpu comes in first
    assert "TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in (DOCKER / "Dockerfile").read_text()
    assert "ARG TORCH_INDEX_URL=\n" in (DOCKER / "Dockerfile.gpu").read_text()  # PyPI: the CUDA build


def test_ci_and_make_run_the_same_install_script_as_the_images():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)
    make = (ROOT / "Makefile").read_text()
    assert re.search(r"PYTHON=\$\(PY\) bash docker/install\.sh cpu$", make, re.M)
    assert re.search(r"^test: install\b", make, re.M) and "docker/install.sh" in make.split("install:")[0]
    assert "bash docker/install.sh cpu --cluster" in (DOCKER / "Dockerfile").read_text()


def test_install_script_is_valid_bash_and_rejects_unknown_targets():
    script = DOCKER / "install.sh"
    assert script.stat().st_mode & stat.S_IXUSR
    subprocess.run(["bash", "-n", str(script)], check=True)
    bad = subprocess.run(["bash", str(script), "tpu"], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": "/nonexistent/python"})
    assert bad.returncode == 2 and "usage" in bad.stderr


# ------------------------------------------------------------------------------------------------ RayJob

@pytest.fixture(scope="module")
def rayjob():
    return yaml.safe_load((DOCKER / "rayjob.yaml").read_text())


def _containers(template: dict) -> list[dict]:
    containers = template["spec"]["containers"]
    assert containers and all(c.get("name") and c.get("image") for c in containers)
    return containers


def test_rayjob_has_the_schema_required_fields(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", rayjob["metadata"]["name"])
    spec = rayjob["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"].strip()
    assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
    cluster = spec["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # KubeRay wants strings
    head_containers = _containers(head["template"])
    assert any(p["containerPort"] == 8265 for p in head_containers[0]["ports"])  # the job server
    groups = cluster["workerGroupSpecs"]
    assert groups and len({g["groupName"] for g in groups}) == len(groups)
    for g in groups:
        assert isinstance(g["rayStartParams"], dict)
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        _containers(g["template"])
    images = {c["image"] for c in head_containers} | {c["image"] for g in groups for c in _containers(g["template"])}
    assert all(re.search(r"/hardneg:(cpu|gpu)$", i) for i in images), images
    gpu = [g for g in groups if _containers(g["template"])[0]["image"].endswith(":gpu")]
    assert gpu and all(_containers(g["template"])[0]["resources"]["limits"]["nvidia.com/gpu"] for g in gpu)


def test_rayjob_ray_version_is_the_installed_one(rayjob):
    import ray

    assert rayjob["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_entrypoint_is_a_valid_hardneg_mine_on_the_shared_volume(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    check_mine_command(argv, in_image=True)
    args = hardneg_args(argv)
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    # the driver runs on the head: what it writes must be on a volume every pod mounts
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    mounts = [{m["mountPath"] for c in _containers(t) for m in c.get("volumeMounts", [])} for t in templates]
    shared = set.intersection(*mounts)
    assert shared, "no volume mounted in every pod"
    cache = next(v.split("=", 1)[1] for v in args.set if v.startswith("embed.cache_dir="))
    for path in (args.out, cache):
        assert any(path.startswith(m.rstrip("/") + "/") for m in shared), path
    for t in templates:
        claims = [v["persistentVolumeClaim"]["claimName"] for v in t["spec"]["volumes"]]
        assert claims == ["hardneg-data"]


# ------------------------------------------------------------------------------------------------ ray job submit

def test_submit_script_sends_a_valid_command_with_a_runtime_env(tmp_path):
    """Runs docker/submit.sh against a stand-in `ray` that records its arguments."""
    fake = tmp_path / "bin" / "ray"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\nimport json, sys\njson.dump(sys.argv[1:], open({str(tmp_path / 'argv.json')!r}, 'w'))\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{fake.parent}{os.pathsep}{os.environ['PATH']}", "RAY_ADDRESS": "http://head:8265",
           "JOB_DIR": str(tmp_path)}
    subprocess.run(["bash", str(DOCKER / "submit.sh"), "/opt/hardneg/configs/demo.yaml", "/data/out/demo",
                    "--set", "sample.n_negatives=8", "--epoch", "1"], env=env, check=True)
    argv = json.loads((tmp_path / "argv.json").read_text())
    assert argv[:3] == ["job", "submit", "--address"] and argv[3] == "http://head:8265"
    runtime_env = json.loads(argv[argv.index("--runtime-env-json") + 1])
    assert runtime_env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert argv[argv.index("--working-dir") + 1] == str(tmp_path)
    command = argv[argv.index("--") + 1:]
    check_mine_command(command, in_image=True)
    args = hardneg_args(command)
    assert (args.out, args.epoch, args.set, args.no_progress) == ("/data/out/demo", 1, ["sample.n_negatives=8"], True)
    missing = subprocess.run(["bash", str(DOCKER / "submit.sh"), "only-one-arg"], env=env, capture_output=True,
                             text=True)
    assert missing.returncode == 2 and "usage" in missing.stderr


def test_cluster_doc_uses_the_files_it_describes():
    doc = (ROOT / "docs" / "cluster.md").read_text()
    for name in ("docker/Dockerfile", "docker/Dockerfile.gpu", "docker/install.sh", "docker/rayjob.yaml",
                 "docker/submit.sh", "ray job submit", "run.max_errored_blocks", "input.max_rejects"):
        assert name in doc, name
    for cmd in re.findall(r"^\s*hardneg (mine [^\n\\]*)$", doc, re.M):
        hardneg_args(["hardneg", *shlex.split(cmd)])

"""Shared fixtures: one Ray session for the whole test run, offline Hugging Face, a shared embedding cache."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def ray_session():
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory):
    """One embedding cache for tests that do not test the cache itself, so each text is embedded once per run."""
    return str(tmp_path_factory.mktemp("embedding-cache"))


@pytest.fixture(scope="session")
def mined_run(tmp_path_factory, ray_session, shared_cache):
    """A real run (two epochs, `hardneg mine` over a small demo corpus) that the inspector and report tests read;
    read-only: a test that writes works on `inspector_fixtures.copy_run`."""
    from inspector_fixtures import mine_run

    return mine_run(tmp_path_factory.mktemp("mined-run"), shared_cache)


@pytest.fixture(scope="session")
def tiny_dual_models(tmp_path_factory):
    """Tiny random CLIP and SigLIP checkpoints saved as real `from_pretrained` folders, built once per test run."""
    from tiny_models import save_tiny_clip
    from tiny_vlms import save_tiny_siglip

    root = tmp_path_factory.mktemp("dual-models")
    return {"clip": save_tiny_clip(root / "clip"), "siglip": save_tiny_siglip(root / "siglip")}

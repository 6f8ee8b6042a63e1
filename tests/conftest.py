"""Shared fixtures: the real CamVid (skipped locally when absent, required in CI) and tiny synthetic copies."""

from __future__ import annotations

import os
from pathlib import Path

# Before torch loads: see the Makefile (spinning OpenMP threads are very slow on an oversubscribed CPU).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict
from PIL import Image

import bgremover.utils  # noqa: F401  (registers the config resolvers the compose API needs)

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = str(REPO / "conf")


def real_camvid_root() -> Path | None:
    for candidate in (os.environ.get("CAMVID_ROOT"), os.environ.get("DATA_DIR"), REPO.parent / "shared" / "CamVid"):
        if candidate and (Path(candidate) / "train").is_dir():
            return Path(candidate).resolve()
    return None


def compose_cfg(tmp_path: Path, overrides: list[str], config_name: str = "train"):
    """A run config as `python -m bgremover.train` would build it, writing into tmp_path.

    Without an `experiment=` override the base config is used (`~experiment`), not the default quick recipe:
    a test states every setting it depends on."""
    if config_name == "train" and not any(o.startswith(("experiment=", "~experiment")) for o in overrides):
        overrides = ["~experiment", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.log_dir = str(tmp_path)
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig().set_config(cfg)
    return cfg


def randomise_bn(module, seed: int = 0) -> None:
    """Non-trivial BN affine params / running stats and conv biases (seeded, so every process agrees): a wrong
    formula cannot hide behind 1s and 0s."""
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2 - 1)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 2 - 1)
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            elif isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) * 0.2 - 0.1)


@pytest.fixture(scope="session")
def camvid_root() -> Path:
    """The real dataset. CI must have it (.ci/run points DATA_DIR at ../shared/CamVid), so there it never skips."""
    root = real_camvid_root()
    if root is None:
        if os.environ.get("CI"):
            pytest.fail("real CamVid not found in CI: set DATA_DIR (or CAMVID_ROOT) to ../shared/CamVid")
        pytest.skip("real CamVid not found: set DATA_DIR=/path/to/CamVid to run this test")
    return root


def write_camvid(root: Path, counts: dict[str, int] | None = None, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """A CamVid-layout folder of random RGB images (H×W = size) and labels 0..11, `counts` pairs per split."""
    rng = np.random.default_rng(seed)
    for split, n in (counts or {"train": 4, "val": 2, "test": 2}).items():
        (root / split).mkdir(parents=True, exist_ok=True)
        (root / f"{split}annot").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{split}_{i:03d}.png"
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(root / split / name)
            Image.fromarray(rng.integers(0, 12, size, dtype=np.uint8), mode="L").save(root / f"{split}annot" / name)
    return root


@pytest.fixture
def tiny_camvid(tmp_path: Path) -> Path:
    return write_camvid(tmp_path / "CamVid")


@pytest.fixture
def small_camvid(tmp_path: Path) -> Path:
    """A 4/2/3-frame CamVid of 32×64 frames: enough for a run end to end in seconds."""
    return write_camvid(tmp_path / "CamVid", {"train": 4, "val": 2, "test": 3}, size=(32, 64))


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path_factory):
    # Never talk to W&B from tests, and keep its cache/config out of the home directory.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # a developer's own would move the runs' project (bgremover)
    monkeypatch.setenv("BGREMOVER_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


_WATCHED = ("logs", "outputs", "wandb", "lightning_logs", "multirun")  # what a run could write into the checkout


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(REPO)) for p in root.rglob("*")} if root.is_dir() else set()


@pytest.fixture(scope="session", autouse=True)
def _repo_stays_clean():
    """Tests write into tmp folders only: a test that leaves files in the checkout's logs/ (or outputs/, wandb/)
    fails the session, instead of filling a developer's run listing with test runs."""
    before = {name: _listing(REPO / name) for name in _WATCHED}
    yield
    new = sorted(p for name in _WATCHED for p in _listing(REPO / name) - before[name])
    assert not new, f"tests wrote into the repository: {new[:5]}"

"""Shared test setup: fixture paths, one torch thread, W&B offline in a temporary directory."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/fixtures next to the checkout (as in CI); FACEDISTILL_FIXTURES points elsewhere if needed
FIXTURES = Path(os.environ.get("FACEDISTILL_FIXTURES", REPO.parent / "shared" / "fixtures"))

torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture
def fixtures() -> Path:
    assert FIXTURES.is_dir(), f"shared fixtures not found at {FIXTURES}"
    return FIXTURES


@pytest.fixture(autouse=True)
def _wandb_in_tmp(tmp_path, monkeypatch):
    """W&B never goes online in tests and writes only under the test's temporary directory."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / ".wandb_cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / ".wandb_config"))

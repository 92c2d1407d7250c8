"""Fixtures of the tests of `fashionnet predict` and its library, loaded by the test modules that
use them with ``pytest_plugins = ["tests.predict_fixtures"]``: one instance per session."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fashionnet import FashionNet
from fashionnet.train import train_epoch
from tests.predict_helpers import write_pngs


@pytest.fixture(scope="session")
def test_pngs(official, tmp_path_factory) -> Path:
    """The 10,000 official test images as PNG files 00000.png ... 09999.png (about 2 s)."""
    return write_pngs(official[1].images.numpy(), tmp_path_factory.mktemp("pngs") / "test")


@pytest.fixture(scope="session")
def model_file(official, tmp_path_factory) -> Path:
    """A FashionNet state_dict after one epoch on 1,024 training images: far from the recipe,
    but with weights and BatchNorm statistics that are not the initial ones."""
    torch.manual_seed(0)
    model = FashionNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, amsgrad=True)
    data = official[0].subset(np.arange(1024))
    train_epoch(model, optimizer, data.images, data.labels, torch.randperm(1024), 64)
    path = tmp_path_factory.mktemp("model") / "fashionnet.pt"
    torch.save(model.state_dict(), path)
    return path

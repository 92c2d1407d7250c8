"""What the ingest tests share: a small project (a split and a briefly trained model, as the
pipeline writes them), a checkout of it, and builders of inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionnet.data import save_split
from fashionnet.evaluate import evaluate
from fashionnet.incoming import SLUGS
from fashionnet.recipe import TrainConfig
from fashionnet.split import SplitConfig, stratified_split
from fashionnet.train import init_model, train
from pipeline import paths
from tests.helpers import copy_repo

SPLIT = SplitConfig(val_size=1000, limit=2000, seed=42)


@pytest.fixture(scope="session")
def project(official, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """data/prepared/ of a small split, a model trained briefly on it and its metrics, as the
    pipeline writes them; and the index of the official training images in no split."""
    root = tmp_path_factory.mktemp("project")
    full, test = official
    train_idx, val_idx = stratified_split(full.labels.numpy(), SPLIT)
    save_split(root / paths.PREPARED["train"], full.subset(train_idx), train_idx)
    save_split(root / paths.PREPARED["val"], full.subset(val_idx), val_idx)
    save_split(root / paths.PREPARED["test"], test, np.arange(len(test)))
    model = init_model(1)
    train(model, full.subset(train_idx), full.subset(val_idx),
          TrainConfig(epochs=2, batch_size=64, device="cpu", precision="float32"))
    (root / paths.MODEL).parent.mkdir(parents=True)
    torch.save(model.state_dict(), root / paths.MODEL)
    val = evaluate(model, full.subset(val_idx)).accuracy
    (root / paths.METRICS_JSON).parent.mkdir(parents=True)
    (root / paths.METRICS_JSON).write_text(json.dumps({"accuracy": {"val": val}}))
    unused = np.setdiff1d(np.arange(len(full)), np.concatenate([train_idx, val_idx]))
    return root, {"train": train_idx, "val": val_idx, "unused": unused}


@pytest.fixture
def ws(tmp_path, project) -> Path:
    """A checkout with the project's data and model, committed."""
    repo = copy_repo(tmp_path / "repo")
    for part in (paths.PREPARED_DIR, paths.MODEL.parent):
        shutil.copytree(project[0] / part, repo / part)
    shutil.copy(project[0] / paths.METRICS_JSON, repo / paths.METRICS_JSON)
    return repo


def png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)
    return path


def state(repo: Path) -> dict[str, str]:
    """data/incoming/'s files and their digests, and anything staged beside it."""
    found = {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((repo / "data").glob("incoming*/**/*")) if p.is_file()}
    return {**found, "siblings": " ".join(sorted(p.name for p in (repo / "data").iterdir()))}


def class_dirs(root: Path, official, index: np.ndarray, slugs: bool = False) -> Path:
    """PNG files of official training images ``index`` in class subdirectories."""
    full = official[0]
    for i in index:
        label = int(full.labels[i])
        png(root / (SLUGS[label] if slugs else str(label)) / f"{i}.png", full.images[i].numpy())
    return root


def batches(repo: Path) -> list[str]:
    return (repo / paths.MANIFEST).read_text().splitlines()[1:]


def write_idx(path: Path, array: np.ndarray, ndim: int) -> None:
    header = bytes([0, 0, 8, ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def refused(cli, ws: Path, *args: str) -> str:
    """The one line a refused ingest prints; the test fails unless it exits 2 and changes
    nothing in data/incoming/."""
    before = state(ws)
    code, out, err = cli(ws, "ingest", *args)
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert state(ws) == before
    return line



"""The stage flows in process, under Prefect's test harness, on a small slice of the real
data: every contract output, and metrics recomputed independently from the predictions."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, classification_report

from fashionnet import CLASSES, FashionNet
from fashionnet.idx import TEST_LABELS, read_labels
from fashionnet.split import SplitConfig
from fashionnet.train import TrainConfig
from pipeline import paths
from pipeline import train as train_module
from pipeline.evaluate import evaluate_flow
from pipeline.params import Params
from pipeline.report import report_flow
from pipeline.split import split_flow
from pipeline.train import PROGRESS_KEY, train_flow

LIVE: list[tuple[float, str, str]] = []  # (progress %, history.csv, description) per epoch


@pytest.fixture(scope="module")
def ran(prefect_harness, raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """split -> train (1 epoch, 600 images) -> evaluate -> report in a scratch directory."""
    work = tmp_path_factory.mktemp("flows")
    shutil.copytree(raw_dir, work / paths.RAW_DIR)
    params = Params(split=SplitConfig(val_size=1000, limit=600, seed=1),
                    train=TrainConfig(epochs=2, batch_size=100, device="cpu"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert split_flow(params) == {"train": 600, "val": 1000, "test": 10_000}
        update = train_module.update_progress_artifact

        def record(artifact_id, progress, description=None):
            # After each epoch: what metrics/history.csv holds when the UI's bar moves.
            LIVE.append((progress, (work / paths.HISTORY).read_text(), description))
            return update(artifact_id, progress, description)

        mp.setattr(train_module, "update_progress_artifact", record)
        history = train_flow(params)
        assert [s.epoch for s in history] == [1, 2]
        evaluate_flow(params)
        report_flow(params)
    return work


def test_train_outputs(ran: Path):
    model = FashionNet()
    model.load_state_dict(torch.load(ran / paths.MODEL, weights_only=True))
    history = pd.read_csv(ran / paths.HISTORY)
    assert list(history.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss",
                                     "val_accuracy", "lr"]  # the contract's columns
    assert history["epoch"].tolist() == [1, 2]
    assert history["val_accuracy"].iloc[-1] > 0.6  # 1,200 images seen: far above chance
    info = json.loads((ran / paths.TRAIN_INFO).read_text())
    assert info["train_images"] == 600 and info["params"]["train"]["epochs"] == 2


def test_metrics_agree_with_an_independent_recomputation(ran: Path, raw_dir: Path):
    predictions = pd.read_csv(ran / paths.PREDICTIONS)
    assert list(predictions.columns) == ["index", "actual", "predicted"]
    assert len(predictions) == 10_000
    assert np.array_equal(predictions["actual"], read_labels(raw_dir / TEST_LABELS))
    metrics = json.loads((ran / paths.METRICS_JSON).read_text())
    assert set(metrics) == {"accuracy", "loss"}
    for kind in ("accuracy", "loss"):
        assert set(metrics[kind]) == {"train", "val", "test"}
    assert all(0 <= v <= 1 for v in metrics["accuracy"].values())
    test_acc = accuracy_score(predictions["actual"], predictions["predicted"])
    assert metrics["accuracy"]["test"] == pytest.approx(test_acc)
    accuracy = pd.read_csv(ran / paths.ACCURACY)
    assert list(accuracy.columns) == ["split", "accuracy", "loss"]
    assert accuracy["split"].tolist() == ["train", "val", "test"]
    assert accuracy.set_index("split")["accuracy"].to_dict() == pytest.approx(metrics["accuracy"])
    report = pd.read_csv(ran / paths.CLASS_REPORT)
    assert list(report.columns) == ["class", "precision", "recall", "f1-score", "support"]
    assert report["class"].tolist() == [*CLASSES, "macro avg", "weighted avg"]
    expected = classification_report(predictions["actual"], predictions["predicted"],
                                      target_names=list(CLASSES), output_dict=True,
                                      zero_division=0)
    for row in report.to_dict("records"):
        for column in ("precision", "recall", "f1-score", "support"):
            assert row[column] == pytest.approx(expected[row["class"]][column])


def test_report_embeds_figures_and_the_seeds_figures(ran: Path):
    text = (ran / paths.REPORT).read_text()
    for figure in (paths.LEARNING_CURVES, paths.CONFUSION_MATRIX):
        assert (ran / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure.name})" in text
    assert "90.30%" in text and "92.22%" in text  # the seed's test and train accuracy
    assert "(0.76)" in text and "Shirt" in text
    assert "600 training" in text
    # Every number comes from this run's params and metrics: its 1,000-image validation split.
    assert "validation split is 1,000 images" in text and "6,000" not in text
    # One line per paragraph or list item: the Prefect UI renders each newline as a break.
    section = text.split("## Why these figures differ from the seed's\n")[1].split("\n\n")[0]
    assert all(line.startswith("- **") for line in section.splitlines())


def test_report_tables_are_published_as_prefect_artifacts(ran: Path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {key: client.read_artifacts(
                     artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
                 for key in ("fashionnet-report", "fashionnet-per-class")}
    assert found["fashionnet-report"][0].type == "markdown"
    artifact = found["fashionnet-report"][0].data
    assert "90.30%" in artifact
    # The figures travel inside the artifact: the UI's browser cannot reach reports/.
    for title, figure in (("Learning curves", paths.LEARNING_CURVES),
                          ("Test confusion matrix", paths.CONFUSION_MATRIX)):
        png = base64.b64encode((ran / figure).read_bytes()).decode()
        assert f"![{title}](data:image/png;base64,{png})" in artifact
    assert ".png)" not in artifact
    assert found["fashionnet-per-class"][0].type == "table"


def test_training_shows_its_progress_after_every_epoch(ran: Path):
    """After each epoch, metrics/history.csv holds every epoch so far (`dvc plots show` works
    mid-run) and the Prefect progress artifact moves."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    assert [progress for progress, _, _ in LIVE] == [50.0, 100.0]
    final = (ran / paths.HISTORY).read_text()
    assert LIVE[0][1] == final.splitlines(keepends=True)[0] + final.splitlines(keepends=True)[1]
    assert LIVE[1][1] == final
    assert LIVE[0][2].startswith("training: 1 of 2 epochs, validation accuracy ")
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[PROGRESS_KEY])))
    assert artifact.type == "progress" and artifact.data == 100.0

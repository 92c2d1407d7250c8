"""The stage flows in process, under Prefect's test harness, on a small slice of the real
data: every contract output, and metrics recomputed independently from the model and from the
predictions."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
from pathlib import Path
from typing import NamedTuple
from uuid import UUID

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import accuracy_score, classification_report
from torch.nn import functional as F

from fashionnet import CLASSES, FashionNet
from fashionnet.idx import TEST_LABELS, read_labels
from fashionnet.incoming import SLUGS, save_batch
from fashionnet.recipe import TrainConfig
from fashionnet.split import SplitConfig
from pipeline import manifest, paths
from pipeline import train as train_module
from pipeline.evaluate import evaluate_flow
from pipeline.params import Params
from pipeline.report import report_flow
from pipeline.split import split_flow
from pipeline.train import PROGRESS_KEY, train_flow

# The reference result (../shared/SEED.md): accuracy per split, and the Shirt row of its
# per-class table (precision, recall, f1-score, support).
REFERENCE_ACCURACY = {"train": 0.9222, "val": 0.8935, "test": 0.9030}
REFERENCE_SHIRT = (0.76, 0.70, 0.73, 406)


PARAMS = Params(split=SplitConfig(val_size=1000, limit=600, seed=1),
                train=TrainConfig(epochs=2, batch_size=100, device="cpu", precision="float32"))


class Epoch(NamedTuple):
    """What the Prefect UI's progress bar and metrics/history.csv showed after an epoch."""

    progress: float  # percent
    history: str  # metrics/history.csv's text
    description: str


class Ran(NamedTuple):
    """What the ``ran`` fixture leaves: its directory, each epoch's progress, the report's run."""

    work: Path  # the scratch directory the stages ran in
    live: list[Epoch]
    train_run: UUID  # the train flow's run
    report_run: UUID  # the report flow's run


@pytest.fixture(scope="module")
def ran(prefect_harness, raw_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """split -> train (2 epochs, 600 images) -> evaluate -> report in a scratch directory, in
    float32 on every host, so that the recomputations below are exact up to float32's
    rounding (auto would be bfloat16 on CPUs with it natively: tests/test_evaluate.py)."""
    work = tmp_path_factory.mktemp("flows")
    shutil.copytree(raw_dir, work / paths.RAW_DIR)
    params = PARAMS
    live: list[Epoch] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(work)
        assert split_flow(params) == {"train": 600, "val": 1000, "test": 10_000}
        update = train_module.update_progress_artifact

        def record(artifact_id, progress, description=None):
            # After each epoch: what metrics/history.csv holds when the UI's bar moves.
            live.append(Epoch(progress, (work / paths.HISTORY).read_text(), description))
            return update(artifact_id, progress, description)

        mp.setattr(train_module, "update_progress_artifact", record)
        trained = train_flow(params, return_state=True)
        assert [s.epoch for s in trained.result()] == [1, 2]
        evaluate_flow(params)
        report = report_flow(params, return_state=True)
        assert report.is_completed()
    return Ran(work, live, trained.state_details.flow_run_id, report.state_details.flow_run_id)


def test_train_outputs(ran: Ran):
    history = pd.read_csv(ran.work / paths.HISTORY)
    assert list(history.columns) == ["epoch", "train_loss", "train_accuracy", "val_loss",
                                     "val_accuracy", "lr"]  # the contract's columns
    assert history["epoch"].tolist() == [1, 2]
    assert history["lr"].tolist() == [0.003, 0.003]  # StepLR decays after 25 epochs
    # The last epoch's validation is the trained model's, as the evaluate stage measures it.
    metrics = json.loads((ran.work / paths.METRICS_JSON).read_text())
    last = history.iloc[-1]
    assert (last["val_accuracy"], last["val_loss"]) == (metrics["accuracy"]["val"],
                                                        metrics["loss"]["val"])
    assert last["val_accuracy"] > 0.5  # a floor: 1,200 images seen, chance is 0.1
    info = json.loads((ran.work / paths.TRAIN_INFO).read_text())
    assert (info["train_images"], info["val_images"]) == (600, 1000)
    assert info["precision"] == "float32" and info["params"]["train"]["epochs"] == 2


def stock_logits(model: FashionNet, images: np.ndarray) -> torch.Tensor:
    """(N, 10) logits of ``model``'s eval-mode forward pass (no BatchNorm folding, no fused
    kernels), from uint8 (N, 28, 28) images scaled to [0, 1] by hand."""
    x = torch.from_numpy(images).float().div(255).unsqueeze(1)  # (N, 1, 28, 28)
    with torch.no_grad():
        return torch.cat([model.eval()(batch) for batch in x.split(1000)])


def test_metrics_agree_with_an_independent_recomputation(ran: Ran, raw_dir: Path):
    predictions = pd.read_csv(ran.work / paths.PREDICTIONS)
    assert list(predictions.columns) == ["index", "actual", "predicted"]
    assert predictions["index"].tolist() == list(range(10_000))
    assert np.array_equal(predictions["actual"], read_labels(raw_dir / TEST_LABELS))
    metrics = json.loads((ran.work / paths.METRICS_JSON).read_text())
    assert {kind: set(values) for kind, values in metrics.items()} == {
        "accuracy": {"train", "val", "test"}, "loss": {"train", "val", "test"}}
    test_acc = accuracy_score(predictions["actual"], predictions["predicted"])
    assert metrics["accuracy"]["test"] == test_acc
    # Each split again from the saved model with the stock forward pass: the same loss, and the
    # same prediction for every image whose two best logits do not tie within float32's
    # rounding (folding BatchNorm moves a logit by about 1e-6).
    model = FashionNet()
    model.load_state_dict(torch.load(ran.work / paths.MODEL, weights_only=True))
    again = {}
    for split in ("train", "val", "test"):
        with np.load(ran.work / paths.PREPARED[split]) as arrays:
            images, labels = arrays["images"], arrays["labels"].astype(np.int64)
        logits = stock_logits(model, images)
        top2 = logits.topk(2, 1).values
        again[split] = {"labels": labels, "predicted": logits.argmax(1).numpy(),
                        "ties": (top2[:, 0] - top2[:, 1] < 1e-4).numpy(),  # none, usually
                        "loss": F.cross_entropy(logits, torch.from_numpy(labels)).item()}
    settled = ~again["test"]["ties"]
    assert np.array_equal(predictions["predicted"][settled], again["test"]["predicted"][settled])
    for split, result in again.items():
        correct = int((result["predicted"] == result["labels"]).sum())
        found = round(metrics["accuracy"][split] * len(result["labels"]))  # images right
        assert abs(found - correct) <= result["ties"].sum(), split
        assert metrics["loss"][split] == pytest.approx(result["loss"], rel=1e-5), split
    accuracy = pd.read_csv(ran.work / paths.ACCURACY)
    assert list(accuracy.columns) == ["split", "accuracy", "loss"]
    assert accuracy["split"].tolist() == ["train", "val", "test"]
    assert accuracy.set_index("split")[["accuracy", "loss"]].to_dict() == metrics
    report = pd.read_csv(ran.work / paths.CLASS_REPORT)
    assert list(report.columns) == ["class", "precision", "recall", "f1-score", "support"]
    assert report["class"].tolist() == [*CLASSES, "macro avg", "weighted avg"]
    expected = classification_report(predictions["actual"], predictions["predicted"],
                                      target_names=list(CLASSES), output_dict=True,
                                      zero_division=0)
    for row in report.to_dict("records"):
        for column in ("precision", "recall", "f1-score", "support"):
            assert row[column] == pytest.approx(expected[row["class"]][column], rel=1e-12)


def test_incoming_batches_join_training_less_a_held_out_share_evaluate_reports(
        ran: Ran, official, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(ran.work, work)
    monkeypatch.chdir(work)
    before = {name: (work / paths.PREPARED[name]).read_bytes() for name in ("train", "val",
                                                                           "test")}
    full = official[0]
    used = np.concatenate([np.load(paths.PREPARED[n])["index"] for n in ("train", "val")])
    fresh = np.setdiff1d(np.arange(len(full)), used)[:200]
    rows = manifest.read(paths.MANIFEST)
    batches = []
    for part in (fresh[:120], fresh[120:]):
        file = save_batch(paths.INCOMING_DIR, full.images[part].numpy(),
                          full.labels[part].numpy())
        batches.append(file.stem)
        rows = manifest.append(rows, manifest.Row(file.stem, "2026-12-03T00:00:00+00:00", {
            slug: int((full.labels[part] == c).sum()) for c, slug in enumerate(SLUGS)}, 0,
            ["test"]))
    (work / paths.MANIFEST).write_text(manifest.write(rows))

    sizes = split_flow(PARAMS)
    assert sizes == {"train": 600 + 108 + 72, "val": 1000, "test": 10_000, "incoming": 12 + 8}
    assert all((work / paths.PREPARED[n]).read_bytes() == before[n] for n in ("val", "test"))
    train, held = np.load(paths.PREPARED["train"]), np.load(paths.INCOMING_HOLDOUT)
    assert train["batches"].tolist() == held["batches"].tolist() == batches
    with np.load(io.BytesIO(before["train"])) as official_part:  # unchanged, first
        assert np.array_equal(train["images"][:600], official_part["images"])
    assert train["source"].tolist() == [-1] * 600 + [0] * 108 + [1] * 72
    assert held["source"].tolist() == [0] * 12 + [1] * 8
    for k, part in enumerate((fresh[:120], fresh[120:])):  # each image in one place only
        mine = np.concatenate([train["index"][train["source"] == k],
                               held["index"][held["source"] == k]])
        assert sorted(mine.tolist()) == list(range(len(part)))
    split_flow(PARAMS)  # deterministic: the same hold-out again
    assert np.array_equal(np.load(paths.INCOMING_HOLDOUT)["index"], held["index"])

    accuracy = evaluate_flow(PARAMS)
    model = FashionNet()
    model.load_state_dict(torch.load(paths.MODEL, weights_only=True))
    predicted = stock_logits(model, held["images"]).argmax(1).numpy()
    assert accuracy["incoming"] == pytest.approx((predicted == held["labels"]).mean(), abs=0.051)
    table = pd.read_csv(paths.ACCURACY)
    assert table["split"].tolist() == ["train", "val", "test", "incoming"]
    assert json.loads(Path(paths.METRICS_JSON).read_text())["loss"]["incoming"] > 0


def table_row(*cells: object) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def test_report_embeds_figures_and_the_reference_figures(ran: Ran):
    text = (ran.work / paths.REPORT).read_text()
    for figure in (paths.LEARNING_CURVES, paths.CONFUSION_MATRIX):
        assert (ran.work / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure.name})" in text
    # This run's accuracy and loss per split beside the reference's, from metrics/.
    metrics = json.loads((ran.work / paths.METRICS_JSON).read_text())
    for split, reference in REFERENCE_ACCURACY.items():
        accuracy, loss = metrics["accuracy"][split], metrics["loss"][split]
        assert table_row(split, f"{accuracy:.2%}", f"{reference:.2%}",
                         f"{(accuracy - reference) * 100:+.2f} pts", f"{loss:.4f}") in text
    # Each class's test figures, the reference's in brackets: the Shirt row in full.
    shirt = pd.read_csv(ran.work / paths.CLASS_REPORT).set_index("class").loc["Shirt"]
    cells = [f"{shirt[k]:.2f} ({r:.2f})" for k, r in zip(("precision", "recall", "f1-score"),
                                                         REFERENCE_SHIRT, strict=False)]
    assert table_row("Shirt", *cells, f"1000 ({REFERENCE_SHIRT[3]})") in text
    assert "600 training / 1,000 validation images" in text
    # Every number comes from this run's params and metrics: its 1,000-image validation split.
    assert "validation split is 1,000 images" in text and "6,000" not in text
    # One line per paragraph or list item: the Prefect UI renders each newline as a break.
    section = re.search(r"^## Why these figures differ[^\n]*\n(.*?)\n\n", text,
                        flags=re.MULTILINE | re.DOTALL)
    assert section is not None
    items = section[1].splitlines()
    assert len(items) == 4 and all(line.startswith("- **") for line in items)


def test_report_tables_are_published_as_prefect_artifacts(ran: Ran):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = {key: client.read_artifacts(artifact_filter=ArtifactFilter(
                     key=ArtifactFilterKey(any_=[key]),
                     flow_run_id=ArtifactFilterFlowRunId(any_=[ran.report_run])))
                 for key in ("fashionnet-report", "fashionnet-per-class")}
    (report,), (per_class,) = found["fashionnet-report"], found["fashionnet-per-class"]
    # The report itself, its figures inside: the UI's browser cannot reach reports/.
    expected = (ran.work / paths.REPORT).read_text()
    for title, figure in (("Learning curves", paths.LEARNING_CURVES),
                          ("Test confusion matrix", paths.CONFUSION_MATRIX)):
        png = base64.b64encode((ran.work / figure).read_bytes()).decode()
        expected = expected.replace(f"![{title}]({figure.name})",
                                    f"![{title}](data:image/png;base64,{png})")
    assert (report.type, report.data) == ("markdown", expected)
    # The per-class table: classification_report.csv's rows, to 4 decimals.
    rows = pd.read_csv(ran.work / paths.CLASS_REPORT).round(4).to_dict("records")
    assert (per_class.type, json.loads(per_class.data)) == ("table", rows)


def test_training_shows_its_progress_after_every_epoch(ran: Ran):
    """After each epoch, metrics/history.csv holds every epoch so far (`dvc plots show` works
    mid-run) and the Prefect progress artifact moves."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    assert [epoch.progress for epoch in ran.live] == [50.0, 100.0]
    final = (ran.work / paths.HISTORY).read_text()
    assert ran.live[0].history == "".join(final.splitlines(keepends=True)[:2])  # header, epoch 1
    assert ran.live[1].history == final
    accuracy = pd.read_csv(ran.work / paths.HISTORY)["val_accuracy"]
    assert [epoch.description for epoch in ran.live] == [
        f"training: {n} of 2 epochs, validation accuracy {accuracy[n - 1]:.2%}" for n in (1, 2)]
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(  # this run's: the
            key=ArtifactFilterKey(any_=[PROGRESS_KEY]),  # suite's server holds others' too
            flow_run_id=ArtifactFilterFlowRunId(any_=[ran.train_run])))
    assert artifact.type == "progress" and artifact.data == 100.0

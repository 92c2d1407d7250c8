"""`fashionnet ingest`: new labelled images into data/incoming/, where the split stage adds them to
the training data (validation and test never change).

A batch is read and converted as `fashionnet predict` converts users' images
(fashionnet.labelled), then checked against what the project holds (fashionnet.incoming):
- refused, exit 2 and nothing written: an image identical to a validation or test image
  (leakage: the yardsticks would lie), an image given twice or already in the training data
  with another label, and labels the current model disagrees with far more often than its
  validation error predicts (``incoming.max_disagreement``; ``force`` lets them through);
- skipped and counted: images already in the training data or an earlier batch with the same
  label, so ingesting a batch again changes nothing.

Accepted images become one immutable file, data/incoming/<id>.npz, tracked by DVC (`dvc add`),
and a row of the manifest. The new data/incoming/ is made beside the old and swapped in with
one atomic rename, so a failed or killed ingest leaves data/incoming/ exactly as it was.
``push`` then does what a DVC user does by hand (`git commit`, `dvc push`, `git push`) for
every batch the remote lacks, and emits the Prefect event ``fashionnet.data.ingested``, which
the retraining deployment's trigger waits for (prefect.yaml).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone

import numpy as np
import torch

from fashionnet.data import CLASSES, LabeledImages, load_split
from fashionnet.errors import InputError
from fashionnet.evaluate import evaluate
from fashionnet.files import replaced_directory, write_text
from fashionnet.incoming import (
    Sorted,
    batch_id,
    counts,
    disagreement_p_value,
    keys,
    load_batch,
    save_batch,
    sort_batch,
)
from fashionnet.labelled import Labelled, read_labelled_images
from pipeline import manifest, paths
from pipeline.params import Params, load_params
from pipeline.workspace import workspace_lock

log = logging.getLogger("fashionnet")
SIGNIFICANCE = 1e-3  # a label check p-value below this refuses the batch


@dataclass(frozen=True)
class LabelCheck:
    """The current model against the batch's labels."""

    disagreements: int
    images: int
    val_error: float
    p_value: float
    ratio: float

    @property
    def refused(self) -> bool:
        return self.p_value < SIGNIFICANCE

    def describe(self) -> str:
        return (f"the current model disagrees with {self.disagreements} of {self.images} labels "
                f"({self.disagreements / self.images:.1%}); its validation error is "
                f"{self.val_error:.1%}, and even {self.ratio:g} times that makes so many "
                f"disagreements {'implausible' if self.refused else 'plausible'} "
                f"(p = {self.p_value:.1e})")


@dataclass(frozen=True)
class Batch:
    """What an ingest found: the images read, how they sort against the project's data, the
    label check (None without a model), and what it did (the batch id and commit, if any)."""

    read: Labelled
    sorted: Sorted
    check: LabelCheck | None
    sources: list[str]
    batch: str | None = None
    commit: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def new_labels(self) -> np.ndarray:
        return self.read.labels[self.sorted.new]

    def summary(self, problems: list[str] | None = None) -> str:
        """What was (or would be) added, skipped and refused (``problems``, by default the
        batch's own), in lines."""
        lines = []
        if self.sorted.new:
            per_class = ", ".join(f"{CLASSES[c]} {n}" for c, n in
                                  enumerate(np.bincount(self.new_labels, minlength=10)) if n)
            lines.append(f"add: {len(self.sorted.new)} images as batch "
                         f"{self.batch or '(none)'} ({per_class})")
        else:
            lines.append("add: nothing new")
        lines.append(f"skip: {len(self.sorted.repeated)} already in the training data or an "
                     "earlier batch with the same label")
        if self.check is not None:
            lines.append(f"label check: {self.check.describe()}")
        elif self.sorted.new:
            lines.append("label check: skipped, no model yet (models/fashionnet.pt and its "
                         "metrics/metrics.json)")
        lines += [f"refuse: {problem}" for problem in
                  (self.problems if problems is None else problems)]
        return "\n".join(lines)


def _known() -> dict[bytes, int]:
    """Key -> label of every image in the training data: the current training split (as the
    split stage last wrote it) and every batch of the manifest."""
    train = load_split(paths.PREPARED["train"])
    known = dict(zip(keys(train.images.numpy()), train.labels.tolist(), strict=True))
    for batch in manifest.read(paths.MANIFEST)["batch"]:
        images, labels = load_batch(paths.INCOMING_DIR / f"{batch}.npz")
        known.update(zip(keys(images), labels.tolist(), strict=True))
    return known


def _label_check(images: np.ndarray, labels: np.ndarray, params: Params) -> LabelCheck | None:
    """The current model (models/fashionnet.pt, with its validation accuracy in
    metrics/metrics.json) on the batch; None where there is no model yet."""
    if not (paths.MODEL.exists() and paths.METRICS_JSON.exists()) or not len(labels):
        return None
    from fashionnet.checkpoint import load_weights
    from fashionnet.model import FashionNet

    model = load_weights(paths.MODEL, FashionNet())
    val = json.loads(paths.METRICS_JSON.read_text(encoding="utf-8"))["accuracy"]["val"]
    data = LabeledImages(torch.from_numpy(np.ascontiguousarray(images)),
                         torch.from_numpy(labels.astype(np.int64)))
    wrong = int((evaluate(model, data).predictions != labels).sum())
    ratio = params.incoming.max_disagreement
    return LabelCheck(wrong, len(labels), 1 - val, disagreement_p_value(wrong, len(labels),
                                                                         1 - val, ratio), ratio)


def _problems(read: Labelled, found: Sorted) -> list[str]:
    """The refusals, one line each, naming the first file and counting the rest."""
    def line(what: str, where: list[int], detail: str = "") -> str:
        more = f" (and {len(where) - 1} more)" if len(where) > 1 else ""
        return f"{read.sources[where[0]]}: {what}{detail}{more}"

    problems = []
    for yardstick in ("validation", "test"):
        if where := [i for i, name in found.leaked if name == yardstick]:
            problems.append(line(f"is identical to a {yardstick} image: the yardstick would "
                                 "lie", where))
    if found.conflicting:
        i, other = found.conflicting[0]
        problems.append(line("is already labelled", [i for i, _ in found.conflicting],
                             f" {CLASSES[other]!r}, here {CLASSES[read.labels[i]]!r}"))
    return problems


def examine(paths_given: list[str | os.PathLike[str]], label: str | None = None,
            labels: str | os.PathLike[str] | None = None, params: Params | None = None
            ) -> Batch:
    """Read and check a batch, writing nothing. Files that cannot be read, unknown classes and
    an empty batch raise DataError; what the batch would be refused for is in ``problems``."""
    params = params or load_params()
    read = read_labelled_images(list(paths_given), label, labels)
    yardsticks = {name: keys(load_split(paths.PREPARED[split]).images.numpy())
                  for name, split in (("validation", "val"), ("test", "test"))}
    found = sort_batch(read.images, read.labels, _known(), yardsticks)
    check = _label_check(read.images[found.new], read.labels[found.new], params)
    problems = _problems(read, found)
    new = found.new
    name = batch_id(read.images[new], read.labels[new]) if new else None
    return Batch(read, found, check, [os.fspath(p) for p in paths_given], name,
                 problems=problems)


def _write(batch: Batch) -> None:
    """data/incoming/ with the batch added, swapped in whole (see the module's docstring)."""
    from pipeline.workspace import dvc, git

    live = paths.INCOMING_DIR
    with replaced_directory(live) as stage:
        new = batch.sorted.new
        images, labels = batch.read.images[new], batch.read.labels[new]
        file = save_batch(stage, images, labels)
        dvc("add", "--quiet", str(file), log=False)
        # core.autostage (.dvc/config) has just staged the copy's files in git's index: not
        # there, under a name that is about to go; `--push` stages data/incoming/ itself.
        git("reset", "--quiet", "--", str(stage))
        row = manifest.Row(batch.batch or "", datetime.now(timezone.utc).isoformat(
            timespec="seconds"), counts(labels), len(batch.sorted.repeated), batch.sources)
        write_text(stage / paths.MANIFEST.name,
                   manifest.write(manifest.append(manifest.read(live / paths.MANIFEST.name),
                                                  row)))


def ingest(paths_given: list[str | os.PathLike[str]], label: str | None = None,
           labels: str | os.PathLike[str] | None = None, dry_run: bool = False,
           push: bool = False, force: bool = False) -> Batch:
    """New labelled images into data/incoming/ (see the module's docstring); what was done.
    A refusal raises InputError naming the first bad file and counting the rest, and writes
    nothing; ``dry_run`` checks and reports, and writes nothing either way."""
    params = load_params()
    if push and not dry_run:
        from pipeline.sharing import check_push

        check_push()  # a remote or Prefect server missing: refused before any work
    with workspace_lock("ingest"):
        batch = examine(paths_given, label, labels, params)
        mislabelled = batch.check is not None and batch.check.refused
        blocking = list(batch.problems)
        if mislabelled and not force:
            blocking.append(f"{batch.sources[0]}: {batch.check.describe()}; check the labels, "
                            "or ingest with --force")
        if blocking:
            raise BatchRefused(batch, blocking)
        if dry_run:
            return batch
        if mislabelled:
            log.warning("--force: ingesting although %s", batch.check.describe())
        if batch.sorted.new:
            _write(batch)
        else:
            log.info("nothing new: %d images already in the training data", len(
                batch.sorted.repeated))
        if not push:
            return batch
        from pipeline.sharing import share_incoming

        # Also what an earlier ingest left unshared: run again, a failed push completes.
        return replace(batch, commit=share_incoming())


class BatchRefused(InputError):
    """The batch is refused; nothing was written."""

    def __init__(self, batch: Batch, problems: list[str]) -> None:
        self.batch, self.problems = batch, problems
        more = f" (and {len(problems) - 1} other problem{'s' if len(problems) > 2 else ''})" \
            if len(problems) > 1 else ""
        super().__init__(problems[0] + more)


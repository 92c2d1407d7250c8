"""What a retrain tells: its commit message, and its summary as Prefect artifacts (the verdict,
the deciding metric beside the reported ones, which stages made new results, every metric)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from io import StringIO
from typing import Any

import pandas as pd
import yaml
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline import paths
from pipeline.drift import Drift
from pipeline.gate import DECIDES
from pipeline.promotion import Candidate
from pipeline.workspace import dvc, show

REPORTED = "test"  # metrics.json's accuracy key shown beside the deciding one, never deciding
INCOMING = "incoming"  # the incoming batches' held-out images: shown, never deciding
FLOW_NAME = "fashionnet-retrain"


def _cell(value: object, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.4f}" if signed else f"{value:.4f}" if isinstance(value, float) else str(value)


def _change(key: str, old: Mapping[str, float] | None, new: Mapping[str, float]) -> str:
    if old is None or key not in old:
        return f"{new[key]:.4f} (nothing committed before)"
    return f"{old[key]:.4f} -> {new[key]:.4f} ({new[key] - old[key]:+.4f})"


def drift_text(drift: Drift, old: Mapping[str, float] | None) -> str:
    """One line on how HEAD's model did on the batches it had not trained on."""
    if drift.accuracy is None:
        return "Drift: no incoming batch is new to HEAD's model."
    val = "" if old is None else f" (its validation accuracy: {old[DECIDES]:.4f})"
    return (f"Drift: HEAD's model, before this retrain, on the {drift.images} images of the "
            f"{len(drift.batches)} incoming batches new to it ({', '.join(drift.batches)}): "
            f"accuracy {drift.accuracy:.4f}{val}.")


def commit_message(run: Candidate, overrides: Mapping[str, object],
                   old: Mapping[str, float] | None, new: Mapping[str, float]) -> str:
    """Subject: the run and the validation change; body: overrides, validation and test."""
    shown = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "none"
    return (f"Retrain {run.name}: validation accuracy {_change(DECIDES, old, new)}\n\n"
            f"Promoted by the {FLOW_NAME} flow from DVC experiment {run.name} ({run.rev[:8]}).\n"
            f"Overrides: {shown}\n"
            f"Validation accuracy: {_change(DECIDES, old, new)}, decided the gate\n"
            + (f"Incoming hold-out accuracy: {_change(INCOMING, old, new)}, reported only\n"
               if INCOMING in new else "")
            + f"Test accuracy: {_change(REPORTED, old, new)}, reported only\n")


def changed_stages(run: Candidate) -> dict[str, bool]:
    """Each stage of dvc.yaml: whether its dvc.lock entry (deps, params, outs) differs from
    the baseline's, i.e. whether the experiment produced a new result for it."""
    stages = yaml.safe_load(show(run.rev, "dvc.yaml") or "{}").get("stages", {})
    old, new = ((yaml.safe_load(show(rev, "dvc.lock") or "{}") or {}).get("stages", {})
                for rev in (run.baseline, run.rev))
    return {stage: old.get(stage) != new.get(stage) for stage in stages}


def metrics_diff(run: Candidate) -> dict[str, dict[str, Any]]:
    """`dvc metrics diff --all <baseline> <experiment>`: {path: {metric: {old, new, diff}}}."""
    return json.loads(dvc("metrics", "diff", "--all", "--json", run.baseline, run.rev,
                          log=False) or "{}")


def summary_markdown(run: Candidate, verdict: str, overrides: Mapping[str, object],
                     old: Mapping[str, float] | None, new: Mapping[str, float], rule: str,
                     stages: Mapping[str, bool], diff: Mapping[str, Mapping[str, Any]],
                     advice: str = "", drift: Drift | None = None) -> str:
    """The run's summary: verdict, the deciding metric and the reported ones, drift, stages,
    every metric. Paragraphs are single lines: the Prefect UI renders a source newline as a
    break."""
    lines = [f"# FashionNet retrain `{run.name}`: {verdict}", "",
             f"Decided by **validation accuracy** ({rule}); the accuracy on the incoming "
             "batches' held-out images and on the test set is reported beside it and never "
             "decides.", "",
             f"| Metric | HEAD ({run.baseline[:8]}) | This run ({run.rev[:8]}) | Change | Role |",
             "|---|---|---|---|---|"]
    for key, role in ((DECIDES, "decided the gate"), (INCOMING, "reported only"),
                      (REPORTED, "reported only")):
        before = None if old is None else old.get(key)
        after = new.get(key)
        if before is None and after is None:
            continue
        change = None if before is None or after is None else after - before
        lines.append(f"| accuracy.{key} | {_cell(before)} | {_cell(after)} | "
                     f"{_cell(change, signed=True)} | {role} |")
    if drift is not None:
        lines += ["", drift_text(drift, old)]
    shown = ", ".join(f"`{k}={v}`" for k, v in overrides.items()) or "none"
    lines += ["", f"Overrides: {shown}"]
    if advice:
        lines += ["", advice]
    lines += ["", "| Stage | Against HEAD |", "|---|---|"]
    lines += [f"| {stage} | {'new result' if did else 'same as HEAD'} |"
              for stage, did in stages.items()]
    lines += ["", "## Every metric (`dvc metrics diff --all`)", "",
              "| Path | Metric | HEAD | This run | Change |", "|---|---|---|---|---|"]
    for path, metrics in diff.items():
        for name, change in metrics.items():
            lines.append(f"| {path} | {name} | {_cell(change.get('old'))} | "
                         f"{_cell(change.get('new'))} | {_cell(change.get('diff'))} |")
    return "\n".join(lines) + "\n"


def publish(summary: str, run: Candidate) -> None:
    """The summary, the run's per-class table and report, as this flow run's artifacts."""
    create_markdown_artifact(summary, key="fashionnet-retrain-summary",
                             description="Retrain verdict: validation decides, test reported")
    if (table := show(run.rev, paths.CLASS_REPORT)) is not None:
        per_class = pd.read_csv(StringIO(table)).round(4).to_dict("records")
        create_table_artifact(per_class, key="fashionnet-retrain-per-class",
                              description="Per-class test metrics of the retrained model")
    if (report := show(run.rev, paths.REPORT)) is not None:
        create_markdown_artifact(report, key="fashionnet-retrain-report",
                                 description="reports/report.md of the retrained model")

"""The promotion gate of a retrain: validation accuracy decides, against the model at HEAD.

A drop of more than ``retrain.max_accuracy_drop`` refuses the candidate, and so does, when
``retrain.min_improvement`` is above 0, a gain smaller than it. Every other metric (test, the
incoming hold-out) is shown beside it and never decides: the validation split is the only one
the project chooses on.
"""

from __future__ import annotations

from enum import Enum

from pipeline.params import RetrainConfig

DECIDES = "val"  # metrics.json's accuracy key the gate reads


class Outcome(str, Enum):
    """How a retrain ended."""

    PROMOTED = "promoted"  # passed the gate; committed (and pushed) as the new HEAD
    UNCHANGED = "unchanged"  # passed the gate, but made exactly what HEAD holds
    NOT_APPLIED = "not applied"  # passed the gate; the workspace could not take it safely
    REFUSED = "refused"  # the gate refused it; HEAD's model stays


def judge(old: float | None, new: float, max_drop: float, min_improvement: float = 0.0
          ) -> str | None:
    """Why the gate refuses a validation accuracy of ``new`` after ``old``; None to pass.
    ``old`` None: nothing committed to compare with, which passes."""
    if old is None:
        return None
    change = round(new - old, 9)  # accuracies are k/N: no float noise at the threshold
    if -change > max_drop:
        return (f"validation accuracy fell by {-change:.4f} ({old:.4f} -> {new:.4f}), more "
                f"than retrain.max_accuracy_drop = {max_drop}")
    if min_improvement > 0 and change < min_improvement:
        return (f"validation accuracy changed by {change:+.4f} ({old:.4f} -> {new:.4f}), less "
                f"than retrain.min_improvement = {min_improvement}")
    return None


def rule(gate: RetrainConfig) -> str:
    """The gate's rule in words, for the summary."""
    text = f"a drop of at most retrain.max_accuracy_drop = {gate.max_accuracy_drop}"
    if gate.min_improvement > 0:
        text += f" and a gain of at least retrain.min_improvement = {gate.min_improvement}"
    return text + " against HEAD's"

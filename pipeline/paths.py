"""Where each stage reads and writes, relative to the repository root (dvc.yaml's outs).

tests/test_dvc.py checks that dvc.yaml declares exactly these paths.
"""

from pathlib import Path

from fashionnet.data import SPLITS

RAW_DIR = Path("data/raw")
# New labelled images (`fashionnet ingest`): one DVC-tracked <id>.npz per batch, and the
# manifest (in git) that lists them; split adds them to training, less a held-out share.
INCOMING_DIR = Path("data/incoming")
MANIFEST = INCOMING_DIR / "manifest.csv"
PREPARED_DIR = Path("data/prepared")
PREPARED = {name: PREPARED_DIR / f"{name}.npz" for name in SPLITS}
# The incoming batches' held-out images, written by split only when there are batches.
INCOMING_HOLDOUT = PREPARED_DIR / "incoming.npz"

MODEL = Path("models/fashionnet.pt")
ARTIFACT = "fashionnet"  # dvc.yaml's `artifacts:` entry for MODEL: the registry's name
TRAIN_INFO = Path("models/train_info.json")
# The train stage's state after each epoch, to resume an interrupted run. Neither a DVC out
# (DVC would delete it before rerunning the stage, the moment it is needed) nor in git.
CHECKPOINT = Path("checkpoints/train.pt")

METRICS_DIR = Path("metrics")
# The retraining demonstration's versions (docs/retraining-demo/demo.py), shown by the report.
RETRAINING_DEMO = Path("docs/retraining-demo/versions.csv")
HISTORY = METRICS_DIR / "history.csv"
METRICS_JSON = METRICS_DIR / "metrics.json"
ACCURACY = METRICS_DIR / "accuracy.csv"
CLASS_REPORT = METRICS_DIR / "classification_report.csv"
PREDICTIONS = METRICS_DIR / "predictions.csv"
# One row per training seed, written by `fashionnet seeds` (not a stage) and committed; the
# report stage reads it.
SEEDS = METRICS_DIR / "seeds.csv"
# One row per grid point of the last `fashionnet sweep` (not a stage), committed; the report
# stage reads it.
SWEEP = METRICS_DIR / "sweep.csv"


def recipe_seeds(name: str) -> Path:
    """`fashionnet seeds --recipe recipes/NAME.yaml`'s table, columns as in metrics/seeds.csv."""
    return METRICS_DIR / f"seeds-{name}.csv"


def recipe_recall(name: str) -> Path:
    """The same runs' test recall per class: one row per seed, one column per class."""
    return METRICS_DIR / f"seeds-{name}-recall.csv"


REPORTS_DIR = Path("reports")
REPORT = REPORTS_DIR / "report.md"
LEARNING_CURVES = REPORTS_DIR / "learning_curves.png"
CONFUSION_MATRIX = REPORTS_DIR / "confusion_matrix.png"

"""The ``fashionnet`` command line: its commands, their arguments and their help."""

from __future__ import annotations

import argparse

DESCRIPTION = ("FashionNet: one command per DVC stage, each run as a Prefect flow, and the "
               "commands around them (ingest, retrain, serve, seeds, sweep, predict)")
STAGE_HELP = {
    "download": "the four Fashion-MNIST IDX files into data/raw/, verified",
    "split": "stratified train/validation split + the official test set into data/prepared/",
    "train": "train FashionNet: models/, metrics/history.csv",
    "evaluate": "accuracy/loss on train, val and test; per-class report; predictions",
    "report": "reports/report.md and its figures",
}
RETRAIN_HELP = ("the retraining flow, once: a DVC experiment, gated on validation accuracy; a "
                "promoted run is committed (and pushed where remotes are configured)")
SERVE_HELP = ("serve the fashionnet-retrain/scheduled deployment in this workspace on "
              "schedule.cron until stopped")
PREDICT_HELP = ("classes and probabilities for image files, directories of them, .npz or IDX "
                "files, from the trained model")
SEEDS_HELP = ("the recipe once per training seed, as DVC experiments: metrics/seeds.csv, the "
              "report's spread over seeds, and the own train.seed's run applied to the workspace")
INGEST_HELP = ("new labelled images into data/incoming/ for training: refused (exit 2, "
               "nothing written) if unreadable, of an unknown class, leaking a validation or "
               "test image, or mislabelled; already known ones skipped")
SWEEP_HELP = ("a grid of params as DVC experiments, on this machine or on the workers of a "
              "Prefect work pool: metrics/sweep.csv")
POOL_HELP = ("run the experiments on the workers of this Prefect work pool (PREFECT_API_URL), "
             "shared through the git remote origin and the DVC remote (docs/distributed.md); "
             "default: DVC's local queue")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command."""
    parser = argparse.ArgumentParser(prog="fashionnet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sub.add_parser(name, help=f"DVC stage {name}: {text}", description=text)
    retrain = sub.add_parser("retrain", help=RETRAIN_HELP, description=RETRAIN_HELP)
    retrain.add_argument("--force", action="store_true",
                         help="rerun the train stage and all after it even if nothing changed")
    retrain.add_argument("--seed", type=int, help="train.seed for this run")
    retrain.add_argument("-S", "--set-param", dest="set_params", action="append", default=[],
                         type=_override, metavar="KEY=VALUE",
                         help="set a params.yaml key for this run, as dvc exp run -S does")
    retrain.add_argument("--name", help="the experiment's name (default: "
                         "retrain-<UTC date>-<HHMM>-manual)")
    sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    seeds = sub.add_parser("seeds", help=SEEDS_HELP, description=SEEDS_HELP)
    seeds.add_argument("seeds", nargs="*", type=int, metavar="SEED",
                       help="train.seed values (default: params.yaml's train.seed, 1, 2, 3)")
    seeds.add_argument("-j", "--jobs", type=_positive, default=1,
                       help="experiments run at a time (default 1)")
    seeds.add_argument("--threads", type=_positive,
                       help="torch CPU threads per experiment (default: torch's own); on a "
                            "2-core CPU, --jobs 2 --threads 1 trains fastest")
    seeds.add_argument("--pool", help=POOL_HELP)
    seeds.add_argument("--recipe", metavar="FILE",
                       help="a named recipe, e.g. recipes/plus.yaml: its section.key overrides "
                            "for every run; results to metrics/seeds-NAME.csv, nothing applied")
    sweep = sub.add_parser("sweep", help=SWEEP_HELP, description=SWEEP_HELP)
    sweep.add_argument("-S", "--set-param", dest="grid", action="append", default=[],
                       required=True, metavar="KEY=V1,V2,...",
                       help="a params.yaml key and its values; every combination runs")
    sweep.add_argument("--pool", help=POOL_HELP)
    sweep.add_argument("-j", "--jobs", type=_positive, default=1,
                       help="experiments run at a time by the local queue (default 1)")
    sweep.add_argument("--recipe", metavar="FILE",
                       help="a named recipe, e.g. recipes/plus.yaml: every point starts from "
                            "its overrides; experiments named NAME_<point>")
    predict = sub.add_parser("predict", help=PREDICT_HELP, description=PREDICT_HELP + ". "
                             "Photos are converted as Fashion-MNIST's images were made "
                             "(docs/predict.md); images already 28x28 are taken as they are.")
    predict.add_argument("paths", nargs="+", metavar="PATH",
                         help="an image file (anything Pillow reads), a directory (its images, "
                              ".npz and IDX files, recursively, sorted), an .npz or an IDX file "
                              "of 28x28 uint8 images")
    predict.add_argument("--model", default="models/fashionnet.pt",
                         metavar="FILE|prod|fashionnet@vX.Y.Z",
                         help="a FashionNet state_dict file (default: models/fashionnet.pt), "
                              "or a registered version: the one at a stage (prod) or a version "
                              "(fashionnet@v1.2.0), fetched through DVC (docs/retraining.md)")
    predict.add_argument("--top", type=_top_k, default=3, metavar="K",
                         help="the K most probable classes per image, 1-10 (default 3)")
    predict.add_argument("--format", choices=("table", "csv", "json"),
                         help="default: table on a terminal, csv otherwise")
    predict.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                         help="negate images to a light object on a dark background: auto "
                              "(default) does so when the image's border is light")
    predict.add_argument("--skip-bad", action="store_true",
                         help="report unreadable files on stderr and predict the rest")
    predict.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                         help="default cpu: reading the files, not the model, takes the time")
    predict.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                         default="auto", help="compute dtype; auto (default), as "
                         "train.precision's default and so as fashionnet evaluate's: bfloat16 "
                         "where the hardware has it natively, else float32")
    ingest = sub.add_parser("ingest", help=INGEST_HELP, description=INGEST_HELP + " "
                            "(docs/retraining.md).")
    ingest.add_argument("paths", nargs="+", metavar="PATH",
                        help="a directory of class subdirectories (0-9 or class slugs such as "
                             "ankle-boot), image files or directories with --label or "
                             "--labels, an .npz with images and labels, or an IDX image file "
                             "followed by its label file")
    source = ingest.add_mutually_exclusive_group()
    source.add_argument("--label", metavar="CLASS",
                        help="the class of every image given: 0-9, a slug or a class name")
    source.add_argument("--labels", metavar="FILE.csv",
                        help="a CSV of file,label rows, files relative to the CSV's folder")
    ingest.add_argument("--dry-run", action="store_true",
                        help="print what would be added, skipped and refused; write nothing")
    ingest.add_argument("--push", action="store_true",
                        help="then git commit, dvc push, git push, and emit the Prefect event "
                             "fashionnet.data.ingested that starts a retrain")
    ingest.add_argument("--force", action="store_true",
                        help="accept labels the current model disagrees with far more than "
                             "its validation error predicts (with a warning)")
    return parser


def _top_k(text: str) -> int:
    value = _positive(text)
    if value > 10:
        raise argparse.ArgumentTypeError(f"{text!r} is above 10, the number of classes")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1")
    return value


def _override(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as YAML (as params.yaml would hold it)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. train.seed=7)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None

"""The retraining demonstration of docs/retraining-demo.md, end to end through the CLI.

A model is trained on a 12,000-image subset of the official training images (split.limit) and
registered by its first retrain. The rest of the official training images, those neither the
subset nor validation uses, are written out as PNG files and ingested in 4 batches
(`fashionnet ingest --push`); after each, `fashionnet retrain` trains again on everything so
far with the reference recipe, and the validation gate decides. Before the third batch, a copy
of it with shuffled labels is offered and refused. Everything happens in a scratch clone with
its own git and DVC remotes; what it shows is written here: versions.csv and versions.png (one
row per retrain), gto-history.txt, metrics-diff.txt and demo.bundle (the clone's history, its
registry tags included: `git clone demo.bundle` and look around).

Run from the repository root, with a Prefect server for the runs (the reference recipe: an
estimated 1-1.5 hours on 2 cores; `--recipe recipes/fast.yaml`, the committed run: 19 minutes):

    python -m pipeline.prefect_server python docs/retraining-demo/demo.py
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

HERE = Path(__file__).resolve().parent
BATCHES = 4
ARTIFACT = "fashionnet"


def sh(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """A command as a user types it; its output echoed."""
    print(f"$ {' '.join(args)}", flush=True)
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    print(result.stdout[-2000:], result.stderr[-2000:], sep="", flush=True)
    if check and result.returncode:
        sys.exit(f"{args[0]} exited {result.returncode}")
    return result


def set_param(ws: Path, key: str, value: object) -> None:
    """Edit one key of params.yaml in place, keeping its comments."""
    value = json.dumps(value) if isinstance(value, bool) else value
    section, name = key.split(".")
    text = (ws / "params.yaml").read_text()
    block = re.search(rf"(?ms)^{section}:\n(.*?)(?=^\S)", text)
    assert block, section
    edited = re.sub(rf"(?m)^(  {name}: *)\S+", rf"\g<1>{value}", block[1], count=1)
    (ws / "params.yaml").write_text(text.replace(block[1], edited))


def start_afresh(ws: Path) -> None:
    """The clone as a project that has not run yet: no dvc.lock, no stage outputs, and the
    seeds', sweep's and this demonstration's tables empty (the report reads them)."""
    import yaml

    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"].values()
    outs = [next(iter(o)) if isinstance(o, dict) else o
            for stage in stages for key in ("outs", "metrics") for o in stage.get(key, [])]
    tracked = set(sh(ws, "git", "ls-files").stdout.split())
    sh(ws, "git", "rm", "-q", "dvc.lock", *(o for o in outs if o in tracked))
    for table in ("metrics/seeds.csv", "metrics/sweep.csv", "docs/retraining-demo/versions.csv"):
        header = (ws / table).read_text().splitlines()[0]
        (ws / table).write_text(header + "\n")
    sh(ws, "git", "commit", "-qam", "Demo: a project that has not run yet")


def write_pngs(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / str(int(label)) / f"{i:05d}.png")
    return root


def retrain(ws: Path, name: str, batches: int, drift: float | None) -> dict[str, object]:
    """`fashionnet retrain --name NAME`, and what it made: the candidate's metrics and training
    images, the gate's outcome, and the version it was registered as if promoted."""
    import dvc.api

    baseline = sh(ws, "git", "rev-parse", "HEAD").stdout.strip()
    done = sh(ws, "fashionnet", "retrain", "--name", name, check=False)
    candidate = sh(ws, "git", "rev-parse", f"refs/exps/{baseline[:2]}/{baseline[2:]}/{name}"
                   ).stdout.strip()
    metrics = json.loads(sh(ws, "git", "show", f"{candidate}:metrics/metrics.json").stdout)
    info = json.loads(dvc.api.read("models/train_info.json", repo=str(ws), rev=candidate))
    head = sh(ws, "git", "rev-parse", "HEAD").stdout.strip()
    tags = sh(ws, "git", "tag", "--points-at", head).stdout.split() if head != baseline else []
    return {"version": next((t.split("@")[1] for t in tags if "@" in t), "-"),
            "outcome": "refused" if done.returncode else "promoted", "experiment": name,
            "batches": batches, "train_images": info["train_images"],
            "val_accuracy": metrics["accuracy"]["val"],
            "test_accuracy": metrics["accuracy"]["test"],
            "incoming_accuracy": metrics["accuracy"].get("incoming"), "drift_accuracy": drift}


def plot(table: pd.DataFrame, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    shown = table[table["version"] != "-"]
    for column, label in (("val_accuracy", "validation (decides)"), ("test_accuracy", "test"),
                          ("incoming_accuracy", "incoming hold-out")):
        ax.plot(shown["version"], shown[column] * 100, marker="o", label=label)
    ax.set_xlabel("registered version")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Each version after one more batch of new images")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fashionnet-retraining-demo"))
    parser.add_argument("--limit", type=int, default=12_000, help="the first model's images")
    parser.add_argument("--epochs", type=int, default=None, help="default: params.yaml's")
    parser.add_argument("--per-batch", type=int, default=0,
                        help="images per batch (default: all the rest, in 4 batches)")
    parser.add_argument("--recipe", default="",
                        help="a recipe applied to params.yaml, for a shorter run: "
                             "recipes/fast.yaml takes a quarter of the time")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    if not os.environ.get("PREFECT_API_URL"):
        sys.exit("run it under `python -m pipeline.prefect_server`: ingest --push emits an event")
    root = Path.cwd()
    shutil.rmtree(args.work, ignore_errors=True)
    origin, storage, ws = args.work / "origin.git", args.work / "storage", args.work / "ws"
    sh(args.work.parent, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    sh(args.work, "git", "clone", "-q", str(root), str(ws))
    sh(ws, "git", "checkout", "-q", "-B", "main")
    sh(ws, "git", "remote", "set-url", "origin", str(origin))
    start_afresh(ws)
    set_param(ws, "split.limit", args.limit)
    if args.recipe:
        from pipeline.params import load_recipe

        for key, value in load_recipe(args.recipe).items():
            set_param(ws, key, value)
    if args.epochs:
        set_param(ws, "train.epochs", args.epochs)
    sh(ws, "dvc", "remote", "add", "-d", "storage", str(storage))
    sh(ws, "git", "commit", "-qam", f"Demo: the first model sees {args.limit:,} training images")
    sh(ws, "git", "push", "-q", "-u", "origin", "main")
    rows = [retrain(ws, "demo-subset", 0, None)]

    # The official training images neither the subset nor validation uses, in 4 batches.
    split = {name: np.load(ws / "data" / "prepared" / f"{name}.npz") for name in ("train", "val")}
    from fashionnet.idx import load_raw

    train_full, _ = load_raw(ws / "data" / "raw")
    used = np.concatenate([split["train"]["index"], split["val"]["index"]])
    rest = np.random.default_rng(0).permutation(np.setdiff1d(np.arange(len(train_full)), used))
    if args.per_batch:
        rest = rest[: args.per_batch * BATCHES]
    parts = np.array_split(rest, BATCHES)
    refused = ""
    for k, part in enumerate(parts, 1):
        images, labels = train_full.images[part].numpy(), train_full.labels[part].numpy()
        if k == 3:  # a labelling mistake: the same images, labels shuffled
            shuffled = np.random.default_rng(1).permutation(labels)
            bad = write_pngs(args.work / "shuffled", images, shuffled)
            offered = sh(ws, "fashionnet", "ingest", str(bad), "--push", check=False)
            if offered.returncode != 2:
                sys.exit("the shuffled batch was not refused")
            refused = offered.stderr
        source = write_pngs(args.work / f"batch-{k}", images, labels)
        sh(ws, "fashionnet", "ingest", str(source), "--push")
        os.chdir(ws)
        from pipeline.drift import measure

        drift = measure("HEAD").accuracy
        os.chdir(root)
        rows.append(retrain(ws, f"demo-batch-{k}", k, drift))

    args.out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "versions.csv", index=False)
    plot(table, args.out / "versions.png")
    (args.out / "refused.txt").write_text(refused)
    (args.out / "gto-history.txt").write_text(sh(ws, "gto", "history").stdout)
    versions = [v for v in table["version"] if v != "-"]
    (args.out / "metrics-diff.txt").write_text(sh(
        ws, "dvc", "metrics", "diff", f"{ARTIFACT}@{versions[0]}", f"{ARTIFACT}@{versions[-1]}",
        "--md").stdout)
    sh(ws, "git", "bundle", "create", str(args.out / "demo.bundle"), "--all")
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()

"""The recipe ablation: train once, measure every post-hoc variant on validation only.

    python research/ablation.py NAME -S train.epochs=15 -S train.flip=random ... [--out CSV]
    python research/ablation.py --table [--out CSV]     # the tables of research/README.md

Trains FashionNet on the train split with params.yaml's recipe and the ``-S`` overrides (as
`dvc exp run -S` would set them), then appends one row per post-hoc variant to ``--out``
(default research/results/ablation.csv): the trained weights or their EMA (when ``train.ema`` > 0),
BatchNorm statistics as trained or recalibrated, one view or flip test-time augmentation. The
EMA, recalibration and TTA cost no extra training: the online weights of a run with an EMA are
those of the same run without one (the average draws no random numbers), so one run measures
them all. ``train.bn_recalibrate`` is measured both ways whatever it is set to.

The test split is never loaded: the recipe is chosen here, on validation accuracy alone, and
the test set is used once, for the chosen recipe (`fashionnet seeds --recipe`). The splits are
the split stage's (params.yaml's ``split``), read from data/prepared when it is there, else
computed from the raw files exactly as the split stage computes them.
"""

from __future__ import annotations

import argparse
import copy
import csv
import logging
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import yaml

from fashionnet.data import LabeledImages, load_split
from fashionnet.evaluate import evaluate
from fashionnet.idx import load_raw
from fashionnet.model import FashionNet
from fashionnet.runtime import resolve_device, resolve_precision
from fashionnet.split import stratified_split
from fashionnet.train import init_model, recalibrate_batchnorm, train
from pipeline import paths
from pipeline.params import load_params

COLUMNS = ["name", "seed", "weights", "bn", "tta", "val_accuracy", "val_loss", "final_epoch_val",
           "epochs", "overrides", "train_seconds", "started", "threads", "machine"]
RAW_DIRS = (paths.RAW_DIR, Path("/usr/share/datasets/fashion-mnist"))


def train_val(params) -> tuple[LabeledImages, LabeledImages]:
    """The split stage's train and validation splits."""
    if all(paths.PREPARED[s].exists() for s in ("train", "val")):
        return load_split(paths.PREPARED["train"]), load_split(paths.PREPARED["val"])
    raw = next(d for d in RAW_DIRS if d.is_dir() and any(d.iterdir()))
    train_full, _ = load_raw(raw)
    train_idx, val_idx = stratified_split(train_full.labels.numpy(), params.split)
    return train_full.subset(train_idx), train_full.subset(val_idx)


VARIANTS = {  # table column: (weights, bn, tta)
    "as trained": ("online", "trained", False),
    "+ BN recal.": ("online", "recalibrated", False),
    "+ EMA": ("ema", "trained", False),
    "+ EMA + BN recal.": ("ema", "recalibrated", False),
    "+ flip TTA": ("online", "trained", True),
    "+ BN recal. + flip TTA": ("online", "recalibrated", True),
}


def table(path: Path) -> str:
    """Validation accuracy per configuration (runs named CONFIG-sN) and post-hoc variant:
    mean ± std over seeds (n - 1), in percent, with each configuration's overrides."""
    import pandas as pd

    frame = pd.read_csv(path)
    frame["config"] = frame["name"].str.replace(r"-s\d+$", "", regex=True)
    lines = ["| configuration | seeds | " + " | ".join(VARIANTS) + " | minutes per run |",
             "|---|---|" + "---|" * len(VARIANTS) + "---|"]
    for config, runs in frame.groupby("config", sort=False):
        cells = []
        for weights, bn, tta in VARIANTS.values():
            values = runs[(runs["weights"] == weights) & (runs["bn"] == bn)
                          & (runs["tta"] == tta)]["val_accuracy"] * 100
            cells.append("-" if values.empty else f"{values.mean():.2f}" + (
                f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""))
        seeds = ", ".join(str(s) for s in sorted(runs["seed"].unique()))
        minutes = runs.groupby("seed")["train_seconds"].first().mean() / 60
        lines.append(f"| {config} | {seeds} | " + " | ".join(cells) + f" | {minutes:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("name", nargs="?", help="the configuration's name in the table")
    parser.add_argument("--table", action="store_true", help="print the table of --out")
    parser.add_argument("-S", "--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a params override, as for dvc exp run -S (YAML value)")
    parser.add_argument("--out", type=Path, default=Path("research/results/ablation.csv"))
    parser.add_argument("--save-models", type=Path, metavar="DIR",
                        help="also save each trained weights' state_dict as DIR/NAME-WEIGHTS.pt "
                             "(online; ema when train.ema > 0), for research/recipe_search.py")
    args = parser.parse_args(argv)
    if args.table:
        print(table(args.out))
        return
    if args.name is None:
        parser.error("a configuration NAME is needed (or --table)")
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = yaml.safe_load(value)
    params = load_params(overrides=overrides)
    cfg = params.train
    device = resolve_device(cfg.device)
    dtype = resolve_precision(cfg.precision, device)
    train_set, val_set = train_val(params)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    model = init_model(cfg.seed)
    online: dict[str, FashionNet] = {}
    begin = time.perf_counter()
    history = train(model, train_set, val_set, cfg.model_copy(update={"bn_recalibrate": False}),
                    on_trained=lambda m: online.setdefault("model", copy.deepcopy(m)))
    seconds = time.perf_counter() - begin
    weights = {"online": online["model"]}
    if cfg.ema > 0:
        weights["ema"] = model
    if args.save_models is not None:
        args.save_models.mkdir(parents=True, exist_ok=True)
        for kind, net in weights.items():
            torch.save(net.state_dict(), args.save_models / f"{args.name}-{kind}.pt")
    images = train_set.images.to(device)
    rows = []
    for kind, net in weights.items():
        net.to(device, memory_format=torch.channels_last)
        recalibrated = copy.deepcopy(net)
        recalibrate_batchnorm(recalibrated, images, dtype=dtype)
        for bn, variant in (("trained", net), ("recalibrated", recalibrated)):
            for tta in (False, True):
                result = evaluate(variant, val_set, device, dtype=dtype, tta=tta)
                rows.append({
                    "name": args.name, "seed": cfg.seed, "weights": kind, "bn": bn, "tta": tta,
                    "val_accuracy": result.accuracy, "val_loss": round(result.loss, 5),
                    "final_epoch_val": history[-1].val_accuracy, "epochs": cfg.epochs,
                    "overrides": " ".join(f"{k}={v}" for k, v in overrides.items()),
                    "train_seconds": round(seconds, 1), "started": started,
                    "threads": torch.get_num_threads(),
                    "machine": f"{platform.processor() or platform.machine()} {device.type} "
                               f"{str(dtype).removeprefix('torch.')}",
                })
    new = not args.out.exists()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    for row in rows:
        print(f"{row['name']} seed {row['seed']} {row['weights']:6} bn {row['bn']:12} "
              f"tta {row['tta']!s:5} val {row['val_accuracy']:.4f}", file=sys.stderr)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()

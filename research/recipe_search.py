"""The recipe search within a time budget: many ablation runs at once, the choice made on
validation accuracy alone, then the test set for the chosen recipe and the reference recipe.

    python research/recipe_search.py --grid research/recipe_grid.yaml --out DIR \\
        [--seeds 1 2] [--final-seeds 3 4] [--jobs 12] [--budget 540]

Written for a lent GPU machine (one short call, research/README.md), where one 60-epoch run is
launch-bound and a dozen share the GPU; it runs anywhere. Our own orchestration rather than
``dvc exp run --queue``: that machine has no DVC, no git history and no time to spare, and
the runs must stop at a deadline with whatever they finished written down.

1. ``solo``: the reference recipe for ``--solo-epochs`` alone on the machine: the epoch time,
   and a check that the machine can train at all before a dozen runs start.
2. Phase 1: every grid configuration (``name: {key: value}`` overrides, in priority order,
   the reference recipe first) for each of ``--seeds``, through research/ablation.py:
   validation only, every post-hoc variant (EMA, BatchNorm recalibration, flip TTA), models
   saved.
3. The choice: the (configuration, variant) with the best mean validation accuracy among the
   configurations that finished every seed. Nothing here reads the test set before this.
4. Phase 2: the chosen configuration and ``reference`` (the reference recipe) for
   ``--final-seeds``.
5. Test accuracy for those two recipes only, every seed with a saved model, each with its
   variant: DIR/final.csv.

Everything is appended to DIR as it finishes, so a run cut short still leaves its results.
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from ablation import COLUMNS as ABLATION_COLUMNS

HERE = Path(__file__).resolve().parent
REFERENCE = "reference"  # the grid's name for the reference recipe (StepLR, no options)
FINAL_COLUMNS = ["recipe", "config", "seed", "weights", "bn", "tta", "val_accuracy",
                 "test_accuracy", "overrides", "train_seconds", "machine"]


class Pool:
    """At most ``jobs`` ablation runs at once, each a process group of its own, so a deadline
    can stop one with everything it started."""

    def __init__(self, jobs: int, log_dir: Path) -> None:
        self.jobs, self.log_dir = jobs, log_dir
        self.running: dict[str, subprocess.Popen] = {}
        self.started: dict[str, float] = {}
        self.longest = 0.0  # the longest a finished run took: none starts that can't finish

    def start(self, name: str, args: list[str]) -> None:
        with (self.log_dir / f"{name}.log").open("w") as log:  # the child keeps its own copy
            self.running[name] = subprocess.Popen(
                [sys.executable, str(HERE / "ablation.py"), name, *args], stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)
        self.started[name] = time.monotonic()
        print(f"{time.strftime('%H:%M:%S')} start {name}", flush=True)

    def reap(self) -> None:
        for name, proc in list(self.running.items()):
            if proc.poll() is not None:
                del self.running[name]
                self.longest = max(self.longest, time.monotonic() - self.started[name])
                print(f"{time.strftime('%H:%M:%S')} done  {name} (exit {proc.returncode})",
                      flush=True)

    def run(self, jobs: list[tuple[str, list[str]]], stop_at: float) -> None:
        """Run ``jobs`` in order; start none too late to finish by ``stop_at`` (monotonic
        seconds) going by the longest finished run, and stop all at ``stop_at``."""
        queue = list(jobs)
        while queue or self.running:
            self.reap()
            latest = stop_at - self.longest
            while queue and len(self.running) < self.jobs and time.monotonic() < latest:
                self.start(*queue.pop(0))
            if time.monotonic() >= latest and queue:
                print(f"not started (no time left): {', '.join(n for n, _ in queue)}",
                      flush=True)
                queue.clear()
            if time.monotonic() >= stop_at:
                self.stop()
                return
            time.sleep(0.5)  # polling a handful of children; nothing to wait on in common

    def stop(self) -> None:
        for name, proc in self.running.items():
            print(f"{time.strftime('%H:%M:%S')} stop  {name} (deadline)", flush=True)
            os.killpg(proc.pid, signal.SIGINT)
        for proc in self.running.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.running.clear()


def overrides_args(overrides: dict, seed: int) -> list[str]:
    """``-S key=value`` arguments for ablation.py, which reads each value as YAML."""
    return [a for k, v in {**overrides, "train.seed": seed}.items() for a in ("-S", f"{k}={v}")]


def final_jobs(config: str, grid: dict, seeds: list[int],
               common: list[str]) -> list[tuple[str, list[str]]]:
    """Phase 2's runs: ``config`` and the reference recipe (once if they are the same), seed by
    seed, so that a deadline leaves both with the same seeds."""
    return [(f"{c}-s{seed}", overrides_args(grid[c], seed) + common)
            for seed in seeds for c in dict.fromkeys([config, REFERENCE])]


def choose(ablation: Path, grid: dict,
           seeds: list[int]) -> tuple[str, str, str, bool, float] | None:
    """The best (config, weights, bn, tta) by mean validation accuracy over ``seeds``, among
    configurations that finished all of them, and that mean; None if none finished."""
    import pandas as pd

    if not ablation.exists():
        return None
    frame = pd.read_csv(ablation)
    frame["config"] = frame["name"].str.replace(r"-s\d+$", "", regex=True)
    frame = frame[frame["config"].isin(grid) & frame["seed"].isin(seeds)]
    complete = frame.groupby("config")["seed"].nunique()
    frame = frame[frame["config"].isin(complete[complete == len(seeds)].index)]
    means = frame.groupby(["config", "weights", "bn", "tta"])["val_accuracy"].mean()
    if means.empty:
        return None
    config, weights, bn, tta = means.idxmax()
    return config, weights, bn, bool(tta), float(means.max())


def test_rows(out: Path, grid: dict, recipes: dict[str, tuple[str, str, str, bool]]) -> None:
    """Test accuracy of each saved model of the chosen recipes, appended to out/final.csv."""
    import platform

    import pandas as pd
    import torch
    from ablation import RAW_DIRS, train_val

    from fashionnet.data import load_split
    from fashionnet.evaluate import evaluate
    from fashionnet.idx import load_raw
    from fashionnet.model import FashionNet
    from fashionnet.runtime import resolve_device, resolve_precision
    from fashionnet.train import recalibrate_batchnorm
    from pipeline import paths
    from pipeline.params import load_params

    if paths.PREPARED["test"].exists():
        test = load_split(paths.PREPARED["test"])
    else:
        test = load_raw(next(d for d in RAW_DIRS if d.is_dir() and any(d.iterdir())))[1]
    ablation = pd.read_csv(out / "ablation.csv")
    path = out / "final.csv"
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, FINAL_COLUMNS)
        if new:
            writer.writeheader()
        for recipe, (config, weights, bn, tta) in recipes.items():
            params = load_params(overrides=grid[config])
            device = resolve_device(params.train.device)
            dtype = resolve_precision(params.train.precision, device)
            train_images = train_val(params)[0].images.to(device)
            for run in sorted(ablation[ablation["name"].str.fullmatch(rf"{re.escape(config)}-s\d+")]
                              ["name"].unique()):
                state = out / "models" / f"{run}-{weights}.pt"
                if not state.exists():
                    continue
                model = FashionNet()
                model.load_state_dict(torch.load(state, map_location="cpu"))
                model.to(device, memory_format=torch.channels_last)
                if bn == "recalibrated":
                    recalibrate_batchnorm(model, train_images, dtype=dtype)
                row = ablation[(ablation["name"] == run) & (ablation["weights"] == weights)
                               & (ablation["bn"] == bn) & (ablation["tta"] == tta)].iloc[0]
                result = evaluate(model, test, device, dtype=dtype, tta=tta)
                writer.writerow({
                    "recipe": recipe, "config": config, "seed": int(row["seed"]),
                    "weights": weights, "bn": bn, "tta": tta,
                    "val_accuracy": row["val_accuracy"], "test_accuracy": result.accuracy,
                    "overrides": " ".join(f"{k}={v}" for k, v in grid[config].items()),
                    "train_seconds": row["train_seconds"],
                    "machine": " ".join([platform.machine(), device.type, *(
                        [torch.cuda.get_device_name()] if device.type == "cuda" else []),
                        str(dtype).removeprefix("torch.")])})
                f.flush()
                print(f"{recipe}: {run} test {result.accuracy:.4f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--final-seeds", type=int, nargs="*", default=[3, 4])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--budget", type=float, default=540, help="seconds for all of it")
    parser.add_argument("--final-share", type=float, default=0.3,
                        help="the budget's share kept for phase 2 and the test")
    parser.add_argument("--solo-epochs", type=int, default=3,
                        help="epochs of the reference recipe run alone first; 0 = none")
    parser.add_argument("--test-reserve", type=float, default=30,
                        help="seconds kept at the end for the test-set evaluation")
    args = parser.parse_args(argv)
    begin = time.monotonic()
    end = begin + args.budget
    grid = yaml.safe_load(args.grid.read_text())
    if REFERENCE not in grid:
        parser.error(f"the grid needs the reference recipe, named {REFERENCE!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "logs").mkdir(exist_ok=True)
    common = ["--out", str(args.out / "ablation.csv"), "--save-models", str(args.out / "models")]
    if not (args.out / "ablation.csv").exists():  # its header, before runs ending at once race
        with (args.out / "ablation.csv").open("w", newline="") as f:
            csv.writer(f).writerow(ABLATION_COLUMNS)

    if args.solo_epochs > 0:
        solo_overrides = {**grid[REFERENCE], "train.epochs": args.solo_epochs, "train.ema": 0}
        Pool(1, args.out / "logs").run([("solo", [*overrides_args(solo_overrides, 42), "--out",
                                                  str(args.out / "solo.csv")])], end)
        if not (args.out / "solo.csv").exists():
            sys.exit("the solo run failed:\n"
                     + (args.out / "logs" / "solo.log").read_text()[-3000:])

    phase1_end = end - args.final_share * args.budget
    order = [REFERENCE, *(name for name in grid if name != REFERENCE)]  # the reference first
    jobs = [(f"{name}-s{seed}", overrides_args(grid[name], seed) + common)
            for name in order for seed in args.seeds]
    Pool(args.jobs, args.out / "logs").run(jobs, phase1_end)

    chosen = choose(args.out / "ablation.csv", grid, args.seeds)
    if chosen is None:
        sys.exit("no configuration finished all its seeds in time: nothing to choose")
    config, weights, bn, tta, val = chosen
    print(f"chosen on validation: {config} weights {weights} bn {bn} tta {tta} "
          f"(mean val {val:.4f})", flush=True)
    (args.out / "chosen.yaml").write_text(yaml.safe_dump(
        {"config": config, "weights": weights, "bn": bn, "tta": tta, "mean_val": val,
         "overrides": grid[config]}, sort_keys=False))
    recipes = {"chosen": (config, weights, bn, tta),
               "reference recipe": (REFERENCE, "online", "trained", False)}
    finals = final_jobs(config, grid, args.final_seeds, common)
    phase2_end = end - args.test_reserve
    Pool(args.jobs, args.out / "logs").run(finals, phase2_end)
    test_rows(args.out, grid, recipes)
    print(f"all done in {time.monotonic() - begin:.0f} s", flush=True)


if __name__ == "__main__":
    main()

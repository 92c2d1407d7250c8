"""The kill -9 tests' child: the train stage's library call on a prepared split, killing itself
with SIGKILL at a chosen point. ``python -m tests.train_child WORK [POINT]``, POINT one of:

- ``after-save:K``  just after checkpoint K is on disk
- ``mid-save:K``    while checkpoint K is being written: half its bytes in the temporary file
- ``step:S``        just after optimizer step S of this process (mid-epoch)
- ``validate:K``    at the start of the validation pass of the K-th epoch this process trains,
                    before its checkpoint

Writes WORK/result.pt (history and weights) when it is not killed.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from fashionnet import train as train_module
from fashionnet.data import load_split
from fashionnet.recipe import TrainConfig
from fashionnet.train import init_model, train

CFG = TrainConfig(epochs=3, batch_size=24, step_size=2, device="cpu")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(point: str) -> None:
    """Patch the real code path so the process kills itself at ``point``."""
    kind, n = point.split(":")
    n = int(n)
    if kind == "after-save":
        save = train_module.save_checkpoint

        def save_then_die(path, state, run):
            save(path, state, run)
            if state["epoch"] == n:
                die()

        train_module.save_checkpoint = save_then_die
    elif kind == "mid-save":
        torch_save = torch.save

        def half_then_die(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and obj.get("state", {}).get("epoch") == n:
                buffer = io.BytesIO()
                torch_save(obj, buffer, *args, **kwargs)
                Path(f).write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                die()
            torch_save(obj, f, *args, **kwargs)

        torch.save = half_then_die
    elif kind == "step":
        step = torch.optim.AdamW.step
        count = 0

        def step_then_die(self, *args, **kwargs):
            nonlocal count
            result = step(self, *args, **kwargs)
            count += 1
            if count == n:
                die()
            return result

        torch.optim.AdamW.step = step_then_die
    elif kind == "validate":
        evaluate = train_module.evaluate
        calls = 0

        def die_at_validation(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == n:
                die()
            return evaluate(*args, **kwargs)

        train_module.evaluate = die_at_validation
    else:
        raise SystemExit(f"unknown kill point {point!r}")


def main(work: Path, point: str | None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    train_set, val_set = load_split(work / "train.npz"), load_split(work / "val.npz")
    if point:
        arm(point)
    model = init_model(CFG.seed)
    history = train(model, train_set, val_set, CFG, work / "checkpoints" / "train.pt")
    rows = [{k: v for k, v in asdict(s).items() if k != "seconds"} for s in history]
    torch.save({"history": rows, "model": model.state_dict()}, work / "result.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else None)

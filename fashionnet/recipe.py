"""The training recipe: params.yaml's ``train`` section as a validated, frozen model, and one
epoch's figures. Its defaults are the reference recipe (batch size aside, which the reference
does not give); the options beyond it are described in docs/recipe.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt

from fashionnet.augment import FLIPS
from fashionnet.fields import Number, Seed


def _renamed_flip(value: object) -> object:
    if value == "symmetric":  # the name until 2026-12: it never meant mirror symmetry
        raise ValueError("'symmetric' is now called 'random-except-footwear' (random flips, "
                         "never of the footwear classes)")
    return value


class TrainConfig(BaseModel):
    """The training recipe; its defaults are the reference recipe (batch size aside: not given)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: StrictInt = Field(60, ge=1)
    batch_size: StrictInt = Field(64, ge=2)  # BatchNorm needs two images to train
    lr: Number = Field(3e-3, gt=0)
    weight_decay: Number = Field(1e-5, ge=0)
    amsgrad: StrictBool = True
    step_size: StrictInt = Field(25, ge=1, description="epochs between learning-rate decays")
    gamma: Number = Field(0.1, gt=0, le=1)
    seed: Seed = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # see runtime.resolve_precision
    # Recipe options beyond the reference's; each default is the reference recipe (docs/recipe.md).
    schedule: Literal["step", "cosine", "onecycle"] = Field(
        "step", description="step: StepLR(step_size, gamma) per epoch; cosine: cosine decay "
        "from lr to 0 per step; onecycle: OneCycleLR up to lr and down, per step")
    flip: Annotated[Literal[FLIPS], BeforeValidator(_renamed_flip)] = Field(  # type: ignore[valid-type]
        "none", description="horizontal flip: none, random (p=1/2), alternate (airbench), "
        "random-except-footwear (random, but never the footwear classes, which face one way)")
    translate: StrictInt = Field(0, ge=0, le=4, description="max shift in pixels, zero fill")
    label_smoothing: Number = Field(0.0, ge=0, lt=1)
    ema: Number = Field(0.0, ge=0, lt=1, description="per-step decay of an exponential moving "
                        "average of the weights, which becomes the model; 0 = off")
    bn_recalibrate: StrictBool = Field(False, description="after training, recompute BatchNorm "
                                       "running statistics over the train split, dropout off")


@dataclass(frozen=True)
class EpochStats:
    """One row of metrics/history.csv. Train figures are running means over the epoch's
    steps (training mode, dropout on); validation is measured after the epoch in eval mode."""

    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    lr: float
    seconds: float

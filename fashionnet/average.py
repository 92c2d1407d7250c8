"""The exponential moving average of the weights (``train.ema``), updated without host syncs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage(AveragedModel):
    """torch's EMA of a model's parameters and buffers, updated on the device alone.

    ``AveragedModel.update_parameters`` asks ``n_averaged == 0`` and ``n_averaged > 0`` and
    copies ``n_averaged`` to the model's device at every update: on a GPU the copy waits for
    the device's queue, once a training step. Here the host knows whether the average has
    started. The arithmetic (torch's EMA function on the same groups of tensors) and the
    state_dict are ``AveragedModel``'s, so are the averages and the checkpoints.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        # The buffers too: the average's BatchNorm statistics then follow its weights.
        super().__init__(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.started = False  # whether n_averaged > 0; n_averaged stays on the host

    @torch.no_grad()
    def update_parameters(self, model: nn.Module) -> None:
        """Average ``model``'s parameters and buffers in; the first update copies them."""
        averages = [*self.module.parameters(), *self.module.buffers()]
        currents = [*model.parameters(), *model.buffers()]
        if not self.started:
            for average, current in zip(averages, currents, strict=True):
                average.copy_(current)
            self.started = True
        else:
            # torch's EMA function takes one device and dtype per call (lerp for floats).
            groups: dict[tuple[torch.device, torch.dtype], tuple[list, list]] = {}
            for average, current in zip(averages, currents, strict=True):
                group = groups.setdefault((average.device, average.dtype), ([], []))
                group[0].append(average)
                group[1].append(current)
            for group_averages, group_currents in groups.values():
                self.multi_avg_fn(group_averages, group_currents, self.n_averaged)
        self.n_averaged += 1

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``AveragedModel``'s state, and whether it has started (one read, on the host)."""
        result = super().load_state_dict(state_dict, strict, assign)
        self.started = bool(self.n_averaged > 0)
        return result

"""The training loop and its device: the split lives there, nothing is read back per step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode
from tqdm import tqdm

from fashionnet import FashionNet
from fashionnet import train as train_module
from fashionnet.augment import draw_epoch
from fashionnet.average import WeightAverage
from fashionnet.recipe import TrainConfig
from fashionnet.run_state import fresh_run
from fashionnet.train import init_model, train, train_epoch

BATCH = 64
STEPS = 4  # steps an epoch in these tests


class HostReads(TorchDispatchMode):
    """Records each value the host reads out of a tensor (``item``, ``float``, ``int``, ``bool``,
    printing: all end in ``aten._local_scalar_dense``) with the optimizer steps done by then.
    On a GPU each such read waits for the device to finish its queue. Reads of AdamW's step
    counts are left out: torch keeps them on the host even for GPU parameters (not capturable)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        super().__init__()
        self.optimizer, self.steps, self.reads = optimizer, 0, []
        optimizer.register_step_post_hook(lambda *_: setattr(self, "steps", self.steps + 1))

    def record(self, tensor: torch.Tensor, value: object) -> None:
        if not any(tensor is state.get("step") for state in self.optimizer.state.values()):
            self.reads.append((self.steps, value))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.record(args[0], out)
        return out


def watch_reads(monkeypatch: pytest.MonkeyPatch, optimizer: torch.optim.Optimizer) -> HostReads:
    """A :class:`HostReads` that also records ``tolist``, ``numpy`` and ``cpu`` (which read
    a CPU tensor's memory without an op to intercept); the progress bar drawn, as in a
    terminal, so that whatever it shows is computed."""
    mode = HostReads(optimizer)
    for name in ("tolist", "numpy", "cpu"):
        method = getattr(torch.Tensor, name)

        def reading(tensor, *args, _method=method, **kwargs):
            mode.record(tensor, f"{_method.__name__}()")
            return _method(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, reading)
    monkeypatch.setattr(train_module, "tqdm", lambda *a, **k: tqdm(*a, **{**k, "disable": False}))
    return mode


@pytest.mark.parametrize("options", [
    {},  # the reference recipe
    {"flip": "random-except-footwear", "translate": 1, "label_smoothing": 0.1,
     "schedule": "cosine", "ema": 0.999},  # every option that acts within an epoch
], ids=["reference", "every-option"])
def test_an_epoch_reads_from_the_device_only_after_its_last_step(official, monkeypatch, options):
    data = official[0].subset(np.arange(STEPS * BATCH))
    cfg = TrainConfig(batch_size=BATCH, seed=3, **options)
    device = torch.device("cpu")
    model = init_model(cfg.seed).to(memory_format=torch.channels_last)
    optimizer, scheduler, generators, ema = fresh_run(model, cfg, device, STEPS)
    order = torch.randperm(len(data), generator=generators["shuffle"])
    augment = draw_epoch(cfg.flip, cfg.translate, order, 1, generators.get("augment"), None,
                         device, data.labels)
    mode = watch_reads(monkeypatch, optimizer)
    with mode:
        loss_sum, correct = train_epoch(
            model, optimizer, data.images, data.labels, order, BATCH, augment=augment,
            label_smoothing=cfg.label_smoothing,
            step_scheduler=scheduler if cfg.schedule != "step" else None, ema=ema)
    # The summed loss and the count of correct predictions, once, after the last step.
    assert mode.reads == [(STEPS, loss_sum), (STEPS, correct)]
    assert mode.steps == STEPS and 0 < correct <= len(data)


def test_a_read_within_a_step_is_caught(official, monkeypatch):
    """The check above can fail: a loss logged at each step is one read a step."""
    data = official[0].subset(np.arange(STEPS * BATCH))
    model = init_model(0).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters())
    logged: list[float] = []
    cross_entropy = train_module.F.cross_entropy

    def logging_cross_entropy(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        logged.append(loss.item())  # what a per-step log line would do
        return loss

    monkeypatch.setattr(train_module.F, "cross_entropy", logging_cross_entropy)
    mode = watch_reads(monkeypatch, optimizer)
    with mode:
        loss_sum, correct = train_epoch(model, optimizer, data.images, data.labels,
                                        torch.arange(len(data)), BATCH)
    assert mode.reads == [*enumerate(logged), (STEPS, loss_sum), (STEPS, correct)]


def test_the_split_moves_to_the_device_once_and_each_batch_is_gathered_there(official,
                                                                             monkeypatch):
    """train() hands every epoch the same uint8 tensor, the whole split on the device, and a
    fresh permutation on that device; each step gathers its batch from them; no DataLoader."""
    data = official[0].subset(np.arange(5 * BATCH + 16))  # a last batch of 16
    val = official[1].subset(np.arange(100))
    epochs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    batches: list[torch.Tensor] = []
    real_epoch, real_to_input = train_module.train_epoch, train_module.to_input

    def epoch_spy(model, optimizer, x_all, y_all, order, *args, **kwargs):
        epochs.append((x_all, y_all, order))
        return real_epoch(model, optimizer, x_all, y_all, order, *args, **kwargs)

    def input_spy(images: torch.Tensor) -> torch.Tensor:
        batches.append(images)
        return real_to_input(images)

    monkeypatch.setattr(train_module, "train_epoch", epoch_spy)
    monkeypatch.setattr(train_module, "to_input", input_spy)
    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__",
                        lambda self: pytest.fail("a DataLoader was iterated"))
    train(init_model(0), data, val, TrainConfig(epochs=2, batch_size=BATCH, device="cpu"))
    assert len(epochs) == 2 and len(batches) == 2 * 6
    (x_all, y_all, first), (x_again, y_again, second) = epochs
    assert x_again is x_all and y_again is y_all  # moved once, for the whole run
    assert x_all.dtype == torch.uint8 and x_all.shape == (len(data), 28, 28)
    assert torch.equal(x_all, data.images) and torch.equal(y_all, data.labels)
    for order in (first, second):
        assert order.device == x_all.device
        assert torch.equal(order.sort().values, torch.arange(len(data)))
    assert not torch.equal(first, second)  # a new order each epoch
    expected = [x_all[order[i : i + BATCH]] for order in (first, second)
                for i in range(0, len(data), BATCH)]
    for batch, gathered in zip(batches, expected, strict=True):
        assert batch.device == x_all.device and torch.equal(batch, gathered)


def test_the_weight_average_is_torchs_ema(official):
    """WeightAverage's averages and state are AveragedModel's with torch's EMA function, bit
    for bit, from the first update (a copy) on, and after a restore from a checkpoint's state."""
    data = official[0].subset(np.arange(BATCH))
    x = data.images.unsqueeze(1).float().div(255)
    torch.manual_seed(0)
    model = FashionNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    averages = {"ours": WeightAverage(model, 0.9),
                "torch's": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9),
                                         use_buffers=True)}
    for step in range(4):
        optimizer.zero_grad()
        F.cross_entropy(model(x), data.labels).backward()  # BatchNorm statistics move too
        optimizer.step()
        if step == 2:  # resumed: a new average loaded with the state saved after two updates
            averages["resumed"] = WeightAverage(model, 0.9)
            averages["resumed"].load_state_dict(averages["ours"].state_dict())
            assert averages["resumed"].started
        for average in averages.values():
            average.update_parameters(model)
        expected = averages["torch's"].state_dict()
        for name, average in averages.items():
            state = average.state_dict()
            assert state.keys() == expected.keys()
            for key, tensor in expected.items():
                assert torch.equal(state[key], tensor), (name, key)
    assert int(expected["n_averaged"]) == 4
    assert not torch.equal(expected["module.conv1.weight"], model.conv1.weight)  # averaged

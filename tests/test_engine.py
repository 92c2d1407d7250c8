"""The fast engine against plain PyTorch: same masks -> same outputs and gradients; determinism."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fashionnet import FashionNet
from fashionnet import evaluate as evaluate_module
from fashionnet import model as model_module
from fashionnet import runtime as runtime_module
from fashionnet.data import to_input
from fashionnet.train import TrainConfig, init_model, train, train_epoch
from tests.helpers import REPO

CHANNELS_LAST = torch.channels_last


class Reference(nn.Module):
    """The seed's blocks from stock layers; dropout multiplies by a given {0, 2} mask."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 24, 3, 1, 1), nn.BatchNorm2d(24)
        self.conv2, self.bn2 = nn.Conv2d(24, 64, 3, 2, 1), nn.BatchNorm2d(64)
        self.fc = nn.Linear(12_544, 10)

    def forward(self, x: torch.Tensor, masks: list[torch.Tensor]) -> torch.Tensor:
        x = nn.LeakyReLU(0.1)(self.bn1(self.conv1(x)) * masks[0])
        x = nn.LeakyReLU(0.1)(self.bn2(self.conv2(x)) * masks[1])
        return self.fc(nn.Flatten()(x))


def record_masks(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The masks the engine's dropout draws from now on, in draw order."""
    masks: list[torch.Tensor] = []
    draw = model_module.keep_mask_half

    def recording(x: torch.Tensor) -> torch.Tensor:
        masks.append(draw(x))
        return masks[-1]

    monkeypatch.setattr(model_module, "keep_mask_half", recording)
    return masks


@pytest.mark.parametrize("layout", [torch.contiguous_format, CHANNELS_LAST])
def test_training_step_matches_stock_layers_with_the_same_masks(official, monkeypatch, layout):
    torch.manual_seed(0)
    engine = FashionNet().to(memory_format=layout)
    reference = Reference().to(memory_format=layout)
    reference.load_state_dict(
        {k: v for k, v in engine.state_dict().items() if not k.startswith("drop")})
    x, y = to_input(official[0].images[:64]), official[0].labels[:64]
    masks = record_masks(monkeypatch)
    engine.train()
    out = engine(x)
    F.cross_entropy(out, y).backward()
    assert len(masks) == 2
    for mask, shape in zip(masks, [(64, 24, 28, 28), (64, 64, 14, 14)], strict=True):
        assert mask.stride() == torch.empty(shape).to(memory_format=layout).stride()
    expected = reference(x, [m.contiguous() for m in masks])
    F.cross_entropy(expected, y).backward()
    assert torch.equal(out, expected)  # the same kernels on the same values: bit for bit
    engine_params = dict(engine.named_parameters())
    for name, p in reference.named_parameters():
        assert torch.equal(engine_params[name].grad, p.grad), name
    for name in ("bn1.running_mean", "bn1.running_var", "bn2.running_mean", "bn2.running_var"):
        assert torch.equal(engine.state_dict()[name], reference.state_dict()[name]), name


def test_mask_follows_the_layout_and_stays_bernoulli_half():
    torch.manual_seed(0)
    x = torch.empty(256, 64, 14, 14).to(memory_format=CHANNELS_LAST)
    mask = model_module.keep_mask_half(x)
    assert mask.shape == x.shape and mask.stride() == x.stride()
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert mask.mean().item() == pytest.approx(1.0, abs=0.005)
    # Channel neighbours (adjacent in memory here) are independent: P(both kept) = 1/4.
    both = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    assert both.float().mean().item() == pytest.approx(0.25, abs=0.005)
    odd = model_module.keep_mask_half(torch.empty(3, 5, 7))  # not a multiple of 64 elements
    assert odd.shape == (3, 5, 7) and set(odd.unique().tolist()) <= {0.0, 2.0}


def test_dropout_draws_from_the_global_generator():
    """Masks come from torch's global generator, so its state (torch.get_rng_state) is all a
    checkpoint needs to resume them."""
    x = torch.ones(4, 24, 28, 28)
    torch.manual_seed(3)
    first = model_module.keep_mask_half(x)
    state = torch.get_rng_state()
    second = model_module.keep_mask_half(x)
    torch.set_rng_state(state)
    assert torch.equal(model_module.keep_mask_half(x), second)
    assert not torch.equal(first, second)


def test_same_seed_same_weights(official):
    data = official[0].subset(np.arange(640))
    val = official[1].subset(np.arange(200))
    cfg = TrainConfig(epochs=2, batch_size=64, device="cpu", seed=5)
    states, losses = [], []
    for _ in range(2):
        model = init_model(cfg.seed)
        losses.append([(s.train_loss, s.val_loss) for s in train(model, data, val, cfg)])
        states.append(model.state_dict())
    assert losses[0] == losses[1]
    for name, tensor in states[0].items():
        assert torch.equal(tensor, states[1][name]), name
        assert tensor.is_contiguous(), name  # saved with plain strides


def test_bfloat16_mixed_precision_trains_and_evaluates(official):
    """The bfloat16 path (CUDA, and CPUs with native bfloat16): masks take the activations'
    dtype, the loss and the weights stay float32, and the steps learn."""
    torch.manual_seed(0)
    model = FashionNet().to(memory_format=CHANNELS_LAST)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, amsgrad=True)
    data = official[0].subset(np.arange(1024))
    order = torch.arange(1024)
    bf16 = torch.bfloat16
    first, _ = train_epoch(model, optimizer, data.images, data.labels, order, 128, dtype=bf16)
    second, correct = train_epoch(model, optimizer, data.images, data.labels, order, 128,
                                  dtype=bf16)
    assert second < first and correct / 1024 > 0.6
    assert all(p.dtype == torch.float32 for p in model.parameters())
    test = official[1].subset(np.arange(500))
    fast = evaluate_module.evaluate(model, test, dtype=bf16)
    exact = evaluate_module.evaluate(model, test)
    assert fast.accuracy > 0.6
    assert abs(fast.accuracy - exact.accuracy) <= 0.01  # bfloat16 changes few predictions
    with torch.autocast("cpu", torch.bfloat16):
        half = model_module.keep_mask_half(torch.ones(2, 3, dtype=torch.bfloat16))
    assert half.dtype == torch.bfloat16


def test_precision_choice(monkeypatch):
    cpu = torch.device("cpu")
    assert runtime_module.resolve_precision("float32", cpu) == torch.float32
    assert runtime_module.resolve_precision("bfloat16", cpu) == torch.bfloat16
    probe = runtime_module._cpu_has_native_bfloat16
    try:
        for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda n=native: n)
            probe.cache_clear()
            assert runtime_module.resolve_precision("auto", cpu) == expected

        def changed(required_argument):  # a private function whose signature changed
            return True

        for replacement in (changed, None):  # None: gone, calling it raises TypeError
            monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", replacement)
            probe.cache_clear()
            assert runtime_module.resolve_precision("auto", cpu) == torch.float32
        monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
        probe.cache_clear()
        assert runtime_module.resolve_precision("auto", cpu) == torch.float32
    finally:
        monkeypatch.undo()
        probe.cache_clear()


@pytest.mark.slow
def test_benchmark_smoke(raw_dir):
    result = subprocess.run(
        [sys.executable, "benchmarks/throughput.py", "--raw-dir", str(raw_dir),
         "--train-images", "320", "--eval-images", "640", "--batch-sizes", "64"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    rows = {line.split("  ")[0]: line.split() for line in result.stdout.splitlines()}
    assert "reference (batch 64)" in rows and "engine (batch 64, float32)" in rows
    engine = rows["engine (batch 64, float32)"]
    assert float(engine[-3]) > 0 and float(engine[-1]) > 0  # train and eval ratios

"""The fast engine against plain PyTorch: same masks -> same outputs and gradients; determinism."""

from __future__ import annotations

import math
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
from fashionnet.recipe import TrainConfig
from fashionnet.train import init_model, train, train_epoch
from tests.helpers import REPO
from tests.test_evaluate import LOGIT_ERROR
from tests.test_model import expected_mask

CHANNELS_LAST = torch.channels_last


class Reference(nn.Module):
    """The reference's blocks from stock layers; dropout multiplies by a given {0, 2} mask."""

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
    # In memory order (channels innermost here), the generator's bits one by one.
    in_memory = mask.permute(0, 2, 3, 1).flatten().numpy()
    assert np.array_equal(in_memory, expected_mask(0, x.numel()))
    # Channel neighbours (adjacent in memory here) are independent: P(both kept) = 1/4,
    # within 5 standard errors (overlapping pairs: a variance of 5/16 per pair).
    both = (mask[:, :-1] > 0) & (mask[:, 1:] > 0)
    standard_error = math.sqrt(5 / 16 / both.numel())
    assert both.float().mean().item() == pytest.approx(0.25, abs=5 * standard_error)
    torch.manual_seed(1)
    odd = model_module.keep_mask_half(torch.empty(3, 5, 7))  # not a multiple of 64 elements
    assert np.array_equal(odd.numpy(), expected_mask(1, 105).reshape(3, 5, 7))


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


def test_bfloat16_mixed_precision_trains_and_evaluates(official, monkeypatch):
    """The bfloat16 path (CUDA, and CPUs with native bfloat16; emulated on others): the
    convolutions compute in bfloat16, masks take their dtype, the loss and the weights stay
    float32, and the steps learn as float32's do from the same start."""
    data = official[0].subset(np.arange(512))  # bfloat16 is emulated, and slow, on some CPUs
    order = torch.arange(512)
    bf16 = torch.bfloat16

    def start() -> tuple[FashionNet, torch.optim.Optimizer]:
        torch.manual_seed(0)  # the same weights, then the same masks: the same draws
        model = FashionNet().to(memory_format=CHANNELS_LAST)
        return model, torch.optim.AdamW(model.parameters(), lr=3e-3, amsgrad=True)

    reference, _ = train_epoch(*start(), data.images, data.labels, order, 64)  # float32
    model, optimizer = start()
    seen: dict[str, set[torch.dtype]] = {"conv": set(), "mask": set(), "loss": set()}
    model.conv1.register_forward_hook(lambda m, i, out: seen["conv"].add(out.dtype))
    model.conv2.register_forward_hook(lambda m, i, out: seen["conv"].add(out.dtype))
    draw, cross_entropy = model_module.keep_mask_half, F.cross_entropy

    def recording_draw(x: torch.Tensor) -> torch.Tensor:
        mask = draw(x)
        seen["mask"].add(mask.dtype)
        return mask

    monkeypatch.setattr(model_module, "keep_mask_half", recording_draw)
    monkeypatch.setattr(F, "cross_entropy",
                        lambda x, *a, **k: seen["loss"].add(x.dtype) or cross_entropy(x, *a, **k))
    first, _ = train_epoch(model, optimizer, data.images, data.labels, order, 64, dtype=bf16)
    second, correct = train_epoch(model, optimizer, data.images, data.labels, order, 64,
                                  dtype=bf16)
    monkeypatch.undo()
    assert seen == {"conv": {bf16}, "mask": {bf16}, "loss": {torch.float32}}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(v.dtype == torch.float32 for state in optimizer.state.values()
               for v in state.values() if v.is_floating_point())
    # The first epoch's summed loss is float32's up to bfloat16's rounding (0.12% measured;
    # bfloat16 keeps 8 significant bits, 0.4%); then the runs drift apart.
    assert first == pytest.approx(reference, rel=0.005)
    assert second < first and correct / 512 > 0.5  # a floor: it learns (67% measured)
    test = official[1].subset(np.arange(500))
    fast = evaluate_module.evaluate(model, test, dtype=bf16)
    exact = evaluate_module.evaluate(model, test)
    assert exact.accuracy > 0.5  # a floor: 16 steps of 64 images (70% measured)
    # bfloat16 changes a prediction only where float32's two best logits nearly tie.
    with torch.no_grad():
        top2 = model.eval()(to_input(test.images)).topk(2, 1).values  # (500, 2), stock forward
    margins = (top2[:, 0] - top2[:, 1]).numpy()
    assert (margins[fast.predictions != exact.predictions] < 2 * LOGIT_ERROR).all()


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
         "--train-images", "320", "--eval-images", "640", "--batch-sizes", "64",
         "--repeats", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=True)
    lines = result.stdout.splitlines()
    assert lines[1] == ("data: 320 training + 35 validation images per epoch, 640 evaluation "
                        "images; median of 2 alternating rounds")
    rows = {line[:28].strip(): line[28:].split() for line in lines[3:]}
    native = runtime_module.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16
    assert list(rows) == ["reference (batch 64)", "engine (batch 64, float32)",
                          *(["engine (batch 64, bfloat16)"] if native else [])]
    reference = rows.pop("reference (batch 64)")
    assert reference[1:3] == reference[4:6] == ["1.00", "-"]
    for cells in rows.values():
        for ratio, spread in ((cells[1], cells[2]), (cells[4], cells[5])):
            # The median of 2 rounds' ratios is their mean, printed with the two to 2 decimals.
            low, high = (float(v) for v in spread.split("-"))
            assert float(ratio) == pytest.approx((low + high) / 2, abs=0.011)
            assert 0 < low <= float(ratio) <= high

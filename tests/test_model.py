"""FashionNet against a hand count and torch's stock layers; dropout's semantics."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fashionnet import FashionNet
from fashionnet.model import Dropout, keep_mask_half


def test_parameter_count_matches_hand_count():
    conv1 = 1 * 24 * 3 * 3 + 24  # 240
    bn1 = 2 * 24
    conv2 = 24 * 64 * 3 * 3 + 64  # 13,888
    bn2 = 2 * 64
    fc = 64 * 14 * 14 * 10 + 10  # flatten (64, 14, 14) = 12,544 -> 10
    expected = conv1 + bn1 + conv2 + bn2 + fc
    assert expected == 139_754
    assert sum(p.numel() for p in FashionNet().parameters()) == expected


def test_layers_are_the_references():
    model = FashionNet()
    for conv, out, stride in ((model.conv1, 24, 1), (model.conv2, 64, 2)):
        assert conv.out_channels == out
        assert conv.kernel_size == (3, 3)
        assert conv.padding == (1, 1)
        assert conv.stride == (stride, stride)
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.bn1.num_features == 24
    assert isinstance(model.bn2, nn.BatchNorm2d) and model.bn2.num_features == 64
    assert model.drop1.p == model.drop2.p == 0.5
    assert (model.fc.in_features, model.fc.out_features) == (12_544, 10)


def stock(model: FashionNet) -> nn.Sequential:
    """``model``'s eval-mode network from torch's stock modules, with its weights."""
    layers = nn.Sequential(
        nn.Conv2d(1, 24, 3, 1, 1), nn.BatchNorm2d(24), nn.LeakyReLU(0.1),  # (B, 24, 28, 28)
        nn.Conv2d(24, 64, 3, 2, 1), nn.BatchNorm2d(64), nn.LeakyReLU(0.1),  # (B, 64, 14, 14)
        nn.Flatten(), nn.Linear(12_544, 10))  # (C, H, W) order -> (B, 10)
    names = {"conv1": "0", "bn1": "1", "conv2": "3", "bn2": "4", "fc": "7"}
    layers.load_state_dict({f"{names[k.split('.')[0]]}.{k.split('.', 1)[1]}": v
                            for k, v in model.state_dict().items()})
    return layers.eval()


def test_eval_forward_is_the_stock_layers_in_order():
    torch.manual_seed(0)
    model = FashionNet().eval()
    for bn in (model.bn1, model.bn2):  # statistics and affine maps other than 0 and 1
        for tensor, low, high in ((bn.running_mean, -1, 1), (bn.running_var, 0.5, 2),
                                  (bn.weight, 0.5, 2), (bn.bias, -1, 1)):
            tensor.data.uniform_(low, high)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out = model(x)
        expected = stock(model)(x)
    assert out.shape == (5, 10)
    assert torch.equal(out, expected)  # the same kernels in the same order: bit for bit


def test_kaiming_normal_init_and_zero_biases():
    """The draws replayed by hand: the layers' default initialisations in construction order
    (BatchNorm draws nothing), then N(0, 2 / fan_in) for each convolution's weight."""
    torch.manual_seed(0)
    model = FashionNet()
    torch.manual_seed(0)
    defaults = [nn.Conv2d(1, 24, 3), nn.Conv2d(24, 64, 3), nn.Linear(12_544, 10)]
    for conv in (model.conv1, model.conv2):
        fan_in = conv.in_channels * 3 * 3
        std = math.sqrt(2.0 / fan_in)  # kaiming normal, fan_in, gain sqrt(2)
        expected = torch.empty_like(conv.weight).normal_(0, std)
        assert torch.equal(conv.weight, expected)
        assert torch.equal(conv.bias, torch.zeros_like(conv.bias))
    # The linear layer keeps PyTorch's default: uniform in +-1/sqrt(fan_in).
    assert torch.equal(model.fc.weight, defaults[2].weight)
    assert torch.equal(model.fc.bias, defaults[2].bias)
    assert model.fc.weight.abs().max().item() <= 1 / math.sqrt(12_544)


def expected_mask(seed: int, numel: int) -> np.ndarray:
    """A keep-mask from its specification: the bits of int64 words drawn uniformly from the
    global generator seeded ``seed``, least significant first, as 0 or 2 (numpy unpacks)."""
    torch.manual_seed(seed)
    words = torch.empty((numel + 63) // 64, dtype=torch.int64).random_(-(2**63), None)
    bits = np.unpackbits(words.numpy().view(np.uint8), bitorder="little")[:numel]
    return bits.astype(np.float32) * 2


def test_dropout_mask_is_bernoulli_half_scaled_by_two():
    torch.manual_seed(0)
    x = torch.ones(200, 24, 28, 28)
    mask = keep_mask_half(x)
    assert mask.shape == x.shape and mask.dtype == x.dtype
    assert np.array_equal(mask.flatten().numpy(), expected_mask(0, x.numel()))
    # The bits are uniform: 3.76 million of them, their mean 1 within 5 standard errors.
    assert mask.mean().item() == pytest.approx(1.0, abs=5 / math.sqrt(x.numel()))
    # Neighbouring elements are independent: P(both kept) = 1/4. (Overlapping pairs: the
    # variance of their mean is 5/16 per pair, 3/16 of its own and 2/16 shared.)
    both = (mask[..., :-1] > 0) & (mask[..., 1:] > 0)
    standard_error = math.sqrt(5 / 16 / both.numel())
    assert both.float().mean().item() == pytest.approx(0.25, abs=5 * standard_error)


def test_dropout_is_identity_in_eval_and_is_nn_dropout_in_training():
    layer = Dropout(0.5)
    x = torch.randn(4, 24, 28, 28)
    assert torch.equal(layer.eval()(x), x)
    torch.manual_seed(1)
    y = layer.train()(x)
    mask = torch.from_numpy(expected_mask(1, x.numel())).view(x.shape)
    assert torch.equal(y, x * mask)
    # Other probabilities are nn.Dropout's own, draw for draw.
    torch.manual_seed(2)
    ours = Dropout(0.2).train()(torch.ones(100_000))
    torch.manual_seed(2)
    assert torch.equal(ours, nn.Dropout(0.2).train()(torch.ones(100_000)))
    assert set(ours.unique().tolist()) == {0.0, 1.25}
    with pytest.raises(ValueError, match=r"dropout probability must be in \[0, 1\), got 1.0"):
        Dropout(1.0)


def test_state_dict_round_trip_with_weights_only(tmp_path):
    model = FashionNet()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = FashionNet()
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), other.eval()(x))

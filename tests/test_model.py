"""FashionNet against a hand count of the seed's architecture, and dropout's semantics."""

import math

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


def test_layers_are_the_seeds():
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


def test_output_shape_and_flattened_feature_map():
    model = FashionNet().eval()
    assert model(torch.rand(5, 1, 28, 28)).shape == (5, 10)


def test_kaiming_normal_init_and_zero_biases():
    torch.manual_seed(0)
    model = FashionNet()
    for conv in (model.conv1, model.conv2):
        assert torch.all(conv.bias == 0)
        fan_in = conv.in_channels * 9
        std = math.sqrt(2.0 / fan_in)  # kaiming normal, fan_in, gain sqrt(2)
        assert conv.weight.std().item() == pytest.approx(std, rel=0.15)
        assert conv.weight.mean().item() == pytest.approx(0.0, abs=std * 0.2)
    # The linear layer keeps PyTorch's default: uniform in +-1/sqrt(fan_in).
    bound = 1 / math.sqrt(12_544)
    assert model.fc.weight.abs().max().item() <= bound


def test_dropout_mask_is_bernoulli_half_scaled_by_two():
    torch.manual_seed(0)
    x = torch.ones(200, 24, 28, 28)
    mask = keep_mask_half(x)
    assert set(mask.unique().tolist()) == {0.0, 2.0}
    assert mask.mean().item() == pytest.approx(1.0, abs=0.005)  # E[mask] = 1: unbiased
    # Neighbouring elements are independent: P(both kept) = 1/4.
    both = (mask[..., :-1] > 0) & (mask[..., 1:] > 0)
    assert both.float().mean().item() == pytest.approx(0.25, abs=0.005)


def test_dropout_is_identity_in_eval_and_matches_nn_dropout_in_expectation():
    layer = Dropout(0.5)
    x = torch.randn(4, 24, 28, 28)
    assert torch.equal(layer.eval()(x), x)
    y = layer.train()(x)
    kept = y != 0
    assert torch.allclose(y[kept], 2 * x[kept])
    other = Dropout(0.2).train()(torch.ones(100_000))
    assert set(other.unique().tolist()) == {0.0, 1.25}
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_state_dict_round_trip_with_weights_only(tmp_path):
    model = FashionNet()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    other = FashionNet()
    other.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    x = torch.rand(3, 1, 28, 28)
    assert torch.equal(model.eval()(x), other.eval()(x))

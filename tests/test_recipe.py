"""The recipe options' mechanics, each on real images: flips mirror, translations shift with
zero fill, the EMA is the closed-form average of the weights, BatchNorm recalibration changes
only running statistics, test-time augmentation averages the two views; the defaults are the
reference recipe, and named recipe files are validated, naming the file and key."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from fashionnet.augment import ORIENTED_CLASSES, draw_epoch, hflip, translate
from fashionnet.data import CLASSES, LabeledImages, to_input
from fashionnet.errors import ConfigError
from fashionnet.evaluate import evaluate
from fashionnet.recipe import TrainConfig
from fashionnet.split import SplitConfig, stratified_split
from fashionnet.train import init_model, recalibrate_batchnorm, train, train_epoch
from pipeline.params import load_params, load_recipe
from tests.helpers import REPO

RECIPE = REPO / "recipes" / "plus.yaml"


@pytest.fixture(scope="module")
def images(official) -> torch.Tensor:
    """64 real training images, (64, 28, 28) uint8."""
    return official[0].images[:64]


@pytest.fixture(scope="module")
def small(official) -> tuple[LabeledImages, LabeledImages]:
    """200 training and 100 validation images from the real training set."""
    full = official[0]
    train_idx, val_idx = stratified_split(full.labels.numpy(),
                                          SplitConfig(val_size=100, limit=200, seed=11))
    return full.subset(train_idx), full.subset(val_idx)


def test_flip_mirrors_exactly_the_chosen_images(images):
    chosen = torch.arange(len(images)) % 3 == 0
    out = hflip(images, chosen)
    for image, result, flipped in zip(images, out, chosen, strict=True):
        expected = image.numpy()[:, ::-1] if flipped else image.numpy()
        assert (result.numpy() == expected).all()
    assert not torch.equal(out[0], images[0])  # a garment is not exactly symmetric
    assert torch.equal(hflip(out, chosen), images)


def test_random_flip_draws_half_and_alternate_flip_alternates(images):
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([draw_epoch("random", 0, order, 1, generator, None, torch.device("cpu"))
                         .flip for _ in range(50)])
    assert 0.4 < draws.float().mean() < 0.6 and draws.shape == (50, len(images))
    base = torch.rand(len(images), generator=generator) < 0.5
    odd, even = (draw_epoch("alternate", 0, order, epoch, None, base, torch.device("cpu")).flip
                 for epoch in (1, 2))
    assert torch.equal(odd, base[order]) and torch.equal(even, ~base[order])


def test_random_except_footwear_flip_never_mirrors_footwear(official):
    labels = official[0].labels[:3000]
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    flips = draw_epoch("random-except-footwear", 0, order, 1, torch.Generator().manual_seed(1),
                       None, torch.device("cpu"), labels).flip
    footwear = torch.isin(labels[order], torch.tensor(ORIENTED_CLASSES))
    assert [CLASSES[c] for c in ORIENTED_CLASSES] == ["Sandal", "Sneaker", "Ankle boot"]
    assert not flips[footwear].any()
    assert 0.45 < flips[~footwear].float().mean() < 0.55


def test_translation_shifts_with_zero_fill(images):
    shifts = torch.tensor([[1, -2], [-1, 0], [0, 2], [2, 1]])
    out = translate(images[:4], shifts, max_shift=2)
    x = images[:4]
    assert torch.equal(out[0, 1:, :-2], x[0, :-1, 2:])  # down 1, left 2
    assert (out[0, 0, :] == 0).all() and (out[0, :, -2:] == 0).all()
    assert torch.equal(out[1, :-1], x[1, 1:]) and (out[1, -1] == 0).all()  # up 1
    assert torch.equal(out[2, :, 2:], x[2, :, :-2]) and (out[2, :, :2] == 0).all()  # right 2
    assert torch.equal(out[3, 2:, 1:], x[3, :-2, :-1])
    assert torch.equal(translate(x, torch.zeros(4, 2, dtype=torch.int64), 2), x)
    drawn = draw_epoch("none", 2, torch.arange(len(images)), 1, torch.Generator().manual_seed(2),
                       None, torch.device("cpu")).shifts
    assert set(drawn.unique().tolist()) == {-2, -1, 0, 1, 2}


def test_ema_is_the_closed_form_average_of_the_weights(small):
    train_set, _ = small
    decay, batch = 0.8, 40  # 5 steps
    model = init_model(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    seen: list[torch.Tensor] = []  # conv1's weight after each step
    step = optimizer.step

    def step_and_record(*args, **kwargs):
        result = step(*args, **kwargs)
        seen.append(model.conv1.weight.detach().clone())
        return result

    optimizer.step = step_and_record
    train_epoch(model, optimizer, train_set.images, train_set.labels,
                torch.arange(len(train_set)), batch, ema=ema)
    assert len(seen) == 5
    # W_1 = w_1; W_t = decay * W_{t-1} + (1 - decay) * w_t
    expected = decay ** 4 * seen[0] + sum((1 - decay) * decay ** (5 - t) * seen[t - 1]
                                          for t in range(2, 6))
    torch.testing.assert_close(ema.module.conv1.weight, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ema.module.conv1.weight, seen[-1])


def test_training_with_ema_ends_with_the_average_and_validates_it(small):
    cfg = TrainConfig(epochs=1, batch_size=40, ema=0.5, device="cpu", precision="float32")
    online = {}
    model = init_model(0)
    history = train(model, *small, cfg, on_trained=lambda m: online.update(copy.deepcopy(
        m.state_dict())))
    state = model.state_dict()
    assert not torch.equal(state["fc.weight"], online["fc.weight"])
    assert history[-1].val_accuracy == evaluate(model, small[1]).accuracy


def test_bn_recalibration_changes_only_running_statistics(small):
    train_set, _ = small
    model = init_model(0)
    train(model, *small, TrainConfig(epochs=1, batch_size=40, device="cpu",
                                     precision="float32"))
    before = copy.deepcopy(model.state_dict())
    model.train()
    recalibrate_batchnorm(model, train_set.images, batch_size=100)  # 2 batches of 100
    after = model.state_dict()
    statistics = {f"{bn}.{s}" for bn in ("bn1", "bn2")
                  for s in ("running_mean", "running_var", "num_batches_tracked")}
    for name, tensor in before.items():
        if name in statistics:
            assert not torch.equal(after[name], tensor), name
        else:
            assert torch.equal(after[name], tensor), name
    assert model.training and model.bn1.momentum == 0.1  # put back as it was
    # bn1's mean is conv1's output's mean over the images (equal batches average exactly).
    with torch.no_grad():
        conv1 = model.conv1(to_input(train_set.images))
    torch.testing.assert_close(model.bn1.running_mean, conv1.mean((0, 2, 3)),
                               rtol=1e-4, atol=1e-5)
    # Dropout is off: no random draw, so a second recalibration gives the same statistics.
    recalibrate_batchnorm(model, train_set.images, batch_size=100)
    for name in statistics:
        assert torch.equal(model.state_dict()[name], after[name]), name


def test_tta_averages_the_two_views_probabilities(small):
    _, val = small
    model = init_model(0)
    train(model, *small, TrainConfig(epochs=1, batch_size=40, device="cpu",
                                     precision="float32"))
    model.eval()
    x = to_input(val.images)
    with torch.no_grad():
        probs = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
    result = evaluate(model, val, tta=True, batch_size=32)
    assert (result.predictions == probs.argmax(1).numpy()).all()
    assert result.loss == pytest.approx(F.nll_loss(probs.log(), val.labels).item(), rel=1e-4)
    plain = evaluate(model, val)
    assert plain.loss != pytest.approx(result.loss, rel=1e-6)


def test_defaults_are_the_reference_recipe_of_the_committed_reproduction():
    """dvc.lock's train params (the committed 60-epoch run) read as a TrainConfig are exactly
    params.yaml's train section, and every recipe option in it is off."""
    lock = yaml.safe_load((REPO / "dvc.lock").read_text())["stages"]
    locked = TrainConfig(**lock["train"]["params"]["params.yaml"]["train"])
    params = load_params(REPO / "params.yaml")
    assert params.train == locked == TrainConfig(device=locked.device)
    assert (locked.schedule, locked.flip, locked.translate, locked.label_smoothing, locked.ema,
            locked.bn_recalibrate) == ("step", "none", 0, 0.0, 0.0, False)
    assert params.evaluate.tta is False


def test_named_recipe_is_valid_and_leaves_the_seed_to_the_caller():
    recipe = load_recipe(RECIPE, REPO / "params.yaml")
    assert "train.seed" not in recipe
    params = load_params(REPO / "params.yaml", recipe)
    assert params.train != load_params(REPO / "params.yaml").train


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("train.flip: sideways\n", "train.flip", "Input should be 'none', 'random', 'alternate' or"),
    ("train.flpi: random\n", "train.flpi", "unknown key"),
    ("train.ema: 1.5\n", "train.ema", "less than 1"),
    ("train:\n  flip: random\n", "train", "not a section.key name"),
    ("train.epochs: [1, 2]\n", "train.epochs", "must be a single value"),
    ("evaluate.tta: yes please\n", "evaluate.tta", "valid boolean"),
])
def test_bad_recipe_names_file_and_key(tmp_path: Path, text: str, key: str, problem: str):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_recipe(recipe, REPO / "params.yaml")
    assert error.value.key == f"{recipe}: {key}"
    assert problem in error.value.problem


@pytest.mark.parametrize(("text", "problem"), [
    (None, "file not found"),
    ("- train.flip\n", "must be a non-empty mapping"),
    ("", "must be a non-empty mapping"),
    ("train.flip: random\ntrain.flip: none\n", "appears twice"),
    ("train.flip: [\n", "not valid YAML at line"),
])
def test_unreadable_recipe_names_the_file(tmp_path: Path, text: str | None, problem: str):
    recipe = tmp_path / "mine.yaml"
    if text is not None:
        recipe.write_text(text)
    with pytest.raises(ConfigError, match=problem) as error:
        load_recipe(recipe, REPO / "params.yaml")
    assert error.value.key == str(recipe)



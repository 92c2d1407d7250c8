"""The prediction API (fashionnet.prediction, ``from fashionnet import predict``): agreement with
``fashionnet evaluate`` on the real test images written as PNG files, and the inputs it takes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from fashionnet import CLASSES, predict
from fashionnet.conversion import Prepared
from fashionnet.data import LabeledImages
from fashionnet.evaluate import evaluate
from fashionnet.inference import InferenceNet
from fashionnet.prediction import classify
from fashionnet.reading import find_images, read_images
from fashionnet.runtime import resolve_precision
from tests.predict_helpers import load, write_pngs

# --- agreement with evaluation ----------------------------------------------------------------


def test_test_set_pngs_predict_exactly_as_evaluate(official, tmp_path, model_file):
    """2,000 test images read back from PNG files are the test images, none negated; the
    predictions are evaluate's, image by image, in float32 and in bfloat16; where the two
    precisions disagree, bfloat16's rounding of the logits exceeds float32's margin. (All
    10,000, through the command: the slow test at the end.)"""
    test = official[1].subset(np.arange(2000))
    pngs = write_pngs(test.images.numpy(), tmp_path / "pngs")
    chunks = list(read_images(find_images([pngs])))
    read = Prepared(np.concatenate([c.prepared.images for c in chunks]),
                    np.concatenate([c.prepared.inverted for c in chunks]))
    assert np.array_equal(read.images, test.images.numpy())
    assert not read.inverted.any()
    assert [s.file for c in chunks for s in c.sources] == [str(pngs / f"{i:05d}.png")
                                                           for i in range(2000)]
    model = load(model_file)
    by_dtype = {}
    for dtype in (torch.float32, torch.bfloat16):
        reference = evaluate(model, test, dtype=dtype)
        predicted = classify(read, model, dtype=dtype)
        assert np.array_equal(predicted.classes, reference.predictions), dtype
        assert (predicted.classes == test.labels.numpy()).mean() == reference.accuracy
        np.testing.assert_allclose(predicted.probabilities.sum(axis=1), 1, atol=1e-5)
        by_dtype[dtype] = predicted
    f32, bf16 = by_dtype[torch.float32], by_dtype[torch.bfloat16]
    assert f32.probabilities.dtype == bf16.probabilities.dtype == np.float32
    differ = np.flatnonzero(f32.classes != bf16.classes)
    assert len(differ) <= 0.01 * len(test)
    if len(differ):
        x = torch.from_numpy(read.images[differ]).unsqueeze(1).float() / 255
        exact = InferenceNet(model)(x).double()
        rounded = InferenceNet(model, torch.bfloat16)(x).double()
        rows = torch.arange(len(differ))
        margin = exact[rows, f32.classes[differ]] - exact[rows, bf16.classes[differ]]
        error = (rounded - exact).abs().max(dim=1).values
        assert (margin <= 2 * error).all()  # within rounding: the order of two logits flipped


def test_python_api_takes_tensors_arrays_and_pil_images(official, model_file):
    images = official[1].images[:50]
    by_path = predict(images, model_file)
    assert len(by_path) == 50 and by_path.probabilities.shape == (50, 10)
    model = load(model_file)
    # By default in the precision `fashionnet evaluate` computes in by default.
    reference = evaluate(model, LabeledImages(images, official[1].labels[:50]),
                         dtype=resolve_precision("auto", torch.device("cpu")))
    assert np.array_equal(by_path.classes, reference.predictions)
    assert by_path.names == [CLASSES[c] for c in reference.predictions]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's about read-only arrays
        read_only = np.frombuffer(images.numpy().tobytes(), np.uint8).reshape(50, 28, 28)
        same = [predict(images.numpy(), model), predict(images.float() / 255, model),
                predict(images.unsqueeze(1), model), predict(read_only, model),
                predict([Image.fromarray(a) for a in images.numpy()], model)]
        coarse = predict(images.bfloat16() / 255, model).images  # 8 significant bits
    for other in same:
        assert np.array_equal(other.classes, by_path.classes)
        np.testing.assert_array_equal(other.images, images.numpy())
    assert np.abs(coarse.astype(int) - images.numpy()).max() <= 1
    one = predict(Image.fromarray(images[3].numpy()), model)
    assert one.classes.tolist() == by_path.classes[3:4].tolist()
    assert predict(images[3], model).classes.tolist() == [by_path.classes[3]]
    indices, probabilities = by_path.top(3)
    assert np.array_equal(indices[:, 0], by_path.classes)
    assert (np.diff(probabilities, axis=1) <= 0).all()
    np.testing.assert_array_equal(probabilities[:, 0], by_path.confidence)
    with pytest.raises(ValueError, match=r"\(N, 28, 28\)"):
        predict(torch.zeros(2, 32, 32, dtype=torch.uint8), model)
    with pytest.raises(ValueError, match="uint8 or floats"):
        predict(torch.zeros(2, 28, 28, dtype=torch.int32), model)


# --- conversion of photos --------------------------------------------------------------------

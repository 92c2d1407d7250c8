"""`fashionnet predict` and fashionnet.predict: agreement with evaluation on the real test images
written as PNG files, the conversion of photos unlike Fashion-MNIST, bad input, the output."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from fashionnet import CLASSES, FashionNet, predict
from fashionnet.data import LabeledImages, save_split
from fashionnet.evaluate import evaluate
from fashionnet.inference import InferenceNet
from fashionnet.predict import (
    classify,
    convert,
    find_images,
    greyscale,
    prepare,
    read_file,
    read_files,
)
from fashionnet.runtime import resolve_precision
from fashionnet.train import train_epoch
from pipeline import predict as command
from pipeline.cli import main
from tests.helpers import set_params


def write_pngs(images: np.ndarray, directory: Path) -> Path:
    """images[i] as directory/{i:05d}.png, written by a thread pool (zlib runs without the GIL)."""
    directory.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda i: Image.fromarray(images[i]).save(directory / f"{i:05d}.png"),
                      range(len(images))))
    return directory


@pytest.fixture(scope="session")
def test_pngs(official, tmp_path_factory) -> Path:
    """The 10,000 official test images as PNG files 00000.png ... 09999.png (about 2 s)."""
    return write_pngs(official[1].images.numpy(), tmp_path_factory.mktemp("pngs") / "test")


@pytest.fixture(scope="session")
def model_file(official, tmp_path_factory) -> Path:
    """A FashionNet state_dict after one epoch on 1,024 training images: far from the recipe,
    but with weights and BatchNorm statistics that are not the initial ones."""
    torch.manual_seed(0)
    model = FashionNet().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, amsgrad=True)
    data = official[0].subset(np.arange(1024))
    train_epoch(model, optimizer, data.images, data.labels, torch.randperm(1024), 64)
    path = tmp_path_factory.mktemp("model") / "fashionnet.pt"
    torch.save(model.state_dict(), path)
    return path


def load(path: Path) -> FashionNet:
    model = FashionNet()
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """`fashionnet predict *args` in this process: (exit status, stdout, stderr)."""
    status = main(["predict", *map(str, args)])
    out, err = capsys.readouterr()
    return status, out, err


def assert_bad_input(status: int, err: str, *names: object) -> None:
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fashionnet predict: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert str(name) in lines[0]


# --- agreement with evaluation ----------------------------------------------------------------


def test_test_set_pngs_predict_exactly_as_evaluate(official, tmp_path, model_file):
    """2,000 test images read back from PNG files are the test images, none negated; the
    predictions are evaluate's, image by image, in float32 and in bfloat16; where the two
    precisions disagree, bfloat16's rounding of the logits exceeds float32's margin. (All
    10,000, through the command: the slow test at the end.)"""
    test = official[1].subset(np.arange(2000))
    pngs = write_pngs(test.images.numpy(), tmp_path / "pngs")
    read = read_files(find_images([pngs]))
    assert np.array_equal(read.prepared.images, test.images.numpy())
    assert not read.prepared.inverted.any()
    assert [s.file for s in read.sources] == [str(pngs / f"{i:05d}.png") for i in range(2000)]
    model = load(model_file)
    by_dtype = {}
    for dtype in (torch.float32, torch.bfloat16):
        reference = evaluate(model, test, dtype=dtype)
        predicted = classify(read.prepared, model, dtype=dtype)
        assert np.array_equal(predicted.classes, reference.predictions), dtype
        assert (predicted.classes == test.labels.numpy()).mean() == reference.accuracy
        np.testing.assert_allclose(predicted.probabilities.sum(axis=1), 1, atol=1e-5)
        by_dtype[dtype] = predicted
    f32, bf16 = by_dtype[torch.float32], by_dtype[torch.bfloat16]
    assert f32.probabilities.dtype == bf16.probabilities.dtype == np.float32
    differ = np.flatnonzero(f32.classes != bf16.classes)
    assert len(differ) <= 0.01 * len(test)
    if len(differ):
        x = torch.from_numpy(read.prepared.images[differ]).unsqueeze(1).float() / 255
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

WHITE, DARK = (255, 255, 255), (40, 40, 40)


def drawn(size: tuple[int, int], polygon: list[tuple[float, float]], fill: object,
          background: object, mode: str = "RGB") -> Image.Image:
    image = Image.new(mode, size, background)
    ImageDraw.Draw(image).polygon(polygon, fill=fill)
    return image


def reference_mask(polygon: list[tuple[float, float]]) -> np.ndarray:
    """The polygon drawn directly at Fashion-MNIST's scale: its bounding box's longest edge
    28 pixels, centred on 28x28. An independent rendering to compare the conversion with."""
    xs, ys = [p[0] for p in polygon], [p[1] for p in polygon]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    s = 27 / max(w, h)  # vertex coordinates run 0..27 along the longest edge
    dx, dy = (27 - w * s) / 2, (27 - h * s) / 2
    scaled = [((x - min(xs)) * s + dx, (y - min(ys)) * s + dy) for x, y in polygon]
    return np.asarray(drawn((28, 28), scaled, 255, 0, "L")) > 127


def bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the True pixels, inclusive."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows[0], rows[-1], cols[0], cols[-1]


def grown(mask: np.ndarray) -> np.ndarray:
    """``mask`` and its 8 neighbours: what an anti-aliased, sharpened outline may reach."""
    padded = np.pad(mask, 1)
    return np.any([padded[1 + dy : 29 + dy, 1 + dx : 29 + dx]
                   for dy in (-1, 0, 1) for dx in (-1, 0, 1)], axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


# A shoe seen from the side: sole, toe, heel and shaft; 300 wide, 180 high.
SHOE = [(50, 300), (350, 300), (350, 260), (300, 230), (200, 220), (170, 140), (110, 120),
        (60, 130), (60, 250)]


def test_dark_shoe_on_white_is_negated_trimmed_scaled_and_centred(tmp_path):
    path = tmp_path / "shoe.png"
    drawn((400, 420), SHOE, DARK, WHITE).save(path)
    sources, prepared = read_file(path)
    assert [str(s) for s in sources] == [str(path)] and prepared.inverted.tolist() == [True]
    image = prepared.images[0]
    mask = image > 127
    # The longest edge (width 300) becomes 28; height 180 * 28/300 = 16.8 -> 17 rows, centred.
    assert bbox(mask) == (5, 21, 0, 27)
    assert (image[:5] == 0).all() and (image[22:] == 0).all()  # the background: black
    assert image[mask].mean() > 200  # the shoe, 215 after negation, and sharpened edges
    assert iou(mask, reference_mask(SHOE)) > 0.85


def test_large_colour_photo_on_the_shop_background(tmp_path):
    """A 3000x2000 JPEG, a red dress on Zalando's #fdfdfd: negated, the light grey background
    becomes 0, the dress fills the height, its proportions kept."""
    dress = [(1300, 150), (1700, 150), (1750, 500), (2000, 1900), (1000, 1900), (1250, 500)]
    path = tmp_path / "dress.jpg"
    drawn((3000, 2000), dress, (200, 30, 30), (253, 253, 253)).save(path, quality=90)
    _, prepared = read_file(path)
    assert prepared.inverted.tolist() == [True]
    image = prepared.images[0]
    mask = image > 100
    top, bottom, left, right = bbox(mask)
    assert (top, bottom) == (0, 27)
    assert abs((right - left + 1) - 1000 * 28 / 1750) <= 1 and abs((left + right) / 2 - 13.5) <= 1
    assert (image[~grown(mask)] == 0).all()  # the background, but for the outline's blur
    assert 150 < np.median(image[mask]) < 200  # red's luma 81, negated 174
    assert iou(mask, reference_mask(dress)) > 0.8


def test_tall_light_object_on_dark_is_kept_and_centred_across(tmp_path):
    """Non-square: 120x480, a light pair of trousers on black; no negation."""
    trousers = [(30, 20), (90, 20), (100, 460), (70, 460), (60, 120), (50, 460), (20, 460)]
    path = tmp_path / "trousers.png"
    drawn((120, 480), trousers, (230, 230, 230), (0, 0, 0)).save(path)
    _, prepared = read_file(path)
    assert prepared.inverted.tolist() == [False]
    mask = prepared.images[0] > 127
    top, bottom, left, right = bbox(mask)
    assert (top, bottom) == (0, 27)
    assert right - left + 1 == round(80 * 28 / 440)  # 5 columns, centred
    assert abs((left + right) / 2 - 13.5) <= 1
    assert iou(mask, reference_mask(trousers)) > 0.7  # a thin shape: a pixel is a lot


def test_off_centre_object_is_trimmed_to_the_centre(tmp_path):
    image = Image.new("L", (500, 500), 255)
    ImageDraw.Draw(image).ellipse((10, 20, 110, 120), fill=0)
    (converted, inverted) = convert(np.asarray(image))
    assert inverted
    mask = converted > 127
    assert bbox(mask) == (0, 27, 0, 27)
    rows, cols = np.nonzero(mask)
    assert abs(rows.mean() - 13.5) < 0.5 and abs(cols.mean() - 13.5) < 0.5


def test_transparency_is_the_light_background(tmp_path):
    """An RGBA cut-out: transparent black around a dark blue bag. The transparent pixels count
    as the shop's white, so it is negated, and the background ends black."""
    bag = [(40, 80), (160, 80), (180, 190), (20, 190)]
    path = tmp_path / "bag.png"
    drawn((200, 200), bag, (20, 20, 90, 255), (0, 0, 0, 0), "RGBA").save(path)
    _, prepared = read_file(path)
    assert prepared.inverted.tolist() == [True]
    mask = prepared.images[0] > 127
    assert iou(mask, reference_mask(bag)) > 0.85
    assert (prepared.images[0][~grown(mask)] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    """A phone JPEG stored landscape with orientation 6 (rotate 90 degrees clockwise)."""
    bar = [(20, 40), (280, 40), (280, 60), (20, 60)]  # 260 wide, 20 high as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    drawn((300, 100), bar, DARK, WHITE).save(path, exif=exif, quality=95)
    _, prepared = read_file(path)
    top, bottom, left, right = bbox(prepared.images[0] > 127)
    assert (top, bottom) == (0, 27) and right - left + 1 <= 3  # upright: tall and thin


def test_28x28_images_are_taken_as_fashion_mnist_images(tmp_path):
    """A 28x28 image is never resampled: greyscale only, and negated when its border is
    light. A colour one with a light background comes out as 255 - its luma."""
    rng = np.random.default_rng(0)
    rgb = np.full((28, 28, 3), 250, dtype=np.uint8)
    rgb[5:23, 8:20] = rng.integers(0, 120, (18, 12, 3))
    path = tmp_path / "small.png"
    Image.fromarray(rgb).save(path)
    _, prepared = read_file(path)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))
    assert prepared.inverted.tolist() == [True]
    np.testing.assert_array_equal(prepared.images[0], 255 - luma)
    for mode, expected in (("yes", 255 - luma), ("no", luma)):
        np.testing.assert_array_equal(read_file(path, mode)[1].images[0], expected)
    assert greyscale(Image.fromarray(rgb)).dtype == np.uint8


def test_no_fashion_mnist_image_is_negated_by_auto(official):
    """auto's rule (border mean above 127.5) on all 70,000 images: none is taken for a light
    background, though some objects touch the border."""
    for data in official:
        assert not prepare(data.images).inverted.any()


# --- the command ----------------------------------------------------------------------------


def test_npz_idx_and_directories_in_one_call(capsys, tmp_path, official, model_file):
    """Rows in the order given, a directory's files sorted recursively; .npz and IDX rows name
    their index; predictions those of the Python API."""
    images = official[1].images[:335]
    save_split(tmp_path / "test.npz", LabeledImages(images[:30], official[1].labels[:30]),
               np.arange(30))
    idx = tmp_path / "some-images-idx3-ubyte"  # the IDX format of the release, 300 images
    idx.write_bytes(b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (300, 28, 28))
                    + images[30:330].numpy().tobytes())
    photos = write_pngs(images[330:333].numpy(), tmp_path / "photos" / "b")
    write_pngs(images[333:335].numpy(), tmp_path / "photos" / "a")
    (tmp_path / "photos" / "notes.txt").write_text("not an image, not picked up")
    (tmp_path / "photos" / ".hidden").mkdir()
    Image.fromarray(images[0].numpy()).save(tmp_path / "photos" / ".hidden" / "x.png")
    status, out, err = cli(capsys, tmp_path / "test.npz", idx, tmp_path / "photos",
                           "--model", model_file, "--format", "csv")
    assert status == 0, err
    table = pd.read_csv(io.StringIO(out), dtype={"index": str}, keep_default_na=False)
    assert table["file"].tolist() == [str(tmp_path / "test.npz")] * 30 + [str(idx)] * 300 + [
        str(tmp_path / "photos" / "a" / "00000.png"), str(tmp_path / "photos" / "a" / "00001.png"),
        *(str(photos / f"{i:05d}.png") for i in range(3))]
    assert table["index"].tolist() == [str(i) for i in range(30)] + [
        str(i) for i in range(300)] + [""] * 5
    expected = predict(images, model_file)
    order = [*range(330), 333, 334, 330, 331, 332]  # the directory's a/ comes before b/
    assert table["class"].tolist() == [expected.names[i] for i in order]
    np.testing.assert_allclose(table["probability"], expected.confidence[order], atol=1e-6)


def test_csv_json_and_table(capsys, tmp_path, official, model_file):
    pngs = write_pngs(official[1].images[:5].numpy(), tmp_path / "pngs")
    status, out, _ = cli(capsys, pngs, "--model", model_file, "--top", "3")  # not a terminal
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["file", "index", "inverted", "class", "probability", "class_2",
                             "probability_2", "class_3", "probability_3"]
    status, out, _ = cli(capsys, pngs, "--model", model_file, "--format", "json", "--top", "10")
    records = json.loads(out)
    assert [r["class"] for r in records] == [r["class"] for r in rows]
    for record in records:
        assert record["inverted"] is False and record["index"] is None
        assert record["top"][0]["class"] == record["class"]
        assert sorted(t["class"] for t in record["top"]) == sorted(CLASSES)
        assert sum(t["probability"] for t in record["top"]) == pytest.approx(1, abs=1e-4)
    status, out, _ = cli(capsys, pngs, "--model", model_file, "--format", "table", "--top", "2")
    lines = out.splitlines()
    assert lines[0].split() == ["file", "class", "probability", "inverted", "top", "2"]
    assert len(lines) == 6 and all(r["class"] in line for r, line in zip(rows, lines[1:],
                                                                          strict=True))
    with pytest.raises(SystemExit) as usage:  # argparse: exit 2 with its usage message
        cli(capsys, pngs, "--model", model_file, "--top", "11")
    assert usage.value.code == 2 and "above 10" in capsys.readouterr().err


def test_progress_bar_on_a_terminal_only(tmp_path, official, model_file, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(command, "PROGRESS_FILES", 10)  # stands for a few thousand
    many = write_pngs(official[1].images[:300].numpy(), tmp_path / "many")
    few = write_pngs(official[1].images[:10].numpy(), tmp_path / "few")
    for path, err, shown in ((many, Terminal(), True), (many, io.StringIO(), False),
                             (few, Terminal(), False)):
        out = io.StringIO()
        command.run([str(path)], model_file, out=out, err=err)
        assert bool(re.search(r"reading: .*/300 ", err.getvalue())) == shown, err.getvalue()
        assert shown or err.getvalue() == ""
        assert out.getvalue().count("\n") == len(list(path.iterdir())) + 1  # header, rows


# --- bad input ------------------------------------------------------------------------------


def test_bad_image_files_exit_2_naming_the_file(capsys, tmp_path, official, model_file):
    good = write_pngs(official[1].images[:3].numpy(), tmp_path / "good") / "00000.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    big = tmp_path / "big.jpg"
    drawn((600, 400), SHOE, DARK, WHITE).save(big)
    cut_jpeg = tmp_path / "cut.jpg"
    cut_jpeg.write_bytes(big.read_bytes()[: big.stat().st_size // 2])
    bad_npz = tmp_path / "bad.npz"
    np.savez(bad_npz, images=np.zeros((3, 32, 32), np.uint8))
    cut_idx = tmp_path / "cut-idx3-ubyte"
    cut_idx.write_bytes(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big") + (28).to_bytes(4, "big")
                        + (28).to_bytes(4, "big") + bytes(100))
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    cases = [(truncated, "truncated"), (text, "not an image"), (cut_jpeg, "truncated"),
             (bad_npz, "(N, 28, 28) uint8"), (cut_idx, "truncated"),
             (tmp_path / "missing.png", "no such file"), (empty, "holds no image")]
    for path, problem in cases:
        status, out, err = cli(capsys, good, path, "--model", model_file)
        assert_bad_input(status, err, path, problem)
        assert out == ""  # nothing half-written


def test_skip_bad_reports_and_predicts_the_rest(capsys, tmp_path, official, model_file):
    pngs = write_pngs(official[1].images[:4].numpy(), tmp_path / "pngs")
    (pngs / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    status, out, err = cli(capsys, pngs, "--skip-bad", "--model", model_file)
    assert status == 0
    assert err.strip() == f"fashionnet predict: skipped {pngs / '00002.png'}: damaged or " \
                          "truncated image (Truncated File Read)"
    files = [row["file"] for row in csv.DictReader(io.StringIO(out))]
    assert files == [str(pngs / f"0000{i}.png") for i in (0, 1, 3)]
    status, out, err = cli(capsys, pngs / "00002.png", "--skip-bad", "--model", model_file)
    assert status == 2 and "none of the 1 files" in err.splitlines()[-1]


def test_bad_model_files_exit_2_naming_the_file(capsys, tmp_path, official):
    png = write_pngs(official[1].images[:1].numpy(), tmp_path) / "00000.png"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x80\x02not a model")
    not_state_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], not_state_dict)
    other_net = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(784, 10).state_dict(), other_net)
    pickled = tmp_path / "pickled.pt"
    torch.save(FashionNet(), pickled)  # a whole module: weights_only=True refuses it
    for path, problem in [(garbage, "cannot be loaded"), (not_state_dict, "not a state_dict"),
                          (other_net, "does not fit FashionNet"), (pickled, "cannot be loaded"),
                          (tmp_path / "none.pt", "file not found")]:
        status, out, err = cli(capsys, png, "--model", path)
        assert_bad_input(status, err, path, problem)
        assert out == ""


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_on_10000_pngs_agrees_with_fashionnet_evaluate(repo_copy, cli_env, official,
                                                               test_pngs, model_file):
    """`fashionnet evaluate` and `fashionnet predict` in float32 on the test set written as PNG
    files: the same test accuracy, the same prediction for every image. In bfloat16 (predict's
    default here), the few images whose class changes are those float32 finds nearly tied."""
    train, test = official
    prepared = repo_copy / "data" / "prepared"
    prepared.mkdir(parents=True)
    # Small train and val splits: evaluate computes all three, and only test is compared here.
    save_split(prepared / "train.npz", train.subset(np.arange(300)), np.arange(300))
    save_split(prepared / "val.npz", train.subset(np.arange(300, 600)), np.arange(300, 600))
    save_split(prepared / "test.npz", test, np.arange(len(test)))
    (repo_copy / "models").mkdir(exist_ok=True)
    shutil.copy(model_file, repo_copy / "models" / "fashionnet.pt")
    set_params(repo_copy, **{"train.precision": "float32", "train.device": "cpu"})

    def fashionnet(*args: str) -> str:
        result = subprocess.run(["fashionnet", *args], cwd=repo_copy, env=cli_env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    fashionnet("evaluate")
    metrics = json.loads((repo_copy / "metrics" / "metrics.json").read_text())
    reference = pd.read_csv(repo_copy / "metrics" / "predictions.csv")
    f32 = pd.read_csv(io.StringIO(fashionnet("predict", str(test_pngs), "--precision",
                                             "float32", "--format", "csv")))
    assert f32["file"].tolist() == [str(test_pngs / f"{i:05d}.png") for i in range(10_000)]
    predicted = f32["class"].map(CLASSES.index)
    assert (predicted == reference["predicted"]).all()  # every image
    assert (predicted == reference["actual"]).mean() == metrics["accuracy"]["test"]
    assert not f32["inverted"].any()

    # The default, auto: bfloat16 on a CPU with AVX512-BF16 (as here), else float32.
    bf16 = pd.read_csv(io.StringIO(fashionnet("predict", str(test_pngs), "--format", "csv")))
    differ = bf16["class"] != f32["class"]
    assert differ.mean() <= 0.01
    # Each change is to float32's runner-up, within a few points of probability of the top.
    assert (bf16["class"][differ] == f32["class_2"][differ]).all()
    assert ((f32["probability"] - f32["probability_2"])[differ] < 0.05).all()

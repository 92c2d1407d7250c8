"""`fashionnet predict`, the command: what it reads, what it writes (CSV, JSON, table), its
progress bar, bad input, and its agreement with `fashionnet evaluate` on the whole test set."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from fashionnet import CLASSES, FashionNet, predict
from fashionnet.data import LabeledImages, save_split
from pipeline import predict as command
from tests.helpers import ok, set_params
from tests.predict_helpers import assert_bad_input, write_pngs

# --- the command ----------------------------------------------------------------------------


def test_npz_idx_and_directories_in_one_call(cli, tmp_path, official, model_file):
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
    status, out, err = cli(tmp_path, "predict", tmp_path / "test.npz", idx, tmp_path / "photos",
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


def test_csv_json_and_table(cli, capsys, tmp_path, official, model_file):
    pngs = write_pngs(official[1].images[:5].numpy(), tmp_path / "pngs")
    # Not a terminal: CSV.
    status, out, _ = cli(tmp_path, "predict", pngs, "--model", model_file, "--top", "3")
    assert status == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["file", "index", "inverted", "class", "probability", "class_2",
                             "probability_2", "class_3", "probability_3"]
    status, out, _ = cli(tmp_path, "predict", pngs, "--model", model_file, "--format", "json",
                         "--top", "10")
    records = json.loads(out)
    assert out == json.dumps(records, indent=1) + "\n"  # written a record at a time
    assert [r["class"] for r in records] == [r["class"] for r in rows]
    for record in records:
        assert record["inverted"] is False and record["index"] is None
        assert record["top"][0]["class"] == record["class"]
        assert sorted(t["class"] for t in record["top"]) == sorted(CLASSES)
        assert sum(t["probability"] for t in record["top"]) == pytest.approx(1, abs=1e-4)
    status, out, _ = cli(tmp_path, "predict", pngs, "--model", model_file, "--format", "table",
                         "--top", "2")
    lines = out.splitlines()
    assert lines[0].split() == ["file", "class", "probability", "inverted", "top", "2"]
    assert len(lines) == 6 and all(r["class"] in line for r, line in zip(rows, lines[1:],
                                                                          strict=True))
    status, _, err = cli(tmp_path, "predict", pngs, "--model", model_file, "--top", "11")
    assert status == 2 and "above 10" in err  # argparse: exit 2 with its usage message


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


def test_bad_image_files_exit_2_naming_the_file(cli, tmp_path, official, model_file):
    good = write_pngs(official[1].images[:3].numpy(), tmp_path / "good") / "00000.png"
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.read_bytes()[:-30])
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    big = tmp_path / "big.jpg"
    photo = Image.new("RGB", (600, 400), "white")
    ImageDraw.Draw(photo).ellipse((100, 50, 500, 350), fill=(40, 40, 40))
    photo.save(big)
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
        status, out, err = cli(tmp_path, "predict", good, path, "--model", model_file)
        assert_bad_input(status, err, path, problem)
        assert out == ""  # nothing half-written


def test_skip_bad_reports_and_predicts_the_rest(cli, tmp_path, official, model_file):
    pngs = write_pngs(official[1].images[:4].numpy(), tmp_path / "pngs")
    (pngs / "00002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    status, out, err = cli(tmp_path, "predict", pngs, "--skip-bad", "--model", model_file)
    assert status == 0
    assert err.strip() == f"fashionnet predict: skipped {pngs / '00002.png'}: damaged or " \
                          "truncated image (Truncated File Read)"
    files = [row["file"] for row in csv.DictReader(io.StringIO(out))]
    assert files == [str(pngs / f"0000{i}.png") for i in (0, 1, 3)]
    status, out, err = cli(tmp_path, "predict", pngs / "00002.png", "--skip-bad", "--model",
                           model_file)
    assert status == 2 and "none of the 1 files" in err.splitlines()[-1]


def test_bad_model_files_exit_2_naming_the_file(cli, tmp_path, official):
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
        status, out, err = cli(tmp_path, "predict", png, "--model", path)
        assert_bad_input(status, err, path, problem)
        assert out == ""


# --- end to end ---------------------------------------------------------------------------


@pytest.mark.slow
def test_predict_on_10000_pngs_agrees_with_fashionnet_evaluate(cli, repo_copy, cli_env, official,
                                                                test_pngs, model_file, tmp_path):
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

    ok(repo_copy, cli_env, "fashionnet", "evaluate")  # in the copy, with its params
    metrics = json.loads((repo_copy / "metrics" / "metrics.json").read_text())
    reference = pd.read_csv(repo_copy / "metrics" / "predictions.csv")
    model = repo_copy / "models" / "fashionnet.pt"
    status, out, err = cli(tmp_path, "predict", test_pngs, "--model", model, "--precision",
                           "float32", "--format", "csv")
    assert status == 0, err
    f32 = pd.read_csv(io.StringIO(out))
    assert f32["file"].tolist() == [str(test_pngs / f"{i:05d}.png") for i in range(10_000)]
    predicted = f32["class"].map(CLASSES.index)
    assert (predicted == reference["predicted"]).all()  # every image
    assert (predicted == reference["actual"]).mean() == metrics["accuracy"]["test"]
    assert not f32["inverted"].any()

    # The default, auto: bfloat16 on a CPU with AVX512-BF16 (as here), else float32.
    status, out, err = cli(tmp_path, "predict", test_pngs, "--model", model, "--format", "csv")
    assert status == 0, err
    bf16 = pd.read_csv(io.StringIO(out))
    differ = bf16["class"] != f32["class"]
    assert differ.mean() <= 0.01
    # Each change is to float32's runner-up, within a few points of probability of the top.
    assert (bf16["class"][differ] == f32["class_2"][differ]).all()
    assert ((f32["probability"] - f32["probability_2"])[differ] < 0.05).all()


def test_model_names_the_registry_cannot_resolve_exit_2_naming_them(repo_copy, cli, test_pngs):
    png = test_pngs / "00000.png"
    code, _, err = cli(repo_copy, "predict", png, "--model", "prod")
    assert code == 2 and err.startswith(
        "fashionnet predict: error: --model prod: no version at stage 'prod' of fashionnet in "
        "this repository's registry (`gto show` lists it)"), err
    subprocess.run(["gto", "register", "fashionnet", "HEAD", "--version", "v1.0.0"],
                   cwd=repo_copy, check=True, capture_output=True)
    code, _, err = cli(repo_copy, "predict", png, "--model", "v2.0.0")
    assert code == 2 and "--model v2.0.0: version v2.0.0 of fashionnet" in err, err
    # Registered, but its commit's model is in no cache and on no remote here.
    code, _, err = cli(repo_copy, "predict", png, "--model", "fashionnet@v1.0.0")
    assert code == 2 and "of --model fashionnet@v1.0.0 (" in err, err
    assert "is neither in the DVC cache nor on the DVC remote" in err

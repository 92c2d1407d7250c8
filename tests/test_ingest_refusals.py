"""What `fashionnet ingest` refuses, with exit 2 and one line naming the file, data/incoming/
unchanged: unreadable files, unknown classes, empty batches, a file labelled twice, leaked and
conflicting images, and labels the model disagrees with far too often."""

from __future__ import annotations

import numpy as np
import pytest

from fashionnet.data import CLASSES
from fashionnet.incoming import SLUGS
from tests.ingest_helpers import batches, png, refused


def test_unreadable_files_are_refused_naming_the_first_and_counting_the_rest(ws, cli, tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / "in" / "3").mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / "3" / name).write_text("not an image")
    line = refused(cli, ws, str(tmp_path / "in"))
    assert line == (f"fashionnet ingest: error: {tmp_path}/in/3/a.png: not an image file "
                    "Pillow can read (and 2 more files)")


@pytest.mark.parametrize("case", ["unknown class", "empty", "no label"])
def test_a_batch_without_classes_or_images_is_refused(ws, cli, official, tmp_path, case):
    source = tmp_path / "in"
    if case == "unknown class":
        png(source / "jacket" / "x.png", official[0].images[0].numpy())
        expected = f"{source}/jacket: unknown class 'jacket'"
    elif case == "empty":
        (source / "7").mkdir(parents=True)
        expected = f"{source}/7: directory holds no image, .npz or IDX files"
    else:
        source = png(tmp_path / "x.png", official[0].images[0].numpy())
        expected = f"{source}: has no label"
    assert refused(cli, ws, str(source)).startswith(f"fashionnet ingest: error: {expected}")


def test_a_labels_csv_follows_links_and_refuses_a_file_labelled_twice(ws, cli, official,
                                                                      project, tmp_path):
    full = official[0]
    i = project[1]["unused"][0]
    png(tmp_path / "photos" / "a.png", full.images[i].numpy())
    (tmp_path / "linked").symlink_to(tmp_path / "photos")
    table = tmp_path / "labels.csv"
    table.write_text(f"file,label\nlinked/a.png,{SLUGS[int(full.labels[i])]}\n"
                     "photos/../photos/a.png,sandal\n")
    assert refused(cli, ws, str(tmp_path / "photos"), "--labels", str(table)) == (
        f"fashionnet ingest: error: {table}: line 3: photos/../photos/a.png is labelled "
        "'sandal' here and otherwise on line 2")
    table.write_text(f"linked/a.png,{int(full.labels[i])}\n")  # the file given by its own path
    code, out, err = cli(ws, "ingest", str(tmp_path / "photos"), "--labels", str(table))
    assert code == 0 and "add: 1 images" in out, out + err


def test_leaked_and_conflicting_images_are_refused(ws, cli, official, project, tmp_path):
    full, test = official
    val_image = full.images[project[1]["val"][5]].numpy()
    png(tmp_path / "val" / "1" / "v.png", val_image)
    assert refused(cli, ws, str(tmp_path / "val")).endswith(
        f"{tmp_path}/val/1/v.png: is identical to a validation image: the yardstick would lie")
    png(tmp_path / "test" / "2" / "t.png", test.images[7].numpy())
    assert refused(cli, ws, str(tmp_path / "test")).endswith("is identical to a test image: "
                                                             "the yardstick would lie")
    i = project[1]["unused"][0]
    other = (int(full.labels[i]) + 1) % 10
    for label in (int(full.labels[i]), other):
        png(tmp_path / "twice" / str(label) / "same.png", full.images[i].numpy())
    first, second = sorted((int(full.labels[i]), other))  # class directories in order
    assert refused(cli, ws, str(tmp_path / "twice")).endswith(
        f"{tmp_path}/twice/{second}/same.png: is already labelled {CLASSES[first]!r}, here "
        f"{CLASSES[second]!r}")
    j = project[1]["train"][0]
    wrong = (int(full.labels[j]) + 3) % 10
    png(tmp_path / "relabel" / str(wrong) / "t.png", full.images[j].numpy())
    assert refused(cli, ws, str(tmp_path / "relabel")).endswith(
        f"{tmp_path}/relabel/{wrong}/t.png: is already labelled "
        f"{CLASSES[int(full.labels[j])]!r}, here {CLASSES[wrong]!r}")


def test_shuffled_labels_are_refused_unless_forced(ws, cli, official, project, tmp_path):
    full = official[0]
    index = project[1]["unused"][:200]
    shuffled = np.random.default_rng(0).permutation(full.labels[index].numpy())
    np.savez(tmp_path / "shuffled.npz", images=full.images[index].numpy(), labels=shuffled)
    line = refused(cli, ws, str(tmp_path / "shuffled.npz"))
    assert "the current model disagrees with" in line and "implausible" in line
    assert line.endswith("check the labels, or ingest with --force")
    np.savez(tmp_path / "true.npz", images=full.images[index].numpy(),
             labels=full.labels[index].numpy())
    code, out, err = cli(ws, "ingest", str(tmp_path / "true.npz"), "--dry-run")
    assert code == 0 and "disagreements plausible (p = " in out, out + err
    assert "implausible" not in out
    code, out, err = cli(ws, "ingest", str(tmp_path / "shuffled.npz"), "--force")
    assert code == 0, out + err
    assert len(batches(ws)) == 1



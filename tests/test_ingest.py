"""`fashionnet ingest` on real Fashion-MNIST images in a copy of the repository: every input it
takes, every refusal (exit 2, the file named, data/incoming/ unchanged), a batch ingested twice,
the label check, the dry run, a failure while writing, and the workspace lock."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fashionnet.data import CLASSES, save_split
from fashionnet.evaluate import evaluate
from fashionnet.incoming import SLUGS, load_batch
from fashionnet.recipe import TrainConfig
from fashionnet.split import SplitConfig, stratified_split
from fashionnet.train import init_model, train
from pipeline import paths
from pipeline.workspace import workspace_lock
from tests.helpers import copy_repo, git

SPLIT = SplitConfig(val_size=1000, limit=2000, seed=42)


@pytest.fixture(scope="module")
def project(official, tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """data/prepared/ of a small split, a model trained briefly on it and its metrics, as the
    pipeline writes them; and the index of the official training images in no split."""
    root = tmp_path_factory.mktemp("project")
    full, test = official
    train_idx, val_idx = stratified_split(full.labels.numpy(), SPLIT)
    save_split(root / paths.PREPARED["train"], full.subset(train_idx), train_idx)
    save_split(root / paths.PREPARED["val"], full.subset(val_idx), val_idx)
    save_split(root / paths.PREPARED["test"], test, np.arange(len(test)))
    model = init_model(1)
    train(model, full.subset(train_idx), full.subset(val_idx),
          TrainConfig(epochs=2, batch_size=64, device="cpu", precision="float32"))
    (root / paths.MODEL).parent.mkdir(parents=True)
    torch.save(model.state_dict(), root / paths.MODEL)
    val = evaluate(model, full.subset(val_idx)).accuracy
    (root / paths.METRICS_JSON).parent.mkdir(parents=True)
    (root / paths.METRICS_JSON).write_text(json.dumps({"accuracy": {"val": val}}))
    unused = np.setdiff1d(np.arange(len(full)), np.concatenate([train_idx, val_idx]))
    return root, {"train": train_idx, "val": val_idx, "unused": unused}


@pytest.fixture
def ws(tmp_path, project) -> Path:
    """A checkout with the project's data and model, committed."""
    repo = copy_repo(tmp_path / "repo")
    for part in (paths.PREPARED_DIR, paths.MODEL.parent):
        shutil.copytree(project[0] / part, repo / part)
    shutil.copy(project[0] / paths.METRICS_JSON, repo / paths.METRICS_JSON)
    return repo


def png(path: Path, image: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image)).save(path)
    return path


def state(repo: Path) -> dict[str, str]:
    """data/incoming/'s files and their digests, and anything staged beside it."""
    found = {str(p.relative_to(repo)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted((repo / "data").glob("incoming*/**/*")) if p.is_file()}
    return {**found, "siblings": " ".join(sorted(p.name for p in (repo / "data").iterdir()))}


def class_dirs(root: Path, official, index: np.ndarray, slugs: bool = False) -> Path:
    """PNG files of official training images ``index`` in class subdirectories."""
    full = official[0]
    for i in index:
        label = int(full.labels[i])
        png(root / (SLUGS[label] if slugs else str(label)) / f"{i}.png", full.images[i].numpy())
    return root


def batches(repo: Path) -> list[str]:
    return (repo / paths.MANIFEST).read_text().splitlines()[1:]


def test_class_directories_become_one_batch_with_its_manifest_row(ws, cli, official, project,
                                                                  tmp_path):
    index = project[1]["unused"][:40]
    source = class_dirs(tmp_path / "by-index", official, index[:20])
    class_dirs(tmp_path / "by-slug", official, index[20:], slugs=True)
    code, out, err = cli(ws, "ingest", str(source), str(tmp_path / "by-slug"))
    assert code == 0, out + err
    (row,) = batches(ws)
    batch = row.split(",")[0]
    images, labels = load_batch(ws / paths.INCOMING_DIR / f"{batch}.npz")
    full = official[0]  # read in path order: by-index/<class>/<i>.png, then by-slug/...
    expected = sorted(index[:20], key=lambda i: (int(full.labels[i]), str(i))) + \
        sorted(index[20:], key=lambda i: (SLUGS[int(full.labels[i])], str(i)))
    assert np.array_equal(images, full.images[expected].numpy())
    assert np.array_equal(labels, full.labels[expected].numpy())
    counts = np.bincount(full.labels[index].numpy(), minlength=10).tolist()
    assert row.split(",")[2:14] == [str(len(index)), "0", *map(str, counts)]
    assert f"add: 40 images as batch {batch}" in out
    # DVC tracks the batch; git, the manifest and the .dvc file.
    assert (ws / paths.INCOMING_DIR / f"{batch}.npz.dvc").exists()
    assert f"/{batch}.npz" in (ws / paths.INCOMING_DIR / ".gitignore").read_text().split()
    assert git(ws, "status", "--porcelain", "--ignored", "data/incoming").count(".npz") == 2
    # Nothing staged in git for the copy it was made in (core.autostage is on).
    assert git(ws, "diff", "--cached", "--name-only") == ""


def test_the_same_batch_again_changes_nothing(ws, cli, official, project, tmp_path):
    source = class_dirs(tmp_path / "in", official, project[1]["unused"][:10])
    assert cli(ws, "ingest", str(source))[0] == 0
    before = state(ws)
    code, out, _ = cli(ws, "ingest", str(source))
    assert code == 0 and "add: nothing new" in out
    assert "skip: 10 already in the training data or an earlier batch" in out
    assert state(ws) == before


def test_files_with_a_label_a_labels_csv_an_npz_and_an_idx_pair(ws, cli, official, project,
                                                               tmp_path):
    full = official[0]
    index = project[1]["unused"][:12]
    files = [png(tmp_path / "loose" / f"{i}.png", full.images[i].numpy()) for i in index[:3]]
    assert cli(ws, "ingest", *map(str, files), "--label", "Ankle boot")[0] == 0
    (tmp_path / "csv" / "labels.csv").parent.mkdir()
    rows = [(png(tmp_path / "csv" / f"{i}.png", full.images[i].numpy()).name, SLUGS[int(
        full.labels[i])]) for i in index[3:6]]
    (tmp_path / "csv" / "labels.csv").write_text("file,label\n" + "".join(
        f"{name},{slug}\n" for name, slug in rows))
    assert cli(ws, "ingest", str(tmp_path / "csv"), "--labels",
               str(tmp_path / "csv" / "labels.csv"))[0] == 0
    np.savez(tmp_path / "more.npz", images=full.images[index[6:9]].numpy(),
             labels=full.labels[index[6:9]].numpy())
    assert cli(ws, "ingest", str(tmp_path / "more.npz"))[0] == 0
    write_idx(tmp_path / "x-images-idx3-ubyte", full.images[index[9:]].numpy(), 3)
    write_idx(tmp_path / "x-labels-idx1-ubyte", full.labels[index[9:]].numpy(), 1)
    assert cli(ws, "ingest", str(tmp_path / "x-images-idx3-ubyte"),
               str(tmp_path / "x-labels-idx1-ubyte"))[0] == 0
    got = [load_batch(ws / paths.INCOMING_DIR / f"{row.split(',')[0]}.npz") for row in batches(ws)]
    assert [labels.tolist() for _, labels in got] == [
        [9] * 3, full.labels[index[3:6]].tolist(), full.labels[index[6:9]].tolist(),
        full.labels[index[9:]].tolist()]
    assert np.array_equal(np.concatenate([images for images, _ in got]),
                          full.images[index].numpy())


def write_idx(path: Path, array: np.ndarray, ndim: int) -> None:
    header = bytes([0, 0, 8, ndim]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, np.uint8).tobytes())


def refused(cli, ws: Path, *args: str) -> str:
    """The one line a refused ingest prints; the test fails unless it exits 2 and changes
    nothing in data/incoming/."""
    before = state(ws)
    code, out, err = cli(ws, "ingest", *args)
    assert code == 2, out + err
    (line,) = err.splitlines()
    assert state(ws) == before
    return line


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


def test_a_dry_run_reports_and_writes_nothing(ws, cli, official, project, tmp_path):
    source = class_dirs(tmp_path / "in", official, project[1]["unused"][:5])
    leak = png(tmp_path / "more" / "4" / "leak.png", official[1].images[0].numpy())
    before = state(ws)
    code, out, _ = cli(ws, "ingest", str(source), str(tmp_path / "more"), "--dry-run")
    assert code == 2 and state(ws) == before
    assert out.splitlines()[0].startswith("add: 5 images as batch ")
    assert out.splitlines()[-1].startswith(f"refuse: {leak}: is identical to a test image")
    code, out, _ = cli(ws, "ingest", str(source), "--dry-run")
    assert code == 0 and state(ws) == before and "add: 5 images" in out
    assert "label check: the current model disagrees with" in out
    (ws / paths.MODEL).unlink()  # a project that has not trained yet: no check, and it says so
    code, out, _ = cli(ws, "ingest", str(source), "--dry-run")
    assert code == 0 and "label check: skipped, no model yet" in out


def test_a_failure_while_writing_leaves_data_incoming_as_it_was(ws, cli, official, project,
                                                                tmp_path, monkeypatch):
    from fashionnet import files

    source = class_dirs(tmp_path / "in", official, project[1]["unused"][:5])
    before = state(ws)

    def fail(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files, "exchange", fail)  # after the batch is made and added to DVC
    code, _, err = cli(ws, "ingest", str(source))
    assert code == 1 and "No space left on device" in err
    assert state(ws) == before


def test_a_kill_between_the_fallback_renames_is_repaired_by_the_next_ingest(ws, cli, official,
                                                                          project, tmp_path):
    incoming = ws / paths.INCOMING_DIR
    # Where renameat2 is missing, the swap is three renames; killed after the first, the old
    # data/incoming/ is only there under its aside name.
    incoming.rename(incoming.with_name("incoming.swap"))
    source = class_dirs(tmp_path / "in", official, project[1]["unused"][:5])
    code, out, err = cli(ws, "ingest", str(source))
    assert code == 0, out + err
    assert sorted(p.name for p in (ws / "data").iterdir()) == ["incoming", "prepared"]
    assert len(batches(ws)) == 1


def test_a_second_ingest_in_the_workspace_is_refused(ws, cli, official, project, tmp_path,
                                                     monkeypatch):
    source = class_dirs(tmp_path / "in", official, project[1]["unused"][:5])
    before = state(ws)
    monkeypatch.chdir(ws)
    with workspace_lock("ingest"):
        code, _, err = cli(ws, "ingest", str(source))
    assert code == 1 and "`fashionnet ingest` (pid " in err and "is running" in err
    assert state(ws) == before



def test_a_push_that_broke_off_is_finished_by_the_next_ingest(ws, cli, official, project,
                                                              tmp_path, prefect_harness,
                                                              caplog):
    origin, storage = tmp_path / "origin.git", tmp_path / "storage"
    git(tmp_path, "init", "-q", "--bare", str(origin))
    subprocess.run(["dvc", "remote", "add", "-d", "storage", str(storage)], cwd=ws, check=True)
    git(ws, "commit", "-qam", "a DVC remote")
    git(ws, "remote", "add", "origin", str(origin))
    git(ws, "push", "-q", "-u", "origin", "HEAD")
    unused = project[1]["unused"]
    first = class_dirs(tmp_path / "first", official, unused[:5])
    second = class_dirs(tmp_path / "second", official, unused[5:10])
    assert cli(ws, "ingest", str(first))[0] == 0  # ingested, not shared
    hook = origin / "hooks" / "pre-receive"
    hook.write_text("#!/bin/sh\necho the remote is read-only today >&2\nexit 1\n")
    hook.chmod(0o755)
    code, _, err = cli(ws, "ingest", str(second), "--push")
    assert code == 1 and "git push" in err and "failed to push some refs" in err, err
    both = [row.split(",")[0] for row in batches(ws)]
    assert len(both) == 2 and git(ws, "status", "--porcelain", "data/incoming") == ""

    hook.unlink()
    code, out, err = cli(ws, "ingest", str(second), "--push")
    assert code == 0 and "add: nothing new" in out, out + err
    # Both: the first was never shared.
    assert f"batches {', '.join(both)} committed as" in caplog.text
    head = git(ws, "rev-parse", "HEAD").strip()
    assert f"pushed as commit {head[:8]}" in out
    assert git(origin, "rev-parse", "HEAD").strip() == head
    assert subprocess.run(["dvc", "status", "--cloud", "--json", *(
        f"{paths.INCOMING_DIR}/{b}.npz.dvc" for b in both)], cwd=ws, capture_output=True,
        text=True, check=True).stdout.strip() == "{}"  # the DVC remote has both

    code, out, _ = cli(ws, "ingest", str(second), "--push")
    assert code == 0 and "push: nothing to share, the remote has every batch" in out
    assert git(ws, "rev-parse", "HEAD").strip() == head

"""`fashionnet ingest` on real Fashion-MNIST images in a copy of the repository: every input it
takes, a batch ingested twice, the dry run, a failure while writing, the workspace lock and a
push. Its refusals: tests/test_ingest_refusals.py."""

from __future__ import annotations

import subprocess

import numpy as np

from fashionnet.incoming import SLUGS, load_batch
from pipeline import paths
from pipeline.workspace import workspace_lock
from tests.helpers import git
from tests.ingest_helpers import batches, class_dirs, png, state, write_idx


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

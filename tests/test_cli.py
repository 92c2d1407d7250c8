"""The `fashionnet` command's exit status and its one line on stderr, per the contract: in
process where the command's handling is the point, as a process where the process is (the
installed script's whole stderr, the code of the checkout it runs in)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from tests.helpers import BIN, REPO, run, set_params

# The commands of the contract (../shared/CONTRACT.md); more are allowed.
COMMANDS = ("download", "split", "train", "evaluate", "report", "retrain", "serve", "seeds",
            "sweep", "predict", "ingest")
STAGES = COMMANDS[:5]


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    """A directory with the repository's params.yaml and nothing else: what every command
    reads first."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    return tmp_path


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` and its content."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(("key", "value", "problem"), [
    ("train.lr", "fast",
     "Input should be a valid number, unable to parse string as a number (got 'fast')"),
    ("train.epochs", -1, "Input should be greater than or equal to 1 (got -1)"),
    ("split.limit", 2.5, "Input should be a valid integer (got 2.5)"),
    ("train.device", "tpu", "Input should be 'auto', 'cpu' or 'cuda' (got 'tpu')"),
    ("split.limit", 54_001, "54001 + split.val_size 6000 exceeds the 60,000 official training "
                            "images"),
])
def test_bad_params_exit_2_naming_the_key(workspace, cli, key, value, problem):
    set_params(workspace, **{key: value})
    before = files(workspace)
    assert cli(workspace, "train") == (
        2, "", f"fashionnet train: error: params.yaml: {key}: {problem}\n")
    assert files(workspace) == before  # nothing written


@pytest.mark.slow
def test_the_installed_command_exits_2_with_one_line_on_stderr(workspace):
    """The process as a whole: its exit status, and nothing else on stderr (no traceback).
    Slow: the interpreter's start-up and imports are most of 4 s."""
    set_params(workspace, **{"train.lr": "fast"})
    result = run(workspace, None, BIN / "fashionnet", "train")
    assert (result.returncode, result.stdout, result.stderr) == (
        2, "", "fashionnet train: error: params.yaml: train.lr: Input should be a valid number, "
               "unable to parse string as a number (got 'fast')\n")


@pytest.fixture(scope="module")
def flows(prefect_harness: None) -> None:
    """Flows in process, under Prefect's test harness. Prefect's console handler writes to the
    sys.stderr of the moment its logging is set up: set up here, outside any test's capsys, so
    that the flows' log lines stay out of the stderr the tests compare, and no later test
    logs to a closed capture."""
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)


def truncate_labels(raw: Path) -> Path:
    """Cut the last 10 labels' bytes off the training labels; the file."""
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])
    return labels


TRUNCATED = ("fashionnet split: error: data/raw/train-labels-idx1-ubyte: truncated: 59998 bytes, "
             "but its header (60000,) says 60008\n")


@pytest.mark.slow
def test_bad_and_missing_data_files_exit_2_naming_the_file(flows, workspace, cli, raw_dir):
    assert cli(workspace, "split") == (
        2, "", "fashionnet split: error: data/raw/train-images-idx3-ubyte: file not found (run "
               "`fashionnet download`)\n")
    shutil.copytree(raw_dir, workspace / "data" / "raw")
    labels = truncate_labels(workspace / "data" / "raw")
    assert cli(workspace, "split") == (2, "", TRUNCATED)
    assert not (workspace / "data" / "prepared").exists()  # nothing half-written
    # Well formed, the right count, every label in range: but not the labels of these images.
    official = (raw_dir / labels.name).read_bytes()
    labels.write_bytes(official[:8] + official[9:] + official[8:9])  # shifted by one
    assert cli(workspace, "split") == (
        2, "", "fashionnet split: error: data/raw/train-labels-idx1-ubyte: is well formed but not "
               "the official train-labels-idx1-ubyte (SHA-256 differs); run `fashionnet "
               "download`\n")
    assert not (workspace / "data" / "prepared").exists()


@pytest.mark.slow
def test_a_bad_data_file_in_a_real_process_leaves_one_line_and_no_traceback(repo_copy,
                                                                            cli_env, raw_dir):
    """A flow that fails on bad input: Prefect logs the failed run, but not its traceback."""
    shutil.copytree(raw_dir, repo_copy / "data" / "raw")
    truncate_labels(repo_copy / "data" / "raw")
    result = run(repo_copy, cli_env, "fashionnet", "split")
    assert (result.returncode, result.stderr) == (2, TRUNCATED)
    assert "Traceback" not in result.stdout


@pytest.mark.slow
def test_missing_or_damaged_stage_inputs_exit_2_naming_the_file(flows, workspace, cli,
                                                                 monkeypatch):
    # Nothing ran before: each stage names the (first) file it lacks.
    code, out, err = cli(workspace, "report")
    assert (code, out) == (2, "")
    assert re.fullmatch(r"fashionnet report: error: metrics/[\w.]+: file not found[^\n]*\n", err)
    model = workspace / "models" / "fashionnet.pt"
    model.parent.mkdir()
    model.write_bytes(b"\x80\x02not a model")
    code, out, err = cli(workspace, "evaluate")
    assert (code, out) == (2, "")
    assert err.startswith("fashionnet evaluate: error: models/fashionnet.pt: cannot be loaded")
    assert err.count("\n") == 1 and err.endswith("\n")
    prepared = workspace / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.npz").write_bytes(b"PK\x03\x04 truncated")
    code, out, err = cli(workspace, "train")
    assert (code, out) == (2, "")
    assert err.startswith("fashionnet train: error: data/prepared/train.npz: not a valid "
                          "prepared split")
    assert err.count("\n") == 1
    assert model.read_bytes() == b"\x80\x02not a model"  # nothing written over
    monkeypatch.setenv("FASHIONNET_SOURCE_DIR", "/nonexistent")
    assert cli(workspace, "download") == (
        2, "", "fashionnet download: error: FASHIONNET_SOURCE_DIR: /nonexistent is not a "
               "directory\n")


def test_other_failures_exit_1(flows, workspace, cli):
    code, out, err = cli(workspace, "bogus")
    assert (code, out) == (2, "")  # argparse's usage error
    assert err.startswith("usage: fashionnet [-h] COMMAND ...\n")
    assert err.splitlines()[-1].startswith(
        "fashionnet: error: argument COMMAND: invalid choice: 'bogus'")
    (workspace / "data").mkdir()
    (workspace / "data" / "raw").write_text("a file where the directory belongs")
    assert cli(workspace, "download") == (
        1, "", "fashionnet download: failed: NotADirectoryError: [Errno 20] Not a directory: "
               "'data/raw/train-images-idx3-ubyte'\n")


def test_help_lists_every_command(workspace, cli):
    code, out, err = cli(workspace, "--help")
    assert (code, err) == (0, "")
    # "    NAME  help", four spaces in; wrapped help lines are indented further.
    listed = dict(re.findall(r"^    (\w+)  +(\S.*)$", out, flags=re.MULTILINE))
    assert set(COMMANDS) <= set(listed), listed
    for stage in STAGES:
        assert listed[stage].startswith(f"DVC stage {stage}: ")


def test_runs_the_code_of_the_checkout_it_runs_in(repo_copy, tmp_path):
    """DVC runs queued experiments in temporary copies of the repository; their stages must run
    the copy's code (what dvc.lock hashes), not the installed package's."""
    arguments = repo_copy / "pipeline" / "arguments.py"
    arguments.write_text(arguments.read_text().replace('"train FashionNet:',
                                                       '"MARKER train FashionNet:'))
    fashionnet = BIN / "fashionnet"  # the installed script, on the installed package's path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = run(repo_copy, env, fashionnet, "--help")
    assert result.returncode == 0
    assert "    train     DVC stage train: MARKER train FashionNet:" in result.stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(elsewhere, env, fashionnet, "--help")
    assert result.returncode == 0
    assert "    train     DVC stage train: train FashionNet:" in result.stdout

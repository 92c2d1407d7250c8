"""The `fashionnet` command's exit status and its one line on stderr, per the contract."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import set_params


def run(repo: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["fashionnet", *args], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)


def assert_bad_input(result: subprocess.CompletedProcess[str], *names: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for name in names:
        assert name in lines[0]


@pytest.mark.parametrize(("key", "value"), [
    ("train.lr", "fast"), ("train.epochs", -1), ("split.limit", 2.5), ("train.device", "tpu"),
    ("split.limit", 54_001),
])
def test_bad_params_exit_2_naming_the_key(repo_copy, cli_env, key, value):
    set_params(repo_copy, **{key: value})
    assert_bad_input(run(repo_copy, cli_env, "train"), "params.yaml", key)


@pytest.mark.slow
def test_bad_and_missing_data_files_exit_2_naming_the_file(repo_copy, cli_env, raw_dir):
    assert_bad_input(run(repo_copy, cli_env, "split"),
                     "data/raw/train-images-idx3-ubyte", "file not found")
    raw = repo_copy / "data" / "raw"
    raw.mkdir(parents=True)
    for f in raw_dir.iterdir():
        (raw / f.name).write_bytes(f.read_bytes())
    labels = raw / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-10])  # truncated
    assert_bad_input(run(repo_copy, cli_env, "split"), str(labels.relative_to(repo_copy)),
                     "truncated")
    assert not (repo_copy / "data" / "prepared").exists()  # nothing half-written
    # Well formed, the right count, every label in range: but not the labels of these images.
    official = (raw_dir / "train-labels-idx1-ubyte").read_bytes()
    labels.write_bytes(official[:8] + official[9:] + official[8:9])  # shifted by one
    assert_bad_input(run(repo_copy, cli_env, "split"), str(labels.relative_to(repo_copy)),
                     "not the official")
    assert not (repo_copy / "data" / "prepared").exists()


@pytest.mark.slow
def test_missing_or_damaged_stage_inputs_exit_2_naming_the_file(repo_copy, cli_env):
    # Nothing ran before: each stage names the file it lacks.
    assert_bad_input(run(repo_copy, cli_env, "report"), "metrics/history.csv", "file not found")
    model = repo_copy / "models" / "fashionnet.pt"
    model.parent.mkdir()
    model.write_bytes(b"\x80\x02not a model")
    assert_bad_input(run(repo_copy, cli_env, "evaluate"), "models/fashionnet.pt",
                     "cannot be loaded")
    prepared = repo_copy / "data" / "prepared"
    prepared.mkdir(parents=True)
    (prepared / "train.npz").write_bytes(b"PK\x03\x04 truncated")
    assert_bad_input(run(repo_copy, cli_env, "train"), "data/prepared/train.npz")
    assert model.read_bytes() == b"\x80\x02not a model"  # nothing written over
    assert_bad_input(run(repo_copy, {**cli_env, "FASHIONNET_SOURCE_DIR": "/nonexistent"},
                         "download"), "FASHIONNET_SOURCE_DIR", "/nonexistent is not a directory")


def test_other_failures_exit_1(repo_copy, cli_env):
    result = run(repo_copy, cli_env, "bogus")
    assert result.returncode == 2 and "invalid choice" in result.stderr  # argparse usage
    (repo_copy / "data").mkdir()
    (repo_copy / "data" / "raw").write_text("a file where the directory belongs")
    result = run(repo_copy, cli_env, "download")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "NotADirectoryError" in result.stderr


def test_help_lists_every_stage(repo_copy, cli_env):
    out = run(repo_copy, cli_env, "--help").stdout
    for stage in ("download", "split", "train", "evaluate", "report"):
        assert stage in out


def test_runs_the_code_of_the_checkout_it_runs_in(repo_copy, cli_env, tmp_path):
    """DVC runs queued experiments in temporary copies of the repository; their stages must run
    the copy's code (what dvc.lock hashes), not the installed package's."""
    cli = repo_copy / "pipeline" / "cli.py"
    cli.write_text(cli.read_text().replace('"train FashionNet:', '"MARKER train FashionNet:'))
    env = {k: v for k, v in cli_env.items() if k != "PYTHONPATH"}  # the installed package only
    assert "MARKER" in run(repo_copy, env, "--help").stdout
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run(elsewhere, env, "--help")
    assert result.returncode == 0 and "MARKER" not in result.stdout

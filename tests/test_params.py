"""params.yaml: the repository's file is valid and complete; bad values name their key."""

import json
import os
import sys

import pytest
import yaml

from fashionnet.errors import ConfigError
from pipeline.params import Params, load_params
from tests.helpers import REPO, ok


def test_repository_params_are_valid_and_hold_the_contract_keys():
    params = load_params(REPO / "params.yaml")
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    contract = {
        "split": {"val_size", "limit", "seed"},
        "train": {"epochs", "batch_size", "lr", "weight_decay", "amsgrad", "step_size", "gamma",
                  "seed", "device"},
        "schedule": {"cron"},
    }
    for section, keys in contract.items():
        assert keys <= set(raw[section]), section
    # The reference recipe.
    t = params.train
    assert (t.epochs, t.lr, t.weight_decay, t.amsgrad, t.step_size, t.gamma) == (
        60, 0.003, 1e-5, True, 25, 0.1)
    assert (params.split.val_size, params.split.limit) == (6000, 0)


BAD = [
    ("train:\n  flip: symmetric\n", "train.flip", "now called 'random-except-footwear'"),
    ("train:\n  lr: -1\n", "train.lr", "greater than 0"),
    ("train:\n  lr: fast\n", "train.lr", "valid number"),
    ("train:\n  epochs: 2.5\n", "train.epochs", "valid integer"),
    ("train:\n  epochs: 0\n", "train.epochs", "greater than or equal to 1"),
    ("train:\n  amsgrad: 1\n", "train.amsgrad", "valid boolean"),
    ("train:\n  device: tpu\n", "train.device", "'auto', 'cpu' or 'cuda'"),
    ("train:\n  batch_size: 1\n", "train.batch_size", "greater than or equal to 2"),
    ("train:\n  gamma: 1.5\n", "train.gamma", "less than or equal to 1"),
    ("train:\n  momentum: 0.9\n", "train.momentum", "unknown key"),
    ("split:\n  limit: -5\n", "split.limit", "greater than or equal to 0"),
    ("split:\n  val_size: 5\n", "split.val_size", "greater than or equal to 10"),
    ("schedule:\n  cron: every monday\n", "schedule.cron", "not a five-field cron"),
    ("trian:\n  lr: 0.1\n", "trian", "unknown key"),
    ("train: [1, 2\n", "params.yaml", "not valid YAML at line"),
    ("- 1\n- 2\n", "params.yaml", "must be a mapping"),
    # Numbers that are not numbers.
    ("train:\n  lr: .inf\n", "train.lr", "finite number"),
    ("train:\n  weight_decay: .nan\n", "train.weight_decay", "got nan"),
    ("train:\n  lr: true\n", "train.lr", "expected a number, got True"),
    ("train:\n  seed: -1\n", "train.seed", "greater than or equal to 0"),
    ("split:\n  seed: 4294967296\n", "split.seed", "less than or equal to 4294967295"),
    ("train: 5\n", "train", "valid dictionary"),
    # Values that contradict each other or the data set.
    ("split:\n  val_size: 60000\n", "split.val_size", "leaves fewer than 10 of the 60,000"),
    ("split:\n  limit: 54001\n", "split.limit", "54001 + split.val_size 6000 exceeds"),
    ("split:\n  val_size: 50000\n  limit: 10001\n", "split.limit", "exceeds the 60,000"),
    ("split:\n  limit: 9\n", "split.limit", "one image of each of the 10 classes"),
    # A key given twice: YAML would silently keep the second.
    ("train:\n  lr: 0.1\n  epochs: 3\n  lr: 0.2\n", "params.yaml",
     "key 'lr' appears twice in one section (line 4)"),
    ("download:\n  mirrors: [ftp://example.org/]\n", "download.mirrors", "not an http://"),
]


@pytest.mark.parametrize(("text", "key", "message"), BAD, ids=[b[1] + ":" + b[2] for b in BAD])
def test_bad_values_name_file_and_key(tmp_path, text, key, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_params(path)
    line = str(error.value)
    assert "\n" not in line
    assert str(path) in line and key in line and message in line


def test_missing_file_and_defaults(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").mkdir()
    with pytest.raises(ConfigError, match=r"params\.yaml: not a regular file: a directory"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").rmdir()
    (tmp_path / "params.yaml").write_bytes(b"train:\n  lr: \xff\n")
    with pytest.raises(ConfigError, match=r"params\.yaml: is not UTF-8 text"):
        load_params(tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("")
    assert load_params(tmp_path / "params.yaml") == Params()


def test_numbers_yaml_reads_as_strings_are_accepted(tmp_path):
    (tmp_path / "params.yaml").write_text("train:\n  lr: 3e-3\n  weight_decay: 0\n"
                                          "split:\n  val_size: 100\n  limit: 59900\n")
    params = load_params(tmp_path / "params.yaml")
    assert params.train.lr == 0.003 and params.train.weight_decay == 0.0
    assert params.split.limit == 59_900  # exactly what is left beside the validation set


def test_params_are_frozen():
    params = Params()
    with pytest.raises(Exception, match="frozen"):
        params.train.lr = 1.0  # type: ignore[misc]


def test_params_load_without_prefect():
    """Scripts that never run a flow read params.yaml without Prefect installed or imported."""
    code = ("import sys; from pipeline.params import load_params, load_recipe; "
            "load_params(); load_recipe('recipes/plus.yaml'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))")
    assert ok(REPO, None, sys.executable, "-c", code).strip() == "[]"


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True))  # 10^9 values once expanded
UNBOUNDED = {
    "aliases": (BOMB, "uses YAML anchors or aliases (&name, *name), which it has no need of "
                      "(line 1)"),
    "deep": ("train: " + "[" * 100_000 + "]" * 100_000 + "\n",
             "nests deeper than 16 levels or holds more than 2,000 values (line 1): not a "
             "params file"),
    "many": ("split:\n" + "".join(f"  k{i}: {i}\n" for i in range(5_000)),
             "nests deeper than 16 levels or holds more than 2,000 values (line 1000): not a "
             "params file"),
    "huge": ("# " + "x" * (1 << 21) + "\n", "is over 1,048,576 bytes: not a params file"),
}
# In a fresh interpreter: each file refused, the CPU seconds it took (wall-clock time would
# measure the machine's load: 0.55 s for 0.2 s of work beside a busy test run), and how far
# the process's peak memory grew over all of them (KiB).
MEASURE = """
import json, resource, sys, time
from fashionnet.errors import ConfigError
from pipeline.params import load_params
load_params(sys.argv[1])  # the repository's own, first: imports and first-use set-up
before, found = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, {}
for path in sys.argv[2:]:
    start = time.process_time()
    try:
        load_params(path)
    except ConfigError as e:
        found[path] = [e.problem, time.process_time() - start]
print(json.dumps({"refused": found,
                  "grown": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}))
"""


def test_files_whose_cost_is_not_bounded_by_their_size_are_refused_at_once(tmp_path):
    """An alias bomb (10^9 values), 100,000 levels of nesting, 5,000 keys, 2 MB: each refused
    in well under a second of CPU, the process growing by at most the file it read."""
    files = []
    for name, (text, _) in UNBOUNDED.items():
        files.append(tmp_path / f"{name}.yaml")
        files[-1].write_text(text)
    measured = json.loads(ok(tmp_path, None, sys.executable, "-c", MEASURE,
                             str(REPO / "params.yaml"), *map(str, files)))
    for path, (_, problem) in zip(files, UNBOUNDED.values(), strict=True):
        refused, seconds = measured["refused"][str(path)]
        assert refused == problem and seconds < 0.5, (path.name, refused, seconds)
    assert measured["grown"] < 20 * 1024, measured  # KiB: the 2 MB file, read whole, and a bit


def test_an_unbounded_params_yaml_exits_2_naming_it(tmp_path, cli):
    (tmp_path / "params.yaml").write_text(BOMB)
    code, _, err = cli(tmp_path, "train")
    assert code == 2
    assert err.splitlines() == ["fashionnet train: error: params.yaml: uses YAML anchors or "
                                "aliases (&name, *name), which it has no need of (line 1)"]


def test_an_error_quotes_an_excerpt_of_a_bad_value_never_all_of_it(tmp_path):
    huge = "y" * 100_000
    for text in (f"train:\n  lr: {huge}\n", f"train:\n  {huge}: 1\n",
                 f"schedule:\n  cron: '{huge}'\n"):
        (tmp_path / "params.yaml").write_text(text)
        with pytest.raises(ConfigError) as error:
            load_params(tmp_path / "params.yaml")
        assert str(error.value).count("y") <= 80, str(error.value)[:300]


def test_a_named_pipe_as_params_yaml_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "params.yaml")  # nothing will ever write to it
    with pytest.raises(ConfigError, match="not a regular file: a named pipe"):
        load_params(tmp_path / "params.yaml")


def test_an_override_does_not_hide_a_malformed_section(tmp_path):
    (tmp_path / "params.yaml").write_text("train: 3\n")
    with pytest.raises(ConfigError) as error:
        load_params(tmp_path / "params.yaml", {"train.seed": 7})
    assert str(error.value) == (f"{tmp_path / 'params.yaml'}: train: must be a mapping of keys, "
                                "got 3")
    (tmp_path / "params.yaml").write_text("train:\n")  # empty: the override is all it holds
    assert load_params(tmp_path / "params.yaml", {"train.seed": 7}).train.seed == 7

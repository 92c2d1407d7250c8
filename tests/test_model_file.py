"""The model file, models/fashionnet.pt: every way it can be damaged is refused naming it, and
the model is left as it was; a good one loads."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fashionnet import FashionNet
from fashionnet.checkpoint import load_weights
from fashionnet.errors import DataError
from tests.test_checkpoint import Exploit


def write_state(path: Path, change: Callable[[dict], object]) -> None:
    state = FashionNet().state_dict()
    torch.save(change(state), path)


def _set(state: dict, key: str, value: object) -> dict:
    state[key] = value
    return state


# What each damage does, and the problem the refusal states after the file's name: whole
# (ending in $) where the words are ours, up to torch's own message where it is quoted.
MODEL_DAMAGE = {
    "missing": (lambda p: None, re.escape("file not found (run `fashionnet train`)") + "$"),
    "empty": (lambda p: p.write_bytes(b""), r"cannot be loaded \("),
    "truncated": (lambda p: write_state(p, dict) or p.write_bytes(p.read_bytes()[:5000]),
                  r"cannot be loaded \("),
    "a tensor": (lambda p: torch.save(torch.zeros(3), p),
                 re.escape("is not a state_dict (a mapping of names to tensors)") + "$"),
    "missing key": (lambda p: write_state(p, lambda s: {k: v for k, v in s.items()
                                                        if k != "fc.bias"}),
                    re.escape("does not fit FashionNet: missing ['fc.bias'], unexpected []") + "$"),
    "extra key": (lambda p: write_state(p, lambda s: _set(s, "fc2.weight", torch.zeros(1))),
                  re.escape("does not fit FashionNet: missing [], unexpected ['fc2.weight']")
                  + "$"),
    "wrong shape": (lambda p: write_state(p, lambda s: _set(s, "fc.bias", torch.zeros(11))),
                    re.escape("fc.bias is torch.float32 (11,), expected torch.float32 (10,)")
                    + "$"),
    "wrong dtype": (lambda p: write_state(p, lambda s: _set(s, "fc.bias", torch.zeros(10,
                                                          dtype=torch.float64))),
                    re.escape("fc.bias is torch.float64 (10,), expected torch.float32 (10,)")
                    + "$"),
    "NaN weights": (lambda p: write_state(p, lambda s: _set(s, "conv1.weight",
                                                          s["conv1.weight"] * float("nan"))),
                    "conv1.weight holds NaN or infinite values$"),
    "code to run": (lambda p: torch.save({"fc.bias": Exploit(p.with_name("pwned"))}, p),
                    r"cannot be loaded \(UnpicklingError: (?i:.*unsupported global)"),
}


@pytest.mark.parametrize("damage", MODEL_DAMAGE, ids=list(MODEL_DAMAGE))
def test_bad_model_files_are_refused_naming_the_file(tmp_path, damage):
    path = tmp_path / "fashionnet.pt"
    harm, problem = MODEL_DAMAGE[damage]
    harm(path)
    model = FashionNet()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DataError, match=f"^{re.escape(str(path))}: {problem}") as error:
        load_weights(path, model)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not (tmp_path / "pwned").exists()


def test_good_model_file_loads(tmp_path):
    torch.manual_seed(1)
    saved = FashionNet()
    torch.save(saved.state_dict(), tmp_path / "fashionnet.pt")
    loaded = load_weights(tmp_path / "fashionnet.pt", FashionNet())
    for name, tensor in saved.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor)


def test_the_model_file_depends_on_the_weights_alone(tmp_path: Path):
    """The same weights make the same bytes, whatever the file's name and whenever written, so
    the train stage's md5 in dvc.lock changes only when the model does."""
    from fashionnet.train import init_model
    from pipeline.train import save_model

    model = init_model(3)
    save_model(model, tmp_path / "fashionnet.pt")
    save_model(model, tmp_path / "other.pt")
    assert (tmp_path / "fashionnet.pt").read_bytes() == (tmp_path / "other.pt").read_bytes()
    load_weights(tmp_path / "other.pt", FashionNet())  # and a file the model loads

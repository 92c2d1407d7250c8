"""Safe saving and loading of the model file and of training checkpoints.

Everything is read with ``torch.load(..., weights_only=True)``, which rebuilds tensors and plain
containers only, never arbitrary objects or code. A checkpoint also carries a SHA-256 digest of
its content: torch's zip reader does not check CRCs, so a flipped byte inside a tensor would
otherwise load without complaint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fashionnet.errors import DataError
from fashionnet.files import atomic_path
from fashionnet.runtime import describe_device

log = logging.getLogger("fashionnet")

FORMAT = 1  # bump when the checkpoint's layout changes: older ones are then ignored
# The library files a training run executes: fashionnet/train.py and what it imports, less the
# plumbing (errors.py, files.py) that cannot change a result. The train stage's deps in dvc.yaml
# are the same files; tests/test_dvc.py checks both against the imports.
TRAINING_CODE = ("augment.py", "average.py", "checkpoint.py", "data.py", "evaluate.py",
                 "fields.py", "inference.py", "model.py", "recipe.py", "run_state.py",
                 "runtime.py", "train.py")


def _update(h: Any, obj: object) -> None:
    """Feed a nest of dicts, lists, tuples, tensors and plain values into the hash ``h``."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        h.update(t.view(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"dict {len(obj)};".encode())
        for key, value in obj.items():  # pickling keeps insertion order
            _update(h, key)
            _update(h, value)
    elif isinstance(obj, list | tuple):
        h.update(f"{type(obj).__name__} {len(obj)};".encode())
        for value in obj:
            _update(h, value)
    else:
        h.update(f"{type(obj).__name__} {obj!r};".encode())


def digest(obj: object) -> str:
    """SHA-256 of ``obj``'s structure and content (tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _update(h, obj)
    return h.hexdigest()


def fingerprint(params: Mapping[str, Any], data: Iterable[torch.Tensor],
                device: torch.device) -> dict[str, str]:
    """What decides a training run's trajectory: its params, the exact data, the code it runs
    (:data:`TRAINING_CODE`), torch, the device and the CPU thread count (reductions may group
    differently).

    A checkpoint is resumed only by a run with the same fingerprint, so the resumed run ends
    exactly where an uninterrupted one would.
    """
    code = hashlib.sha256()
    for name in TRAINING_CODE:
        code.update(name.encode() + (Path(__file__).parent / name).read_bytes())
    data_hash = hashlib.sha256()
    for tensor in data:
        _update(data_hash, tensor)
    return {
        "params": json.dumps(dict(params), sort_keys=True),
        "data": data_hash.hexdigest(),
        "code": code.hexdigest(),
        "torch": str(torch.__version__),
        "device": describe_device(device),
        "threads": str(torch.get_num_threads()),
    }


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any],
                    run: Mapping[str, str]) -> None:
    """Write ``state`` with the fingerprint ``run`` of the run that made it, atomically."""
    body = {"format": FORMAT, "fingerprint": dict(run), "state": dict(state)}
    with atomic_path(path) as tmp:
        torch.save({**body, "digest": digest(body)}, tmp)


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load`` with ``weights_only=True``; any failure is a DataError naming ``path``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(path, f"file not found{what}") from None
    except Exception as e:  # truncated zip, bad pickle opcode, a refused non-tensor object...
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        # weights_only's refusal names what it refused (a GLOBAL) deep in a long message.
        why = next((line for line in lines if "GLOBAL" in line), lines[0])
        raise DataError(path, f"cannot be loaded ({type(e).__name__}: {why[:200]})") from None


def read_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """(state, fingerprint) from a checkpoint; DataError unless it is intact and ours."""
    path = Path(path)
    saved = _torch_load(path, "")
    if not isinstance(saved, dict) or set(saved) != {"format", "fingerprint", "state", "digest"}:
        raise DataError(path, "is not a FashionNet training checkpoint")
    if saved["format"] != FORMAT:
        raise DataError(path, f"has checkpoint format {saved['format']!r}, expected {FORMAT}")
    body = {key: saved[key] for key in ("format", "fingerprint", "state")}
    if digest(body) != saved["digest"]:
        raise DataError(path, "is corrupt or was modified: its content does not match its digest")
    return saved["state"], saved["fingerprint"]


def resumable(path: str | os.PathLike[str], run: Mapping[str, str]) -> dict[str, Any] | None:
    """The state saved at ``path`` if a run with fingerprint ``run`` can resume from it.

    Anything else is ignored with a log line saying why, and training starts from scratch:
    a checkpoint only saves time, and starting over gives the same result.
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        state, made_by = read_checkpoint(path)
    except DataError as e:
        log.warning("%s; ignored, training from scratch", e)
        return None
    differ = [key for key in run if made_by.get(key) != run[key]]
    if differ:
        log.warning("%s: ignored, made by a run with different %s; training from scratch",
                    path, ", ".join(differ))
        return None
    return state


def load_weights(path: str | os.PathLike[str], model: nn.Module) -> nn.Module:
    """Load the state_dict file ``path`` into ``model``: DataError naming the file unless it
    holds exactly ``model``'s tensors, with their shapes and dtypes, all finite."""
    path = Path(path)
    state = _torch_load(path, " (run `fashionnet train`)")
    expected = model.state_dict()
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DataError(path, "is not a state_dict (a mapping of names to tensors)")
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise DataError(path, f"does not fit FashionNet: missing {missing}, unexpected {extra}")
    for name, tensor in state.items():
        want = expected[name]
        if tensor.shape != want.shape or tensor.dtype != want.dtype:
            raise DataError(path, f"{name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                  f"{want.dtype} {tuple(want.shape)}")
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise DataError(path, f"{name} holds NaN or infinite values")
    model.load_state_dict(state)
    return model


"""params.yaml, parsed once into frozen, validated models: the single source of truth."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from ruamel.yaml import YAML, YAMLError
from ruamel.yaml.constructor import DuplicateKeyError

from fashionnet.errors import ConfigError
from fashionnet.evaluate import EvaluateConfig
from fashionnet.incoming import IncomingConfig
from fashionnet.recipe import TrainConfig
from fashionnet.split import SplitConfig

PARAMS_FILE = Path("params.yaml")
# Bounds on what a params or recipe file may cost to read: params.yaml is about 2 KB, 60 values.
MAX_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_NODES = 2_000


class DownloadConfig(BaseModel):
    """Where the raw files come from, tried in order: ``source_dir`` (or the environment
    variable FASHIONNET_SOURCE_DIR), Debian's dataset-fashion-mnist, then the mirrors."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source_dir: str | None = None
    mirrors: tuple[str, ...] = Field(
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",), min_length=1
    )

    @field_validator("mirrors")
    @classmethod
    def _http_urls(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for url in value:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{excerpt(url)} is not an http:// or https:// URL")
        return value


class ScheduleConfig(BaseModel):
    """When the scheduled deployment retrains."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cron: str = "0 3 * * 1"  # UTC

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        # cronsim, not Prefect's CronSchedule: reading params.yaml must not import Prefect.
        try:
            CronSim(value, datetime.now(timezone.utc))
        except CronSimError as e:
            raise ValueError(f"{excerpt(value)} is not a five-field cron expression "
                             f"({e})") from None
        return value


class RetrainConfig(BaseModel):
    """The promotion gate of the retraining flow."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Fractions of validation accuracy against the model committed at HEAD: 0.005 = half a
    # percentage point. A retrain that falls further, or (min_improvement > 0) gains less, is
    # refused and the committed model stays. The test set never decides.
    max_accuracy_drop: float = Field(0.005, ge=0, le=1)
    min_improvement: float = Field(0.0, ge=0, le=1)


class Params(BaseModel):
    """Every section of params.yaml."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    download: DownloadConfig = DownloadConfig()
    split: SplitConfig = SplitConfig()
    incoming: IncomingConfig = IncomingConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    retrain: RetrainConfig = RetrainConfig()


def _describe(error: dict) -> str:
    key = cut(".".join(str(part) for part in error["loc"]))
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key"
    if error["type"] == "missing":
        return f"{key}: missing"
    if error["type"] == "value_error":  # our validators' messages quote the value already
        return f"{key}: {error['msg'].removeprefix('Value error, ')}"
    return f"{key}: {error['msg']} (got {excerpt(error['input'], 80)})"


def cut(name: str, limit: int = 60) -> str:
    """A key's name as given, cut to ``limit`` characters."""
    return name if len(name) <= limit else name[: limit - 3] + "..."


def excerpt(value: object, limit: int = 60) -> str:
    """``value``'s repr, cut to ``limit`` characters: an error quotes a value, never all of it."""
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _bounded(text: str, path: Path) -> None:
    """Refuse, before anything is built from it, YAML whose cost is not bounded by its size:
    anchors and aliases (a few lines can expand to billions of nodes), nesting deeper than
    MAX_DEPTH, more than MAX_NODES values. Parsing stops at the first excess."""
    from ruamel.yaml.events import AliasEvent, CollectionEndEvent, CollectionStartEvent, NodeEvent

    depth = nodes = 0
    for event in YAML(typ="safe").parse(text):
        if isinstance(event, AliasEvent) or getattr(event, "anchor", None):
            raise ConfigError(str(path), "uses YAML anchors or aliases (&name, *name), which "
                                         f"it has no need of (line {event.start_mark.line + 1})")
        depth += isinstance(event, CollectionStartEvent) - isinstance(event, CollectionEndEvent)
        nodes += isinstance(event, NodeEvent)
        if depth > MAX_DEPTH or nodes > MAX_NODES:
            raise ConfigError(str(path), f"nests deeper than {MAX_DEPTH} levels or holds more "
                                         f"than {MAX_NODES:,} values (line "
                                         f"{event.start_mark.line + 1}): not a params file")


def _read_yaml(path: Path, missing: str = "file not found") -> object:
    """A YAML file's content; a problem raises ConfigError naming the file (and line). Only a
    regular file of at most MAX_BYTES is read, and only YAML of bounded cost is built."""
    from fashionnet.errors import DataError
    from fashionnet.idx import open_regular

    try:
        with open_regular(path) as f:  # a FIFO or a device would block or never end
            data = f.read(MAX_BYTES + 1)
        if len(data) > MAX_BYTES:
            raise ConfigError(str(path), f"is over {MAX_BYTES:,} bytes: not a params file")
        text = data.decode("utf-8")
        _bounded(text, path)
        # ruamel.yaml, as DVC reads params.yaml (YAML 1.2), refuses a key given twice in one
        # mapping, which PyYAML would silently resolve to the last.
        return YAML(typ="safe").load(text)
    except FileNotFoundError:
        raise ConfigError(str(path), missing) from None
    except DataError as e:
        raise ConfigError(str(path), e.problem) from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "is not UTF-8 text") from None
    except OSError as e:
        raise ConfigError(str(path), f"cannot be read: {e.strerror}") from None
    except DuplicateKeyError as e:
        key = re.match(r'found duplicate key "(.*?)"', e.problem or "")
        raise ConfigError(str(path), f"key {excerpt(key[1] if key else '?')} appears twice in "
                                     f"one section (line {e.problem_mark.line + 1})") from None
    except YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        raise ConfigError(str(path), f"not valid YAML{line}") from None


def load_params(path: str | os.PathLike[str] = PARAMS_FILE,
                overrides: Mapping[str, object] | None = None) -> Params:
    """Read and validate params.yaml with ``overrides`` ({"train.seed": 7}) set on top, as
    `dvc exp run -S` would; a problem raises ConfigError naming the file or override, and key."""
    path = Path(path)
    overrides = dict(overrides or {})
    raw = _read_yaml(path, missing="file not found (run from the repository root)")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "must be a mapping of sections (split, train, ...)")
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if not section or not key or "." in key:
            raise ConfigError(f"override {cut(dotted)}",
                              "not a section.key name (e.g. train.seed)")
        if section not in raw or raw[section] is None:
            raw[section] = {}
        elif not isinstance(raw[section], dict):  # an override must not hide the file's error
            raise ConfigError(f"{path}: {cut(section)}", "must be a mapping of keys, got "
                                                         f"{excerpt(raw[section])}")
        raw[section][key] = value
    try:
        return Params.model_validate(raw)
    except ValidationError as e:
        first = _describe(e.errors()[0])
        key, problem = first.split(": ", 1)
        overridden = any(o == key or o.startswith(f"{key}.") for o in overrides)
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise ConfigError(f"override {key}" if overridden else f"{path}: {key}",
                          problem + more) from None


def recipe_name(path: str | Path) -> str:
    """The name a recipe file's experiments and tables carry: its file name's stem."""
    name = Path(path).stem
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ConfigError(str(path), "a recipe's file name must be lowercase letters, digits "
                                     "and dashes (it names experiments and files)")
    return name


def load_recipe(path: str | os.PathLike[str],
                params_path: str | os.PathLike[str] = PARAMS_FILE) -> dict[str, object]:
    """A named recipe: a YAML mapping of ``section.key: value`` overrides of params.yaml, as
    `dvc exp run -S section.key=value` sets them (recipes/plus.yaml). Returned in file order
    once they validate on top of ``params_path``; a problem raises ConfigError naming the
    recipe file and the key."""
    path = Path(path)
    raw = _read_yaml(path)
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(str(path), "must be a non-empty mapping of section.key: value "
                                     "(e.g. train.flip: random)")
    recipe: dict[str, object] = {}
    for key, value in raw.items():
        section, _, name = str(key).partition(".")
        if not isinstance(key, str) or not section or not name or "." in name:
            raise ConfigError(f"{path}: {cut(str(key))}",
                              "not a section.key name (e.g. train.flip)")
        if not (value is None or isinstance(value, str | int | float | bool)):
            raise ConfigError(f"{path}: {cut(str(key))}",
                              f"must be a single value, got {excerpt(value)}")
        recipe[key] = value
    try:
        load_params(params_path, recipe)
    except ConfigError as e:
        if not e.key.startswith("override "):
            raise  # params.yaml itself is at fault: the error names it
        raise ConfigError(f"{path}: {e.key.removeprefix('override ')}", e.problem) from None
    return recipe

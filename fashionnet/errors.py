"""Errors for bad input: the pipeline's CLI turns these into exit status 2 and one line."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """Bad input from the user: a data file or a configuration value."""


class DataError(InputError):
    """A data file is missing or malformed; the message names the file."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class ConfigError(InputError):
    """A configuration value is invalid; the message names the key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")

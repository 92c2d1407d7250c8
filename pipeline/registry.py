"""The model registry: GTO tags in git say which commit holds each version of the ``fashionnet``
artifact and which version is at which stage; DVC holds the files. Resolving `--model`
therefore needs only a clone (its tags) and the DVC remote, not a workspace that trained.

    prod                 the version at stage prod (any stage name works)
    fashionnet@v1.3.0    that version (``v1.3.0`` alone too)
    models/fashionnet.pt a file, as it is
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from fashionnet.errors import DataError, InputError
from pipeline import paths

CACHE = Path(".dvc/tmp/fashionnet-models")  # fetched versions, by md5: ignored by git and DVC
_VERSION = re.compile(rf"(?:{paths.ARTIFACT}@)?(v\d+\.\d+\.\d+)")
_STAGE = re.compile(r"[a-z][a-z0-9_-]*")


@dataclass(frozen=True)
class Model:
    """A model file, and what it is in words (for the user)."""

    path: Path
    description: str


def resolve(spec: str) -> Model:
    """The model file ``spec`` names (see the module's docstring). A version or stage that the
    registry lacks, or a file that is neither here nor on the DVC remote, raises InputError
    naming ``--model``."""
    path = Path(spec)
    version = _VERSION.fullmatch(spec)
    if path.exists() or not (version or _STAGE.fullmatch(spec)):
        return Model(path, str(path))
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from scmrepo.exceptions import SCMError

    try:
        with Repo(".") as repo:
            rev = repo.artifacts.get_rev(paths.ARTIFACT, version=version and version[1],
                                         stage=None if version else spec)
    except (DvcException, SCMError) as e:
        what = f"version {version[1]}" if version else f"no version at stage {spec!r}"
        raise InputError(f"--model {spec}: {what} of {paths.ARTIFACT} in this repository's "
                         f"registry (`gto show` lists it): {str(e).splitlines()[0]}") from None
    data = _read(rev, spec)
    md5 = hashlib.md5(data).hexdigest()
    target = CACHE / f"{md5}.pt"
    if not target.exists():
        from fashionnet.files import write_bytes

        write_bytes(target, data)
    label = f"{paths.ARTIFACT}@{version[1]}" if version else f"stage {spec}"
    return Model(target, f"{label} ({paths.MODEL} at {rev[:8]}, md5 {md5})")


def _read(rev: str, spec: str) -> bytes:
    """models/fashionnet.pt at commit ``rev``, from DVC's cache or its remote."""
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        return dvc.api.read(str(paths.MODEL), rev=rev, mode="rb")
    except DvcException as e:
        raise DataError(paths.MODEL, f"of --model {spec} ({rev[:8]}) is neither in the DVC "
                                     f"cache nor on the DVC remote: {str(e).splitlines()[0]}"
                        ) from None

"""Stage `download`: the four official IDX files into data/raw/, verified."""

from __future__ import annotations

import os
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from fashionnet import download
from fashionnet.errors import ConfigError, DataError
from fashionnet.idx import RAW_FILES
from pipeline import paths
from pipeline.params import DownloadConfig, Params


def _network_error(task, task_run, state) -> bool:
    """Retry a download only for network trouble, not for a file that fails verification."""
    try:
        state.result()
    except DataError:
        return False
    except Exception:
        return True
    return False


@task(cache_policy=NO_CACHE)
def copy_local(name: str, source: Path) -> Path:
    """Verify a local copy (plain or .gz) and install it into data/raw/."""
    get_run_logger().info("%s: from %s", name, source)
    return download.install(paths.RAW_DIR, name, download.read_verified(source, name))


@task(cache_policy=NO_CACHE, retries=3, retry_delay_seconds=[2, 10, 30],
      retry_condition_fn=_network_error)
def fetch_remote(name: str, mirrors: tuple[str, ...]) -> Path:
    """Download from the first mirror that answers; only this touches the network."""
    logger = get_run_logger()
    errors = []
    for mirror in mirrors:
        logger.info("%s: downloading from %s", name, mirror)
        try:
            data = download.fetch(name, mirror)
        except DataError:
            raise
        except Exception as e:  # network trouble: try the next mirror, then retry the task
            errors.append(f"{mirror}: {e!r}")
            continue
        return download.install(paths.RAW_DIR, name, data)
    raise ConnectionError(f"{name}: no mirror could be reached: " + "; ".join(errors))


def local_sources(cfg: DownloadConfig) -> list[Path]:
    """Directories searched before the network, in order; one named that is not a directory
    is an error, not a reason to go to the network."""
    named, key = os.environ.get("FASHIONNET_SOURCE_DIR"), "FASHIONNET_SOURCE_DIR"
    if not named:
        named, key = cfg.source_dir, "download.source_dir"
    if named and not Path(named).is_dir():
        raise ConfigError(key, f"{named} is not a directory")
    return [Path(d) for d in (named, download.DEBIAN_DIR) if d]


@flow(name="download")
def download_flow(params: Params) -> list[Path]:
    """Each file from the first source that has it, verified and written atomically."""
    logger = get_run_logger()
    written = []
    for name in RAW_FILES:
        target = paths.RAW_DIR / name
        if download.is_official(target, name):
            logger.info("%s: already present and verified", name)
            written.append(target)
            continue
        source = download.find_local(name, local_sources(params.download))
        if source is not None:
            written.append(copy_local(name, source))
        else:
            written.append(fetch_remote(name, params.download.mirrors))
    return written

"""Sharing new data: what a DVC user does by hand after `dvc add` (`git commit`, `dvc push`,
`git push`), then the Prefect event that tells the retraining deployment about it.

The event, ``fashionnet.data.ingested``, is about the repository: its resource id is
``fashionnet.repository.<URL of git remote origin>``, the same id the deployment's trigger in
prefect.yaml matches (``{{ git-remote.stdout }}`` is that URL where `prefect deploy` runs), so a
deployment reacts to its own repository only. Its payload names the commit and the batches.
"""

from __future__ import annotations

import json
import logging

from fashionnet.errors import ConfigError
from pipeline import manifest, paths, workspace

log = logging.getLogger("fashionnet")
EVENT = "fashionnet.data.ingested"
RESOURCE_PREFIX = "fashionnet.repository."


def resource_id(url: str) -> str:
    """The event resource of the repository whose git remote is at ``url``."""
    return f"{RESOURCE_PREFIX}{url}"


def check_push() -> None:
    """Refuse (ConfigError, exit 2) unless a push can go through: a branch, a git remote, a
    default DVC remote and the Prefect server the retraining deployment listens on."""
    from pipeline.prefect_server import configured_api_url

    try:
        workspace.current_branch()
    except RuntimeError as e:
        raise ConfigError("--push", str(e)) from None
    if workspace.git_remote() is None:
        raise ConfigError("--push", "needs a git remote: `git remote add origin URL`")
    if workspace.default_dvc_remote() is None:
        raise ConfigError("--push", "needs a default DVC remote: `dvc remote add -d NAME URL` "
                                    "(docs/distributed.md)")
    if not configured_api_url():
        raise ConfigError("--push", "emits an event to the Prefect server of the retraining "
                                    "deployment: set PREFECT_API_URL (and "
                                    "PREFECT_API_AUTH_STRING)")


def _batches(text: str | None) -> list[str]:
    return list(manifest.read_text(text)["batch"]) if text else []


def _on_remote(remote: str, ref: str) -> list[str]:
    """The batches the manifest of branch ``ref`` on git remote ``remote`` lists now."""
    commit = workspace.remote_ref(remote, ref)
    if commit is None:  # a branch not pushed yet
        return []
    workspace.git("fetch", "--quiet", remote, ref)
    return _batches(workspace.show(commit, paths.MANIFEST))


def share_incoming() -> str | None:
    """Share every batch the remote branch lacks, as a DVC user would by hand: commit
    data/incoming/ where it has changes, `dvc push` those batches, `git push` the branch, and
    emit the event naming them. The commit pushed; None when every batch is there already.

    Each step finds what an earlier, failed attempt left undone (a batch ingested without
    --push, a push that broke off), so `fashionnet ingest --push` run again finishes it."""
    remote = workspace.git_remote() or "origin"
    ref = workspace.upstream_ref(workspace.current_branch())
    batches = manifest.read(paths.MANIFEST)
    pending = [b for b in batches["batch"] if b not in _on_remote(remote, ref)]
    if workspace.git("status", "--porcelain", "--", str(paths.INCOMING_DIR)).strip():
        rows = batches[~batches["batch"].isin(_batches(workspace.show("HEAD",
                                                                      paths.MANIFEST)))]
        sources = [source for listed in rows["sources"] for source in json.loads(listed)]
        shown = ", ".join(sources[:3]) + (f" and {len(sources) - 3} more"
                                          if len(sources) > 3 else "")
        workspace.git("add", str(paths.INCOMING_DIR))
        workspace.git("commit", "--quiet", "-m",
                      f"Ingest batch{'es' if len(rows) > 1 else ''} {', '.join(rows['batch'])}: "
                      f"{rows['images'].sum()} images from {shown}",
                      "--", str(paths.INCOMING_DIR), env=workspace.committer_env())
    if not pending:
        return None
    commit = workspace.head_commit()
    workspace.dvc("push", *(str(paths.INCOMING_DIR / f"{b}.npz.dvc") for b in pending),
                  log=False)
    workspace.git("push", "--quiet", remote, f"{commit}:{ref}")
    emit(commit, pending, remote)
    log.info("batch%s %s committed as %s, pushed to %s and the DVC remote",
             "es" if len(pending) > 1 else "", ", ".join(pending), commit[:8], remote)
    return commit


def emit(commit: str, batches: list[str], remote: str = "origin") -> None:
    """The ``fashionnet.data.ingested`` event for ``commit``, sent before returning."""
    from prefect.events import emit_event
    from prefect.events.worker import EventsWorker

    url = workspace.remote_url(remote) or remote
    emitted = emit_event(EVENT, resource={"prefect.resource.id": resource_id(url),
                                          "prefect.resource.name": url},
                         payload={"commit": commit, "batches": batches,
                                  "branch": workspace.current_branch()})
    EventsWorker.drain_all(timeout=30)  # sent now: the process may end next
    if emitted is None:
        raise RuntimeError(f"the {EVENT} event could not be emitted (Prefect events are off)")
    log.info("emitted %s for %s (event %s)", EVENT, url, emitted.id)

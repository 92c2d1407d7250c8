"""A retrained model becomes the branch's: one commit whose tree is the experiment's, registered
in the model registry (GTO: a version tag ``fashionnet@vX.Y.Z`` and stage ``prod`` assigned to
it), pushed with its tags to the git remote in one atomic push (its data already is on the DVC
remote), then the branch, index and workspace here."""

from __future__ import annotations

import os
from dataclasses import dataclass

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline import paths
from pipeline.workspace import (
    CommandFailed,
    committer_env,
    describe_changes,
    dvc,
    git,
    head_commit,
    remote_ref,
    uncommitted_changes,
    upstream_ref,
)

STAGE = "prod"  # the registry stage a promotion assigns: what `predict --model prod` uses
FIRST_VERSION = "v1.0.0"  # the first promotion's; each one after it the next minor version


@dataclass(frozen=True)
class Candidate:
    """A retrain's DVC experiment: its name and commit, and the commit it started from."""

    name: str
    rev: str
    baseline: str

    def same_tree(self) -> bool:
        """Whether the experiment made exactly what its baseline holds."""
        return git("rev-parse", f"{self.rev}^{{tree}}") == git("rev-parse",
                                                             f"{self.baseline}^{{tree}}")


def blockers(run: Candidate, branch: str) -> list[str]:
    """Why the experiment cannot become a commit on ``branch`` without overwriting anything."""
    import json

    found = []
    current = git("rev-parse", "--abbrev-ref", "HEAD").strip()
    if (head_commit(), current) != (run.baseline, branch):
        found.append(f"HEAD moved from {branch} at {run.baseline[:8]} to {current} at "
                     f"{head_commit()[:8]} while it ran")
    if changed := uncommitted_changes():
        found.append(f"uncommitted changes to {describe_changes(changed)}")
    added = git("diff", "--name-only", "--diff-filter=A", run.baseline, run.rev).split()
    if in_the_way := [p for p in added if os.path.lexists(p)]:
        found.append(f"untracked files where the run adds its own: {describe_changes(in_the_way)}")
    status = json.loads(dvc("status", "--json", log=False) or "{}")
    modified = sorted({path for entries in status.values() for entry in entries
                       if isinstance(entry, dict)
                       for path, state in entry.get("changed outs", {}).items()
                       if state == "modified"})
    if modified:
        found.append(f"DVC-tracked outputs changed in the workspace: {describe_changes(modified)}")
    return found


def register(commit: str, message: str) -> list[str]:
    """Register ``commit``'s model as the next minor version of dvc.yaml's artifact (the first
    as FIRST_VERSION) and assign it stage ``prod``, as `gto register` and `gto assign` do: two
    annotated tags, made here only; their names."""
    from gto.api import assign
    from gto.api import register as gto_register

    who = committer_env()  # a fresh worker has no git identity: the tags need one
    author = {"author": who.get("GIT_COMMITTER_NAME"),
              "author_email": who.get("GIT_COMMITTER_EMAIL")}
    subject = message.splitlines()[0]
    first = not git("tag", "--list", f"{paths.ARTIFACT}@v*").strip()
    gto_register(".", paths.ARTIFACT, ref=commit, version=FIRST_VERSION if first else None,
                 bump_minor=not first, message=subject, **author)
    assign(".", paths.ARTIFACT, STAGE, ref=commit, message=subject, **author)
    return git("tag", "--points-at", commit).split()


@task(cache_policy=NO_CACHE)
def promote(run: Candidate, branch: str, message: str, remote: str | None) -> tuple[str, str]:
    """One commit on ``branch`` whose tree is the experiment's, registered as the next version
    at stage prod, pushed to ``remote`` with its tags first; then the branch, index and
    workspace here. (The commit, its version tag.)"""
    logger = get_run_logger()
    tree = git("rev-parse", f"{run.rev}^{{tree}}").strip()
    # commit-tree: the commit exists before any branch points at it, so a rejected push
    # changes nothing here, and its files are exactly what the experiment committed.
    commit = git("commit-tree", tree, "-p", run.baseline, "-m", message,
                 env=committer_env()).strip()
    try:
        tags = register(commit, message)
        if remote:
            _push(commit, tags, remote, upstream_ref(branch))
    except BaseException:  # nothing was shared: no registry tags for a commit no branch has
        if made := git("tag", "--points-at", commit).split():
            git("tag", "--delete", *made)
        raise
    if remote and remote_ref(remote, upstream_ref(branch)) != commit:
        raise RuntimeError(f"{remote} {upstream_ref(branch)} moved on from {commit[:8]} "
                           "right after the push")
    try:
        git("reset", "--quiet", "--keep", commit)  # refuses to overwrite a local change
        dvc("checkout")  # the model and data the new dvc.lock names, from DVC's cache
    except CommandFailed as e:
        where = f"pushed to {remote}" if remote else "made"
        raise RuntimeError(f"the promotion commit {commit[:8]} is {where} with its tags, but "
                           f"the branch here was not moved to it ({e}): `git reset --keep "
                           f"{commit[:8]}` once the workspace is clean") from None
    version = next(tag for tag in tags if tag.startswith(f"{paths.ARTIFACT}@"))
    logger.info("%s is now %s (%s, stage %s): %s", branch, commit[:8], version, STAGE,
                message.splitlines()[0])
    return commit, version


def _push(commit: str, tags: list[str], remote: str, target: str) -> None:
    """The commit and its registry tags to ``remote``'s ``target``, all or none; refused
    unless a fast-forward."""
    try:
        git("push", "--atomic", remote, f"{commit}:{target}", *(f"refs/tags/{t}" for t in tags))
    except CommandFailed as e:
        raise RuntimeError(f"{remote} refused the promotion commit: {e}") from None
    get_run_logger().info("pushed %s and %s to %s %s", commit[:8], ", ".join(tags), remote,
                          target)

"""New data to a registered model, end to end on real parts: `fashionnet ingest --push` twice in a
user's clone -> the fashionnet.data.ingested events -> the retraining deployment's debounced
trigger -> one flow run on a process worker -> a promotion commit and GTO tags on the git
remote -> a fresh clone where `fashionnet predict --model prod` uses exactly the promoted file.

A Prefect server, a process worker, a bare git repository as the git remote, a local-directory
DVC remote, tiny params (tests/test_retrain_e2e.py's ``remotes``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline import paths
from pipeline.retrain import DEPLOYMENT
from tests.helpers import git, ok, prefect_client, run, wait_for
from tests.servers import Remotes, artifacts, clone, craft_head, process_worker, state_of
from tests.test_retrain import deploy

WINDOW = 40  # seconds: the trigger's debounce window and delay, instead of prefect.yaml's 300


def pngs(root: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """The images as PNG files in class subdirectories of ``root``."""
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        (root / str(int(label))).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / str(int(label)) / f"{i}.png")
    return root


def runs_of(prefect_api: str, deployment_id) -> list:
    """The deployment's flow runs but those its cron schedule lays out in advance."""
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    with prefect_client(prefect_api) as client:
        return [run for run in client.read_flow_runs(deployment_filter=DeploymentFilter(
            id=DeploymentFilterId(any_=[deployment_id]))) if not run.auto_scheduled]


@pytest.mark.slow
def test_ingest_push_starts_one_retrain_that_registers_the_model_predict_uses(
        remotes: Remotes, tmp_path, prefect_api, raw_dir, official):
    own = remotes.copy(tmp_path)
    repo, env = clone(own.url, tmp_path / "team", prefect_api, raw_dir, own.storage)
    # This test's DVC remote for everyone, the worker's clone included.
    ok(repo, env, "dvc", "remote", "modify", "storage", "url", str(own.storage))
    git(repo, "commit", "-qam", "this test's DVC remote")
    craft_head(repo, env, val=0.0, test=0.0)  # any retrain passes the gate: it must promote
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    (trigger,) = next(d for d in spec["deployments"] if d["name"] == DEPLOYMENT)["triggers"]
    trigger.update(within=WINDOW, schedule_after=WINDOW)
    (repo / "prefect.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    git(repo, "commit", "-qam", "a short debounce window for the test")
    git(repo, "push", "-q", "origin", "main")
    deployment = deploy(repo, env, prefect_api)
    (trigger,) = deployment_triggers(prefect_api, deployment)  # this repository's events only
    assert trigger.match["prefect.resource.id"] == [f"fashionnet.repository.{own.url}"]

    # Two batches of images no split of the tiny params uses, pushed within the window.
    full = official[0]
    used = {int(i) for name in ("train", "val") for i in np.load(repo / paths.PREPARED[name])[
        "index"]}
    fresh_idx = np.array([i for i in range(len(full)) if i not in used][:120])
    sources = [pngs(tmp_path / f"batch-{k}", full.images[part].numpy(), full.labels[part].numpy())
               for k, part in enumerate((fresh_idx[:60], fresh_idx[60:]))]
    log = tmp_path / "worker.log"
    worker_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    try:
        with process_worker("fashionnet", "ingest-worker", worker_env, log) as worker:
            commits = []
            for source in sources:
                out = ok(repo, env, "fashionnet", "ingest", str(source), "--push")
                commits.append(git(repo, "rev-parse", "HEAD").strip())
                assert f"pushed as commit {commits[-1][:8]}" in out
            (flow_run,) = wait_for(lambda: runs_of(prefect_api, deployment.id),
                                   "the trigger's flow run", 120, proc=worker, log=log)
            assert flow_run.parameters == {"ingested": commits[0]}  # the first event's
            final = wait_for(lambda: state_of(prefect_api, flow_run.id), "the retrain's end",
                             900, proc=worker, log=log)
            # Debounced: the second event, within the window, started nothing more.
            assert len(runs_of(prefect_api, deployment.id)) == 1
    finally:
        with prefect_client(prefect_api) as client:
            client.delete_deployment(deployment.id)
    assert final == "COMPLETED", log.read_text()

    # The promotion: one commit after both ingests, its registry tags on the remote.
    promoted = git(repo, "ls-remote", own.url, "refs/heads/main").split()[0]
    git(repo, "fetch", "-q", "--tags", "origin")
    assert git(repo, "rev-parse", f"{promoted}^").strip() == commits[1]
    assert sorted(git(repo, "tag", "--points-at", promoted).split()) == [
        "fashionnet#prod#1", "fashionnet@v1.0.0"]
    # The experiment went to the remote from the worker's clone (now gone); the promotion is it.
    refs = git(repo, "ls-remote", own.url, f"refs/exps/{commits[1][:2]}/{commits[1][2:]}/*"
               ).split()
    (experiment,) = refs[::2]
    git(repo, "fetch", "-q", own.url, experiment)
    assert git(repo, "rev-parse", f"{promoted}^{{tree}}") == git(repo, "rev-parse",
                                                                f"{experiment}^{{tree}}")
    manifest = git(repo, "show", f"{promoted}:{paths.MANIFEST}").splitlines()
    assert len(manifest) == 3  # the header and both batches: trained on together
    summary = artifacts(prefect_api, flow_run.id)["fashionnet-retrain-summary"]
    assert "| accuracy.incoming | - |" in summary
    assert "Drift: HEAD's model, before this retrain, on the 120 images of the 2 incoming " \
           "batches new to it" in summary

    # A fresh clone that never trained: predict resolves prod through the registry and the
    # DVC remote, and uses exactly the promoted file.
    fresh = tmp_path / "fresh"
    git(tmp_path, "clone", "-q", own.url, str(fresh))
    fresh_env = {**env, "PYTHONPATH": str(fresh)}
    ok(fresh, fresh_env, "dvc", "remote", "modify", "--local", "storage", "url",
       str(own.storage))
    lock = yaml.safe_load(git(fresh, "show", f"{promoted}:dvc.lock"))
    md5 = next(o["md5"] for o in lock["stages"]["train"]["outs"] if o["path"] == str(paths.MODEL))
    result = run(fresh, fresh_env, "fashionnet", "predict", "--model", "prod", "--format",
                 "json", str(next(sources[0].rglob("*.png"))))
    assert result.returncode == 0, result.stderr
    assert f"md5 {md5}" in result.stderr and "stage prod" in result.stderr
    assert json.loads(result.stdout)[0]["class"]
    got = tmp_path / "got.pt"
    ok(fresh, fresh_env, "dvc", "artifacts", "get", own.url, "fashionnet", "--stage", "prod",
       "-o", str(got))
    assert hashlib.md5(got.read_bytes()).hexdigest() == md5
    assert not (fresh / paths.MODEL).exists()  # nothing was trained or pulled there


def deployment_triggers(prefect_api: str, deployment) -> list:
    """The triggers of the automations `prefect deploy` made for ``deployment``."""
    with prefect_client(prefect_api) as client:
        automations = client.read_automations_by_name(f"{deployment.name}__automation_1")
    return [a.trigger for a in automations]

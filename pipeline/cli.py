"""The ``fashionnet`` command: one subcommand per DVC stage, each run as a Prefect flow, and
the commands around them (ingest, retrain, serve, seeds, sweep, predict); their arguments are in
pipeline/arguments.py.

Exit status: 0 on success; 2 on bad input (a data file or params.yaml), with one line on
stderr naming the file or key; 1 on any other failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.arguments import build_parser

if TYPE_CHECKING:
    from pipeline.params import Params

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2


class _DropInputErrorTracebacks(logging.Filter):
    """Prefect logs a failed run's exception with its traceback; for bad input the CLI's one
    line says it all, so those records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        from fashionnet.errors import InputError

        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, InputError)


def _configure_prefect() -> None:
    # Library log lines (one per epoch) reach Prefect's run logs and UI.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "fashionnet")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from prefect.logging.configuration import setup_logging
    from prefect.logging.handlers import PrefectConsoleHandler

    setup_logging()  # Prefect's console handler sits on the root logger
    logging.getLogger("fashionnet").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropInputErrorTracebacks())
        if isinstance(handler, PrefectConsoleHandler):
            # Progress logs go to stdout; stderr carries only what went wrong.
            handler.setStream(sys.stdout)
            handler.console.file = sys.stdout


def _other_checkout() -> bool:
    """Whether the working directory is a FashionNet checkout other than the one this code was
    imported from."""
    here = Path.cwd()
    if not ((here / "pipeline" / "cli.py").is_file() and (here / "fashionnet").is_dir()):
        return False
    return here.resolve() != Path(__file__).resolve().parents[1]


def _needs_server(args: argparse.Namespace) -> None:
    """--pool needs the Prefect server the pool's workers poll."""
    from fashionnet.errors import ConfigError
    from pipeline.prefect_server import configured_api_url

    if args.pool and not configured_api_url():
        raise ConfigError("--pool", "needs the Prefect server of the pool's workers: set "
                                    "PREFECT_API_URL (and PREFECT_API_AUTH_STRING)")


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and _other_checkout():
        # DVC runs queued experiments in temporary copies of the repository (.dvc/tmp/exps):
        # a stage must run the copy's code, the code its dvc.lock hashes, not the installed
        # package's. `python -m` puts the working directory first on sys.path.
        os.execv(sys.executable, [sys.executable, "-m", "pipeline.cli", *sys.argv[1:]])
    args = build_parser().parse_args(argv)
    from fashionnet.errors import InputError

    if args.command not in ("predict", "ingest"):  # no Prefect flow: they start at once
        _configure_prefect()
    try:
        if args.command == "ingest":
            return _ingest(args)
        if args.command == "predict":
            from pipeline.predict import run
            from pipeline.registry import resolve

            model = resolve(args.model)  # a file, or a registered version through DVC
            if model.description != str(model.path):
                print(f"fashionnet predict: model {model.description}", file=sys.stderr)
            run(args.paths, model.path, top=args.top, fmt=args.format, invert=args.invert,
                skip_bad=args.skip_bad, device=args.device, precision=args.precision)
            return EXIT_OK
        from pipeline.params import load_params

        params = load_params()
        start = _prepare(args, params)  # bad input: exit 2 before any server or work
        # --pool: the pool's own server, never one of ours (_needs_server says so).
        with _api_server(scheduler=args.command == "serve",
                         start=not getattr(args, "pool", None)):
            start()
    except InputError as e:
        message = " ".join(str(e).split())  # one line, whatever the message quotes
        print(f"fashionnet {args.command}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"fashionnet {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`fashionnet predict photos/ | head`): not a failure to report.
        # stdout now points at /dev/null, so flushing it at exit cannot raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except Exception as e:
        message = " ".join(str(e).split())
        print(f"fashionnet {args.command}: failed: {type(e).__name__}: {message}",
              file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _ingest(args: argparse.Namespace) -> int:
    """`fashionnet ingest`: the batch's summary on stdout; a refusal's summary too with
    --dry-run, before the one line on stderr."""
    from pipeline.ingest import BatchRefused, ingest

    logging.basicConfig(format="%(message)s", stream=sys.stdout)  # warnings, of any library
    logging.getLogger("fashionnet").setLevel(logging.INFO)  # and what ingest itself says
    try:
        batch = ingest(args.paths, label=args.label, labels=args.labels, dry_run=args.dry_run,
                       push=args.push, force=args.force)
    except BatchRefused as e:
        if args.dry_run:
            print(e.batch.summary(e.problems))
        raise
    print(batch.summary())
    if batch.commit:
        print(f"pushed as commit {batch.commit[:8]}; event fashionnet.data.ingested emitted")
    elif args.push and not args.dry_run:
        print("push: nothing to share, the remote has every batch")
    return EXIT_OK


def _prepare(args: argparse.Namespace, params: Params) -> Callable[[], object]:
    """The command's flow, ready to call, once its arguments are checked: a bad key, value,
    seed or recipe raises InputError here, before a Prefect server starts."""
    if args.command == "retrain":
        from pipeline.retrain import overrides_for, retrain_flow

        overrides = overrides_for(args.seed, dict(args.set_params))
        return lambda: retrain_flow(force=args.force, set_params=overrides, name=args.name)
    if args.command == "seeds":
        from pipeline.seeds import plan, seeds_flow

        plan(args.seeds or None, args.recipe)
        _needs_server(args)
        return lambda: seeds_flow(seeds=args.seeds or None, jobs=args.jobs,
                                  threads=args.threads, pool=args.pool, recipe=args.recipe)
    if args.command == "sweep":
        from pipeline.params import load_recipe, recipe_name
        from pipeline.sweep import parse_grid, sweep_flow

        base = None
        if args.recipe is not None:
            recipe_name(args.recipe)  # the file's name names the experiments: checked first
            base = load_recipe(args.recipe)
        grid = parse_grid(args.grid, base)
        _needs_server(args)
        return lambda: sweep_flow(grid=grid, pool=args.pool, jobs=args.jobs, recipe=args.recipe)
    if args.command == "serve":
        from pipeline.retrain import serve

        return lambda: serve(params.schedule.cron)
    stage = importlib.import_module(f"pipeline.{args.command}")  # only the stage's imports

    def run_stage() -> object:
        from prefect import tags

        from pipeline.processes import stage_tags

        with tags(*stage_tags()):  # the flow run that started it, if one did
            return getattr(stage, f"{args.command}_flow")(params)

    return run_stage


@contextlib.contextmanager
def _api_server(scheduler: bool, start: bool = True) -> Iterator[None]:
    """The Prefect API the flows report to: the configured one (environment or profile), else
    a server of our own for this command, which dies with it even on `kill -9` (Prefect's
    temporary server would outlive it: see pipeline/prefect_server.py). ``scheduler``: the
    scheduling services, which only `serve` needs; ``start=False``: none of our own."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from pipeline.prefect_server import configured_api_url, prefect_server

    if not start or configured_api_url():
        yield
        return
    with prefect_server(ui=False, scheduler=scheduler) as api_url, \
            temporary_settings({PREFECT_API_URL: api_url}):
        os.environ["PREFECT_API_URL"] = api_url  # and for the dvc stages retrain/seeds run
        try:
            yield
        finally:
            del os.environ["PREFECT_API_URL"]
            # Send the last logs and events while the server is up, as Prefect's test harness
            # does; at interpreter exit they would retry a stopped server for a minute.
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)


if __name__ == "__main__":
    sys.exit(main())

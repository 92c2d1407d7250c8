"""The ``fashionnet`` command: one subcommand per DVC stage, each run as a Prefect flow, and
the commands around them (retrain, serve, seeds, predict).

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

if TYPE_CHECKING:
    from pipeline.params import Params

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT = 0, 1, 2
DESCRIPTION = ("FashionNet: one command per DVC stage, each run as a Prefect flow, and the "
               "commands around them (ingest, retrain, serve, seeds, sweep, predict)")
STAGE_HELP = {
    "download": "the four Fashion-MNIST IDX files into data/raw/, verified",
    "split": "stratified train/validation split + the official test set into data/prepared/",
    "train": "train FashionNet: models/, metrics/history.csv",
    "evaluate": "accuracy/loss on train, val and test; per-class report; predictions",
    "report": "reports/report.md and its figures",
}
RETRAIN_HELP = ("the retraining flow, once: a DVC experiment, gated on validation accuracy; a "
                "promoted run is committed (and pushed where remotes are configured)")
SERVE_HELP = ("serve the fashionnet-retrain/scheduled deployment in this workspace on "
              "schedule.cron until stopped")
PREDICT_HELP = ("classes and probabilities for image files, directories of them, .npz or IDX "
                "files, from the trained model")
SEEDS_HELP = ("the recipe once per training seed, as DVC experiments: metrics/seeds.csv, the "
              "report's spread over seeds, and the own train.seed's run applied to the workspace")
INGEST_HELP = ("new labelled images into data/incoming/ for training: refused (exit 2, "
               "nothing written) if unreadable, of an unknown class, leaking a validation or "
               "test image, or mislabelled; already known ones skipped")
SWEEP_HELP = ("a grid of params as DVC experiments, on this machine or on the workers of a "
              "Prefect work pool: metrics/sweep.csv")
POOL_HELP = ("run the experiments on the workers of this Prefect work pool (PREFECT_API_URL), "
             "shared through the git remote origin and the DVC remote (docs/distributed.md); "
             "default: DVC's local queue")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fashionnet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in STAGE_HELP.items():
        sub.add_parser(name, help=f"DVC stage {name}: {text}", description=text)
    retrain = sub.add_parser("retrain", help=RETRAIN_HELP, description=RETRAIN_HELP)
    retrain.add_argument("--force", action="store_true",
                         help="rerun the train stage and all after it even if nothing changed")
    retrain.add_argument("--seed", type=int, help="train.seed for this run")
    retrain.add_argument("-S", "--set-param", dest="set_params", action="append", default=[],
                         type=_override, metavar="KEY=VALUE",
                         help="set a params.yaml key for this run, as dvc exp run -S does")
    retrain.add_argument("--name", help="the experiment's name (default: "
                         "retrain-<UTC date>-<HHMM>-manual)")
    sub.add_parser("serve", help=SERVE_HELP, description=SERVE_HELP)
    seeds = sub.add_parser("seeds", help=SEEDS_HELP, description=SEEDS_HELP)
    seeds.add_argument("seeds", nargs="*", type=int, metavar="SEED",
                       help="train.seed values (default: params.yaml's train.seed, 1, 2, 3)")
    seeds.add_argument("-j", "--jobs", type=_positive, default=1,
                       help="experiments run at a time (default 1)")
    seeds.add_argument("--threads", type=_positive,
                       help="torch CPU threads per experiment (default: torch's own); on a "
                            "2-core CPU, --jobs 2 --threads 1 trains fastest")
    seeds.add_argument("--pool", help=POOL_HELP)
    seeds.add_argument("--recipe", metavar="FILE",
                       help="a named recipe, e.g. recipes/plus.yaml: its section.key overrides "
                            "for every run; results to metrics/seeds-NAME.csv, nothing applied")
    sweep = sub.add_parser("sweep", help=SWEEP_HELP, description=SWEEP_HELP)
    sweep.add_argument("-S", "--set-param", dest="grid", action="append", default=[],
                       required=True, metavar="KEY=V1,V2,...",
                       help="a params.yaml key and its values; every combination runs")
    sweep.add_argument("--pool", help=POOL_HELP)
    sweep.add_argument("-j", "--jobs", type=_positive, default=1,
                       help="experiments run at a time by the local queue (default 1)")
    sweep.add_argument("--recipe", metavar="FILE",
                       help="a named recipe, e.g. recipes/plus.yaml: every point starts from "
                            "its overrides; experiments named NAME_<point>")
    predict = sub.add_parser("predict", help=PREDICT_HELP, description=PREDICT_HELP + ". "
                             "Photos are converted as Fashion-MNIST's images were made "
                             "(docs/predict.md); images already 28x28 are taken as they are.")
    predict.add_argument("paths", nargs="+", metavar="PATH",
                         help="an image file (anything Pillow reads), a directory (its images, "
                              ".npz and IDX files, recursively, sorted), an .npz or an IDX file "
                              "of 28x28 uint8 images")
    predict.add_argument("--model", default="models/fashionnet.pt",
                         metavar="FILE|prod|fashionnet@vX.Y.Z",
                         help="a FashionNet state_dict file (default: models/fashionnet.pt), "
                              "or a registered version: the one at a stage (prod) or a version "
                              "(fashionnet@v1.2.0), fetched through DVC (docs/retraining.md)")
    predict.add_argument("--top", type=_top_k, default=3, metavar="K",
                         help="the K most probable classes per image, 1-10 (default 3)")
    predict.add_argument("--format", choices=("table", "csv", "json"),
                         help="default: table on a terminal, csv otherwise")
    predict.add_argument("--invert", choices=("auto", "yes", "no"), default="auto",
                         help="negate images to a light object on a dark background: auto "
                              "(default) does so when the image's border is light")
    predict.add_argument("--skip-bad", action="store_true",
                         help="report unreadable files on stderr and predict the rest")
    predict.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                         help="default cpu: reading the files, not the model, takes the time")
    predict.add_argument("--precision", choices=("auto", "float32", "bfloat16"),
                         default="auto", help="compute dtype; auto (default), as "
                         "train.precision's default and so as fashionnet evaluate's: bfloat16 "
                         "where the hardware has it natively, else float32")
    ingest = sub.add_parser("ingest", help=INGEST_HELP, description=INGEST_HELP + " "
                            "(docs/retraining.md).")
    ingest.add_argument("paths", nargs="+", metavar="PATH",
                        help="a directory of class subdirectories (0-9 or class slugs such as "
                             "ankle-boot), image files or directories with --label or "
                             "--labels, an .npz with images and labels, or an IDX image file "
                             "followed by its label file")
    source = ingest.add_mutually_exclusive_group()
    source.add_argument("--label", metavar="CLASS",
                        help="the class of every image given: 0-9, a slug or a class name")
    source.add_argument("--labels", metavar="FILE.csv",
                        help="a CSV of file,label rows, files relative to the CSV's folder")
    ingest.add_argument("--dry-run", action="store_true",
                        help="print what would be added, skipped and refused; write nothing")
    ingest.add_argument("--push", action="store_true",
                        help="then git commit, dvc push, git push, and emit the Prefect event "
                             "fashionnet.data.ingested that starts a retrain")
    ingest.add_argument("--force", action="store_true",
                        help="accept labels the current model disagrees with far more than "
                             "its validation error predicts (with a warning)")
    return parser


def _top_k(text: str) -> int:
    value = _positive(text)
    if value > 10:
        raise argparse.ArgumentTypeError(f"{text!r} is above 10, the number of classes")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is below 1")
    return value


def _override(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as YAML (as params.yaml would hold it)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. train.seed=7)")
    try:
        return key, yaml.safe_load(value)
    except yaml.YAMLError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value is not valid YAML") from None


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

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
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

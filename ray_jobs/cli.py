"""`lplgrad`: one command line for the jobs and tools.

    lplgrad train [key=value ...]       joint training on Ray Train (ray_jobs/train.py)
    lplgrad query [key=value ...]       score a pool, commit a manifest (ray_jobs/query.py)
    lplgrad features [key=value ...]    extract a pool's features into a feature store (ray_jobs/features.py)
    lplgrad proxy [key=value ...]       train a proxy head on cached features (ray_jobs/proxy.py)
    lplgrad align [key=value ...]       fine-tune and promote the proxy's backbone when due (ray_jobs/align.py)
    lplgrad simulate [key=value ...]    simulated cycles and learning curves (ray_jobs/simulate.py)
    lplgrad quickstart [key=value ...]  the whole cycle on a synthetic pool (ray_jobs/quickstart.py)
    lplgrad pool build|label ...        build and label WebDataset pools (ray_jobs/pool_cli.py)
    lplgrad manifest show|verify|export|extract|report ...  read committed query runs (ray_jobs/manifest_cli.py)
    lplgrad config show JOB             every config key of a job at its default, as YAML
                                        (ray_jobs/_shared/config_cli.py)
    lplgrad JOB --help                  the job's flags and every config key: type, default, meaning

Job subcommands take the same `--config FILE key=value ...` arguments as `python -m ray_jobs.<job>`;
modules load only when their subcommand runs, so `lplgrad --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ray_jobs._shared import config_cli as _config_cli
from ray_jobs._shared import errors as _errors
from ray_jobs._shared.entry import run_job

# command -> (module holding its JOB, help). The only place a job is found by its name: a job that
# needs another's work calls it through ray_jobs/_shared/ (training.fit, querying.query, ...).
# Modules load only when their subcommand runs, so `lplgrad --help` stays fast.
JOBS = {
    "train": ("ray_jobs.train", "joint LPLgrad training on Ray Train; prints the final checkpoint URI"),
    "query": ("ray_jobs.query", "score a pool with a checkpoint and commit a selection manifest"),
    "features": (
        "ray_jobs.features",
        "extract a pool's penultimate features under a frozen backbone into a feature store",
    ),
    "proxy": (
        "ray_jobs.proxy",
        "train a proxy head (linear or MLP, with LossNet) on cached features of the labeled set",
    ),
    "align": (
        "ray_jobs.align",
        "proxy mode: fine-tune the backbone (LP-FT or FT) when the alignment policy says so, and promote it",
    ),
    "simulate": ("ray_jobs.simulate", "simulated active-learning cycles on a pool whose labels are known"),
    "quickstart": ("ray_jobs.quickstart", "one whole cycle on a synthetic pool: build, train, query, label, retrain"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lplgrad", description="LPLgrad active learning on Ray.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in JOBS.items():
        job = commands.add_parser(name, help=help_text, add_help=False)
        job.set_defaults(job_module=module)
    try:
        pool_cli = importlib.import_module("ray_jobs.pool_cli")
    except ModuleNotFoundError as error:
        if error.name != "ray_jobs.pool_cli":
            raise
    else:
        pool_cli.add_commands(commands)
    try:
        manifest_cli = importlib.import_module("ray_jobs.manifest_cli")
    except ModuleNotFoundError as error:
        if error.name != "ray_jobs.manifest_cli":
            raise
    else:
        manifest_cli.add_commands(commands)
    _config_cli.add_commands(commands, JOBS)
    return parser


def main(argv: list[str] | None = None) -> int:
    # A user error ends as one line and exit code 2, a bug keeps its traceback (ray_jobs/_shared/errors.py).
    argv, debug = _errors.strip_debug(list(sys.argv[1:] if argv is None else argv))
    words = [a for a in argv[:2] if not a.startswith("-")]
    command = " ".join(words[:2] if words and words[0] in ("manifest", "pool", "config") else words[:1]) or "lplgrad"
    return _errors.run_command(command, lambda: _dispatch(argv, debug), debug)


def _dispatch(argv: list[str], debug: bool) -> int:
    parser = build_parser()
    if argv and argv[0] in JOBS:
        # Jobs parse their own flags (--help, --verbose, a config file plus key=value overrides): the
        # same path as python -m.
        job = importlib.import_module(JOBS[argv[0]][0]).JOB
        return run_job(job, argv[1:] + (["--debug"] if debug else []))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())

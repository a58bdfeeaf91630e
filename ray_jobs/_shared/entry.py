"""How every job starts: one `Job` per module, one `run_job` for all of them.

    JOB = Job("train", TrainConfig, start, train, "Joint LPLgrad training on Ray Train.")

    if __name__ == "__main__":
        raise SystemExit(run_job(JOB))

`run_job` reads `--config FILE key=value ...` into the job's frozen config dataclass, calls the
job's `start`, and turns what it raises into one line and exit code 2 for a person's mistake, or a
traceback and exit code 1 for a bug (errors.py). `lplgrad JOB ...` (cli.py) and `python -m
ray_jobs.JOB ...` take this same path, `--help` included (the full help: flags and every key).

The resolved config is printed (so a log shows exactly what ran) once the job's checks have
passed: a job checks its inputs before it joins Ray, so `connect` (cluster.py) prints it just
before joining; a job that never joins Ray has it printed when it ends. A bad input therefore
ends with its one error line, not after a screen of YAML.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pipeline.config import config_to_yaml, load_config
from ray_jobs._shared.errors import run_command, strip_debug
from ray_jobs._shared.progress import VERBOSE_ENV

__all__ = ["Job", "echo_config", "run_job"]

C = TypeVar("C")


@dataclass(frozen=True)
class Job(Generic[C]):
    """A job's command-line contract.

    Attributes:
        command: The `lplgrad` subcommand (also the prefix of its error lines).
        config: The job's frozen config dataclass; `--help` and `lplgrad config show` read it.
        start: Runs the job from a config read off the command line: connects to Ray where the
            job needs it, guards the driver, runs, prints the result.
        run: The job for a caller already on Ray (a test, a benchmark): takes the config,
            returns the job's result (a `TrainResult`, a manifest, a feature store).
        description: One line for `--help`.
        shortcuts: Extra flags, each standing for `key=value` overrides that apply unless the
            command line already sets that key (`--proxy` for `modes=[...]`).
        echo_config: Print the resolved config as YAML before starting.
    """

    command: str
    config: type[C]
    start: Callable[[C], Any]
    run: Callable[[C], Any]
    description: str
    shortcuts: Mapping[str, tuple[str, Sequence[str]]] = field(default_factory=dict)
    echo_config: bool = True

    def parser(self) -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog=f"lplgrad {self.command}", description=self.description)
        parser.add_argument(
            "--config", help=f"YAML config (`lplgrad config show {self.command}` prints one to start from)"
        )
        for flag, (help_text, _) in self.shortcuts.items():
            parser.add_argument(flag, action="store_true", help=help_text)
        parser.add_argument("overrides", nargs="*", help="key=value overrides; `lplgrad config show` lists every key")
        return parser

    def parse_args(self, argv: Sequence[str] | None = None) -> C:
        """The config from `--config FILE key=value ...` (raises ConfigError for a bad one)."""
        args = self.parser().parse_args(argv)
        overrides = list(args.overrides)
        for flag, (_, implied) in self.shortcuts.items():
            if getattr(args, flag.lstrip("-").replace("-", "_")):
                given = {o.split("=", 1)[0] for o in overrides}
                overrides += [o for o in implied if o.split("=", 1)[0] not in given]
        return load_config(self.config, args.config, overrides)


def _importable(job: Job[Any]) -> Job[Any]:
    """Under `python -m ray_jobs.JOB` the job's module is `__main__`, and Ray pickles what a
    `__main__` defines (the config class, the training loop) by value: a worker then rebuilds the
    config class without the module's other names and fails (`NameError: TrainSchedule`). The same
    `Job` imported under the module's own name is pickled by reference, as under `lplgrad JOB`."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if getattr(job.start, "__module__", None) != "__main__" or not name:
        return job
    import importlib

    return importlib.import_module(name).JOB


# The resolved config waiting to be printed (see the module docstring): one per process, since a
# process runs one job from its command line.
_pending_echo: list[str] = []


def echo_config() -> None:
    """Print the resolved config of the job this process runs, if not printed yet."""
    while _pending_echo:
        print(_pending_echo.pop(), end="", flush=True)


def run_job(job: Job[Any], argv: Sequence[str] | None = None) -> int:
    """Parse, check and start `job`; the process's exit code (0, 1 for a bug, 2 for a user error).

    `--help` prints the full help; `--verbose` turns Ray's own output on (progress.py); `--debug`
    anywhere on the command line (or LPLGRAD_DEBUG=1) keeps the traceback of a user error.
    """
    from ray_jobs._shared.cluster import refuse_working_dir_paths
    from ray_jobs._shared.config_cli import help_for

    job = _importable(job)
    argv, debug = strip_debug(list(sys.argv[1:] if argv is None else argv))
    if {"-h", "--help"} & set(argv):
        print(help_for(job))
        return 0
    if "--verbose" in argv:
        os.environ[VERBOSE_ENV] = "1"
        argv = [a for a in argv if a != "--verbose"]

    def body() -> int:
        config = job.parse_args(argv)
        refuse_working_dir_paths(config)  # under `ray job submit`: relative paths name the uploaded copy
        _pending_echo[:] = [config_to_yaml(config)] if job.echo_config else []
        job.start(config)
        echo_config()
        return 0

    try:
        return run_command(job.command, body, debug)
    finally:
        _pending_echo.clear()

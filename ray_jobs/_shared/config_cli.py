"""Job help and `lplgrad config show JOB`, both generated from the job's config dataclass.

    lplgrad query --help              # the job's flags, then every config key: type, default, meaning
    lplgrad config show query         # every key at its default as YAML, to start a config file from
    lplgrad config show train > configs/train/mine.yaml

A job's config class is its module's `JOB.config` (entry.py), so a job needs no registration here
beyond its row in `ray_jobs.cli.JOBS`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from pipeline.config import config_help, default_config_yaml

__all__ = ["add_commands", "config_class", "help_for", "job_help", "show_config"]


def config_class(module: ModuleType) -> type:
    """The config dataclass of a job module's `JOB`.

    Raises:
        TypeError: If the module has no `JOB` with a config dataclass.
    """
    cls = getattr(getattr(module, "JOB", None), "config", None)
    if cls is None or not hasattr(cls, "__dataclass_fields__"):
        raise TypeError(f"{module.__name__} has no JOB = Job(...) with a config dataclass (ray_jobs/_shared/entry.py)")
    return cls


def job_help(command: str, module_name: str) -> str:
    """The job's own argparse help, then every key of its config, then where to find a full file."""
    return help_for(importlib.import_module(module_name).JOB)


def help_for(job: Any) -> str:
    """The full help of a `Job` (entry.py): `lplgrad JOB --help` and `python -m ray_jobs.JOB --help`
    print this same text."""
    usage = job.parser().format_help()
    return (
        f"{usage.rstrip()}\n  --verbose        Ray's own logs, Ray Data's progress and every worker's output "
        "(quiet by default; or LPLGRAD_VERBOSE=1)\n"
        "  --debug          keep the traceback of a user error (or LPLGRAD_DEBUG=1)\n\n"
        f"{config_help(job.config)}\n\n"
        f"`lplgrad config show {job.command}` prints every key at its default as a YAML file to start from."
    )


def _required_note(cls: type) -> str:
    """What the defaults alone lack, from the config's own validation ("" when they validate)."""
    try:
        cls()
    except (TypeError, ValueError) as error:
        return f"The defaults alone do not run: {error}"
    return ""


def show_config(command: str, module_name: str) -> str:
    """The default config of a job as commented YAML (loads back with `load_config`)."""
    cls = config_class(importlib.import_module(module_name))
    header = [
        f"lplgrad {command}: every key at its default ({cls.__name__}).",
        f"Run with: lplgrad {command} --config THIS_FILE [key=value ...]",
    ]
    if note := _required_note(cls):
        header.append(note)
    return default_config_yaml(cls, header="\n".join(header))


def add_commands(subparsers: Any, jobs: Mapping[str, tuple[str, str]]) -> None:
    """Add `config show JOB` to a top-level CLI.

    Args:
        subparsers: What `ArgumentParser.add_subparsers()` returned.
        jobs: subcommand -> (module with its `JOB`, help), as `ray_jobs.cli.JOBS`.
    """
    config = subparsers.add_parser(
        "config",
        help="print a job's default config as YAML (config show JOB)",
        description="Job configs, generated from each job's config dataclass.",
    )
    commands = config.add_subparsers(dest="config_command", required=True, metavar="{show}")
    show = commands.add_parser("show", help="print every key of a job's config at its default, as YAML")
    show.add_argument("job", choices=sorted(jobs), help="the job whose config to print")

    def run_show(args: argparse.Namespace) -> int:
        print(show_config(args.job, jobs[args.job][0]), end="")
        return 0

    show.set_defaults(func=run_show)

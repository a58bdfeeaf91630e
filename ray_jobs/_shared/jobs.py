"""Every job by its command name, and the runs that compose jobs (quickstart, simulate, align).

A job module is an entry point. One job importing another would tie their internals together,
so a job that runs another finds it here by name and builds its config with that job's own
config class, validated exactly as `lplgrad NAME key=value ...` would validate it. `run` is what
the command line runs once connected (`Job.run`): a simulation's training cycle is the same code
as a person's `lplgrad train`.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["JOBS", "config", "job", "run"]

# command -> (module holding its JOB, help). Modules load only when used, so `lplgrad --help`
# stays fast.
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


def job(name: str) -> Any:
    """The `Job` (entry.py) of command `name`."""
    if name not in JOBS:
        raise ValueError(f"no job named {name!r}; jobs: {', '.join(JOBS)}")
    return importlib.import_module(JOBS[name][0]).JOB


def config(command: str, /, **values: Any) -> Any:
    """Job `command`'s frozen config from keyword values (ValueError for a bad one). Positional
    only: configs have a `name` key of their own."""
    return job(command).config(**values)


def run(name: str, job_config: Any) -> Any:
    """Run job `name` on the Ray this process is connected to; its result (see each job's `run`)."""
    return job(name).run(job_config)

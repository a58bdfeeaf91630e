"""Run this interpreter as a child process, as a person's shell runs `python -m MODULE ...` or
`python -c SCRIPT ...`: text output captured, a time bound, the repository as the working dir."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(
    *args: str, env: Mapping[str, str] | None = None, cwd: str | Path = REPO, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """`python ARGS...` to completion; its CompletedProcess (returncode, stdout, stderr).

    Args:
        args: The interpreter's arguments (`"-m", "ray_jobs.query", "k=3"`).
        env: The child's whole environment (default: this process's).
        cwd: Its working directory.
        timeout: Seconds before it is killed (subprocess.TimeoutExpired).
    """
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=None if env is None else dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )

"""Quiet output: one progress line per step outside a terminal, a bar in one, and no Ray INFO lines."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.pools import build_pool, synthetic
from ray_jobs._shared.progress import VERBOSE_ENV, Progress

REPO = Path(__file__).resolve().parents[2]
RAY_LOG_LINE = re.compile(r"\b(INFO|DEBUG) [\w.]+\.py:\d+ --|\(\w+ pid=\d+")  # Ray's logger, forwarded worker output


def test_line_mode_prints_one_line_per_step() -> None:
    stream = io.StringIO()
    with Progress("score", 3, "rows", stream=stream, tty=False) as progress:
        for step in range(3):
            progress.update(1, note=f"step {step}")
    lines = stream.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["score"] * 3
    assert "3/3 rows" in lines[-1] and "in " in lines[-1] and "step 2" in lines[-1]
    assert "\r" not in stream.getvalue()


def test_terminal_mode_redraws_one_bar_with_rate_and_eta() -> None:
    stream = io.StringIO()
    with Progress("train", 4, "epochs", stream=stream, tty=True) as progress:
        progress.update(1)  # the first step's time is mostly start-up: no rate or ETA from it
        assert "1/4 epochs" in stream.getvalue() and "ETA" not in stream.getvalue()
        time.sleep(0.01)
        progress.update(1)
        assert "ETA" in stream.getvalue().split("\r")[-1] and "epochs/s" in stream.getvalue()
        progress.update(2)
    text = stream.getvalue()
    assert text.count("\n") == 1 and text.count("\r") == 3 and "[########################] 4/4 epochs" in text


def test_a_heartbeat_prints_while_no_step_comes_and_the_rate_is_over_a_recent_window() -> None:
    stream = io.StringIO()
    with Progress("query", None, "rows", stream=stream, tty=False, heartbeat_s=0.1, window_s=0.4) as progress:
        progress.stage("starting actors")
        time.sleep(0.6)  # no step: the heartbeat alone speaks
        waiting = stream.getvalue().splitlines()
        assert len(waiting) >= 3 and all("starting actors  0 rows" in line for line in waiting), waiting
        progress.stage("scoring")
        progress.update(100)
        time.sleep(0.05)
        progress.update(100)
        assert progress.rate() is not None and progress.rate() > 0
        time.sleep(0.6)  # stalled past the window: the rate falls towards zero, it does not stay at the burst's
        assert progress.rate() == 0.0
        progress.echo("a line of its own")
    assert "a line of its own" in stream.getvalue().splitlines()


@pytest.mark.ray
def test_train_job_prints_each_epoch_once_and_no_ray_info(tmp_path: Path) -> None:
    build_pool(synthetic(48, seed=0, num_classes=3, image_size=12, channels=1), str(tmp_path / "labeled"))
    ray_tmp = tempfile.mkdtemp(prefix="lplq", dir="/tmp")  # its own Ray session dir, short for socket paths
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", VERBOSE_ENV)} | {"RAY_TMPDIR": ray_tmp}
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ray_jobs.cli",
                "train",
                f"labeled={tmp_path / 'labeled'}",
                "epochs=3",
                "batch_size=16",
                "num_workers=1",
                "cpus_per_worker=1",
                f"storage_path={tmp_path / 'train'}",
                "name=quiet",
                "checkpoint_every=3",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    epochs = [line for line in lines if line.startswith("train quiet: ")]
    assert [re.search(r"(\d)/3 epochs", line).group(1) for line in epochs] == ["1", "2", "3"], done.stdout
    assert not [line for line in lines if '"epoch":' in line], "epoch metrics printed twice (worker JSON forwarded)"
    noise = [line for line in (done.stdout + done.stderr).splitlines() if RAY_LOG_LINE.search(line)]
    assert not noise, noise
    assert "final checkpoint:" in done.stdout and "\r" not in done.stdout

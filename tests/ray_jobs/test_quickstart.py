"""The quickstart at a tiny size: every artifact it announces exists and the cycle added labels."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from pipeline import manifest
from pipeline.config import ConfigError
from pipeline.pools import resolve_pool
from ray_jobs import quickstart


def test_quickstart_runs_one_whole_cycle(ray_local, tmp_path, capsys) -> None:
    config = quickstart.QuickstartConfig(
        samples=120,
        test_samples=40,
        num_classes=3,
        initial=16,
        per_cycle=12,
        epochs=1,
        batch_size=16,
        out=str(tmp_path),
    )
    summary = quickstart.run(config)
    root = Path(summary["root"])
    assert summary["labeled"] == [16, 28] and len(summary["accuracy"]) == 2
    selected = manifest.load(str(root / "queries" / "cycle-1")).column("key").to_pylist()
    with open(root / "ground_truth.csv") as handle:
        truth = {row["key"]: int(row["label"]) for row in csv.DictReader(handle)}
    with open(root / "labels-cycle-1.csv") as handle:
        answers = {row["key"]: int(row["label"]) for row in csv.DictReader(handle)}
    assert answers == {k: truth[k] for k in selected}  # labeled from the ground truth
    assert resolve_pool(str(root / "labeled-cycle-1")).num_samples == 28
    assert "cycle 1: 28 labeled" in capsys.readouterr().out
    assert Path(summary["report"]).read_text().count('<img class="thumb"') == 12  # one per selected row


def test_quickstart_sizes_are_checked() -> None:
    with pytest.raises(ConfigError, match="exceeds samples"):
        quickstart.JOB.parse_args(["samples=100", "initial=90", "per_cycle=20"])

"""Every YAML under configs/ loads into its job's config class: a renamed field or a bad value in a
shipped config fails here, not on the cluster at 02:00."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config
from ray_jobs.align import AlignConfig
from ray_jobs.features import FeaturesConfig
from ray_jobs.query import QueryConfig
from ray_jobs.simulate import SimulateConfig
from ray_jobs.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
JOBS = {
    "align": AlignConfig,
    "features": FeaturesConfig,
    "query": QueryConfig,
    "simulate": SimulateConfig,
    "train": TrainConfig,
}


@pytest.mark.parametrize("path", sorted(p for p in CONFIGS.glob("*/*.yaml")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_loads(path: Path) -> None:
    assert path.parent.name in JOBS, f"{path}: no job config class is known for configs/{path.parent.name}/"
    load_config(JOBS[path.parent.name], str(path), [])

"""The scoring demo job on a local Ray: every sample scored once, exact top-k, library-equal scores."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError
from pipeline.scoring import gradnorm_scores
from pipeline.acquisition.selection import select_topk
from ray_jobs import score_demo


def test_demo_scores_every_sample_and_selects_exact_topk(ray_local, tmp_path) -> None:
    config = score_demo.ScoreDemoConfig(
        model="small_cnn", samples=200, batch_size=32, k=15, actors=2, out=str(tmp_path), run_id="t1"
    )
    summary = score_demo.run(config)
    run_dir = tmp_path / "t1"
    scores = pq.read_table(run_dir / "scores").to_pydict()
    keys = scores["key"]
    assert len(keys) == len(set(keys)) == 200 == summary["samples"]
    assert summary["errors"] == 0 and all(e is None for e in scores["error"])

    selection = pq.read_table(run_dir / "selection.parquet").to_pydict()
    assert selection["key"] == select_topk(keys, np.array(scores["score"]), 15)
    assert selection["rank"] == list(range(1, 16))

    # Scores from the actors equal the library's on the same samples and weights.
    model, _, _ = score_demo.build_model("small_cnn", 10, config.seed)
    ids = np.array([int(k.split("-")[1]) for k in keys[:8]])
    batch = score_demo.make_images({"id": ids}, (1, 28, 28), config.seed)
    expected = gradnorm_scores(model, torch.from_numpy(batch["image"]))
    assert np.allclose(scores["score"][:8], expected.numpy(), rtol=1e-4)
    assert (run_dir / "config.yaml").read_text().count("run_id: t1") == 1


def test_demo_config_is_validated_before_ray_starts() -> None:
    with pytest.raises(ConfigError, match="model 'resnet9' is unknown"):
        score_demo.JOB.parse_args(["model=resnet9"])
    with pytest.raises(ConfigError, match="k must be positive"):
        score_demo.JOB.parse_args(["k=0"])

"""The simulation's badge and cluster-margin pick as the query does: the forward pass with
embeddings, the smallest-margin candidates, the shared select_candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.acquisition import CandidateGatherer, CandidateMemoryError, SelectionSpec, parse_chain, select_candidates
from pipeline.checkpoint import ModelSpec
from pipeline.scoring import RowScorer
from pipeline.simulation.fit import TrainedModel
from pipeline.simulation.query import query_in_memory


@pytest.fixture(scope="module")
def trained() -> TrainedModel:
    torch.manual_seed(0)
    model, lossnet, tap = ModelSpec("small_cnn", num_classes=4).build()
    return TrainedModel(model.eval(), lossnet.eval(), tap, 0.0, 0.0)


@pytest.mark.parametrize(
    ("strategy", "m", "clusters"),
    [("badge", None, None), ("cluster-margin", None, None), ("badge", 50, None), ("cluster-margin", 60, 12)],
)
def test_simulated_diverse_query_equals_the_query_path_on_the_same_rows(trained, strategy, m, clusters) -> None:
    images = np.random.default_rng(1).standard_normal((300, 1, 28, 28), dtype=np.float32)
    keys = [f"s{i:04d}" for i in range(300)]
    candidates = np.arange(20, 300)  # the unlabeled subset
    chain = parse_chain(strategy)
    picked = query_in_memory(
        chain, trained, images, keys, candidates, np.arange(20), 12, 5, diverse_candidates=m, clusters=clusters
    )
    assert len(set(picked[0])) == 12 and set(picked[0]) <= set(candidates.tolist())
    # The query's path by hand: one RowScorer batch, the gatherer, select_candidates.
    rows = RowScorer(lambda: (trained.model, None, None), "cpu", gradnorm=False, embeddings=True)(
        {"image": images[candidates], "key": np.array([keys[i] for i in candidates], dtype=object)}
    )
    spec = SelectionSpec(strategy, 12, seed=5, candidates=m, clusters=clusters)  # M = 24 by default
    assert spec.clusters == (clusters or (2 if strategy == "cluster-margin" else None))
    gatherer = CandidateGatherer(spec.candidates, 4, rows["penultimate"].shape[1])
    gatherer.add(list(rows["key"]), rows["margin"], rows["residual"], rows["penultimate"])
    expected = [key for key, _, _ in select_candidates(spec, gatherer.result())]
    assert [keys[i] for i in picked[0]] == expected


def test_simulated_diverse_query_refuses_an_over_budget_candidate_set(trained) -> None:
    images = np.zeros((30, 1, 28, 28), np.float32)
    with pytest.raises(CandidateMemoryError, match="over the budget"):
        query_in_memory(
            parse_chain("badge"), trained, images, [f"k{i}" for i in range(30)], np.arange(30), np.arange(0), 3, 0, 1e-6
        )

import numpy as np
import pytest

from pipeline.acquisition.selection import TopK, select_topk


def test_streaming_topk_equals_sort_whatever_the_batching() -> None:
    rng = np.random.default_rng(0)
    keys = [f"s{i:05d}" for i in range(2000)]
    scores = rng.integers(0, 50, size=2000).astype(float)  # many ties
    scores[rng.choice(2000, 30, replace=False)] = np.nan
    expected = select_topk(keys, scores, 100)
    for batch in (1, 7, 500, 2000):
        top = TopK(100)
        for start in range(0, 2000, batch):
            top.add(keys[start : start + batch], scores[start : start + batch])
        assert [k for k, _, _ in top.result()] == expected
    assert all(np.isfinite(scores[keys.index(k)]) for k in expected)


def test_ties_break_by_key_and_rows_travel() -> None:
    top = TopK(2)
    top.add(["b", "a", "c"], np.array([1.0, 1.0, 1.0]), rows=[{"i": 0}, {"i": 1}, {"i": 2}])
    assert top.result() == [("a", 1.0, {"i": 1}), ("b", 1.0, {"i": 0})]


def test_k_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        TopK(0)

"""Acquisition strategies: direction, NaN handling, order-free randomness, Gumbel-top-k sampling."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.acquisition import (
    STRATEGIES,
    ScoreRanks,
    acquisition_values,
    available_strategies,
    check_stochastic,
    gumbel_noise,
    random_values,
    register_strategy,
    stochastic_values,
)
from pipeline.acquisition.selection import TopK, select_topk

# Three samples by hand: "sure" is confidently classified, "unsure" is not, "mid" in between.
# Uncertainty rises sure -> mid -> unsure on every statistic (p1 = 0.9, 0.6, 0.4).
ROWS = {
    "key": np.array(["sure", "mid", "unsure"]),
    "score": np.array([0.1, 1.0, 5.0]),
    "entropy": np.array([0.2, 0.9, 1.3]),
    "margin": np.array([0.85, 0.3, 0.05]),
    "least_confidence": np.array([0.1, 0.4, 0.6]),
    "predicted_loss": np.array([-0.5, 0.2, 2.0]),
}
# Expected order, most worth labeling first; None: no direction (checked separately).
EXPECTED_ORDER: dict[str, list[str] | None] = {
    "lplgrad": ["unsure", "mid", "sure"],
    "entropy": ["unsure", "mid", "sure"],
    "margin": ["unsure", "mid", "sure"],
    "least-confidence": ["unsure", "mid", "sure"],
    "lpl": ["unsure", "mid", "sure"],
    "random": None,
}
CHI2_DF3_P001 = 16.266  # chi-square critical values at p = 0.001
CHI2_DF11_P001 = 31.264


def test_every_registered_strategy_has_an_expectation() -> None:
    assert set(available_strategies()) == set(EXPECTED_ORDER) == set(STRATEGIES)


@pytest.mark.parametrize("strategy", available_strategies())
def test_direction(strategy: str) -> None:
    values = acquisition_values(strategy, ROWS)
    assert values.shape == (3,) and values.dtype == np.float64
    expected = EXPECTED_ORDER[strategy]
    if expected is not None:
        assert select_topk(list(ROWS["key"]), values, 3) == expected
    else:
        assert np.all((values > 0) & (values < 1))


@pytest.mark.parametrize("strategy", available_strategies())
def test_pyarrow_rows_match_numpy(strategy: str) -> None:
    table = pa.table({name: pa.array(column) for name, column in ROWS.items()})
    np.testing.assert_array_equal(acquisition_values(strategy, table), acquisition_values(strategy, ROWS))
    np.testing.assert_array_equal(
        acquisition_values(strategy, dict(table.to_batches()[0].to_pydict())), acquisition_values(strategy, ROWS)
    )


@pytest.mark.parametrize("strategy", [s for s in available_strategies() if STRATEGIES[s].fields != ("key",)])
def test_nan_stays_nan_and_is_never_selected(strategy: str) -> None:
    rows = {name: column.copy() for name, column in ROWS.items()}
    field = STRATEGIES[strategy].fields[0]
    rows[field] = rows[field].astype(np.float64)
    rows[field][2] = np.nan  # the most uncertain row failed to score
    values = acquisition_values(strategy, rows)
    assert np.isnan(values[2]) and np.isfinite(values[:2]).all()
    top = TopK(3)
    top.add(list(rows["key"]), values)
    assert [key for key, _, _ in top.result()] == ["mid", "sure"]
    for mode in ("softmax", "softrank"):
        ranks = ScoreRanks()
        ranks.add(values)
        perturbed = stochastic_values(mode, values, list(rows["key"]), 1.0, 0, ranks=ranks.ranks(values))
        assert np.isnan(perturbed[2])
        assert "unsure" not in select_topk(list(rows["key"]), perturbed, 3)


def test_pyarrow_nulls_are_nan() -> None:
    table = pa.table({"key": ["a", "b"], "entropy": pa.array([0.5, None], pa.float32())})
    values = acquisition_values("entropy", table)
    assert values[0] == 0.5 and np.isnan(values[1])


def test_unknown_strategy_lists_names() -> None:
    with pytest.raises(ValueError, match="unknown acquisition strategy 'bald'.*entropy.*lplgrad"):
        acquisition_values("bald", ROWS)


def test_duplicate_registration_is_an_error() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_strategy("entropy", ["entropy"], nonnegative=True)(lambda rows, seed: rows.floats("entropy"))


def test_missing_column_is_named() -> None:
    with pytest.raises(KeyError, match="predicted_loss"):
        acquisition_values("lpl", {"key": ["a"], "score": [1.0]})


def _pool(n: int) -> list[str]:
    return [f"sample-{i:05d}" for i in range(n)]


@pytest.mark.parametrize("draw", [random_values, gumbel_noise], ids=["random", "gumbel"])
def test_per_key_values_do_not_depend_on_batching(draw) -> None:
    keys = _pool(1000)
    whole = dict(zip(keys, draw(keys, 7)))
    order = np.random.default_rng(0).permutation(len(keys))
    shuffled = [keys[i] for i in order]
    pieces: dict[str, float] = {}
    for chunk in np.array_split(np.array(shuffled, dtype=object), 7):
        pieces.update(zip(chunk, draw(list(chunk), 7)))
    assert pieces == whole  # bit-identical per key
    assert np.all(np.isfinite(list(whole.values())))
    assert draw(keys[:10], 8).tolist() != draw(keys[:10], 7).tolist()  # the seed matters


def test_random_and_gumbel_are_independent_streams() -> None:
    keys = _pool(2000)
    u = random_values(keys, 3)
    g = gumbel_noise(keys, 3)
    assert abs(np.corrcoef(u, g)[0, 1]) < 0.1
    assert 0.45 < u.mean() < 0.55
    assert abs(g.mean() - np.euler_gamma) < 0.1  # Gumbel(0, 1) mean


@pytest.mark.parametrize("mode", ["softmax", "power", "softrank"])
def test_stochastic_topk_merges_exactly_across_batches(mode: str) -> None:
    keys = _pool(600)
    values = np.random.default_rng(1).gamma(2.0, size=600)
    ranks = ScoreRanks()
    for chunk in np.array_split(values, 5):  # pass 1, in any split
        ranks.add(chunk)
    whole = stochastic_values(mode, values, keys, 2.0, 11, ranks=ranks.ranks(values))
    expected = select_topk(keys, whole, 25)
    top = TopK(25)
    for idx in np.array_split(np.random.default_rng(2).permutation(600), 9):
        batch_keys = [keys[i] for i in idx]
        top.add(batch_keys, stochastic_values(mode, values[idx], batch_keys, 2.0, 11, ranks=ranks.ranks(values[idx])))
    assert [key for key, _, _ in top.result()] == expected


def _pick_counts(mode: str, values: np.ndarray, beta: float, trials: int) -> tuple[np.ndarray, np.ndarray]:
    """Counts of the first pick [N] and of ordered (first, second) pairs [N, N] over seeds."""
    keys = [f"item-{i}" for i in range(len(values))]
    ranks = ScoreRanks()
    ranks.add(values)
    first = np.zeros(len(values))
    pairs = np.zeros((len(values), len(values)))
    for seed in range(trials):
        perturbed = stochastic_values(mode, values, keys, beta, seed, ranks=ranks.ranks(values))
        order = np.argsort(-perturbed)
        first[order[0]] += 1
        pairs[order[0], order[1]] += 1
    return first, pairs


def _chi2(observed: np.ndarray, probabilities: np.ndarray) -> float:
    expected = probabilities * observed.sum()
    mask = probabilities > 0
    return float((((observed - expected) ** 2)[mask] / expected[mask]).sum())


VALUES = np.array([0.2, 0.7, 1.1, 1.8])  # ascending, so the ranks are 4, 3, 2, 1


def _target(mode: str, beta: float) -> np.ndarray:
    weights = {
        "softmax": np.exp(beta * VALUES),  # p ∝ exp(β s)
        "power": VALUES**beta,  # p ∝ s^β
        "softrank": np.array([4.0, 3.0, 2.0, 1.0]) ** -beta,  # p ∝ rank^-β
    }[mode]
    return weights / weights.sum()


@pytest.mark.parametrize("mode", ["softmax", "power", "softrank"])
def test_gumbel_top_k_samples_the_target_distribution(mode: str) -> None:
    p = _target(mode, 1.5)
    first, pairs = _pick_counts(mode, VALUES, 1.5, trials=6000)
    assert _chi2(first, p) < CHI2_DF3_P001, (first / first.sum(), p)
    # Without replacement: P(i then j) = p_i p_j / (1 - p_i) (Plackett-Luce), 11 free cells.
    p_pairs = p[:, None] * p[None, :] / (1 - p[:, None])
    np.fill_diagonal(p_pairs, 0.0)
    assert _chi2(pairs, p_pairs) < CHI2_DF11_P001
    # The test has power: the same counts reject the distribution of a different beta.
    assert _chi2(first, _target(mode, 1.0)) > CHI2_DF3_P001


def test_power_gives_zero_scores_no_chance_and_rejects_negatives() -> None:
    keys = ["a", "b", "c"]
    perturbed = stochastic_values("power", np.array([0.0, 1.0, 2.0]), keys, 1.0, 0)
    assert perturbed[0] == -np.inf
    assert sorted(select_topk(keys, perturbed, 3)) == ["b", "c"]  # fewer than k: "a" has p = 0
    with pytest.raises(ValueError, match="values >= 0"):
        stochastic_values("power", np.array([-0.1, 1.0]), ["a", "b"], 1.0, 0)


def test_stochastic_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown stochastic mode"):
        check_stochastic("boltzmann", 1.0)
    for beta in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            check_stochastic("softmax", beta)
    with pytest.raises(ValueError, match="margin"):
        check_stochastic("power", 1.0, "margin")
    check_stochastic("power", 1.0, "lplgrad")
    with pytest.raises(ValueError, match="ScoreRanks"):
        stochastic_values("softrank", np.array([1.0]), ["a"], 1.0, 0)
    with pytest.raises(ValueError, match="keys"):
        stochastic_values("softmax", np.array([1.0, 2.0]), ["a"], 1.0, 0)


def test_score_ranks_are_competition_ranks() -> None:
    ranks = ScoreRanks()
    ranks.add(np.array([3.0, 1.0, np.nan]))
    ranks.add(np.array([3.0, 2.0, np.inf]))
    assert len(ranks) == 4
    np.testing.assert_array_equal(ranks.ranks(np.array([3.0, 2.0, 1.0, 0.5, 9.0])), [1, 3, 4, 5, 1])
    assert np.isnan(ranks.ranks(np.array([np.nan]))[0])
    with pytest.raises(RuntimeError, match="frozen"):
        ranks.add(np.array([1.0]))


def test_keys_must_be_strings() -> None:
    with pytest.raises(TypeError, match="strings"):
        random_values([1, 2], 0)  # type: ignore[list-item]
    assert random_values(pa.array(["a", "b"]), 0).tolist() == random_values(["a", "b"], 0).tolist()

import json

import numpy as np
import pyarrow as pa
import pytest

from pipeline.acquisition import (
    DIVERSE_STRATEGIES,
    CandidateMemoryError,
    Candidates,
    ScoreRanks,
    SelectionSpec,
    TopK,
    acquisition_values,
    select_diverse,
    select_streamed,
    select_topk,
    stochastic_values,
)
from pipeline.manifest import PoolShard, QueryInputs


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


# -- SelectionSpec -----------------------------------------------------------------------------


def test_spec_round_trips_and_drops_beta_without_a_draw() -> None:
    for spec in (SelectionSpec("lplgrad", 5), SelectionSpec("entropy", 3, "softrank", 2.5, 7)):
        assert SelectionSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert SelectionSpec("lplgrad", 5, None, 3.0).beta is None
    assert SelectionSpec("lplgrad", 5, None, 3.0) == SelectionSpec("lplgrad", 5)
    with pytest.raises(ValueError, match="fields"):
        SelectionSpec.from_dict({"strategy": "lplgrad", "k": 5, "norm": "global"})


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("nope", 5), "strategy 'nope' is unknown"),
        (("lplgrad", 0), "k must be positive"),
        (("lplgrad", 5, "gumbel", 1.0), "unknown stochastic mode"),
        (("lplgrad", 5, "softmax", 0.0), "beta must be"),
        (("margin", 5, "power", 1.0), "power sampling needs values >= 0"),
    ],
)
def test_spec_refuses_what_cannot_select(args, message) -> None:
    with pytest.raises(ValueError, match=message):
        SelectionSpec(*args)


def test_manifest_records_the_spec_as_it_always_recorded_the_config() -> None:
    spec = SelectionSpec("lplgrad", 12, "softmax", 5.0, 7)
    inputs = QueryInputs.for_selection(
        spec,
        {"norm": "global"},
        pool_uri="p",
        shards=(PoolShard("p/a.tar"),),
        checkpoint_uri="c",
        checkpoint_sha256="0" * 64,
    )
    recorded = inputs.to_dict()
    # The manifest JSON of schema 1: strategy name, k, and params seed/norm/stochastic/beta.
    assert recorded["strategy"] == {
        "name": "lplgrad",
        "params": {"seed": 7, "norm": "global", "stochastic": "softmax", "beta": 5.0},
    }
    assert recorded["k"] == 12
    assert inputs.selection == spec
    plain = QueryInputs.for_selection(
        SelectionSpec("entropy", 3, beta=9.0),
        {"norm": "global"},
        pool_uri="p",
        shards=(),
        checkpoint_uri="c",
        checkpoint_sha256="0" * 64,
    )
    assert plain.to_dict()["strategy"]["params"] == {"seed": 0, "norm": "global", "stochastic": None, "beta": None}
    # A manifest written before the spec existed (params without stochastic/beta) reads back too.
    older = QueryInputs(
        pool_uri="p",
        shards=(),
        checkpoint_uri="c",
        checkpoint_sha256="0" * 64,
        strategy="lplgrad",
        k=4,
        strategy_params={"seed": 2},
    )
    assert older.selection == SelectionSpec("lplgrad", 4, seed=2)
    with pytest.raises(ValueError, match="selection params"):
        QueryInputs.for_selection(
            spec, {"seed": 1}, pool_uri="p", shards=(), checkpoint_uri="c", checkpoint_sha256="0" * 64
        )


# -- select_streamed ---------------------------------------------------------------------------


class MemoryScores:
    """A ScoresSink in memory."""

    def __init__(self) -> None:
        self.tables: list[pa.Table] = []

    def write(self, batch: pa.Table) -> None:
        self.tables.append(batch)

    def iter_batches(self):
        for table in self.tables:
            yield from table.to_batches(max_chunksize=37)  # read back in other batches than written


def scored_pool(n: int = 600, seed: int = 0) -> pa.Table:
    """RowScorer-like rows over 3 shards: integer scores (many ties), a few error rows."""
    rng = np.random.default_rng(seed)
    keys = [f"k{i:04d}" for i in rng.permutation(n)]
    score = rng.integers(0, 40, size=n).astype(np.float32)
    entropy = rng.random(n).astype(np.float32)
    error = [None] * n
    for i in rng.choice(n, 15, replace=False):
        error[i], score[i], entropy[i] = "not a PNG", np.nan, np.nan
    return pa.table(
        {
            "key": keys,
            "shard": [f"s{i % 3}.tar" for i in range(n)],
            "score": score,
            "entropy": entropy,
            "error": pa.array(error, pa.string()),
        }
    )


def batches(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(start, size) for start in range(0, table.num_rows, size)]


def brute_force(spec: SelectionSpec, table: pa.Table) -> list[str]:
    """The whole table in memory: acquisition values, the draw over all of them, one sort."""
    columns = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
    values = acquisition_values(spec.strategy, columns, seed=spec.seed)
    values[[e is not None for e in columns["error"]]] = np.nan
    keys = table.column("key").to_pylist()
    if spec.stochastic is not None:
        ranks = None
        if spec.stochastic == "softrank":
            everything = ScoreRanks()
            everything.add(values)
            ranks = everything.ranks(values)
        values = stochastic_values(spec.stochastic, values, keys, spec.beta, spec.seed, ranks=ranks)
    return select_topk(keys, values, spec.k)


@pytest.mark.parametrize(
    "spec",
    [
        SelectionSpec("lplgrad", 25),
        SelectionSpec("entropy", 40, seed=3),
        SelectionSpec("lplgrad", 25, "softmax", 0.5, 11),
        SelectionSpec("lplgrad", 25, "power", 2.0, 4),
        SelectionSpec("entropy", 30, "softrank", 1.0, 5),
    ],
)
def test_streamed_selection_equals_the_brute_force_whatever_the_batching(spec) -> None:
    pool = scored_pool()
    expected = brute_force(spec, pool)
    assert len(expected) == spec.k
    for size in (1, 13, 128, 600):
        reused, fresh = pool.slice(0, 200), pool.slice(200)
        sink = MemoryScores()
        result = select_streamed(spec, batches(fresh, size), sink, reused=batches(reused, size))
        assert [key for key, _, _ in result.selected] == expected
        assert result.scored == 585 and result.summary.count == 585
        assert sorted(key for key, _, _ in result.errors) == sorted(
            k for k, e in zip(pool["key"].to_pylist(), pool["error"].to_pylist()) if e
        )
        written = pa.concat_tables(sink.tables)  # every row once, copied ones first
        assert written.column("key").to_pylist() == pool.column("key").to_pylist()
        assert np.array_equal(written.column("score").to_numpy(), pool.column("score").to_numpy(), equal_nan=True)
        assert sum(result.reused_rows.values()) == 200 and sum(result.scored_rows.values()) == 400
        assert result.scored_rows == {f"s{i}.tar": sum(1 for j in range(200, 600) if j % 3 == i) for i in range(3)}
    row = result.selected[0][2]
    assert row["shard"].endswith(".tar") and "score" in row  # the selection row travels with the key


def test_streamed_selection_takes_rays_numpy_shaped_batches() -> None:
    # A batch of whole-shard error rows only: Ray's numpy batches turn its all-None key into NaN.
    shard_errors = pa.table(
        {
            "key": pa.array([float("nan")]),
            "shard": ["bad.tar"],
            "score": pa.array([np.nan], pa.float32()),
            "error": ["shard unreadable: truncated"],
        }
    )
    good = pa.table(
        {
            "key": ["a", "b"],
            "shard": ["ok.tar"] * 2,
            "score": pa.array([1.0, 2.0], pa.float32()),
            "error": pa.array([None, None], pa.string()),
        }
    )
    sink = MemoryScores()
    result = select_streamed(
        SelectionSpec("lplgrad", 5),
        [shard_errors, pa.table({"key": [], "shard": [], "score": [], "error": []}), good],
        sink,
    )
    assert result.errors == [(None, "bad.tar", "shard unreadable: truncated")]
    assert [key for key, _, _ in result.selected] == ["b", "a"] and result.scored == 2
    assert sink.tables[0].column("key").type == pa.string() and sink.tables[0].column("key").null_count == 1
    assert len(sink.tables) == 2  # the empty batch is not written


# -- diverse strategies over the stream -----------------------------------------------------------


def embedded_pool(n: int = 500, classes: int = 4, width: int = 6, seed: int = 0) -> pa.Table:
    """RowScorer(embeddings=True)-like rows: margins with ties, residuals, features, error rows."""
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((n, classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.sort(probs, 1)
    margin = np.round(top[:, -1] - top[:, -2], 2).astype(np.float32)  # rounded: ties, broken by key
    residual = (probs - np.eye(classes)[probs.argmax(1)]).astype(np.float32)
    features = rng.standard_normal((n, width)).astype(np.float32)
    error = [None] * n
    for i in rng.choice(n, 12, replace=False):
        error[i], margin[i] = "not a PNG", np.nan
        residual[i], features[i] = np.nan, np.nan
    return pa.table(
        {
            "key": [f"k{i:04d}" for i in rng.permutation(n)],
            "shard": [f"s{i % 3}.tar" for i in range(n)],
            "margin": margin,
            "error": pa.array(error, pa.string()),
            # One as a fixed-size list, one as a plain list: both shapes reach the driver.
            "residual": pa.FixedSizeListArray.from_arrays(pa.array(residual.ravel()), classes),
            "penultimate": pa.array(list(features)),
        }
    )


def in_memory_candidates(table: pa.Table, m: int) -> Candidates:
    """The M smallest margins by one sort of the whole table (ties by key)."""
    keys = table.column("key").to_pylist()
    margin = table.column("margin").to_numpy(zero_copy_only=False)
    errors = table.column("error").to_pylist()
    order = sorted((i for i in range(len(keys)) if errors[i] is None), key=lambda i: (margin[i], keys[i]))[:m]
    residual = np.array(table.column("residual").to_pylist(), np.float32)
    features = np.array(table.column("penultimate").to_pylist(), np.float32)
    shards = np.array(table.column("shard").to_pylist(), dtype=object)
    return Candidates(
        [keys[i] for i in order],
        margin[order].astype(np.float64),
        residual[order],
        features[order],
        {"shard": shards[order], "margin": margin[order]},
    )


@pytest.mark.parametrize("strategy", sorted(DIVERSE_STRATEGIES))
def test_streamed_diverse_selection_equals_the_in_memory_one_whatever_the_batching(strategy: str) -> None:
    pool = embedded_pool()
    spec = SelectionSpec(strategy, 30, seed=2, candidates=120)
    expected = select_diverse(strategy, in_memory_candidates(pool, 120), 30, 2, spec.clusters)
    expected_keys = [in_memory_candidates(pool, 120).keys[i] for i in expected]
    for size in (7, 64, 500):
        sink = MemoryScores()
        result = select_streamed(spec, batches(pool, size), sink)
        assert [key for key, _, _ in result.selected] == expected_keys
        assert result.scored == 488 and len(result.errors) == 12
        written = pa.concat_tables(sink.tables)
        assert "residual" not in written.column_names and "penultimate" not in written.column_names
        assert written.num_rows == 500
    key, value, row = result.selected[0]
    assert row["shard"].endswith(".tar") and value == row["score"] == -row["margin"]


def test_streamed_diverse_selection_refuses_rows_without_embeddings_and_an_over_budget_set() -> None:
    with pytest.raises(ValueError, match="needs the scorer's embeddings"):
        select_streamed(
            SelectionSpec("badge", 5), [scored_pool().append_column("margin", pa.array([0.5] * 600))], MemoryScores()
        )
    with pytest.raises(CandidateMemoryError, match="M=100000 x"):
        select_streamed(
            SelectionSpec("badge", 10, candidates=100_000, candidate_memory_mb=1), [embedded_pool()], MemoryScores()
        )

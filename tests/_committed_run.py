"""A committed query run with made-up scores over a real pool, built without Ray, as the query
job would commit it: shared by the manifest CLI and report tests (tests/conftest.py puts this
folder on the import path).

Every row gets a gamma-distributed LPLgrad score, the rows at FAILED fail to score, and the exact
top-K by LPLgrad is committed with its scores, errors and summary.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.acquisition import acquisition_values
from pipeline.acquisition.selection import TopK
from pipeline.manifest import PoolShard, QueryInputs, ScoreSummary, begin_run, commit_run, selection_rows
from pipeline.pools import iter_pool_samples, resolve_pool

K = 6
FAILED = (3, 17)  # sample indices that "fail to score"


def commit_fake_run(
    pool_uri: str, out: str, run_id: str, options: dict[str, Any] | None = None, ghost: str | None = None, k: int = K
) -> dict[str, Any]:
    """Commit a run with made-up scores, as the query job would; ``ghost`` adds a key the pool lacks."""
    pool = resolve_pool(pool_uri, options)
    rows = [(s.key, s.shard) for s in iter_pool_samples(pool)]
    if ghost:
        rows.append((ghost, pool.shards[0].uri))
    keys = np.array([key for key, _ in rows])
    n = len(keys)
    gradnorm = np.random.default_rng(7).gamma(2.0, size=n)
    if ghost:
        gradnorm[-1] = 1e6  # ranked first, so extract must miss it
    failed = np.isin(np.arange(n), FAILED)
    gradnorm[failed] = np.nan
    batch = {
        "key": keys,
        "shard": np.array([shard for _, shard in rows]),
        "score": gradnorm,
        "entropy": gradnorm / 10,
        "margin": 1 - gradnorm / 10,
        "least_confidence": gradnorm / 20,
        "pred_class": np.arange(n) % 3,
        "pred_prob": np.full(n, 0.5),
        "predicted_loss": np.full(n, np.nan),
        "error": np.array([("non-finite logits" if f else None) for f in failed], dtype=object),
    }
    inputs = QueryInputs(
        pool_uri=pool_uri,
        shards=tuple(PoolShard(s.uri, s.samples, s.bytes) for s in pool.shards),
        checkpoint_uri="s3://ckpt/made-up/epoch-3",
        checkpoint_sha256="cd" * 32,
        strategy="lplgrad",
        k=k,
        strategy_params={"seed": 0},
    )
    state = begin_run(out, run_id, inputs.fingerprint(), options)
    values = acquisition_values("lplgrad", batch)
    top, summary = TopK(k), ScoreSummary()
    with state.scores_writer(rows_per_part=16) as writer:  # 3 part files
        for start in range(0, n, 10):
            part = slice(start, start + 10)
            writer.write({name: list(column[part]) for name, column in batch.items()})
            top.add(
                list(keys[part]), values[part], selection_rows({k: v[part] for k, v in batch.items()}, values[part])
            )
            summary.add(values[part][~failed[part]], list(keys[part][~failed[part]]))
    errors = [(str(keys[i]), str(batch["shard"][i]), "non-finite logits") for i in FAILED]
    return commit_run(state, inputs, top.result(), errors, scored=n - len(FAILED), excluded=0, summary=summary)

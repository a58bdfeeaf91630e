"""One simulated query on arrays: score the candidates with the cycle's model, then select with
the chain (top-k, a stochastic draw, core-set or BADGE).

Scoring goes through the query job's scorer (`GradNormScorer`: LPLgrad, entropy, margin, least
confidence and the LossNet's predicted loss in one pass). The diverse strategies (`badge`,
`cluster-margin`) take the query's own path (`diverse_query`): `RowScorer`'s forward pass with
embeddings, the smallest-margin candidates gathered, then `select_candidates`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.acquisition import (
    DIVERSE_STRATEGIES,
    CandidateGatherer,
    Chain,
    SelectionSpec,
    check_candidate_memory,
    classifier_head,
    get_strategy,
    kcenter_greedy,
    penultimate_features,
    select_by_values,
    select_candidates,
)
from pipeline.scoring import entropy, top2
from pipeline.scoring.gradnorm import GradNormScorer
from pipeline.scoring.rows import RowScorer
from pipeline.simulation.fit import TrainedModel

__all__ = ["classifier_head", "query_in_memory", "score_rows"]


def score_rows(
    trained: TrainedModel,
    images: np.ndarray,
    keys: Sequence[str],
    batch_size: int = 512,
    gradnorm: bool = True,
) -> dict[str, np.ndarray]:
    """Score rows of the candidates: ``key`` and the scorer's statistics, each [N].

    ``gradnorm=False`` skips the backward pass for chains that read no gradient norm (entropy,
    margin, lpl): the same forward, the same statistics, ``score`` left NaN.
    """
    scorer = GradNormScorer(trained.model, loss_module=trained.lossnet, tap=trained.tap) if gradnorm else None
    columns: dict[str, list[np.ndarray]] = {
        name: [] for name in ("score", "entropy", "margin", "least_confidence", "predicted_loss")
    }
    device = next(trained.model.parameters()).device
    try:
        for start in range(0, len(keys), batch_size):
            batch = torch.from_numpy(images[start : start + batch_size]).to(device)
            result = scorer(batch) if scorer is not None else _forward_statistics(trained, batch)
            for name, values in (
                ("score", result.gradnorm),
                ("entropy", result.entropy),
                ("margin", result.margin),
                ("least_confidence", result.least_confidence),
                ("predicted_loss", result.predicted_loss),
            ):
                columns[name].append(values.numpy() if values is not None else np.full(len(batch), np.nan, np.float32))
    finally:
        if scorer is not None:
            scorer.remove()
    rows = {name: np.concatenate(parts) if parts else np.empty(0, np.float32) for name, parts in columns.items()}
    rows["key"] = np.asarray(keys, dtype=object)
    return rows


@dataclass
class _ForwardStatistics:
    gradnorm: Tensor
    entropy: Tensor
    margin: Tensor
    least_confidence: Tensor
    predicted_loss: Tensor


def _forward_statistics(trained: TrainedModel, batch: Tensor) -> _ForwardStatistics:
    """The scorer's statistics from a forward pass alone (eval mode, no gradients)."""
    with torch.no_grad(), trained.tap.capture() as features:
        logits = trained.model(batch).float()
    with torch.no_grad():
        predicted = trained.lossnet(list(features)).float().reshape(-1)
    p1, p2, _ = top2(logits)
    return _ForwardStatistics(
        torch.full_like(p1, float("nan")).cpu(),
        entropy(logits).cpu(),
        (p1 - p2).cpu(),
        (1.0 - p1).cpu(),
        predicted.cpu(),
    )


def query_in_memory(
    chain: Chain,
    trained: TrainedModel,
    images: np.ndarray,
    keys: Sequence[str],
    candidates: np.ndarray,
    labeled: np.ndarray,
    k: int,
    seed: int,
    candidate_memory_mb: float = 1024.0,
    diverse_candidates: int | None = None,
    clusters: int | None = None,
) -> tuple[list[int], float]:
    """Rows of ``images`` the chain picks among ``candidates``, and the pass's mean LPLgrad score.

    Args:
        chain: What selects.
        trained: The cycle's model (eval mode).
        images: The whole pool, float32 [N, C, H, W].
        keys: Its keys [N].
        candidates: Rows that may be picked (the unlabeled random subset).
        labeled: Rows already labeled (core-set's existing centres).
        k: Batch size.
        seed: Seed of random, stochastic draws and the diverse strategies.
        candidate_memory_mb: The diverse strategies' candidate budget, checked before scoring.
        diverse_candidates: Their M (default ``2 * k``).
        clusters: ``cluster-margin``'s k-means clusters (default ``ceil(k / 10)``).

    Returns:
        (picked rows in pick order, mean LPLgrad score of the candidates or NaN when not scored).
    """
    candidate_keys = [keys[i] for i in candidates]
    if chain.strategy == "random":
        return _rows_of(select_by_values(chain, {"key": candidate_keys}, k, seed), candidate_keys, candidates), float(
            "nan"
        )
    if chain.strategy == "coreset":
        features = _features(trained.model, images, candidates)
        centres = _features(trained.model, images, labeled)
        return [int(candidates[i]) for i in kcenter_greedy(features, centres, k)], float("nan")
    if chain.strategy in DIVERSE_STRATEGIES:
        picked = diverse_query(
            chain.strategy,
            trained,
            images[candidates],
            candidate_keys,
            k,
            seed,
            candidate_memory_mb,
            candidates=diverse_candidates,
            clusters=clusters,
        )
        return _rows_of(picked, candidate_keys, candidates), float("nan")
    needs_gradnorm = "score" in get_strategy(chain.strategy).fields
    rows = score_rows(trained, images[candidates], candidate_keys, gradnorm=needs_gradnorm)
    finite = rows["score"][np.isfinite(rows["score"])]
    mean_score = float(finite.mean()) if len(finite) else float("nan")
    return _rows_of(select_by_values(chain, rows, k, seed), candidate_keys, candidates), mean_score


def diverse_query(
    strategy: str,
    trained: TrainedModel,
    images: np.ndarray,
    keys: Sequence[str],
    k: int,
    seed: int,
    memory_mb: float,
    batch_size: int = 512,
    candidates: int | None = None,
    clusters: int | None = None,
) -> list[str]:
    """The keys a diverse strategy (``badge``, ``cluster-margin``) picks, as ``lplgrad query`` does:
    the forward pass with embeddings (``RowScorer``), the ``candidates`` (default ``2 * k``)
    smallest-margin rows gathered (``CandidateGatherer``), then ``select_candidates``.

    Raises:
        CandidateMemoryError: When the candidate set would exceed ``memory_mb``, before scoring.
    """
    spec = SelectionSpec(
        strategy, k, seed=seed, candidates=candidates, candidate_memory_mb=memory_mb, clusters=clusters
    )
    head = classifier_head(trained.model)
    size = min(spec.candidates, len(keys))
    check_candidate_memory(max(size, 1), head.out_features, head.in_features, memory_mb)
    device = str(next(trained.model.parameters()).device)
    scorer = RowScorer(lambda: (trained.model, trained.lossnet, trained.tap), device, gradnorm=False, embeddings=True)
    gatherer = CandidateGatherer(spec.candidates, head.out_features, head.in_features)
    try:
        for start in range(0, len(keys), batch_size):
            part = np.asarray(keys[start : start + batch_size], dtype=object)
            rows = scorer({"image": images[start : start + batch_size], "key": part})
            margins = np.where([e is None for e in rows["error"]], rows["margin"], np.nan)
            gatherer.add(part.tolist(), margins, rows["residual"], rows["penultimate"])
    finally:
        scorer.close()
    return [key for key, _, _ in select_candidates(spec, gatherer.result())]


def _rows_of(picked: Sequence[str], keys: Sequence[str], rows: np.ndarray) -> list[int]:
    """Pool rows of the picked keys, in pick order."""
    by_key = dict(zip(keys, rows))
    return [int(by_key[key]) for key in picked]


def _features(model: nn.Module, images: np.ndarray, rows: np.ndarray, batch_size: int = 1024) -> Tensor:
    device = next(model.parameters()).device
    parts = [
        penultimate_features(model, torch.from_numpy(images[rows[s : s + batch_size]]).to(device)).cpu()
        for s in range(0, len(rows), batch_size)
    ]
    return torch.cat(parts) if parts else torch.empty(0, 0)

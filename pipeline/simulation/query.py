"""One simulated query on arrays: score the candidates with the cycle's model, then select with
the chain (top-k, a stochastic draw, core-set or BADGE).

Scoring goes through the query job's scorer (`GradNormScorer`: LPLgrad, entropy, margin, least
confidence and the LossNet's predicted loss in one pass); BADGE's gradient embeddings are taken
from that same pass, by a hook on the classifier's last linear layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from pipeline.acquisition import (
    Chain,
    badge_embeddings,
    check_badge_memory,
    get_strategy,
    kcenter_greedy,
    kmeanspp_seeding,
    penultimate_features,
    select_by_values,
)
from pipeline.scoring import entropy, top2
from pipeline.scoring.gradnorm import GradNormScorer
from pipeline.simulation.fit import TrainedModel

__all__ = ["classifier_head", "query_in_memory", "score_rows"]


def classifier_head(model: nn.Module) -> nn.Linear:
    """The last nn.Linear of the model: the layer whose inputs are the penultimate features."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier: BADGE and core-set need one")
    return linears[-1]


def score_rows(
    trained: TrainedModel,
    images: np.ndarray,
    keys: Sequence[str],
    batch_size: int = 512,
    badge: bool = False,
    gradnorm: bool = True,
) -> tuple[dict[str, np.ndarray], Tensor | None]:
    """Score rows of the candidates and, with ``badge``, their gradient embeddings [N, C*D].

    ``gradnorm=False`` skips the backward pass for chains that read no gradient norm (entropy,
    margin, lpl, BADGE): the same forward, the same statistics, ``score`` left NaN.
    """
    scorer = GradNormScorer(trained.model, loss_module=trained.lossnet, tap=trained.tap) if gradnorm else None
    captured: list[Tensor] = []
    hook = None
    if badge:
        hook = classifier_head(trained.model).register_forward_hook(
            lambda _m, args, out: captured.append(badge_embeddings(out.detach(), args[0].detach().flatten(1)))
        )
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
        if hook is not None:
            hook.remove()
    rows = {name: np.concatenate(parts) if parts else np.empty(0, np.float32) for name, parts in columns.items()}
    rows["key"] = np.asarray(keys, dtype=object)
    return rows, (torch.cat(captured).cpu() if badge and captured else None)


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
    badge_memory_mb: float = 2048.0,
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
        seed: Seed of random, stochastic draws and BADGE's k-means++.
        badge_memory_mb: BADGE's embedding budget, checked before scoring.

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
    if chain.strategy == "badge":
        head = classifier_head(trained.model)
        check_badge_memory(len(candidates), head.out_features, head.in_features, badge_memory_mb)
    needs_gradnorm = chain.strategy != "badge" and "score" in get_strategy(chain.strategy).fields
    rows, embeddings = score_rows(
        trained, images[candidates], candidate_keys, badge=chain.strategy == "badge", gradnorm=needs_gradnorm
    )
    finite = rows["score"][np.isfinite(rows["score"])]
    mean_score = float(finite.mean()) if len(finite) else float("nan")
    if embeddings is not None:
        return [int(candidates[i]) for i in kmeanspp_seeding(embeddings, k, seed)], mean_score
    return _rows_of(select_by_values(chain, rows, k, seed), candidate_keys, candidates), mean_score


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

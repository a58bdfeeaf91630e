"""Per-sample acquisition scores: LPLgrad gradient norms and the uncertainty baselines.

`gradnorm_scores` is the production scorer (one batched forward and backward);
`reference_gradnorm_scores` and `vmap_gradnorm_scores` exist to check and benchmark it.
`register_layer_rule` gives another layer type a fast exact rule (the `LayerRule` contract).
"""

from pipeline.scoring._layer_rules import LayerRule, layer_rules, register_layer_rule
from pipeline.scoring.gradnorm import NORMS, BatchScores, GradNormScorer, Norm, Plan, combine_norms, gradnorm_scores
from pipeline.scoring.reference import reference_gradnorm_scores, vmap_gradnorm_scores
from pipeline.scoring.rows import SCORE_COLUMNS, RowScorer
from pipeline.scoring.uncertainty import entropy, least_confidence, margin, top2

__all__ = [
    "BatchScores",
    "GradNormScorer",
    "LayerRule",
    "NORMS",
    "Norm",
    "Plan",
    "RowScorer",
    "SCORE_COLUMNS",
    "combine_norms",
    "entropy",
    "gradnorm_scores",
    "layer_rules",
    "least_confidence",
    "margin",
    "reference_gradnorm_scores",
    "register_layer_rule",
    "top2",
    "vmap_gradnorm_scores",
]

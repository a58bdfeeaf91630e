"""Acquisition: per-sample strategies by name, stochastic draws, chains, and the set functions
(core-set, BADGE) that pick from a gathered feature or embedding matrix, and a query's selection
(its spec, and the streaming exact top-k or draw over the rows the scoring actors return)."""

from pipeline.acquisition._strategies import (
    STOCHASTIC_MODES,
    STRATEGIES,
    ScoreRanks,
    Strategy,
    acquisition_values,
    available_strategies,
    check_stochastic,
    get_strategy,
    gumbel_noise,
    random_values,
    register_strategy,
    stochastic_values,
)
from pipeline.acquisition.badge import BadgeMemoryError, badge_embeddings, check_badge_memory, kmeanspp_seeding
from pipeline.acquisition.chains import SET_STRATEGIES, Chain, parse_chain, select_by_values
from pipeline.acquisition.coreset import FeatureRows, kcenter_greedy, penultimate_features
from pipeline.acquisition.selection import SelectionSpec, TopK, select_topk
from pipeline.acquisition.streaming import ScoresSink, StreamedSelection, select_streamed

__all__ = [
    "STOCHASTIC_MODES",
    "STRATEGIES",
    "SET_STRATEGIES",
    "BadgeMemoryError",
    "Chain",
    "FeatureRows",
    "ScoreRanks",
    "ScoresSink",
    "SelectionSpec",
    "Strategy",
    "StreamedSelection",
    "TopK",
    "acquisition_values",
    "available_strategies",
    "badge_embeddings",
    "check_badge_memory",
    "check_stochastic",
    "get_strategy",
    "gumbel_noise",
    "kcenter_greedy",
    "kmeanspp_seeding",
    "parse_chain",
    "penultimate_features",
    "random_values",
    "register_strategy",
    "select_by_values",
    "select_streamed",
    "select_topk",
    "stochastic_values",
]

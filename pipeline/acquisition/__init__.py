"""Acquisition: per-sample strategies by name, stochastic draws, chains, the set functions
(core-set, BADGE) that pick from a gathered feature or embedding matrix, the diverse strategies
(``badge``, ``cluster-margin``) that pick from the smallest-margin candidates gathered with their
embeddings, and a query's selection (its spec, and the streaming exact top-k or draw over the
rows the scoring actors return)."""

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
from pipeline.acquisition.badge import badge_select
from pipeline.acquisition.candidates import (
    CandidateGatherer,
    CandidateMemoryError,
    Candidates,
    candidate_bytes,
    check_candidate_memory,
    classifier_head,
    prediction_residuals,
)
from pipeline.acquisition.chains import SET_STRATEGIES, Chain, parse_chain, select_by_values
from pipeline.acquisition.cluster_margin import cluster_margin_select, default_clusters, kmeans_labels
from pipeline.acquisition.coreset import FeatureRows, kcenter_greedy, penultimate_features
from pipeline.acquisition.diverse import DIVERSE_STRATEGIES, DiverseStrategy, register_diverse, select_diverse
from pipeline.acquisition.selection import SelectionSpec, TopK, select_topk
from pipeline.acquisition.streaming import ScoresSink, StreamedSelection, select_candidates, select_streamed

__all__ = [
    "DIVERSE_STRATEGIES",
    "STOCHASTIC_MODES",
    "STRATEGIES",
    "SET_STRATEGIES",
    "CandidateGatherer",
    "CandidateMemoryError",
    "Candidates",
    "Chain",
    "DiverseStrategy",
    "FeatureRows",
    "ScoreRanks",
    "ScoresSink",
    "SelectionSpec",
    "Strategy",
    "StreamedSelection",
    "TopK",
    "acquisition_values",
    "available_strategies",
    "badge_select",
    "candidate_bytes",
    "check_candidate_memory",
    "classifier_head",
    "cluster_margin_select",
    "default_clusters",
    "check_stochastic",
    "get_strategy",
    "gumbel_noise",
    "kcenter_greedy",
    "kmeans_labels",
    "parse_chain",
    "penultimate_features",
    "prediction_residuals",
    "random_values",
    "register_diverse",
    "register_strategy",
    "select_by_values",
    "select_candidates",
    "select_diverse",
    "select_streamed",
    "select_topk",
    "stochastic_values",
]

"""Proxy mode: score a pool through a small head on cached backbone features instead of the
whole model. Extraction fills a feature store (features, store); a proxy head with its loss
module is trained on the labeled rows' features (head, training, fitting); the backbone is fine-tuned and
promoted when the alignment policy says the features have drifted (alignment). A proxy query checks
its store against the checkpoint and the pool first (_checks). See docs/proxy.md."""

from pipeline.proxy._checks import check_store_fresh, proxy_record, proxy_store
from pipeline.proxy.alignment import FINETUNE_MODES, AlignmentPolicy, AlignmentState, load_probe_into
from pipeline.proxy.extraction import FeatureExtractor, feature_batch, feature_dim
from pipeline.proxy.fitting import ProxyConfig, ProxyResult, fit_proxy, lookup_features
from pipeline.proxy.head import PROXY_KINDS, TAP_LAYER, ProxyHead, ProxySpec
from pipeline.proxy.store import (
    FEATURE_COLUMNS,
    STORE_FILE,
    Backbone,
    ExtractionPlan,
    FeatureStore,
    FeatureStoreError,
    StoreShard,
    commit_store,
    features_matrix,
    features_table,
    new_generation,
    open_store,
    plan_extraction,
)
from pipeline.proxy.training import ProxyTraining, proxy_accuracy, save_proxy_checkpoint, train_proxy

__all__ = [
    "FEATURE_COLUMNS",
    "FINETUNE_MODES",
    "PROXY_KINDS",
    "STORE_FILE",
    "TAP_LAYER",
    "AlignmentPolicy",
    "AlignmentState",
    "Backbone",
    "ExtractionPlan",
    "FeatureExtractor",
    "FeatureStore",
    "FeatureStoreError",
    "ProxyConfig",
    "ProxyHead",
    "ProxyResult",
    "ProxySpec",
    "ProxyTraining",
    "StoreShard",
    "check_store_fresh",
    "commit_store",
    "feature_batch",
    "feature_dim",
    "features_matrix",
    "features_table",
    "fit_proxy",
    "load_probe_into",
    "lookup_features",
    "new_generation",
    "open_store",
    "plan_extraction",
    "proxy_accuracy",
    "proxy_record",
    "proxy_store",
    "save_proxy_checkpoint",
    "train_proxy",
]

"""A proxy head trained on the cached features of a labeled set, as one typed call:
`fit_proxy(spec) -> ProxyResult`. `lplgrad proxy` is this call behind a command line; simulate
and align call it directly (align's LP-FT probe is a linear proxy).

The labeled keys are looked up in the feature stores (in order; all must share one backbone) and
their labels read from the labeled pool's `cls`. A head on a few thousand feature rows trains in
seconds in one process, so no Ray is needed.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import config_to_dict
from pipeline.pools import read_labels
from pipeline.proxy.head import PROXY_KINDS, ProxySpec
from pipeline.proxy.store import FeatureStore, FeatureStoreError, open_store
from pipeline.proxy.training import ProxyTraining, proxy_accuracy, save_proxy_checkpoint, train_proxy
from pipeline.storage import check_writable, filesystem_for, is_local

__all__ = ["ProxyConfig", "ProxyResult", "fit_proxy", "lookup_features"]


@dataclass(frozen=True)
class ProxyConfig:
    """What `lplgrad proxy` trains: a head of `kind` on `features` of the `labeled` pool's keys."""

    labeled: str = ""  # the labeled pool: keys and labels
    features: tuple[str, ...] = ()  # feature stores holding the labeled keys (one backbone)
    out: str = ""  # the proxy checkpoint directory
    kind: str = "mlp"  # linear | mlp
    hidden: int = 256
    lossnet_hidden: int = 128
    epochs: int = 100
    batch_size: int = 64
    lr: float = 0.05
    seed: int = 0
    holdout: str | None = None  # a labeled pool to report accuracy on (its keys must be in `features`)
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.labeled or not self.features or not self.out:
            raise ValueError("labeled, features and out are required (labeled=POOL features=[STORE,...] out=DIR)")
        if self.kind not in PROXY_KINDS:
            raise ValueError(f"kind {self.kind!r} is unknown; choose one of {', '.join(PROXY_KINDS)}")
        self.training()  # validates

    def training(self) -> ProxyTraining:
        return ProxyTraining(self.epochs, self.batch_size, self.lr, seed=self.seed)


@dataclass(frozen=True)
class ProxyResult:
    """A trained proxy head.

    Attributes:
        checkpoint: Its checkpoint directory (what `lplgrad query features=...` scores with).
        train_accuracy: Accuracy on the labeled rows at the last epoch.
        holdout_accuracy: Accuracy on the holdout pool's features (None without `holdout`).
        metrics: One row per epoch (loss, ce, ranking, accuracy), as saved in the checkpoint.
        seconds: Training time.
    """

    checkpoint: str
    train_accuracy: float
    holdout_accuracy: float | None
    metrics: tuple[dict[str, Any], ...]
    seconds: float


def lookup_features(stores: Sequence[FeatureStore], keys: Sequence[str]) -> np.ndarray:
    """[len(keys), D] features, each key from the first store that has it.

    Raises:
        FeatureStoreError: stores of different backbones, or a key no store holds.
    """
    backbones = {s.backbone.sha256 for s in stores}
    if len(backbones) > 1:
        raise FeatureStoreError(f"the feature stores come from {len(backbones)} different backbones; a proxy needs one")
    remaining, found = list(dict.fromkeys(keys)), {}
    for store in stores:
        found.update(store.find(remaining)[0])
        remaining = [k for k in remaining if k not in found]
    if remaining:
        raise FeatureStoreError(
            f"{len(remaining)} labeled keys have no features in {[s.uri for s in stores]} (e.g. {remaining[:3]}); "
            "extract the pool they come from with the same backbone (lplgrad features) and add it to features="
        )
    return np.stack([found[k] for k in keys])


def fit_proxy(config: ProxyConfig) -> ProxyResult:
    """Train the head on the labeled rows' features and write its checkpoint to `config.out`.

    Raises:
        FeatureStoreError: A labeled (or holdout) key without features, or stores of two backbones.
        ValueError: `out` cannot be written.
    """
    stores = [open_store(uri, config.storage_options) for uri in config.features]
    check_writable(config.out, config.storage_options, what="proxy checkpoint directory")
    keys, labels, classes = read_labels(config.labeled, config.storage_options)
    features = lookup_features(stores, keys)
    spec = ProxySpec(
        config.kind,
        features.shape[1],
        len(classes),
        config.hidden,
        config.lossnet_hidden,
        feature_store=stores[0].uri,
        backbone_sha256=stores[0].backbone.sha256,
    )
    started = time.perf_counter()
    head, lossnet, history = train_proxy(features, labels, spec, config.training())
    seconds = time.perf_counter() - started
    metrics = [dict(m) for m in history]
    holdout = None
    if config.holdout:
        holdout_keys, holdout_labels, _ = read_labels(config.holdout, config.storage_options)
        holdout = proxy_accuracy(head, lookup_features(stores, holdout_keys), holdout_labels)
        metrics[-1]["holdout_accuracy"] = holdout
    _save(config.out, config.storage_options, head, lossnet, spec, classes, metrics, config_to_dict(config))
    print(
        f"proxy ({config.kind}) on {len(keys)} labeled samples, {spec.in_features}-d features: "
        f"train accuracy {metrics[-1]['accuracy']:.4f}"
        + (f", holdout accuracy {holdout:.4f}" if holdout is not None else "")
        + f", {seconds:.1f}s; checkpoint {config.out}"
    )
    return ProxyResult(config.out, metrics[-1]["accuracy"], holdout, tuple(metrics), seconds)


def _save(uri: str, storage_options: Mapping[str, Any], *args: Any) -> None:
    """Save locally, or save to a temporary directory and upload (the checkpoint's one file)."""
    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):
        save_proxy_checkpoint(path, *args)
        return
    with tempfile.TemporaryDirectory() as local:
        written = save_proxy_checkpoint(local, *args)
        fs.put_file(str(written), f"{path.rstrip('/')}/{written.name}")

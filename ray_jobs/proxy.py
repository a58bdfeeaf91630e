"""Train a proxy head (linear or MLP, with its own LossNet) on the cached features of the labeled
set with the joint LPLgrad objective; the checkpoint it writes is what `lplgrad query
features=...` scores the pool with (docs/proxy.md).

    lplgrad proxy labeled=runs/pools/labeled features=[runs/features/unlabeled,runs/features/labeled] \
        out=runs/proxy/2026-11-21
    lplgrad proxy labeled=s3://bucket/labeled features=[s3://bucket/features/pool] kind=mlp epochs=100 out=s3://bucket/proxy/night-42

The labeled keys are looked up in the feature stores (in order; all must share one backbone) and
their labels read from the labeled pool's `cls`. A head on a few thousand feature rows trains in
seconds in one process, so this job starts no Ray cluster.
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
from ray_jobs._shared.entry import Job, run_job


@dataclass(frozen=True)
class ProxyConfig:
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
        ProxyTraining(self.epochs, self.batch_size, self.lr, seed=self.seed)  # validates


def lookup_features(stores: Sequence[FeatureStore], keys: Sequence[str]) -> np.ndarray:
    """[len(keys), D] features, each key from the first store that has it."""
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


def run(config: ProxyConfig) -> dict[str, Any]:
    """Train and write the proxy checkpoint; returns {"checkpoint", "metrics", "holdout_accuracy"}."""
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
    head, lossnet, history = train_proxy(
        features, labels, spec, ProxyTraining(config.epochs, config.batch_size, config.lr, seed=config.seed)
    )
    seconds = time.perf_counter() - started
    metrics = [dict(m) for m in history]
    holdout = None
    if config.holdout:
        holdout_keys, holdout_labels, _ = read_labels(config.holdout, config.storage_options)
        holdout = proxy_accuracy(head, lookup_features(stores, holdout_keys), holdout_labels)
        metrics[-1]["holdout_accuracy"] = holdout
    save_to(config.out, config.storage_options, head, lossnet, spec, classes, metrics, config_to_dict(config))
    print(
        f"proxy ({config.kind}) on {len(keys)} labeled samples, {spec.in_features}-d features: "
        f"train accuracy {metrics[-1]['accuracy']:.4f}"
        + (f", holdout accuracy {holdout:.4f}" if holdout is not None else "")
        + f", {seconds:.1f}s; checkpoint {config.out}"
    )
    return {"checkpoint": config.out, "metrics": metrics, "holdout_accuracy": holdout}


def save_to(uri: str, storage_options: Mapping[str, Any], *args: Any) -> None:
    """Save locally, or save to a temporary directory and upload (the checkpoint's one file)."""
    fs, path = filesystem_for(uri, storage_options)
    if is_local(fs):
        save_proxy_checkpoint(path, *args)
        return
    with tempfile.TemporaryDirectory() as local:
        written = save_proxy_checkpoint(local, *args)
        fs.put_file(str(written), f"{path.rstrip('/')}/{written.name}")


def start(config: ProxyConfig) -> None:
    """`lplgrad proxy`: train the head (no Ray needed: the features are cached)."""
    run(config)


JOB = Job("proxy", ProxyConfig, start, run, "Train a proxy head on cached features.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))

"""What a proxy query checks about its feature store before scoring, and what it records of it.

A proxy checkpoint scores rows of a feature store instead of images, so the query must hold the
store the proxy was trained for (same backbone) and the store must describe the pool as it is now
(no shard new, changed or gone since extraction). Both are checked from the store's index alone,
in one request, before any scoring starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pipeline.proxy.store import FeatureStore, FeatureStoreError, open_store

if TYPE_CHECKING:  # pipeline.checkpoint imports pipeline.proxy at run time
    from pipeline.checkpoint import Checkpoint

__all__ = ["check_store_fresh", "proxy_record", "proxy_store"]


def proxy_store(
    checkpoint: Checkpoint,
    checkpoint_uri: str,
    features: str | None,
    storage_options: Mapping[str, Any] | None = None,
) -> FeatureStore | None:
    """The feature store a proxy checkpoint scores from, checked against what the proxy was trained on.

    Args:
        checkpoint: The loaded checkpoint.
        checkpoint_uri: Where it came from (for the messages).
        features: The feature store URI the query was given (``None`` or ``""``: none).
        storage_options: fsspec options for the store.

    Returns:
        The opened store; ``None`` for a backbone checkpoint given no store.

    Raises:
        CheckpointError: A store given with a backbone checkpoint, none given with a proxy
            checkpoint, or a store of another backbone than the proxy's.
        FeatureStoreError: The store cannot be read.
    """
    from pipeline.checkpoint import CheckpointError  # deferred: see the TYPE_CHECKING import

    if checkpoint.proxy is None:
        if features:
            raise CheckpointError(
                f"features= is for proxy checkpoints (lplgrad proxy); {checkpoint_uri} is a backbone checkpoint"
            )
        return None
    if not features:
        raise CheckpointError(
            f"{checkpoint_uri} is a proxy checkpoint: pass features=FEATURE_STORE (made by lplgrad features)"
        )
    store = open_store(features, storage_options)
    trained_on = checkpoint.proxy.backbone_sha256
    if trained_on != store.backbone.sha256:
        raise CheckpointError(
            f"the proxy was trained on features of backbone {str(trained_on)[:12]}, but {features} holds backbone "
            f"{store.backbone.sha256[:12]}: retrain the proxy on this store, or query a store of its backbone"
        )
    return store


def check_store_fresh(store: FeatureStore, identities: Mapping[str, Mapping[str, Any] | None]) -> None:
    """Refuse a store that misses shards of the pool or holds older versions of them: a proxy
    query must see the whole pool as it is now.

    Args:
        store: The opened store.
        identities: Shard URI -> its identity now (``pipeline.manifest.shard_identity``), for
            every shard of the pool.

    Raises:
        FeatureStoreError: Naming how many shards are new, changed or gone, and the command that
            brings the store up to date.
    """
    recorded = {s.uri: s.identity for s in store.shards}
    stale = [
        uri
        for uri, identity in identities.items()
        if uri not in recorded or identity is None or recorded[uri] != identity
    ]
    gone = [uri for uri in recorded if uri not in identities]
    if stale or gone:
        raise FeatureStoreError(
            f"feature store {store.uri} is stale: {len(stale)} shards new or changed since extraction, "
            f"{len(gone)} gone (e.g. {(stale + gone)[:3]}); run `lplgrad features pool={store.pool_uri} "
            f"out={store.uri} ...` again (unchanged shards are not re-extracted)"
        )


def proxy_record(checkpoint: Checkpoint, store: FeatureStore | None) -> dict[str, Any]:
    """What the manifest's ``extra`` says about a proxy query: ``{"proxy": {...}}``, or ``{}``
    for a full-model query (``store`` is ``None``)."""
    if store is None or checkpoint.proxy is None:
        return {}
    proxy = checkpoint.proxy
    return {
        "proxy": {
            "kind": proxy.kind,
            "feature_store": store.uri,
            "backbone_sha256": store.backbone.sha256,
            "backbone_source": store.backbone.source,
            "trained_on_store": proxy.feature_store,
        }
    }

"""Steps 1-2 of a query: every input checked without Ray (:func:`check_before_ray`), then the
labeled pool's keys, the run's recorded inputs (:func:`prepare`) and the reuse plan."""

from __future__ import annotations

from typing import Any

from pipeline.acquisition import SelectionSpec, check_candidate_memory, classifier_head
from pipeline.checkpoint import (
    CheckpointError,
    build_from_checkpoint,
    checkpoint_digest,
    fetch_checkpoint,
    load_checkpoint,
)
from pipeline.manifest import begin_run, previous_run, query_inputs, resolve_exclusions
from pipeline.manifest.incremental import ReusePlan, plan_reuse, shard_identities
from pipeline.pools import resolve_pool
from pipeline.proxy import check_store_fresh, proxy_store
from pipeline.storage import check_storage, check_writable
from ray_jobs._shared.pool_data import read_pool_raw
from ray_jobs._shared.querying._spec import CheckedInputs, PreparedQuery, QuerySpec, spec_uris

__all__ = ["check_before_ray", "check_selection_memory", "labeled_keys", "prepare", "reuse_plan"]


def check_before_ray(spec: QuerySpec) -> CheckedInputs:
    """Everything that can be checked without Ray, in the order a person would fix it: every
    object-store URI answers with these credentials (one request each), the checkpoint loads and
    its weights fit its model, the pool resolves, is not empty and has the checkpoint's classes,
    a proxy's feature store fits the checkpoint and the pool, the output is writable, the
    exclusions resolve. With a run id and no labeled pool, a conflicting committed run fails now.

    Raises:
        CheckpointError, PoolError, FeatureStoreError, ManifestError, ValueError, OSError: one line each.
    """
    for key, uri in spec_uris(spec):
        check_storage(uri, spec.storage_options, what=key)
    local_checkpoint = fetch_checkpoint(spec.checkpoint, spec.storage_options)
    checkpoint = load_checkpoint(local_checkpoint)
    store = proxy_store(checkpoint, spec.checkpoint, spec.features, spec.storage_options)
    pool = resolve_pool(spec.pool or store.pool_uri, spec.storage_options)
    classes = tuple(checkpoint.classes)
    if pool.classes is not None and tuple(pool.classes) != classes:
        raise CheckpointError(
            f"checkpoint classes {list(classes)} differ from the pool's {list(pool.classes)} "
            "(query with a checkpoint trained on this pool's classes)"
        )
    # Weights must fit the recorded model now, not in an actor.
    model = build_from_checkpoint(checkpoint, len(classes))[0]
    check_selection_memory(spec.selection(), model)
    identities = shard_identities(pool.fs, [s.path for s in pool.shards])
    if store is not None:
        check_store_fresh(store, {s.uri: identities[s.path] for s in pool.shards})
    check_writable(spec.out, spec.storage_options, what="out")
    if spec.exclude_labeled:
        resolve_pool(spec.exclude_labeled, spec.storage_options)  # resolvable and not empty; read after Ray starts
    exclusions = resolve_exclusions(spec.exclude_manifests, str(spec.run_id), spec.storage_options)
    for note in exclusions.notes:
        print(note)
    checked = CheckedInputs(
        pool, classes, checkpoint, store, identities, checkpoint_digest(local_checkpoint), exclusions
    )
    if spec.run_id and not spec.exclude_labeled:  # the fingerprint is known without Ray: a conflict fails now
        begin_run(spec.out, spec.run_id, prepare(spec, checked).inputs.fingerprint(), spec.storage_options)
    return checked


def check_selection_memory(selection: SelectionSpec, model: Any) -> None:
    """A diverse selection's candidate set must fit its budget: M x (C + D) floats on the driver,
    C and D read off the model's classifier head.

    Raises:
        CandidateMemoryError: Naming M, C, D, the bytes and the budget.
    """
    if selection.is_diverse:
        head = classifier_head(model)
        check_candidate_memory(selection.candidates, head.out_features, head.in_features, selection.candidate_memory_mb)


def prepare(spec: QuerySpec, checked: CheckedInputs | None = None) -> PreparedQuery:
    """Everything that can fail before scoring: :func:`check_before_ray`, then the labeled pool's
    keys (read with Ray Data) and the run's inputs."""
    checked = checked if checked is not None else check_before_ray(spec)
    excluded = checked.exclusions.keys | labeled_keys(spec)
    inputs = query_inputs(
        spec.selection(),
        # Scoring parameters: reuse of earlier scores depends on them (a run that skipped the
        # backward pass has no gradient norm to lend to one that reads it).
        {"norm": spec.norm, "gradnorm": spec.selection().needs_gradnorm},
        pool_uri=spec.pool or checked.store.pool_uri,
        shards=checked.pool.shards,
        identities=checked.identities,
        checkpoint_uri=spec.checkpoint,
        checkpoint_sha256=checked.checkpoint_sha256,
        exclusion_runs=checked.exclusions.runs,
        excluded=excluded,
        subset_size=spec.subset,
        subset_seed=spec.seed,
        store=checked.store,
    )
    return PreparedQuery(checked.pool, checked.classes, checked.checkpoint, checked.store, excluded, inputs)


def labeled_keys(spec: QuerySpec) -> frozenset[str]:
    """The keys of the labeled pool `exclude_labeled` (none without one), read with Ray Data."""
    if not spec.exclude_labeled:
        return frozenset()
    raw = read_pool_raw(spec.exclude_labeled, storage_options=spec.storage_options)
    if raw.dataset is None:
        return frozenset()
    return frozenset(
        key
        for batch in raw.dataset.select_columns(["__key__"]).iter_batches(batch_format="pyarrow")
        for key in batch.column("__key__").to_pylist()
    )


def reuse_plan(spec: QuerySpec, prepared: PreparedQuery) -> ReusePlan:
    """Which shards take their rows from the previous committed run under `out`."""
    if not spec.incremental:
        return ReusePlan(reason="incremental=false: every shard is scored")
    if prepared.store is not None:
        return ReusePlan(
            reason="proxy query: every row is scored from the feature store (the store itself is incremental)"
        )
    if spec.selection().is_diverse:
        return ReusePlan(
            reason=f"{spec.strategy} reads every row's embeddings, which scores/ does not keep: every shard is scored"
        )
    source = previous_run(spec.out, str(spec.run_id), spec.storage_options)
    return plan_reuse(source, prepared.inputs, prepared.excluded, spec.storage_options)

"""Proxy mode end to end on a local Ray: feature extraction into a store (incremental, error rows,
a new backbone), proxy training on the labeled features, proxy queries whose selection is the
exact top-k of the head's gradient norms, the refusals that come before any scoring, S3, and
LP-FT's probe reaching the training workers. Tests share one pool, its feature store (backbone a) and
an MLP proxy trained on it (module fixtures); a test that changes the pool or the store puts it back."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import s3fs
import torch
from _tar_shards import write_png_shard as write_shard

from pipeline import manifest
from pipeline.acquisition.coreset import penultimate_features
from pipeline.acquisition.selection import select_topk
from pipeline.checkpoint import (
    CheckpointError,
    ModelSpec,
    build_from_checkpoint,
    checkpoint_digest,
    load_checkpoint,
    save_untrained_checkpoint,
)
from pipeline.pools import (
    decode_sample,
    encode_image,
    iter_pool_samples,
    label_pool,
    resolve_pool,
    spec_for_model,
    synthetic,
)
from pipeline.proxy import alignment, lookup_features
from pipeline.proxy.store import FeatureStoreError, features_matrix, open_store
from pipeline.scoring import gradnorm_scores
from pipeline.training import TrainSchedule
from ray_jobs import align, cli, features, proxy, train
from ray_jobs._shared import querying

CLASSES = [str(c) for c in range(4)]
PER_SHARD = 40


def shard_samples(start: int, seed: int) -> tuple[list[tuple[str, bytes]], dict[str, int]]:
    source = list(synthetic(PER_SHARD, seed=seed, num_classes=4, image_size=28, channels=1))
    return (
        [(f"s{start + i:04d}", encode_image(s.image, "png")) for i, s in enumerate(source)],
        {f"s{start + i:04d}": s.label for i, s in enumerate(source)},
    )


@pytest.fixture(scope="module")
def env(ray_local, tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("proxy")
    (root / "pool").mkdir()
    truth, payloads = {}, {}
    for s in range(3):
        samples, labels = shard_samples(s * PER_SHARD, seed=s)
        if s == 1:
            samples[5] = ("corrupt-0001", b"this is not a png")
            labels.pop(f"s{s * PER_SHARD + 5:04d}")
        write_shard(root / "pool" / f"shard-{s:04d}.tar", samples)
        truth.update(labels)
        payloads.update(samples)
    labeled = {k: truth[k] for k in sorted(truth)[:48]}
    label_pool(str(root / "pool"), labeled, str(root / "labeled"), classes=CLASSES)
    spec = ModelSpec("small_cnn", num_classes=len(CLASSES))
    return {
        "root": root,
        "pool": str(root / "pool"),
        "store": str(root / "store"),
        "labeled": str(root / "labeled"),
        "labeled_keys": set(labeled),
        "payloads": payloads,
        "a": save_untrained_checkpoint(root / "ckpt-a", spec, CLASSES, 0),
        "b": save_untrained_checkpoint(root / "ckpt-b", spec, CLASSES, 1),
    }


def extract(env: dict[str, Any], checkpoint: str, **overrides: Any):
    values = dict(pool=env["pool"], out=env["store"], checkpoint=checkpoint, batch_size=32, cpus_per_actor=0.5)
    values.update(overrides)
    return features.run(features.FeaturesConfig(**values))


@pytest.fixture(scope="module")
def store(env) -> str:
    """The pool's feature store under backbone a (tests that change it extract with a again)."""
    extract(env, env["a"])
    return env["store"]


@pytest.fixture(scope="module")
def mlp_proxy(env, store) -> str:
    """An MLP proxy head trained on the labeled samples' features; its checkpoint directory."""
    config = proxy.ProxyConfig(
        labeled=env["labeled"], features=(store,), out=str(env["root"] / "proxy"), kind="mlp", hidden=16, epochs=5
    )
    return proxy.run(config).checkpoint


def generations(store) -> dict[str, str]:
    return {Path(s.uri).name: s.generation for s in store.shards}


def test_extraction_stores_every_sample_with_the_backbones_features(env, store) -> None:
    store = extract(env, env["a"])  # as the fixture left it: nothing to extract
    assert store.num_rows == 3 * PER_SHARD and sum(s.errors for s in store.shards) == 1
    assert store.backbone.dim == 64 and store.backbone.model == "small_cnn"
    errors = {
        k: e
        for t in store.iter_tables(("key", "error"))
        for k, e in zip(t.column("key").to_pylist(), t.column("error").to_pylist())
        if e
    }
    assert list(errors) == ["corrupt-0001"]
    # The stored rows are the backbone's penultimate features, computed here without Ray.
    keys = ["s0003", "s0047", "s0119"]
    model = build_from_checkpoint(load_checkpoint(env["a"]))[0]
    spec = spec_for_model("small_cnn", num_classes=4)
    images = torch.stack([torch.from_numpy(decode_sample({"png": env["payloads"][k]}, spec).image) for k in keys])
    np.testing.assert_allclose(store.lookup(keys), penultimate_features(model, images).numpy(), rtol=1e-5, atol=1e-6)


def test_unchanged_shards_are_not_extracted_again_and_a_rewritten_one_alone_is(env, store) -> None:
    before = open_store(store)
    again = extract(env, env["a"])
    assert generations(again) == generations(before)
    shard = Path(env["pool"]) / "shard-0002.tar"
    original = shard.read_bytes()
    write_shard(shard, shard_samples(200, seed=9)[0])
    try:
        after = extract(env, env["a"])
    finally:
        shard.write_bytes(original)
    changed = {name for name, g in generations(after).items() if g != generations(before)[name]}
    assert changed == {"shard-0002.tar"}
    keys = {k for t in after.iter_tables(("key",)) for k in t.column("key").to_pylist()}
    assert "s0200" in keys and "s0085" not in keys  # the old rows of shard 2 are gone from view
    assert after.num_rows == 3 * PER_SHARD
    assert len(extract(env, env["a"]).lookup(["s0085"])) == 1  # the pool and store as the other tests know them


def test_a_new_backbone_reextracts_everything_and_drops_old_generations(env, store) -> None:
    store = extract(env, env["b"])
    assert len(set(generations(store).values())) == 1
    assert len(list((Path(env["store"]) / "generations").iterdir())) == 1
    extract(env, env["a"])  # back to backbone a for the proxy tests


def brute_force(store_uri: str, checkpoint: str, excluded: set[str], k: int) -> list[str]:
    """The top-k of the proxy's gradient norms over every stored row, computed without Ray."""
    store = open_store(store_uri)
    head, _, _ = build_from_checkpoint(load_checkpoint(checkpoint))
    keys, rows = [], []
    for table in store.iter_tables(("key", "features", "error")):
        for key, error, row in zip(
            table.column("key").to_pylist(), table.column("error").to_pylist(), features_matrix(table)
        ):
            if error is None and key not in excluded:
                keys.append(key)
                rows.append(row)
    scores = gradnorm_scores(head, torch.from_numpy(np.stack(rows)))
    return select_topk(keys, scores.numpy(), k)


def test_proxy_query_selects_the_exact_topk_and_records_its_store(env, mlp_proxy, capsys) -> None:
    written = querying.query(
        querying.QuerySpec(
            checkpoint=mlp_proxy,
            strategy="lplgrad",
            features=env["store"],
            k=10,
            exclude_labeled=env["labeled"],
            out=str(env["root"] / "queries"),
            run_id="p1",
            batch_size=32,
            cpus_per_actor=0.5,
        )
    )
    selection = manifest.load(str(env["root"] / "queries" / "p1")).column("key").to_pylist()
    assert selection == brute_force(env["store"], mlp_proxy, env["labeled_keys"], 10)
    assert not set(selection) & env["labeled_keys"]
    assert written.inputs["features"]["store"] == env["store"]
    assert written.inputs["features"]["backbone_sha256"] == open_store(env["store"]).backbone.sha256
    assert written.extra["mode"] == "proxy" and written.extra["proxy"]["kind"] == "mlp"
    assert [e["key"] for e in manifest.load_errors(str(env["root"] / "queries" / "p1")).to_pylist()] == ["corrupt-0001"]
    capsys.readouterr()
    assert cli.main(["manifest", "verify", str(env["root"] / "queries" / "p1")]) == 0
    assert cli.main(["manifest", "show", str(env["root"] / "queries" / "p1")]) == 0
    assert f"proxy       features {env['store']}" in capsys.readouterr().out


def test_refusals_before_any_scoring(env, mlp_proxy) -> None:
    trained = mlp_proxy
    base = dict(checkpoint=trained, features=env["store"], k=5, out=str(env["root"] / "refused"), run_id="r")
    with pytest.raises(CheckpointError, match="is a proxy checkpoint: pass features="):
        querying.prepare(querying.QuerySpec(**{**base, "features": None, "pool": env["pool"]}))
    with pytest.raises(CheckpointError, match="features= is for proxy checkpoints"):
        querying.prepare(querying.QuerySpec(**{**base, "checkpoint": env["a"]}))
    other = str(env["root"] / "store-b")
    extract(env, env["b"], out=other)
    with pytest.raises(CheckpointError, match="trained on features of backbone"):
        querying.prepare(querying.QuerySpec(**{**base, "features": other}))
    with pytest.raises(ValueError, match="is a proxy checkpoint; features come from a backbone"):
        extract(env, trained, out=str(env["root"] / "never"))
    samples, _ = shard_samples(300, seed=11)
    write_shard(Path(env["pool"]) / "shard-0003.tar", samples)
    try:
        with pytest.raises(FeatureStoreError, match="is stale: 1 shards new or changed"):
            querying.prepare(querying.QuerySpec(**base))
    finally:
        (Path(env["pool"]) / "shard-0003.tar").unlink()
    with pytest.raises(FeatureStoreError, match="have no features"):
        lookup_features([open_store(env["store"])], ["s0001", "not-a-key"])


def test_features_and_proxy_query_on_s3(env, store, s3_server) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    root = s3_server.uri()  # unique per call: every URI below lives under it
    fs.put(env["pool"] + "/", root[len("s3://") :] + "/pool/", recursive=True)
    options = s3_server.storage_options
    remote = features.run(
        features.FeaturesConfig(
            pool=f"{root}/pool",
            out=f"{root}/store",
            checkpoint=env["a"],
            batch_size=32,
            cpus_per_actor=0.5,
            storage_options=options,
        )
    )
    assert remote.num_rows == 3 * PER_SHARD
    assert fs.exists(f"{root[len('s3://') :]}/store/store.json")
    keys = ["s0001", "s0046"]
    np.testing.assert_allclose(remote.lookup(keys), open_store(store).lookup(keys), rtol=1e-5, atol=1e-6)
    trained = proxy.run(
        proxy.ProxyConfig(
            labeled=env["labeled"],
            features=(f"{root}/store",),
            out=f"{root}/proxy",
            kind="linear",
            epochs=3,
            storage_options=options,
        )
    )
    written = querying.query(
        querying.QuerySpec(
            checkpoint=trained.checkpoint,
            strategy="lplgrad",
            features=f"{root}/store",
            k=7,
            out=f"{root}/queries",
            run_id="s3",
            batch_size=32,
            cpus_per_actor=0.5,
            storage_options=options,
        )
    )
    assert written.counts.selected == 7
    assert len(manifest.load(f"{root}/queries/s3", options)) == 7


def test_lp_ft_starts_training_from_the_linear_probe(env, store, mlp_proxy, monkeypatch) -> None:
    probe = proxy.run(
        proxy.ProxyConfig(
            labeled=env["labeled"], features=(store,), out=str(env["root"] / "probe"), kind="linear", epochs=5
        )
    ).checkpoint
    weight, bias = build_from_checkpoint(load_checkpoint(probe))[0].raw_linear()
    monkeypatch.chdir(env["root"])  # a relative probe path must reach workers that run in Ray's own directory
    config = train.TrainConfig(
        labeled=env["labeled"],
        model="small_cnn",
        epochs=1,
        batch_size=16,
        num_workers=1,
        cpus_per_worker=0.5,
        storage_path=str(env["root"] / "lpft"),
        name="lpft",
        warm_start=env["a"],
        init_head="probe",
        schedule=TrainSchedule(epochs=1, epoch_loss=1, lr=1e-12, milestones=(1,)),
    )
    tuned = build_from_checkpoint(load_checkpoint(train.run(config).checkpoint))[0]
    torch.testing.assert_close(tuned.fc.weight, weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tuned.fc.bias, bias, rtol=1e-5, atol=1e-6)
    with pytest.raises(CheckpointError, match="must be a linear proxy checkpoint"):
        train.run(
            train.TrainConfig(
                labeled=env["labeled"],
                model="small_cnn",
                epochs=1,
                batch_size=16,
                num_workers=1,
                storage_path=str(env["root"] / "lpft"),
                name="bad",
                init_head=mlp_proxy,
            )
        )


def test_align_fine_tunes_and_promotes_only_when_the_policy_says_so(env) -> None:
    root = env["root"] / "align"
    store = str(root / "store")
    extract(env, env["a"], out=store)
    keys = sorted(s.key for s in iter_pool_samples(resolve_pool(env["pool"])) if not s.key.startswith("corrupt"))
    for size in (40, 96):
        label_pool(
            env["pool"],
            {k: i % len(CLASSES) for i, k in enumerate(keys[:size])},
            str(root / f"labeled-{size}"),
            classes=CLASSES,
        )
    common = dict(
        state=str(root / "state.json"),
        growth=2.0,
        epochs=1,
        batch_size=16,
        num_workers=1,
        cpus_per_worker=0.5,
        probe_epochs=2,
        storage_path=str(root / "runs"),
        promote=str(root / "backbone"),
    )

    def run_align(size: int, **overrides: Any) -> dict[str, Any]:
        return align.run(align.AlignConfig(labeled=str(root / f"labeled-{size}"), **{**common, **overrides}))

    with pytest.raises(ValueError, match="name the backbone the feature store was extracted with"):
        run_align(40, promote=None)
    first = run_align(40, backbone=env["a"])
    assert not first["aligned"] and first["backbone"] == env["a"] and first["aligned_at"] == 40
    assert not (root / "runs").exists() and not (root / "backbone").exists()  # nothing trained, nothing promoted
    assert (
        cli.main(["align", f"labeled={root / 'labeled-40'}", f"state={root / 'state.json'}"]) == 0
    )  # a retry: not a new round
    assert json.loads((root / "state.json").read_text())["rounds"] == []
    with pytest.raises(
        ValueError, match="set features="
    ):  # due (96 >= 2 * 40) and LP-FT: a probe needs the cached features
        run_align(96)
    aligned = run_align(96, features=[store])
    assert aligned["aligned"] and aligned["finetune"] == "lp-ft" and aligned["aligned_at"] == 96
    tuned = Path(aligned["backbone"])
    assert tuned.is_relative_to(root / "runs") and (root / "runs" / "align-96-probe").exists()
    assert (root / "backbone" / "state.pt").read_bytes() == (tuned / "state.pt").read_bytes()
    assert aligned["backbone_sha256"] == checkpoint_digest(root / "backbone") != open_store(store).backbone.sha256
    state = json.loads((root / "state.json").read_text())
    assert state["backbone"] == aligned["backbone"] and state["history"][0]["from"] == env["a"]
    assert not run_align(96)["aligned"]  # the same round again does not fine-tune twice
    with pytest.raises(
        FeatureStoreError, match="run lplgrad features with it first"
    ):  # the store still holds backbone a
        run_align(96, features=[store], force=True)
    with pytest.raises(ValueError, match="already names backbone"):
        run_align(96, backbone=env["b"])


def test_align_keeps_its_state_and_promotes_on_s3(env, s3_server) -> None:
    fs = s3fs.S3FileSystem(**s3_server.storage_options)
    root, options = s3_server.uri(), s3_server.storage_options
    config = dict(labeled=env["labeled"], state=f"{root}/align/state.json", growth=2.0, storage_options=options)
    first = align.run(align.AlignConfig(backbone=env["a"], **config))
    assert not first["aligned"] and first["aligned_at"] == len(env["labeled_keys"])
    assert alignment.read_state(f"{root}/align/state.json", options).backbone == env["a"]
    assert not align.run(align.AlignConfig(**config))["aligned"]  # read back from S3: no backbone= needed
    alignment.promote_checkpoint(Path(env["a"]), f"{root}/backbone", options)
    assert fs.cat(f"{root[len('s3://') :]}/backbone/state.pt") == (Path(env["a"]) / "state.pt").read_bytes()
    fs.pipe(f"{root[len('s3://') :]}/align/state.json", b"{not json")
    with pytest.raises(ValueError, match=r"state.json is not an alignment state written by lplgrad align"):
        align.run(align.AlignConfig(**config))

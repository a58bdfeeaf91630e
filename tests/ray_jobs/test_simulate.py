"""Simulations through the real Ray jobs (engine=ray): a two-cycle run and the proxy modes."""

from __future__ import annotations

import pytest

from pipeline import manifest
from pipeline.config import ConfigError
from pipeline.learning_curves import read_results
from pipeline.pools import build_pool, read_labels, synthetic
from pipeline.simulation import initial_keys
from ray_jobs import simulate


def test_two_cycle_simulation_writes_results_plot_and_table(ray_local, tmp_path) -> None:
    build_pool(synthetic(96, seed=5, num_classes=3, image_size=28, channels=1), str(tmp_path / "pool"))
    build_pool(synthetic(48, seed=6, num_classes=3, image_size=28, channels=1, split="test"), str(tmp_path / "test"))
    config = simulate.SimulateConfig(
        pool=str(tmp_path / "pool"),
        test_pool=str(tmp_path / "test"),
        strategies=("lplgrad+power", "coreset", "badge"),
        seeds=(0,),
        initial=16,
        per_cycle=12,
        cycles=2,
        epochs=1,
        batch_size=16,
        num_workers=1,
        cpus_per_worker=0.5,
        cpus_per_actor=0.5,
        out=str(tmp_path / "sim"),
        engine="ray",
    )
    simulate.run(config)
    rows = read_results(tmp_path / "sim" / "results.parquet")
    assert [(r["strategy"], r["cycle"], r["labeled"]) for r in rows] == [
        ("lplgrad+power", 0, 16),
        ("lplgrad+power", 1, 28),
        ("coreset", 0, 16),
        ("coreset", 1, 28),
        ("badge", 0, 16),
        ("badge", 1, 28),
    ]
    assert all(0.0 <= r["test_accuracy"] <= 1.0 for r in rows)
    assert (tmp_path / "sim" / "results.csv").exists()
    assert (tmp_path / "sim" / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "| lplgrad+power |" in (tmp_path / "sim" / "results.md").read_text()
    # The stochastic chain went through the query job as a power draw.
    inputs = manifest.read_manifest(str(tmp_path / "sim" / "work" / "lplgrad+power-s0" / "queries" / "c0")).inputs
    assert inputs["strategy"]["name"] == "lplgrad" and inputs["strategy"]["params"]["stochastic"] == "power"
    # BADGE went through the query job too: its candidate set, within the simulation's budget.
    badge = manifest.read_manifest(str(tmp_path / "sim" / "work" / "badge-s0" / "queries" / "c0"))
    assert badge.inputs["strategy"]["name"] == "badge" and badge.counts.selected == 12
    assert badge.inputs["strategy"]["params"]["candidate_memory_mb"] == config.candidate_memory_mb
    # Both strategies started from the same seeded initial set: the same keys, not just as many.
    work = tmp_path / "sim" / "work"
    keys = {name: set(read_labels(str(work / f"{name}-s0" / "labeled-c0"))[0]) for name in ("lplgrad+power", "coreset")}
    assert len(keys["coreset"]) == 16 and keys["lplgrad+power"] == keys["coreset"]
    assert keys["coreset"] < set(read_labels(str(work / "coreset-s0" / "labeled-c1"))[0])
    with pytest.raises(ValueError, match="results.parquet exists"):
        simulate.run(config)


def test_initial_set_is_seeded_and_strategies_are_checked() -> None:
    keys = [f"k{i:03d}" for i in range(100)]
    assert initial_keys(keys, 10, 0) == initial_keys(list(reversed(keys)), 10, 0)
    assert initial_keys(keys, 10, 0) != initial_keys(keys, 10, 1)
    with pytest.raises(ConfigError, match="unknown strategies"):
        simulate.JOB.parse_args(["pool=x", "strategies=[bogus]"])


def test_proxy_aligned_simulation_refreshes_features_from_the_fine_tuned_backbone(ray_local, tmp_path) -> None:
    build_pool(synthetic(80, seed=5, num_classes=3, image_size=28, channels=1), str(tmp_path / "pool"))
    build_pool(synthetic(30, seed=6, num_classes=3, image_size=28, channels=1, split="test"), str(tmp_path / "test"))
    config = simulate.JOB.parse_args(
        [
            "--proxy",
            f"pool={tmp_path / 'pool'}",
            f"test_pool={tmp_path / 'test'}",
            "strategies=[lplgrad]",
            "modes=[proxy-aligned]",
            "seeds=[0]",
            "initial=16",
            "per_cycle=8",
            "cycles=3",
            "epochs=1",
            "batch_size=16",
            "cpus_per_worker=0.5",
            "cpus_per_actor=0.5",
            "proxy_epochs=3",
            "align_every=1",
            "align_growth=null",
            f"out={tmp_path / 'sim'}",
        ]
    )
    assert config.modes == ("proxy-aligned",)  # an explicit modes= wins over --proxy's three
    simulate.run(config)
    rows = read_results(tmp_path / "sim" / "results.parquet")
    assert [(r["mode"], r["cycle"], r["labeled"], r["aligned"]) for r in rows] == [
        ("proxy-aligned", 0, 16, None),
        ("proxy-aligned", 1, 24, "lp-ft"),
        ("proxy-aligned", 2, 32, None),
    ]
    assert all(0.0 <= r["proxy_accuracy"] <= 1.0 for r in rows)
    # Cycle 1's query read the store of the fine-tuned backbone, not the first cycle's.
    stores = [
        manifest.read_manifest(
            str(tmp_path / "sim" / "work" / "lplgrad-proxy-aligned-s0" / "queries" / f"c{c}")
        ).inputs["features"]
        for c in (0, 1)
    ]
    assert stores[0]["backbone_sha256"] != stores[1]["backbone_sha256"]
    assert "| lplgrad [proxy-aligned] |" in (tmp_path / "sim" / "results.md").read_text()
    assert "selection total s" in (tmp_path / "sim" / "results.md").read_text()
    with pytest.raises(ValueError, match="proxy modes report the proxy's accuracy on test_pool"):
        simulate.SimulateConfig(pool="x", modes=("proxy",), engine="ray", strategies=("lplgrad",))

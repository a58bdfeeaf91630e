"""Quickstart: one whole active-learning cycle on a synthetic pool, on this machine, offline.

    lplgrad quickstart                      # local Ray, everything under ./runs/quickstart/<time>
    lplgrad quickstart samples=5000 epochs=20

Builds an unlabeled synthetic pool (its ground truth kept aside as the "annotators' answers"),
labels a random initial set, trains (`fit`, the call `lplgrad train` makes), queries the pool
(`query`, as `lplgrad query`: `margin` as the README recommends, `strategy=lplgrad` for LPLgrad),
commits a selection manifest, labels the selection from the ground truth, trains again, and prints
the accuracy of each cycle and where every artifact is.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from pipeline.config import config_to_yaml
from pipeline.manifest import load as load_selection
from pipeline.pools import build_pool, label_pool, synthetic
from pipeline.report import write_run_report
from pipeline.simulation import initial_keys
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.querying import QuerySpec, query
from ray_jobs._shared.training import TrainConfig, fit


@dataclass(frozen=True)
class QuickstartConfig:
    samples: int = 3000
    test_samples: int = 1000
    num_classes: int = 10
    initial: int = 200
    per_cycle: int = 200
    strategy: str = "margin"  # the query's strategy: the README's recommendation; lplgrad is one key away
    epochs: int = 15
    batch_size: int = 64
    seed: int = 0
    out: str = "runs/quickstart"
    address: str | None = None

    def __post_init__(self) -> None:
        for name in ("samples", "test_samples", "initial", "per_cycle", "epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.initial + self.per_cycle > self.samples:
            raise ValueError(f"initial + per_cycle ({self.initial + self.per_cycle}) exceeds samples ({self.samples})")


def write_labels(path: Path, labels: dict[str, int]) -> Path:
    """A labels table as annotators hand it back: CSV with key,label."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "label"])
        writer.writerows(sorted(labels.items()))
    return path


def train_cycle(config: QuickstartConfig, root: Path, labeled: str, cycle: int) -> tuple[str, float]:
    """Train on a cycle's labeled pool: (final checkpoint, accuracy on the test pool)."""
    trained = fit(
        TrainConfig(
            labeled=labeled,
            holdout=str(root / "pools" / "test"),
            model="small_cnn",
            epochs=config.epochs,
            batch_size=config.batch_size,
            num_workers=1,
            cpus_per_worker=1.0,
            storage_path=str(root / "train"),
            name=f"cycle-{cycle}",
            checkpoint_every=config.epochs,
            eval_every=config.epochs,
            seed=config.seed,
        )
    )
    return trained.checkpoint, trained.final.holdout_accuracy


def run(config: QuickstartConfig) -> dict[str, object]:
    root = Path(config.out) / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(config_to_yaml(config))
    pool, test = str(root / "pools" / "unlabeled"), str(root / "pools" / "test")

    # 1. The pool to label, and the answers annotators would give (kept out of the pool).
    source = synthetic(config.samples, seed=config.seed, num_classes=config.num_classes, image_size=28, channels=1)
    build_pool(source, pool, unlabeled=True)
    truth = {sample.key: sample.label for sample in source}
    write_labels(root / "ground_truth.csv", truth)
    build_pool(
        synthetic(
            config.test_samples,
            seed=config.seed,
            num_classes=config.num_classes,
            image_size=28,
            channels=1,
            split="test",
        ),
        test,
    )

    # 2. Cycle 0: a random initial labeled set, then train.
    first = initial_keys(sorted(truth), config.initial, config.seed)
    labels0 = write_labels(root / "labels-cycle-0.csv", {k: truth[k] for k in first})
    label_pool(pool, str(labels0), str(root / "labeled-cycle-0"))
    checkpoint0, accuracy0 = train_cycle(config, root, str(root / "labeled-cycle-0"), 0)

    # 3. Query the rest of the pool (margin unless strategy= says otherwise) and commit a manifest.
    query(
        QuerySpec(
            pool=pool,
            checkpoint=checkpoint0,
            strategy=config.strategy,
            k=config.per_cycle,
            exclude_labeled=str(root / "labeled-cycle-0"),
            out=str(root / "queries"),
            run_id="cycle-1",
            actors=1,
            cpus_per_actor=1.0,
            seed=config.seed,
        )
    )
    selected = load_selection(str(root / "queries" / "cycle-1")).column("key").to_pylist()
    write_run_report(str(root / "queries" / "cycle-1"), str(root / "report.html"))  # the selection, as pictures

    # 4. "Annotate" the selection from the ground truth, add it to the labeled set, train again.
    labels1 = write_labels(root / "labels-cycle-1.csv", {k: truth[k] for k in selected})
    label_pool(pool, str(labels1), str(root / "labeled-cycle-1"), append_to=str(root / "labeled-cycle-0"))
    checkpoint1, accuracy1 = train_cycle(config, root, str(root / "labeled-cycle-1"), 1)

    summary = {
        "root": str(root),
        "accuracy": [accuracy0, accuracy1],
        "labeled": [len(first), len(first) + len(selected)],
        "checkpoints": [checkpoint0, checkpoint1],
        "manifest": str(root / "queries" / "cycle-1" / "manifest.json"),
        "report": str(root / "report.html"),
    }
    print(f"\ncycle 0: {len(first)} labeled, test accuracy {accuracy0:.3f}")
    print(f"cycle 1: {len(first) + len(selected)} labeled, test accuracy {accuracy1:.3f}")
    print(f"""
artifacts under {root}:
  pools/unlabeled, pools/test     the synthetic pool to label and the held-out test pool
  ground_truth.csv                the annotators' answers (the simulation's oracle)
  labeled-cycle-0, labeled-cycle-1  labeled pools built with `lplgrad pool label`
  train/cycle-0, train/cycle-1    Ray Train runs; checkpoints {checkpoint0} and {checkpoint1}
  queries/cycle-1                 the selection: manifest.json names its files, which are under
                                  attempts/<id>/ (selection.parquet, scores/, errors.parquet); read them
                                  through it (`lplgrad manifest show|export RUN`, pipeline.manifest.load)
  labels-cycle-*.csv              the labels tables fed to `lplgrad pool label`
  report.html                     the selection as a page: images in rank order, scores against the pool, class mix
                                  (`lplgrad manifest report RUN --out FILE` writes one for any run)
next: open {root / "report.html"} in a browser, or `lplgrad manifest show {root / "queries" / "cycle-1"}`""")
    return summary


def start(config: QuickstartConfig) -> None:
    """`lplgrad quickstart`: join (or start) Ray, then the whole cycle."""
    print(connect(config.address))
    run(config)


# The config is not echoed: quickstart's output is the walkthrough itself.
JOB = Job("quickstart", QuickstartConfig, start, run, __doc__.splitlines()[0], echo_config=False)

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))

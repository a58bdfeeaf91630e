"""Scoring demo: stream a synthetic pool through LPLgrad scoring actors and select the top-k.

Shows the querying stage end to end on the embedded default (local Ray, files under ./runs):
Ray Data makes image batches in CPU tasks, an actor pool scores them (one model per actor, every
strategy's statistic from one forward and one backward), the scores are written as parquet and
the driver keeps the exact top-k in O(k) memory. The model is freshly initialised: the demo
exercises the machinery, the query job (issue 5) scores trained checkpoints and real pools.

    lplgrad demo                                      # local Ray, ./runs/score_demo/<run_id>
    lplgrad demo samples=20000 actors=4 batch_size=256
    python -m ray_jobs.score_demo --config configs/score_demo/default.yaml k=50
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.score_demo --config configs/score_demo/default.yaml gpus_per_actor=1
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import ray
import torch

from pipeline.config import config_to_yaml
from pipeline.models import available_models, create_model, input_spec
from pipeline.scoring import NORMS, RowScorer
from pipeline.acquisition.selection import TopK
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.entry import Job, run_job


@dataclass(frozen=True)
class ScoreDemoConfig:
    model: str = "cifar_resnet18"
    num_classes: int = 10
    samples: int = 2048
    batch_size: int = 128
    k: int = 20
    actors: int = 2
    cpus_per_actor: float = 0.5
    gpus_per_actor: float = 0.0
    norm: str = "per_tensor_sum"
    seed: int = 0
    out: str = "runs/score_demo"
    run_id: str | None = None
    address: str | None = None

    def __post_init__(self) -> None:
        if self.model not in available_models():
            raise ValueError(f"model {self.model!r} is unknown; choose one of {', '.join(available_models())}")
        if self.norm not in NORMS:
            raise ValueError(f"norm {self.norm!r} is unknown; choose one of {', '.join(NORMS)}")
        for name in ("num_classes", "samples", "batch_size", "k", "actors"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.cpus_per_actor < 0 or self.gpus_per_actor < 0:
            raise ValueError("cpus_per_actor and gpus_per_actor cannot be negative")


def build_model(name: str, num_classes: int, seed: int):
    torch.manual_seed(seed)  # every actor builds the same weights
    return create_model(name, num_classes=num_classes), None, None


def make_images(batch: dict[str, np.ndarray], shape: tuple[int, int, int], seed: int) -> dict[str, np.ndarray]:
    """ids -> deterministic images: each sample depends on its id only, not on batching."""
    ids = batch["id"]
    images = np.stack([np.random.default_rng((seed, int(i))).standard_normal(shape, dtype=np.float32) for i in ids])
    return {"key": np.array([f"demo-{int(i):08d}" for i in ids]), "image": images}


def run(config: ScoreDemoConfig) -> dict:
    run_id = config.run_id or datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_dir = Path(config.out) / run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_to_yaml(dataclasses.replace(config, run_id=run_id)))
    shape = input_spec(config.model)

    images = ray.data.range(config.samples).map_batches(
        make_images, fn_kwargs={"shape": shape, "seed": config.seed}, batch_size=config.batch_size, num_cpus=0.25
    )
    scored = images.map_batches(
        RowScorer,
        fn_constructor_args=(functools.partial(build_model, config.model, config.num_classes, config.seed),),
        fn_constructor_kwargs={"norm": config.norm},
        compute=ray.data.ActorPoolStrategy(size=config.actors),
        batch_size=config.batch_size,
        num_cpus=config.cpus_per_actor,
        num_gpus=config.gpus_per_actor,
    )
    top = TopK(config.k)
    scores_dir = run_dir / "scores"
    scores_dir.mkdir(exist_ok=True)
    errors = 0
    start = time.perf_counter()
    import pyarrow as pa
    import pyarrow.parquet as pq

    # One pass: stream batches to the driver, keep the top-k, and write the scores table.
    for part, batch in enumerate(scored.iter_batches(batch_size=config.batch_size * 8, batch_format="pyarrow")):
        pq.write_table(batch, scores_dir / f"part-{part:05d}.parquet")
        columns = batch.to_pydict()
        errors += sum(e is not None for e in columns["error"])
        top.add(columns["key"], np.asarray(columns["score"], dtype=np.float64))
    elapsed = time.perf_counter() - start
    selection = [{"rank": r + 1, "key": key, "score": score} for r, (key, score, _) in enumerate(top.result())]
    pq.write_table(pa.Table.from_pylist(selection), run_dir / "selection.parquet")
    summary = {
        "run_id": run_id,
        "samples": top.seen,
        "errors": errors,
        "selected": len(selection),
        "samples_per_s": top.seen / elapsed,
        "run_dir": str(run_dir),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def start(config: ScoreDemoConfig) -> None:
    """`lplgrad demo`: score a synthetic pool on Ray, print what was selected."""
    print(connect(config.address))
    summary = run(config)
    print(
        f"scored {summary['samples']} samples at {summary['samples_per_s']:.1f} samples/s, "
        f"selected {summary['selected']}, errors {summary['errors']}, outputs in {summary['run_dir']}"
    )


JOB = Job("demo", ScoreDemoConfig, start, run, "LPLgrad scoring demo on a synthetic pool.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))

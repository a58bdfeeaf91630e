"""Alignment for proxy mode: once the policy says the cached features have drifted from what the
labels would train, fine-tune the backbone on the labeled set (LP-FT or FT) and promote it, so
that the next `lplgrad features` refreshes the store from it (docs/proxy.md, "Alignment").

    lplgrad align labeled=runs/pools/labeled state=runs/align/state.json features=[runs/features/pool] \
        backbone=runs/train/RUN/checkpoint_... promote=runs/checkpoints/backbone growth=2.0
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.align --config configs/align/labeling_round.yaml

Run once per labeling round, after `lplgrad pool label`. The state file remembers the current
backbone and the labeled-set sizes seen since it was aligned; a round that is not due only
records itself and starts no Ray. A due round trains a linear probe on the labeled samples'
cached features and fine-tunes the backbone from it on Ray Train (LP-FT, while labels are few),
or fine-tunes it as it is (FT); the new checkpoint is copied to `promote` (the fixed URI the
features config names), and the state is written last, so a failed round is simply due again.
A round is claimed before it promotes anything (an exclusive create keyed by the state it started
from, `{state}.rounds/`), so of two concurrent rounds only one promotes and writes the state; a
round killed after its claim is finished (promotion, state) by the next run.
`force=true` aligns now whatever the policy says.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoint import checkpoint_digest, fetch_checkpoint, load_checkpoint
from pipeline.pools import resolve_pool
from pipeline.proxy.alignment import (
    FINETUNE_MODES,
    AlignmentPolicy,
    AlignmentState,
    commit_round,
    finish_round,
    load_state,
)
from pipeline.proxy.store import FeatureStoreError, open_store
from pipeline.storage import check_writable
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.cluster_guard import guard_driver
from ray_jobs._shared.entry import Job, run_job
from ray_jobs._shared.training import finetune_backbone, one_checkpoint_run


@dataclass(frozen=True)
class AlignConfig:
    labeled: str = ""  # the labeled pool after this round's labels
    state: str = ""  # the alignment state (JSON), e.g. s3://bucket/align/state.json
    features: tuple[str, ...] = ()  # stores holding the labeled keys under the current backbone (LP-FT's probe)
    backbone: str | None = None  # first round only: the backbone the store was first extracted with
    promote: str | None = None  # copy every aligned backbone here: the checkpoint the features config names
    every: int | None = None  # align every N rounds ...
    growth: float | None = 2.0  # ... or once the labeled set has grown this many times
    finetune: str = "auto"  # lp-ft | ft | auto (LP-FT below lp_ft_below labels)
    lp_ft_below: int = 1000
    force: bool = False
    probe_epochs: int = 100
    epochs: int = 20
    batch_size: int = 128
    augment: str = "none"  # training augmentation preset of the fine-tune (as lplgrad train)
    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    holdout: str | None = None
    storage_path: str = "runs/align"  # fine-tuning runs and probes
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    address: str | None = None

    def __post_init__(self) -> None:
        if not self.labeled or not self.state:
            raise ValueError("labeled and state are required (labeled=POOL state=URI_OF_STATE_JSON)")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune {self.finetune!r} is unknown; choose one of {', '.join(FINETUNE_MODES)}")
        if self.epochs <= 0 or self.probe_epochs <= 0:
            raise ValueError("epochs and probe_epochs must be positive")
        self.policy()  # validates every and growth

    def policy(self) -> AlignmentPolicy:
        return AlignmentPolicy(self.every, self.growth, self.finetune, self.lp_ft_below)  # type: ignore[arg-type]

    def uris(self, backbone: str) -> list[tuple[str, str]]:
        """(config key, URI) of every location a due round reads or writes, `backbone` the one it
        fine-tunes (the driver's guard checks them)."""
        named = [("labeled", self.labeled), ("holdout", self.holdout), ("storage_path", self.storage_path)]
        named += [("backbone", backbone), *(("features", store) for store in self.features)]
        return [(key, uri) for key, uri in named if uri]


# -- state (committed round by round: pipeline.proxy.alignment) ------------------------------


def current_state(config: AlignConfig, labeled: int) -> tuple[AlignmentState, bytes | None]:
    """The stored state (or on the first round a new one at `backbone` or `promote`), and the
    stored bytes the next round is claimed against."""
    stored = load_state(config.state, config.storage_options)
    if stored.state is not None and stored.rolled:
        finish_round(config.state, stored.state, config.storage_options, config.promote)
    return _first_or(config, stored.state, labeled), stored.base


def _first_or(config: AlignConfig, state: AlignmentState | None, labeled: int) -> AlignmentState:
    if state is not None:
        if config.backbone and config.backbone != state.backbone:
            raise ValueError(
                f"{config.state} already names backbone {state.backbone}; backbone= only starts a new state "
                "(drop it, or point state= at a new file)"
            )
        return state
    first = config.backbone or config.promote
    if not first:
        raise ValueError(
            f"no alignment state at {config.state} yet: name the backbone the feature store was "
            "extracted with (backbone=CHECKPOINT_URI)"
        )
    return AlignmentState(first, checkpoint_digest(fetch_checkpoint(first, config.storage_options)), labeled)


# -- fine-tuning -----------------------------------------------------------------------------


def check_probe_stores(stores: Sequence[str], backbone_sha256: str, storage_options: Mapping[str, Any]) -> None:
    """LP-FT probes the current backbone's features: refuse stores of another backbone before training."""
    if not stores:
        raise ValueError(
            "LP-FT trains a linear probe on the labeled samples' cached features: set features=[STORE,...]"
        )
    for uri in stores:
        store = open_store(uri, storage_options)
        if store.backbone.sha256 != backbone_sha256:
            raise FeatureStoreError(
                f"{uri} holds features of backbone {store.backbone.sha256[:12]}, but the current backbone "
                f"is {backbone_sha256[:12]}: run lplgrad features with it first"
            )


def align(config: AlignConfig, state: AlignmentState, labeled: int, mode: str) -> tuple[AlignmentState, Path]:
    """Fine-tune; return the state to commit and the fetched new checkpoint (promoted at the commit)."""
    backbone = load_checkpoint(fetch_checkpoint(state.backbone, config.storage_options))
    name = f"align-{labeled}"
    train_config = one_checkpoint_run(
        config,
        config.labeled,
        config.storage_path,
        name,
        holdout=config.holdout,
        model=backbone.model_name,
        in_channels=backbone.in_channels,
        use_gpu=config.use_gpu,
        seed=config.seed,
        warm_start=state.backbone,
    )
    probe_out = f"{config.storage_path.rstrip('/')}/{name}-probe"
    checkpoint = finetune_backbone(train_config, mode, config.features, probe_out, config.probe_epochs).checkpoint
    local = fetch_checkpoint(checkpoint, config.storage_options)  # one download serves the copy and the hash
    return state.observe(labeled).aligned(checkpoint, checkpoint_digest(local), labeled, mode), local


# -- run -------------------------------------------------------------------------------------


def plan(config: AlignConfig) -> tuple[AlignmentState, int, str | None, bytes | None]:
    """(state, labeled-set size, fine-tuning mode or None when not due, the stored state the round
    is claimed against); no Ray, no training."""
    if "/" in config.state.rstrip("/"):
        check_writable(config.state.rsplit("/", 1)[0], config.storage_options, what="alignment state's folder")
    labeled = resolve_pool(config.labeled, config.storage_options).num_samples
    state, base = current_state(config, labeled)
    if not (config.force or state.is_due(config.policy(), labeled)):
        return state, labeled, None, base
    mode = config.policy().finetune_mode(labeled)
    if config.promote:
        check_writable(config.promote, config.storage_options, what="promote")
    if mode == "lp-ft":
        check_probe_stores(config.features, state.backbone_sha256, config.storage_options)
    return state, labeled, mode, base


def run(config: AlignConfig) -> dict[str, Any]:
    """Align if due and commit the state; returns {"aligned", "finetune", "backbone", "labeled", "state"}."""
    state, labeled, mode, base = plan(config)
    aligned = None
    if mode is not None:
        print(connect(config.address))
        guard_driver(config.uris(state.backbone), config.storage_options)
        print(f"aligning at {labeled} labels ({mode}) from {state.backbone}")
        state, aligned = align(config, state, labeled, mode)
    else:
        state = state.observe(labeled)
    commit_round(config.state, base, state, config.storage_options, aligned=aligned, promote_to=config.promote)
    result = {
        "aligned": mode is not None,
        "finetune": mode,
        "backbone": state.backbone,
        "backbone_sha256": state.backbone_sha256,
        "labeled": labeled,
        "aligned_at": state.aligned_at,
        "rounds_since": len(state.rounds),
        "state": config.state,
    }
    print(json.dumps(result))
    return result


def start(config: AlignConfig) -> None:
    """`lplgrad align`: decide, fine-tune when due, commit the round."""
    run(config)


JOB = Job("align", AlignConfig, start, run, "Fine-tune and promote the proxy's backbone when due.")

if __name__ == "__main__":
    raise SystemExit(run_job(JOB))

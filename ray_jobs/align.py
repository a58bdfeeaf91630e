"""Alignment for proxy mode: once the policy says the cached features have drifted from what the
labels would train, fine-tune the backbone on the labeled set (LP-FT or FT) and promote it, so
that the next `lplgrad features` refreshes the store from it (docs/proxy.md, "Alignment").

    lplgrad align labeled=runs/pools/labeled state=runs/align/state.json features=[runs/features/pool] \
        backbone=runs/train/RUN/checkpoint_... promote=runs/checkpoints/backbone growth=2.0
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m ray_jobs.align --config configs/align/nightly.yaml

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

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.checkpoint import CHECKPOINT_FILE, checkpoint_digest, fetch_checkpoint, load_checkpoint
from pipeline.pools import resolve_pool
from pipeline.proxy.alignment import FINETUNE_MODES, AlignmentPolicy, AlignmentState
from pipeline.proxy.store import FeatureStoreError, open_store
from pipeline.storage import check_writable, create_exclusive, filesystem_for, write_bytes_atomic
from ray_jobs._shared import jobs
from ray_jobs._shared.cluster import connect
from ray_jobs._shared.cluster_guard import guard_driver
from ray_jobs._shared.entry import Job, run_job


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


# -- state -----------------------------------------------------------------------------------


def read_state(uri: str, storage_options: Mapping[str, Any]) -> AlignmentState | None:
    """The newest committed state at `uri` (rolled forward through committed rounds), or None."""
    raw, _ = _read_raw_state(uri, storage_options)
    return None if raw is None else AlignmentState.from_json(raw, where=uri)


def _read_raw_state(uri: str, storage_options: Mapping[str, Any]) -> tuple[bytes | None, bool]:
    """(the state's bytes, whether a committed round was found past `uri` itself)."""
    fs, path = filesystem_for(uri, storage_options)
    fs.invalidate_cache()
    raw = fs.cat_file(path) if fs.exists(path) else None
    rolled = False
    seen = {raw}
    while fs.exists(claim := _round_path(path, raw)):  # a round committed, then killed before writing `uri`
        raw = fs.cat_file(claim)
        if raw in seen:  # a round that changed nothing points back at its own state
            break
        seen.add(raw)
        rolled = True
    return raw, rolled


def _round_path(path: str, base: bytes | None) -> str:
    # A round is claimed under the digest of the state it started from: of two rounds that
    # started from the same state, only one can create this file.
    key = hashlib.sha256(base).hexdigest()[:24] if base is not None else "initial"
    return f"{path}.rounds/{key}.json"


def write_state(uri: str, state: AlignmentState, storage_options: Mapping[str, Any]) -> None:
    fs, path = filesystem_for(uri, storage_options)
    write_bytes_atomic(fs, path, state.to_json().encode())


def commit_round(config: AlignConfig, base: bytes | None, state: AlignmentState, aligned: Path | None) -> None:
    """Claim the round (exclusive create, keyed by the state it started from), promote the
    fine-tuned checkpoint, then write the state. A round that lost the claim promotes nothing.

    Raises:
        FileExistsError: another `lplgrad align` committed a round from the same state meanwhile.
    """
    fs, path = filesystem_for(config.state, config.storage_options)
    if aligned is None and base is not None and state.to_json().encode() == base:
        return  # nothing changed: nothing to claim
    try:
        create_exclusive(fs, _round_path(path, base), state.to_json().encode())
    except FileExistsError:
        raise FileExistsError(
            f"another `lplgrad align` committed a round from the same state of {config.state} while this one ran; "
            "this round promoted nothing and did not change the state (run lplgrad align again)"
        ) from None
    if aligned is not None and config.promote:
        promote(aligned, config.promote, config.storage_options)
    write_state(config.state, state, config.storage_options)


def finish_rolled_round(config: AlignConfig, state: AlignmentState) -> None:
    """A round committed but killed before its promotion and state write: do both now (idempotent)."""
    if config.promote:
        fs, path = filesystem_for(config.promote, config.storage_options)
        target = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
        current = hashlib.sha256(fs.cat_file(target)).hexdigest() if fs.exists(target) else None
        if current != state.backbone_sha256:
            promote(fetch_checkpoint(state.backbone, config.storage_options), config.promote, config.storage_options)
    write_state(config.state, state, config.storage_options)


def current_state(config: AlignConfig, labeled: int) -> tuple[AlignmentState, bytes | None]:
    """The stored state (or on the first round a new one at `backbone` or `promote`), and the
    stored bytes the next round is claimed against."""
    raw, rolled = _read_raw_state(config.state, config.storage_options)
    state = None if raw is None else AlignmentState.from_json(raw, where=config.state)
    if state is not None and rolled:
        finish_rolled_round(config, state)
    return _first_or(config, state, labeled), raw


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


def promote(local_checkpoint: Path, to: str, storage_options: Mapping[str, Any]) -> None:
    """Copy a (fetched) checkpoint's one file to `to`, whole or not at all (readers never see half a file)."""
    data = (local_checkpoint / CHECKPOINT_FILE).read_bytes()
    fs, path = filesystem_for(to, storage_options)
    write_bytes_atomic(fs, f"{path.rstrip('/')}/{CHECKPOINT_FILE}", data)


def align(config: AlignConfig, state: AlignmentState, labeled: int, mode: str) -> tuple[AlignmentState, Path]:
    """Fine-tune; return the state to commit and the fetched new checkpoint (promoted at the commit)."""
    backbone = load_checkpoint(fetch_checkpoint(state.backbone, config.storage_options))
    name = f"align-{labeled}"
    train_config = jobs.config(
        "train",
        labeled=config.labeled,
        holdout=config.holdout,
        model=backbone.model_name,
        in_channels=backbone.in_channels,
        epochs=config.epochs,
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        use_gpu=config.use_gpu,
        cpus_per_worker=config.cpus_per_worker,
        storage_path=config.storage_path,
        name=name,
        checkpoint_every=config.epochs,
        eval_every=config.epochs,
        keep_checkpoints=1,
        seed=config.seed,
        warm_start=state.backbone,
        storage_options=config.storage_options,
        augment=config.augment,
    )
    probe_out = f"{config.storage_path.rstrip('/')}/{name}-probe"
    checkpoint = jobs.finetune_backbone(train_config, mode, config.features, probe_out, config.probe_epochs)
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
        guard_driver(
            [
                ("labeled", config.labeled),
                ("holdout", config.holdout),
                ("storage_path", config.storage_path),
                ("backbone", state.backbone),
                *(("features", store) for store in config.features),
            ],
            config.storage_options,
        )
        print(f"aligning at {labeled} labels ({mode}) from {state.backbone}")
        state, aligned = align(config, state, labeled, mode)
    else:
        state = state.observe(labeled)
    commit_round(config, base, state, aligned)
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

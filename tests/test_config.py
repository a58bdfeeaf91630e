from dataclasses import dataclass, field
from typing import Literal

import pytest

from pipeline.config import ConfigError, config_to_yaml, load_config
from pipeline.training import TrainSchedule


@dataclass(frozen=True)
class Job:
    model: str = "small_cnn"
    epochs: int = 3
    lr: float = 0.1
    address: str | None = None
    strategy: Literal["lplgrad", "entropy"] = "lplgrad"
    schedule: TrainSchedule = field(default_factory=TrainSchedule)

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")


def test_file_then_overrides(tmp_path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("epochs: 5\nlr: 1\nschedule:\n  epochs: 10\n  epoch_loss: 6\n  milestones: [8]\n")
    config = load_config(Job, path, ["lr=0.05", "address=ray://head:10001", "schedule.lr=0.2"])
    assert config.epochs == 5 and config.lr == 0.05 and config.address == "ray://head:10001"
    assert config.schedule.epochs == 10 and config.schedule.lr == 0.2 and config.schedule.milestones == (8,)
    assert load_config(Job, None, ["address=null"]).address is None
    assert "epochs: 5" in config_to_yaml(config)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["epoch=3"], "unknown config key.*epoch"),
        (["epochs=three"], "epochs: expected int"),
        (["epochs=true"], "epochs: expected int"),
        (["strategy=coreset"], "strategy: 'coreset' is not one of"),
        (["schedule.momentum=fast"], "schedule.momentum: expected float"),
        (["schedule.nope=1"], "schedule.nope"),
        (["epochs=0"], "epochs must be positive"),
        (["epochs"], "not key=value"),
    ],
)
def test_bad_values_name_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, overrides)


def test_missing_file_is_named(tmp_path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(Job, tmp_path / "absent.yaml")


def test_dates_stay_strings(tmp_path) -> None:
    # A nightly job passes run_id=$(date -u +%F); YAML would read 2026-11-21 as a date.
    path = tmp_path / "job.yaml"
    path.write_text("model: 2026-11-20\n")
    config = load_config(Job, path, ["address=2026-11-21"])
    assert config.model == "2026-11-20" and config.address == "2026-11-21"
    assert load_config(Job, None, ["epochs=7"]).epochs == 7  # other scalars still parse
    with pytest.raises(ConfigError, match="epochs: expected int"):
        load_config(Job, None, ["epochs=2026-11-21"])

"""`lplgrad JOB --help` and `lplgrad config show JOB`, generated from each job's config class."""

from __future__ import annotations

import dataclasses
import importlib

import pytest

from pipeline.config import ConfigError, config_fields, load_config
from ray_jobs import cli
from ray_jobs._shared.config_cli import config_class

# What each job's defaults leave empty (its own validation asks for these).
REQUIRED = {
    "train": ["labeled=pools/labeled"],
    "query": ["pool=pools/unlabeled", "checkpoint=runs/ckpt"],
    "features": ["pool=pools/unlabeled", "out=stores/f", "checkpoint=runs/ckpt"],
    "proxy": ["labeled=pools/labeled", "features=[stores/f]", "out=runs/proxy"],
    "align": ["labeled=pools/labeled", "state=runs/align/state.json"],
    "simulate": ["pool=pools/labeled"],
    "quickstart": [],
}


def _flow(value: object) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def test_every_job_is_covered() -> None:
    assert set(REQUIRED) == set(cli.JOBS), "add the new job's required keys to REQUIRED"


@pytest.mark.parametrize("job", sorted(cli.JOBS))
def test_help_names_every_key_with_its_default(job: str, capsys) -> None:
    assert cli.main([job, "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage:") and "--help" in text
    lines = text.splitlines()
    fields = config_fields(config_class(importlib.import_module(cli.JOBS[job][0])))
    for field in fields:
        rows = [line for line in lines if line.split()[:1] == [field.key]]
        if field.key in {f.section for f in fields}:
            assert f"section {field.key} (" in text and f"default {_flow(field.default)}" in text
            continue
        assert rows, f"--help of {job} does not list {field.key}"
        assert _flow(field.default) in rows[0].split(maxsplit=1)[1], f"{field.key}: default missing in {rows[0]!r}"
        assert field.meaning, f"{job}: {field.key} has no meaning; comment the field or add it to COMMON_MEANINGS"


@pytest.mark.parametrize("job", sorted(cli.JOBS))
def test_config_show_round_trips_through_load_config(job: str, tmp_path, capsys) -> None:
    assert cli.main(["config", "show", job]) == 0
    path = tmp_path / f"{job}.yaml"
    path.write_text(capsys.readouterr().out)
    cls = config_class(importlib.import_module(cli.JOBS[job][0]))
    loaded = load_config(cls, path, REQUIRED[job])
    assert loaded == load_config(cls, None, REQUIRED[job])
    assert len(path.read_text().splitlines()) >= len(dataclasses.fields(cls))


def test_config_show_says_what_the_defaults_lack(capsys) -> None:
    cli.main(["config", "show", "query"])
    assert "# The defaults alone do not run: pool" in capsys.readouterr().out


def test_unknown_key_suggests_the_closest() -> None:
    cls = config_class(importlib.import_module("ray_jobs.train"))
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) epoch; did you mean epochs\?"):
        load_config(cls, None, ["labeled=x", "epoch=3"])
    with pytest.raises(ConfigError, match=r"schedule.lrr; did you mean schedule.lr\?"):
        load_config(cls, None, ["labeled=x", "schedule.lrr=0.1"])

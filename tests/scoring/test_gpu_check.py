"""benchmarks/gpu_check runs its scorer part with torch alone and steps the Ray parts aside without Ray."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from _python import run_python

REPO = Path(__file__).resolve().parents[2]

# `ray` set to None in sys.modules makes `import ray` fail, as on a GPU machine without Ray.
WITHOUT_RAY = """
import sys
sys.modules["ray"] = None
from benchmarks import gpu_check
gpu_check.main(sys.argv[1:])
"""


def test_cpu_smoke_without_ray_writes_the_scorer_figures_and_skips_ray(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = run_python("-c", WITHOUT_RAY, "--cpu-smoke", "--out", str(out), env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["cpu_smoke"] and report["device"] == "cpu"
    rows = {(r["row"], r["precision"]): r for r in report["scorer"]}
    assert set(rows) == {("resnet_bn", "fp32"), ("resnet_bn", "bf16"), ("vit_tiny", "fp32"), ("vit_tiny", "bf16")}
    for (_, precision), row in rows.items():
        assert row["check"] == "ok"
        assert row["scorer_over_training_step"] > 0 and row["fallback_share"] == 0.0
        assert row["max_relative_error"]["scorer"] <= (1e-4 if precision == "fp32" else 5e-2)
        assert {"loop", "vmap", "train"} <= set(row["ratios"]) | set(row["status"])  # timed, or refused saying why
    for part in ("query", "ray_train"):
        assert report[part]["status"].startswith("skipped: Ray is not installed")
    assert "scorer / train step" in done.stdout and "ray_train: skipped" in done.stdout


def test_gpu_check_refuses_to_run_without_a_gpu_unless_asked_for_the_smoke_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import gpu_check

    monkeypatch.setattr(gpu_check.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    assert "no CUDA device: run this on a GPU machine, or pass --cpu-smoke" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()

import math

import pytest

from pipeline.learning_curves import (
    append_results,
    aulc,
    aulc_summary,
    difference_table,
    markdown_table,
    paired_differences,
    plot_learning_curves,
    read_results,
    summarize,
    t_quantile_975,
    write_summaries,
)


def rows(strategy: str, accuracies: list[float], seed: int) -> list[dict]:
    return [
        {"strategy": strategy, "seed": seed, "cycle": c, "labeled": 100 * (c + 1), "test_accuracy": a}
        for c, a in enumerate(accuracies)
    ]


def test_append_summarize_plot_and_table(tmp_path) -> None:
    path = tmp_path / "results.parquet"
    append_results(path, rows("lplgrad", [0.5, 0.7], seed=0))
    everything = append_results(path, rows("lplgrad", [0.7, 0.9], seed=1) + rows("random", [0.5, 0.6], seed=0))
    assert len(everything) == len(read_results(path)) == 6 and (tmp_path / "results.csv").exists()
    summary = {(e["strategy"], e["labeled"]): e for e in summarize(everything)}
    assert summary[("lplgrad", 100)]["mean"] == pytest.approx(0.6)
    assert summary[("lplgrad", 200)]["std"] == pytest.approx(0.1414, abs=1e-3)
    assert summary[("random", 200)]["runs"] == 1
    png = plot_learning_curves(everything, tmp_path / "curves.png", "test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = markdown_table(everything)
    assert "| lplgrad | 60.0 ± 14.1 | 80.0 ± 14.1 |" in table and table.startswith("| strategy | 100 | 200 |")


def test_rows_must_carry_the_required_columns(tmp_path) -> None:
    with pytest.raises(ValueError, match="lacks test_accuracy"):
        append_results(tmp_path / "r.parquet", [{"strategy": "x", "seed": 0, "cycle": 0, "labeled": 1}])


def test_aulc_is_the_trapezoid_mean_over_the_budget() -> None:
    # (100, 0.5) -> (200, 0.7) -> (400, 0.8): areas 100*0.6 + 200*0.75 = 210 over 300 labels.
    assert aulc([100, 200, 400], [0.5, 0.7, 0.8]) == pytest.approx(0.7)
    assert aulc([100], [0.6]) == 0.6
    with pytest.raises(ValueError, match="must increase"):
        aulc([200, 100], [0.5, 0.6])


def test_paired_differences_and_aulc_intervals_by_hand(tmp_path) -> None:
    everything = (
        rows("random", [0.50, 0.60], seed=0)
        + rows("random", [0.50, 0.64], seed=1)
        + rows("random", [0.50, 0.62], seed=2)
        + rows("entropy", [0.50, 0.63], seed=0)
        + rows("entropy", [0.50, 0.66], seed=1)
        + rows("entropy", [0.50, 0.68], seed=2)
    )
    diffs = {(d["strategy"], d["cycle"]): d for d in paired_differences(everything)}
    # Paired differences at cycle 1: 0.03, 0.02, 0.06 -> mean 0.03667, sd 0.02082, t(2) = 4.303.
    entry = diffs[("entropy", 1)]
    half = 4.303 * 0.0208167 / 3**0.5
    assert entry["diff"] == pytest.approx(0.0366667, abs=1e-6)
    assert (entry["diff_low"], entry["diff_high"]) == pytest.approx((0.0366667 - half, 0.0366667 + half), abs=1e-5)
    assert entry["mean"] == pytest.approx(0.6566667) and entry["runs"] == 3 and entry["labeled"] == 200
    assert diffs[("entropy", 0)]["diff"] == 0.0 and diffs[("random", 1)]["diff"] == 0.0
    # AULC per seed is the mean of the two points here; its paired differences are half the above.
    aulcs = {e["strategy"]: e for e in aulc_summary(everything)}
    assert aulcs["entropy"]["aulc"] == pytest.approx((0.565 + 0.58 + 0.59) / 3)
    assert aulcs["entropy"]["diff"] == pytest.approx(0.0366667 / 2, abs=1e-6)
    assert aulcs["entropy"]["diff_low"] == pytest.approx((0.0366667 - half) / 2, abs=1e-5)
    table = difference_table(everything)
    assert "| entropy | +0.0 [+0.0, +0.0] | +3.7 [-1.5, +8.8] |" in table
    assert "| entropy | 57.8 ± 1.3 | +1.8 [-0.8, +4.4] |" in table
    summary, aulc_path = write_summaries(everything, tmp_path)
    assert read_results(summary)[0].keys() >= {"strategy", "cycle", "diff", "diff_low", "diff_high"}
    assert (tmp_path / "aulc.csv").exists() and len(read_results(aulc_path)) == 2


def test_one_seed_has_no_interval_and_t_quantiles_are_tabulated() -> None:
    everything = rows("random", [0.5, 0.6], seed=0) + rows("entropy", [0.5, 0.7], seed=0)
    entry = [d for d in paired_differences(everything) if d["strategy"] == "entropy" and d["cycle"] == 1][0]
    assert entry["diff"] == pytest.approx(0.1) and math.isnan(entry["diff_low"])
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776 and t_quantile_975(11) == 2.228
    assert t_quantile_975(100) == 1.96

import pytest

from pipeline.learning_curves import append_results, markdown_table, plot_learning_curves, read_results, summarize


def rows(strategy: str, accuracies: list[float], seed: int) -> list[dict]:
    return [{"strategy": strategy, "seed": seed, "cycle": c, "labeled": 100 * (c + 1), "test_accuracy": a}
            for c, a in enumerate(accuracies)]


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

"""``lplgrad manifest show|verify|export|extract`` on a tiny committed run, built without Ray.

The run is what the query job would commit: a real pool (pipeline.pools), made-up scores for
every sample through ScoresWriter, two rows that failed to score, an exact top-k and
commit_run. Then: the summary, verification (and tampering it must catch), the three export
formats, image extraction to a local folder and to a loopback S3 server, and a reader that uses
pyarrow and pandas only.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _committed_run import K
from _committed_run import commit_fake_run as make_run

from pipeline.manifest import load
from pipeline.manifest.export import export_selection, extract_images, open_run
from pipeline.manifest.verify import verify_run
from pipeline.pools import build_pool, iter_pool_samples, resolve_pool, synthetic
from ray_jobs import cli, manifest_cli

REPO = Path(__file__).resolve().parents[2]


def make_pool(uri: str, options: dict[str, Any] | None = None) -> dict[str, bytes]:
    """A 40-sample PNG pool in 3 shards; returns key -> PNG bytes as stored."""
    build_pool(
        synthetic(40, seed=1, num_classes=3, image_size=12),
        uri,
        encoding="png",
        shard_samples=15,
        storage_options=options,
    )
    return {s.key: s.files["png"] for s in iter_pool_samples(resolve_pool(uri, options))}


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("manifest-cli")
    images = make_pool(str(root / "pool"))
    manifest = make_run(str(root / "pool"), str(root / "queries"), "2026-11-21")
    return {
        "root": root,
        "images": images,
        "manifest": manifest,
        "out": str(root / "queries"),
        "run": str(root / "queries" / "2026-11-21"),
        "pool": str(root / "pool"),
    }


def copy_run(local_run: dict[str, Any], tmp_path: Path) -> Path:
    """A private copy of the committed run, free to tamper with."""
    target = tmp_path / "queries" / "2026-11-21"
    shutil.copytree(local_run["run"], target)
    return target


# -- show --------------------------------------------------------------------------------------


def test_show_prints_identity_counts_and_top_rows(
    local_run: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    assert manifest_cli.main(["show", local_run["out"], "--top", "3"]) == 0  # the output root: follows LATEST
    text = capsys.readouterr().out
    selection = load(local_run["run"])
    first = selection.column("key")[0].as_py()
    assert "2026-11-21" in text and local_run["run"] in text
    assert "lplgrad" in text and f"k={K}" in text and "cd" * 32 in text
    assert "scored 38  excluded 0  errors 2  selected 6" in text
    assert "top 3:" in text and first in text and selection.column("key")[3].as_py() not in text

    assert manifest_cli.main(["show", local_run["run"], "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["run_id"] == "2026-11-21" and summary["counts"]["selected"] == K
    assert summary["pool"] == {"uri": local_run["pool"], "shards": 3, "samples": 40}
    assert [row["key"] for row in summary["top"]] == selection.column("key").to_pylist()
    assert summary["top"][0]["predicted_loss"] is None  # NaN in parquet, null in JSON


def test_lplgrad_entry_point_and_python_m(local_run: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["manifest", "verify", local_run["run"]]) == 0
    assert capsys.readouterr().out.startswith("ok: ")
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.manifest_cli", "show", local_run["run"], "--top", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "selected 6" in done.stdout


def test_add_commands_nests_under_manifest(local_run: dict[str, Any]) -> None:
    parser = argparse.ArgumentParser(prog="lplgrad")
    manifest_cli.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["manifest", "verify", local_run["run"], "--quick"])
    assert args.command == "manifest" and args.manifest_command == "verify" and args.quick


def test_input_errors_print_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert manifest_cli.main(["show", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lplgrad manifest show: error: no query run at") and err.count("\n") == 1, err
    assert err.rstrip().endswith(")") and "Traceback" not in err
    (tmp_path / "partial" / "scores").mkdir(parents=True)
    assert manifest_cli.main(["show", str(tmp_path / "partial")]) == 2
    assert "has no manifest.json" in capsys.readouterr().err


# -- verify ------------------------------------------------------------------------------------


def test_verify_accepts_the_committed_run(local_run: dict[str, Any]) -> None:
    result = verify_run(local_run["out"])
    assert result.ok, result.problems
    assert result.uri == local_run["run"]


def _attempt(run: Path) -> Path:
    """The directory of the committed attempt, where the run's tables are."""
    return run / "attempts" / json.loads((run / "manifest.json").read_text())["attempt"]


def _rewrite(path: Path, table: pa.Table) -> None:
    pq.write_table(table, path)


def _drop_last_selected(run: Path) -> str:
    table = pq.read_table(_attempt(run) / "selection.parquet")
    _rewrite(_attempt(run) / "selection.parquet", table.slice(0, table.num_rows - 1))
    return "has 5 rows but counts.selected is 6"


def _swap_ranks(run: Path) -> str:
    table = pq.read_table(_attempt(run) / "selection.parquet")
    order = [1, 0, *range(2, table.num_rows)]
    _rewrite(
        _attempt(run) / "selection.parquet",
        table.take(order).set_column(0, table.schema.field("rank"), table.column("rank")),
    )
    return "not ordered by selection_value"


def _repeat_key(run: Path) -> str:
    table = pq.read_table(_attempt(run) / "selection.parquet")
    keys = table.column("key").to_pylist()
    keys[-1] = keys[0]
    _rewrite(_attempt(run) / "selection.parquet", table.set_column(1, table.schema.field("key"), pa.array(keys)))
    return "keys repeat"


def _selected_key_in_errors(run: Path) -> str:
    selected = pq.read_table(_attempt(run) / "selection.parquet").column("key")[0].as_py()
    errors = pq.read_table(_attempt(run) / "errors.parquet").to_pylist()
    errors[0]["key"] = selected
    _rewrite(
        _attempt(run) / "errors.parquet",
        pa.Table.from_pylist(errors, schema=pq.read_schema(_attempt(run) / "errors.parquet")),
    )
    return "selected key(s) are also errors"


def _edit_inputs(run: Path) -> str:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["inputs"]["k"] = 7
    (run / "manifest.json").write_text(json.dumps(manifest))
    return "inputs_fingerprint does not recompute"


def _lose_score_part(run: Path) -> str:
    (_attempt(run) / "scores" / "part-00001.parquet").unlink()
    return "/scores/part-00001.parquet is missing"


def _extra_score_part(run: Path) -> str:
    shutil.copy(_attempt(run) / "scores" / "part-00000.parquet", _attempt(run) / "scores" / "part-00009.parquet")
    return "does not list: part-00009.parquet"


def _shrink_score_part(run: Path) -> str:
    part = _attempt(run) / "scores" / "part-00002.parquet"
    table = pq.read_table(part)
    _rewrite(part, table.slice(0, table.num_rows - 1))
    return "score parts hold 39 rows but counts.scored + counts.errors is 40"


def _flip_a_byte(run: Path) -> str:
    part = _attempt(run) / "scores" / "part-00001.parquet"
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    part.write_bytes(bytes(data))
    return "scores/part-00001.parquet: sha256 differs from the one recorded at commit"


def _unknown_schema_version(run: Path) -> str:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["schema_version"] = 2
    (run / "manifest.json").write_text(json.dumps(manifest))
    return "schema_version 2"


def _uncommitted(run: Path) -> str:
    (run / "manifest.json").unlink()
    return "has no manifest.json"


@pytest.mark.parametrize(
    "tamper",
    [
        _drop_last_selected,
        _swap_ranks,
        _repeat_key,
        _selected_key_in_errors,
        _edit_inputs,
        _lose_score_part,
        _extra_score_part,
        _shrink_score_part,
        _flip_a_byte,
        _unknown_schema_version,
        _uncommitted,
    ],
    ids=lambda f: f.__name__.strip("_"),
)
def test_verify_catches_tampering(
    local_run: dict[str, Any], tmp_path: Path, tamper, capsys: pytest.CaptureFixture[str]
) -> None:
    run = copy_run(local_run, tmp_path)
    assert verify_run(str(run)).ok
    expected = tamper(run)
    result = verify_run(str(run))
    assert not result.ok
    assert any(expected in problem for problem in result.problems), result.problems
    assert manifest_cli.main(["verify", str(run)]) == 1
    assert expected in capsys.readouterr().err


def test_verify_finds_selected_keys_absent_from_scores(local_run: dict[str, Any], tmp_path: Path) -> None:
    run = copy_run(local_run, tmp_path)
    selected = set(pq.read_table(_attempt(run) / "selection.parquet").column("key").to_pylist())
    for part in sorted((_attempt(run) / "scores").iterdir()):  # rename selected keys, keep row counts
        table = pq.read_table(part)
        keys = [f"other_{k}" if k in selected else k for k in table.column("key").to_pylist()]
        _rewrite(part, table.set_column(table.column_names.index("key"), "key", pa.array(keys)))
    quick = verify_run(str(run), scan_scores=False).problems  # row counts hold; the sizes do not
    assert quick and all("the commit recorded" in p for p in quick)
    problems = verify_run(str(run)).problems
    assert any("6 selected key(s) are not in the scores table" in p for p in problems)
    assert sum("sha256 differs" in p or "the commit recorded" in p for p in problems) == len(problems) - 1


# -- export ------------------------------------------------------------------------------------


def test_export_csv_and_jsonl(local_run: dict[str, Any], tmp_path: Path) -> None:
    selection = load(local_run["run"])
    assert manifest_cli.main(["export", local_run["run"], "--format", "csv", "--out", str(tmp_path / "s.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert [r["key"] for r in rows] == selection.column("key").to_pylist()
    assert [int(r["rank"]) for r in rows] == list(range(1, K + 1))
    assert [float(r["score"]) for r in rows] == pytest.approx(selection.column("score").to_pylist())
    assert rows[0]["predicted_loss"] == "" and "image" not in rows[0]

    assert (
        manifest_cli.main(
            [
                "export",
                local_run["out"],
                "--format",
                "jsonl",
                "--out",
                str(tmp_path / "s.jsonl"),
                "--image-url-prefix",
                "https://cdn.example.com/batch 1",
            ]
        )
        == 0
    )
    lines = [json.loads(line) for line in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert [line["key"] for line in lines] == selection.column("key").to_pylist()
    assert lines[0]["predicted_loss"] is None and lines[0]["shard"].endswith(".tar")
    assert lines[0]["image"] == f"https://cdn.example.com/batch 1/{lines[0]['key']}.png"


def test_export_label_studio_tasks(
    local_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    selection = load(local_run["run"]).to_pylist()
    out = tmp_path / "tasks.json"
    assert (
        manifest_cli.main(
            [
                "export",
                local_run["run"],
                "--format",
                "label-studio",
                "--out",
                str(out),
                "--image-url-prefix",
                "s3://labels/2026-11-21/",
            ]
        )
        == 0
    )
    tasks = json.loads(out.read_text())
    assert len(tasks) == K and all(set(task) == {"data"} for task in tasks)
    for task, row in zip(tasks, selection):
        assert task["data"]["image"] == f"s3://labels/2026-11-21/{row['key']}.png"
        assert task["data"]["key"] == row["key"] and task["data"]["score"] == row["score"]
        assert task["data"]["rank"] == row["rank"] and task["data"]["run_id"] == "2026-11-21"

    assert manifest_cli.main(["export", local_run["run"], "--format", "label-studio", "--out", "-"]) == 2
    assert "needs --image-url-prefix" in capsys.readouterr().err
    assert (
        manifest_cli.main(
            [
                "export",
                local_run["run"],
                "--format",
                "label-studio",
                "--out",
                "-",
                "--image-url-prefix",
                "/data/local-files/?d=batch",
                "--image-ext",
                "jpg",
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)[0]["data"]["image"].endswith(".jpg")


def test_export_looks_extensions_up_in_shards_without_an_index(local_run: dict[str, Any], tmp_path: Path) -> None:
    # A pool made by another tool has no index: the extension comes from the tar headers.
    moved = tmp_path / "pool-copy"
    shutil.copytree(local_run["pool"], moved)
    (moved / "index.json").unlink()
    run = open_run(local_run["run"])
    tasks = json.loads(export_selection(run, "label-studio", None, image_url_prefix="s3://x", pool=str(moved)))
    assert all(task["data"]["image"].endswith(".png") for task in tasks)


# -- extract -----------------------------------------------------------------------------------


def test_extract_to_a_local_folder(
    local_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "to-label"
    assert manifest_cli.main(["extract", local_run["run"], "--out", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    keys = load(local_run["run"]).column("key").to_pylist()
    shards = set(load(local_run["run"]).column("shard").to_pylist())
    assert report["written"] == K and report["missing"] == 0 and report["shards_read"] == len(shards)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{k}.png" for k in keys)
    for key in keys:
        assert (out / f"{key}.png").read_bytes() == local_run["images"][key]  # copied as stored, not re-encoded


def test_extract_from_a_moved_pool_reports_missing_keys(
    local_run: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_run(local_run["pool"], str(tmp_path / "queries"), "with-ghost", ghost="ghost_000001")
    moved = tmp_path / "moved-pool"
    shutil.copytree(local_run["pool"], moved)
    run = str(tmp_path / "queries" / "with-ghost")
    assert manifest_cli.main(["extract", run, "--out", str(tmp_path / "out"), "--pool", str(moved)]) == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["written"] == K - 1
    assert "missing ghost_000001: not in shard" in captured.err
    report = extract_images(open_run(run), str(tmp_path / "out2"), pool=str(moved), search_pool=True)
    assert report.shards_read == 3 and list(report.missing) == ["ghost_000001"]
    assert "not found in any shard" in report.missing["ghost_000001"]


def test_extract_and_export_on_s3(s3_server, local_run: dict[str, Any], tmp_path: Path) -> None:
    options = s3_server.storage_options
    pool, out, dest = s3_server.uri("pool"), s3_server.uri("queries"), s3_server.uri("to-label")
    images = make_pool(pool, options)
    make_run(pool, out, "2026-11-22", options)
    flags = [f"--storage-option={k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in options.items()]
    assert manifest_cli.main(["verify", out, *flags]) == 0
    assert manifest_cli.main(["extract", out, "--out", dest, *flags]) == 0
    fs = fsspec.filesystem("s3", **options)
    keys = load(out, options).column("key").to_pylist()
    written = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(dest.removeprefix("s3://")))
    assert written == sorted(f"{k}.png" for k in keys)
    assert fs.cat_file(f"{dest}/{keys[0]}.png") == images[keys[0]]
    # The task file can go to the bucket too, its URLs pointing at the extracted images.
    assert (
        manifest_cli.main(
            [
                "export",
                out,
                "--format",
                "label-studio",
                "--out",
                f"{dest}/tasks.json",
                "--image-url-prefix",
                dest,
                *flags,
            ]
        )
        == 0
    )
    tasks = json.loads(fs.cat_file(f"{dest}/tasks.json"))
    assert [t["data"]["image"] for t in tasks] == [f"{dest}/{k}.png" for k in keys]


# -- the schema stands alone -------------------------------------------------------------------


def test_plain_pyarrow_and_pandas_read_the_run(local_run: dict[str, Any]) -> None:
    # A reader with no project code: the layout and fields of docs/manifest.md are enough.
    script = textwrap.dedent(
        """
        import hashlib, json, sys
        from pathlib import Path
        import pandas as pd
        import pyarrow.parquet as pq

        root = Path(sys.argv[1])
        run = root / (root / "LATEST").read_text().strip()
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["schema_version"] == 1
        canonical = json.dumps(manifest["inputs"], sort_keys=True, separators=(",", ":"))
        assert hashlib.sha256(canonical.encode()).hexdigest() == manifest["inputs_fingerprint"]
        selection = pq.read_table(run / manifest["files"]["selection"]).to_pandas()
        assert list(selection["rank"]) == list(range(1, len(selection) + 1))
        assert len(selection) == manifest["counts"]["selected"]
        assert selection["selection_value"].is_monotonic_decreasing
        errors = pd.read_parquet(run / manifest["files"]["errors"])
        assert not set(errors["key"]) & set(selection["key"])
        scores = pd.concat(pd.read_parquet(run / part) for part in manifest["files"]["scores"])
        assert len(scores) == manifest["counts"]["scored"] + manifest["counts"]["errors"]
        assert set(selection["key"]) <= set(scores["key"])
        leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "ray_jobs", "ray", "torch"))
        assert not leaked, leaked
        print(selection["key"].iloc[0])
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script, local_run["out"]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=local_run["root"],
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == load(local_run["run"]).column("key")[0].as_py()


def test_csv_export_reads_back_with_pandas(local_run: dict[str, Any]) -> None:
    import pandas as pd

    data = export_selection(open_run(local_run["run"]), "csv", None)
    frame = pd.read_csv(io.BytesIO(data))
    assert list(frame["key"]) == load(local_run["run"]).column("key").to_pylist()
    assert frame["predicted_loss"].isna().all()

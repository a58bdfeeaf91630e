"""Errors for people: every user error of `lplgrad query` (and the manifest tools) is one line,
`lplgrad <command>: error: <what> (<fix>)`, exit code 2, no traceback, and comes before Ray starts;
a bug keeps its traceback and says it is one."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline.checkpoint import ModelSpec, save_untrained_checkpoint
from pipeline.manifest import PoolShard, QueryInputs, ScoreSummary, begin_run, commit_run
from pipeline.pools import encode_image, synthetic
from ray_jobs import cli, query

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli-errors")
    (root / "pool").mkdir()
    with tarfile.open(root / "pool" / "shard-0000.tar", "w") as tar:
        for sample in synthetic(8, seed=0, num_classes=4, image_size=28, channels=1):
            payload = encode_image(sample.image, "png")
            info = tarfile.TarInfo(f"{sample.key}.png")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (root / "empty-pool").mkdir()
    checkpoint = save_untrained_checkpoint(
        root / "ckpt", ModelSpec("small_cnn", 4, in_channels=1), [str(c) for c in range(4)]
    )
    (root / "not-a-checkpoint").mkdir()
    (root / "random-bytes").mkdir()
    # Fixed bytes, not os.urandom: 1 in 256 random files starts like a pickle stream.
    (root / "random-bytes" / "state.pt").write_bytes(bytes((i * 37 + 11) % 251 for i in range(4096)))
    (root / "pickled").mkdir()
    (root / "pickled" / "state.pt").write_bytes(b"\x80\x04\x95 not a zip, a pickle stream")
    (root / "ten.yaml").write_text("k: ten\n")
    blocker = root / "a-file"
    blocker.write_text("")
    # A committed run under another fingerprint, for the run-id conflict.
    other = QueryInputs(
        pool_uri="elsewhere",
        shards=(PoolShard("elsewhere/x.tar"),),
        checkpoint_uri="c",
        checkpoint_sha256="0" * 64,
        strategy="lplgrad",
        k=1,
        strategy_params={},
    )
    state = begin_run(str(root / "out"), "taken", other.fingerprint())
    commit_run(state, other, [], [], scored=0, excluded=0, summary=ScoreSummary())
    return {
        "root": str(root),
        "pool": str(root / "pool"),
        "checkpoint": checkpoint,
        "out": str(root / "out"),
        "blocker": str(blocker),
    }


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the job gets as far as starting Ray."""

    def refuse(address):
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(query, "connect", refuse)


CASES = {
    "k=0": (["k=0"], "k must be positive"),
    "k=-1": (["k=-1"], "k must be positive"),
    "decoders=0": (["decoders=0"], "decoders must be positive"),
    "k=abc": (["k=abc"], "k"),
    "unknown key": (["kk=3"], "unknown config key"),
    "k: ten in YAML": (["--config", "{root}/ten.yaml"], "k"),
    "no checkpoint file": (["checkpoint={root}/not-a-checkpoint"], "has no state.pt"),
    "no checkpoint directory": (["checkpoint={root}/nowhere-ckpt"], "nowhere-ckpt does not exist"),
    "random bytes as state.pt": (["checkpoint={root}/random-bytes"], "is unreadable: corrupt"),
    "a pickle, not weights": (["checkpoint={root}/pickled"], "is refused"),
    "missing pool": (["pool={root}/nowhere"], "nowhere"),
    "empty pool": (["pool={root}/empty-pool"], "empty-pool"),
    "run-id conflict": (["run_id=taken"], "choose a new run id"),
    "output not writable": (["out={blocker}/out"], "is not writable"),
    "S3 endpoint unreachable": (
        [
            "out=s3://bucket/q",
            "storage_options.endpoint_url=http://127.0.0.1:9",
            "storage_options.key=a",
            "storage_options.secret=b",
        ],
        "http://127.0.0.1:9",
    ),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_a_query_input_error_is_one_line_before_ray(case, inputs, no_ray, capsys) -> None:
    extra, expected = CASES[case]
    argv = [
        "query",
        f"pool={inputs['pool']}",
        f"checkpoint={inputs['checkpoint']}",
        f"out={inputs['out']}",
        "run_id=r1",
    ]
    argv += [a.format(**inputs) for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lplgrad query: error: ") and err.count("\n") == 1, err
    assert expected in err and err.rstrip().endswith(")") and "Traceback" not in err, err
    assert "weights_only=False" not in err and "`False`" not in err and "will likely succeed" not in err


def test_torch_advice_to_load_unsafely_is_never_passed_on() -> None:
    from ray_jobs._shared.errors import user_error_line

    torch_text = (
        "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument "
        "in `torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will "
        "likely succeed, but it can result in arbitrary code execution. Do it only if you got the file from a "
        "trusted source.\n\nTrying to load unsupported GLOBAL posix.system"
    )
    line = user_error_line("train", RuntimeError(torch_text))
    assert "`False`" not in line and "likely succeed" not in line and "posix.system" in line


def test_debug_shows_the_traceback(inputs, no_ray, capsys) -> None:
    assert cli.main(["query", "--debug", f"pool={inputs['pool']}", f"checkpoint={inputs['checkpoint']}", "k=0"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().splitlines()[-1].startswith(
        "lplgrad query: error: config: k must be positive"
    )


def test_a_bug_keeps_its_traceback_and_says_so(inputs, monkeypatch, capsys) -> None:
    def broken(config):
        return {}["pool"]  # a KeyError from our own code, not from the inputs

    monkeypatch.setattr(query, "check_before_ray", broken)
    assert cli.main(["query", f"pool={inputs['pool']}", f"checkpoint={inputs['checkpoint']}"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "KeyError" in err and "is a bug in lplgrad" in err


def test_python_m_query_prints_the_same_line(inputs) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.query", f"pool={inputs['pool']}", f"checkpoint={inputs['checkpoint']}", "k=0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()] and done.stderr.startswith(
        "lplgrad query: error: config: k must"
    )


def test_python_m_help_is_the_full_help_and_lists_debug() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "ray_jobs.train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    via_cli = subprocess.run(
        [sys.executable, "-m", "ray_jobs.cli", "train", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.stdout == via_cli.stdout
    assert "--debug" in done.stdout and "--verbose" in done.stdout and "cpus_per_worker" in done.stdout


def test_the_config_is_echoed_only_once_the_checks_pass(inputs, no_ray, capsys) -> None:
    assert cli.main(["query", f"pool={inputs['pool']}", f"checkpoint={inputs['root']}/nowhere-ckpt"]) == 2
    captured = capsys.readouterr()
    assert "does not exist" in captured.err and "strategy:" not in captured.out


def test_a_submitted_job_refuses_relative_paths(inputs, no_ray, monkeypatch, capsys) -> None:
    # What the job driver of `ray job submit --working-dir .` finds in its environment.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}')
    assert cli.main(["query", "pool=runs/pools/p", f"checkpoint={inputs['checkpoint']}", "out=s3://b/q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lplgrad query: error: pool=runs/pools/p is a relative path") and err.count("\n") == 1
    assert "absolute path" in err and "s3://" in err and "checkpoint=" not in err


def test_a_query_that_scored_nothing_commits_its_errors_and_exits_non_zero(inputs, ray_local, tmp_path, capsys) -> None:
    from pipeline import manifest

    pool = tmp_path / "unreadable-pool"
    pool.mkdir()
    (pool / "shard-0000.tar").write_bytes(bytes((i * 53 + 7) % 256 for i in range(4096)))  # not a tar
    out = tmp_path / "queries"
    argv = ["query", f"pool={pool}", f"checkpoint={inputs['checkpoint']}", f"out={out}", "run_id=bad"]
    assert cli.main(argv + ["incremental=false", "actors=1", "cpus_per_actor=0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("lplgrad query: error: run bad scored nothing: 1 rows or shards")
        and "manifest show" in err[-1]
    )
    errors = manifest.load_errors(str(out / "bad")).to_pylist()
    assert [e["shard"] for e in errors] == [str(pool / "shard-0000.tar")]

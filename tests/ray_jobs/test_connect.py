"""A new local Ray that does not come up in Ray's start-up wait ends the job with one line naming it."""

from __future__ import annotations

import pytest
import ray

from ray_jobs._shared.cluster import LocalRayStartError, connect
from ray_jobs._shared.errors import USER_ERROR_EXIT, run_command

# What Ray 2.60 raises (a bare Exception) when the raylet has not registered within its 30 s.
RAY_TIMEOUT = (
    "The current node timed out during startup. This could happen because some of the raylet failed to "
    "startup or the GCS has become overloaded."
)


@pytest.fixture
def new_local_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """connect() believes it must start a local Ray: no Ray in this process, no RAY_ADDRESS."""
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _failing_init(message: str):
    def init(*args, **kwargs):
        raise Exception(message)

    return init


def test_a_local_ray_that_times_out_is_one_line_naming_it(new_local_ray, monkeypatch, capsys) -> None:
    monkeypatch.setattr(ray, "init", _failing_init(RAY_TIMEOUT))
    with pytest.raises(LocalRayStartError, match=r"did not register within Ray's 30 s start-up wait \(load average"):
        connect(None)
    assert run_command("query", lambda: connect(None)) == USER_ERROR_EXIT
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert lines == [lines[0]] and lines[0].startswith("lplgrad query: error: the local Ray did not start")
    assert "pass address= a Ray cluster" in lines[0] and "Traceback" not in lines[0]


def test_any_other_failure_of_ray_init_stays_a_bug_with_its_traceback(new_local_ray, monkeypatch) -> None:
    monkeypatch.setattr(ray, "init", _failing_init("something else broke"))
    with pytest.raises(Exception, match="something else broke") as raised:
        connect(None)
    assert not isinstance(raised.value, LocalRayStartError)

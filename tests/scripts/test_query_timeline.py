"""benchmarks/query_timeline reads which worker was busy when from Ray's timeline events."""

from __future__ import annotations

import pytest

from benchmarks.query_timeline import busy_parts

READ = "ray.data._internal.execution.operators.map_operator._map_task"


def _event(name: str, worker: str, start_s: float, length_s: float) -> dict:
    return {"ph": "X", "name": name, "tid": worker, "ts": start_s * 1e6, "dur": length_s * 1e6}


def test_the_slowest_constructor_is_the_actor_and_read_tasks_are_counted_apart() -> None:
    events = [
        _event("__init__", "stats", 0.5, 0.01),  # one of Ray Data's own small actors
        _event("__init__", "scorer", 1.0, 2.0),
        _event("task:execute", "scorer", 1.0, 2.0),  # the constructor's own execution: not a block
        _event(READ, "reader", 1.5, 3.0),
        _event(READ, "reader", 4.6, 1.0),
        _event("task:execute", "reader", 1.5, 3.0),
        _event("task:execute", "scorer", 3.5, 0.25),
        _event("task:execute", "scorer", 3.25, 0.25),
        _event("task:execute", "stats", 3.0, 0.01),
        {"ph": "i", "name": "marker", "tid": "scorer", "ts": 0.0},
    ]
    parts = busy_parts(events, origin_us=0.5e6)
    assert parts["actor_init_start_s"] == 0.5 and parts["actor_init_s"] == 2.0
    assert parts["actor_first_batch_start_s"] == 2.75
    assert parts["actor_tasks"] == 2 and parts["actor_busy_s"] == pytest.approx(0.5)
    assert parts["read_tasks"] == 2 and parts["read_busy_s"] == pytest.approx(4.0)
    assert parts["read_first_start_s"] == 1.0 and parts["read_workers"] == 1

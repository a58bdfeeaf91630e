"""Never hang in silence: a job that can never fit a fixed-size cluster is refused before any work,
and a job stalled on pending resources prints a waiting line (what is pending, what is free) and
gives up after the bound. On the session's local Ray (4 logical CPUs, no autoscaler)."""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from _ray_nodes import ROOT

from ray_jobs._shared.capacity import (
    CapacityError,
    check_capacity,
    fits,
    query_demands,
    training_demands,
    watch_pending,
)
from ray_jobs._shared.cluster import LOCAL_MIN_CPUS
from ray_jobs._shared.progress import Progress


@dataclass(frozen=True)
class CpuHog:
    """An actor holding every CPU of the session's Ray: a task queued beside it stays pending."""

    ray: Any
    total: float
    actor: Any
    work: Any  # a remote function asking for 1 CPU, returning 1

    def queue_one_cpu_task(self) -> Any:
        """Submit a task asking for 1 CPU; its ObjectRef (it returns 1 once the hog is released)."""
        return self.work.remote()

    def release(self) -> None:
        self.ray.kill(self.actor)


@pytest.fixture
def hog(ray_local) -> Any:
    total = ray_local.cluster_resources()["CPU"]

    @ray_local.remote(num_cpus=total)
    class Hog:
        def ready(self) -> bool:
            return True

    @ray_local.remote(num_cpus=1)
    def work() -> int:
        return 1

    actor = Hog.remote()
    ray_local.get(actor.ready.remote())
    held = CpuHog(ray_local, total, actor, work)
    try:
        yield held
    finally:
        held.release()  # again, where the test did: killing a dead actor is a no-op


def test_everything_at_once_must_fit_each_on_one_node() -> None:
    # The hang of issue 22: 2 actors x 1 CPU fit a 2-CPU head, but then no decode task can run.
    assert not fits(query_demands(actors=2, cpus_per_actor=1.0), [{"CPU": 2.0}])
    assert fits(query_demands(actors=2, cpus_per_actor=0.25), [{"CPU": 2.0}])
    # 3 CPUs asked and 3.5 there, but once the actors sit on the two larger nodes no node has a
    # whole CPU left for the read-and-decode task.
    assert not fits(query_demands(actors=2, cpus_per_actor=1.0), [{"CPU": 1.5}, {"CPU": 1.5}, {"CPU": 0.5}])
    assert fits(query_demands(actors=2, cpus_per_actor=2.0), [{"CPU": 3.0}, {"CPU": 3.0}])
    gpu_actors = query_demands(actors=2, cpus_per_actor=2.0, gpus_per_actor=1.0)
    assert not fits(gpu_actors, [{"CPU": 16.0, "GPU": 1.0}])
    assert fits(gpu_actors, [{"CPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}, {"CPU": 8.0, "GPU": 1.0}])
    assert not fits(training_demands(num_workers=2, cpus_per_worker=1.0, use_gpu=True), [{"CPU": 8.0}])


def test_the_shipped_local_query_config_fits_a_two_cpu_head_and_a_laptop() -> None:
    local = yaml.safe_load((ROOT / "configs/query/local.yaml").read_text())
    demands = query_demands(local["actors"], local["cpus_per_actor"], local.get("gpus_per_actor", 0.0))
    assert fits(demands, [{"CPU": 2.0}]) and fits(demands, [{"CPU": float(LOCAL_MIN_CPUS)}])


def test_a_request_that_can_never_fit_names_what_it_asked_for_and_what_there_is() -> None:
    with pytest.raises(CapacityError) as refused:
        check_capacity(query_demands(actors=2, cpus_per_actor=1.0), nodes=[{"CPU": 2.0}], can_grow=False)
    line = str(refused.value)
    assert "2 scoring actors x 1 CPU" in line and "1 read-and-decode task x 1 CPU" in line and "3 CPU in all" in line
    assert "the cluster has 2 CPU on 1 node(s)" in line and "cannot grow" in line
    assert "lower actors, cpus_per_actor" in line and "gpus_per_actor" not in line and line.endswith(")")
    # Where an autoscaler may add nodes, the same request waits (with its waiting line) instead.
    check_capacity(query_demands(actors=2, cpus_per_actor=1.0), nodes=[{"CPU": 2.0}], can_grow=True)


def test_on_a_real_fixed_size_ray_too_much_is_refused_and_enough_passes(ray_local) -> None:
    total = ray_local.cluster_resources()["CPU"]
    with pytest.raises(CapacityError, match=f"{total:g} CPU on 1 node"):
        check_capacity(query_demands(actors=int(total), cpus_per_actor=1.0))
    check_capacity(query_demands(actors=1, cpus_per_actor=0.5))


def test_a_stalled_job_prints_a_waiting_line_and_gives_up_after_the_bound(ray_local, hog) -> None:
    total = hog.total
    stream, gave_up = io.StringIO(), []
    try:
        pending = hog.queue_one_cpu_task()
        watch = watch_pending(
            "query",
            interval_s=0.5,
            max_wait_s=3.0,
            stream=stream,
            on_give_up=lambda command, line: gave_up.append((command, line)),
        )
        with watch:
            deadline = time.monotonic() + 60
            while not gave_up and time.monotonic() < deadline:
                time.sleep(0.2)
    finally:
        hog.release()
    assert ray_local.get(pending, timeout=120) == 1
    lines = stream.getvalue().splitlines()
    assert gave_up and watch.lines >= 2 and gave_up[0][0] == "query", lines
    assert re.match(r"waiting: \d+ s for 1 x \{1 CPU\} to start; free CPU 0 of " + f"{total:g} ", lines[0]), lines
    assert lines[-1].endswith("gives up after 3 s)") and "1 x {1 CPU}" in gave_up[0][1], lines


def test_a_job_that_makes_progress_is_not_waiting(ray_local, hog) -> None:
    stream, progress = io.StringIO(), Progress("score", None, "rows", stream=io.StringIO(), tty=False)
    try:
        # Pending beside a job whose own steps keep coming: backpressure, not a stall.
        pending = hog.queue_one_cpu_task()
        with watch_pending("query", progress=lambda: progress.done, interval_s=0.3, stream=stream):
            for _ in range(10):
                progress.update(1)
                time.sleep(0.3)
    finally:
        hog.release()
    ray_local.get(pending, timeout=120)
    assert stream.getvalue() == ""


def test_a_training_job_waits_on_its_workers_placement_group_only(ray_local, hog) -> None:
    from ray.util.placement_group import placement_group, remove_placement_group

    stream = io.StringIO()
    try:
        pending = hog.queue_one_cpu_task()  # a data task queued: not what training waits on
        group = placement_group([{"CPU": 0.5}, {"CPU": 0.5}])  # the workers' bundles
        with watch_pending("train", interval_s=0.5, stream=stream, groups_only=True) as watch:
            deadline = time.monotonic() + 60
            while not watch.lines and time.monotonic() < deadline:
                time.sleep(0.2)
        remove_placement_group(group)
    finally:
        hog.release()
    ray_local.get(pending, timeout=120)
    line = stream.getvalue().splitlines()[0]
    assert "for 2 x {0.5 CPU} to start" in line and "{1 CPU}" not in line, line


def test_train_asking_for_more_workers_than_a_fixed_cluster_has_is_refused_before_any_work(
    ray_local, tmp_path, capsys
) -> None:
    from ray_jobs import cli

    total = ray_local.cluster_resources()["CPU"]
    argv = ["train", f"labeled={tmp_path / 'never-read'}", f"num_workers={int(total) + 1}", "cpus_per_worker=1"]
    assert cli.main(argv + [f"storage_path={tmp_path / 'train'}"]) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"lplgrad train: error: this job needs at once {int(total) + 1} training workers x 1 CPU")
    assert f"the cluster has {total:g} CPU on 1 node(s)" in line and "lower num_workers, cpus_per_worker" in line
    assert not (tmp_path / "train").exists()
